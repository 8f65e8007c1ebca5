"""Training-graph pass (opt-in, `quantize --sr-noise shared`): one stochastic-rounding draw per step for all BW
quantizers.

onnxruntime's RandomUniformLike takes about 4 ns per element (bench/kernel_probes.py): the resnet20 step's 21 error
quantizers spend ~110 ms of a ~700 ms step making noise (`fracgraph profile`). With this pass the step draws
U(-0.5, 0.5) once, shaped like the largest quantized GEMM output, and each quantizer reads a contiguous piece of
it at its own offset, drawn uniformly per step:

    noise_l = Reshape(Slice(U, o_l, o_l + n_l), shape_l),   o_l ~ U{0 .. N - n_l}

What stays: every layer's noise is i.i.d. U(-0.5, 0.5) within the layer, fresh every step, so each rounding is
unbiased as before. What changes: layers no longer draw independently: two layers' noises are shifted views of
one draw (element i of layer l and element i + o_l - o_m of layer m share a value). That is a different random
process than the independent default, so the pass is opt-in and the manifest records `grad_noise: shared`.
The forward GEMM output (not the error) gives the shapes, so the draw does not wait for the backward pass.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..quantizers import Emitter
from .base import Pass, PassResult, assert_inputs_defined, opset, replace_nodes

SUFFIX = "::bwq/noise"


class SharedNoisePass(Pass):
    name = "shared-noise"

    def __init__(self, shapes: dict[str, list]):
        self.shapes = shapes   # forward tensor name -> static shape (batch dim may be None)

    def call(self, model):
        graph = model.graph
        by_name = {n.name: n for n in graph.node}
        noise_nodes = [n for n in graph.node if n.op_type == "RandomUniformLike" and n.name.endswith(SUFFIX)]
        if len(noise_nodes) < 2:
            return PassResult(model, False, ["shared-noise: fewer than two error quantizers; nothing to share"])
        fwd = {}
        for n in noise_nodes:
            gemm = by_name.get(n.name[: -len(SUFFIX)])
            shape = self.shapes.get(gemm.output[0]) if gemm is not None else None
            if not shape or any(d is None for d in shape[1:]):
                return PassResult(model, False, [f"shared-noise: {n.name}: the GEMM output has no static shape; noise kept per layer"])
            fwd[n.name] = (gemm.output[0], int(np.prod(shape[1:])))
        big = max(fwd.values(), key=lambda t: t[1])[0]
        em = Emitter(graph, opset(model))
        draw = em.node("RandomUniformLike", [big], "fg::shared_noise/draw", low=-0.5, high=0.5)
        flat = em.node("Reshape", [draw, em.const([-1], np.int64)], "fg::shared_noise/flat")
        total = em.node("Size", [big], "fg::shared_noise/size")
        pairs = []
        for n in noise_nodes:
            t, _ = fwd[n.name]
            base = n.name + "::shared"
            size = em.node("Size", [t], f"{base}/n")
            room = em.node("Add", [em.node("Sub", [total, size], f"{base}/slack"), em.const(1, np.int64)], f"{base}/room")
            r = em.node("RandomUniform", [], f"{base}/r", shape=[1], dtype=TensorProto.DOUBLE, low=0.0, high=1.0)
            off_f = em.node("Floor", [em.node("Mul", [r, em.node("Cast", [room], f"{base}/room_f", to=TensorProto.DOUBLE)],
                                              f"{base}/scaled")], f"{base}/off_f")
            off = em.node("Min", [em.node("Cast", [off_f], f"{base}/off_i", to=TensorProto.INT64),
                                  em.node("Sub", [room, em.const(1, np.int64)], f"{base}/last")], f"{base}/off")
            end = em.node("Add", [off, em.node("Reshape", [size, em.const([1], np.int64)], f"{base}/n1")], f"{base}/end")
            piece = em.node("Slice", [flat, off, end], f"{base}/piece")
            em.nodes.append(helper.make_node("Reshape", [piece, em.node("Shape", [n.input[0]], f"{base}/shape")],
                                             [n.output[0]], name=f"{base}/noise"))
            pairs.append((n, em.nodes))
            em.nodes = []
        replace_nodes(graph, pairs)
        return PassResult(model, True, [f"shared-noise: {len(noise_nodes)} error quantizers read one U(-0.5, 0.5) draw "
                                        f"shaped like {big}, each at its own random offset"])

    def ensures(self, model):
        assert_inputs_defined(model)
