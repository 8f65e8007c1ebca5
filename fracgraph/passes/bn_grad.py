"""Training-graph pass: onnxruntime's BatchNormalizationGrad on fracgraph's BatchNormGrad (fracgraph/kernels).

The same formula in two reads per channel with channels as tasks on the session's threads (fused_ops.c); the
sums run in another order (and in double across images), so the step is compared with the pass on and off
within float rounding (tests/passes/test_bn_grad.py).
"""

from __future__ import annotations

from onnx import helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, replace_nodes
from .fused_ops import import_domain


class BnGradPass(Pass):
    name = "bn-grad"
    fused = 0   # BatchNormGrad nodes written by the last call

    def call(self, model):
        pairs = [(n, [helper.make_node("BatchNormGrad", list(n.input), list(n.output), name=n.name, domain=DOMAIN)])
                 for n in model.graph.node
                 if n.op_type == "BatchNormalizationGrad" and n.domain == "com.microsoft" and len(n.input) == 5
                 and len(n.output) == 3 and all(n.output)]
        replace_nodes(model.graph, pairs)
        self.fused = len(pairs)
        if pairs:
            import_domain(model)
        return PassResult(model, bool(pairs), [f"{len(pairs)} BatchNormalizationGrad on fracgraph's BatchNormGrad"])

    def ensures(self, model):
        assert_inputs_defined(model)
