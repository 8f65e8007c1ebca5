"""Normalizations: LRN (no gradient in onnxruntime-training 1.19.2), LayerNormalization (its gradient builder needs
the optional Mean/InvStdDev outputs), InstanceNormalization (no gradient)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .base import Ctx, attrs, register


@register("LRN")
def lrn(ctx: Ctx, node: onnx.NodeProto):
    """y = x / (bias + alpha / size * S)^beta, S[c] = sum of x[i]^2 over the channel window
    i in [c - floor((size-1)/2), c + ceil((size-1)/2)] (ONNX's definition).

    S is a 2-D Conv of x^2 seen as [N, 1, C, rest] with a constant [size, 1] window of ones, zero-padded along C by
    floor/ceil((size-1)/2), so that out-of-range channels add nothing."""
    x, y = node.input[0], node.output[0]
    xs = ctx.static(x)
    if xs is None or len(xs) < 2:
        return f"input shape {ctx.shape(x)} has no static channel count"
    a = attrs(node)
    size = int(a["size"])
    alpha, beta, bias = a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
    c = xs[1]
    sq = ctx.emit("Mul", [x, x], "square")
    flat = ctx.emit("Reshape", [sq, ctx.const("channels_as_rows", [0, 1, c, -1], np.int64)], "channels_as_rows")
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    s = ctx.emit("Conv", [flat, ctx.const("window", np.ones([1, 1, size, 1], np.float32))], "window_sum",
                 kernel_shape=[size, 1], pads=[lo, 0, hi, 0])
    s = ctx.emit("Reshape", [s, ctx.emit("Shape", [x], "shape")], "back")
    d = ctx.emit("Add", [ctx.emit("Mul", [s, ctx.const("alpha_over_size", alpha / size)], "scale"),
                         ctx.const("bias", bias)], "bias")
    d = ctx.emit("Pow", [d, ctx.const("beta", beta)], "pow")
    ctx.emit("Div", [x, d], "div", y)
    return ctx.nodes


@register("LayerNormalization")
def layer_norm(ctx: Ctx, node: onnx.NodeProto):
    """The same op with its optional Mean and InvStdDev outputs named (onnxruntime's LayerNormalizationGrad reads
    them; without them the gradient builder fails)."""
    outs = list(node.output) + [""] * (3 - len(node.output))
    if all(outs):
        return "its Mean/InvStdDev outputs are present"
    outs = [outs[0], outs[1] or ctx.name("mean"), outs[2] or ctx.name("inv_std_dev")]
    ctx.emit("LayerNormalization", list(node.input), "layer_norm", outs, **attrs(node))
    return ctx.nodes


@register("InstanceNormalization")
def instance_norm(ctx: Ctx, node: onnx.NodeProto):
    """scale[c] * (x - mean) / sqrt(var + epsilon) + B[c], mean and (biased) var over the spatial axes of each
    (sample, channel). scale and B are reshaped in place to [C, 1, ...] (they stay trainable Mul/Add operands)."""
    x, scale, bias = node.input
    xs = ctx.static(x)
    inits = {t.name: t for t in ctx.model.graph.initializer}
    users = [n for n in ctx.model.graph.node for i in n.input if i in (scale, bias)]
    if xs is None or len(xs) < 3:
        return f"input shape {ctx.shape(x)} is not static"
    if scale not in inits or bias not in inits or len(users) != 2:
        return "its scale and bias are not initializers used by this node alone"
    for name in (scale, bias):
        t = inits[name]
        arr = numpy_helper.to_array(t).reshape([-1] + [1] * (len(xs) - 2))
        t.CopyFrom(numpy_helper.from_array(arr, name))
    eps = attrs(node).get("epsilon", 1e-5)
    axes = list(range(2, len(xs)))
    mean = ctx.axes_input_op("ReduceMean", x, axes, "mean", keepdims=1)
    d = ctx.emit("Sub", [x, mean], "center")
    var = ctx.axes_input_op("ReduceMean", ctx.emit("Mul", [d, d], "square"), axes, "var", keepdims=1)
    std = ctx.emit("Sqrt", [ctx.emit("Add", [var, ctx.const("epsilon", eps)], "var_eps")], "std")
    xhat = ctx.emit("Div", [d, std], "normalize")
    ctx.emit("Add", [ctx.emit("Mul", [xhat, scale], "scale"), bias], "shift", node.output[0])
    return ctx.nodes
