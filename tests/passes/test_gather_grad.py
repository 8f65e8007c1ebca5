"""gather-grad: an embedding's GatherGrad as ScatterND(zeros, ids, dY, reduction=add). One GPT step with and without
the pass: the same loss and the same gradient of every parameter, the token table's included, bit for bit; and the
table's gradient equals numpy's scatter-add of dL/d(lookup) rows (np.add.at)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402
from fracgraph.zoo import export_gpt  # noqa: E402

V, T = 11, 8


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("gg")
    export_gpt(d / "gpt.onnx", seed=0, layers=1, heads=2, width=16, context=T, vocab=V)
    for name, skip in (("on", ()), ("off", ("gather-grad",))):
        build_artifacts(d / "gpt.onnx", d / name, BuildOptions(skip_passes=skip, expose_noise=True))
    return d


def test_scatter_add_replaces_gather_grad_bit_for_bit(arts):
    on = onnx.load(str(arts / "on" / "training_model.onnx"))
    off = onnx.load(str(arts / "off" / "training_model.onnx"))
    assert not any(n.op_type == "GatherGrad" for n in on.graph.node)
    assert sum(n.op_type == "GatherGrad" for n in off.graph.node) == 1
    (sc,) = [n for n in on.graph.node if n.op_type == "ScatterND"]
    assert sc.name.endswith("::scatter/add")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (5, T)).astype(np.int64)
    ids[0, :3] = 4                                        # repeated ids: rows summed
    labels = rng.integers(0, V, (5, T)).astype(np.int64)
    out = {}
    for name in ("on", "off"):
        sess = TrainSession(arts / name, seed=0, threads=1)
        bits = np.tile(np.array([8, 8, 0], np.float32), (sess.manifest.n_blocks, 1))   # FP32 errors: no noise
        loss = float(sess.forward_backward(ids, labels, bits)[0])
        out[name] = (loss, {n: sess.gradient(n) for n in sess.trainable})
    assert out["on"][0] == out["off"][0]
    for n, g in out["off"][1].items():
        np.testing.assert_array_equal(out["on"][1][n], g, err_msg=n)
    g = out["on"][1]["tok.weight"]
    assert (g[np.setdiff1d(np.arange(V), ids)] == 0).all() and np.abs(g[np.unique(ids)]).sum(1).min() > 0


def test_scatter_add_against_numpy():
    """The rewritten node alone: ScatterND(zeros, ids, dY, add) == np.add.at, int32 ids included."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from fracgraph.passes.gather_grad import GatherGradPass

    for itype, np_t in ((TensorProto.INT64, np.int64), (TensorProto.INT32, np.int32)):
        g = helper.make_graph([helper.make_node("GatherGrad", ["shape", "ids", "dy"], ["dx"], name="gg",
                                                domain="com.microsoft", axis=0)], "g",
                              [helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
                               helper.make_tensor_value_info("ids", itype, [3, 4]),
                               helper.make_tensor_value_info("dy", TensorProto.FLOAT, [3, 4, 5])],
                              [helper.make_tensor_value_info("dx", TensorProto.FLOAT, [7, 5])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        res = GatherGradPass()(m)
        assert res.modified and not any(n.op_type == "GatherGrad" for n in res.model.graph.node)
        rng = np.random.default_rng(1)
        ids = rng.integers(0, 7, (3, 4)).astype(np_t)
        dy = rng.standard_normal((3, 4, 5)).astype(np.float32)
        got = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"shape": np.array([7, 5]), "ids": ids, "dy": dy})[0]
        want = np.zeros((7, 5), np.float32)
        np.add.at(want, ids.reshape(-1), dy.reshape(-1, 5))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("com.microsoft", 1)])
    res = GatherGradPass()(m)
    assert not res.modified and "needs opset 16" in res.notes[0]
