"""Training-graph pass: keep each activation quant point's running range as an EMA, in the graph.

`run = m*run + (1-m)*batch` for the batch min and range (spec §1.2, buffers start at 0, no bias correction).
ORT's InPlaceAccumulatorV2 writes the frozen checkpoint buffer in place, like BatchNorm's running stats, so the
host does no per-step work. The update flags are reduced to one extra graph output that keeps the nodes alive.
"""

from __future__ import annotations

from onnx import TensorProto, helper

from ..manifest import QuantPoint
from ..quantizers import Emitter, ema_update
from .base import Pass, PassResult, opset

EMA_OUTPUT = "fracgraph::act_ranges_updated"


class ActRangeEmaPass(Pass):
    name = "act-range-ema"

    def __init__(self, points: list[QuantPoint], momentum: float):
        self.points = [p for p in points if p.kind == "act"]
        self.momentum = momentum

    def requires(self, model):
        inputs = {i.name for i in model.graph.input}
        for p in self.points:
            assert f"{p.name}.run_min" in inputs, f"{p.name}.run_min is not a checkpoint buffer of the training graph"

    def call(self, model):
        if not self.points:
            return PassResult(model, False, ["no activation quant points"])
        em = Emitter(model.graph, opset(model))
        flags = []
        for p in self.points:
            flags.append(ema_update(em, f"{p.name}.run_min", f"{p.name}/min", self.momentum, f"{p.name}/ema_min"))
            flags.append(ema_update(em, f"{p.name}.run_range", f"{p.name}/range", self.momentum, f"{p.name}/ema_range"))
        casts = [em.node("Cast", [f], f"{f}/i", to=TensorProto.FLOAT) for f in flags]
        em.node("Sum", casts, EMA_OUTPUT) if len(casts) > 1 else em.node("Identity", casts, EMA_OUTPUT)
        em.flush()
        model.graph.output.append(helper.make_tensor_value_info(EMA_OUTPUT, TensorProto.FLOAT, []))
        return PassResult(model, True, [f"{len(self.points)} activation ranges tracked by EMA (m={self.momentum})"])
