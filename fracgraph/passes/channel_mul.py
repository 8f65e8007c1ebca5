"""Training-graph pass: the gradient of a per-channel scale as one pass (`ChannelMulGrad`, kernels/channel_mul.c).

A Mul of an [N, C, S...] tensor A by a [1, C, 1...] parameter g (ConvNeXt's layer scale `x * gamma.view(1, -1, 1,
1)`, 12 of them in convnext_atto; any channel scale of a parameter) gets from onnxruntime's gradient builder
Mul(dY, g) for dA, and Mul(dY, A) -> ReduceSum over every axis but 1 (keepdims) for dg: two passes over the tensor
and a third over a whole-tensor temporary. ChannelMulGrad(dY, A, g) -> (dA, dg) does both in one pass: dA is the
same float multiply (bitwise onnxruntime's), dg the same sums in another order (tests/passes/test_channel_mul.py
bounds it against float64 and compares a step with the pass on and off).

Matched on the gradient's own nodes, whatever the forward's names: a ReduceSum (keepdims, constant axes = every
axis but 1) of a Mul(dY, A) read by nothing else, and a Mul(dY, g) beside it, where A's rank and channel
count are known ([N, C, S...], rank >= 2), dY's is A's where known, and g's is [1, C, 1...] or its right-aligned tail ([C, 1, 1]).
Anything else stays on onnxruntime's ops. On with the fused kernels; off with `--no-fused-kernels` or
`BuildOptions.skip_passes=("channel-mul",)`.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, graph_links, replace_nodes, toposort
from .fused_ops import import_domain
from .ln_grad import _shapes

PREFIX = "::cmul"   # names this pass creates: <ReduceSum's name>::cmul


def _const(name, producer, inits):
    if name in inits:
        return numpy_helper.to_array(inits[name])
    n = producer.get(name)
    if n is not None and n.op_type == "Constant":
        a = next((a for a in n.attribute if a.name == "value"), None)
        if a is not None:
            return numpy_helper.to_array(a.t)
    return None


def static_shape(name, shapes, producer, inits):
    """The shape of `name` from the graph's shapes, or through a Reshape of a known shape to a constant one."""
    s = shapes.get(name)
    if s is not None and all(d is not None for d in s):
        return list(s)
    n = producer.get(name)
    if n is None or n.op_type != "Reshape":
        return None
    src, target = shapes.get(n.input[0]), _const(n.input[1], producer, inits)
    if src is None or any(d is None for d in src) or target is None:
        return None
    out = [int(src[i]) if int(d) == 0 else int(d) for i, d in enumerate(target)]
    if out.count(-1) == 1:
        rest = int(np.prod([d for d in out if d != -1]))
        out[out.index(-1)] = int(np.prod(src)) // max(rest, 1)
    return out if int(np.prod(out)) == int(np.prod(src)) and min(out) > 0 else None


class ChannelMulPass(Pass):
    name = "channel-mul"
    fused = 0

    def call(self, model):
        graph = model.graph
        producer, consumers = graph_links(graph)
        shapes = _shapes(graph)
        inits = {t.name: t for t in graph.initializer}
        outputs = {o.name for o in graph.output}
        pairs, used = [], set()
        for r in graph.node:
            m = self._match(r, producer, consumers, shapes, inits, outputs, used)
            if m is None:
                continue
            m0, m2, dy, a, g = m
            used.update((id(m0), id(m2)))
            node = helper.make_node("ChannelMulGrad", [dy, a, g], [m0.output[0], r.output[0]],
                                    name=f"{r.name}{PREFIX}", domain=DOMAIN)
            pairs += [(m0, [node]), (m2, []), (r, [])]
        replace_nodes(graph, pairs)
        self.fused = len(pairs) // 3
        if pairs:
            toposort(model)
            import_domain(model)
        return PassResult(model, bool(pairs), [f"{self.fused} channel-scale gradient (Mul, Mul, ReduceSum) on "
                                               f"fracgraph's ChannelMulGrad"] if pairs else [])

    @staticmethod
    def _match(r, producer, consumers, shapes, inits, outputs, used):
        if r.op_type != "ReduceSum" or r.domain not in ("", "ai.onnx") or len(r.input) < 2:
            return None
        attrs = {x.name: helper.get_attribute_value(x) for x in r.attribute}
        if attrs.get("keepdims", 1) != 1 or attrs.get("noop_with_empty_axes", 0) != 0:
            return None
        m2 = producer.get(r.input[0])
        if m2 is None or m2.op_type != "Mul" or m2.domain not in ("", "ai.onnx") or id(m2) in used:
            return None
        if len(consumers.get(m2.output[0], [])) != 1 or m2.output[0] in outputs:
            return None
        axes = _const(r.input[1], producer, inits)
        for dy, a in (m2.input, m2.input[::-1]):
            sa = shapes.get(a)   # rank and channel count known (the batch may be symbolic)
            if not sa or len(sa) < 2 or sa[1] is None:
                continue
            rank = len(sa)
            sdy = shapes.get(dy)
            if sdy is not None and (len(sdy) != rank or any(d is not None and d != e for d, e in zip(sdy, sa))):
                continue
            if axes is None or sorted(int(x) % rank for x in np.ravel(axes)) != [0, *range(2, rank)]:
                continue
            for m0 in consumers.get(dy, []):
                if m0 is m2 or m0.op_type != "Mul" or m0.domain not in ("", "ai.onnx") or id(m0) in used:
                    continue
                g = m0.input[1] if m0.input[0] == dy else m0.input[0]
                sg = static_shape(g, shapes, producer, inits)
                if sg is None or len(sg) > rank or g == dy:
                    continue
                full = [1] * (rank - len(sg)) + list(sg)
                if full == [1 if i != 1 else sa[1] for i in range(rank)]:
                    return m0, m2, dy, a, g
        return None

    def ensures(self, model):
        assert_inputs_defined(model)
