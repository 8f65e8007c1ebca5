"""Speed of `fracgraph estimate`: all three hardware models on ResNet-164 (target < 2 s, cold caches) and
integrating a 64k-step DFQ-style trace with one segment per step (target < 1 s).

    /work/venv/bin/python bench/estimate_speed.py [--batch 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    from fracgraph.analysis.estimate import Estimator, from_onnx
    from fracgraph.hwmodels import get_model
    from fracgraph.zoo import export

    with tempfile.TemporaryDirectory() as d:
        path = export("resnet164", Path(d) / "resnet164.onnx")
        t0 = time.perf_counter()
        src = from_onnx(path, args.batch)
        t_an = time.perf_counter() - t0
        t1 = time.perf_counter()
        ests = {}
        for name in ("bitfusion", "eyeriss", "fpga"):
            ests[name] = Estimator(src.step, get_model(name))
            s8 = ests[name].step_cost(src.uniform_bits(8, 8))
            s4 = ests[name].step_cost(src.uniform_bits(4, 4))
            print(f"  {name:9s} step FW8/BW8 {s8.latency_s * 1e3:9.1f} ms {s8.total.energy_total_pj / 1e9:9.1f} mJ | "
                  f"FW4/BW4 {s4.latency_s * 1e3:9.1f} ms {s4.total.energy_total_pj / 1e9:9.1f} mJ")
        t_hw = time.perf_counter() - t1
        n_gemm = sum(1 for o in src.step.ops if o.kind == "gemm")
        print(f"resnet164 (batch {args.batch}, {len(src.step.ops)} step ops, {n_gemm} GEMMs): analyzer "
              f"{t_an:.2f} s; three hardware models x 2 precisions {t_hw:.2f} s (cold caches); "
              f"total {t_an + t_hw:.2f} s [target < 2 s]")

        # 64k-step trace, one segment per step: DFQ-style per-mini-batch choice among 4 options
        rng = np.random.default_rng(0)
        steps = 64000
        opts = np.array([[4, 4, 6], [4, 4, 8], [6, 6, 8], [8, 8, 8]], np.float32)
        bits = opts[rng.integers(0, len(opts), steps)][:, None, :]
        starts = np.arange(steps)
        for name, est in ests.items():
            t2 = time.perf_counter()
            run = est.run_cost(starts, bits, steps)
            dt = time.perf_counter() - t2
            print(f"  {name:9s} 64k-segment trace integrated in {dt:.3f} s [target < 1 s]: "
                  f"{run['latency_s']:.1f} s, {run['energy_total_pj'] / 1e12:.1f} J")


if __name__ == "__main__":
    main()
