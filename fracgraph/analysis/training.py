"""The op list of one training step, derived read-only from a forward ONNX graph (spec hwmodels.md §4).

Each Conv/Gemm/MatMul becomes three GEMMs: forward (act x weight), error (grad x weight; a strided conv's error
is split into stride^2 sub-convolutions, 'ideal', or zero-inserted, 'naive'; skipped when the input is graph
data) and weight gradient in GEMM form (act x grad; reduction N*P*Q). A MatMul of two activations (attention's
QK^T and attention x V) has both operands at the act bits, and its two backward GEMMs are both error GEMMs:
dA = dY B^T (grad x act, phase bw_data) and dB = A^T dY (act x grad, phase bw_weight, no optimizer update). BN, activations, pooling and elementwise
ops are memory-bound ops (forward and backward), the optimizer update reads and writes FP32 master weights.
The ops form a networkx DAG (forward dataflow, loss, backward dataflow reversed, updates after their weight
gradient); a step runs them sequentially (FracTrain's assumption) or overlapped along the critical path.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import prod

import networkx as nx
import onnx

from ..hwmodels.base import ConvOp, MemOp
from .optable import GEMM_OPS, GemmOp, gemm_table, value_shapes

COLS = {"act": 0, "weight": 1, "grad": 2}
FP32 = 32


@dataclass(frozen=True)
class StepOp:
    """One op of a training step. GEMM ops carry a ConvOp whose bits are filled in per precision setting."""

    id: int
    name: str
    layer: str                 # the forward node it derives from ("" for the loss)
    phase: str                 # fw | bw_data | bw_weight | update | loss
    kind: str                  # gemm | mem
    convs: tuple = ()          # ConvOps (bits placeholder) for a GEMM op; several for a split error conv
    mem: MemOp | None = None
    operands: tuple = ()       # precision columns of the two operands, e.g. ("grad", "weight")
    block: int | None = None   # row of the precision input; None = FP32

    @property
    def macs(self) -> int:
        return sum(c.macs for c in self.convs)


@dataclass
class TrainingStep:
    ops: list[StepOp]
    graph: nx.DiGraph
    batch: int
    n_blocks: int
    layers: list[str] = field(default_factory=list)          # GEMM layers in graph order

    def gemm_ops(self):
        return [o for o in self.ops if o.kind == "gemm"]

    def topo(self) -> list[int]:
        return list(nx.topological_sort(self.graph))


# -- memory-bound ops: per-op registry --------------------------------------------------------------------------

def _elems(shapes, name, batch):
    s = shapes.get(name, ())
    if not s or any(d is None for d in s[1:]):
        return 0
    return batch * prod(s[1:]) if len(s) > 1 else (s[0] or 1)


def _eltwise(node, shapes, batch):
    """Forward reads every input and writes the output; backward reads dY (+ saved inputs), writes each dX."""
    ins = sum(_elems(shapes, i, batch) for i in node.input if i)
    out = sum(_elems(shapes, o, batch) for o in node.output[:1])
    return (ins, out), (out + ins, ins)


def _unary(node, shapes, batch):
    x = _elems(shapes, node.input[0], batch)
    y = _elems(shapes, node.output[0], batch)
    return (x, y), (y + x, x)


def _bn(node, shapes, batch):
    x = _elems(shapes, node.input[0], batch)
    return (x, x), (2 * x, x)          # backward: dY and X (for the statistics' gradient), writes dX


def _pool(node, shapes, batch):
    x = _elems(shapes, node.input[0], batch)
    y = _elems(shapes, node.output[0], batch)
    return (x, y), (y + (x if node.op_type == "MaxPool" else 0), x)


MEM_OPS = {
    **{t: _unary for t in ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Softplus", "Gelu",
                           "HardSigmoid", "HardSwish", "Erf", "Softmax", "LogSoftmax", "Dropout", "Sqrt",
                           "Reciprocal", "Exp", "Neg")},
    **{t: _eltwise for t in ("Add", "Sub", "Mul", "Div", "Sum", "Concat", "Pow", "Where")},
    "BatchNormalization": _bn,
    "LayerNormalization": _bn,
    "InstanceNormalization": _bn,
    **{t: _pool for t in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean")},
}


# -- GEMM lowering -----------------------------------------------------------------------------------------------

def lower_gemm(g: GemmOp, batch: int, strided_bw: str = "ideal"):
    """(fw, error, weight-gradient) ConvOp lists of one GEMM layer; bits are placeholders."""
    G = g.groups
    C, K = g.in_channels // G, g.out_channels // G
    R, S = g.kernel
    P, Q = g.out_hw
    H, W = g.in_hw
    if g.op_type == "Conv":
        s = g.stride[0]
        fw = [ConvOp(ic=C, oc=K, batch=batch, kh=R, kw=S, oh=P, ow=Q, stride=s, repeat=G)]
        sh, sw = g.stride
        if sh == 1 and sw == 1:
            err = [ConvOp(ic=K, oc=C, batch=batch, kh=R, kw=S, oh=H, ow=W, repeat=G)]
        elif strided_bw == "naive":      # zero-insert dY: stride^2 x the MACs
            err = [ConvOp(ic=K, oc=C, batch=batch, kh=R, kw=S, oh=H, ow=W, repeat=G)]
        else:                            # s^2 sub-convolutions, kernel ceil((R-i)/s) x ceil((S-j)/s), output P x Q
            count: dict[tuple, int] = {}
            for i in range(sh):
                for j in range(sw):
                    kh, kw = -(-(R - i) // sh), -(-(S - j) // sw)
                    if kh > 0 and kw > 0:
                        count[(kh, kw)] = count.get((kh, kw), 0) + 1
            err = [ConvOp(ic=K, oc=C, batch=batch, kh=kh, kw=kw, oh=P, ow=Q, repeat=G * n)
                   for (kh, kw), n in sorted(count.items())]
        wg = [ConvOp(ic=batch * P * Q, oc=K, batch=C * R * S, repeat=G)]
    else:                                # Gemm / MatMul: rows = P per sample
        rows = batch * P * Q
        fw = [ConvOp(ic=C, oc=K, batch=rows)]
        err = [ConvOp(ic=K, oc=C, batch=rows)]
        wg = [ConvOp(ic=rows, oc=K, batch=C)]
    return fw, err, wg


# -- the step ----------------------------------------------------------------------------------------------------

def training_step(model: onnx.ModelProto, batch: int, op_block: dict[str, int | None] | None = None,
                  n_blocks: int = 1, gemms: list[GemmOp] | None = None, strided_bw: str = "ideal",
                  mem_bits: int = 32, optimizer_words: int = 5, skip_nodes=lambda n: False) -> TrainingStep:
    """Build the op list and DAG of one training step of a (shape-inferred) forward graph.

    `op_block` maps GEMM node name -> precision row (None = FP32); by default every GEMM reads row 0.
    `mem_bits` is the width of data that memory-bound ops move; `optimizer_words` the FP32 words per weight an
    update moves (5 = momentum SGD: read W, dW, v; write W, v).
    """
    shapes = value_shapes(model)
    gemms = {g.name: g for g in (gemms if gemms is not None else gemm_table(model))}
    params = {i.name for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input} - params
    ops: list[StepOp] = []
    dag = nx.DiGraph()

    def add(**kw) -> int:
        op = StepOp(id=len(ops), **kw)
        ops.append(op)
        dag.add_node(op.id)
        return op.id

    def link(deps, i):
        for d in deps:
            dag.add_edge(d, i)

    nodes = list(model.graph.node)       # skipped nodes (added by passes) only pass dependencies through
    ready: dict[str, set] = {}
    fw_of: dict[str, int] = {}
    layer_order = []
    for n in nodes:
        deps = set().union(*[ready.get(i, set()) for i in n.input if i])
        if skip_nodes(n):
            for o in n.output:
                ready[o] = deps
            continue
        if n.name in gemms:
            g = gemms[n.name]
            blk = (op_block or {}).get(n.name, 0) if op_block is not None else 0
            fw, _, _ = lower_gemm(g, batch, strided_bw)
            if g.act in inputs and g.op_type == "Conv":     # Bit-Fusion lowers the data-input layer with im2col
                fw = [replace(c, im2col=True) for c in fw]
            # an activation x activation GEMM (attention's QK^T, AV) quantizes both operands at the act bits
            right = "weight" if g.weight_is_param else "act"
            i = add(name=f"{n.name}/fw", layer=n.name, phase="fw", kind="gemm", convs=tuple(fw),
                    operands=("act", right), block=blk)
            layer_order.append(n.name)
        elif n.op_type in MEM_OPS:
            (r, w), _ = MEM_OPS[n.op_type](n, shapes, batch)
            i = add(name=f"{n.name}/fw", layer=n.name, phase="fw", kind="mem", mem=MemOp(r * mem_bits, w * mem_bits))
        else:
            for o in n.output:
                ready[o] = deps
            continue
        link(deps, i)
        fw_of[n.name] = i
        for o in n.output:
            ready[o] = {i}
    outs = [o.name for o in model.graph.output]
    logits = sum(_elems(shapes, o, batch) for o in outs)
    loss = add(name="loss", layer="", phase="loss", kind="mem", mem=MemOp(2 * logits * mem_bits, logits * mem_bits))
    link(set().union(*[ready.get(o, set()) for o in outs]), loss)

    gready: dict[str, set] = {o: {loss} for o in outs}
    for n in reversed(nodes):
        gin = set().union(*[gready.get(o, set()) for o in n.output])
        if not gin:
            continue                                   # nothing downstream needs a gradient through this node
        if skip_nodes(n):
            for x in n.input:
                if x and x not in params and x not in inputs:
                    gready.setdefault(x, set()).update(gin)
            continue
        if n.name in gemms:
            g = gemms[n.name]
            blk = (op_block or {}).get(n.name, 0) if op_block is not None else 0
            _, err, wg = lower_gemm(g, batch, strided_bw)
            if g.act not in inputs and g.act not in params:
                i = add(name=f"{n.name}/bw_data", layer=n.name, phase="bw_data", kind="gemm", convs=tuple(err),
                        operands=("grad", "weight" if g.weight_is_param else "act"), block=blk)
                link(gin, i)
                gready.setdefault(g.act, set()).add(i)
            if g.weight_is_param or g.weight not in inputs:
                j = add(name=f"{n.name}/bw_weight", layer=n.name, phase="bw_weight", kind="gemm", convs=tuple(wg),
                        operands=("act", "grad"), block=blk)
                link(gin, j)
                if g.weight_is_param:
                    nw = prod(g.weight_shape) if g.weight_shape else g.in_channels * g.out_channels
                    u = add(name=f"{n.name}/update", layer=n.name, phase="update", kind="mem",
                            mem=MemOp((optimizer_words + 1) // 2 * nw * 32, optimizer_words // 2 * nw * 32))
                    link({j}, u)
                else:
                    gready.setdefault(g.weight, set()).add(j)
        elif n.op_type in MEM_OPS:
            _, (r, w) = MEM_OPS[n.op_type](n, shapes, batch)
            i = add(name=f"{n.name}/bw", layer=n.name, phase="bw", kind="mem", mem=MemOp(r * mem_bits, w * mem_bits))
            link(gin, i)
            for x in n.input:
                if x and x not in params and x not in inputs:
                    gready.setdefault(x, set()).add(i)
        else:
            for x in n.input:
                if x and x not in params and x not in inputs:
                    gready.setdefault(x, set()).update(gin)
    return TrainingStep(ops=ops, graph=dag, batch=batch, n_blocks=n_blocks, layers=layer_order)


def is_gemm_node(node: onnx.NodeProto) -> bool:
    return node.op_type in GEMM_OPS
