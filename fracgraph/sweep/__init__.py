"""`fracgraph sweep`: a grid of training runs as Ray tasks, then a results table, a Pareto plot and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import FracgraphError
from ..train import runio
from .grid import parse_grid, points
from .runner import Point, execute, make_points, plan, prepare_artifacts

__all__ = ["Point", "parse_grid", "run_sweep"]


def run_sweep(target: str, out_dir: str, base: dict, grid_specs: list[str], *, address: str | None = None,
              workers: int | None = None, threads: int | None = None, baseline: str | None = None,
              on_point: Callable[[Point], None] | None = None) -> dict:
    """Train every grid point (skipping finished ones), then write results.json/.csv, pareto.png, report/.

    `base` holds TrainConfig fields shared by all points; each `--grid NAME=V1,V2` spec adds a dimension.
    Returns {"points", "table", "failed", "workers", "threads", paths...}.
    """
    grid = parse_grid(grid_specs)
    if (workers is not None and workers < 1) or (threads is not None and threads < 1):
        raise FracgraphError("--workers and --threads must be at least 1")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FracgraphError(f"{out} exists and is not a directory: choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    art = prepare_artifacts(target, out, base)
    pts = make_points(points(grid), base, out, art)
    plan(pts)
    runio.atomic_write_json(out / "sweep.json", {"target": str(target), "artifacts": str(art), "base": base,
                                                 "grid": grid, "points": [p.name for p in pts]}, what="sweep plan")
    used = execute(pts, address=address, workers=workers, threads=threads, on_done=on_point)
    from .results import write_outputs

    res = write_outputs(out, pts, list(grid), baseline=baseline)
    return {"points": pts, "failed": sum(p.status == "failed" for p in pts), **used, **res}
