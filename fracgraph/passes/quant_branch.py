"""Training-graph pass: run each quantizer's elementwise math inside an `If` on its precision switch.

A quantizer (quantizers.py) ends in `Where(bits > 0, <prefix>/q, x)`: with a scalar condition onnxruntime's Where still reads both full
tensors and writes a third, about three times the cost of an Add (bench/profile_step.py). `If(bits > 0)` with
the quantizer math (centre, scale, noise add, clamp, round, rescale) in the then-branch and `Identity(x)` in the
else-branch computes the same values with one pass fewer, and at 0 bits skips the math. The range statistics,
the noise and anything else read outside the chain stay in the outer graph (subgraphs read them from there).
"""

from __future__ import annotations


import onnx
from onnx import TensorProto, helper

from .base import Pass, PassResult, assert_inputs_defined, graph_links, replace_nodes

_ELEMENTWISE = {"Sub", "Div", "Add", "Clip", "Round", "Mul",
                "SRQuantize", "SRQuantizeNoise", "FakeQuantize"}   # + the fused quantizers (passes/fused_ops.py)


class QuantBranchPass(Pass):
    name = "quant-branch"

    def call(self, model):
        graph = model.graph
        producer, consumers = graph_links(graph)
        outputs = {o.name for o in graph.output}
        order = {id(n): i for i, n in enumerate(graph.node)}
        notes, pairs = [], []
        for where in [n for n in graph.node if n.op_type == "Where" and n.input[0].endswith("::on")]:
            q_node = producer.get(where.input[1])
            if q_node is None or not q_node.name.endswith("/q"):
                notes.append(f"{where.name}: kept Where (not a quantizer's output select)")
                continue
            prefix = q_node.name[: -len("/q")]
            chain = self._chain(where, prefix, producer, consumers, outputs, order)
            if not chain:
                notes.append(f"{prefix}: kept Where (no private quantizer chain)")
                continue
            cond, q, x = where.input
            then_graph = helper.make_graph(chain, f"{prefix}/quantize", [],
                                           [helper.make_tensor_value_info(q, TensorProto.FLOAT, None)])
            else_out = f"{prefix}/passthrough"
            else_graph = helper.make_graph([helper.make_node("Identity", [x], [else_out], name=else_out)],
                                           f"{prefix}/fp32", [],
                                           [helper.make_tensor_value_info(else_out, TensorProto.FLOAT, None)])
            branch = helper.make_node("If", [cond], list(where.output), name=where.name,
                                      then_branch=then_graph, else_branch=else_graph)
            pairs.extend((n, []) for n in chain)
            pairs.append((where, [branch]))
            notes.append(f"{prefix}: {len(chain)} quantizer ops run under If(bits > 0)")
        replace_nodes(graph, pairs)
        return PassResult(model, bool(pairs), notes)

    @staticmethod
    def _chain(where, prefix, producer, consumers, outputs, order) -> list[onnx.NodeProto]:
        """The elementwise nodes of this quantizer that only feed q (walking back from q), in graph order."""
        members: dict[int, onnx.NodeProto] = {}
        stack = [where.input[1]]
        while stack:
            t = stack.pop()
            n = producer.get(t)
            if n is None or id(n) in members or n.op_type not in _ELEMENTWISE or not n.name.startswith(prefix + "/"):
                continue
            members[id(n)] = n
            stack.extend(n.input)
        # a member whose output is read outside the chain (or is a graph output) must stay outside
        changed = True
        while changed:
            changed = False
            for key, n in list(members.items()):
                readers = [c for o in n.output for c in consumers[o]]
                if any(o in outputs for o in n.output) or any(id(c) not in members and c is not where for c in readers):
                    del members[key]
                    changed = True
        if where.input[1] not in {o for n in members.values() for o in n.output}:
            return []
        return sorted(members.values(), key=lambda n: order.get(id(n), 0))

    def ensures(self, model):
        assert_inputs_defined(model)
