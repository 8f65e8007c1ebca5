"""Training-graph pass: onnxruntime's GELU gradient as fracgraph's `GeluGrad` (kernels/gelu.c).

onnxruntime's training-graph builder fuses the exporters' erf GELU (`x * 0.5 * (1 + Erf(x / sqrt 2))`, torch's
nn.GELU at opsets below 20) into com.microsoft Gelu, whose gradient is com.microsoft `GeluGrad(dY, X)`: one Eigen
expression on one thread in 1.19.2, about 4x PyTorch's gelu backward per call and 12% of convnext_atto's FW8/BW8
step (7.5% of the GPT's). fracgraph's GeluGrad computes the same derivative, `dY * (Phi(X) + X phi(X))`, on the
session's threads and AVX-512 lanes, within the error bound gelu.c states (its erf is not Eigen's: the values are
not bitwise onnxruntime's, so tests/passes/test_gelu_grad.py compares the kernel with float64 and the step with the
pass on and off within float rounding).

Per-op behaviour is the table below, keyed by onnxruntime's op type: a new GELU-family gradient is one entry (and
its kernel). FastGeluGrad, the gradient of the tanh approximation that onnxruntime fuses from GPT-2's `gelu_new`
(also GPT-Neo, GPT-J, Phi, BLOOM among the hf: language models), is fracgraph's FastGeluGrad (gelu.c): onnxruntime's
runs on one thread, 31% of GPT-2's FW8/BW8 step at width 256, context 128 (`fracgraph profile`, 1 thread).
The fused-bias forms have no kernel yet (no exported model here produces them) and stay onnxruntime's.
"""

from __future__ import annotations

from onnx import helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, replace_nodes
from .fused_ops import import_domain

# onnxruntime op (domain com.microsoft) -> (fracgraph op, number of inputs it takes); None: kept, with the reason
GELU_GRADS = {
    "GeluGrad": ("GeluGrad", 2),
    "FastGeluGrad": ("FastGeluGrad", 2),
    "BiasGeluGrad_dX": None,
    "BiasFastGeluGrad_dX": None,
}
KEPT_WHY = "no fracgraph kernel for it (no exported model here produces the fused-bias GELU gradients)"


class GeluGradPass(Pass):
    name = "gelu-grad"
    fused = 0   # GeluGrad nodes written by the last call: the artifacts then need the kernels library

    def call(self, model):
        pairs, kept = [], {}
        for n in model.graph.node:
            if n.domain != "com.microsoft" or n.op_type not in GELU_GRADS:
                continue
            entry = GELU_GRADS[n.op_type]
            if entry is None or len(n.input) != entry[1]:
                kept[n.op_type] = kept.get(n.op_type, 0) + 1
                continue
            pairs.append((n, [helper.make_node(entry[0], list(n.input), list(n.output), name=f"{n.name}::gelu_grad",
                                               domain=DOMAIN)]))
        replace_nodes(model.graph, pairs)
        self.fused = len(pairs)
        if pairs:
            import_domain(model)
        done: dict[str, int] = {}
        for n, _ in pairs:
            done[n.op_type] = done.get(n.op_type, 0) + 1
        notes = [f"{c} {op} on fracgraph's {op}" for op, c in sorted(done.items(), key=lambda kv: kv[0] != "GeluGrad")]
        notes += [f"{c} {op} kept on onnxruntime's kernel: {KEPT_WHY}" for op, c in sorted(kept.items())]
        return PassResult(model, bool(pairs), notes)

    def ensures(self, model):
        assert_inputs_defined(model)
        left = [n.name for n in model.graph.node if n.domain == "com.microsoft" and GELU_GRADS.get(n.op_type)
                and len(n.input) == GELU_GRADS[n.op_type][1]]
        if self.fused and left:
            raise AssertionError(f"GeluGrad left on onnxruntime's kernel: {left[:3]}")
