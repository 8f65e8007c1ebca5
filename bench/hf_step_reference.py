"""Language models from the wild against PyTorch: for each `hf:ARCH` (zoo_external; the 19 hand-made configs or any
transformers model type), four FP32 SGD steps of fracgraph's default artifacts (bits 0: no quantizer) against
transformers' own module with torch.optim.SGD on the same random-weight model and token batch. Equal losses mean
the exported graph, fracgraph's load (folding, tied weights, what trains) and onnxruntime's gradients are the
model's; a difference names a bug in one of them (session 13 found three: tied heads, gathered tables, padding_idx).

    python bench/hf_step_reference.py --models gpt2,llama,mpnet [--lr 0.05] [--steps 4] [-o OUT]

Prints one line per model: OK (every loss within --rtol of PyTorch's) / BAD / ERR (export or build failed: the
reason), and both loss sequences.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np


def compare(arch: str, out: Path, steps: int, lr: float, vocab: int, context: int, batch: int):
    import onnx
    import torch

    from fracgraph import zoo_external as zx
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.runtime import TrainSession

    e = zx.entry(f"hf:{arch}")
    net = zx.torch_model(e, classes=vocab, size=context, seed=0)
    path = zx.export_entry(e, out / f"{arch}.onnx", classes=vocab, size=context, seed=0)
    shutil.rmtree(out / f"{arch}-art", ignore_errors=True)
    m = build_artifacts(path, out / f"{arch}-art", BuildOptions(momentum=0.0, weight_decay=0.0))
    sess = TrainSession(out / f"{arch}-art", seed=0, threads=1)
    ids = np.random.default_rng(0).integers(0, vocab, (batch, context + 1))
    bits = np.zeros((m.n_blocks, 3), np.float32)
    ours = [float(sess.step(ids[:, :-1], ids[:, 1:], bits, lr)[0]) for _ in range(steps)]
    names = {i.name for i in onnx.load(str(path)).graph.input}
    x, y = torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:])
    kw = {"input_ids": x}
    if "attention_mask" in names:
        kw["attention_mask"] = torch.ones_like(x)
    if "token_type_ids" in names:
        kw["token_type_ids"] = torch.zeros_like(x)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    theirs = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(**kw, return_dict=False)[0].reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        theirs.append(float(loss))
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="comma-separated transformers model types (hf: optional)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--vocab", type=int, default=96)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("-o", "--out", default=None, help="keep the exports and artifacts here (default: a temp dir)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="hf_step_ref."))
    out.mkdir(parents=True, exist_ok=True)
    bad = 0
    for arch in [m.strip().removeprefix("hf:") for m in a.models.split(",") if m.strip()]:
        try:
            ours, theirs = compare(arch, out, a.steps, a.lr, a.vocab, a.context, a.batch)
        except Exception as ex:   # an export transformers' module cannot do, a model fracgraph refuses
            print(f"ERR {arch}: {type(ex).__name__}: {str(ex).strip().splitlines()[0][:200] if str(ex).strip() else ''}",
                  flush=True)
            bad += 1
            continue
        rel = max(abs(o - t) / abs(t) for o, t in zip(ours, theirs))
        ok = rel <= a.rtol
        bad += not ok
        print(f"{'OK ' if ok else 'BAD'} {arch}: max rel. diff {rel:.1e}; fracgraph {[round(v, 5) for v in ours]}, "
              f"PyTorch {[round(v, 5) for v in theirs]}", flush=True)
    if not a.out:
        shutil.rmtree(out, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
