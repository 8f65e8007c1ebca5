"""Embedding quantization policy (issue 16): policy "embeddings": "quantize" fake-quantizes an embedding table per row
at the weight bits of the block that first reads the lookup; the default keeps it FP32 and `inspect` says why. The
step with a quantized table against PyTorch (values and the straight-through gradient to the table) is
tests/test_gpt_step_reference.py's "quantize" case."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.errors import FracgraphError  # noqa: E402
from fracgraph.policy import LayerPolicy  # noqa: E402
from fracgraph.zoo import export_gpt  # noqa: E402

SIZES = dict(layers=1, heads=2, width=16, context=8, vocab=11)
TABLE = "/tok/Gather::fq_w0"


def fq_rows(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row min/max fake quantization in float64 (numpy), and each row's step."""
    x = x.astype(np.float64)
    mn, mx = x.min(1, keepdims=True), x.max(1, keepdims=True)
    L = 2.0 ** bits - 1
    s = np.maximum((mx - mn) / L, 1e-8)
    return np.round(np.clip((x - mn) / s, 0, L)) * s + mn, s


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("emb")
    export_gpt(d / "gpt.onnx", seed=0, **SIZES)
    q = build_artifacts(d / "gpt.onnx", d / "q", BuildOptions(policy=LayerPolicy(embeddings="quantize"),
                                                             fused_kernels=False))
    return d, q


def test_default_keeps_the_table_fp32_and_says_why(arts):
    from fracgraph.inspect import summarize

    d, _ = arts
    s = summarize(str(d / "gpt.onnx"))
    (t,) = s["embedding_tables"]
    assert t["node"] == "/tok/Gather" and not t["quantized"] and "kept FP32: embedding table" in t["reason"]
    assert s["fp32_tables"] == [t]
    s = summarize(str(d / "q"))
    (t,) = s["embedding_tables"]
    assert t["quantized"] and t["block"] == 0 and "per row" in t["reason"] and s["fp32_tables"] == []


@pytest.mark.parametrize("bits", [3, 6])
def test_quantized_table_values_against_numpy(arts, bits):
    """The eval graph's quantized table at weight bits `bits` of block 0 is numpy's per-row quantization: equal
    within float32 rounding of one step, except an element exactly at a rounding boundary (one step apart)."""
    import onnxruntime as ort

    from fracgraph.runtime import TrainSession

    d, m = arts
    p = next(p for p in m.quant_points if p.name == TABLE)
    assert (p.kind, p.tensor, p.op, p.block, p.granularity) == ("weight", "tok.weight", "/tok/Gather", 0, "per_row")
    ev = onnx.load(str(d / "q" / m.files["eval"]))
    ev.graph.output.append(onnx.helper.make_tensor_value_info(f"{TABLE}/out", onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    inf = ort.InferenceSession(ev.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess = TrainSession(d / "q", seed=0)
    bits_in = np.tile(np.array([8, 8, 8], np.float32), (m.n_blocks, 1))
    bits_in[0, 1] = bits
    bits_in[1:, 1] = 2                      # other blocks' weight bits do not reach the table
    ids = np.zeros((2, SIZES["context"]), np.int64)
    feeds = {"ids": ids, "fracgraph_bits": bits_in, "labels": ids}
    names = {i.name for i in inf.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    feeds.update({n: sess.parameter(n) for n in names - set(feeds)})
    got = inf.run([f"{TABLE}/out"], feeds)[0]
    table = sess.parameter("tok.weight")
    want, step = fq_rows(table, bits)
    diff = np.abs(got - want) / step
    assert (diff <= 1e-3).mean() >= 0.999 and (np.abs(diff - 1) <= 1e-3)[diff > 1e-3].all()
    assert all(len(np.unique(np.round((got[r] - got[r].min()) / step[r]))) <= 2 ** bits for r in range(len(got)))
    assert np.abs(got - table).max() > 0                            # it did quantize
    bits_in[0, 1] = 0                                                # 0 bits: FP32 passthrough
    np.testing.assert_array_equal(inf.run([f"{TABLE}/out"], {**feeds, "fracgraph_bits": bits_in})[0], table)


def test_gradient_reaches_the_table(arts):
    """One training step moves the quantized table (straight-through), only in the rows of the tokens read."""
    from fracgraph.runtime import TrainSession

    d, m = arts
    sess = TrainSession(d / "q", seed=0)
    ids = np.tile(np.array([1, 2, 3, 4, 1, 2, 3, 4], np.int64), (2, 1))
    sess.forward_backward(ids, np.roll(ids, -1, 1), np.tile(np.array([8, 4, 8], np.float32), (m.n_blocks, 1)))
    g = sess.gradient("tok.weight")
    assert (np.abs(g[[1, 2, 3, 4]]).sum(1) > 0).all() and (g[[0, 5, 6, 7, 8, 9, 10]] == 0).all()


@pytest.mark.parametrize("fmt", ["qdq", "float"])
def test_export_of_a_quantized_table(arts, tmp_path, fmt):
    """`export` writes the table as per-row QuantizeLinear/DequantizeLinear (axis 0) or its float grid, and the
    exported model reproduces the run's validation loss."""
    from fracgraph.export import ExportOptions, evaluate_export, export_run
    from fracgraph.train.loop import TrainConfig, train

    d, _ = arts
    (tmp_path / "t.txt").write_text("the cat sat on a mat. " * 40, encoding="utf-8")
    s = train(TrainConfig(run_dir=str(tmp_path / "run"), artifacts=str(d / "q"), data=f"text:{tmp_path / 't.txt'}",
                          schedule="static", fw=4, bw=8, iters=10, epoch_iters=10, batch=4, lr=1e-2))
    res = export_run(str(tmp_path / "run"), str(tmp_path / "m.onnx"), ExportOptions(format=fmt))
    pt = next(p for p in res.points if p.name == TABLE)
    assert pt.bits == 4 and pt.form.startswith(fmt)
    model = onnx.load(str(res.path))
    if fmt == "qdq":
        dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.startswith(TABLE))
        assert next(a.i for a in dq.attribute if a.name == "axis") == 0
    assert evaluate_export(res.path, str(tmp_path / "run"))["val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-4)


def test_policy_value_is_checked(tmp_path):
    with pytest.raises(FracgraphError, match="'embeddings' must be one of fp32, quantize"):
        LayerPolicy(embeddings="per_row")
    p = tmp_path / "pol.json"
    p.write_text(json.dumps({"embeddings": "int8"}))
    with pytest.raises(FracgraphError, match="'embeddings' must be one of"):
        LayerPolicy.from_file(p)
    p.write_text(json.dumps({"embeddings": "quantize", "last": "fp32"}))
    assert LayerPolicy.from_file(p).embeddings == "quantize"
