"""Eval-graph passes: make the generated eval model a correct inference model.

- `EvalRangesPass`: activation quant points use their running (EMA) ranges instead of the batch's (spec §1.2).
- `BnEvalFixPass`: ORT flips BatchNorm to training_mode=0 but leaves its extra outputs, which fails shape
  inference ("op outputs should be 1 when Training_mode = False"); drop them (ecosystem.md §1.5).
"""

from __future__ import annotations

from ..manifest import QuantPoint
from .base import Pass, PassResult


class EvalRangesPass(Pass):
    name = "eval-ranges"

    def __init__(self, points: list[QuantPoint]):
        self.points = [p for p in points if p.kind == "act"]

    def call(self, model):
        rename = {}
        for p in self.points:
            rename[f"{p.name}/min"] = f"{p.name}.run_min"
            rename[f"{p.name}/range"] = f"{p.name}.run_range"
        inputs = {i.name for i in model.graph.input}
        missing = [v for v in rename.values() if v not in inputs]
        if missing:
            raise ValueError(f"eval graph lacks running-range buffers {missing[:3]}")
        n = 0
        for node in model.graph.node:
            for i, x in enumerate(node.input):
                if x in rename and not node.output[0].endswith("/range"):
                    node.input[i] = rename[x]
                    n += 1
        # the consumers of /range other than the range node itself are the scale; /min feeds centering and q
        return PassResult(model, n > 0, [f"{len(self.points)} activation points read running ranges"])


class BnEvalFixPass(Pass):
    name = "bn-eval-fix"

    def call(self, model):
        fixed = 0
        for node in model.graph.node:
            if node.op_type in ("BatchNormalization", "BatchNormInternal") and len(node.output) > 1:
                mode = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
                if mode == 0:
                    del node.output[1:]
                    fixed += 1
        return PassResult(model, fixed > 0, [f"{fixed} BatchNorm nodes reduced to one output"])

    def ensures(self, model):
        for node in model.graph.node:
            if node.op_type == "BatchNormalization":
                mode = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
                assert mode == 1 or len(node.output) == 1, f"{node.name} still has extra outputs"
