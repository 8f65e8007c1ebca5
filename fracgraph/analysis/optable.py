"""The GEMM op table: every Conv/Gemm/MatMul of a shape-inferred model with its loop bounds and MACs.

Both `quantize` (to place quant points and write the manifest) and `estimate` (to cost a training step)
read this one table, so the two never disagree about what a layer is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx
from onnx import numpy_helper

GEMM_OPS = ("Conv", "Gemm", "MatMul")
# Nodes a lowering created (fracgraph/lowering: e.g. an AveragePool as a depthwise Conv with a constant 1/k weight):
# they are not layers of the model, so they stay FP32 and out of the op table, the MAC count and `inspect`.
LOWERED_PREFIX = "fg::lower/"


@dataclass(frozen=True)
class GemmOp:
    """One forward GEMM-like op, as loop bounds per sample (the batch is a run-time choice).

    A Conv is (K out channels) x (C/groups in channels x kh x kw) x (oh x ow positions). A Gemm or MatMul is
    expressed the same way with a 1x1 kernel: C = reduction length, K = output features, oh*ow = rows per sample.
    """

    name: str
    op_type: str
    act: str                      # activation (left) operand tensor
    weight: str                   # weight (right) operand tensor
    output: str
    weight_is_param: bool         # the weight operand is an initializer (trainable), not an activation
    in_channels: int              # C
    out_channels: int             # K
    groups: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)   # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    act_shape: tuple = field(default=())
    weight_shape: tuple = field(default=())
    out_shape: tuple = field(default=())

    @property
    def macs(self) -> int:
        """Forward MACs per sample."""
        kh, kw = self.kernel
        oh, ow = self.out_hw
        return self.out_channels * oh * ow * (self.in_channels // self.groups) * kh * kw

    def to_dict(self) -> dict:
        d = asdict(self)
        d["macs"] = self.macs
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GemmOp":
        keys = {f for f in cls.__dataclass_fields__}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in keys}
        return cls(**kw)


def _shape(vi: onnx.ValueInfoProto | None) -> tuple:
    """Static shape of a value; a symbolic or unknown dimension becomes None."""
    if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return ()
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)


def value_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Name -> static shape for every inputs, outputs, value_info and initializer of the main graph."""
    g = model.graph
    shapes: dict[str, tuple] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shapes[vi.name] = _shape(vi)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _conv(node, shapes, params) -> GemmOp | None:
    x, w = node.input[0], node.input[1]
    xs, ws, ys = shapes.get(x, ()), shapes.get(w, ()), shapes.get(node.output[0], ())
    if len(ws) != 4 or len(xs) != 4 or len(ys) != 4 or None in ws or None in xs[1:] or None in ys[1:]:
        return None  # only 2-D convolutions with known shapes are GEMM-costed
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    return GemmOp(
        name=node.name, op_type="Conv", act=x, weight=w, output=node.output[0], weight_is_param=w in params,
        in_channels=xs[1], out_channels=ws[0], groups=int(_attr(node, "group", 1)),
        kernel=(ws[2], ws[3]), stride=tuple(_attr(node, "strides", [1, 1])),
        padding=(pads[0], pads[1], pads[2], pads[3]), dilation=tuple(_attr(node, "dilations", [1, 1])),
        in_hw=(xs[2], xs[3]), out_hw=(ys[2], ys[3]), act_shape=xs, weight_shape=ws, out_shape=ys,
    )


def _gemm(node, shapes, params) -> GemmOp | None:
    a, b = node.input[0], node.input[1]
    as_, bs, ys = shapes.get(a, ()), shapes.get(b, ()), shapes.get(node.output[0], ())
    if node.op_type == "Gemm":
        if len(as_) != 2 or len(bs) != 2 or None in bs or as_[1 - int(_attr(node, "transA", 0))] is None:
            return None
        k = as_[0] if _attr(node, "transA", 0) else as_[1]
        n = bs[0] if _attr(node, "transB", 0) else bs[1]
        rows = 1
    else:  # MatMul [..., M, K] x [..., K, N]: rows per sample = every output element but the batch and N
        # an activation right operand (attention's QK^T and AV) may carry the symbolic batch in front
        b_static = bs if b in params or len(bs) < 3 else bs[1:]
        if len(as_) < 2 or len(bs) < 1 or None in b_static or None in as_[1:]:
            return None
        k = as_[-1]
        n = bs[-1] if len(bs) > 1 else 1
        if len(ys) >= 2 and None not in ys[1:-1]:
            rows = _prod(ys[1:-1])
        else:
            rows = _prod(as_[1:-1])
    return GemmOp(
        name=node.name, op_type=node.op_type, act=a, weight=b, output=node.output[0], weight_is_param=b in params,
        in_channels=int(k), out_channels=int(n), out_hw=(int(rows), 1), in_hw=(int(rows), 1),
        act_shape=as_, weight_shape=bs, out_shape=ys,
    )


def gemm_table(model: onnx.ModelProto) -> list[GemmOp]:
    """Every costable Conv/Gemm/MatMul with float operands, in graph order. `model` must be shape-inferred."""
    shapes = value_shapes(model)
    params = {i.name for i in model.graph.initializer}
    ops = []
    for node in model.graph.node:
        if node.name.startswith(LOWERED_PREFIX):
            continue
        if node.op_type == "Conv":
            op = _conv(node, shapes, params)
        elif node.op_type in ("Gemm", "MatMul"):
            op = _gemm(node, shapes, params)
        else:
            continue
        if op is not None:
            ops.append(op)
    return ops


_GEMM_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def uncosted_gemms(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(node, op type, why) for every GEMM-like node `gemm_table` leaves out; they run FP32 and uncosted.

    Listing them keeps the "every layer decision has a reason" promise for layers fracgraph cannot handle yet.
    """
    costed = {op.name for op in gemm_table(model)}
    shapes = value_shapes(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in _GEMM_TYPES or node.name in costed or node.name.startswith(LOWERED_PREFIX):
            continue
        if node.op_type == "ConvTranspose":
            why = "ConvTranspose is not quantized or costed yet"
        elif node.op_type == "Conv" and len(shapes.get(node.input[1], ())) not in (0, 4):
            why = f"only 2-D convolutions are quantized (weight rank {len(shapes[node.input[1]])})"
        else:
            why = "operand or output shapes are not static after shape inference"
        out.append((node.name, node.op_type, f"kept FP32: {why}"))
    return out


def initializer_array(model: onnx.ModelProto, name: str):
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)
