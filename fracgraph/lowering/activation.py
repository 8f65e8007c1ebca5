"""Activations without an onnxruntime-training 1.19.2 gradient, written with Relu/Clip/Exp/Log/Abs/Tanh/Mul/Div
(which have one). Each keeps the original's value everywhere; the gradients are those of the same formula."""

from __future__ import annotations

import onnx

from .base import Ctx, attrs, register


def _hard_sigmoid(ctx: Ctx, x: str, alpha: float, beta: float, out: str | None) -> str:
    ax = ctx.emit("Mul", [x, ctx.const("alpha", alpha)], "scale")
    axb = ctx.emit("Add", [ax, ctx.const("beta", beta)], "shift")
    return ctx.emit("Clip", [axb, ctx.const("zero", 0.0), ctx.const("one", 1.0)], "clip", out)


@register("HardSigmoid")
def hard_sigmoid(ctx: Ctx, node: onnx.NodeProto):
    """max(0, min(1, alpha * x + beta)) -> Clip(alpha * x + beta, 0, 1)."""
    a = attrs(node)
    _hard_sigmoid(ctx, node.input[0], a.get("alpha", 0.2), a.get("beta", 0.5), node.output[0])
    return ctx.nodes


@register("HardSwish")
def hard_swish(ctx: Ctx, node: onnx.NodeProto):
    """x * HardSigmoid(x; alpha=1/6, beta=0.5)."""
    x = node.input[0]
    hs = _hard_sigmoid(ctx, x, 1.0 / 6.0, 0.5, None)
    ctx.emit("Mul", [x, hs], "mul", node.output[0])
    return ctx.nodes


def _neg_part(ctx: Ctx, x: str, relu: str) -> str:
    """min(x, 0) = x - Relu(x)."""
    return ctx.emit("Sub", [x, relu], "neg_part")


@register("PRelu")
def prelu(ctx: Ctx, node: onnx.NodeProto):
    """Relu(x) + slope * min(x, 0); the slope stays input 1 of a Mul (a trainable parameter, as for PRelu)."""
    x, slope = node.input[0], node.input[1]
    r = ctx.emit("Relu", [x], "relu")
    neg = ctx.emit("Mul", [_neg_part(ctx, x, r), slope], "slope")
    ctx.emit("Add", [r, neg], "add", node.output[0])
    return ctx.nodes


def _elu(ctx: Ctx, x: str, alpha: float, inner_scale: float, out_scale: float, out: str) -> str:
    """out_scale * (Relu(x) + alpha * (exp(min(x, 0) * inner_scale) - 1)); exp of min(x, 0) never overflows."""
    r = ctx.emit("Relu", [x], "relu")
    neg = _neg_part(ctx, x, r)
    if inner_scale != 1.0:
        neg = ctx.emit("Mul", [neg, ctx.const("inner_scale", inner_scale)], "inner_scale")
    e = ctx.emit("Exp", [neg], "exp")
    em1 = ctx.emit("Sub", [e, ctx.const("one", 1.0)], "expm1")
    tail = ctx.emit("Mul", [em1, ctx.const("alpha", alpha)], "alpha")
    if out_scale == 1.0:
        return ctx.emit("Add", [r, tail], "add", out)
    s = ctx.emit("Add", [r, tail], "add")
    return ctx.emit("Mul", [s, ctx.const("gamma", out_scale)], "gamma", out)


@register("Elu")
def elu(ctx: Ctx, node: onnx.NodeProto):
    _elu(ctx, node.input[0], attrs(node).get("alpha", 1.0), 1.0, 1.0, node.output[0])
    return ctx.nodes


@register("Selu")
def selu(ctx: Ctx, node: onnx.NodeProto):
    a = attrs(node)
    _elu(ctx, node.input[0], a.get("alpha", 1.67326319217681884765625), 1.0, a.get("gamma", 1.05070102214813232421875),
         node.output[0])
    return ctx.nodes


@register("Celu")
def celu(ctx: Ctx, node: onnx.NodeProto):
    """max(0, x) + min(0, alpha * (exp(x / alpha) - 1)) = Relu(x) + alpha * (exp(min(x, 0) / alpha) - 1)."""
    alpha = attrs(node).get("alpha", 1.0)
    _elu(ctx, node.input[0], alpha, 1.0 / alpha, 1.0, node.output[0])
    return ctx.nodes


def _softplus(ctx: Ctx, x: str, out: str | None) -> str:
    """log(1 + exp(x)) = Relu(x) + log(1 + exp(-|x|)) (no overflow for large |x|)."""
    r = ctx.emit("Relu", [x], "sp_relu")
    ax = ctx.emit("Abs", [x], "sp_abs")
    e = ctx.emit("Exp", [ctx.emit("Neg", [ax], "sp_neg")], "sp_exp")
    lg = ctx.emit("Log", [ctx.emit("Add", [e, ctx.const("sp_one", 1.0)], "sp_add1")], "sp_log")
    return ctx.emit("Add", [r, lg], "softplus", out)


@register("Softplus")
def softplus(ctx: Ctx, node: onnx.NodeProto):
    _softplus(ctx, node.input[0], node.output[0])
    return ctx.nodes


@register("Mish")
def mish(ctx: Ctx, node: onnx.NodeProto):
    """x * tanh(softplus(x))."""
    x = node.input[0]
    t = ctx.emit("Tanh", [_softplus(ctx, x, None)], "tanh")
    ctx.emit("Mul", [x, t], "mul", node.output[0])
    return ctx.nodes


@register("Softsign")
def softsign(ctx: Ctx, node: onnx.NodeProto):
    """x / (1 + |x|)."""
    x = node.input[0]
    d = ctx.emit("Add", [ctx.emit("Abs", [x], "abs"), ctx.const("one", 1.0)], "add1")
    ctx.emit("Div", [x, d], "div", node.output[0])
    return ctx.nodes
