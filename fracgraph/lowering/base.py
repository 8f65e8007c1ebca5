"""The lowering registry's plumbing: `LOWERINGS` (op type -> rewrite) and the builder a rewrite emits through.

A lowering replaces one node by nodes that onnxruntime-training 1.19.2 can differentiate, computing the same values.
Every node, tensor and initializer it creates is named `fg::lower/<original node>/<what>`: deterministic, and
recognisable, so that the op table never mistakes a constant-weight Conv of a lowering for a quantizable layer
(`analysis/optable.py` skips names with `LOWERED_PREFIX`) and `build.classify_initializers` never trains its weights
(it skips `fg::` initializers). The lowered nodes write the original node's output names, so consumers are untouched.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..analysis.optable import LOWERED_PREFIX

# op type -> fn(ctx, node) returning the replacement nodes, or a str saying why the node is kept as it is
LOWERINGS: dict[str, Callable[["Ctx", onnx.NodeProto], "list[onnx.NodeProto] | str"]] = {}


def register(*op_types: str):
    def deco(fn):
        for op in op_types:
            LOWERINGS[op] = fn
        return fn
    return deco


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class Ctx:
    """What a lowering sees of the model (static shapes, opset) and how it emits (named nodes and constants)."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple], opset: int):
        self.model, self.shapes, self.opset = model, shapes, opset
        self.inits: list[onnx.TensorProto] = []
        self.node_name = ""
        self.nodes: list[onnx.NodeProto] = []

    def begin(self, node: onnx.NodeProto) -> None:
        self.node_name, self.nodes = node.name, []

    def name(self, what: str) -> str:
        return f"{LOWERED_PREFIX}{self.node_name}/{what}"

    def const(self, what: str, value, dtype=np.float32) -> str:
        name = self.name(f"const/{what}")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def emit(self, op: str, inputs: list[str], what: str, out: str | list[str] | None = None, **kw) -> str:
        """Append a node named after `what`; its output is `out` (an original output name) or a fresh name."""
        outs = [out] if isinstance(out, str) else list(out) if out else [self.name(what)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(what), **kw))
        return outs[0]

    def shape(self, tensor: str) -> tuple:
        return self.shapes.get(tensor, ())

    def static(self, tensor: str) -> tuple | None:
        """The tensor's shape if every dimension but the batch (dim 0) is known, else None."""
        s = self.shape(tensor)
        return s if s and None not in s[1:] else None

    def axes_input_op(self, op: str, x: str, axes: list[int], what: str, out: str | None = None, **kw) -> str:
        """A Reduce* op over `axes` in the form the opset wants (axes as an input from opset 18, ReduceSum from 13)."""
        if self.opset >= 18 or op == "ReduceSum":
            return self.emit(op, [x, self.const(f"{what}_axes", axes, np.int64)], what, out, **kw)
        return self.emit(op, [x], what, out, axes=axes, **kw)
