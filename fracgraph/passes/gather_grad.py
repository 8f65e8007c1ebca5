"""Training-graph pass: an embedding's `GatherGrad` as `ScatterND(zeros, ids, dY, reduction="add")`.

onnxruntime 1.19.2's CPU GatherGrad (the gradient of a Gather, i.e. of an embedding lookup) is off any fast path:
3.6-3.9 ms for the zoo GPT's token table (65 x 128, 12 x 64 ids) at one thread, 3% of its whole training step,
where PyTorch's index_add_ takes 0.03 ms. ScatterND with reduction "add" (opset 16) adds the rows of dY into a
zero table in index order, as GatherGrad does: the same values bit for bit (tests/passes/test_gather_grad.py), in
0.03 ms. Applies to GatherGrad on axis 0 (a table's rows, what an embedding reads) in graphs of opset >= 16; any
other is kept and the notes say why.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from .base import Pass, PassResult, assert_inputs_defined, opset, replace_nodes


class GatherGradPass(Pass):
    name = "gather-grad"

    def call(self, model):
        graph = model.graph
        grads = [n for n in graph.node if n.op_type == "GatherGrad" and n.domain == "com.microsoft"]
        if not grads:
            return PassResult(model, False, [])
        if opset(model) < 16:
            return PassResult(model, False, [f"{len(grads)} GatherGrad kept: ScatterND's reduction needs opset 16, "
                                             f"the graph is opset {opset(model)}"])
        pairs, notes = [], []
        for node in grads:
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
            if axis != 0:
                notes.append(f"{node.name} kept: GatherGrad on axis {axis}, not a table's rows")
                continue
            shape, ids, dy = node.input
            q = f"{node.name}::scatter"
            consts = {f"{q}/minus1": np.array([-1], np.int64), f"{q}/one": np.array([1], np.int64),
                      f"{q}/end": np.array([np.iinfo(np.int64).max], np.int64), f"{q}/ids_shape": np.array([-1, 1], np.int64)}
            graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
            new = [
                helper.make_node("ConstantOfShape", [shape], [f"{q}/zeros"], name=f"{q}/zeros",
                                 value=numpy_helper.from_array(np.zeros(1, np.float32))),
                helper.make_node("Cast", [ids], [f"{q}/ids64"], name=f"{q}/ids64", to=TensorProto.INT64),
                helper.make_node("Reshape", [f"{q}/ids64", f"{q}/ids_shape"], [f"{q}/ids"], name=f"{q}/ids"),
                helper.make_node("Slice", [shape, f"{q}/one", f"{q}/end"], [f"{q}/row_shape"], name=f"{q}/row_shape"),
                helper.make_node("Concat", [f"{q}/minus1", f"{q}/row_shape"], [f"{q}/rows_shape"],
                                 name=f"{q}/rows_shape", axis=0),
                helper.make_node("Reshape", [dy, f"{q}/rows_shape"], [f"{q}/rows"], name=f"{q}/rows"),
                helper.make_node("ScatterND", [f"{q}/zeros", f"{q}/ids", f"{q}/rows"], [node.output[0]],
                                 name=f"{q}/add", reduction="add"),
            ]
            pairs.append((node, new))
            notes.append(f"{node.name}: as ScatterND(zeros, ids, dY, reduction=add)")
        replace_nodes(graph, pairs)
        return PassResult(model, bool(pairs), notes)

    def ensures(self, model):
        assert_inputs_defined(model)
