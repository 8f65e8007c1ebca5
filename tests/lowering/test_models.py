"""Models from the wild through the whole pipeline: lowered ops, classifier heads, legacy opsets, refusals.

Each model is built in code, quantized at the default settings (speed passes and fused kernels on), and trained;
FP32 evaluation of the artifacts (bits 0) is compared with onnxruntime's inference of the original model."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from typer.testing import CliRunner

from fracgraph.analysis.optable import LOWERED_PREFIX
from fracgraph.build import build_artifacts
from fracgraph.cli import app
from fracgraph.manifest import Manifest
from fracgraph.runtime import TrainSession

runner = CliRunner()
rng = np.random.default_rng(0)


def _f(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def infer(path, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def fp32_logits(art, x, y):
    sess = TrainSession(art, seed=0)
    return sess, sess.evaluate(x, y, np.zeros((sess.manifest.n_blocks, 3), np.float32))[1]


def train_steps(sess, x, y, n=2):
    bits = np.full((sess.manifest.n_blocks, 3), 8, np.float32)
    losses = [float(np.asarray(sess.step(x, y, bits, lr=0.05)[0]).ravel()[0]) for _ in range(n)]
    assert all(np.isfinite(losses)), losses
    return losses


def wild_model(path, head="Softmax", batch="N"):
    """Conv -> LRN -> HardSwish -> Conv(s2) -> PRelu -> AveragePool 2x2/s2 -> Sum(3) with two branches ->
    HardSigmoid gate -> GlobalAveragePool -> Flatten -> Gemm -> `head`."""
    inits = [nh.from_array(_f(8, 3, 3, 3), "w1"), nh.from_array(_f(8, 8, 3, 3), "w2"), nh.from_array(_f(8, 1, 1, scale=0.25), "slope"),
             nh.from_array(_f(8, 8, 1, 1), "w3"), nh.from_array(_f(5, 8), "fc_w"), nh.from_array(_f(5), "fc_b")]
    nodes = [
        h.make_node("Conv", ["x", "w1"], ["c1"], "conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        h.make_node("LRN", ["c1"], ["lrn"], "lrn", size=3, alpha=1e-2, beta=0.75, bias=1.0),
        h.make_node("HardSwish", ["lrn"], ["hs"], "hswish"),
        h.make_node("Conv", ["hs", "w2"], ["c2"], "conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        h.make_node("PRelu", ["c2", "slope"], ["pr"], "prelu"),
        h.make_node("AveragePool", ["pr"], ["pool"], "transition_pool", kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Conv", ["pool", "w3"], ["c3"], "conv3", kernel_shape=[1, 1]),
        h.make_node("HardSigmoid", ["c3"], ["gate"], "gate"),
        h.make_node("Sum", ["pool", "c3", "gate"], ["sum"], "sum3"),
        h.make_node("GlobalAveragePool", ["sum"], ["gap"], "gap"),
        h.make_node("Flatten", ["gap"], ["flat"], "flatten"),
        h.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], "fc", transB=1),
    ]
    out = "logits"
    if head:
        nodes.append(h.make_node(head, ["logits"], ["prob"], "head", axis=1))
        out = "prob"
    g = h.make_graph(nodes, "wild", [h.make_tensor_value_info("x", T.FLOAT, [batch, 3, 8, 8])],
                     [h.make_tensor_value_info(out, T.FLOAT, [batch, 5])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def wild(tmp_path_factory):
    d = tmp_path_factory.mktemp("wild")
    model = wild_model(d / "wild.onnx")
    return model, build_artifacts(model, d / "art"), d / "art"


def test_wild_model_quantizes_trains_and_matches_the_original(wild):
    path, m, art = wild
    # every lowered op became differentiable ops; the window-sum Conv of LRN and the pool is no layer
    notes = [n for n in m.extra["notes"] if n.startswith("[lower]")]
    for op in ("LRN", "HardSwish", "PRelu", "AveragePool", "HardSigmoid", "Sum"):
        assert any(f"({op}) ->" in n for n in notes), (op, notes)
    assert [d["name"] for d in m.ops] == ["conv1", "conv2", "conv3", "fc"]
    assert not any(d.op.startswith(LOWERED_PREFIX) for d in m.decisions)
    assert "slope" in m.extra["trainable"] and not any(t.startswith("fg::lower") for t in m.extra["trainable"])
    assert m.extra["head"]["cut"] == "Softmax" and m.num_classes == 5
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = np.arange(4) % 5
    sess, logits = fp32_logits(art, x, y)
    (prob,) = infer(path, x)
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), prob, rtol=1e-4, atol=1e-5)
    train_steps(sess, x, y)
    g = sess.gradient("w1")
    assert np.isfinite(g).all() and np.abs(g).max() > 0   # the error reaches the first layer through every lowering
    # the inference export gives what the original gave: probabilities, under the original output name
    sess.export_inference(art.parent / "inference.onnx")
    exported = onnx.load(str(art.parent / "inference.onnx"))
    assert [o.name for o in exported.graph.output] == ["prob"]
    bits0 = np.zeros((sess.manifest.n_blocks, 3), np.float32)
    _, logits = sess.evaluate(x, y, bits0)
    inf = ort.InferenceSession(str(art.parent / "inference.onnx"), providers=["CPUExecutionProvider"])
    (p,) = inf.run(None, {"x": x, "fracgraph_bits": bits0})
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_inspect_lists_only_the_models_layers(wild):
    path = wild[0]
    res = runner.invoke(app, ["inspect", str(path), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert LOWERED_PREFIX not in json.dumps(json.loads(res.output).get("ops", res.output))


def test_densenet_transition_pool_trains(tmp_path):
    """A 2x2/stride-2 AveragePool after a 1x1 conv (DenseNet's transition): onnxruntime-training 1.19.2's own
    AveragePoolGrad gave an empty gradient here and the error quantizer stopped the first step."""
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.t, self.pool = nn.Conv2d(8, 8, 1, bias=False), nn.AvgPool2d(2, 2)
            self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Linear(8, 5)

        def forward(self, x):
            x = self.pool(self.t(torch.relu(self.bn(self.c1(x)))))
            return self.fc(torch.relu(self.c2(x)).mean((2, 3)))

    from tests.conftest import export

    torch.manual_seed(0)
    net = Net().eval()
    path = export(net, tmp_path / "dense.onnx")
    m = build_artifacts(path, tmp_path / "art")
    assert any("(AveragePool) -> Conv" in n for n in m.extra["notes"])
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = np.arange(4) % 5
    sess, logits = fp32_logits(tmp_path / "art", x, y)
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(torch.tensor(x)).numpy(), rtol=1e-4, atol=1e-5)
    train_steps(sess, x, y)
    assert np.abs(sess.gradient("c1.weight" if "c1.weight" in sess.parameter_names() else
                                m.extra["trainable"][0])).max() > 0


def test_pytorch_exported_wild_ops_train(tmp_path):
    """What torch.onnx writes for LocalResponseNorm (a 5-D AveragePool over run-time dims), GroupNorm
    (InstanceNormalization), Hardswish, PReLU, a padded ceil-mode AvgPool, an SE gate with Hardsigmoid, ELU,
    Softplus, Mish, adaptive max pooling and log_softmax: FP32 evaluation equals PyTorch, and it trains."""
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.lrn, self.hs = nn.Conv2d(3, 8, 3, padding=1), nn.LocalResponseNorm(3), nn.Hardswish()
            self.c2, self.gn, self.pr = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.GroupNorm(2, 8), nn.PReLU(8)
            self.pool = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Hardsigmoid())
            self.inorm, self.c3, self.fc = nn.InstanceNorm2d(8, affine=True), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

        def forward(self, x):
            x = self.pool(self.pr(self.gn(self.c2(self.hs(self.lrn(self.c1(x)))))))
            x = x * self.se(x)
            x = F.mish(F.softplus(F.elu(self.inorm(self.c3(x)))))
            return torch.log_softmax(self.fc(F.adaptive_max_pool2d(x, 1).flatten(1)), 1)

    from tests.conftest import export

    torch.manual_seed(0)
    net = Net().eval()
    m = build_artifacts(export(net, tmp_path / "tw.onnx"), tmp_path / "art")
    assert not any(" kept: " in n for n in m.extra["notes"] if n.startswith("[lower]")), m.extra["notes"]
    assert m.extra["head"]["cut"] == "LogSoftmax"
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = np.arange(4) % 5
    sess, logits = fp32_logits(tmp_path / "art", x, y)
    with torch.no_grad():
        ref = net(torch.tensor(x)).numpy()
    np.testing.assert_allclose(logits - np.log(np.exp(logits).sum(1, keepdims=True)), ref, rtol=1e-4, atol=1e-5)
    train_steps(sess, x, y, n=3)


def _two_outputs(path):
    """logits [N, 5, 1, 1] from a 1x1 conv on pooled features, plus an auxiliary output."""
    inits = [nh.from_array(_f(6, 3, 3, 3), "w1"), nh.from_array(_f(5, 6, 1, 1), "w2"), nh.from_array(_f(4, 6, 1, 1), "aux_w")]
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], "conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c1"], ["r"], "relu"),
             h.make_node("GlobalAveragePool", ["r"], ["gap"], "gap"),
             h.make_node("Conv", ["gap", "w2"], ["logits4d"], "classifier", kernel_shape=[1, 1]),
             h.make_node("Conv", ["gap", "aux_w"], ["aux"], "aux", kernel_shape=[1, 1])]
    g = h.make_graph(nodes, "two", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                     [h.make_tensor_value_info("aux", T.FLOAT, ["N", 4, 1, 1]),
                      h.make_tensor_value_info("logits4d", T.FLOAT, ["N", 5, 1, 1])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(path))
    return path


def test_cli_logits_pick_and_4d_logits(tmp_path):
    path = _two_outputs(tmp_path / "two.onnx")
    res = runner.invoke(app, ["quantize", str(path), "-o", str(tmp_path / "a")])
    assert res.exit_code == 2 and "aux, logits4d" in res.output and "--logits" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    res = runner.invoke(app, ["quantize", str(path), "-o", str(tmp_path / "a"), "--logits", "nope"])
    assert res.exit_code == 2 and "'nope'" in res.output
    res = runner.invoke(app, ["quantize", str(path), "-o", str(tmp_path / "a"), "--logits", "logits4d"])
    assert res.exit_code == 0, res.output
    m = Manifest.read(tmp_path / "a")
    assert m.num_classes == 5
    assert m.extra["head"] | {"classes": 5} == {"output": "logits4d", "logits": f"{LOWERED_PREFIX}head/logits",
                                                "cut": None, "flattened": True, "dropped_outputs": ["aux"], "classes": 5}
    assert [d["name"] for d in m.ops] == ["conv1", "classifier"]      # the aux conv went with its output
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    sess, logits = fp32_logits(tmp_path / "a", x, np.arange(3))
    np.testing.assert_allclose(logits, infer(path, x)[1].reshape(3, 5), rtol=1e-4, atol=1e-5)
    train_steps(sess, x, np.arange(3))


def test_logsoftmax_head_is_cut(tmp_path):
    path = wild_model(tmp_path / "m.onnx", head="LogSoftmax")
    m = build_artifacts(path, tmp_path / "a")
    assert m.extra["head"]["cut"] == "LogSoftmax" and m.extra["head"]["logits"] == "logits"


def legacy_model(opset: int):
    """A hand-built IR 3 graph as old exporters wrote it: initializers listed as graph inputs, BatchNormalization
    with `spatial` (opset < 9), Dropout, Upsample (scales attribute before opset 9), static batch."""
    inits = [nh.from_array(_f(4, 3, 3, 3), "w"), nh.from_array(np.ones(4, np.float32), "g"),
             nh.from_array(np.zeros(4, np.float32), "b"), nh.from_array(_f(4, scale=0.1), "m"),
             nh.from_array(np.ones(4, np.float32), "v"), nh.from_array(_f(5, 4), "fw"), nh.from_array(_f(5), "fb"),
             nh.from_array(np.array([-1, 4], np.int64), "shape")]
    nodes = [h.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], epsilon=1e-5,
                         **({"spatial": 1} if opset < 9 else {})),
             h.make_node("Relu", ["bn"], ["r"]),
             h.make_node("Dropout", ["r"], ["d"], ratio=0.2)]
    if opset < 9:
        nodes.append(h.make_node("Upsample", ["d"], ["u"], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest"))
    else:
        inits.append(nh.from_array(np.array([1, 1, 2, 2], np.float32), "sc"))
        nodes.append(h.make_node("Upsample", ["d", "sc"], ["u"], mode="nearest"))
    nodes += [h.make_node("GlobalAveragePool", ["u"], ["gap"]), h.make_node("Reshape", ["gap", "shape"], ["flat"]),
              h.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], transB=1)]
    ins = [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 8, 8])]
    ins += [h.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = h.make_graph(nodes, "legacy", ins, [h.make_tensor_value_info("logits", T.FLOAT, [2, 5])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 3
    return m


@pytest.mark.parametrize("opset", [7, 9])
def test_legacy_ir3_graph_quantizes_and_trains(opset, tmp_path):
    path = tmp_path / "legacy.onnx"
    onnx.save(legacy_model(opset), str(path))
    res = runner.invoke(app, ["quantize", str(path), "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    sess, logits = fp32_logits(tmp_path / "a", x, np.arange(2))
    np.testing.assert_allclose(logits, infer(path, x)[0], rtol=1e-4, atol=1e-5)
    train_steps(sess, x, np.arange(2))


def test_op_without_gradient_is_one_line_exit_2_no_output(tmp_path):
    inits = [nh.from_array(_f(4, 3, 3, 3), "w"), nh.from_array(_f(5, 4), "fw")]
    nodes = [h.make_node("Conv", ["x", "w"], ["c"], "conv", kernel_shape=[3, 3]),
             h.make_node("ThresholdedRelu", ["c"], ["t"], "odd_act", alpha=0.1),
             h.make_node("GlobalAveragePool", ["t"], ["gap"], "gap"),
             h.make_node("Flatten", ["gap"], ["flat"], "flatten"),
             h.make_node("Gemm", ["flat", "fw"], ["logits"], "fc", transB=1)]
    g = h.make_graph(nodes, "bad", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["N", 5])], inits)
    path = tmp_path / "bad.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(path))
    res = runner.invoke(app, ["quantize", str(path), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in res.output
    assert "node odd_act (ThresholdedRelu)" in line and "cannot differentiate" in line
    assert sorted(os.listdir(tmp_path)) == ["bad.onnx"]


def test_builder_errors_are_one_line():
    from fracgraph.lowering.gradients import explain_build_error

    raw = RuntimeError("/onnxruntime_src/orttraining/orttraining/core/graph/gradient_builder_registry.cc:29 "
                       "onnxruntime::training::GradientDef onnxruntime::training::GetGradientForOp(const "
                       "onnxruntime::training::GradientGraphConfiguration&, onnxruntime::Graph*, const "
                       "onnxruntime::Node*, ...) gradient_builder != nullptr was false. The gradient builder has "
                       "not been registered: Einsum for node /blocks.0/Einsum\n")
    msg = explain_build_error(raw)
    assert msg.startswith("node /blocks.0/Einsum (Einsum): onnxruntime-training 1.19.2 cannot differentiate Einsum")
    assert "\n" not in msg and "onnxruntime_src" not in msg
    other = explain_build_error(RuntimeError("/onnxruntime_src/a/b.cc:12 void f(int) something broke\n"))
    assert other == "onnxruntime-training could not build the training graph: something broke"
