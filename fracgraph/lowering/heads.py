"""Classifier heads normalized for the loss: which output holds the logits, a trailing Softmax/LogSoftmax cut
(the loss applies its own), `[N, C, 1, ..., 1]` logits flattened to `[N, C]`.

One function, `classifier_head`, so a sequence head (`[B, T, V]` logits) can be one more case in it.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..analysis.optable import LOWERED_PREFIX, value_shapes
from ..errors import FracgraphError

_PROBABILITY_OPS = ("Softmax", "LogSoftmax")
# ops that only move or pass values, walked through between the logits and a trailing Softmax
_PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Identity", "Dropout")
HEAD_PREFIX = f"{LOWERED_PREFIX}head/"


def _class_axis(shape: tuple) -> int | None:
    """The one axis after the batch that is not 1 (the classes), or None."""
    big = [i for i, d in enumerate(shape[1:], 1) if d != 1]
    return big[0] if len(big) == 1 and shape[big[0]] is not None else None


def classifier_head(model: onnx.ModelProto, output: str | None = None) -> tuple[onnx.ModelProto, dict]:
    """The model with exactly one graph output, the logits `[batch, classes]`, and what was done to get there:
    {"output": the chosen original output, "logits": the logits tensor now, "cut": "Softmax"/"LogSoftmax"/None,
    "flattened": bool, "dropped_outputs": [...], "classes": C}."""
    g = model.graph
    names = [o.name for o in g.output]
    if output is None:
        if len(names) > 1:
            raise FracgraphError(f"the model has {len(names)} outputs ({', '.join(names)}); pass --logits NAME to "
                                 f"`fracgraph quantize` to say which one holds the logits")
        output = names[0]
    elif output not in names:
        raise FracgraphError(f"--logits {output!r} is not an output of the model; its outputs are: {', '.join(names)}")
    info = {"output": output, "logits": output, "cut": None, "flattened": False,
            "dropped_outputs": [n for n in names if n != output]}
    shapes = value_shapes(model)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            consumers[x] = consumers.get(x, 0) + 1
    logits, changed = output, bool(info["dropped_outputs"])

    # a trailing Softmax/LogSoftmax over the class axis, possibly followed by Flatten/Reshape/Squeeze/Identity
    t, chain = output, []
    while t in producer and producer[t].op_type in _PASS_THROUGH and consumers.get(producer[t].input[0], 0) == 1:
        chain.append(producer[t])
        t = producer[t].input[0]
    sm = producer.get(t)
    if sm is not None and sm.op_type in _PROBABILITY_OPS and (not chain or consumers.get(t, 0) == 1):
        xs = shapes.get(sm.input[0], ())
        axis = next((helper.get_attribute_value(a) for a in sm.attribute if a.name == "axis"), -1)
        ca = _class_axis(xs) if xs else None
        if ca is not None and axis % len(xs) == ca:
            info["cut"] = sm.op_type
            if chain:   # the chain now reads the Softmax's input
                first = chain[-1]
                first.input[0] = sm.input[0]
            else:
                logits = sm.input[0]
            g.node.remove(sm)
            changed = True

    # [N, C, 1, ..., 1] -> [N, C]
    ls = shapes.get(logits, ())
    if len(ls) > 2 and _class_axis(ls) == 1:
        flat = f"{HEAD_PREFIX}logits"
        g.node.append(helper.make_node("Flatten", [logits], [flat], name=f"{HEAD_PREFIX}flatten", axis=1))
        logits, info["flattened"], changed = flat, True, True
    info["logits"] = logits
    if not changed:
        info["classes"] = _classes(model, logits)
        return model, info

    # the graph's one output is now `logits`; nodes feeding only the dropped outputs go
    out_vi = next((o for o in g.output if o.name == output), None)
    elem = out_vi.type.tensor_type.elem_type if out_vi is not None else onnx.TensorProto.FLOAT
    src = shapes.get(logits if not info["flattened"] else g.node[-1].input[0], ())
    batch = _batch_dim(model, out_vi)
    dims = [batch] + ([src[1]] if info["flattened"] else list(src[1:]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(logits, elem, dims))
    model = _drop_dead_nodes(model)
    info["classes"] = _classes(model, logits)
    return model, info


def _batch_dim(model: onnx.ModelProto, out_vi) -> str | int | None:
    if out_vi is not None and out_vi.type.tensor_type.shape.dim:
        d = out_vi.type.tensor_type.shape.dim[0]
        return d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
    return None


def _classes(model: onnx.ModelProto, logits: str) -> int:
    out = next(o for o in model.graph.output if o.name == logits)
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        raise FracgraphError(f"output {logits} has shape {shown}: it must be logits [batch, classes] with a static "
                             f"class count (a Softmax/LogSoftmax after them and trailing 1-dims are removed for you)")
    return dims[1].dim_value


def _drop_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx-graphsurgeon's cleanup: nodes and initializers that no graph output depends on are removed. The model
    keeps its IR version and metadata (graphsurgeon's export would write IR 10 and drop the metadata)."""
    import onnx_graphsurgeon as gs

    ir, meta = model.ir_version, [(p.key, p.value) for p in model.metadata_props]
    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = ir
    del out.metadata_props[:]
    for k, v in meta:
        out.metadata_props.add(key=k, value=v)
    return out


def restore_head(model: onnx.ModelProto, head: dict) -> None:
    """Put the cut Softmax/LogSoftmax back on an exported inference model's one output, under the original output's
    name (the logits stay [batch, classes] when they were flattened for the loss)."""
    out = model.graph.output[0]
    model.graph.node.append(helper.make_node(head["cut"], [out.name], [head["output"]], name=f"{HEAD_PREFIX}restore",
                                             axis=1))
    vi = helper.make_tensor_value_info(head["output"], out.type.tensor_type.elem_type, None)
    vi.type.tensor_type.shape.CopyFrom(out.type.tensor_type.shape)
    del model.graph.output[:]
    model.graph.output.append(vi)
