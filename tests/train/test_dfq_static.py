"""DFQ artifacts with a static (ungated) first block, the `--dfq` default: a short digits run feeds the static block
the run's --fw/--bw, and the whole-network cost (cp, cum_gmacs, trace, estimate) counts it at those bits while the
controller's cp covers the gated blocks only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fracgraph.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def static_run(tmp_path_factory):
    """digitnet DFQ artifacts at the library default (first conv static) and a 40-step run at FW6/BW8."""
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.passes.dfq_gate import DfqOptions
    from fracgraph.zoo import export

    d = tmp_path_factory.mktemp("dfqstatic")
    build_artifacts(export("digitnet", d / "dn.onnx"), d / "art", BuildOptions(dfq=DfqOptions()))
    s = train(TrainConfig(run_dir=str(d / "run"), artifacts=str(d / "art"), schedule="dfq", target_cp=3.0, fw=6,
                          bw=8, iters=40, epoch_iters=20, batch=32, lr=0.05))
    return d, s


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_static_block_is_counted_at_its_bits(static_run):
    """Each step's whole-network cp, and the run's cumulative effective MACs, equal a hand computation from the op
    table: the static first conv at FW6/BW8 (a w + g w + a g = 36 + 48 + 48 per 1024), each gated block at the bits
    its gate chose (weights 4), the classifier FP32; the graph's cp covers the gated blocks only."""
    d, s = static_run
    man = json.loads((d / "art" / "manifest.json").read_text())
    assert man["dfq"]["gated"] == [1, 2] and man["dfq"]["static_blocks"] == [0]
    assert [o["block"] for o in man["ops"] if o["name"] == "/conv1/Conv"] == [0]
    q, fp32 = np.zeros(3), 0.0
    for o in man["ops"]:
        if o["quantized"]:
            q[o["block"]] += o["macs"]
        else:
            fp32 += o["macs"]
    recs = _records(d / "run")
    cum = 0.0
    for r in recs:
        bits = np.array(r["bits"], np.float64)
        assert bits[0].tolist() == [6, 6, 8]                                     # the static block's fed bits
        assert all((int(b[0]), int(b[2])) in {tuple(o) for o in man["dfq"]["options"]} and b[1] == 4 for b in bits[1:])
        unit = (bits[:, 0] * bits[:, 1] + bits[:, 2] * bits[:, 1] + bits[:, 0] * bits[:, 2]) / 1024
        assert r["cp"] == pytest.approx(100 * (q @ unit + 3 * fp32) / (3 * (q.sum() + fp32)), rel=1e-9)
        assert r["dfq_cp"] == pytest.approx(100 * (q[1:] @ unit[1:]) / (3 * q[1:].sum()), rel=1e-5)
        n = r["eff_gmacs"] * 1e9 / (r["cp"] / 100 * 3 * (q.sum() + fp32))   # the step's batch size
        assert n == pytest.approx(round(n), abs=1e-6) and 1 <= round(n) <= 32
        cum += r["eff_gmacs"]
    assert recs[-1]["cum_gmacs"] == pytest.approx(cum, rel=1e-9) and s["cum_eff_gmacs"] == pytest.approx(cum, rel=1e-9)
    # the summary names the static block; the choice histogram covers the gated blocks only
    assert s["dfq"]["static_blocks"] == [{"block": man["blocks"][0]["name"], "fw": 6, "bw": 8}]
    assert [h["block"] for h in s["dfq"]["choice_histogram"]] == [b["name"] for b in man["blocks"][1:]]
    # the trace holds the static row, so `estimate` of the run integrates the static block at its bits
    from fracgraph.trace import Trace

    t = Trace.read(d / "run")
    assert t.total_steps == 40 and all(seg[0].tolist() == [6, 6, 8] for seg in t.bits)


def test_estimate_of_the_trace_counts_the_static_block(static_run, tmp_path):
    """`estimate` over the run's trace reads the static block's row: the same trace with that row at FP32 costs
    more GEMM energy and latency on Bit-Fusion."""
    from fracgraph.analysis.estimate import report
    from fracgraph.trace import Trace

    d, _ = static_run
    t = Trace.read(d / "run")
    t.bits[:, 0, :] = 0                                   # 0 bits = FP32
    t.write(tmp_path)
    got = report(str(d / "art"), ["bitfusion"], trace_dir=str(d / "run"), batch=32)["hw"]["bitfusion"]["run"]
    fp = report(str(d / "art"), ["bitfusion"], trace_dir=str(tmp_path), batch=32)["hw"]["bitfusion"]["run"]
    assert got["steps"] == fp["steps"] == 40
    assert fp["gemm_energy_pj"] > got["gemm_energy_pj"] and fp["gemm_latency_s"] > got["gemm_latency_s"]


def test_beta_schedule_lr_keeps_the_gates_speed(static_run, tmp_path):
    """--beta-schedule lr feeds beta x lr0/lr (capped at 100): x1, x10, x100 over the step schedule's LR stages;
    constant (the default, the authors') feeds beta every step; an unknown schedule is one clear error."""
    from fracgraph.errors import FracgraphError

    d, _ = static_run
    base = dict(artifacts=str(d / "art"), schedule="dfq", iters=8, epoch_iters=4, batch=16, lr=0.05, beta=0.002)
    train(TrainConfig(run_dir=str(tmp_path / "lr"), beta_schedule="lr", **base))
    recs = _records(tmp_path / "lr")
    assert [r["lr"] for r in recs] == pytest.approx([0.05] * 4 + [0.005] * 2 + [0.0005] * 2)
    assert [r["beta"] for r in recs] == pytest.approx([0.002] * 4 + [0.02] * 2 + [0.2] * 2)
    train(TrainConfig(run_dir=str(tmp_path / "c"), **base))
    assert [r["beta"] for r in _records(tmp_path / "c")] == [0.002] * 8
    with pytest.raises(FracgraphError, match="--beta-schedule"):
        train(TrainConfig(run_dir=str(tmp_path / "x"), beta_schedule="cosine", **base))


def test_hardware_cost_table_covers_the_gated_blocks(tmp_path):
    """quantize --dfq --cost bitfusion with a static first block: the controller's table holds the gated blocks'
    rows only, the very rows of the same model's table with every block gated (--first quantize)."""
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.manifest import Manifest
    from fracgraph.passes.dfq_gate import DfqOptions
    from fracgraph.train.dfq import TargetClamp
    from fracgraph.zoo import export

    model = export("digitnet", tmp_path / "dn.onnx")
    build_artifacts(model, tmp_path / "s", BuildOptions(dfq=DfqOptions(cost="bitfusion", cost_batch=32)))
    build_artifacts(model, tmp_path / "g", BuildOptions(dfq=DfqOptions(cost="bitfusion", cost_batch=32,
                                                                       static_first=False)))
    s, g = Manifest.read(tmp_path / "s").dfq, Manifest.read(tmp_path / "g").dfq
    assert s["gated"] == [1, 2] and g["gated"] == [0, 1, 2]
    assert np.array_equal(s["cost_table"], np.array(g["cost_table"])[1:])
    assert np.array_equal(s["cost_fp32"], np.array(g["cost_fp32"])[1:])
    TargetClamp(Manifest.read(tmp_path / "s"))          # the table fits the gated blocks (no shape error)
