"""lowering/mask.py: a constant mask's `Where(cond, -inf, x)` before a Softmax becomes `Add(x, bias)`; the forward
values and onnxruntime-training's gradients are those of the original graph exactly. Declined cases say why."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fracgraph.lowering import LowerPass

ort.set_default_logger_severity(3)
T = 6
CAUSAL = np.triu(np.ones((T, T), bool), 1)


def masked_softmax(cond=CAUSAL, fill=-np.inf, fill_first=True, reader="Softmax"):
    """p (trainable [2, 3, T, T]) + x -> Where(cond, fill, .) -> reader -> y."""
    p = np.random.default_rng(0).standard_normal((2, 3, T, T)).astype(np.float32)
    args = ["cond", "fill", "z"] if fill_first else ["cond", "z", "fill"]
    nodes = [helper.make_node("Add", ["x", "p"], ["z"], name="add"),
             helper.make_node("Where", args, ["masked"], name="mask"),
             helper.make_node(reader, ["masked"], ["y"], name="reader", axis=-1)]
    inits = [numpy_helper.from_array(p, "p"), numpy_helper.from_array(cond, "cond"),
             numpy_helper.from_array(np.array(fill, np.float32), "fill")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, T, T])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, T, T])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(m, strict_mode=True), p


def forward(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": x})[0]


def gradient(model, x, target, tmp):
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module

    tmp.mkdir()
    artifacts.generate_artifacts(model, requires_grad=["p"], loss=artifacts.LossType.MSELoss,
                                 artifact_directory=str(tmp))
    state = CheckpointState.load_checkpoint(os.path.join(tmp, "checkpoint"))
    module = Module(os.path.join(tmp, "training_model.onnx"), state)
    module.train()
    loss = module(x, target)
    return float(loss), np.array(state.parameters["p"].grad)


@pytest.mark.parametrize("fill_first", [True, False])
def test_masked_fill_becomes_a_bias_add_with_the_same_values_and_gradient(tmp_path, fill_first):
    cond = CAUSAL if fill_first else ~CAUSAL            # Where(~causal, x, -inf): the same mask, operands swapped
    model, _ = masked_softmax(cond, fill_first=fill_first)
    res = LowerPass()(onnx.ModelProto.FromString(model.SerializeToString()))
    assert res.modified and res.notes == ["mask (Where) -> Add"]
    assert [n.op_type for n in res.model.graph.node] == ["Add", "Add", "Softmax"]
    x = np.random.default_rng(1).standard_normal((2, 3, T, T)).astype(np.float32)
    y0, y1 = forward(model, x), forward(res.model, x)
    np.testing.assert_array_equal(y1, y0)
    assert (y0[..., CAUSAL] == 0).all()
    target = np.random.default_rng(2).standard_normal(y0.shape).astype(np.float32)
    l0, g0 = gradient(model, x, target, tmp_path / "orig")
    l1, g1 = gradient(res.model, x, target, tmp_path / "low")
    assert l1 == l0
    np.testing.assert_array_equal(g1, g0)


@pytest.mark.parametrize("kw,why", [
    (dict(fill=-1e9), "not a masked fill with a constant infinite scalar"),
    (dict(reader="LogSoftmax"), "not read by Softmax alone"),
    (dict(cond=CAUSAL.astype(np.float32)), "not a constant mask"),
])
def test_other_wheres_are_kept_and_say_why(kw, why):
    model, _ = masked_softmax(**kw)
    res = LowerPass()(model)
    assert not res.modified and any(n.startswith("mask (Where) kept: ") and why in n for n in res.notes)


def test_the_zoo_gpt_causal_mask_is_lowered(tmp_path):
    pytest.importorskip("torch")
    from fracgraph.model import load_model, lowering_notes
    from fracgraph.zoo import export_gpt

    m = load_model(export_gpt(tmp_path / "g.onnx", layers=2, heads=2, width=8, context=4, vocab=5))
    assert not any(n.op_type == "Where" for n in m.graph.node)
    assert sum(n.endswith("(Where) -> Add") for n in lowering_notes(m)) == 2
