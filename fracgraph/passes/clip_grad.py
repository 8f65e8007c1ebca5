"""Training-graph pass: onnxruntime's Clip gradient chain as fracgraph's `ClipGrad` (kernels/clip_grad.c).

onnxruntime 1.19.2's gradient builder writes the gradient of `Clip(X, lo, hi)` (ReLU6, Hardtanh, the clamps of the
lowered HardSwish and HardSigmoid) as five ops named `<clip>_Grad/...`:

    GreaterOrEqual(X, lo) -> And <- LessOrEqual(X, hi);  Cast(to float);  Mul(dY, mask) -> dX

five passes over the tensor, the comparisons, And and Cast on one thread: 13-15% of mobilenet_v2's profiled FW8/BW8
step (`fracgraph profile`). `ClipGrad(dY, X, lo, hi)` computes `dY * (float)(X >= lo && X <= hi)` in one
multithreaded pass with the same IEEE operations, so its values are bitwise the chain's (the sign of zero and NaN
propagation included). A Clip with one bound has a chain with one comparison and no And; the kernel then gets -inf
or +inf for the missing bound (true for every non-NaN X). The chain is matched by the gradient builder's names
(the forward Clip's name + `_Grad/`) and wiring (X, lo and hi the Clip's own inputs); a chain whose intermediate
is read elsewhere is kept, and the notes say so.
"""

from __future__ import annotations


import numpy as np
from onnx import TensorProto, helper

from ..kernels import DOMAIN
from ..quantizers import Emitter   # its const() writes initializers
from .base import Pass, PassResult, assert_inputs_defined, graph_links, opset, replace_nodes
from .fused_ops import import_domain

_CMP = {"GreaterOrEqual": 1, "LessOrEqual": 2}   # comparison -> the Clip input it compares X with (lo, hi)


class ClipGradPass(Pass):
    name = "clip-grad"
    fused = 0   # ClipGrad nodes written by the last call: the artifacts then need the kernels library

    def call(self, model):
        graph = model.graph
        em = Emitter(graph, opset(model))
        producer, consumers = graph_links(graph)
        outputs = {o.name for o in graph.output}
        clips = {n.name: n for n in graph.node if n.op_type == "Clip" and n.domain in ("", "ai.onnx")}
        pairs, notes, inf = [], [], {}
        for mul in list(graph.node):
            prefix = mul.name.rpartition("_Grad/")[0]
            if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or prefix not in clips:
                continue
            clip = clips[prefix]
            chain, why = self._chain(mul, clip, producer)
            if chain is None:
                notes.append(f"{prefix}: kept onnxruntime's Clip gradient ({why})")
                continue
            cast, cmps = chain[0], chain[1:]
            members = {id(n) for n in chain}
            if any(o in outputs or any(id(c) not in members and c is not mul for c in consumers[o])
                   for n in chain for o in n.output):
                notes.append(f"{prefix}: kept onnxruntime's Clip gradient (an intermediate is read elsewhere)")
                continue
            dy = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
            bounds = []
            for k, default in ((1, -np.inf), (2, np.inf)):
                if any(_CMP[c.op_type] == k for c in cmps):
                    bounds.append(clip.input[k])
                else:
                    if default not in inf:
                        inf[default] = em.const(default, np.float32)
                    bounds.append(inf[default])
            pairs.append((mul, [helper.make_node("ClipGrad", [dy, clip.input[0], *bounds], list(mul.output),
                                                 name=f"{prefix}_Grad::clip_grad", domain=DOMAIN)]))
            pairs.extend((n, []) for n in chain)
        replace_nodes(graph, pairs)
        self.fused = sum(1 for _, new in pairs if new)
        if self.fused:
            import_domain(model)
        return PassResult(model, bool(self.fused), ([f"{self.fused} Clip gradients on fracgraph's ClipGrad"]
                                                     if self.fused else []) + notes)

    @staticmethod
    def _chain(mul, clip, producer):
        """([Cast, comparison(s), And?], None) when `mul` is Mul(dY, Cast(mask of X against the Clip's bounds)) of
        the Clip's gradient, else (None, why)."""
        cast = next((producer[i] for i in mul.input if i in producer and producer[i].op_type == "Cast"), None)
        if cast is None or helper.get_attribute_value(next(a for a in cast.attribute if a.name == "to")) != TensorProto.FLOAT:
            return None, "no Cast to float of a mask"
        src = producer.get(cast.input[0])
        if src is None:
            return None, "the mask has no producer"
        ands = [src] if src.op_type == "And" else []
        cmps = [producer.get(i) for i in src.input] if ands else [src]
        if any(c is None or c.op_type not in _CMP for c in cmps) or len({c.op_type for c in cmps}) != len(cmps):
            return None, "not GreaterOrEqual/LessOrEqual of X"
        for c in cmps:
            k = _CMP[c.op_type]
            if c.input[0] != clip.input[0] or len(clip.input) <= k or c.input[1] != clip.input[k] or not c.input[1]:
                return None, f"{c.op_type} does not compare the Clip's input with its bound"
        return [cast, *cmps, *ands], None

    def ensures(self, model):
        assert_inputs_defined(model)
