"""Run the grid points of a sweep as Ray tasks: plan (skip, resume or start each point), execute, collect.

Each point is an ordinary `train` run in SWEEP/points/NAME, so it can be inspected, resumed or reported like any
other run. A point whose summary.json exists with the same configuration is finished and skipped; one with a
checkpoint but no summary (the sweep was killed) resumes from it. Points share one artifact directory, quantized
once. A task gets `threads` CPUs and uses that many onnxruntime/torch threads, so `workers` concurrent tasks fill
the cores without oversubscribing them. With an existing cluster (`address`), SWEEP/ must be on a filesystem every
node sees, and fracgraph must be installed on every node.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import FracgraphError
from ..train import runio
from ..train.loop import ARTIFACTS as ARTIFACTS_DIR  # the directory `train` quantizes a model into
from ..train.loop import TrainConfig

POINTS_DIR = "points"
ERROR_FILE = "error.txt"
IGNORED = {"run_dir", "threads"}    # may differ between sweeps without changing a point's result


@dataclass
class Point:
    name: str
    overrides: dict
    config: dict                 # complete TrainConfig fields
    action: str = "new"          # new | resume | done
    status: str = "pending"      # pending | ok | skipped | failed
    summary: dict | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])


def _mismatch(planned: dict, recorded: dict) -> list[str]:
    return [f"{k} {recorded[k]!r} (now {planned[k]!r})" for k in planned
            if k in recorded and k not in IGNORED and planned[k] != recorded[k]]


def plan(points: list[Point]) -> None:
    """Decide per point: done (skip), resume from its checkpoint, or new; a point trained with other settings
    is an error before anything runs, as its directory cannot hold two runs."""
    for p in points:
        d = p.run_dir
        recorded, action = None, "new"
        if (d / runio.SUMMARY_FILE).exists():
            summary = runio.read_json(d / runio.SUMMARY_FILE, what="point summary")
            recorded, action = summary.get("config") or {}, "done"
            p.summary = summary
        else:
            latest = runio.CheckpointStore(d).latest()
            if latest is not None:
                recorded, action = latest[1].get("config") or {}, "resume"
        if recorded is not None:
            diff = _mismatch(p.config, recorded)
            if diff:
                raise FracgraphError(f"{d} was trained with other settings ({'; '.join(diff[:3])}): "
                                     "use a new -o directory for a different sweep")
        p.action = action


def prepare_artifacts(target: str, out: Path, base: dict) -> Path:
    """The artifact directory every point trains: TARGET itself, or TARGET quantized once into SWEEP/artifacts
    (as `train` would quantize it for the base schedule: DFQ gates for dfq/fractrain)."""
    from ..manifest import Manifest
    from ..train.loop import _prepare_artifacts

    t = Path(target)
    if (t / "manifest.json").is_file():
        return t.resolve()
    if not t.is_file():
        raise FracgraphError(f"{target}: neither an artifact directory (no manifest.json) nor an ONNX model file")
    art = out / ARTIFACTS_DIR
    if (art / "manifest.json").is_file():
        src = Manifest.read(art).source_model
        if Path(src).resolve() != t.resolve():
            raise FracgraphError(f"{art} was quantized from {src}, not {target}: use a new -o directory")
        return art.resolve()
    cfg = TrainConfig(run_dir=str(out), model=str(t), **{k: base[k] for k in ("schedule", "fw", "bw") if k in base})
    return _prepare_artifacts(cfg, out, resume=False).resolve()


def train_point(config: dict, resume: bool) -> dict:
    """The Ray task: one training run. Failures come back as data, so one bad point never stops the sweep."""
    threads = config.get("threads")
    if threads:
        try:
            import torch

            torch.set_num_threads(int(threads))
        except ImportError:
            pass
    from ..train.loop import train

    run_dir = Path(config["run_dir"])
    try:
        return {"status": "ok", "summary": train(TrainConfig(**config), resume=resume)}
    except FracgraphError as e:
        return {"status": "failed", "error": str(e)}
    except Exception as e:  # a bug or a crash inside one point: keep its traceback beside the run, go on
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ERROR_FILE).write_text(traceback.format_exc())
        return {"status": "failed", "error": f"{type(e).__name__}: {e} (traceback in {run_dir / ERROR_FILE})"}


def import_ray():
    try:
        import ray
    except ImportError:
        raise FracgraphError("`fracgraph sweep` needs Ray: pip install 'fracgraph[ray]'") from None
    return ray


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def connect(ray, address: str | None, workers: int | None, threads: int | None, n_tasks: int):
    """Start a local Ray instance (or join `address`); returns (workers, threads per task, whether we started it)."""
    started = False
    if not ray.is_initialized():
        import logging

        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        if address:
            try:
                ray.init(address=address, **kwargs)
            except Exception as e:  # ConnectionError mostly; Ray raises several kinds for a bad address
                raise FracgraphError(f"--address {address}: cannot connect to a Ray cluster ({e}); start one with "
                                     "`ray start --head` or omit --address for a local instance") from None
        else:
            ray.init(num_cpus=_cpus(), **kwargs)
        started = True
    cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
    if threads is not None and threads > cpus:
        if started:
            ray.shutdown()
        raise FracgraphError(f"--threads {threads} is more than the {cpus} CPU(s) Ray has: no point could start")
    if workers is None:
        workers = max(1, min(n_tasks, cpus // (threads or 1)))
    if threads is None:
        threads = max(1, cpus // min(workers, n_tasks))
    return workers, threads, started


def execute(points: list[Point], *, address: str | None = None, workers: int | None = None,
            threads: int | None = None, on_done: Callable[[Point], None] | None = None) -> dict:
    """Run every point not done yet, at most `workers` at a time; returns what was used (workers, threads)."""
    todo = [p for p in points if p.action != "done"]
    for p in points:
        if p.action == "done":
            p.status = "skipped"
            if on_done:
                on_done(p)
    if not todo:
        return {"workers": 0, "threads": threads, "ran": 0}
    ray = import_ray()
    workers, threads, started = connect(ray, address, workers, threads, len(todo))
    # a task reserves `threads` CPUs, so Ray never runs more points at once than the CPUs hold, whatever --workers
    task = ray.remote(num_cpus=threads, max_retries=0)(train_point)
    pending: dict = {}
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                p = queue.pop(0)
                p.config["threads"] = threads
                pending[task.remote(p.config, p.action == "resume")] = p
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            p = pending.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as e:  # the worker died (killed, out of memory): the point failed, the sweep goes on
                res = {"status": "failed", "error": f"task failed: {type(e).__name__}: {str(e).splitlines()[0]}"}
            p.status, p.summary, p.error = res["status"], res.get("summary"), res.get("error")
            if on_done:
                on_done(p)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
    return {"workers": workers, "threads": threads, "ran": len(todo)}


def make_points(grid_points: list[tuple[str, dict]], base: dict, out: Path, artifacts: Path) -> list[Point]:
    fields = asdict(TrainConfig(run_dir=""))
    unknown = set(base) - set(fields)
    if unknown:
        raise FracgraphError(f"unknown training parameter(s): {', '.join(sorted(unknown))}")
    pts = []
    for name, over in grid_points:
        cfg = {**fields, **base, **over, "run_dir": str((out / POINTS_DIR / name).resolve()),
               "artifacts": str(artifacts), "model": None}
        pts.append(Point(name, over, cfg))
    return pts
