"""Where the resnet20 FW8/BW8 training step spends its time, before and after the speed passes.

Method: `fracgraph.profile.profile_step` runs 2 warm-up steps and then N steps with onnxruntime's profiler on,
and sums each node's kernel time per op type (an `If` counts only its own overhead; its subgraph's nodes count
under their op types). The two builds are profiled alternately (before, after, before, ...) and the per-op
times averaged, so that both see the same background load. Kernel times include waiting for a descheduled
thread on a loaded machine: read the shares, and the step ratios from bench/step_time.py.

    python bench/profile_step.py [--steps 3] [--rounds 2] [--batch 128] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.profile import profile_step
    from fracgraph.zoo import export

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = export("resnet20", d / "r20.onnx")
        builds = {"before": d / "before", "after": d / "after"}
        build_artifacts(model, builds["before"], BuildOptions(fast_backward=False, nchwc=False))
        build_artifacts(model, builds["after"], BuildOptions())
        ms = {k: defaultdict(float) for k in builds}
        calls = {k: {} for k in builds}
        step = {k: 0.0 for k in builds}
        for _ in range(a.rounds):
            for k, art in builds.items():
                tuning = {"allow_spinning": True} if k == "before" else None   # each with its own session settings
                p = profile_step(art, batch=a.batch, steps=a.steps, threads=a.threads, tuning=tuning)
                step[k] += p.step_ms / a.rounds
                for o in p.ops:
                    ms[k][o.op_type] += o.ms_per_step / a.rounds
                    calls[k][o.op_type] = o.calls_per_step
    if a.json:
        print(json.dumps({"step_ms": step, "op_ms": ms, "calls": calls}, indent=1))
        return
    total = {k: sum(v.values()) for k, v in ms.items()}
    print(f"resnet20 FW8/BW8, batch {a.batch}, {a.threads} threads, {a.rounds}x{a.steps} profiled steps per build")
    print(f"step (median wall): before {step['before']:.0f} ms, after {step['after']:.0f} ms, ratio {step['after'] / step['before']:.2f}")
    print(f"{'op type':26s} {'before ms':>10s} {'%':>6s} {'calls':>6s} {'after ms':>10s} {'%':>6s} {'calls':>6s}")
    for op in sorted(set(ms["before"]) | set(ms["after"]), key=lambda o: -max(ms["before"][o], ms["after"][o])):
        b, f = ms["before"][op], ms["after"][op]
        if max(b, f) < 0.005 * max(total.values()):
            continue
        print(f"{op:26s} {b:10.1f} {100 * b / total['before']:5.1f}% {calls['before'].get(op, 0):6d} "
              f"{f:10.1f} {100 * f / total['after']:5.1f}% {calls['after'].get(op, 0):6d}")
    print(f"{'graph total':26s} {total['before']:10.1f} {'':6s} {'':6s} {total['after']:10.1f}")


if __name__ == "__main__":
    main()
