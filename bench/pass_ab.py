"""One speed pass's effect on a model's FW8/BW8 step: the default artifacts against the same model built with the
pass skipped (`BuildOptions.skip_passes`), both sessions in one process, their steps alternated (A B, B A, ...), so
that each pair saw nearly the same machine load; the ratio of each pair's CPU times (`time.process_time`, the
process's threads; at 1 thread the step's own work) is the unit, reported as the median and range over pairs.

    python bench/pass_ab.py --model hf:gpt2 --skip gelu-grad [--width 256 --context 128 --batch 16] [--steps 9]
    python bench/pass_ab.py --model vit_tv --skip gelu-grad --size 64 --batch 32

hf: language models take random token ids (vocabulary --vocab) and next-token labels; corpus models random images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a zoo_external entry: hf:ARCH, a corpus name, tv:NAME, timm:NAME")
    ap.add_argument("--skip", required=True, help="the pass to skip in the B build (a pass's `name`)")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64, help="image models' input size")
    ap.add_argument("--context", type=int, default=128, help="hf: context")
    ap.add_argument("--vocab", type=int, default=96, help="hf: vocabulary")
    ap.add_argument("--width", type=int, default=256, help="hf: width (zoo_external.hf_entry)")
    a = ap.parse_args()

    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    from onnxruntime.training import api  # noqa: F401  (before TrainSession, see fracgraph/profile.py)

    from fracgraph import zoo_external as zx
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.runtime import TrainSession

    lm = a.model.startswith("hf:")
    e = zx.hf_entry(a.model[3:], a.width) if lm else zx.entry(a.model)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        path = zx.export_entry(e, d / "m.onnx", classes=a.vocab if lm else 10, size=a.context if lm else a.size)
        sessions, notes = {}, {}
        for key, opts in (("default", {}), (f"without {a.skip}", {"skip_passes": (a.skip,)})):
            m = build_artifacts(path, d / key.replace(" ", "_"), BuildOptions(**opts))
            notes[key] = [n for n in m.extra.get("notes", []) if n.startswith(f"[{a.skip}]")]
            sessions[key] = TrainSession(d / key.replace(" ", "_"), threads=a.threads, seed=0)
        m = sessions["default"].manifest
        if lm:
            task = m.task_info()
            ids = rng.integers(0, a.vocab, (a.batch, a.context + 1))
            x, y = ids[:, :-1].astype(task.input_dtype), ids[:, 1:].astype(np.int64)
        else:
            x = rng.standard_normal((a.batch, *[int(v) for v in m.input_shape])).astype(np.float32)
            y = rng.integers(0, m.num_classes, a.batch).astype(np.int64)
        bits = np.full((m.n_blocks, 3), 8, np.float32)
        keys = list(sessions)
        for k in keys:   # warm-up
            sessions[k].step(x, y, bits, 0.01)
        cpu = {k: [] for k in keys}
        load0 = os.getloadavg()[0]
        for i in range(a.steps):
            for k in (keys if i % 2 == 0 else keys[::-1]):
                c = time.process_time()
                sessions[k].step(x, y, bits, 0.01)
                cpu[k].append(time.process_time() - c)
        ratios = sorted(p / q for p, q in zip(cpu[keys[0]], cpu[keys[1]]))
        shape = f"width {a.width}, context {a.context}" if lm else f"{a.size}x{a.size}"
        print(f"{a.model} ({shape}), batch {a.batch}, {a.threads} thread(s), {a.steps} alternated pairs, load average "
              f"{load0:.1f} -> {os.getloadavg()[0]:.1f}")
        for k in keys:
            print(f"  {k:32s} {1000 * statistics.median(cpu[k]):8.1f} ms CPU (median)  {' '.join(notes[k])}")
        print(f"  default / without {a.skip}: {statistics.median(ratios):.2f} (pairs {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
