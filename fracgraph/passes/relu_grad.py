"""Training-graph pass: `ReluGrad` as Greater, Cast and Mul.

onnxruntime 1.19.2's CPU ReluGrad (dX = dY where X > 0, else 0) is slow: 9-11 ms for a 128x16x32x32 tensor on
2 cores, 10% of the resnet20 training step (`fracgraph profile`). The same values come from
`Mul(dY, Cast(Greater(X, 0)))`, three multithreaded elementwise kernels that together take 0.15x that
(bench/kernel_probes.py). The results are identical for every finite dY (dY * 1 = dY, dY * 0 = 0 up to the sign
of zero); an infinite or NaN dY where X <= 0 gives NaN instead of 0, a step that has already diverged.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..quantizers import Emitter
from .base import Pass, PassResult, assert_inputs_defined, opset, replace_nodes


class ReluGradLoweringPass(Pass):
    name = "relu-grad"

    def call(self, model):
        graph = model.graph
        em = Emitter(graph, opset(model))
        zero = None
        pairs = []
        for node in list(graph.node):
            if node.op_type != "ReluGrad" or node.domain != "com.microsoft":
                continue
            zero = zero or em.const(0.0, np.float32)
            dy, x = node.input[0], node.input[1]
            base = f"{node.name}::lowered"
            on = em.node("Greater", [x, zero], f"{base}/on")
            mask = em.node("Cast", [on], f"{base}/mask", to=TensorProto.FLOAT)
            # the Mul writes ReluGrad's own output tensor, which the Emitter (rightly) treats as taken
            em.nodes.append(helper.make_node("Mul", [dy, mask], [node.output[0]], name=f"{base}/dX"))
            pairs.append((node, em.nodes))
            em.nodes = []
        replace_nodes(graph, pairs)
        notes = [f"{len(pairs)} ReluGrad as Mul(dY, Cast(Greater(X, 0)))"] if pairs else []
        return PassResult(model, bool(pairs), notes)

    def ensures(self, model):
        assert_inputs_defined(model)

