"""Training-graph pass: split `ConvGrad` into a dW-only ConvGrad and a forward-style conv for dX.

onnxruntime 1.19.2's CPU ConvGrad computes dX with a slow col2im path that scales poorly with threads; the same
dX is the transposed convolution of dY with W, which the forward Conv/ConvTranspose kernels do fast
(`bench/step_time.py` and `fracgraph profile` show the effect on the whole step):

- stride 1: dX = Conv(dY, W') with W' the per-group K<->C transpose of W, flipped on the kernel axes, and pads
  d(k-1) - p (declined where that is negative, i.e. a pad larger than the kernel reach);
- stride > 1: dX = ConvTranspose(dY, W) with the conv's strides/pads/dilations/group and the output_padding that
  gives back X's spatial shape (static spatial shape of X required; declined otherwise).

ConvGrad keeps dW and dB (its dX output becomes ""). A ConvGrad whose dX is not needed (X does not require a
gradient, e.g. the first conv) is left alone.
"""

from __future__ import annotations


import numpy as np
import onnx
from onnx import helper

from ..quantizers import Emitter
from .base import Pass, PassResult, assert_inputs_defined, graph_links, opset, replace_nodes


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class ConvGradSplitPass(Pass):
    name = "conv-grad-split"

    def __init__(self, shapes: dict[str, list]):
        self.shapes = shapes     # tensor name -> static shape (None for unknown dims), from forward shape inference

    def call(self, model):
        graph = model.graph
        em = Emitter(graph, opset(model))
        weight_shapes = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                         for i in graph.input}
        weight_shapes.update({t.name: list(t.dims) for t in graph.initializer})
        consumers = graph_links(graph)[1]
        graph_outputs = {o.name for o in graph.output}
        notes, pairs = [], []
        for node in list(graph.node):
            if node.op_type != "ConvGrad" or node.domain != "com.microsoft":
                continue
            if len(node.output) == 0 or not node.output[0]:
                notes.append(f"{node.name}: kept (no dX needed)")
                continue
            if node.output[0] in graph_outputs:
                notes.append(f"{node.name}: kept (its dX is a graph output)")
                continue
            dy, x, w = node.input[0], node.input[1], node.input[2]
            reason = self._lower(em, node, dy, x, w, weight_shapes.get(w) or self.shapes.get(w))
            if reason is None:
                for consumer in consumers[node.output[0]]:   # the new dX tensor replaces ConvGrad's
                    for k, i in enumerate(consumer.input):
                        if i == node.output[0]:
                            consumer.input[k] = f"{node.name}::split/dX"
                node.output[0] = ""
                notes.append(f"{node.name}: dX as {em.nodes[-1].op_type}, ConvGrad keeps dW")
                pairs.append((node, em.nodes + [node]))
                em.nodes = []
            else:
                em.nodes = []
                notes.append(f"{node.name}: kept ConvGrad ({reason})")
        replace_nodes(graph, pairs)
        return PassResult(model, bool(pairs), notes)

    def _lower(self, em: Emitter, node, dy: str, x: str, w: str, w_shape) -> str | None:
        a = _attrs(node)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad"
        if not w_shape or any(d is None for d in w_shape):
            return "weight shape unknown"
        k_out, c_per_group, *kernel = w_shape
        nd = len(kernel)
        group = a.get("group", 1)
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        pads = list(a.get("pads", [0] * 2 * nd))
        base = f"{node.name}::split"
        dx = f"{base}/dX"
        if all(s == 1 for s in strides):
            new_pads = [dil[i] * (kernel[i] - 1) - pads[i] for i in range(nd)] + \
                       [dil[i] * (kernel[i] - 1) - pads[nd + i] for i in range(nd)]
            if min(new_pads) < 0:
                return f"pads {pads} exceed the kernel reach"
            wt = w
            k_per_group = k_out // group
            if c_per_group != 1 or k_per_group != 1:   # depthwise (1 in, 1 out per group) needs no transpose
                if group == 1:
                    wt = em.node("Transpose", [w], f"{base}/w_t", perm=[1, 0] + list(range(2, 2 + nd)))
                else:
                    g5 = em.node("Reshape", [w, em.const([group, k_per_group, c_per_group] + kernel, np.int64)], f"{base}/w_g")
                    t5 = em.node("Transpose", [g5], f"{base}/w_gt", perm=[0, 2, 1] + list(range(3, 3 + nd)))
                    wt = em.node("Reshape", [t5, em.const([group * c_per_group, k_per_group] + kernel, np.int64)], f"{base}/w_t")
            if any(k > 1 for k in kernel):
                axes = list(range(2, 2 + nd))
                wt = em.node("Slice", [wt, em.const([-1] * nd, np.int64), em.const([np.iinfo(np.int64).min] * nd, np.int64),
                                       em.const(axes, np.int64), em.const([-1] * nd, np.int64)], f"{base}/w_flip")
            if wt != w:   # its static shape, for later passes (nchwc-conv)
                em.graph.value_info.append(helper.make_tensor_value_info(
                    wt, onnx.TensorProto.FLOAT, [group * c_per_group, k_per_group] + kernel))
            em.node("Conv", [dy, wt], dx, kernel_shape=kernel, pads=new_pads, dilations=dil, group=group,
                    strides=[1] * nd)
            self._record(em, dx, x)
            return None
        x_shape = self.shapes.get(x)
        if not x_shape or len(x_shape) != nd + 2 or any(d is None for d in x_shape[2:]):
            return "strided and the input's spatial shape is not static"
        out_pad = [(x_shape[2 + i] + pads[i] + pads[nd + i] - dil[i] * (kernel[i] - 1) - 1) % strides[i] for i in range(nd)]
        em.node("ConvTranspose", [dy, w], dx, kernel_shape=kernel, pads=pads, dilations=dil, group=group,
                strides=strides, output_padding=out_pad)
        self._record(em, dx, x)
        return None

    def _record(self, em: Emitter, dx: str, x: str) -> None:
        """dX has X's shape: its static dims, for later passes (nchwc-conv's shape-aware forms)."""
        x_shape = self.shapes.get(x)
        if x_shape and all(d is not None for d in x_shape[1:]):
            em.graph.value_info.append(helper.make_tensor_value_info(dx, onnx.TensorProto.FLOAT, [None] + list(x_shape[1:])))

    def ensures(self, model):
        assert_inputs_defined(model)


def forward_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Static shapes of the forward graph's tensors (dynamic dims as None), for passes on the generated graphs."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:   # no shapes: strided convs then keep ConvGrad, and the pass notes say why
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes
