"""Training-graph pass: give every FW quantizer its straight-through gradient as one edge, not ~10 ops.

onnxruntime differentiates the fake-quant subgraph literally: two `Where` branches, `*scale`, the clip mask
(`>=`, `<=`, `And`, `Cast`, `*mask`), `/scale`, and for weights the dead-end gradients of the range statistics,
each a full pass over the tensor. In training the quantizer clamps against the tensor's own range with 0.49 slack,
so the mask is 1 everywhere and the chain computes dL/dx = (dL/dout * s) / s = dL/dout up to float rounding of
s/s: the STE of spec §1.1. The pass deletes the chain (nodes named `<point>/..._Grad/...` and the
`AccumulateGrad_<point>/...` sums) and feeds `<point>/out_grad` straight into the sum that gathers dL/dx.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

from ..manifest import QuantPoint
from .base import Pass, PassResult, assert_inputs_defined, replace_nodes


def _is_chain_node(node: onnx.NodeProto, prefix: str) -> bool:
    """The quantizer's backward: gradient nodes of its forward nodes and the sums between them (not the sum that
    gathers `<point>/out_grad` from several consumers of a shared quantizer)."""
    if f"{prefix}/out_grad" in node.output:
        return False
    return (node.name.startswith(prefix + "/") and "_Grad/" in node.name) or node.name.startswith(f"AccumulateGrad_{prefix}/")


def _point_of(node_name: str) -> str | None:
    """The quant point a node name belongs to, if any: `<point>/...` or `AccumulateGrad_<point>/...`."""
    name = node_name[len("AccumulateGrad_"):] if node_name.startswith("AccumulateGrad_") else node_name
    i = name.find("::fq_")
    if i < 0:
        return None
    j = name.find("/", i)
    return name if j < 0 else name[:j]


class SteGradPass(Pass):
    name = "ste-grad"

    def __init__(self, points: list[QuantPoint], readers: list[QuantPoint] = (), range_owner: dict[str, str] | None = None):
        """`readers`: further quantizers of a point's tensor at other bits (passes/fw_quant.py); they share the
        point's range and `x - min`, so their backward chains are joined to the point's and rewritten with it:
        dL/dx = sum of every quantizer's out_grad."""
        self.points = [p for p in points if p.kind in ("act", "weight")]
        owner = range_owner or {}
        self.group = {p.name: p.name for p in self.points} | {r.name: owner[r.name] for r in readers}
        self.members = defaultdict(list)
        for prefix, point in self.group.items():
            self.members[point].append(prefix)

    def call(self, model):
        graph = model.graph
        nodes = list(graph.node)
        chains = defaultdict(list)                 # one sweep, not one per point: resnet164 has ~20k nodes
        consumers = defaultdict(list)
        for n in nodes:
            prefix = _point_of(n.name)
            if prefix in self.group and _is_chain_node(n, prefix):
                chains[self.group[prefix]].append(n)
            for i in n.input:
                consumers[i].append(n)
        graph_outputs = {o.name for o in graph.output}
        notes, pairs = [], []
        for p in self.points:
            note = self._rewrite(p, self.members[p.name], chains.get(p.name, []), consumers, graph_outputs, pairs)
            notes.append(f"{p.name}: {note}")
        replace_nodes(graph, pairs)
        return PassResult(model, bool(pairs), notes)

    def _rewrite(self, point: QuantPoint, prefixes, chain, consumers, graph_outputs, pairs) -> str:
        if not chain:
            return "kept: no gradient is computed for this quantizer's input"
        out_grads = [f"{p}/out_grad" for p in prefixes]
        in_chain = {id(n) for n in chain}
        produced = {o for n in chain for o in n.output if o}
        outside = {o: [c for c in consumers.get(o, []) if id(c) not in in_chain] for o in produced}
        boundary = [o for o in produced if outside[o] or o in graph_outputs]
        users = {id(u): u for o in boundary for u in outside[o]}
        if any(o in graph_outputs for o in boundary) or len(users) != 1:
            return f"kept: its gradient leaves through {len(boundary)} tensors into {len(users)} nodes, expected one sum"
        (total,) = users.values()
        if total.op_type != "Sum" or not all(i.startswith(point.tensor + "_grad") for i in boundary):
            return f"kept: its gradient flows into {total.op_type} {total.name}, not the sum of dL/d{point.tensor}"
        fed = {i for n in chain for i in n.input}
        if any(g not in fed for g in out_grads):
            return f"kept: {next(g for g in out_grads if g not in fed)} does not feed the chain"
        pairs.extend((n, []) for n in chain)
        kept = [i for i in total.input if i not in produced] + out_grads
        if len(kept) == 1 and total.output[0] not in graph_outputs:
            # a one-input sum is a copy: read out_grad directly
            for n in consumers.get(total.output[0], []):
                for k, i in enumerate(n.input):
                    if i == total.output[0]:
                        n.input[k] = kept[0]
            pairs.append((total, []))
        else:
            del total.input[:]
            total.input.extend(kept)
        readers = f" and {len(prefixes) - 1} more quantizers of it" if len(prefixes) > 1 else ""
        return (f"STE gradient: {len(chain)} backward nodes replaced by {' + '.join(out_grads)} -> "
                f"dL/d{point.tensor}{readers}")

    def ensures(self, model):
        assert_inputs_defined(model)
