"""A damaged or hand-edited manifest.json gives `inspect` and `estimate` one line and exit code 2, never a
traceback; a files entry may not point outside the artifact directory."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from fracgraph.cli import app


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from fracgraph.build import build_artifacts

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (64, 16)), ("w2", (16, 10)))]
    g = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"], name="flat"),
                           helper.make_node("MatMul", ["f", "w1"], ["h"], name="fc1"),
                           helper.make_node("Relu", ["h"], ["a"], name="relu"),
                           helper.make_node("MatMul", ["a", "w2"], ["logits"], name="fc2")], "mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    d = tmp_path_factory.mktemp("mc")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), d / "m.onnx")
    build_artifacts(d / "m.onnx", d / "art")
    return d / "art"


MUTATIONS = {
    "top_level_list": lambda d: [d],
    "ops_not_a_list": lambda d: d.update(ops=5),
    "op_without_macs": lambda d: [o.pop("macs") for o in d["ops"]],
    "op_block_out_of_range": lambda d: [o.update(block=99) for o in d["ops"] if o["quantized"]],
    "no_blocks": lambda d: d.update(blocks=[]),
    "decision_for_unknown_op": lambda d: d["decisions"][0].update(op="nope"),
    "default_bits_text": lambda d: d.update(default_bits="8,8,8"),
    "eval_file_outside": lambda d: d["files"].update(eval="../../etc/passwd"),
    "optimizer_null": lambda d: d.update(optimizer=None),
    "op_name_number": lambda d: [o.update(name=3) for o in d["ops"]],
    "quant_point_block_missing": lambda d: [q.pop("block") for q in d["quant_points"]],
    "truncated_json": None,
}


@pytest.mark.parametrize("kind", list(MUTATIONS))
def test_damaged_manifest_is_one_line(art, tmp_path, kind):
    d = tmp_path / "art"
    shutil.copytree(art, d)
    text = (art / "manifest.json").read_text()
    if MUTATIONS[kind] is None:
        text = text[: len(text) // 2]
    else:
        m = copy.deepcopy(json.loads(text))
        out = MUTATIONS[kind](m)
        text = json.dumps(out if kind == "top_level_list" else m)
    (d / "manifest.json").write_text(text)
    for args in (["inspect", str(d)], ["estimate", str(d), "--hw", "bitfusion"]):
        r = CliRunner().invoke(app, args)
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and "manifest" in lines[0], (kind, args[0], r.output, r.exception)


@pytest.mark.parametrize("how", ["symbolic", "probe", "none"])
def test_gemm_without_static_shapes_keeps_a_readable_manifest(tmp_path, monkeypatch, how):
    """A GEMM whose input shape only a Div on Shape() gives (torch's chunk/split/channel-shuffle export): ONNX's
    data propagation stops at the Div, onnxruntime's symbolic shape inference proves [batch, 32] (and, with it
    switched off, the probe run at batch 1 and 2 measures it) and the GEMM is given an op-table row. Where neither
    can (here: both switched off), it is kept FP32 with a decision but no op-table row, and the manifest must
    still read (it did not: ShuffleNet's artifacts were refused)."""
    from fracgraph import model as fg_model
    from fracgraph.build import build_artifacts
    from fracgraph.manifest import Manifest

    if how != "symbolic":
        monkeypatch.setattr(fg_model, "_symbolic_shapes", lambda m: m)
    if how == "none":
        monkeypatch.setattr(fg_model, "_probe_shapes", lambda m: m)
    symbolic = how != "none"

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w0", (64, 32)), ("w1", (32, 10)))]
    inits += [numpy_helper.from_array(np.array([0], np.int64), "zero"),
              numpy_helper.from_array(np.array([1], np.int64), "one"),
              numpy_helper.from_array(np.array([32], np.int64), "c32")]
    n = helper.make_node
    g = helper.make_graph([n("Flatten", ["x"], ["f"], name="flat"), n("MatMul", ["f", "w0"], ["h"], name="fc0"),
                           n("Shape", ["h"], ["s"], name="shape"), n("Gather", ["s", "zero"], ["b"], name="gather"),
                           n("Div", ["b", "one"], ["b2"], name="div"),
                           n("Concat", ["b2", "c32"], ["shp"], name="concat", axis=0),
                           n("Reshape", ["h", "shp"], ["r"], name="reshape"),
                           n("MatMul", ["r", "w1"], ["logits"], name="fc1")], "dyn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    m = build_artifacts(tmp_path / "m.onnx", tmp_path / "art")
    read = Manifest.read(tmp_path / "art")
    assert [x.op for x in read.decisions] == [x.op for x in m.decisions] == ["fc0", "fc1"]
    if symbolic:
        assert {o["name"] for o in read.ops} == {"fc0", "fc1"}
        assert [o["macs"] for o in read.ops if o["name"] == "fc1"] == [32 * 10]   # a row: its shapes are known
        assert "static" not in read.decisions[1].reason   # (kept FP32 as the classifier, by policy)
    else:
        assert {o["name"] for o in read.ops} == {"fc0"} and "not static" in read.decisions[1].reason
