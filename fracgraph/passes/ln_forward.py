"""Training-graph pass: onnxruntime's LayerNormalization on fracgraph's `LayerNorm` (kernels/layer_norm.c).

onnxruntime 1.19.2's CPU LayerNormalization sums each row (the normalized axes) with two chains of dependent float
adds, ~4 cycles an element: 25 nodes, 2.7% of vit_tiny's profiled FW8/BW8 step at batch 32 (session 13), every
transformer's pre-norms. fracgraph's `LayerNorm` runs onnxruntime's own statements in the same order per row, several
rows' chains side by side, and vectorizes the elementwise part, so Y, mean and inv_std are bitwise onnxruntime's
(tests/passes/test_ln_forward.py) and the step's loss and every gradient are the same with the pass on and off.

Taken: a LayerNormalization (ai.onnx) with a scale and a bias, float statistics (stash_type 1), X known to be a float
tensor. Kept on onnxruntime's op, with the reason in the notes: no bias, another stash type, X's type not known to
be float. The channels-first norms (Transpose -> LayerNormalization -> Transpose) are ln-channels' (it runs first).
On with the fused kernels; off with `--no-fused-kernels` or `BuildOptions.skip_passes=("ln-forward",)`.
"""

from __future__ import annotations

from collections import Counter

from onnx import TensorProto, helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, replace_nodes
from .fused_ops import import_domain
from .permute import _types


class LnForwardPass(Pass):
    name = "ln-forward"
    fused = 0   # LayerNorm nodes written by the last call

    def call(self, model):
        types = _types(model.graph)
        pairs, kept = [], Counter()
        for n in model.graph.node:
            if n.op_type != "LayerNormalization" or n.domain not in ("", "ai.onnx"):
                continue
            why = self._decline(n, types)
            if why:
                kept[why] += 1
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            outs = [n.output[k] if k < len(n.output) and n.output[k] else f"{n.name}::ln_forward/{s}"
                    for k, s in enumerate(("y", "mean", "inv_std"))]
            pairs.append((n, [helper.make_node("LayerNorm", list(n.input), outs, name=n.name, domain=DOMAIN,
                                               axis=int(attrs.get("axis", -1)),
                                               epsilon=float(attrs.get("epsilon", 1e-5)))]))
        replace_nodes(model.graph, pairs)
        self.fused = len(pairs)
        if pairs:
            import_domain(model)
        notes = [f"{self.fused} LayerNormalization on fracgraph's LayerNorm"] if pairs else []
        notes += [f"{c} LayerNormalization kept on onnxruntime's op ({why})" for why, c in sorted(kept.items())]
        return PassResult(model, bool(pairs), notes)

    @staticmethod
    def _decline(n, types) -> str | None:
        if len(n.input) < 3 or not n.input[2]:
            return "no bias"
        if not n.output or not n.output[0]:
            return "no output Y"
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("stash_type", 1) != 1:
            return "statistics not in float (stash_type)"
        if types.get(n.input[0], (None, None))[0] != TensorProto.FLOAT:
            return "X not known to be float"
        return None

    def ensures(self, model):
        assert_inputs_defined(model)
