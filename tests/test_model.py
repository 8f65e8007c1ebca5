"""Loading third-party ONNX models: old opsets, Constant-node weights, external data, and clear refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fracgraph.errors import FracgraphError
from fracgraph.model import load_model


def _mlp(opset: int, weights_as_constants: bool) -> onnx.ModelProto:
    """x[N,4] -> MatMul W1 -> Add b1 -> Relu -> Gemm W2 (classifier), weights as initializers or Constant nodes."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 6)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w2 = rng.standard_normal((3, 6)).astype(np.float32)
    nodes, inits = [], []
    for name, arr in (("W1", w1), ("b1", b1), ("W2", w2)):
        if weights_as_constants:
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name)))
        else:
            inits.append(numpy_helper.from_array(arr, name))
    nodes += [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
              helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("Gemm", ["r", "W2"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7 if opset >= 13 else 6
    return m


def test_old_opset_and_constant_weights_are_normalized(tmp_path):
    p = tmp_path / "mlp.onnx"
    onnx.save(_mlp(11, weights_as_constants=True), str(p))
    m = load_model(p)
    assert next(i.version for i in m.opset_import if i.domain == "") == 17
    assert {t.name for t in m.graph.initializer} >= {"W1", "b1", "W2"}
    assert not any(n.op_type == "Constant" for n in m.graph.node)
    assert all(n.name for n in m.graph.node) and len({n.name for n in m.graph.node}) == len(m.graph.node)


def test_mlp_quantizes_and_trains(tmp_path):
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.runtime import TrainSession

    p = tmp_path / "mlp.onnx"
    onnx.save(_mlp(13, weights_as_constants=True), str(p))
    m = build_artifacts(p, tmp_path / "art", BuildOptions())
    assert [d.quantized for d in m.decisions] == [True, False]
    sess = TrainSession(tmp_path / "art", seed=0)
    x = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    bits = np.full((m.n_blocks, 3), 4, np.float32)
    losses = [sess.step(x, y, bits, 0.1)[0] for _ in range(5)]
    assert losses[-1] < losses[0]


def test_external_data_inside_dir_loads_and_outside_is_refused(tmp_path):
    m = _mlp(17, weights_as_constants=False)
    p = tmp_path / "ext.onnx"
    onnx.save(m, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    loaded = load_model(p)
    w = numpy_helper.to_array(next(t for t in loaded.graph.initializer if t.name == "W1"))
    assert w.shape == (4, 6)
    evil = onnx.load(str(p), load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.bin"
    (tmp_path.parent / "outside.bin").write_bytes(b"\0" * 256)
    onnx.save(evil, str(tmp_path / "evil.onnx"))
    with pytest.raises(FracgraphError, match="outside the model's directory"):
        load_model(tmp_path / "evil.onnx")


def test_control_flow_around_a_gemm_is_refused(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    body = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4])])
    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=body, else_branch=other),
         helper.make_node("MatMul", ["y", "W"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])], [w])
    p = tmp_path / "if.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    with pytest.raises(FracgraphError, match="branch.*control flow"):
        load_model(p)


def test_opset_above_21_is_converted_or_refused(tmp_path):
    m = _mlp(21, weights_as_constants=False)
    m.opset_import[0].version = 22
    p = tmp_path / "new.onnx"
    onnx.save(m, str(p))
    try:
        out = load_model(p)
    except FracgraphError as e:
        assert "opset 22" in str(e)
    else:
        assert next(i.version for i in out.opset_import if i.domain == "") == 21
