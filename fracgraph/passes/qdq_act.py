"""Training-graph pass: the FW activation quantizer's math on onnxruntime's QuantizeLinear/DequantizeLinear.

After quant-branch an activation quantizer is `If(bits > 0)` around

    c = x - min;  q = Round(Clip(c / s, -0.49, L + 0.49)) * s + min        (L = 2^bits - 1, s = max(range / L, eps))

six passes over the tensor. In the training graph min and range are the tensor's own (batch) statistics, so
c / s lies in [0, L] up to rounding and the Clip never binds; for bits <= 8, QuantizeLinear(c, s, uint8 0) is
then exactly Round(c / s) (both divide and round half to even), and DequantizeLinear multiplies back by s:

    c = x - min;  q = DequantizeLinear(QuantizeLinear(c, s, 0), s, 0) + min

four passes, two of them over one byte per element, each a multithreaded MLAS kernel (0.5x the time of the
chain on a 128x16x32x32 tensor on 2 cores, bench/kernel_probes.py). Bits above 8 keep the original chain under an inner
`If(bits <= 8)`. The pass checks the structure it relies on (per-tensor ReduceMin/ReduceMax of this very x,
non-positive lower and at-least-L upper clip bound) and leaves any other quantizer alone, saying why. Error
quantizers (stochastic rounding, clip at [0, L]) and weight quantizers (per-channel, small) are not rewritten, nor
quantizers that fused-ops already made one FakeQuantize (the default where a C compiler is; this pass is then the
fallback of `quantize --no-fused-kernels`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .base import Pass, PassResult, assert_inputs_defined

ACT_TAG = "::fq_a"


class QdqActPass(Pass):
    name = "qdq-act"

    def call(self, model):
        graph = model.graph
        producer = {o: n for n in graph.node for o in n.output}
        inits = {t.name: t for t in graph.initializer}
        graph_inputs = {i.name for i in graph.input}
        zp = "fg::qdq/zero_u8"
        eight = "fg::qdq/eight"
        notes, count = [], 0
        le8_made = set()
        new_nodes = []
        for node in graph.node:
            if node.op_type != "If" or ACT_TAG not in node.name:
                continue
            then = next(a.g for a in node.attribute if a.name == "then_branch")
            if any(n.op_type == "FakeQuantize" for n in then.node):   # already one fused op (passes/fused_ops.py)
                continue
            reason = self._check(then, producer, inits)
            if reason:
                notes.append(f"{node.name}: kept ({reason})")
                continue
            bits = node.input[0][: -len("::on")] if node.input[0].endswith("::on") else None
            if bits is None or bits not in producer and bits not in graph_inputs:
                notes.append(f"{node.name}: kept (its switch is not a bits > 0 test)")
                continue
            le8 = f"{bits}::le8"
            if le8 not in le8_made:
                new_nodes.append(helper.make_node("LessOrEqual", [bits, eight], [le8], name=le8))
                le8_made.add(le8)
            (sub, div, clip, rnd, mul, add), aux = self._chain(then)
            x_c, s, mn, q = sub.output[0], div.input[1], sub.input[1], add.output[0]
            base = node.name + "::qdq"
            fused = helper.make_graph([
                helper.make_node("QuantizeLinear", [x_c, s, zp], [f"{base}/int"], name=f"{base}/int"),
                helper.make_node("DequantizeLinear", [f"{base}/int", s, zp], [f"{base}/deq"], name=f"{base}/deq"),
                helper.make_node("Add", [f"{base}/deq", mn], [f"{base}/q"], name=f"{base}/q"),
            ], f"{base}/le8", [], [helper.make_tensor_value_info(f"{base}/q", TensorProto.FLOAT, None)])
            wide = helper.make_graph(aux + [div, clip, rnd, mul, add], f"{base}/wide", [],
                                     [helper.make_tensor_value_info(q, TensorProto.FLOAT, None)])
            out = then.output[0].name
            inner = helper.make_node("If", [le8], [out], name=f"{base}/select", then_branch=fused, else_branch=wide)
            new_then = helper.make_graph([sub, inner], then.name, [], list(then.output))
            for a in node.attribute:
                if a.name == "then_branch":
                    a.g.CopyFrom(new_then)
            count += 1
        if count:
            graph.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), zp))
            graph.initializer.append(numpy_helper.from_array(np.array(8.0, np.float32), eight))
            graph.node.extend(new_nodes)
            notes.insert(0, f"{count} activation quantizers on QuantizeLinear/DequantizeLinear for bits <= 8")
        return PassResult(model, bool(count), notes)

    @staticmethod
    def _chain(then: onnx.GraphProto) -> tuple[list, list]:
        """(the six chain nodes, the rest): the rest is the clip's upper bound when quant-branch pulled it in."""
        clip = [n for n in then.node if n.op_type == "Clip"]
        aux = [n for n in then.node if clip and clip[0].input[2] in n.output]
        return [n for n in then.node if n not in aux], aux

    def _check(self, then: onnx.GraphProto, producer, inits) -> str | None:
        chain, aux = self._chain(then)
        producer = {**producer, **{o: n for n in aux for o in n.output}}
        ops = [n.op_type for n in chain]
        if ops != ["Sub", "Div", "Clip", "Round", "Mul", "Add"]:
            return f"then-branch is {ops}, not the deterministic per-tensor quantizer chain"
        sub, div, clip, rnd, mul, add = chain
        c = sub.output[0]
        if not (div.input[0] == c and clip.input[0] == div.output[0] and rnd.input[0] == clip.output[0]
                and mul.input[0] == rnd.output[0] and mul.input[1] == div.input[1] and add.input[0] == mul.output[0]
                and add.input[1] == sub.input[1] and then.output[0].name == add.output[0]):
            return "the chain is not wired as x - min, / s, clip, round, * s, + min"
        x, mn = sub.input
        # min: the detached ReduceMin of this very x over all axes (Clip(0, m, m) is the detach)
        if _detached_reduce(producer, mn, "ReduceMin") != x:
            return "its minimum is not the per-tensor ReduceMin of its input"
        # s = max((max - min) / levels, eps) with max the per-tensor ReduceMax of x: then c / s <= levels
        scale = producer.get(div.input[1])
        raw = producer.get(scale.input[0]) if scale is not None and scale.op_type == "Max" else None
        rng = producer.get(raw.input[0]) if raw is not None and raw.op_type == "Div" else None
        if rng is None or rng.op_type != "Sub" or rng.input[1] != mn or not raw.input[1].endswith("::levels") \
                or _detached_reduce(producer, rng.input[0], "ReduceMax") != x:
            return "its scale is not (ReduceMax - min) / levels of its input"
        lo = inits.get(clip.input[1])
        if lo is None or float(numpy_helper.to_array(lo)) > 0:
            return "its lower clip bound is not a constant <= 0"
        hi = producer.get(clip.input[2])
        if hi is None or hi.op_type != "Add" or not hi.input[0].endswith("::levels") or hi.input[1] not in inits \
                or float(numpy_helper.to_array(inits[hi.input[1]])) < 0:
            return "its upper clip bound is not levels plus a non-negative slack"
        return None

    def ensures(self, model):
        assert_inputs_defined(model)


def _detached_reduce(producer, name: str, op: str) -> str | None:
    """The input x if `name` is op(x) over all axes, possibly behind the Clip(0, m, m) detach; else None."""
    m = producer.get(name)
    if m is not None and m.op_type == "Clip" and len(m.input) == 3 and m.input[1] == m.input[2]:
        m = producer.get(m.input[1])
    if m is None or m.op_type != op or len(m.input) > 1 or any(a.name == "axes" for a in m.attribute):
        return None
    return m.input[0]
