"""`fracgraph sweep` over a language model's runs: validation loss (lower is better) is the quality metric of the
table, the Pareto front, the plot and the report; the CLI prints it. The Ray execution itself is test_sweep.py's."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")

from fracgraph.cli import app  # noqa: E402
from fracgraph.sweep.results import write_outputs  # noqa: E402
from fracgraph.sweep.runner import Point  # noqa: E402

TEXT = "the cat sat on a mat. " * 40
RUNS = {"schedule=static": dict(schedule="static", fw=8, bw=8),
        "schedule=pfq": dict(schedule="pfq", fw_schedule=[4, 8], bw_schedule=[8, 8], eps=0.5, alpha=0.5)}


@pytest.fixture(scope="module")
def lm_points(tmp_path_factory):
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.train.loop import TrainConfig, train
    from fracgraph.zoo import export_gpt

    d = tmp_path_factory.mktemp("swlm")
    export_gpt(d / "gpt.onnx", seed=0, layers=1, heads=2, width=16, context=8, vocab=11)
    build_artifacts(d / "gpt.onnx", d / "art", BuildOptions(optimizer="adamw", weight_decay=0.0))
    (d / "t.txt").write_text(TEXT, encoding="utf-8")
    points = []
    for name, over in RUNS.items():
        s = train(TrainConfig(run_dir=str(d / "points" / name), artifacts=str(d / "art"), data=f"text:{d / 't.txt'}",
                              iters=8, epoch_iters=4, batch=4, lr=1e-2, lr_schedule="constant", **over))
        points.append(Point(name, {"schedule": name.split("=")[1]}, s["config"], status="ok", summary=s))
    return d, points


def test_lm_sweep_outputs_rank_by_validation_loss(lm_points):
    d, points = lm_points
    res = write_outputs(d / "sweep", points, ["schedule"])
    table = res["table"]
    assert all(r["final_val_loss"] is not None and "final_test_acc" not in r for r in table)
    by = {r["point"]: r for r in table}
    s = {p.name: p.summary for p in points}
    for name in RUNS:
        assert by[name]["final_val_loss"] == s[name]["final_val_loss"]
        assert by[name]["cum_eff_gmacs"] == s[name]["cum_eff_gmacs"]
    # the front, counted here from the summaries: no other point has lower (or equal) cost and lower (or equal) loss
    want = {a for a in RUNS if not any(
        s[b]["cum_eff_gmacs"] <= s[a]["cum_eff_gmacs"] and s[b]["final_val_loss"] <= s[a]["final_val_loss"]
        and (s[b]["cum_eff_gmacs"] < s[a]["cum_eff_gmacs"] or s[b]["final_val_loss"] < s[a]["final_val_loss"])
        for b in RUNS if b != a)}
    assert {r["point"] for r in table if r["pareto"]} == want
    assert "schedule=pfq" in want and s["schedule=pfq"]["cum_eff_gmacs"] < s["schedule=static"]["cum_eff_gmacs"]
    assert ("schedule=static" in want) == (s["schedule=static"]["final_val_loss"] < s["schedule=pfq"]["final_val_loss"])
    header = next(csv.reader((d / "sweep" / "results.csv").open()))
    assert header[:4] == ["point", "schedule", "status", "final_val_loss"] and "final_test_acc" not in header
    assert json.loads((d / "sweep" / "results.json").read_text())[0]["final_val_loss"] is not None
    assert (d / "sweep" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    page = (d / "sweep" / "report" / "index.html").read_text()
    assert "Sweep: validation loss vs cost" in page and "final val loss" in page
    assert f"{s['schedule=pfq']['final_val_loss']:.4f}" in page


def test_cli_prints_validation_loss(lm_points, tmp_path, monkeypatch):
    import fracgraph.sweep as sweep_mod

    d, points = lm_points

    def fake_run_sweep(target, output, base, grid, on_point=None, **kw):
        from fracgraph.sweep.results import rows

        assert base["data"] == f"text:{d / 't.txt'}" and grid == ["schedule=static,pfq"]
        for p in points:
            on_point(p)
        return {"table": rows(points), "points": points, "failed": 0, "results_csv": None, "pareto": None,
                "report": None}

    monkeypatch.setattr(sweep_mod, "run_sweep", fake_run_sweep)
    r = CliRunner().invoke(app, ["sweep", str(d / "art"), "-o", str(tmp_path / "out"), "--grid",
                                 "schedule=static,pfq", "--data", f"text:{d / 't.txt'}"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    loss = points[1].summary["final_val_loss"]
    assert f"done schedule=pfq: final val loss {loss:.4f}" in out and "final val loss" in out
    assert f"{loss:.4f}" in out and "final acc" not in out
