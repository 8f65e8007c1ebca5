"""Data-movement ops whose onnxruntime-training 1.19.2 gradient builder needs an attribute the op may omit."""

from __future__ import annotations

import onnx

from .base import Ctx, attrs, register


@register("Transpose")
def transpose(ctx: Ctx, node: onnx.NodeProto):
    """Transpose without `perm` (reverse the axes): the same with `perm` written out (TransposeGrad reads it)."""
    if "perm" in attrs(node):
        return "perm is given"
    rank = len(ctx.shape(node.input[0]))
    if not rank:
        return "the input rank is unknown"
    ctx.emit("Transpose", [node.input[0]], "transpose", node.output[0], perm=list(reversed(range(rank))))
    return ctx.nodes
