"""Where a training step spends its time: onnxruntime's profiler over N steps of an artifact dir, per op type.

The ORT step (forward + backward graph) is profiled node by node; the host side of the step (the SGD update on
the live parameter views, feeding inputs) is the wall time not covered by `model_run`. Used by
`fracgraph profile` and `bench/profile_step.py`.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import FracgraphError


_CONTROL_FLOW = ("If", "Loop", "Scan")


@dataclass
class OpTime:
    op_type: str
    ms_per_step: float
    calls_per_step: int
    percent: float          # of the ORT graph time (sum of kernel times)


@dataclass
class StepProfile:
    steps: int
    batch: int
    threads: int
    bits: list[float]
    step_ms: float          # median wall time of a whole step (graph run + SGD), profiled run
    graph_ms: float         # per step: the sum of node kernel times
    ops: list[OpTime] = field(default_factory=list)
    top_nodes: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_trace(events: list[dict], steps: int) -> tuple[list[OpTime], list[dict], float]:
    """Per-op-type and per-node kernel time from an ORT profile (chrome-trace JSON), averaged over the last
    `steps` graph runs (earlier runs are warm-up)."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) < steps:
        raise FracgraphError(f"the profile holds {len(runs)} graph runs, expected at least {steps}")
    start = runs[-steps][0]
    kernels = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                      and e["ts"] >= start), key=lambda e: e["ts"])
    by_type, calls, by_node = defaultdict(float), defaultdict(int), defaultdict(float)
    node_type = {}
    for k, e in enumerate(kernels):
        op = e.get("args", {}).get("op_name", "?")
        dur = e["dur"]
        if op in _CONTROL_FLOW:   # its subgraph's nodes have their own events: count only its own overhead
            end = e["ts"] + e["dur"]
            for n in kernels[k + 1:]:
                if n["ts"] >= end:
                    break
                if n["ts"] + n["dur"] <= end and n.get("tid") == e.get("tid"):
                    dur -= n["dur"]
        by_type[op] += dur
        calls[op] += 1
        node = e["name"][: -len("_kernel_time")]
        by_node[node] += dur
        node_type[node] = op
    total = sum(by_type.values()) or 1.0
    ops = [OpTime(op, by_type[op] / 1000 / steps, calls[op] // steps, 100 * by_type[op] / total)
           for op in sorted(by_type, key=by_type.get, reverse=True)]
    nodes = [{"node": n, "op_type": node_type[n], "ms_per_step": by_node[n] / 1000 / steps, "percent": 100 * by_node[n] / total}
             for n in sorted(by_node, key=by_node.get, reverse=True)]
    return ops, nodes, total / 1000 / steps


def profile_step(art_dir, batch: int = 128, steps: int = 5, bits: tuple[float, float, float] = (8, 8, 8),
                 threads: int | None = None, warmup: int = 2, top: int = 10, seed: int = 0,
                 tuning: dict | None = None) -> StepProfile:
    """Run `warmup` unprofiled steps, then `steps` profiled ones, on random data of the model's input shape."""
    # imported here, not first inside TrainSession.__init__: a traceback that onnxruntime keeps from its own import
    # would hold that frame, so the session (and its trace file) would never be released
    from onnxruntime.training import api  # noqa: F401

    from .runtime import TrainSession

    if steps < 1 or batch < 1:
        raise FracgraphError("--steps and --batch must be at least 1")
    art = Path(art_dir)
    with tempfile.TemporaryDirectory(prefix="fracgraph-profile-") as tmp:
        sess = TrainSession(art, threads=threads, seed=seed, profile_prefix=str(Path(tmp) / "step"), tuning=tuning)
        threads_used = sess.threads
        m = sess.manifest
        if any(d is None for d in m.input_shape):
            raise FracgraphError(f"{art}: the model input has dynamic dims {m.input_shape} besides the batch; cannot make a sample batch")
        rng = np.random.default_rng(seed)
        task = m.task_info()
        if task.is_lm:   # token ids [batch, T] and next-token labels [batch, T]
            x = rng.integers(0, task.num_classes, (batch, task.context)).astype(task.input_dtype)
            y = rng.integers(0, task.num_classes, (batch, task.context)).astype(np.int64)
        else:
            x = rng.standard_normal((batch, *m.input_shape)).astype(np.float32)
            y = rng.integers(0, m.num_classes, batch).astype(np.int64)
        b = np.tile(np.asarray(bits, np.float32), (m.n_blocks, 1))
        for _ in range(warmup):
            sess.step(x, y, b, 0.0)
        walls = []
        for _ in range(steps):
            t = time.perf_counter()
            sess.step(x, y, b, 0.0)
            walls.append(time.perf_counter() - t)
        del sess          # onnxruntime writes the trace when the session is destroyed
        gc.collect()
        events = [e for f in sorted(Path(tmp).glob("step*.json")) for e in json.loads(f.read_text())]
    if not events:
        raise FracgraphError("onnxruntime wrote no profile events")
    ops, nodes, graph_ms = parse_trace(events, steps)
    return StepProfile(steps, batch, threads_used, list(map(float, bits)), 1000 * float(np.median(walls)), graph_ms,
                       ops, nodes[:top])


def render(p: StepProfile, limit: int = 25) -> str:
    lines = [f"training step: batch {p.batch}, {p.threads} threads, bits (act, weight, grad) = {p.bits}, {p.steps} profiled steps",
             f"step {p.step_ms:.1f} ms (median wall), graph kernels {p.graph_ms:.1f} ms per step",
             "", f"{'op type':28s} {'ms/step':>9s} {'calls':>6s} {'% graph':>8s}"]
    for o in p.ops[:limit]:
        lines.append(f"{o.op_type:28s} {o.ms_per_step:9.2f} {o.calls_per_step:6d} {o.percent:7.1f}%")
    if len(p.ops) > limit:
        rest = p.ops[limit:]
        lines.append(f"{'(' + str(len(rest)) + ' more)':28s} {sum(o.ms_per_step for o in rest):9.2f} {sum(o.calls_per_step for o in rest):6d} {sum(o.percent for o in rest):7.1f}%")
    lines += ["", "top nodes:"]
    for n in p.top_nodes:
        lines.append(f"  {n['ms_per_step']:8.2f} ms {n['percent']:5.1f}%  {n['op_type']:18s} {n['node']}")
    return "\n".join(lines)
