"""Training-graph pass: batch norm fused with the elementwise ops around it (fracgraph/kernels/fused_ops.c).

A CNN's training step passes each activation through a chain of memory-bound ops, each reading and writing the
whole tensor: forward, `BatchNormTrain -> [Add(residual)] -> Relu -> MinMax` (the next conv's activation range),
backward, `[Sum of two gradients] -> ReluGrad -> BatchNormGrad -> MinMax` (the error quantizer's range). On
resnet20's step (batch 128) ReluGrad, Relu, Sum, Add and MinMax were 11.5% of the profiled graph. This pass writes

- `BatchNormTrainFused(X, scale, B, rm, rv, residual?) -> (Y, rm', rv', mean, inv_std, min, max)` for a
  BatchNormTrain whose output only an Add (same shapes: no broadcast) and/or a Relu read: BatchNormTrain's own
  statistics and running update, then `+ residual` and `max(., 0)`, and Y's range for the MinMax that read it;
- `BatchNormGradRange(dY, X, scale, mean, inv_std, B?) -> (dX, dscale, dbias, min, max)` for a BatchNormGrad whose
  dX a MinMax reads, or (with `relu_mask`, `BuildOptions.bn_relu_mask`, off by default) whose dY is a ReluGrad (read
  by it alone) of a fused forward's ReLU without residual: the ReLU's mask is then recomputed from X with the
  forward's own float operations, so the ReluGrad disappears. Off by default because it raised densenet121's peak
  RSS from 1144 to 1514 MB (batch 32, 64x64) under onnxruntime's memory pattern (with the pattern or the arena
  off the masked build peaks lower than the unmasked one: README), while resnet18's and resnet20's did not move;
- `ReluGradSum(dY1, dY2, X)` for a ReluGrad of onnxruntime's two-input gradient accumulation (`AccumulateGrad_*`
  Sum, which adds gradients of one tensor: one shape), read by the ReluGrad alone.
- `BatchNormGradSplit(dY, X, scale, mean, inv_std, B?, lengths) -> (dscale, dbias, dX_0, ..., dX_k-1)` for a
  BatchNormGrad whose dX only onnxruntime's SplitTraining along the channel axis reads: a batch norm reading a
  Concat (a pre-activation net: DenseNet's layers), whose gradient is the Split of dX into the Concat's inputs.
  Each channel's dX goes straight into its piece, so neither the whole dX nor the Split's copy is written; with
  `relu_mask` it takes the ReLU's gradient as BatchNormGradRange does;
- `SumRange(x_0, ..., x_k-1) -> (Y, min, max)` for an `AccumulateGrad_*` Sum (k >= 2, one shape) that a MinMax
  reads (a feature map read by many later layers, its error quantizer's range): onnxruntime's order of the sum,
  one read of each input per cache-sized chunk, and the range of the chunk just written.

Every value is bitwise the unfused chain's (the same float operations on the same operands; min and max are exact),
up to the sign of a zero and NaN propagation: the fused ReLU writes +0 for every y <= 0 and 0 for a NaN, where
onnxruntime's Relu passes -0 and NaN through (a step with a NaN has diverged either way). Tests:
tests/passes/test_bn_relu.py. Only fracgraph's BatchNormTrain is fused (DFQ's candidate chains keep onnxruntime's
BatchNormInternal, and the recomputed mask must use the forward's exact operations), so the pass runs after bn-grad.
"""

from __future__ import annotations

from collections import defaultdict

from onnx import helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, node_inputs, replace_nodes, toposort
from .fused_ops import import_domain


def _same_shape(shapes: dict, a: str, b: str) -> bool:
    """Both shapes known and equal (a dynamic batch axis, None in both, counts as equal: both come from the batch)."""
    sa, sb = shapes.get(a), shapes.get(b)
    return sa is not None and sa == sb and all(d is not None for d in sa[1:])


def _channel_split(split, g) -> bool:
    """onnxruntime's SplitTraining of g's dX along the channel axis (1), its sizes an input (the Concat's
    per-input lengths), every piece and both of g's parameter gradients named (BatchNormGradSplit writes them all)."""
    axis = next((helper.get_attribute_value(a) for a in split.attribute if a.name == "axis"), 0)
    return (axis == 1 and len(split.input) == 2 and bool(split.input[1]) and all(split.output)
            and all(g.output[1:3]) and len(g.output) == 3)


class BnReluPass(Pass):
    name = "bn-relu"
    fused = 0   # nodes written by the last call

    def __init__(self, shapes: dict | None = None, relu_mask: bool = False):
        self.shapes = shapes or {}
        self.relu_mask = relu_mask   # BatchNormGradRange's recomputed ReLU mask (BuildOptions.bn_relu_mask): off by default
        self.counts = {}

    def call(self, model):
        graph = model.graph
        consumers = defaultdict(list)
        for n in graph.node:
            for i in node_inputs(n):
                consumers[i].append(n)
        producer = {o: n for n in graph.node for o in n.output if o}
        outputs = {o.name for o in graph.output}
        ours = lambda n, op: n is not None and n.op_type == op and n.domain == DOMAIN   # noqa: E731

        # consumers: top-level nodes only (a read inside an If branch counts as the If's), so a node found here
        # can be replaced in graph.node
        def only_reader(t: str, op: str, domain: str = ""):
            """The one node reading t, of type op (else None); t no graph output."""
            rs = consumers.get(t, [])
            if t in outputs or len(rs) != 1 or rs[0].op_type != op or rs[0].domain not in (domain, "ai.onnx" if not domain else domain):
                return None
            return rs[0]

        def min_max_of(t: str):
            """A MinMax (fracgraph's) reading t, if any."""
            return next((r for r in consumers.get(t, []) if ours(r, "MinMax")), None)

        pairs, fused, used = [], {}, set()
        counts = {"forward": 0, "residual": 0, "relu": 0, "relu_grad": 0, "grad_range": 0, "relu_grad_sum": 0,
                  "grad_split": 0, "split_relu_grad": 0, "sum_range": 0}

        # -- forward: BatchNormTrain [-> Add(residual)] [-> Relu] [-> MinMax] ---------------------------------------
        for bn in [n for n in graph.node if ours(n, "BatchNormTrain")]:
            y, res, relu, removed = bn.output[0], "", None, []
            add = only_reader(y, "Add")
            if add is not None and len(add.input) == 2 and y in add.input and id(add) not in used:
                other = add.input[1] if add.input[0] == y else add.input[0]
                if other != y and _same_shape(self.shapes, y, other) and _same_shape(self.shapes, y, add.output[0]):
                    res, y = other, add.output[0]
                    removed.append(add)
            relu = only_reader(y, "Relu")
            if relu is not None and id(relu) not in used:
                y = relu.output[0]
                removed.append(relu)
            else:
                relu = None
            mm = min_max_of(y)
            mm = mm if mm is not None and id(mm) not in used else None
            if not removed and mm is None:
                continue
            if mm is not None:
                removed.append(mm)
            rng = list(mm.output) if mm is not None else [f"{bn.name}::fused/min", f"{bn.name}::fused/max"]
            a = {x.name: helper.get_attribute_value(x) for x in bn.attribute}
            node = helper.make_node("BatchNormTrainFused", list(bn.input) + [res], [y, *bn.output[1:], *rng],
                                    name=f"{bn.name}::fused", domain=DOMAIN, epsilon=float(a["epsilon"]),
                                    momentum=float(a["momentum"]), relu=int(relu is not None))
            pairs.append((bn, [node]))
            pairs += [(r, []) for r in removed]
            used.update(id(r) for r in removed)   # a residual Add of two batch norms' outputs goes to the first
            fused[bn.output[3]] = (node, relu is not None and not res)   # keyed by the saved mean BatchNormGrad reads
            counts["forward"] += 1
            counts["residual"] += bool(res)
            counts["relu"] += relu is not None

        # -- backward: [ReluGrad ->] BatchNormGrad [-> MinMax] --------------------------------------------------------
        for g in [n for n in graph.node if ours(n, "BatchNormGrad")]:
            dy, x, scale, mean, inv_std = g.input
            fwd, masked = fused.get(mean, (None, False))
            rg = producer.get(dy)
            relu = (self.relu_mask and fwd is not None and masked and ours(rg, "ReluGrad") and rg.input[1] == fwd.output[0]
                    and fwd.input[0] == x and fwd.input[1] == scale and fwd.output[4] == inv_std
                    and only_reader(dy, "BatchNormGrad", DOMAIN) is g)
            mm = min_max_of(g.output[0])
            split = only_reader(g.output[0], "SplitTraining", "com.microsoft")
            if mm is None and split is not None and _channel_split(split, g):
                # a batch norm reading a Concat (a pre-activation net's layer): dX goes straight into the pieces of
                # the Concat's gradient, and the Split's copy of it disappears
                ins = [rg.input[0] if relu else dy, x, scale, mean, inv_std, fwd.input[2] if relu else "", split.input[1]]
                pairs.append((g, [helper.make_node("BatchNormGradSplit", ins, [g.output[1], g.output[2], *split.output],
                                                   name=f"{g.name}::split", domain=DOMAIN, relu=int(relu),
                                                   pieces=len(split.output))]))
                pairs += [(r, []) for r in ([rg] if relu else []) + [split]]
                counts["grad_split"] += 1
                counts["split_relu_grad"] += relu
                continue
            if not relu and mm is None:
                continue
            rng = list(mm.output) if mm is not None else [f"{g.name}::fused/min", f"{g.name}::fused/max"]
            ins = [rg.input[0], x, scale, mean, inv_std, fwd.input[2]] if relu else [*g.input, ""]
            pairs.append((g, [helper.make_node("BatchNormGradRange", ins, [*g.output, *rng], name=f"{g.name}::fused",
                                               domain=DOMAIN, relu=int(relu))]))
            pairs += [(r, []) for r in ([rg] if relu else []) + ([mm] if mm is not None else [])]
            counts["grad_range"] += 1
            counts["relu_grad"] += relu

        # -- backward: ReluGrad(Sum(dY1, dY2), X), the Sum one gradient's accumulation --------------------------------
        taken = {id(n) for n, _ in pairs}
        for rg in [n for n in graph.node if ours(n, "ReluGrad") and id(n) not in taken]:
            s = producer.get(rg.input[0])
            if s is None or s.op_type != "Sum" or s.domain not in ("", "ai.onnx") or len(s.input) != 2 \
                    or not s.name.startswith("AccumulateGrad_") or only_reader(s.output[0], "ReluGrad", DOMAIN) is not rg:
                continue
            pairs.append((rg, [helper.make_node("ReluGradSum", [s.input[0], s.input[1], rg.input[1]], list(rg.output),
                                                name=f"{rg.name}::sum", domain=DOMAIN)]))
            pairs.append((s, []))
            counts["relu_grad_sum"] += 1

        # -- backward: MinMax(Sum(dY_0, ..., dY_k-1)), one tensor's gradient accumulation and its error range -----
        taken = {id(n) for n, _ in pairs}
        for s in [n for n in graph.node if n.op_type == "Sum" and n.domain in ("", "ai.onnx") and id(n) not in taken]:
            mm = min_max_of(s.output[0])
            # AccumulateGrad_: onnxruntime's gradient accumulation, every input a gradient of one tensor (one shape)
            if mm is None or id(mm) in taken or not s.name.startswith("AccumulateGrad_") or len(s.input) < 2 \
                    or not all(s.input):
                continue
            pairs.append((s, [helper.make_node("SumRange", list(s.input), [s.output[0], *mm.output],
                                               name=f"{s.name}::range", domain=DOMAIN, n=len(s.input))]))
            pairs.append((mm, []))
            taken.add(id(mm))
            counts["sum_range"] += 1

        self.counts = counts
        self.fused = counts["forward"] + counts["grad_range"] + counts["relu_grad_sum"] + counts["grad_split"] \
            + counts["sum_range"]
        if not pairs:
            return PassResult(model, False, [])
        replace_nodes(graph, pairs)
        toposort(model)   # a fused node takes its first node's place; the residual may be computed after it
        import_domain(model)
        return PassResult(model, True, [
            f"bn-relu: {counts['forward']} BatchNormTrain fused forward ({counts['residual']} with the residual Add, "
            f"{counts['relu']} with the ReLU, every one with its output's range); {counts['grad_range']} BatchNormGrad "
            f"with dX's range ({counts['relu_grad']} with the ReLU's gradient); {counts['relu_grad_sum']} ReluGrad "
            f"with the gradient Sum; {counts['grad_split']} BatchNormGrad writing a Concat's gradient pieces "
            f"({counts['split_relu_grad']} with the ReLU's gradient); {counts['sum_range']} gradient Sums with their "
            f"range"])

    def ensures(self, model):
        assert_inputs_defined(model)

