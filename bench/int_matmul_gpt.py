"""The zoo GPT's training step with integer MatMuls (`quantize --int-matmul`) against without, interleaved in one
process (README "Integer GEMMs"): median step time of each and their ratio, per precision.

    python bench/int_matmul_gpt.py [--rounds 9] [--batch 32] [--threads 2] [--bits 8,8,8 12,12,8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bits", nargs="+", default=["8,8,8", "12,12,8"], metavar="ACT,WEIGHT,GRAD")
    a = ap.parse_args()
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.runtime import TrainSession
    from fracgraph.zoo import export_gpt

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        path = export_gpt(d / "gpt.onnx", seed=0)
        arts = {"int": BuildOptions(int_matmul=True), "float": BuildOptions(int_matmul=False)}
        for key, opts in arts.items():
            build_artifacts(path, d / key, opts)
        sessions = {k: TrainSession(d / k, seed=0, threads=a.threads) for k in arts}
        m = sessions["int"].manifest
        rng = np.random.default_rng(0)
        ids = rng.integers(0, m.num_classes, (a.batch, m.input_shape[-1])).astype(np.int64)
        labels = rng.integers(0, m.num_classes, (a.batch, m.input_shape[-1])).astype(np.int64)
        print(f"zoo GPT, batch {a.batch}, {a.threads} threads, median of {a.rounds - 1} interleaved steps")
        for spec in a.bits:
            bits = np.tile(np.array([float(b) for b in spec.split(",")], np.float32), (m.n_blocks, 1))
            times = {k: [] for k in sessions}
            load0 = os.getloadavg()[0]
            for r in range(a.rounds):
                order = list(sessions.items()) if r % 2 else list(sessions.items())[::-1]
                for k, s in order:
                    time.sleep(0.2)   # the other session's spinning threads go idle
                    t = time.perf_counter()
                    s.step(ids, labels, bits, 0.01)
                    times[k].append(time.perf_counter() - t)
            med = {k: float(np.median(v[1:])) for k, v in times.items()}   # the first round warms up
            print(f"  bits {spec}: int-matmul {1000 * med['int']:.0f} ms, float {1000 * med['float']:.0f} ms, "
                  f"ratio {med['int'] / med['float']:.2f} (load average {load0:.1f} -> {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
