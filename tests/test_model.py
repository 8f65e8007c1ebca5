"""Loading third-party ONNX models: old opsets, Constant-node weights, external data, and clear refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
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


def _same_pad_net():
    """timm's "same" padding: the pads of a strided conv computed from x.shape at run time (F.pad), as in the tf_*
    EfficientNets; ONNX's data propagation and onnxruntime's symbolic inference both stop at the pad arithmetic."""
    import torch
    import torch.nn.functional as F

    class SamePad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2)
            self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2)
            self.fc = torch.nn.Linear(16, 10)

        @staticmethod
        def pad(x, k, s):   # timm's get_same_padding, its tensor branch (the one an export traces)
            ih, iw = x.shape[-2:]
            ph, pw = (torch.clamp(((torch.as_tensor(v) / s).ceil() - 1) * s + k - v, min=0).int() for v in (ih, iw))
            return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

        def forward(self, x):
            x = torch.relu(self.c1(self.pad(x, 3, 2)))
            x = torch.relu(self.c2(self.pad(x, 3, 2)))
            return self.fc(x.mean((2, 3)))

    return SamePad().eval()


def test_probe_run_gives_the_dims_inference_cannot(tmp_path):
    """Shapes from `Shape()` arithmetic neither inference evaluates: the probe run (batch 1 and 2) makes the convs'
    operands static, so they are quantized; every dim it writes is the one onnxruntime computes at another batch,
    and the artifacts train."""
    import torch

    from fracgraph import model as fg_model
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.runtime import TrainSession

    net = _same_pad_net()
    path = tmp_path / "same.onnx"
    torch.onnx.export(net, torch.randn(2, 3, 15, 15), path, dynamo=False, training=torch.onnx.TrainingMode.EVAL,
                      do_constant_folding=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
    without = fg_model._symbolic_shapes(onnx.shape_inference.infer_shapes(onnx.load(path), data_prop=True))
    assert fg_model._gemm_shapes_partial(without)          # the case: inference alone leaves a conv's shapes open
    m = load_model(path)
    assert not fg_model._gemm_shapes_partial(m)
    # each dim the model now declares is what onnxruntime computes at batch 5 (not one of the probed batches)
    declared = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                for v in m.graph.value_info}
    names = [n for n in declared if any(x is not None for x in declared[n])]
    probe = onnx.ModelProto.FromString(m.SerializeToString())
    elem = {v.name: v.type.tensor_type.elem_type for v in m.graph.value_info}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, elem[n], None) for n in names)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(names, {"x": np.random.default_rng(0).standard_normal((5, 3, 15, 15)).astype(np.float32)})
    for n, v in zip(names, outs):
        assert all(d is None or d == got for d, got in zip(declared[n], v.shape)), (n, declared[n], v.shape)
    manifest = build_artifacts(path, tmp_path / "art", BuildOptions())
    assert [d.quantized for d in manifest.decisions] == [True, True, False]   # the classifier stays FP32
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3, 15, 15)).astype(np.float32), rng.integers(0, 10, 4).astype(np.int64)
    sess = TrainSession(tmp_path / "art", threads=1, seed=0)
    bits = np.full((manifest.n_blocks, 3), 8, np.float32)
    losses = [sess.step(x, y, bits, 0.05)[0] for _ in range(3)]
    assert np.all(np.isfinite(losses)) and losses[2] < losses[0], losses



def test_symbolic_inference_leaves_no_files(tmp_path, monkeypatch):
    """onnxruntime's `SymbolicShapeInference.infer_shapes` saves the whole model (a `sym_shape_infer_temp.onnx` and
    a uuid-named file of all its weights) into the current directory when its inference is incomplete (here: an op
    it does not know); fracgraph must leave the user's directory as it was, and keep ONNX's shapes."""
    from fracgraph import model as fg_model

    consts = [numpy_helper.from_array(np.array(v, np.int64), n)
              for v, n in [([1], "i1"), (2, "two"), ([-1], "m1"), ([2], "k2")]]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i1"], ["d"]),
             helper.make_node("Div", ["d", "two"], ["dh"]), helper.make_node("Concat", ["m1", "k2", "dh"], ["shp"], axis=0),
             helper.make_node("Reshape", ["x", "shp"], ["r"]),   # [N, 2, 64/2]: data propagation stops at the Div
             helper.make_node("Unknown", ["r"], ["r2"], domain="user.ops"),
             helper.make_node("MatMul", ["r2", "W"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones((32, 8), np.float32), "W")] + consts)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("user.ops", 1)])
    m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    assert fg_model._gemm_shapes_partial(m)          # so symbolic inference runs, and cannot finish
    before = m.SerializeToString()
    monkeypatch.chdir(tmp_path)
    out = fg_model._symbolic_shapes(m)
    assert list(tmp_path.iterdir()) == []
    assert out.SerializeToString() == before



def test_tied_weight_stays_one_initializer_and_identity_copies_split():
    """A weight read by two nodes (a token table E gathered by ids and, through Transpose, the head's MatMul) stays
    one initializer: the Transpose is kept, not folded into a copy that would train on its own. Identity(W) (how
    the TorchScript exporter writes a parameter equal in value to another, e.g. LayerNorm ones) still folds into
    an initializer of its own name: distinct parameters stay distinct."""
    rng = np.random.default_rng(0)
    E = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "E")
    W = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
             helper.make_node("Identity", ["W"], ["W2"], name="dedup"),
             helper.make_node("MatMul", ["emb", "W"], ["h1"], name="mm1"),
             helper.make_node("MatMul", ["h1", "W2"], ["h2"], name="mm2"),
             helper.make_node("Transpose", ["E"], ["Et"], name="head_t", perm=[1, 0]),
             helper.make_node("MatMul", ["h2", "Et"], ["y"], name="head")]
    g = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 5])], [E, W])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    ids = np.array([[0, 4, 2], [1, 1, 3]], np.int64)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    out = load_model(m)
    inits = {t.name for t in out.graph.initializer}
    assert inits == {"E", "W", "W2"}    # no folded copy of E; W2 its own parameter
    assert [list(n.input) for n in out.graph.node if n.op_type == "Transpose"] == [["E"]]
    assert not any(n.op_type == "Identity" for n in out.graph.node)
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, want)
