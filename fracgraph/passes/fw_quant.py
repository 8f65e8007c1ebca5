"""Insert forward (FW) quant points on both operands of every quantized Conv/Gemm/MatMul.

Activations: per-tensor min/max of the current batch, nearest rounding (spec §1.2); each gets two frozen
scalar buffers (`<point>.run_min`, `<point>.run_range`) that training keeps as an EMA and evaluation uses.
Weights: per-output-channel min/max, nearest rounding. Each point reads its bits from the precision input
row of its block: the act column for activations, the weight column for weights.

A tensor read by several quantized GEMMs (Inception branches, a SqueezeNet fire module's expand convs, a residual
block's conv1 and downsample conv) has one range: one batch min/max, one EMA running range (one manifest point,
named after its first reader) and one `x - min`. Its readers are quantized at the act bits of their own block,
as FracTrain's per-block precision says: readers in one block share one quantizer; a reader in another block
(or another DFQ candidate) gets its own quantizer at its block's bits against the shared range (`readers`,
`range_owner`). Emitting the range once matters beyond economy: onnxruntime's common-subexpression elimination
merges identical ReduceMin/ReduceMax/Sub nodes of one tensor when it builds the artifacts, which would leave the
EMA update and the speed passes reading a tensor name that no longer exists.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..manifest import QuantPoint
from ..quantizers import Emitter, bits_scalar, fake_quant, quantize_with_range
from .base import Pass, PassResult, node_by_name, opset


def weight_channel_axes(op_type: str, rank: int, trans_b: int) -> list[int]:
    """The axes to reduce so that one range remains per output channel."""
    if op_type in ("Conv", "Gather"):   # Gather: an embedding table [V, C], one range per row (token)
        return list(range(1, rank))
    if op_type == "Gemm":
        return [1] if trans_b else [0]
    return [rank - 2] if rank >= 2 else [0]   # MatMul [.., K, N]: one range per output column


class FwQuantPass(Pass):
    name = "fw-quant"

    def __init__(self, plan: list[tuple[dict, int]], precision_input: str, tables: list[dict] = ()):
        self.plan = plan                      # (GemmOp dict, block index) for every quantized GEMM
        self.tables = list(tables)            # embedding tables to quantize per row (build.embedding_tables)
        self.precision_input = precision_input
        self.points: list[QuantPoint] = []       # the manifest's points: one act point per tensor (it owns the range)
        self.readers: list[QuantPoint] = []      # further act quantizers of a tensor at other bits (no range of their own)
        self.range_owner: dict[str, str] = {}    # reader prefix -> the point whose range it reads

    def requires(self, model):
        names = {i.name for i in model.graph.input}
        assert self.precision_input in names, f"precision input {self.precision_input} missing"

    def call(self, model):
        em = Emitter(model.graph, opset(model))
        nodes = node_by_name(model)
        inits = {t.name: t for t in model.graph.initializer}
        notes = []
        shared: dict[tuple, str] = {}             # (activation, bits key) / (weight, block) -> its quantized tensor
        ranges: dict[str, dict] = {}              # activation -> its range tensors and the point that owns them
        for op, block in self.plan:
            node = nodes[op["name"]]
            key = op.get("bits_key", block)       # DFQ candidates: the clone's own bits (passes/dfq_candidates.py)
            # activation operand (and a second activation operand, e.g. attention's MatMul)
            operands = [(0, "act")] + [(1, "weight" if op["weight_is_param"] else "act")]
            for idx, kind in operands:
                x = node.input[idx]
                prefix = f"{node.name}::fq_{'w' if kind == 'weight' else 'a'}{idx}"
                out = f"{prefix}/out"
                if kind == "weight" and (x, block) in shared:   # DFQ candidates: one weight quantizer per block
                    out = shared[(x, block)]
                elif kind == "weight":
                    shared[(x, block)] = out
                    rank = len(inits[x].dims)
                    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                    axes = weight_channel_axes(node.op_type, rank, trans_b)
                    fake_quant(em, x, out, prefix, bits_scalar(em, self.precision_input, block, "weight"), axes=axes)
                    self.points.append(QuantPoint(prefix, "weight", x, node.name, block, "per_channel", "nearest"))
                elif (x, key) in shared:
                    # same tensor, same bits (e.g. a block's conv1 and its downsample conv): one quantizer,
                    # which is also what ORT's common-subexpression elimination would leave
                    out = shared[(x, key)]
                elif x in ranges:
                    # a reader at other bits (a GEMM of another block, or another DFQ candidate): the tensor's
                    # one batch range, running range and x - min, its own bits (see the module docstring)
                    shared[(x, key)] = out
                    r = ranges[x]
                    quantize_with_range(em, x, out, prefix, bits_scalar(em, self.precision_input, key, "act"),
                                        r["min"], r["range"], r["centered"])
                    self.readers.append(QuantPoint(prefix, "act", x, node.name, block, "per_tensor", "nearest"))
                    self.range_owner[prefix] = r["point"]
                    notes.append(f"{node.name}: its input {x} shares the range of {r['point']} (read at this block's bits)")
                else:
                    shared[(x, key)] = out
                    ranges[x] = fake_quant(em, x, out, prefix, bits_scalar(em, self.precision_input, key, "act"))
                    ranges[x]["point"] = prefix
                    for buf in ("run_min", "run_range"):
                        model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), f"{prefix}.{buf}"))
                    self.points.append(QuantPoint(prefix, "act", x, node.name, block, "per_tensor", "nearest"))
                node.input[idx] = out
            notes.append(f"{node.name}: FW quant on input and weight (block {block})")
        for t in self.tables:   # an embedding table: a weight quantizer per row, the weight bits of its block
            node = nodes[t["node"]]
            x = node.input[0]
            prefix = f"{node.name}::fq_w0"
            axes = weight_channel_axes("Gather", len(inits[x].dims), 0)
            fake_quant(em, x, f"{prefix}/out", prefix, bits_scalar(em, self.precision_input, t["block"], "weight"),
                       axes=axes)
            self.points.append(QuantPoint(prefix, "weight", x, node.name, t["block"], "per_row", "nearest"))
            node.input[0] = f"{prefix}/out"
            notes.append(f"{node.name}: FW quant on the embedding table {x}, per row (block {t['block']}'s weight bits)")
        em.flush()
        return PassResult(model, bool(self.plan) or bool(self.tables), notes)

    def ensures(self, model):
        nodes = node_by_name(model)
        for op, _ in self.plan:
            n = nodes[op["name"]]
            assert n.input[0].endswith("/out") and n.input[1].endswith("/out"), f"{n.name} operands not quantized"
        for t in self.tables:
            assert nodes[t["node"]].input[0].endswith("::fq_w0/out"), f"embedding table of {t['node']} not quantized"
