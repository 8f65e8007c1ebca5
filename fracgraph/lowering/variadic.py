"""Variadic element-wise ops as chains of binary ones. onnxruntime-training 1.19.2 has no gradient for Sum or Mean
at all; Max/Min have one (GetMinMaxGradient), lowered here only when they have other than two inputs so that
every instance is the two-input form that builder is written for."""

from __future__ import annotations

import onnx

from .base import Ctx, register

_BINARY = {"Sum": "Add", "Mean": "Add", "Max": "Max", "Min": "Min"}


@register("Sum", "Mean", "Max", "Min")
def variadic(ctx: Ctx, node: onnx.NodeProto):
    xs = [x for x in node.input]
    if node.op_type in ("Max", "Min") and len(xs) == 2:
        return "two inputs: onnxruntime differentiates it as it is"
    y = node.output[0]
    if len(xs) == 1:
        ctx.emit("Identity", xs, "identity", y)
        return ctx.nodes
    op = _BINARY[node.op_type]
    acc = xs[0]
    last = len(xs) - 1
    for i, x in enumerate(xs[1:], 1):
        final = i == last and node.op_type != "Mean"
        acc = ctx.emit(op, [acc, x], f"{op.lower()}{i}", y if final else None)
    if node.op_type == "Mean":
        ctx.emit("Mul", [acc, ctx.const("inv_n", 1.0 / len(xs))], "mean", y)
    return ctx.nodes
