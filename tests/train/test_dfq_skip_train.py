"""DFQ with the skip option end to end on digits: the gates choose skip under a low cp target, the run's cost,
trace, histogram, `estimate` and the report's precision figure all understand a skipped block."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fracgraph.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory):
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.passes.dfq_gate import DfqOptions, parse_options
    from fracgraph.policy import LayerPolicy
    from fracgraph.zoo import export

    d = tmp_path_factory.mktemp("dfqskip")
    model = export("digitnet", d / "dn.onnx")
    build_artifacts(model, d / "art", BuildOptions(dfq=DfqOptions(options=parse_options("3/6,4/6,4/8,6/8,skip")),
                                                   policy=LayerPolicy(first="fp32")))
    # a target below the cheapest precision's cp and a strong cost weight: skipping is the only way down
    s = train(TrainConfig(run_dir=str(d / "r"), artifacts=str(d / "art"), schedule="dfq", target_cp=1.0, beta=0.1,
                          iters=150, epoch_iters=30, batch=64, lr=0.05))
    return d, s


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_skip_is_chosen_and_costed(skip_run):
    d, s = skip_run
    hist = s["dfq"]["choice_histogram"]
    assert all("skip" in h["counts"] for h in hist)
    assert sum(h["counts"]["skip"] for h in hist) > 0, hist          # the gates did skip
    man = json.loads((d / "art" / "manifest.json").read_text())
    assert man["dfq"]["shortcut_ops"][0] == [] and len(man["dfq"]["shortcut_ops"][1]) == 1   # identity, downsample
    from fracgraph.trace import Trace

    t = Trace.read(d / "r")
    assert t.skips and set(np.unique(t.active)) <= {0.0, 1.0}          # batch mode: a block runs or is skipped
    # a step's cost from the choices: a skipped block costs only its shortcut GEMMs, FP32 (3 GEMMs at 1.0)
    q, f = np.zeros(2), 0.0
    for op in man["ops"]:
        if op["quantized"]:
            q[op["block"]] += op["macs"]
        else:
            f += op["macs"]
    down = sum(op["macs"] for op in man["ops"] if op["name"] in man["dfq"]["shortcut_ops"][1])
    checked = 0
    for r in _records(d / "r"):
        bits = np.array(r["bits"])
        seg = np.searchsorted(t.starts, r["step"] - 1, side="right") - 1
        act = t.active[seg]
        unit = (bits[:, 0] * bits[:, 1] + bits[:, 2] * bits[:, 1] + bits[:, 0] * bits[:, 2]) / 1024
        eff = sum(q[b] * unit[b] if act[b] else (3 * down if b == 1 else 0.0) for b in range(2)) + 3 * f
        assert r["cp"] == pytest.approx(100 * eff / (3 * (q.sum() + f)), rel=1e-6), r["step"]
        checked += int(not act.all())
        # the controlled cp counts a skip as 0 (the release's cost table), uniform over the blocks' MACs
        assert r["dfq_cp"] == pytest.approx(100 * (q * act) @ unit / (3 * q.sum()), rel=1e-5, abs=1e-6)
    assert checked > 0


def test_estimate_over_a_trace_with_skips(skip_run):
    """run_cost of a synthetic trace against a per-op composition: a skipped share of a block costs its shortcut GEMMs
    at FP32 and nothing else; the run's own trace goes through `estimate`."""
    from fracgraph.analysis.estimate import Estimator, from_artifacts, report
    from fracgraph.hwmodels import get_model

    d, _ = skip_run
    src = from_artifacts(d / "art", 64)
    est = Estimator(src.step, get_model("bitfusion"), shortcut_layers=src.shortcut_layers)
    bits = np.array([[4, 4, 8], [3, 4, 6]], np.float32)
    starts = np.array([0, 10, 25])
    active = np.array([[1, 1], [0, 1], [1, 0.25]], np.float64)
    run = est.run_cost(starts, np.stack([bits] * 3), 40, active)
    per_op = est.step_cost(bits).ops
    fp32 = {op.id: c for op, c in est.step_cost(np.zeros_like(bits)).ops}
    want = 0.0
    for n, a in zip((10, 15, 15), active):
        for op, c in per_op:
            if op.kind == "mem" or op.block is None or a[op.block] == 1:
                want += n * c.energy_total_pj
            else:
                skipped = fp32[op.id].energy_total_pj if op.layer in src.shortcut_layers else 0.0
                want += n * (a[op.block] * c.energy_total_pj + (1 - a[op.block]) * skipped)
    assert run["energy_total_pj"] == pytest.approx(want, rel=1e-9)
    full = est.run_cost(starts, np.stack([bits] * 3), 40)
    assert run["energy_total_pj"] < full["energy_total_pj"] and run["latency_s"] < full["latency_s"]
    assert src.shortcut_layers and all(g in {op.layer for op, _ in per_op} for g in src.shortcut_layers)
    rep = report(str(d / "art"), ["bitfusion", "eyeriss"], trace_dir=str(d / "r"), batch=64, overlap=True)
    assert rep["mode"] == "trace" and rep["steps"] == 150


def test_report_draws_skip(skip_run):
    from fracgraph.report import load_run
    from fracgraph.report.figures import choices, png, precision

    d, _ = skip_run
    r = load_run(d / "r")
    cc = r.choice_counts()
    assert any(k[0] < 0 for k in cc.counts)                       # a "skip" choice
    labels = [t.get_text() for t in precision(r).axes[-1].get_yticklabels()]
    assert "skip" in labels, labels                                 # the heatmap's colorbar names it
    assert png(choices(r))[:4] == b"\x89PNG"
