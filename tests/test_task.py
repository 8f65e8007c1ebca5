"""Task detection (fracgraph/task.py): classification vs language model from the model's inputs and logits, and
one-line refusals for layouts that are neither."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from fracgraph.errors import FracgraphError
from fracgraph.model import load_model
from fracgraph.task import CLASSIFICATION, LANGUAGE_MODEL, detect


def token_model(extra_input: bool = False, flat_logits: bool = False, dtype=TensorProto.INT64):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((10, 6)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((6, 10)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["h"])]
    inputs = [helper.make_tensor_value_info("ids", dtype, ["N", 4])]
    out = "h"
    if extra_input:   # an attention-mask input the model multiplies in
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 4, 1]))
        nodes.append(helper.make_node("Mul", ["h", "mask"], ["hm"]))
        out = "hm"
    if flat_logits:
        nodes.append(helper.make_node("ReduceMean", [out], ["flat"], axes=[1], keepdims=0))
        out = "flat"
    shape = ["N", 10] if flat_logits else ["N", 4, 10]
    g = helper.make_graph(nodes, "tok", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return load_model(m)


def test_token_ids_and_sequence_logits_are_a_language_model():
    t = detect(token_model())
    assert (t.kind, t.input_name, t.input_dtype, t.context, t.num_classes) == (LANGUAGE_MODEL, "ids", "int64", 4, 10)
    assert detect(token_model(dtype=TensorProto.INT32)).input_dtype == "int32"


def test_float_data_is_classification(small_model):
    t = detect(load_model(small_model[1]))
    assert t.kind == CLASSIFICATION and t.num_classes == 5 and t.input_dtype == "float32"


def test_other_layouts_are_refused_in_one_line():
    with pytest.raises(FracgraphError, match=r"exactly one data input.*ids \(int64\), mask \(float32\).*constant"):
        detect(token_model(extra_input=True))
    with pytest.raises(FracgraphError, match=r"logits \[batch, 4, vocab\]"):
        detect(token_model(flat_logits=True))
