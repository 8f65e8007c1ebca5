"""Training-graph pass: the weight gradient of 2-D convs on fracgraph's ConvGradW (fracgraph/kernels).

After conv-grad-split a conv's `ConvGrad(dY, X, W)` computes dW only. onnxruntime runs it as one im2col and
one small GEMM (16-64 output rows) per image, one image after another, 36% of the resnet20 FW8/BW8 step
once the quantizers are fused (`fracgraph profile`). `ConvGradW(dY, X)` splits the batch into tasks on the
session's threads, reads each image's taps straight from a zero-padded copy (stride 1; strided convs im2col each
image into a cache-resident buffer) and accumulates in an AVX-512 register tile (fused_ops.c): 0.4-0.6x the time
on resnet20's stride-1 shapes, 0.6-0.9x on its strided ones (bench/kernel_probes.py --only dw). Its values are
the same sum in another order, so unlike fused-ops this pass is not bitwise: its test compares loss and gradients
with it on and off within float rounding (tests/passes/test_conv_grad_w.py). Grouped or bias-gradient ConvGrads,
and those that still compute dX, are kept and the notes say why.
"""

from __future__ import annotations

from onnx import helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, replace_nodes
from .fused_ops import import_domain


class ConvGradWPass(Pass):
    name = "conv-grad-w"
    fused = 0   # ConvGradW nodes written by the last call

    def call(self, model):
        graph = model.graph
        pairs, notes = [], []
        for n in graph.node:
            if n.op_type != "ConvGrad" or n.domain != "com.microsoft":
                continue
            at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            kernel, strides = list(at.get("kernel_shape", [])), list(at.get("strides", [1, 1]))
            strides = strides if len(strides) == 2 else [0, 0]
            pads, dil = list(at.get("pads", [0, 0, 0, 0])), list(at.get("dilations", [1, 1]))
            auto_pad = at.get("auto_pad", b"NOTSET")
            outs = list(n.output) + [""] * (3 - len(n.output))
            why = ("not 2-D" if len(kernel) != 2 or len(pads) != 4 or len(dil) != 2 else
                   "it computes dX" if outs[0] else
                   "it computes the bias gradient" if outs[2] else
                   "no weight gradient" if not outs[1] else
                   "grouped" if at.get("group", 1) != 1 else
                   "strides or dilations below 1" if min(strides + dil) < 1 else
                   "auto_pad" if auto_pad not in (b"NOTSET", "NOTSET", 0, b"", "") else None)
            if why:
                notes.append(f"{n.name}: kept ConvGrad ({why})")
                continue
            pairs.append((n, [helper.make_node("ConvGradW", [n.input[0], n.input[1]], [outs[1]], name=n.name,
                                               domain=DOMAIN, kh=kernel[0], kw=kernel[1], sh=strides[0], sw=strides[1],
                                               ph=pads[0], pw=pads[1], dh=dil[0], dw=dil[1])]))
        replace_nodes(graph, pairs)
        self.fused = len(pairs)
        if pairs:
            import_domain(model)
        notes.insert(0, f"{len(pairs)} conv weight gradients on fracgraph's ConvGradW")
        return PassResult(model, bool(pairs), notes)


    def ensures(self, model):
        assert_inputs_defined(model)
