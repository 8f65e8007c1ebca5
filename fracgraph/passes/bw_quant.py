"""Training-graph pass: quantize each marked error tensor with stochastic rounding (spec §1.1-§1.2).

Replaces `<gemm>::bwq_Grad/Identity_0` (dL/dy -> dL/dy) by the per-tensor min/max quantizer with
U(-0.5, 0.5) noise before rounding, at the block's grad bits; 0 bits passes the error through.
With `expose_noise` the noise tensors also become graph outputs, so a test can replay the exact step. With
`expose_errors` so do the error entering each quantizer and its quantized error (`<gemm>::bwq/error`,
`<gemm>::bwq/error_q`): a reference can then check each quantizer on the very tensor it quantized and carry on
from its output, instead of letting a float-order difference upstream move an element across a rounding boundary
and the flip cascade through the quantizers above it (tests/conftest.py `ErrorReplay`).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..quantizers import Emitter, bits_scalar, fake_quant
from .base import Pass, PassResult, node_by_name, opset
from .bw_marker import gradient_node_name


class BwQuantPass(Pass):
    name = "bw-quant"

    def __init__(self, plan: list[tuple[str, int | str]], precision_input: str, expose_noise: bool = False,
                 const_bits: dict[str, float] | None = None, expose_errors: bool = False):
        self.plan = plan                  # (gemm name, block or bits key)
        self.precision_input = precision_input
        self.expose_noise = expose_noise
        self.expose_errors = expose_errors
        self.const_bits = const_bits or {}   # bits key -> constant grad bits (DFQ candidates)

    def requires(self, model):
        nodes = node_by_name(model)
        missing = [g for g, _ in self.plan if gradient_node_name(g) not in nodes]
        assert not missing, f"no gradient marker in the training graph for {missing[:3]} (was the error tensor pruned?)"

    def call(self, model):
        nodes = node_by_name(model)
        edges = {}
        for gemm, _ in self.plan:
            marker = nodes[gradient_node_name(gemm)]
            edges[gemm] = (marker.input[0], marker.output[0])
            model.graph.node.remove(marker)
        em = Emitter(model.graph, opset(model))
        for gemm, block in self.plan:
            g_in, g_out = edges[gemm]
            prefix = f"{gemm}::bwq"
            name = f"{self.precision_input}::b{block}.grad"
            if block in self.const_bits and not em.has(name):
                em.node("Identity", [em.const(np.float32(self.const_bits[block]))], name)
            fake_quant(em, g_in, g_out, prefix, bits_scalar(em, self.precision_input, block, "grad"),
                       stochastic=True, train_slack=False)
            if self.expose_noise:
                model.graph.output.append(helper.make_tensor_value_info(f"{prefix}/noise", TensorProto.FLOAT, None))
            if self.expose_errors:
                em.node("Identity", [g_in], f"{prefix}/error")
                em.node("Identity", [g_out], f"{prefix}/error_q")
                for out in ("error", "error_q"):
                    model.graph.output.append(helper.make_tensor_value_info(f"{prefix}/{out}", TensorProto.FLOAT, None))
        em.flush()
        return PassResult(model, bool(self.plan), [f"{g}: BW quant (block {b})" for g, b in self.plan])

    def ensures(self, model):
        nodes = node_by_name(model)
        assert not any(gradient_node_name(g) in nodes for g, _ in self.plan)
