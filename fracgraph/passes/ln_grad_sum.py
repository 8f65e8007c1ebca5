"""Training-graph pass: the residual's gradient Sum folded into fracgraph's LayerNormGrad (kernels/fused_ops.c).

In a pre-norm block (`x + f(LayerNorm(x))`: the ViTs, Swin, the GPTs) x's gradient is the Sum of the residual path's
gradient and the LayerNorm's dX, which onnxruntime's gradient builder writes as `Sum(dR, dX)`: one more pass that
reads two tensors and writes a third (24 of vit_tiny's 25 Sums). LayerNormGrad takes the other addend as an
optional sixth input R and writes dX + R from the row it has just computed, rounding dX to float first: the Sum's
own arithmetic (float addition commutes), so the step is bitwise the same with the pass on and off
(tests/passes/test_ln_grad_sum.py).

Taken: a fracgraph LayerNormGrad whose dX is read by one two-input Sum only (not a graph output), the Sum's other
addend of dX's shape as the graph states it (the same rank, the same dims or the same symbolic dim names: the Sum
must not broadcast). Kept, with the reason in the notes, otherwise. Runs after ln-grad; on with the fused kernels,
off with `--no-fused-kernels` or `BuildOptions.skip_passes=("ln-grad-sum",)`.
"""

from __future__ import annotations

from collections import Counter

from onnx import helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, graph_links, replace_nodes


def _dims(graph) -> dict[str, list]:
    """tensor -> its dims as the graph states them: int, the symbolic name, or None (unknown)."""
    out = {}
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return out


class LnGradSumPass(Pass):
    name = "ln-grad-sum"

    def call(self, model):
        graph = model.graph
        dims = _dims(graph)
        _, consumers = graph_links(graph)
        outputs = {o.name for o in graph.output}
        pairs, kept = [], Counter()
        for ln in list(graph.node):
            if ln.op_type != "LayerNormGrad" or ln.domain != DOMAIN or len(ln.input) != 5:
                continue
            dx = ln.output[0]
            readers = consumers.get(dx, [])
            if dx in outputs or len(readers) != 1 or readers[0].op_type != "Sum" or readers[0].domain not in ("", "ai.onnx"):
                kept["dX not read by one Sum only"] += 1
                continue
            s = readers[0]
            if len(s.input) != 2 or s.input[0] == s.input[1]:
                kept["the Sum has other than two distinct addends"] += 1
                continue
            r = s.input[1] if s.input[0] == dx else s.input[0]
            a, b = dims.get(dx), dims.get(r)
            if a is None or b is None or a != b or any(d is None for d in a):
                kept["the addends' shapes are not stated equal"] += 1
                continue
            pairs.append((ln, [helper.make_node("LayerNormGrad", list(ln.input) + [r],
                                                [s.output[0], ln.output[1], ln.output[2]],
                                                name=f"{ln.name}::ln_grad_sum", domain=DOMAIN)]))
            pairs.append((s, []))
        replace_nodes(graph, pairs)
        n = len(pairs) // 2
        notes = [f"{n} residual gradient Sums folded into LayerNormGrad"] if n else []
        notes += [f"{c} LayerNormGrad kept apart from its dX's readers ({why})" for why, c in sorted(kept.items())]
        return PassResult(model, bool(n), notes)

    def ensures(self, model):
        assert_inputs_defined(model)
