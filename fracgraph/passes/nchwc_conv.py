"""Training-graph pass: run 2-D `Conv`s on onnxruntime's NCHWc kernels.

onnxruntime's fastest CPU convolution is `com.microsoft.nchwc.Conv` on channel-blocked tensors (blocks of 8
channels with AVX2, 16 with AVX-512), but its inference-time NchwcTransformer only rewrites convs whose weight is
a constant, and a training graph's weights are not. This pass does the rewrite with the weight reordered in the
graph every step, so the forward convs and the stride-1 dX convs of `conv-grad-split` use it:

    X --ReorderInput--> NchwcConv(W reordered) --ReorderOutput--> Y

The reorder of W [O, C, kh, kw] is a Reshape and a Transpose into the kernel's filter layout (the tensor keeps
its logical OIHW shape): OIHWBiBo = [O/B, C/B, kh, kw, Bi, Bo] when C is a multiple of B, OIHWBo =
[O/B, C, kh, kw, Bo] when C < B (the input then stays NCHW) and for depthwise convs. The rules are those of the
transformer: O a multiple of B, C < B or a multiple of B, groups only depthwise. The values are the same
convolution, summed in another order (float rounding differs). Measured per conv on resnet20 shapes on 2 cores,
reorders included, the NCHWc form takes 0.5-0.75x the time of Conv (bench/kernel_probes.py; bench/step_time.py
for the whole step).

B is the block size of the machine that builds (`runtime.nchwc_block_size`); the manifest records it and a
session on a CPU with another block size refuses the artifacts (the reorder would be wrong there).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..quantizers import Emitter
from .base import Pass, PassResult, assert_inputs_defined, opset, replace_nodes

NCHWC_DOMAIN = "com.microsoft.nchwc"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class NchwcConvPass(Pass):
    name = "nchwc-conv"

    def __init__(self, shapes: dict[str, list], block: int):
        self.shapes = shapes   # tensor name -> static shape, for the weights
        self.block = block

    def call(self, model):
        graph = model.graph
        if self.block <= 1:
            return PassResult(model, False, ["nchwc-conv: this CPU's onnxruntime has no NCHWc kernels; convs kept"])
        em = Emitter(graph, opset(model))
        shapes = dict(self.shapes)
        for vi in list(graph.value_info) + list(graph.input):
            shapes.setdefault(vi.name, [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim])
        shapes.update({t.name: list(t.dims) for t in graph.initializer})
        notes, pairs = [], []
        for node in list(graph.node):
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
                continue
            reason = self._rewrite(em, node, shapes.get(node.input[1]))
            if reason is None:
                pairs.append((node, em.nodes))
                em.nodes = []
            else:
                em.nodes = []
                notes.append(f"{node.name}: kept Conv ({reason})")
        replace_nodes(graph, pairs)
        if pairs:
            notes.insert(0, f"{len(pairs)} Conv on NCHWc kernels (block {self.block})")
            if not any(o.domain == NCHWC_DOMAIN for o in model.opset_import):
                model.opset_import.append(helper.make_opsetid(NCHWC_DOMAIN, 1))
        return PassResult(model, bool(pairs), notes)

    def _rewrite(self, em: Emitter, node, w_shape) -> str | None:
        a = _attrs(node)
        B = self.block
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad"
        if not w_shape or len(w_shape) != 4 or any(not d for d in w_shape):
            return "weight shape not static 2-D"
        o, c, kh, kw = w_shape
        group = a.get("group", 1)
        if o % B:
            return f"{o} output channels, not a multiple of {B}"
        if group == 1:
            blocked_in = c >= B
            if blocked_in and c % B:
                return f"{c} input channels, neither < {B} nor a multiple of it"
        elif c == 1 and o == group:
            blocked_in = True   # depthwise: input reordered, filter OIHWBo
        else:
            return "grouped (not depthwise)"
        base = f"{node.name}::nchwc"
        w = node.input[1]
        if blocked_in and group == 1:   # OIHWBiBo
            r = em.node("Reshape", [w, em.const([o // B, B, c // B, B, kh, kw], np.int64)], f"{base}/w6")
            t = em.node("Transpose", [r], f"{base}/w6t", perm=[0, 2, 4, 5, 3, 1])
        else:                            # OIHWBo
            r = em.node("Reshape", [w, em.const([o // B, B, c, kh, kw], np.int64)], f"{base}/w5")
            t = em.node("Transpose", [r], f"{base}/w5t", perm=[0, 2, 3, 4, 1])
        wb = em.node("Reshape", [t, em.const([o, c, kh, kw], np.int64)], f"{base}/w")
        x = node.input[0]
        if blocked_in:
            x = em.node("ReorderInput", [x], f"{base}/x", domain=NCHWC_DOMAIN)
        attrs = {k: v for k, v in a.items() if k in ("dilations", "group", "pads", "strides")}
        y = em.node("Conv", [x, wb] + list(node.input[2:3]), f"{base}/y", domain=NCHWC_DOMAIN,
                    kernel_shape=[kh, kw], **attrs)
        em.nodes.append(helper.make_node("ReorderOutput", [y], [node.output[0]], name=f"{base}/out",
                                         domain=NCHWC_DOMAIN, channels=o))
        return None

    def ensures(self, model):
        assert_inputs_defined(model)
