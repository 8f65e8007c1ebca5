"""Models too large for memory fail before anything large is read, with one line naming the size: declared
weight sizes (external data), declared input dims, the file itself; and declared sizes must match stored bytes."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from fracgraph.cli import app
from fracgraph.errors import FracgraphError
from fracgraph.memory import fmt_bytes
from fracgraph.model import load_model


def _mlp(input_dims=("batch", 64)) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"], name="fc")], "mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _external(m: onnx.ModelProto, dims, location="w.bin", length=None):
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    del t.dims[:]
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("length", length)):
        if v is not None:
            e = t.external_data.add()
            e.key, e.value = k, str(v)


def _one_line_error(args) -> str:
    r = CliRunner().invoke(app, args)
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_declared_external_weights_larger_than_memory_are_refused_unread(tmp_path):
    m = _mlp()
    _external(m, [1 << 20, 1 << 20])                            # 4 TiB of float32, as declared
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    onnx.save(m, tmp_path / "big.onnx")
    with pytest.raises(FracgraphError, match=r"weights \(1 initializers, as declared\) needs 4\.0 TiB in memory"):
        load_model(tmp_path / "big.onnx")
    line = _one_line_error(["quantize", str(tmp_path / "big.onnx"), "-o", str(tmp_path / "art")])
    assert "4.0 TiB" in line and not (tmp_path / "art").exists()
    assert "4.0 TiB" in _one_line_error(["estimate", str(tmp_path / "big.onnx")])


def test_external_data_that_does_not_match_the_declared_shape_is_not_read(tmp_path):
    m = _mlp()
    _external(m, [64, 10])
    with open(tmp_path / "w.bin", "wb") as f:
        f.truncate(1 << 40)                                      # sparse 1 TiB file: reading it would exhaust memory
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(FracgraphError, match=r"does not hold the 2560 bytes its shape \[64, 10\] needs"):
        load_model(tmp_path / "m.onnx")
    m2 = _mlp()
    _external(m2, [64, 10], length=1 << 40)
    onnx.save(m2, tmp_path / "m2.onnx")
    with pytest.raises(FracgraphError, match=r"1099511627776 bytes.*does not hold the 2560 bytes"):
        load_model(tmp_path / "m2.onnx")


def test_inline_weights_must_match_their_declared_shape(tmp_path):
    m = _mlp()
    m.graph.initializer[0].dims[0] = 1 << 30
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(FracgraphError, match=r"shape \[1073741824, 10\] needs 42949672960 bytes but the file stores 2560"):
        load_model(tmp_path / "m.onnx")


def test_huge_declared_input_dims_fail_in_quantize_naming_the_size(tmp_path):
    m = _mlp(("batch", 3, 1 << 20, 1 << 20))
    onnx.save(m, tmp_path / "m.onnx")
    line = _one_line_error(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "art")])
    assert "input 'x' of shape [None, 3, 1048576, 1048576]" in line and "needs 12.0 TiB" in line
    onnx.save(_mlp(("batch", -64)), tmp_path / "neg.onnx")
    assert "every dimension must be positive" in _one_line_error(["inspect", str(tmp_path / "neg.onnx")])


def test_model_file_larger_than_memory_is_refused_before_parsing(tmp_path, monkeypatch):
    onnx.save(_mlp(), tmp_path / "m.onnx")
    size = (tmp_path / "m.onnx").stat().st_size
    monkeypatch.setenv("FRACGRAPH_MEMORY_LIMIT", str(size))    # parsing needs the bytes and the message: 2x
    on_disk, need = re.escape(fmt_bytes(size)), re.escape(fmt_bytes(2 * size))
    with pytest.raises(FracgraphError, match=rf"m\.onnx \({on_disk} on disk\) needs {need} in memory but only {on_disk} "):
        load_model(tmp_path / "m.onnx")
    monkeypatch.setenv("FRACGRAPH_MEMORY_LIMIT", str(1 << 30))
    assert load_model(tmp_path / "m.onnx").graph.node[0].op_type == "MatMul"
