"""Which ai.onnx ops onnxruntime-training 1.19.2 can differentiate, and the one-line refusal for those it cannot.

Sources: the gradient builder registry, `orttraining/orttraining/core/graph/gradient_builder_registry.cc` of
microsoft/onnxruntime (its REGISTER_GRADIENT_BUILDER list as stored at upstream commit cf87bac4 and in the fork
chxfly/onnxruntime-v1.31.1 at b6e76646; neither is the v1.19.2 tag), and, deciding, `bench/ort_gradient_probe.py`, which builds a one-op training graph for each candidate op with the
installed onnxruntime-training 1.19.2 and reports whether `generate_artifacts` succeeds and the training model then
loads (its output on 2026-11-30 decided every entry marked "probe" below; the ops in `LOWERINGS` are ones it shows
failing).
"""

from __future__ import annotations

import re

import onnx

from ..errors import FracgraphError

GRADIENT_OPS = frozenset({
    # registry (both commits)
    "Cast", "Sin", "Log", "Tanh", "Sqrt", "Erf", "MatMul", "Split", "Relu", "Pow", "ReduceMean", "ReduceSum",
    "ReduceLogSumExp", "ReduceL2", "Add", "Sub", "Mul", "Div", "Neg", "Concat", "Reshape", "Transpose", "Gemm",
    "MaxPool", "Gather", "Conv", "Squeeze", "Unsqueeze", "Sigmoid", "Softmax", "LogSoftmax", "SoftmaxCrossEntropyLoss",
    "GlobalAveragePool", "AveragePool", "Dropout", "GatherND", "GatherElements", "Gelu", "LayerNormalization",
    "BatchNormalization", "Slice", "Where", "Expand", "Exp", "Flatten", "TopK", "Clip", "Abs", "Min", "Max", "Tile",
    "Pad", "Identity", "ScatterND",
    # probe (onnxruntime-training 1.19.2): gradient built and its kernels load on the CPU build. Resize and
    # ConvTranspose are left out: their gradients build, but ResizeGrad/ConvTransposeGrad have no CPU kernel
    "LeakyRelu", "Reciprocal", "Cos",
    # fracgraph's own gradient definitions (build._register_gradients): STE Round, detached range statistics
    "Round", "ReduceMin", "ReduceMax",
})

# Ops whose outputs onnxruntime never differentiates through (non-float results or random draws): a node of these
# types on the path needs no gradient builder.
NO_GRADIENT_NEEDED = frozenset({"Shape", "Size", "RandomNormalLike", "RandomUniformLike", "EyeLike", "ConstantOfShape"})

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def nodes_needing_gradient(model: onnx.ModelProto, trainable: list[str], loss_inputs: list[str]) -> list[onnx.NodeProto]:
    """Nodes onnxruntime must differentiate: a float output on a path to `loss_inputs` and an input that depends on
    a trainable initializer. `model` must be shape-inferred (element types come from its value_info)."""
    types = _elem_types(model)
    live = set(trainable)
    for n in model.graph.node:   # topological order
        if any(x in live for x in n.input):
            live.update(o for o in n.output if types.get(o, onnx.TensorProto.FLOAT) in _FLOAT_TYPES)
    producer = {o: n for n in model.graph.node for o in n.output}
    reach, stack = set(), list(loss_inputs)
    while stack:
        t = stack.pop()
        if t in reach:
            continue
        reach.add(t)
        if t in producer:
            stack.extend(x for x in producer[t].input if x)
    return [n for n in model.graph.node
            if n.domain in ("", "ai.onnx") and any(o in live and o in reach for o in n.output)
            and any(x in live for x in n.input)]


def check_differentiable(model: onnx.ModelProto, trainable: list[str], loss_inputs: list[str]) -> None:
    """Refuse, in one line naming op and node, a node onnxruntime-training 1.19.2 has no gradient for."""
    from ..model import lowering_notes

    declined = {}
    for note in lowering_notes(model):   # "<node> (<op>) kept: <reason>"
        name, _, rest = note.partition(" (")
        if " kept: " in rest:
            declined[name] = rest.split(" kept: ", 1)[1]
    for n in nodes_needing_gradient(model, trainable, loss_inputs):
        if n.op_type not in GRADIENT_OPS and n.op_type not in NO_GRADIENT_NEEDED:
            raise FracgraphError(unsupported_message(n.op_type, n.name, declined.get(n.name)))


def unsupported_message(op_type: str, node: str, declined: str | None = None) -> str:
    why = (f"fracgraph could not lower it ({declined})" if declined else "fracgraph has no lowering for it")
    return (f"node {node} ({op_type}): onnxruntime-training 1.19.2 cannot differentiate {op_type} and {why}; "
            f"export the model with differentiable ops in its place, or keep {op_type} before the first trainable "
            f"layer (where no gradient is needed)")


_NOT_REGISTERED = re.compile(r"gradient builder has not been registered:\s*(\S+?)\s+for node\s+(\S+)")


def explain_build_error(e: BaseException) -> str:
    """One line for an exception of onnxruntime's artifact generation (its messages hold C++ paths and signatures)."""
    text = str(e)
    m = _NOT_REGISTERED.search(text)
    if m:
        return unsupported_message(m.group(1), m.group(2))
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    # "/onnxruntime_src/...cc:123 onnxruntime::...(args) <message>": keep the message after the C++ signature
    last = re.sub(r"^\S*onnxruntime_src/\S+:\d+\s+.*?\)\s+", "", last)
    return f"onnxruntime-training could not build the training graph: {last[:300]}"
