"""Lowering for training: ops onnxruntime-training 1.19.2 cannot differentiate rewritten into ops it can.

`LOWERINGS` maps an op type to one rewrite (one module per op family: pool, variadic, activation, norm, shape;
mask: a constant attention mask's `Where` as a bias `Add`, for speed);
`LowerPass` applies them to a shape-inferred model; `load_model` runs it, so `inspect`, `estimate` and `quantize`
all see the lowered graph. `gradients.py` holds the table of ops that have a gradient and the one-line refusal for
the rest; `heads.py` normalizes a classifier's output for the loss.
"""

from __future__ import annotations

import onnx

from ..analysis.optable import LOWERED_PREFIX, value_shapes
from ..passes.base import Pass, PassResult, replace_nodes
from . import activation, mask, norm, pool, shape, variadic  # noqa: F401  (they fill LOWERINGS)
from .base import LOWERINGS, Ctx

__all__ = ["LOWERINGS", "LOWERED_PREFIX", "LowerPass"]


class LowerPass(Pass):
    """Replace every node that has an entry in `LOWERINGS` (ai.onnx domain) by its lowering; a lowering that
    declines leaves the node as it is and says why in the notes."""

    name = "lower"

    def requires(self, model: onnx.ModelProto) -> None:
        assert len({n.name for n in model.graph.node}) == len(model.graph.node), "node names must be unique"

    def call(self, model: onnx.ModelProto) -> PassResult:
        from ..passes.base import opset

        ctx = Ctx(model, value_shapes(model), opset(model))
        pairs, notes = [], []
        for node in list(model.graph.node):
            fn = LOWERINGS.get(node.op_type)
            if fn is None or node.domain not in ("", "ai.onnx") or node.name.startswith(LOWERED_PREFIX):
                continue
            ctx.begin(node)
            got = fn(ctx, node)
            if isinstance(got, str):
                notes.append(f"{node.name} ({node.op_type}) kept: {got}")
                continue
            pairs.append((node, got))
            notes.append(f"{node.name} ({node.op_type}) -> {', '.join(n.op_type for n in got)}")
        replace_nodes(model.graph, pairs)
        model.graph.initializer.extend(ctx.inits)
        return PassResult(model, bool(pairs), notes)

    def ensures(self, model: onnx.ModelProto) -> None:
        from ..passes.base import assert_inputs_defined

        assert_inputs_defined(model)
