"""The quantize pipeline end to end: artifacts, manifest, blocks, eval/inference models, errors, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from fracgraph.build import BuildOptions, build_artifacts
from fracgraph.cli import app
from fracgraph.errors import FracgraphError
from fracgraph.manifest import Manifest
from fracgraph.policy import LayerPolicy
from fracgraph.runtime import TrainSession

runner = CliRunner()


@pytest.fixture(scope="module")
def art(small_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "art"
    build_artifacts(small_model[1], out)
    return out


def test_manifest_blocks_and_quant_points(art):
    m = Manifest.read(art)
    # stem conv is a layer block; conv1, conv2 and the downsample conv form one residual block; FC stays FP32
    assert [(b.kind, len(b.ops)) for b in m.blocks] == [("layer", 1), ("residual", 3)]
    assert {d.op: d.quantized for d in m.decisions}["/fc/Gemm"] is False
    kinds = sorted(q.kind for q in m.quant_points)
    # 4 weights; activations: stem input, conv1/down share one (same tensor, same block), conv2 input
    assert kinds == ["act"] * 3 + ["weight"] * 4
    assert m.precision_input == "fracgraph_bits"
    assert sum(d["macs"] for d in m.ops) == 8 * 3 * 9 * 64 + 12 * 8 * 9 * 16 + 12 * 12 * 9 * 16 + 12 * 8 * 16 + 12 * 5


def test_eval_model_and_inference_export_agree_with_running_ranges(art, batch, tmp_path):
    x, y = batch
    sess = TrainSession(art, seed=0)
    bits = np.full((sess.manifest.n_blocks, 3), 4, np.float32)
    for _ in range(3):
        sess.step(x, y, bits, lr=0.05)
    # the EMA buffers moved off zero and follow m*r + (1-m)*batch
    assert sess.parameter("/stem/Conv::fq_a0.run_range") > 0
    _, logits = sess.evaluate(x, y, bits)
    path = tmp_path / "inference.onnx"
    sess.export_inference(path)
    inf = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = inf.run(None, {"input": x, "fracgraph_bits": bits})[0]
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5)
    assert not any(n.op_type.endswith("Grad") for n in onnx.load(str(path)).graph.node)


def test_layer_policy_first_fp32_and_named(small_model, tmp_path):
    pol = LayerPolicy(first="fp32", fp32=["/down/*"])
    m = build_artifacts(small_model[1], tmp_path / "a", BuildOptions(policy=pol))
    reasons = {d.op: d.reason for d in m.decisions}
    assert reasons["/stem/Conv"].startswith("kept FP32: first-layer")
    assert "fp32 list" in reasons["/down/Conv"]
    assert m.n_blocks == 1


def test_existing_output_needs_force_and_failure_leaves_nothing(small_model, art, tmp_path):
    with pytest.raises(FracgraphError, match="--force"):
        build_artifacts(small_model[1], art)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(FracgraphError):
        build_artifacts(bad, tmp_path / "out")
    assert os.listdir(tmp_path) == ["bad.onnx"]


def test_cli_quantize_inspect_and_errors(small_model, tmp_path):
    out = tmp_path / "art"
    r = runner.invoke(app, ["quantize", str(small_model[1]), "-o", str(out), "--fw", "6", "--bw", "8"])
    assert r.exit_code == 0, r.output
    assert Manifest.read(out).default_bits == [6.0, 6.0, 8.0]
    r = runner.invoke(app, ["inspect", str(out), "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.output)["precision_input"]["shape"] == [2, 3]
    r = runner.invoke(app, ["inspect", str(small_model[1])])
    assert r.exit_code == 0 and "first layer" in r.output
    r = runner.invoke(app, ["quantize", str(small_model[1]), "-o", str(out)])
    assert r.exit_code == 2 and "--force" in r.output and "Traceback" not in r.output
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(small_model[1].read_bytes()[:300])
    r = runner.invoke(app, ["quantize", str(trunc), "-o", str(tmp_path / "t")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_unsupported_model_errors_name_the_problem(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    p = tmp_path / "nogemm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    with pytest.raises(FracgraphError, match="no Conv, Gemm or MatMul"):
        build_artifacts(p, tmp_path / "o")


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_zoo_models_quantize_and_train_three_steps(name, tmp_path):
    from fracgraph.zoo import export

    model = export(name, tmp_path / f"{name}.onnx")
    m = build_artifacts(model, tmp_path / "art")
    sess = TrainSession(tmp_path / "art", seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int64)
    bits = np.tile(np.array([8, 8, 8], np.float32), (m.n_blocks, 1))
    losses = [sess.step(x, y, bits, lr=0.05)[0] for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_gemms_fracgraph_cannot_cost_are_listed_as_kept_fp32_with_reason(tmp_path):
    import torch

    from fracgraph.inspect import summarize

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv1d(4, 8, 3)
            self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 14 * 1, 10)

        def forward(self, x):
            y = torch.relu(self.c1(x)).unsqueeze(-1)
            return self.fc(torch.relu(self.c2(y)).flatten(1))

    p = tmp_path / "c1d.onnx"
    torch.onnx.export(Net().eval(), torch.randn(2, 4, 16), str(p), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False)
    s = summarize(str(p))
    conv1d = [d for d in s["decisions"] if "only 2-D convolutions" in d["reason"]]
    assert len(conv1d) == 1 and not conv1d[0]["quantized"] and conv1d[0]["reason"].startswith("kept FP32")
    assert len(s["decisions"]) == 3
    r = runner.invoke(app, ["inspect", str(p)])
    assert r.exit_code == 0 and "not costed" in r.output
