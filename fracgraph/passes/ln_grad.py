"""Training-graph pass: onnxruntime's LayerNormalizationGrad on fracgraph's LayerNormGrad (fracgraph/kernels).

onnxruntime 1.19.2 runs com.microsoft LayerNormalizationGrad on one thread, at ~9 ns per element (9 nodes, 10.6%
of vit_tv's profiled FW8/BW8 step at batch 32; `python bench/model_speed.py --models vit_tv --profile`). The
same formula (dX = inv_std (a - mean(a) - b mean(a b)), a = dY scale, b = (X - mean) inv_std; dscale = sum dY b,
dbias = sum dY) runs in fused_ops.c with blocks of rows as tasks; the sums run in another order (and in double),
so the kernel is compared with a float64 reference and the step with the pass on and off within float rounding
(tests/passes/test_ln_grad.py). Taken where the node has its three outputs and scale is the whole normalized
shape (X's axes from `axis` on, where the shapes are known); otherwise onnxruntime's op stays and the notes say why.
"""

from __future__ import annotations

import math

from onnx import helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, replace_nodes
from .fused_ops import import_domain


def _shapes(graph) -> dict[str, list]:
    out = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
           for v in list(graph.input) + list(graph.value_info) + list(graph.output) if v.type.tensor_type.HasField("shape")}
    out.update({t.name: list(t.dims) for t in graph.initializer})
    return out


class LnGradPass(Pass):
    name = "ln-grad"
    fused = 0   # LayerNormGrad nodes written by the last call

    def call(self, model):
        shapes = _shapes(model.graph)
        pairs, notes = [], []
        for n in model.graph.node:
            if n.op_type != "LayerNormalizationGrad" or n.domain != "com.microsoft":
                continue
            why = self._decline(n, shapes)
            if why:
                notes.append(f"{n.name}: kept onnxruntime's LayerNormalizationGrad ({why})")
                continue
            pairs.append((n, [helper.make_node("LayerNormGrad", list(n.input), list(n.output), name=n.name, domain=DOMAIN)]))
        replace_nodes(model.graph, pairs)
        self.fused = len(pairs)
        if pairs:
            import_domain(model)
        return PassResult(model, bool(pairs), [f"{len(pairs)} LayerNormalizationGrad on fracgraph's LayerNormGrad"] + notes)

    @staticmethod
    def _decline(n, shapes) -> str | None:
        if len(n.input) != 5 or len(n.output) != 3 or not all(n.output):
            return "not the 5-input, 3-output form"
        x, scale = shapes.get(n.input[1]), shapes.get(n.input[2])
        if not x or not scale or any(d is None for d in scale):
            return "shapes not known"
        axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), -1) % len(x)
        tail = x[axis:]
        if any(d is None for d in tail) or math.prod(tail) != math.prod(scale):
            return f"scale {scale} is not the normalized shape {tail}"
        return None

    def ensures(self, model):
        assert_inputs_defined(model)
