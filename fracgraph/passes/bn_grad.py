"""Training-graph pass: onnxruntime's BatchNormalizationGrad on fracgraph's BatchNormGrad, and its training-mode
BatchNormInternal (the forward) on fracgraph's BatchNormTrain (fracgraph/kernels).

The same formulas with channels as tasks on the session's threads (fused_ops.c): the gradient in two reads per
channel; the forward in three (mean, variance, output; onnxruntime runs its three passes on one thread, 6.6-8.8%
of resnet20's and mobilenet_v2's profiled steps). The sums run in another order (and in double), so the step is
compared with the pass on and off within float rounding (tests/passes/test_bn_grad.py). onnxruntime's forward
aliases its running statistics' outputs to their inputs, which is how a step updates the model's buffers (the
eval graph reads them); BatchNormTrain writes both, and the test checks the buffers after steps. Taken for the
5-output, spatial, training-mode form.
"""

from __future__ import annotations

from onnx import helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, replace_nodes
from .dfq_candidates import BnChainPass
from .fused_ops import import_domain


class BnGradPass(Pass):
    name = "bn-grad"
    fused = 0   # BatchNormGrad nodes written by the last call

    def call(self, model):
        pairs = [(n, [helper.make_node("BatchNormGrad", list(n.input), list(n.output), name=n.name, domain=DOMAIN)])
                 for n in model.graph.node
                 if n.op_type == "BatchNormalizationGrad" and n.domain == "com.microsoft" and len(n.input) == 5
                 and len(n.output) == 3 and all(n.output)]
        n_grad = len(pairs)
        produced = {o for n in model.graph.node for o in n.output}
        read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        for n in model.graph.node:
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            # the running statistics must be the checkpoint's buffers, read and written by this node alone (DFQ's
            # candidate chain, passes/dfq_candidates.py, passes them from clone to clone through onnxruntime's
            # aliases, which an in-place write of a separate output would break): otherwise onnxruntime's op stays
            if n.op_type == "BatchNormInternal" and n.domain == "com.microsoft" and len(n.input) == 5 \
                    and len(n.output) == 5 and all(n.output) and a.get("training_mode", 0) == 1 and a.get("spatial", 1) == 1 \
                    and not {n.input[3], n.input[4]} & produced and not {n.output[1], n.output[2]} & read \
                    and not BnChainPass._NAME.match(n.name):   # (the chain is written after this pass)
                pairs.append((n, [helper.make_node("BatchNormTrain", list(n.input), list(n.output), name=n.name, domain=DOMAIN,
                                                   epsilon=float(a.get("epsilon", 1e-5)), momentum=float(a.get("momentum", 0.9)))]))
        replace_nodes(model.graph, pairs)
        self.fused = len(pairs)
        if pairs:
            import_domain(model)
        return PassResult(model, bool(pairs), [f"{n_grad} BatchNormalizationGrad on fracgraph's BatchNormGrad, "
                                               f"{len(pairs) - n_grad} BatchNormInternal on BatchNormTrain"])

    def ensures(self, model):
        assert_inputs_defined(model)
