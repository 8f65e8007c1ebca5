"""Pools. onnxruntime-training 1.19.2's AveragePoolGrad returns an empty (batch-0) gradient (seen with a CIFAR ResNet's
AvgPool(8) and DenseNet's 2x2/stride-2 transition pools), and GlobalMaxPool has no gradient at all."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

from .base import Ctx, attrs, register


def _pad_pairs(a: dict, spatial: list[int], kernel: list[int], strides: list[int], dil: list[int]) -> list[list[int]]:
    """[[begin, end]] per spatial axis from explicit pads or auto_pad (ONNX's SAME_UPPER/SAME_LOWER/VALID rules)."""
    n = len(spatial)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for h, k, s, d in zip(spatial, kernel, strides, dil):
            o = -(-h // s)
            total = max((o - 1) * s + (k - 1) * d + 1 - h, 0)
            small, big = total // 2, total - total // 2
            out.append([small, big] if auto == "SAME_UPPER" else [big, small])
        return out
    if auto == "VALID":
        return [[0, 0] for _ in range(n)]
    pads = list(a.get("pads", [0] * (2 * n)))
    return [[pads[i], pads[i + n]] for i in range(n)]


def _ort_run(nodes: list[onnx.NodeProto], x_shape: list[int], outs: list[str], opset: int, inits=()) -> list[np.ndarray]:
    """Run `nodes` with onnxruntime on an all-ones input `x`."""
    import onnxruntime as ort

    g = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outs], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outs, {"x": np.ones(x_shape, np.float32)})


@register("AveragePool")
def average_pool(ctx: Ctx, node: onnx.NodeProto):
    """AveragePool -> GlobalAveragePool when the window is the whole (unpadded) input, else a depthwise Conv with a
    constant weight (sum over the window) times a constant divisor map.

    The divisor map is onnxruntime's own: AveragePool and the window-sum Conv both run once on an all-ones input at
    lowering time, and map = pool(ones) / sum(ones), so pads, strides, dilations, ceil_mode and count_include_pad
    mean exactly what they mean to onnxruntime's forward kernel. A uniform map (no padding effects) folds into
    the weight (1/k). With spatial dims known only at run time (PyTorch's LRN export pools a reshaped tensor), a pool
    without padding or rounding up has whole windows everywhere: the 1/k conv alone."""
    x, y = node.input[0], node.output[0]
    xs = ctx.shape(x)
    if len(xs) < 3 or xs[1] is None:
        return f"input shape {xs} has no static channel count"
    a = attrs(node)
    c = xs[1]
    kernel = list(a["kernel_shape"])
    strides = list(a.get("strides", [1] * len(kernel)))
    dil = list(a.get("dilations", [1] * len(kernel)))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if None in xs[2:]:
        # spatial size known only at run time: every window is whole only without padding and ceil_mode
        if any(a.get("pads", [])) or auto not in ("NOTSET", "VALID") or (a.get("ceil_mode", 0) and max(strides) > 1):
            return f"input shape {xs} is not static and the pool pads or rounds up"
        w = np.full([c, 1] + kernel, 1.0 / float(np.prod(kernel)), np.float32)
        ctx.emit("Conv", [x, ctx.const("window", w)], "window_mean", y, group=c, kernel_shape=kernel, strides=strides,
                 dilations=dil)
        return ctx.nodes
    spatial = list(xs[2:])
    pads = _pad_pairs(a, spatial, kernel, strides, dil)
    if kernel == spatial and not any(p for pr in pads for p in pr) and all(d == 1 for d in dil):
        ctx.emit("GlobalAveragePool", [x], "gap", y)
        return ctx.nodes
    # end pads widened so the conv has the pool's output size (ceil_mode adds a partial window at the end)
    n = len(spatial)
    (pooled,) = _ort_run([helper.make_node("AveragePool", ["x"], ["p"], **a)], [1, 1] + spatial, ["p"], ctx.opset)
    osz = list(pooled.shape[2:])
    conv_pads = [[b, max(e, (o - 1) * s + (k - 1) * d + 1 - h - b)]
                 for (b, e), o, s, k, d, h in zip(pads, osz, strides, kernel, dil, spatial)]
    conv_attrs = dict(kernel_shape=kernel, strides=strides, dilations=dil,
                      pads=[p[0] for p in conv_pads] + [p[1] for p in conv_pads])
    # how many input elements (not padding) each window covers: the conv of ones by ones
    ones = onnx.numpy_helper.from_array(np.ones([1, 1] + kernel, np.float32), "w")
    (count,) = _ort_run([helper.make_node("Conv", ["x", "w"], ["c"], **conv_attrs)], [1, 1] + spatial, ["c"],
                        ctx.opset, [ones])
    if list(count.shape[2:]) != osz:
        return f"cannot match the pool's output size {osz} with a convolution (got {list(count.shape[2:])})"
    scale = np.where(count > 0, pooled / np.maximum(count, 1), 0.0).astype(np.float32)
    uniform = np.allclose(scale, scale.flat[0], rtol=1e-6, atol=0)
    w = np.full([c, 1] + kernel, scale.flat[0] if uniform else 1.0, np.float32)
    s = ctx.emit("Conv", [x, ctx.const("window", w)], "window_sum" if not uniform else "window_mean",
                 None if not uniform else y, group=c, **conv_attrs)
    if not uniform:
        ctx.emit("Mul", [s, ctx.const("divisor", scale.reshape([1, 1] + osz))], "divide", y)
    return ctx.nodes


@register("GlobalMaxPool")
def global_max_pool(ctx: Ctx, node: onnx.NodeProto):
    """GlobalMaxPool -> MaxPool with the whole spatial extent as its window (MaxPool has a gradient)."""
    xs = ctx.static(node.input[0])
    if xs is None or len(xs) < 3:
        return f"input shape {ctx.shape(node.input[0])} is not static"
    ctx.emit("MaxPool", [node.input[0]], "max", node.output[0], kernel_shape=list(xs[2:]))
    return ctx.nodes
