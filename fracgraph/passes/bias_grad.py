"""Training-graph pass: the bias gradients' ReduceSums as fracgraph's `ColSum` / `MinMaxColSum` (kernels/bias_grad.c).

onnxruntime's gradient builder writes the gradient of a bias (the Add after a MatMul of timm's and torchvision's
Linear layers, Gemm's C, the head's bias) as `ReduceSum(dY, axes = every axis but the last, keepdims = 0)`: one more
full read of dY [B, T, N] per linear layer, 51 ReduceSums in vit_tiny's step. With the error quantizers on, the
same dY (or an Identity of it, the MatMul's side of the Add gradient) is also read whole by the quantizer's `MinMax`
(passes/fused_ops.py). This pass writes each such ReduceSum:

- with a MinMax of the same tensor: both as one `MinMaxColSum(dY) -> (min, max, sum)`, one read of dY for the
  quantizer's range and the bias gradient;
- without: `ColSum(dY) -> sum`, the same column sums on the session's threads.

The sums are bitwise onnxruntime's ReduceSum (each column from row 0 down the rows in float, the order of its
"RK" fast path, on any thread count), and the range is MinMax's numbers (tests/passes/test_bias_grad.py), so the
step's loss and every gradient are the same with the pass on and off. Any ReduceSum over the leading axes of a
float tensor of known rank is taken, whatever layer it belongs to; kept, with the reason in the notes: keepdims 1,
axes that are not all the leading ones, axes not a constant, a rank the graph does not give.
On with the fused kernels; off with `--no-fused-kernels` or `BuildOptions.skip_passes=("bias-grad",)`.
"""

from __future__ import annotations

from collections import Counter

from onnx import TensorProto, helper, numpy_helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, graph_links, replace_nodes
from .fused_ops import import_domain
from .permute import _types as _ranks   # tensor -> (element type, rank or None)


def _constants(graph, producer) -> dict[str, list[int]]:
    """int64 initializers and Constant outputs that a ReduceSum reads as axes -> their values."""
    out = {t.name: numpy_helper.to_array(t).reshape(-1).tolist() for t in graph.initializer
           if t.data_type == TensorProto.INT64}
    for name, n in producer.items():
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            a = next((a for a in n.attribute if a.name in ("value", "value_ints")), None)
            if a is not None and a.name == "value" and a.t.data_type == TensorProto.INT64:
                out[name] = numpy_helper.to_array(a.t).reshape(-1).tolist()
            elif a is not None and a.name == "value_ints":
                out[name] = list(a.ints)
    return out


class BiasGradPass(Pass):
    name = "bias-grad"
    fused = 0   # ColSum / MinMaxColSum nodes written by the last call: the artifacts then need the kernels library

    def call(self, model):
        graph = model.graph
        ranks = _ranks(graph)
        producer, consumers = graph_links(graph)
        consts = _constants(graph, producer)
        pairs, kept, used = [], Counter(), set()
        with_range = 0
        for rs in list(graph.node):
            if rs.op_type != "ReduceSum" or rs.domain not in ("", "ai.onnx"):
                continue
            why = self._decline(rs, ranks, consts)
            if why:
                kept[why] += 1
                continue
            x = rs.input[0]
            mm = self._range_reader(x, consumers, used)
            if mm is not None:
                used.add(id(mm))
                with_range += 1
                pairs.append((mm, [helper.make_node("MinMaxColSum", [x], [mm.output[0], mm.output[1], rs.output[0]],
                                                    name=f"{rs.name}::min_max_col_sum", domain=DOMAIN)]))
                pairs.append((rs, []))
            else:
                pairs.append((rs, [helper.make_node("ColSum", [x], [rs.output[0]], name=f"{rs.name}::col_sum",
                                                    domain=DOMAIN)]))
        replace_nodes(graph, pairs)
        self.fused = sum(1 for _, new in pairs if new)
        if self.fused:
            import_domain(model)
        notes = ([f"{self.fused} ReduceSum over the leading axes on fracgraph's kernels: {with_range} with the "
                  f"error quantizer's MinMax of the same tensor (MinMaxColSum), {self.fused - with_range} alone "
                  f"(ColSum)"] if self.fused else [])
        notes += [f"{c} ReduceSum kept on onnxruntime's kernel ({why})" for why, c in sorted(kept.items())]
        return PassResult(model, bool(self.fused), notes)

    @staticmethod
    def _decline(rs, ranks, consts) -> str | None:
        elem, rank = ranks.get(rs.input[0], (None, None))
        if elem != TensorProto.FLOAT:
            return "input not known to be float"
        if not rank or rank < 2:
            return "input rank not known or below 2"
        attrs = {a.name: helper.get_attribute_value(a) for a in rs.attribute}
        if attrs.get("keepdims", 1) != 0:
            return "keepdims 1"
        if len(rs.input) > 1 and rs.input[1]:
            if rs.input[1] not in consts:
                return "axes not a constant"
            axes = consts[rs.input[1]]
        else:
            axes = list(attrs.get("axes", []))
        if sorted(a % rank for a in axes) != list(range(rank - 1)):
            return "not a sum over every axis but the last"
        return None

    @staticmethod
    def _range_reader(x, consumers, used):
        """The fracgraph MinMax reading x, or an Identity (chain) of x, with both outputs; None if there is none."""
        names, frontier = {x}, [x]
        while frontier:
            t = frontier.pop()
            for c in consumers.get(t, []):
                if c.op_type == "Identity" and c.domain in ("", "ai.onnx") and c.output[0] not in names:
                    names.add(c.output[0])
                    frontier.append(c.output[0])
        for t in sorted(names):
            for c in consumers.get(t, []):
                if (c.op_type == "MinMax" and c.domain == DOMAIN and id(c) not in used and len(c.output) == 2
                        and all(c.output)):
                    return c
        return None

    def ensures(self, model):
        assert_inputs_defined(model)
