"""Training-graph pass: lowered HardSwish and HardSigmoid, forward and backward, on fracgraph's HardAct kernels.

onnxruntime 1.19.2 has no gradient for HardSwish or HardSigmoid, so fracgraph's lowering (lowering/activation.py)
writes them as `Clip(X * alpha + beta, 0, 1)` (times X for HardSwish), and onnxruntime's gradient builder puts
behind them Mul, ClipGrad (clip-grad's fused form of its Clip gradient), Mul, Identities and, for HardSwish, the
Sum of X's two gradients: 4 + 5 full passes over the tensor for a HardSwish, 3 + 2 for a HardSigmoid (Mul alone
was 10-13% of mobilenet_v3_small's and lcnet's profiled FW8/BW8 steps). This pass writes

- `HardAct(X; alpha, beta, swish)` for the forward chain, and
- `HardActGrad(dY, X; alpha, beta, swish)` for its gradient (recomputing the clip and its mask from X),

kernels/hard_act.c, whose values are bitwise the chains' (the same float operations in the same order). Matched by
dataflow from each Clip whose bounds are the constants 0 and 1: its input an Add of a constant (beta) to a Mul of
X by a constant (alpha), each intermediate read only by the chain and its gradient; HardSwish when the Clip's other
forward reader is Mul(X, clip), whose gradient must be the two Muls whose Sum is X's whole gradient. Anything else
is kept, and the notes say why. Runs after clip-grad (it matches ClipGrad).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from onnx import helper, numpy_helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, node_inputs, replace_nodes
from .fused_ops import import_domain


class HardActPass(Pass):
    name = "hard-act"
    fused = 0   # chains written by the last call

    def call(self, model):
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.readers = defaultdict(list)
        for n in graph.node:
            for i in node_inputs(n):
                self.readers[i].append(n)
        for o in graph.output:
            self.readers[o.name].append(None)   # a graph output is read outside: never removed
        self.consts = {t.name: float(numpy_helper.to_array(t).reshape(-1)[0]) for t in graph.initializer
                       if t.data_type == 1 and int(np.prod(t.dims)) == 1}
        pairs, notes, counts = [], [], {"swish": 0, "sigmoid": 0}
        for clip in [n for n in graph.node if n.op_type == "Clip" and n.domain in ("", "ai.onnx")]:
            if len(clip.input) != 3 or self.consts.get(clip.input[1]) != 0.0 or self.consts.get(clip.input[2]) != 1.0:
                continue
            got, why = self._match(clip)
            if got is None:
                if why:
                    notes.append(f"{clip.name}: kept ({why})")
                continue
            pairs += got
            counts["swish" if any(n.op_type == "HardAct" and _attr(n, "swish") for _, new in got for n in new)
                   else "sigmoid"] += 1
        replace_nodes(graph, pairs)
        self.fused = counts["swish"] + counts["sigmoid"]
        if self.fused:
            import_domain(model)
            notes.insert(0, f"{counts['swish']} HardSwish and {counts['sigmoid']} HardSigmoid on fracgraph's HardAct "
                            f"and HardActGrad")
        return PassResult(model, bool(self.fused), notes)

    # -- matching --------------------------------------------------------------------------------------------------
    def _only(self, t: str, *allowed) -> bool:
        return all(r is not None and id(r) in allowed for r in self.readers[t])

    def _through_identities(self, t: str) -> tuple[str, list]:
        """Follow t through Identities that are its only reader; (the last tensor, the Identities)."""
        chain = []
        while len(self.readers[t]) == 1 and self.readers[t][0] is not None and self.readers[t][0].op_type == "Identity":
            chain.append(self.readers[t][0])
            t = chain[-1].output[0]
        return t, chain

    def _match(self, clip):
        """([(old, [new...])...], "") or (None, why); why "" for a Clip that is no lowered hard activation."""
        t, c = clip.input[0], clip.output[0]
        shift = self.producer.get(t)
        if shift is None or shift.op_type != "Add":
            return None, ""
        bi = next((k for k, i in enumerate(shift.input) if i in self.consts), None)
        scale = self.producer.get(shift.input[1 - bi]) if bi is not None else None
        if scale is None or scale.op_type != "Mul":
            return None, ""
        ai = next((k for k, i in enumerate(scale.input) if i in self.consts), None)
        if ai is None:
            return None, ""
        x, alpha, beta = scale.input[1 - ai], self.consts[scale.input[ai]], self.consts[shift.input[bi]]
        if not self._only(scale.output[0], id(shift)):
            return None, "X * alpha is read elsewhere"
        # the gradient of the clip: ClipGrad(g, t, 0, 1), then Identities, Mul by alpha, Identities
        cg = [r for r in self.readers[t] if r is not None and r is not clip]
        if len(cg) != 1 or cg[0].op_type != "ClipGrad" or cg[0].domain != DOMAIN or cg[0].input[1] != t \
                or list(cg[0].input[2:]) != list(clip.input[1:]):
            return None, "its gradient is not clip-grad's ClipGrad (is clip-grad on?)"
        cg = cg[0]
        after, ids1 = self._through_identities(cg.output[0])
        p3 = self.readers[after][0] if len(self.readers[after]) == 1 else None
        if p3 is None or p3.op_type != "Mul" or sorted(p3.input) != sorted([after, scale.input[ai]]):
            return None, "the clip's gradient is not multiplied by alpha alone"
        gx_a, ids2 = self._through_identities(p3.output[0])
        fwd_readers = [r for r in self.readers[c] if r is not None]
        mul = next((r for r in fwd_readers if r.op_type == "Mul" and sorted(r.input) == sorted([x, c])), None)
        attrs = dict(alpha=alpha, beta=beta, domain=DOMAIN)
        if mul is None:   # HardSigmoid: the clip is the activation; its gradient reaches X through alpha
            g = cg.input[0]
            base = clip.name.rsplit("/", 1)[0] if "/" in clip.name else clip.name
            new_f = helper.make_node("HardAct", [x], [c], name=f"{base}::hard_act", swish=0, **attrs)
            new_b = helper.make_node("HardActGrad", [g, x], [gx_a], name=f"{base}::hard_act_grad", swish=0, **attrs)
            return [(clip, [new_f]), (shift, []), (scale, []), (cg, [new_b]), (p3, [])] + \
                [(n, []) for n in ids1 + ids2], ""
        # HardSwish: y = x * c; the clip's other reader is Mul(dY, c), the clip gradient's input Mul(dY, x)
        y = mul.output[0]
        p0 = [r for r in fwd_readers if r is not mul]
        if len(p0) != 1 or p0[0].op_type != "Mul" or c not in p0[0].input:
            return None, "the HardSwish's clip is read by more than its gradient"
        p0 = p0[0]
        dy = p0.input[1] if p0.input[0] == c else p0.input[0]
        g_src, ids0 = cg.input[0], []
        p2 = self.producer.get(g_src)
        while p2 is not None and p2.op_type == "Identity" and self._only(p2.output[0], id(cg), *(id(n) for n in ids0)):
            ids0.append(p2)
            p2 = self.producer.get(p2.input[0])
        if p2 is None or p2.op_type != "Mul" or sorted(p2.input) != sorted([dy, x]) \
                or not self._only(p2.output[0], *(id(n) for n in ids0 + [cg])):
            return None, "the clip's gradient input is not Mul(dY, X)"
        gx_b, ids3 = self._through_identities(p0.output[0])
        s = [r for r in self.readers[gx_a] if r is not None]
        if len(s) != 1 or s[0].op_type != "Sum" or sorted(s[0].input) != sorted([gx_a, gx_b]) \
                or not self._only(gx_b, id(s[0])):
            return None, "X's gradient is not the Sum of the HardSwish's two"
        s = s[0]
        if not self._only(c, id(mul), id(p0)) or not self._only(t, id(clip), id(cg)):
            return None, "an intermediate is read elsewhere"
        base = mul.name.rsplit("/", 1)[0] if "/" in mul.name else mul.name
        new_f = helper.make_node("HardAct", [x], [y], name=f"{base}::hard_act", swish=1, **attrs)
        new_b = helper.make_node("HardActGrad", [dy, x], list(s.output), name=f"{base}::hard_act_grad", swish=1,
                                 **attrs)
        return [(mul, [new_f]), (clip, []), (shift, []), (scale, []), (s, [new_b]), (p0, []), (p2, []), (cg, []),
                (p3, [])] + [(n, []) for n in ids0 + ids1 + ids2 + ids3], ""

    def ensures(self, model):
        assert_inputs_defined(model)


def _attr(node, name):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)
