"""Training-graph pass: each fused quantizer with its scalar arithmetic and its bits > 0 switch as one node.

After fused-ops and quant-branch a quantizer is a fused kernel behind a chain of scalar ops and inside an `If`:

    levels = Max(Pow(2, bits) - 1, 1);  on = Greater(bits, 0)                  (once per bits tensor)
    range = max - min;  scale = Max(range / levels, eps);  hi = levels + slack   (per quantizer)
    If(on) then FakeQuantize(x, min, scale, hi; lo) else Identity(x)            (SRQuantize[Noise] likewise)

each scalar node ~4-5 us of onnxruntime's per-node overhead and the `If` more (its subgraph frame; its output
cannot be planned in the outer memory pattern): ~12-15 ms of vit_tiny's ~200 ms step. This pass writes

    FakeQuantizeBits(x, min, max, bits; lo, eps, slack)   /  SRQuantizeBits(...; salt)  /  SRQuantizeNoiseBits(..., noise)

(kernels/fused_ops.c), which computes levels, scale and hi itself with the same float operations in the same order
(so every value is bitwise the chain's) and at bits <= 0 copies x (the If's else branch; an SR node's generator
does not advance, as the If never ran it). min and max are read before their detaching Clip(0, m, m), which
returns m, and so are the Clips' other readers (the backward graph is built: the stop-gradient has done its work).
Scalars another node reads (the activation ranges' EMA reads min and range, int-gemm's IntConv min and scale, a
quantizer this pass declined its levels) stay; the rest of the chain is removed once nothing reads it.
The backward graph is already built: ste-grad gave each quantizer its straight-through edge, so nothing in it
reads the scalars (where something does, they stay).

The pass checks every step it relies on (the levels chain's constants 2 and 1, the switch's 0, the scale's Max
with a constant floor, the range's Sub of this quantizer's min, hi = levels + a constant or levels, the else
branch the quantizer's own x) and declines any other select, saying why. Runs after quant-branch (which builds
the If), qdq-act and int-gemm (which read the scalars by name), before permute.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from onnx import helper, numpy_helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, node_inputs, replace_nodes

FUSED_BITS = {"FakeQuantize": "FakeQuantizeBits", "SRQuantize": "SRQuantizeBits",
              "SRQuantizeNoise": "SRQuantizeNoiseBits"}   # the fused quantizer -> its one-node form


class QuantBitsPass(Pass):
    name = "quant-bits"

    def call(self, model):
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consts = {t.name: float(numpy_helper.to_array(t).reshape(-1)[0]) for t in graph.initializer
                       if t.data_type == 1 and int(np.prod(t.dims)) == 1}
        readers = defaultdict(int)
        for n in graph.node:
            for i in n.input:
                readers[i] += 1
        pairs, notes, candidates, count = [], [], set(), 0
        for sel in graph.node:
            if sel.op_type not in ("If", "Where") or not sel.input or not sel.input[0].endswith("::on"):
                continue
            new, dead, why = self._match(sel, readers)
            if new is None:
                notes.append(f"{sel.name}: kept ({why})")
                continue
            pairs.append((sel, [new]))
            if sel.op_type == "Where":   # the fused quantizer is an outer node, read only by the select
                q = self.producer[sel.input[1]]
                pairs.append((q, []))
            candidates.update(n.output[0] for n in dead if n is not None)
            count += 1
        replace_nodes(graph, pairs)
        self._bypass_detach(graph, candidates)
        removed = self._prune(graph, candidates)
        notes.insert(0, f"{count} quantizers as one node with their scalars and bits switch "
                        f"({count} selects and {removed} scalar nodes removed)")
        return PassResult(model, bool(count), notes)

    # -- matching ------------------------------------------------------------------------------------------------
    def _match(self, sel, readers):
        """(the one node replacing `sel`, the scalar nodes it may leave unread, "") or (None, None, why)."""
        cond = sel.input[0]
        bits = cond[: -len("::on")]
        local = {}   # tensor -> node inside the If's then-branch
        if sel.op_type == "If":
            branches = {a.name: a.g for a in sel.attribute}
            then, other = branches.get("then_branch"), branches.get("else_branch")
            if then is None or other is None or len(then.output) != 1 or len(other.output) != 1:
                return None, None, "not a two-branch If with one output"
            local = {o: n for n in then.node for o in n.output}
            q = local.get(then.output[0].name)
            if q is None or q.op_type not in FUSED_BITS or q.domain != DOMAIN:
                return None, None, "its then-branch does not end in a fused quantizer"
            if len(other.node) != 1 or other.node[0].op_type != "Identity" \
                    or other.node[0].output[0] != other.output[0].name or other.node[0].input[0] != q.input[0]:
                return None, None, "its else-branch is not Identity of the quantizer's input"
            extra = [n for n in then.node if n is not q]
            if len(extra) > 1 or extra and extra[0].output[0] != q.input[3]:
                return None, None, f"its then-branch holds {len(then.node)} nodes, not the quantizer and its hi"
        else:
            q = self.producer.get(sel.input[1])
            if q is None or q.op_type not in FUSED_BITS or q.domain != DOMAIN:
                return None, None, "it does not select a fused quantizer"
            if sel.input[2] != q.input[0] or readers[q.output[0]] != 1:
                return None, None, "it does not select between the quantizer and its own input"
        producer = {**self.producer, **local}
        x, mn, s, hi = q.input[:4]
        # the switch and the levels: Greater(bits, 0); Max(Sub(Pow(2, bits), 1), 1)
        on = producer.get(cond)
        if not self._op(on, "Greater", [bits, 0.0]):
            return None, None, f"{cond} is not Greater({bits}, 0)"
        levels = f"{bits}::levels"
        lv = producer.get(levels)
        lv_raw = producer.get(lv.input[0]) if self._op(lv, "Max", [None, 1.0]) else None
        pow2 = producer.get(lv_raw.input[0]) if self._op(lv_raw, "Sub", [None, 1.0]) else None
        if not self._op(pow2, "Pow", [2.0, bits]):
            return None, None, f"{levels} is not Max(Pow(2, {bits}) - 1, 1)"
        # scale = Max(range / levels, eps); range = max - min
        scale = producer.get(s)
        if not self._op(scale, "Max", [None, "const"]):
            return None, None, f"{s} is not Max(range / levels, eps)"
        eps = self.consts[scale.input[1]]
        s_raw = producer.get(scale.input[0])
        rg = producer.get(s_raw.input[0]) if self._op(s_raw, "Div", [None, levels]) else None
        if rg is None or rg.op_type != "Sub" or self._peel(rg.input[1]) != self._peel(mn):
            return None, None, f"{s} is not (max - {mn}) / {levels}"
        # hi = levels + slack, or levels
        attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute}
        if hi == levels:
            slack = None
        else:
            add = producer.get(hi)
            if not self._op(add, "Add", [levels, "const"]):
                return None, None, f"its clamp's upper bound {hi} is not {levels} + a constant"
            slack = self.consts[add.input[1]]
        prefix = q.name[: -len("/q")] if q.name.endswith("/q") else q.name
        inputs = [x, self._peel(mn), self._peel(rg.input[0]), bits] + list(q.input[4:5])
        extra = {"slack": float(slack)} if slack is not None else {}
        if q.op_type == "SRQuantize":
            extra["salt"] = attrs["salt"]
        new = helper.make_node(FUSED_BITS[q.op_type], inputs, list(sel.output), name=f"{prefix}::bits",
                               domain=DOMAIN, lo=float(attrs["lo"]), eps=float(eps), **extra)
        outer = [self.producer.get(t) for t in (hi, s, s_raw.output[0], rg.output[0], mn, rg.input[0], rg.input[1],
                                                cond, levels, lv_raw.output[0], pow2.output[0])]
        return new, outer, ""

    def _op(self, node, op: str, inputs: list) -> bool:
        """node is `op` over `inputs`: a name, a float constant's value, "const" (any scalar constant) or None (any)."""
        if node is None or node.op_type != op or node.domain not in ("", "ai.onnx") or len(node.input) != len(inputs):
            return False
        for got, want in zip(node.input, inputs):
            if want is None:
                continue
            if want == "const":
                if got not in self.consts:
                    return False
            elif isinstance(want, float):
                if self.consts.get(got) != want:
                    return False
            elif got != want:
                return False
        return True

    def _peel(self, t: str) -> str:
        """m for the stop-gradient Clip(c, m, m) of a scalar constant c (quantizers.detach_scalar), which returns m
        (for any m but NaN); else t itself."""
        n = self.producer.get(t)
        if n is not None and n.op_type == "Clip" and len(n.input) == 3 and n.input[1] == n.input[2] \
                and n.input[0] in self.consts:
            return n.input[1]
        return t

    # -- the scalars nothing reads any more ----------------------------------------------------------------------
    def _bypass_detach(self, graph, candidates: set) -> None:
        """The quantizers' stop-gradient Clip(c, m, m) (value m) as a plain edge: its readers (the activation ranges'
        EMA, int-gemm's Identities) read m itself. The backward graph is built, so the stop-gradient has done its
        work; a Clip that is a graph output or that a subgraph reads from the outer scope stays."""
        raw = {t: self._peel(t) for t in candidates}
        raw = {t: m for t, m in raw.items() if m != t}
        if not raw:
            return
        keep = {o.name for o in graph.output}
        for n in graph.node:
            keep.update(i for i in node_inputs(n)[len(n.input):] if i in raw)   # subgraphs' outer reads
        raw = {t: m for t, m in raw.items() if t not in keep}
        for n in graph.node:
            for k, i in enumerate(n.input):
                if i in raw:
                    n.input[k] = raw[i]

    @staticmethod
    def _prune(graph, candidates: set) -> int:
        """Remove the candidate nodes (named by their first output) whose outputs nothing reads (subgraphs' outer
        reads counted), repeatedly."""
        readers = defaultdict(int)
        for n in graph.node:
            for i in node_inputs(n):
                readers[i] += 1
        for o in graph.output:
            readers[o.name] += 1
        made_by = {o: n for n in graph.node if n.output and n.output[0] in candidates for o in n.output}
        todo = list(made_by.values())
        gone = set()
        while todo:
            n = todo.pop()
            if id(n) in gone or any(readers[o] for o in n.output if o):
                continue
            gone.add(id(n))
            for i in node_inputs(n):
                readers[i] -= 1
                if i in made_by:
                    todo.append(made_by[i])
        if gone:
            keep = [n for n in graph.node if id(n) not in gone]
            del graph.node[:]
            graph.node.extend(keep)
        return len(gone)

    def ensures(self, model):
        assert_inputs_defined(model)
