"""The training-step analyzer and estimator: GEMM lowering, DAG, bits, trace integration, CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fracgraph.analysis.estimate import Estimator, from_onnx, report
from fracgraph.analysis.optable import gemm_table
from fracgraph.analysis.training import lower_gemm, training_step
from fracgraph.hwmodels import get_model

B = 16


def third_party_mlp(path):
    """An old-opset (11) MatMul MLP whose weights are Constant nodes and that has no BN, as other exporters write."""
    rng = np.random.default_rng(0)
    nodes, prev = [], "x"
    dims = [64, 128, 96, 10]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        w = numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32), f"w{i}")
        nodes.append(helper.make_node("Constant", [], [f"W{i}"], value=w))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
            prev = f"r{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info(f"h{len(dims) - 2}", TensorProto.FLOAT, ["N", 10])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 6
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def small(small_model):
    return small_model[1]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return third_party_mlp(tmp_path_factory.mktemp("mlp") / "mlp.onnx")


def test_three_gemms_sum_to_step_macs(small):
    src = from_onnx(small, B)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(small)))
    by_layer = {g.name: g for g in gemm_table(model)}
    first = next(iter(by_layer))
    gemm_macs = 0
    for name, g in by_layer.items():
        ops = {o.phase: o for o in src.step.ops if o.layer == name and o.kind == "gemm"}
        assert ops["fw"].macs == g.macs * B
        assert ops["bw_weight"].macs == g.macs * B
        if name == first:
            assert "bw_data" not in ops          # the data input needs no error
        else:
            assert ops["bw_data"].macs == g.macs * B   # 'ideal' strided split keeps the MACs
        gemm_macs += sum(o.macs for o in ops.values())
    est = Estimator(src.step, get_model("fpga"))
    step = est.step_cost(src.uniform_bits(8, 8))
    assert step.total.macs == gemm_macs == 3 * B * sum(g.macs for g in by_layer.values()) - B * by_layer[first].macs


def test_strided_error_lowering():
    from fracgraph.analysis.optable import GemmOp
    g = GemmOp("c", "Conv", "x", "w", "y", True, 16, 32, kernel=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1),
               in_hw=(16, 16), out_hw=(8, 8))
    _, ideal, _ = lower_gemm(g, 4, "ideal")
    _, naive, _ = lower_gemm(g, 4, "naive")
    assert sorted((c.kh, c.kw, c.repeat) for c in ideal) == [(1, 1, 1), (1, 2, 1), (2, 1, 1), (2, 2, 1)]
    assert sum(c.macs for c in ideal) == g.macs * 4
    assert sum(c.macs for c in naive) == g.macs * 4 * 4       # zero insertion: stride^2 x


def test_dag_and_schedules(small):
    src = from_onnx(small, B)
    import networkx as nx
    dag = src.step.graph
    assert nx.is_directed_acyclic_graph(dag)
    ops = src.step.ops
    loss = next(o.id for o in ops if o.phase == "loss")
    for o in ops:
        if o.phase == "fw":
            assert nx.has_path(dag, o.id, loss)
        if o.phase in ("bw_data", "bw_weight", "bw"):
            assert nx.has_path(dag, loss, o.id)
        if o.phase == "update":
            (p,) = list(dag.predecessors(o.id))
            assert ops[p].phase == "bw_weight" and ops[p].layer == o.layer
    hw = get_model("bitfusion")
    seq = Estimator(src.step, hw).step_cost(src.uniform_bits(8, 8))
    ovl = Estimator(src.step, hw, overlap=True).step_cost(src.uniform_bits(8, 8))
    assert seq.latency_s == pytest.approx(seq.total.latency_s)
    assert ovl.latency_s < seq.latency_s
    assert ovl.total.energy_total_pj == pytest.approx(seq.total.energy_total_pj)


def test_direction_bitfusion_cheaper_eyeriss_equal(mlp):
    src = from_onnx(mlp, 128)
    for name, cheaper in (("bitfusion", True), ("eyeriss", False), ("fpga", True)):
        est = Estimator(src.step, get_model(name))
        s8, s4 = est.step_cost(src.uniform_bits(8, 8)), est.step_cost(src.uniform_bits(4, 4))
        g8 = sum(c.latency_s for o, c in s8.ops if o.kind == "gemm")
        g4 = sum(c.latency_s for o, c in s4.ops if o.kind == "gemm")
        if cheaper:
            assert g4 < g8 and s4.total.energy_total_pj < s8.total.energy_total_pj, name
        else:
            assert g4 == pytest.approx(g8) and s4.total.energy_total_pj == pytest.approx(s8.total.energy_total_pj)


def test_third_party_mlp_is_analyzed(mlp):
    src = from_onnx(mlp, 8)
    gemm = [o for o in src.step.ops if o.kind == "gemm"]
    assert [o.phase for o in gemm if o.layer == gemm[0].layer] == ["fw", "bw_weight"]     # first: no error GEMM
    assert len(gemm) == 3 + 2 + 3
    assert sum(o.block is None for o in gemm) == 3      # the classifier stays FP32 (layer policy)
    assert sum(o.macs for o in gemm) == 8 * (3 * (64 * 128 + 128 * 96 + 96 * 10) - 64 * 128)
    assert any(o.kind == "mem" and o.phase == "update" for o in src.step.ops)


def test_trace_integration_matches_step_sum(small):
    src = from_onnx(small, B)
    est = Estimator(src.step, get_model("bitfusion"))
    rng = np.random.default_rng(1)
    S = 50
    opts = np.array([[4, 4, 8], [6, 6, 8], [8, 8, 8], [3, 3, 6], [0, 0, 0]], dtype=np.float32)
    bits = opts[rng.integers(0, len(opts), S)][:, None, :]
    starts = np.sort(rng.choice(np.arange(1, 1000), S - 1, replace=False))
    starts = np.concatenate([[0], starts])
    total = 1200
    run = est.run_cost(starts, bits, total)
    n = np.diff(np.append(starts, total))
    want_lat = sum(k * est.step_cost(b).total.latency_s for k, b in zip(n, bits))
    want_en = sum(k * est.step_cost(b).total.energy_total_pj for k, b in zip(n, bits))
    assert run["steps"] == total
    assert run["latency_s"] == pytest.approx(want_lat, rel=1e-9)
    assert run["energy_total_pj"] == pytest.approx(want_en, rel=1e-9)
    ovl = Estimator(src.step, get_model("bitfusion"), overlap=True)
    r2 = ovl.run_cost(starts[:5], bits[:5], 100)
    n2 = np.diff(np.append(starts[:5], 100))
    assert r2["latency_s"] == pytest.approx(sum(k * ovl.step_cost(b).latency_s for k, b in zip(n2, bits[:5])))


def test_report_savings_and_cross(small, tmp_path):
    from fracgraph.trace import Trace
    rep = report(small, ["bitfusion", "eyeriss"], fw=4, bw=8, batch=B, steps=10)
    assert rep["hw"]["eyeriss"]["savings"]["energy"] == pytest.approx(0.0, abs=1e-12)
    assert rep["hw"]["bitfusion"]["savings"]["gemm_latency"] > 0
    assert rep["cross"]["latency"] > 0
    assert rep["hw"]["bitfusion"]["run"]["steps"] == 10
    Trace(np.array([0, 4]), np.array([[[4, 4, 8]], [[8, 8, 8]]], np.float32), 10).write(tmp_path)
    rt = report(small, ["bitfusion"], trace_dir=tmp_path, batch=B)
    r_lo = report(small, ["bitfusion"], fw=4, bw=8, batch=B, steps=4)["hw"]["bitfusion"]["run"]
    r_hi = report(small, ["bitfusion"], fw=8, bw=8, batch=B, steps=6)["hw"]["bitfusion"]["run"]
    assert rt["hw"]["bitfusion"]["run"]["latency_s"] == pytest.approx(r_lo["latency_s"] + r_hi["latency_s"])


def test_cli_estimate(small, tmp_path):
    from typer.testing import CliRunner

    from fracgraph.cli import app
    r = CliRunner().invoke(app, ["estimate", str(small), "--hw", "bitfusion", "--fw", "4", "--bw", "8",
                                 "--batch", "16", "--format", "json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["hw"]["bitfusion"]["step"]["macs"] > 0
    r = CliRunner().invoke(app, ["estimate", str(small), "--hw", "all", "--steps", "5", "--format", "csv"])
    assert r.exit_code == 0 and r.output.startswith("hw,layer")
    assert {"bitfusion", "eyeriss", "fpga"} <= {line.split(",")[0] for line in r.output.splitlines()[1:]}
    for args in (["--hw", "tpu"], ["--fw", "4"], ["--baseline", "int8"], ["--batch", "0"],
                 ["--trace", str(tmp_path)]):
        r = CliRunner().invoke(app, ["estimate", str(small), *args])
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output
    r = CliRunner().invoke(app, ["estimate", str(tmp_path / "nope.onnx")])
    assert r.exit_code == 2


def test_artifacts_match_plain_model_and_eval_fallback(small, tmp_path):
    """`estimate ART/` (manifest blocks) costs what the plain model costs at the same bits, also when the
    source model is gone and the eval graph (with the passes' '::' nodes) is analyzed instead."""
    import shutil

    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.manifest import Manifest
    src_copy = tmp_path / "m.onnx"
    shutil.copy(small, src_copy)
    art = tmp_path / "art"
    m = build_artifacts(src_copy, art, BuildOptions(fw=4, bw=8))
    plain = report(small, ["bitfusion"], fw=4, bw=8, batch=B, steps=3)["hw"]["bitfusion"]
    a = report(art, ["bitfusion"], batch=B, steps=3)["hw"]["bitfusion"]
    assert a["step"]["macs"] == plain["step"]["macs"]
    assert a["step"]["latency_s"] == pytest.approx(plain["step"]["latency_s"])
    assert a["memory_ops"] == pytest.approx(plain["memory_ops"])
    src_copy.unlink()
    b = report(art, ["bitfusion"], batch=B, steps=3)["hw"]["bitfusion"]
    assert b["step"]["macs"] == plain["step"]["macs"]
    assert b["memory_ops"]["energy_pj"] == pytest.approx(plain["memory_ops"]["energy_pj"])
    # per-block bits: block 1 at 8/8/8 costs more than all blocks at 4/4/8
    bits = np.array([[4, 4, 8]] * Manifest.read(art).n_blocks, dtype=np.float64)
    from fracgraph.analysis.estimate import from_artifacts
    s = from_artifacts(art, B)
    e = Estimator(s.step, get_model("bitfusion"))
    hi = bits.copy()
    hi[1] = [8, 8, 8]
    assert e.step_cost(hi).total.latency_s > e.step_cost(bits).total.latency_s
    assert m.n_blocks == s.step.n_blocks
