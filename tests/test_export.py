"""Deployable export (fracgraph/export.py): digits runs (static, PFQ, DFQ) exported as QDQ and float models.

The reference for the accuracy is the run's own final evaluation (the training session's eval graph fed the
precision input); the reference for the quantized weights is a numpy implementation of the quantizer
(spec fractrain.md §1.1) on the run's trained float weights; the reference for a baked DFQ model is the run's
gated model on the test batches where its gates chose the baked options.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from fracgraph.cli import app
from fracgraph.errors import FracgraphError
from fracgraph.export import ExportOptions, evaluate_export, export_run
from fracgraph.manifest import Manifest
from fracgraph.train.data import eval_batches, load_dataset
from fracgraph.train.dfq import bits_input
from fracgraph.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fracgraph.zoo import export

    d = tmp_path_factory.mktemp("exp")
    model = export("digitnet", d / "dn.onnx")
    base = dict(iters=24, epoch_iters=6, batch=32, lr=0.05)
    out = {}
    out["static"] = train(TrainConfig(run_dir=str(d / "static"), model=str(model), schedule="static", fw=4, bw=8, **base))
    out["pfq"] = train(TrainConfig(run_dir=str(d / "pfq"), model=str(model), schedule="pfq", fw_schedule=[3, 4, 6, 8],
                                   bw_schedule=[6, 6, 8, 8], eps=0.5, alpha=0.5, **{**base, "iters": 32, "epoch_iters": 4}))
    out["dfq"] = train(TrainConfig(run_dir=str(d / "dfq"), model=str(model), schedule="dfq", **base))
    return d, out


def _session(path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])


def _inits(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _check_deployable(path, manifest_input="input"):
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == [manifest_input]
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    assert [o.domain for o in m.opset_import] == [""] and m.opset_import[0].version <= 21 and m.ir_version <= 10
    return m


@pytest.mark.parametrize("kind", ["static", "pfq", "dfq"])
def test_exported_accuracy_equals_the_runs_final_evaluation(runs, tmp_path, kind):
    d, summaries = runs
    final = summaries[kind]["final_test_acc"]
    f = export_run(str(d / kind), str(tmp_path / "f.onnx"), ExportOptions(format="float"))
    q = export_run(str(d / kind), str(tmp_path / "q.onnx"), ExportOptions(format="qdq"))
    mf, mq = _check_deployable(f.path), _check_deployable(q.path)
    # both exactly: the exported graphs compute the eval graph's numbers bit for bit (compared unoptimized, as
    # onnxruntime's optimizer folds Conv+BatchNorm only where the weights became constants)
    assert evaluate_export(f.path, str(d / kind), optimize=False)["test_acc"] == final
    assert evaluate_export(q.path, str(d / kind), optimize=False)["test_acc"] == final
    if kind != "dfq":
        bits = f.bits.astype(np.float32)
        x = np.concatenate([x for x, _ in eval_batches(load_dataset(None), 512)])
        ref = _session(d / kind / "last.onnx").run(None, {"input": x, "fracgraph_bits": bits})[0]
        for path in (f.path, q.path):
            assert np.array_equal(_session(path).run(None, {"input": x})[0], ref)
    ops_q = [n.op_type for n in mq.graph.node]
    acts = [p for p in q.points if p.kind == "act" and p.bits > 0]
    assert ops_q.count("QuantizeLinear") == len(acts) and "Round" not in ops_q
    assert ops_q.count("DequantizeLinear") == len(q.points) - sum(p.bits == 0 for p in q.points)
    assert "Round" in [n.op_type for n in mf.graph.node] and "QuantizeLinear" not in [n.op_type for n in mf.graph.node]
    if kind == "pfq":   # the precision the run ended at: the last record's bits
        last = json.loads((d / kind / "metrics.jsonl").read_text().splitlines()[-1])
        assert summaries[kind]["transitions"] and f.bits.tolist() == last["bits"]


def _fq_reference(w: np.ndarray, bits: int, axis: int):
    """numpy FQ_b per output channel (float64 index, so a tie is visible as |u - (n + .5)| small)."""
    red = tuple(a for a in range(w.ndim) if a != axis)
    mn = w.min(axis=red, keepdims=True).astype(np.float64)
    mx = w.max(axis=red, keepdims=True).astype(np.float64)
    L = 2 ** bits - 1
    s = np.maximum((mx - mn) / L, 1e-8)
    u = (w - mn) / s
    return np.round(np.clip(u, 0, L)), u, s, mn


def test_qdq_weights_are_the_quantizer_grid_of_the_trained_weights(runs, tmp_path):
    d, _ = runs
    q = export_run(str(d / "static"), str(tmp_path / "q.onnx"))
    trained, exported = _inits(d / "static" / "last.onnx"), _inits(q.path)
    m = onnx.load(str(q.path))
    dq = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    points = [p for p in q.points if p.kind == "weight"]
    assert points and all(p.bits == 4 for p in points)
    for p in points:
        pre = f"{p.name}::export"
        k, s, zp = exported[f"{pre}/q"], exported[f"{pre}/scale"], exported[f"{pre}/zero_point"]
        assert k.dtype == np.uint8 and k.max() <= 15                            # 4 bits: indices 0..15 in uint8
        node = dq.get(f"{pre}/k_s") or dq[f"{p.name}/out"]
        axis = next(a.i for a in node.attribute if a.name == "axis")
        # the trained weight is the tensor the quantizer read in the run's model
        src = next(n for n in onnx.load(str(d / "static" / "last.onnx")).graph.node
                   if n.output[0] == f"{p.name}/centered").input[0]
        w = trained[src]
        ref_k, u, ref_s, ref_mn = _fq_reference(w, 4, axis)
        tie = np.abs(u - np.floor(u) - 0.5) < 1e-3
        assert np.array_equal(k[~tie], ref_k[~tie]) and np.abs(k.astype(int) - ref_k)[tie].max(initial=0) <= 1
        assert np.allclose(s, ref_s.reshape(-1), rtol=1e-6)
        # dequantized: DQ(k) + min (the exact form) reproduces k * s + min
        deq = (k.astype(np.float64) - zp.reshape(ref_s.shape)) * s.reshape(ref_s.shape)
        if f"{pre}/min" in exported:
            deq = deq + exported[f"{pre}/min"]
        assert np.allclose(deq, k * ref_s + ref_mn, atol=1e-6)


def test_activation_qdq_uses_the_ema_range(runs, tmp_path):
    d, _ = runs
    q = export_run(str(d / "pfq"), str(tmp_path / "q.onnx"))
    trained, exported = _inits(d / "pfq" / "last.onnx"), _inits(q.path)
    acts = [p for p in q.points if p.kind == "act"]
    assert any(p.form == "qdq" for p in acts)
    for p in acts:
        L = 2 ** p.bits - 1
        pre = f"{p.name}::export"
        rmin, rrange = trained[f"{p.name}.run_min"], trained[f"{p.name}.run_range"]
        assert exported[f"{pre}/scale"] == np.float32(max(np.float32(rrange) / np.float32(L), np.float32(1e-8)))
        assert exported[f"{pre}/zero_point"] == 0 and exported[f"{pre}/zero_point"].dtype == np.uint8
        assert (p.form == "qdq") == (rmin == 0)              # post-ReLU: the EMA min is exactly 0, canonical Q/DQ
        if p.form == "qdq+min":
            assert exported[f"{pre}/min"] == rmin
        if L < 255:
            assert exported[f"{pre}/hi"] == np.float32(L) * exported[f"{pre}/scale"]


def test_dfq_baked_model_equals_the_gated_model_where_the_gates_chose_that(runs, tmp_path):
    d, summaries = runs
    run = d / "dfq"
    f = export_run(str(run), str(tmp_path / "f.onnx"), ExportOptions(format="float"))
    hist = summaries["dfq"]["dfq"]["choice_histogram"]
    labels = [f"{a}/{g}" for a, g in summaries["dfq"]["dfq"]["options"]]
    chosen = [int(np.argmax([h["counts"][lbl] for lbl in labels])) for h in hist]
    man = Manifest.read(run / "artifacts")
    gated_ids = man.dfq["gated"]                               # the first conv is a static block (--first static)
    assert gated_ids == [1, 2] and f.bits[0].tolist() == [8, 8, 8]     # ... at the run's FW8/BW8
    assert f.bits[gated_ids, 0].tolist() == [summaries["dfq"]["dfq"]["options"][k][0] for k in chosen]
    gated = onnx.load(str(run / "last.onnx"))
    outs = [f"dfq::b{l}/choice" for l in gated_ids]
    gated.graph.output.extend([onnx.ValueInfoProto(name=o) for o in outs])
    sg, se = _session(gated.SerializeToString()), _session(f.path)
    bits = bits_input(Manifest.read(run / "artifacts"))       # what the loop feeds a DFQ graph: the weight bits
    compared = 0
    for x, y in eval_batches(load_dataset(None), 32):
        got = sg.run(None, {"input": x, "fracgraph_bits": bits})
        if [int(np.ravel(c)[0]) for c in got[1:]] == chosen:
            assert np.array_equal(se.run(None, {"input": x})[0], got[0])
            compared += 1
    assert compared > 0
    # the gates kept (float only): the run's own evaluation, at its batch size
    k = export_run(str(run), str(tmp_path / "k.onnx"), ExportOptions(format="float", dfq_gates="keep"))
    _check_deployable(k.path)
    assert evaluate_export(k.path, str(run), optimize=False)["test_acc"] == summaries["dfq"]["final_test_acc"]


def test_bits_choice_and_untrained_precision(runs, tmp_path):
    d, summaries = runs
    run = str(d / "static")
    with pytest.raises(FracgraphError, match="never trained at FW 8/W 8.*--force"):
        export_run(run, str(tmp_path / "x.onnx"), ExportOptions(bits="8"))
    assert not (tmp_path / "x.onnx").exists()
    r = export_run(run, str(tmp_path / "x.onnx"), ExportOptions(bits="8", force=True))
    assert all(p.bits == 8 for p in r.points)
    wide = export_run(run, str(tmp_path / "w.onnx"), ExportOptions(bits="12", force=True))
    assert {(p.form, p.bits) for p in wide.points} == {("float", 12)} and all("8 bits" in p.note for p in wide.points)
    fp = export_run(run, str(tmp_path / "fp.onnx"), ExportOptions(bits="0", force=True))
    ops = {n.op_type for n in onnx.load(str(fp.path)).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "Round"}          # 0 bits: the FP32 network
    b = export_run(run, str(tmp_path / "b.onnx"), ExportOptions(bits="best"))
    assert b.model_file == "best.onnx" and (b.bits[:, :2] == 4).all()
    with pytest.raises(FracgraphError, match="--bits"):
        export_run(run, str(tmp_path / "y.onnx"), ExportOptions(bits="4/x"))
    dfq = str(d / "dfq")   # DFQ: FW must be one of the options' act bits (3, 4, 6 here), weights at --weight-bits
    with pytest.raises(FracgraphError, match="act bits"):
        export_run(dfq, str(tmp_path / "z.onnx"), ExportOptions(bits="5/4"))
    forced = export_run(dfq, str(tmp_path / "z.onnx"), ExportOptions(bits="5/4", force=True, format="float"))
    assert forced.bits[:, :2].tolist() == [[5, 4]] * len(forced.bits)
    assert {p.bits for p in forced.points if p.kind == "act"} == {5}
    rounded = export_run(run, str(tmp_path / "r.onnx"), ExportOptions(zero_point="round"))
    assert "Add" not in {n.op_type for n in onnx.load(str(rounded.path)).graph.node if "::export" in n.name}
    assert max(p.zero_point_shift for p in rounded.points) > 0


def test_bad_input_is_one_line_exit_2_and_nothing_written(runs, tmp_path):
    d, _ = runs
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "checkpoints").mkdir()
    cases = [
        [str(empty), "-o", str(tmp_path / "a.onnx")],                                     # no finished run
        [str(d / "static"), "-o", str(tmp_path / "b.onnx"), "--bits", "6"],               # never trained at
        [str(d / "dfq"), "-o", str(tmp_path / "c.onnx"), "--dfq-gates", "keep"],          # qdq cannot take gates
        [str(d / "static"), "-o", str(tmp_path / "d.onnx"), "--format", "int4"],
        [str(d / "static"), "-o", str(d / "static" / "last.onnx")],                        # the run's own model
    ]
    for args in cases:
        r = runner.invoke(app, ["export", *args])
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert len(list(tmp_path.glob("*.onnx"))) == 0
    assert onnx.load(str(d / "static" / "last.onnx")).graph.input[1].name == "fracgraph_bits"   # left as it was
    r = runner.invoke(app, ["export", str(d / "static"), "-o", str(tmp_path / "ok.onnx"), "--evaluate", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert abs(out["evaluation"]["test_acc"] - out["evaluation"]["run_final_test_acc"]) < 0.02
