"""What fracgraph trains against what PyTorch trains: for each model (corpus names, tv:NAME, timm:NAME, hf:TYPE),
the number of values in the initializers `build.classify_initializers` makes trainable after `load_model`, against
`sum(p.numel() for p in model.parameters() if p.requires_grad)` of the PyTorch module the export came from.

    python bench/trainable_params.py --models resnet18,vit_tiny,tv:swin_t,timm:levit_128s,hf:gpt2

One line per model: OK (equal), MISMATCH (fracgraph's count, PyTorch's, the difference) or ERR (the reason).
Session 13 found untied heads, gathered tables trained as copies, class tokens and RoPE buffers this way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True)
    ap.add_argument("--size", type=int, default=64, help="image size; hf: models' context is 32, vocabulary 96")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    from fracgraph import zoo_external as zx
    from fracgraph.build import classify_initializers
    from fracgraph.model import load_model

    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in a.models.split(",") if m.strip()]:
            try:
                e = zx.entry(name)
                classes, size = (96, 32) if name.startswith("hf:") else (10, a.size)
                net = zx.torch_model(e, classes=classes, size=size)
                want = sum(p.numel() for p in net.parameters() if p.requires_grad)
                m = load_model(zx.export_entry(e, Path(tmp) / f"{name.replace(':', '_')}.onnx", classes=classes,
                                               size=size))
                trainable, _ = classify_initializers(m)
                sizes = {t.name: int(np.prod(t.dims)) for t in m.graph.initializer}
                got = sum(sizes[x] for x in trainable)
            except Exception as ex:
                print(f"ERR {name}: {str(ex).strip().splitlines()[0][:200] if str(ex).strip() else type(ex).__name__}",
                      flush=True)
                bad += 1
                continue
            bad += got != want
            print(f"{'OK ' if got == want else 'MISMATCH'} {name}: fracgraph {got:,}, PyTorch {want:,}"
                  + ("" if got == want else f" ({got - want:+,})"), flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
