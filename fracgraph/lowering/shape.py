"""Data-movement ops whose onnxruntime-training 1.19.2 gradient builder needs an attribute or optional output the
op may omit."""

from __future__ import annotations

import onnx
import onnx.numpy_helper

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


@register("Dropout")
def dropout(ctx: Ctx, node: onnx.NodeProto):
    """Dropout without a `training_mode` input (or with a constant false one) is the identity in onnxruntime, but
    with a `ratio` input (what the opset converter writes for an old Dropout) its gradient builder reads the
    optional mask output, which inference exports omit (bench/ort_gradient_probe.py): Identity. A Dropout that
    does train gets its mask output named instead."""
    mode = node.input[2] if len(node.input) > 2 else ""
    inits = {t.name: t for t in ctx.model.graph.initializer}
    if not mode or (mode in inits and not onnx.numpy_helper.to_array(inits[mode]).any()):
        ctx.emit("Identity", [node.input[0]], "identity", node.output[0])
        return ctx.nodes
    if len(node.output) > 1 and node.output[1]:
        return "its mask output is present"
    ctx.emit("Dropout", list(node.input), "dropout", [node.output[0], ctx.name("mask")], **attrs(node))
    return ctx.nodes


@register("Resize")
def resize(ctx: Ctx, node: onnx.NodeProto):
    """Nearest-neighbour upsampling by integer factors (what Upsample becomes) -> Reshape, Expand, Reshape: each
    input element repeated s_h x s_w times (ExpandGrad sums them back; ResizeGrad has no CPU kernel).

    Taken only when onnxruntime's own Resize, run once at lowering time on an input of distinct values, gives
    exactly that repetition (coordinate modes and rounding rules included); otherwise the node is kept."""
    import numpy as np

    from .pool import _ort_run

    a = attrs(node)
    x, y = node.input[0], node.output[0]
    xs, ys = ctx.static(x), ctx.static(y)
    mode = a.get("mode", b"nearest")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "nearest":
        return "only nearest-neighbour resizing is lowered"
    if xs is None or ys is None or len(xs) != len(ys) or len(xs) < 3:
        return f"input/output shapes {ctx.shape(x)} -> {ctx.shape(y)} are not static"
    if xs[:2] != ys[:2] or any(o % i for i, o in zip(xs[2:], ys[2:])):
        return f"{list(xs[1:])} -> {list(ys[1:])} is not an integer upsampling of the spatial axes"
    factors = [o // i for i, o in zip(xs[2:], ys[2:])]
    spatial = list(xs[2:])
    inits = [onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name)
             for t in ctx.model.graph.initializer if t.name in node.input[1:3]]
    probe_in = ["xi"] + list(node.input[1:3])
    if len(node.input) > 3 and node.input[3]:   # sizes: the probe runs one sample of one channel
        inits.append(onnx.numpy_helper.from_array(np.array([1, 1] + list(ys[2:]), np.int64), "probe_sizes"))
        probe_in.append("probe_sizes")
    idx = np.arange(int(np.prod(spatial)), dtype=np.float32).reshape([1, 1] + spatial)
    try:
        (got,) = _ort_run([onnx.helper.make_node("Mul", ["x", "idx"], ["xi"]),
                           onnx.helper.make_node("Resize", probe_in, ["r"], **a)],
                          [1, 1] + spatial, ["r"], ctx.opset, inits + [onnx.numpy_helper.from_array(idx, "idx")])
    except Exception as e:   # sizes/scales computed at run time
        return f"its scales are not constants ({type(e).__name__})"
    want = idx
    for ax, f in enumerate(factors, 2):
        want = np.repeat(want, f, axis=ax)
    if got.shape != want.shape or not np.array_equal(got, want):
        return "its coordinate mode does not repeat each element (not a plain integer upsampling)"
    inter = [0, xs[1]] + [d for s in spatial for d in (s, 1)]
    expand = [1, xs[1]] + [d for s, f in zip(spatial, factors) for d in (s, f)]
    r = ctx.emit("Reshape", [x, ctx.const("interleave", inter, np.int64)], "interleave")
    # Expand to the repeated shape; the batch comes from the input's shape (dim 0), the rest is static
    batch = ctx.emit("Slice", [ctx.emit("Shape", [x], "shape"), ctx.const("zero", [0], np.int64),
                               ctx.const("one", [1], np.int64)], "batch")
    shape = ctx.emit("Concat", [batch, ctx.const("rest", expand[1:], np.int64)], "expand_shape", axis=0)
    e = ctx.emit("Expand", [r, shape], "repeat")
    ctx.emit("Reshape", [e, ctx.const("merge", [0, xs[1]] + [s * f for s, f in zip(spatial, factors)], np.int64)],
             "merge", y)
    return ctx.nodes
