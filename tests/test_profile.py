"""`fracgraph profile`: the per-op-type table from onnxruntime's profiler, warm-up runs excluded."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fracgraph.build import BuildOptions, build_artifacts
from fracgraph.cli import app
from fracgraph.profile import parse_trace


def _node(op, name, ts, dur):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_parse_trace_averages_the_last_runs_only():
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},     # warm-up
        _node("Conv", "c", 10, 90),
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
        _node("Conv", "c", 210, 30), _node("Relu", "r", 250, 10),
        {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100},
        _node("Conv", "c", 410, 50), _node("Relu", "r", 470, 10),
    ]
    ops, nodes, graph_ms = parse_trace(events, steps=2)
    assert [(o.op_type, o.calls_per_step) for o in ops] == [("Conv", 1), ("Relu", 1)]
    assert ops[0].ms_per_step == pytest.approx(0.040) and ops[1].ms_per_step == pytest.approx(0.010)
    assert ops[0].percent == pytest.approx(80.0) and graph_ms == pytest.approx(0.050)
    assert nodes[0]["node"] == "c"


def test_profile_command_json(small_model, tmp_path):
    _, path = small_model
    art = tmp_path / "art"
    build_artifacts(path, art, BuildOptions())
    r = CliRunner().invoke(app, ["profile", str(art), "--batch", "4", "--steps", "2", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    prof = json.loads(r.output)
    types = {o["op_type"] for o in prof["ops"]}
    assert {"Conv", "SRQuantizeBits", "FakeQuantizeBits", "MinMax"} <= types and "Round" not in types   # fused ops are listed (weight quantizers too)
    assert "ConvGradWCols" in types   # the small model's strided convs' dW (passes/conv_grad_w.py's im2col-gemm)
    assert sum(o["percent"] for o in prof["ops"]) == pytest.approx(100.0, abs=0.1)
    assert prof["step_ms"] > 0 and prof["graph_ms"] > 0 and prof["threads"] == 1
    table = CliRunner().invoke(app, ["profile", str(art), "--batch", "4", "--steps", "1", "--threads", "1"])
    assert table.exit_code == 0 and "ms/step" in table.output and "top nodes:" in table.output


def test_profile_command_rejects_a_non_artifact_dir(tmp_path):
    r = CliRunner().invoke(app, ["profile", str(tmp_path), "--steps", "1"])
    assert r.exit_code == 2
    assert "manifest.json" in r.output and "Traceback" not in r.output


def test_parse_trace_counts_an_if_without_its_subgraph_nodes():
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
        _node("If", "branch", 10, 50), _node("Round", "inner", 20, 30), _node("Conv", "c", 70, 20),
    ]
    ops, _, graph_ms = parse_trace(events, steps=1)
    assert {o.op_type: o.ms_per_step for o in ops} == pytest.approx({"If": 0.020, "Round": 0.030, "Conv": 0.020})
    assert graph_ms == pytest.approx(0.070)
