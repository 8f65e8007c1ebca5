"""Hardware-aware DFQ (`quantize --dfq --cost bitfusion|eyeriss|fpga`): the controller's cost table is the estimate
of each block's GEMMs under each option on that hardware, the graph's cp is in that unit, and the sign controller
tracks an energy target on digits."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from fracgraph.analysis.estimate import Estimator, block_option_costs, from_artifacts
from fracgraph.hwmodels import get_model
from fracgraph.passes.dfq_gate import DfqOptions, block_costs
from fracgraph.train.dfq import TargetClamp, gated_cost_table
from fracgraph.train.loop import TrainConfig, train

from conftest import MacsModel  # noqa: E402  (a stand-in model whose energy is the effective MACs)


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.policy import LayerPolicy
    from fracgraph.zoo import export

    d = tmp_path_factory.mktemp("dfqhw")
    model = export("digitnet", d / "dn.onnx")
    pol = LayerPolicy(first="fp32")
    build_artifacts(model, d / "bf", BuildOptions(dfq=DfqOptions(cost="bitfusion", cost_batch=64), policy=pol))
    build_artifacts(model, d / "fpga_lat", BuildOptions(dfq=DfqOptions(cost="fpga", cost_metric="latency",
                                                                       options=[[3, 6], [4, 8], [0, 0]]), policy=pol))
    return d


@pytest.mark.parametrize("name,hw,metric", [("bf", "bitfusion", "energy"), ("fpga_lat", "fpga", "latency")])
def test_table_is_the_estimate_of_each_option(arts, name, hw, metric):
    """T[l, k] x batch = the per-layer GEMM cost `estimate` reports for the layers of block l when every block runs
    option k (weights at --weight-bits), read back through the artifacts; FP32 the same with bits 0."""
    from fracgraph.manifest import Manifest

    m = Manifest.read(arts / name)
    d = m.dfq
    assert d["cost"] == hw and d["cost_metric"] == metric
    T, T32 = np.array(d["cost_table"]), np.array(d["cost_fp32"])
    batch = d["cost_batch"]
    src = from_artifacts(arts / name, batch)
    est = Estimator(src.step, get_model(hw))
    op_block = m.op_block()
    key = "energy_pj" if metric == "energy" else "latency_s"
    for k, (a, g) in enumerate(d["options"] + [[0, 0]]):
        rows = est.step_cost(np.tile([a, d["weight_bits"], g], (m.n_blocks, 1)) if a else np.zeros((m.n_blocks, 3)))
        per_block = np.zeros(m.n_blocks)
        for r in rows.layers():
            if r["kind"] == "gemm" and op_block.get(r["layer"]) is not None:
                per_block[op_block[r["layer"]]] += sum(r["phases"][p][key] for p in ("fw", "bw_data", "bw_weight")
                                                       if p in r["phases"])   # not the weight update
        want = T32 if k == len(d["options"]) else (np.zeros(m.n_blocks) if [a, g] == [0, 0] else T[:, k])
        if k < len(d["options"]) and [a, g] == [0, 0]:
            assert (T[:, k] == 0).all()             # skip counts 0, as the MAC table does
            continue
        np.testing.assert_allclose(per_block, want * batch, rtol=1e-9)
    # fewer bits never cost more on these models, and FP32 costs more than any option
    assert (T[:, [k for k, o in enumerate(d["options"]) if o != [0, 0]]] < T32[:, None]).all()



def test_mac_proportional_table_gives_the_release_cost_term(arts):
    from fracgraph.manifest import Manifest

    m = Manifest.read(arts / "bf")
    d = m.dfq
    src = from_artifacts(arts / "bf", 16)
    opts = [o for o in d["options"]]
    T, T32 = block_option_costs(src.step, MacsModel(), opts, d["weight_bits"])
    F = np.array(d["F"])
    w = d["weight_bits"]
    unit = np.array([(a * w + g * w + a * g) / 1024 for a, g in opts])
    np.testing.assert_allclose(T, F[:, None] * unit[None, :], rtol=1e-12)    # block MACs x release unit cost
    np.testing.assert_allclose(T32, 3 * F, rtol=1e-12)
    u_hw, r_hw = block_costs(unit, F, {"cost_table": T, "cost_fp32": T32})
    u_m, r_m = block_costs(unit, F, None)
    np.testing.assert_allclose(u_hw * r_hw[:, None], u_m * r_m[:, None], rtol=1e-12)
    # and the clamp's reachable range is the MAC one
    lo = 100 * F @ np.full(len(F), unit.min()) / (3 * F.sum())
    c = TargetClamp(replace(m, dfq={**d, "cost_table": T.tolist(), "cost_fp32": T32.tolist()}))
    assert c.floor == pytest.approx(lo, rel=1e-12)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_controller_tracks_an_energy_target(arts, tmp_path):
    """300 steps on digits with the Bit-Fusion energy table: the graph's cp is the chosen options' energy as % of
    the gated blocks' FP32 energy (checked per step from the bits used), and it settles at a target inside the
    reachable range: the mean over the last 150 steps is within 10% of the target's distance from the floor."""
    from fracgraph.manifest import Manifest

    d = Manifest.read(arts / "bf").dfq
    T, T32 = gated_cost_table(d)
    clamp = TargetClamp(Manifest.read(arts / "bf"))
    target = round(clamp.floor + 0.5 * (clamp.ceiling - clamp.floor), 2)
    s = train(TrainConfig(run_dir=str(tmp_path / "r"), artifacts=str(arts / "bf"), schedule="dfq", target_cp=target,
                          iters=300, epoch_iters=30, batch=64, lr=0.05))
    recs = _records(tmp_path / "r")
    opts = [tuple(o) for o in d["options"]]
    for r in recs[::25]:
        ks = [opts.index((int(b[0]), int(b[2]))) for b in r["bits"]]
        assert r["dfq_cp"] == pytest.approx(100 * sum(T[l, k] for l, k in enumerate(ks)) / T32.sum(), rel=1e-5)
    late = np.mean([r["dfq_cp"] for r in recs[150:]])
    assert abs(late - target) <= 0.1 * (target - clamp.floor), (late, target, clamp.floor)
    assert s["dfq"]["cp_unit"] == "bitfusion energy"
    assert s["dfq"]["reachable_cp"] == pytest.approx([clamp.floor, clamp.ceiling])


def test_bad_cost_options_are_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from fracgraph.cli import app
    from fracgraph.zoo import export

    model = export("digitnet", tmp_path / "dn.onnx")
    for extra, msg in ((["--cost", "tpu"], "--cost must be one of"), (["--cost", "fpga", "--cost-metric", "area"],
                       "--cost-metric must be one of"),
                       (["--cost", "eyeriss", "--cost-weighting", "uniform"], "use one of them"),
                       (["--cost", "bitfusion", "--cost-batch", "0"], "--cost-batch must be positive")):
        r = CliRunner().invoke(app, ["quantize", str(model), "-o", str(tmp_path / "a"), "--dfq", *extra])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "a").exists()


def test_corrupt_cost_table_is_one_line(arts):
    from fracgraph.errors import FracgraphError
    from fracgraph.manifest import Manifest

    d = Manifest.read(arts / "bf").dfq
    for bad in ({"cost_table": d["cost_table"][:1]}, {"cost_fp32": [0.0] * len(d["F"])}, {"cost_fp32": "x"}):
        with pytest.raises(FracgraphError, match="rebuild the artifacts"):
            gated_cost_table({**d, **bad})
