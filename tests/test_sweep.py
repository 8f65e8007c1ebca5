"""`fracgraph sweep`: grid parsing, a tiny sweep on a local Ray instance, skip/resume/failure handling."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from fracgraph.cli import app
from fracgraph.errors import FracgraphError
from fracgraph.sweep import parse_grid, run_sweep
from fracgraph.sweep.grid import points


def test_grid_values_are_typed_by_the_training_parameter():
    g = parse_grid(["eps=0.01,0.05", "epoch-iters=5,10", "fw_schedule=3:4:6:8,4:4:8:8", "lr_schedule=step",
                    "eval_batches=none,2"])
    assert g == {"eps": [0.01, 0.05], "epoch_iters": [5, 10], "fw_schedule": [[3, 4, 6, 8], [4, 4, 8, 8]],
                 "lr_schedule": ["step"], "eval_batches": [None, 2]}
    pts = points({"eps": [0.01, 0.05], "alpha": [0.3, 0.5]})
    assert [n for n, _ in pts] == ["eps=0.01_alpha=0.3", "eps=0.01_alpha=0.5", "eps=0.05_alpha=0.3",
                                   "eps=0.05_alpha=0.5"]
    assert pts[1][1] == {"eps": 0.01, "alpha": 0.5}


@pytest.mark.parametrize("spec, message", [
    (["eps"], "expected NAME=V1,V2"),
    (["epsilon=0.1"], "not a training parameter"),
    (["iters=1.5"], "not a valid int"),
    (["fw_schedule=3,4"], None),          # two one-stage schedules: valid
    (["fw_schedule=3:x"], "separated by ':'"),
    (["run_dir=a,b"], "set by the sweep itself"),
    (["eps=0.1", "eps=0.2"], "given twice"),
    (["eps=0.1,0.1"], "repeated"),
    ([], "at least one --grid"),
])
def test_grid_errors(spec, message):
    if message is None:
        assert parse_grid(spec) == {"fw_schedule": [[3], [4]]}
        return
    with pytest.raises(FracgraphError, match=message):
        parse_grid(spec)


def test_without_ray_one_clear_line(tmp_path, monkeypatch):
    from fracgraph.build import build_artifacts
    from fracgraph.zoo import export

    build_artifacts(export("digitnet", tmp_path / "dn.onnx"), tmp_path / "art")
    monkeypatch.setitem(sys.modules, "ray", None)           # import ray -> ImportError
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "art"), "-o", str(tmp_path / "sw"), "--grid", "eps=0.1,0.2",
                                 "--iters", "2"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "pip install 'fracgraph[ray]'" in r.output


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'fracgraph[ray]'; .ci/run does)")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def test_tiny_sweep_on_local_ray(ray_local, tmp_path):
    """Two points train as Ray tasks on one shared quantization, a diverging third fails without stopping the
    sweep; a point's run equals the same configuration trained directly; a re-run skips what is finished."""
    from fracgraph.zoo import export

    model = export("digitnet", tmp_path / "dn.onnx")
    out = tmp_path / "sw"
    base = dict(schedule="pfq", iters=20, epoch_iters=10, batch=64, eps=0.5, alpha=0.5)
    seen = []
    res = run_sweep(str(model), str(out), base, ["lr=0.05,0.1,1e9"], workers=2, on_point=seen.append)
    assert (res["workers"], res["threads"]) == (2, 1)           # 2 CPUs / 2 workers: one thread per point
    status = {r["point"]: r["status"] for r in res["table"]}
    assert status == {"lr=0.05": "ok", "lr=0.1": "ok", "lr=1000000000.0": "failed"}
    failed = next(r for r in res["table"] if r["status"] == "failed")
    assert "loss became nan" in failed["error"] and res["failed"] == 1 and len(seen) == 3

    # one quantization shared by all points; each point a complete run with its own directory and settings
    assert (out / "artifacts" / "manifest.json").exists()
    for lr in ("0.05", "0.1"):
        s = json.loads((out / "points" / f"lr={lr}" / "summary.json").read_text())
        assert s["config"]["lr"] == float(lr) and s["config"]["threads"] == 1 and s["steps"] == 20
        assert s["artifacts"] == str((out / "artifacts").resolve())
        assert not (out / "points" / f"lr={lr}" / "artifacts").exists()
    rows = json.loads((out / "results.json").read_text())
    assert [r["pareto"] for r in rows if r["status"] == "ok"].count(True) >= 1
    assert (out / "results.csv").read_text().splitlines()[0].startswith("point,lr,status,")
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "report" / "index.html").read_text()
    assert '<section id="sweep">' in page and "lr=0.05" in page

    # the Ray task is the ordinary training run: the same config trained here gives the same metrics
    from fracgraph.train.loop import TrainConfig, train

    direct = train(TrainConfig(**{**s["config"], "run_dir": str(tmp_path / "direct")}))
    assert direct["final_test_acc"] == s["final_test_acc"] and direct["cum_eff_gmacs"] == s["cum_eff_gmacs"]

    # re-run: finished points are skipped (not retrained), the failed one is tried again and fails again
    mtime = (out / "points" / "lr=0.05" / "summary.json").stat().st_mtime_ns
    again = run_sweep(str(model), str(out), base, ["lr=0.05,0.1,1e9"], workers=2)
    assert [p.status for p in again["points"]] == ["skipped", "skipped", "failed"] and again["ran"] == 1
    assert (out / "points" / "lr=0.05" / "summary.json").stat().st_mtime_ns == mtime

    # other settings in the same directory: refused before anything runs
    with pytest.raises(FracgraphError, match="other settings"):
        run_sweep(str(model), str(out), {**base, "iters": 30}, ["lr=0.05,0.1,1e9"], workers=2)
    # a task that could never be scheduled is refused, not left waiting
    with pytest.raises(FracgraphError, match="more than the 2 CPU"):
        run_sweep(str(out / "artifacts"), str(tmp_path / "sw2"), base, ["lr=0.05"], threads=3)
