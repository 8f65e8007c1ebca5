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

With fracgraph's kernels (the default), the reorder is one `NchwcWeight(W)` (fused_ops.c) instead of Reshape,
Transpose and Reshape: onnxruntime's 6-D Transpose ran resnet18's 512x512x3x3 reorder at ~40x the time of an
Add over the same tensor (bench/kernel_probes.py --only reorder), 28% of resnet18's step before. It also folds
in conv-grad-split's channel transpose and kernel flip of the weight of a stride-1 dX conv (whose Transpose and
Slice are then dropped), so that weight is read once per step instead of three times.

B is the block size of the machine that builds (`runtime.nchwc_block_size`); the manifest records it and a
session on a CPU with another block size refuses the artifacts (the reorder would be wrong there).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..kernels import DOMAIN
from ..quantizers import Emitter
from .base import Pass, PassResult, assert_inputs_defined, opset, replace_nodes
from .fused_ops import import_domain

NCHWC_DOMAIN = "com.microsoft.nchwc"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class NchwcConvPass(Pass):
    name = "nchwc-conv"

    def __init__(self, shapes: dict[str, list], block: int, fused: bool = False):
        self.shapes = shapes   # tensor name -> static shape, for the weights
        self.block = block
        self.fused = fused     # weight reorders on fracgraph's NchwcWeight (the kernels build here)

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
        self._producer = {o: n for n in graph.node for o in n.output}
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
        if self.fused and pairs:
            _drop_dead(graph, ("::split/w_flip", "::split/w_t", "::split/w_gt", "::split/w_g"))
            import_domain(model)
        if pairs:
            notes.insert(0, f"{len(pairs)} Conv on NCHWc kernels (block {self.block})"
                            + (", weights reordered by fracgraph's NchwcWeight" if self.fused else ""))
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
        if self.fused:   # one pass over W, folding in conv-grad-split's transpose and flip of it
            src, transpose, flip = self._source(w, group)
            wb = em.node("NchwcWeight", [src], f"{base}/w", domain=DOMAIN, block=B, blocked_in=int(blocked_in and group == 1),
                         transpose=int(transpose), flip=int(flip))
        elif blocked_in and group == 1:   # OIHWBiBo
            r = em.node("Reshape", [w, em.const([o // B, B, c // B, B, kh, kw], np.int64)], f"{base}/w6")
            t = em.node("Transpose", [r], f"{base}/w6t", perm=[0, 2, 4, 5, 3, 1])
        else:                            # OIHWBo
            r = em.node("Reshape", [w, em.const([o // B, B, c, kh, kw], np.int64)], f"{base}/w5")
            t = em.node("Transpose", [r], f"{base}/w5t", perm=[0, 2, 3, 4, 1])
        if not self.fused:
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

    def _source(self, w: str, group: int) -> tuple[str, bool, bool]:
        """(tensor, transpose, flip): W' = w, or conv-grad-split's flip (Slice; kernels above 1x1) of its channel
        transpose (Transpose; group 1) or of the weight itself (depthwise), followed back to the forward weight."""
        src, flip = w, False
        node = self._producer.get(src)
        if node is not None and node.op_type == "Slice" and node.output[0].endswith("::split/w_flip"):
            src, flip = node.input[0], True
            node = self._producer.get(src)
        if group == 1 and node is not None and node.op_type == "Transpose" and node.output[0].endswith("::split/w_t") \
                and list(helper.get_attribute_value(node.attribute[0])) == [1, 0, 2, 3]:
            return node.input[0], True, flip
        if group == 1 and flip:   # a flip of something else: leave W' as it is
            return w, False, False
        return src, False, flip

    def ensures(self, model):
        assert_inputs_defined(model)


def _drop_dead(graph: onnx.GraphProto, suffixes: tuple[str, ...]) -> None:
    """Remove the nodes with an output ending in one of `suffixes` that nothing reads any more (conv-grad-split's
    weight transposes and flips, now folded into NchwcWeight), with their value_info."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.output[0].endswith(suffixes) and not any(o in used for o in n.output)]
        if not dead:
            return
        names, gone = {o for n in dead for o in n.output}, {id(n) for n in dead}
        keep = [n for n in graph.node if id(n) not in gone]
        del graph.node[:]
        graph.node.extend(keep)
        keep_vi = [v for v in graph.value_info if v.name not in names]
        del graph.value_info[:]
        graph.value_info.extend(keep_vi)
