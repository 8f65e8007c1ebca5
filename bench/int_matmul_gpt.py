"""A transformer's training step with the linear layers' GEMMs on integers (IntMatMul forward, IntMatMulGradW
weight gradient: `BuildOptions.int_matmul`, the default) against the same artifacts without them
(`quantize --no-int-matmul`), steps interleaved in one process (README "Integer GEMMs"): median step time of each and
their ratio, per precision. The zoo GPT by default, or a model-corpus entry (`--model vit_tiny`: batch 32, 64x64,
10 classes, as bench/model_speed.py builds it).

`--cpu-time` times the process' CPU time per step instead of the wall clock (with `--threads 1` the work done,
which moves far less with a shared machine's load than the wall time).

    python bench/int_matmul_gpt.py [--model gpt|vit_tiny|...] [--rounds 9] [--batch 32] [--threads 2] [--cpu-time]
                                   [--bits 8,8,8 12,12,8]
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
    ap.add_argument("--model", default="gpt", help="gpt (the zoo GPT) or a model-corpus name (vit_tiny, ...)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cpu-time", action="store_true", help="CPU time of the process per step, not wall time")
    ap.add_argument("--bits", nargs="+", default=["8,8,8", "12,12,8"], metavar="ACT,WEIGHT,GRAD")
    a = ap.parse_args()
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.runtime import TrainSession

    clock = time.process_time if a.cpu_time else time.perf_counter
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        rng = np.random.default_rng(0)
        if a.model == "gpt":
            from fracgraph.zoo import export_gpt

            path = export_gpt(d / "gpt.onnx", seed=0)
        else:
            from fracgraph import zoo_external

            path = d / f"{a.model}.onnx"
            zoo_external.export_entry(zoo_external.entry(a.model), path, classes=10, size=64)
        arts = {"int": BuildOptions(int_matmul=True), "float": BuildOptions(int_matmul=False)}
        for key, opts in arts.items():
            m = build_artifacts(path, d / key, opts)
            if key == "int":
                rec = m.extra["int_kernels"] or {"convs": [], "weight_grads": []}
                n_fw = sum(c["int"] for c in rec["convs"] if c["op_type"] == "MatMul")
                n_dw = sum(c["int"] for c in rec["weight_grads"] if c["float_form"] == "Gemm")
        sessions = {k: TrainSession(d / k, seed=0, threads=a.threads) for k in arts}
        m = sessions["int"].manifest
        if a.model == "gpt":
            x = rng.integers(0, m.num_classes, (a.batch, m.input_shape[-1])).astype(np.int64)
            y = rng.integers(0, m.num_classes, (a.batch, m.input_shape[-1])).astype(np.int64)
        else:
            x = rng.standard_normal((a.batch, 3, 64, 64)).astype(np.float32)
            y = rng.integers(0, 10, a.batch).astype(np.int64)
        print(f"{a.model}, batch {a.batch}, {a.threads} threads, {n_fw} MatMul forwards and {n_dw} weight gradients "
              f"switched; median {'CPU' if a.cpu_time else 'wall'} time of {a.rounds - 1} interleaved steps")
        for spec in a.bits:
            bits = np.tile(np.array([float(b) for b in spec.split(",")], np.float32), (m.n_blocks, 1))
            times = {k: [] for k in sessions}
            load0 = os.getloadavg()[0]
            for r in range(a.rounds):
                order = list(sessions.items()) if r % 2 else list(sessions.items())[::-1]
                for k, s in order:
                    time.sleep(0.2)   # the other session's spinning threads go idle
                    t = clock()
                    s.step(x, y, bits, 0.01)
                    times[k].append(clock() - t)
            med = {k: float(np.median(v[1:])) for k, v in times.items()}   # the first round warms up
            ratios = sorted(i / f for i, f in zip(times["int"][1:], times["float"][1:]))
            print(f"  bits {spec}: int-matmul {1000 * med['int']:.0f} ms, float {1000 * med['float']:.0f} ms, "
                  f"ratio of medians {med['int'] / med['float']:.2f} (per-round ratios {ratios[0]:.2f}-{ratios[-1]:.2f}; "
                  f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
