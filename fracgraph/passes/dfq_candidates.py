"""DFQ per-sample choice with K computed candidates (the released CIFAR code's semantics, spec fractrain.md §3.3).

For granularity "candidates" every gated block is computed K times on the full batch, candidate k at its own
constant (a_k, w, g_k) bits: the block's nodes are cloned (`<node>::cand<k>`, intermediate tensors renamed the same
way, initializers shared), and the block output is sum_k m[:, k] * out_k with the per-sample straight-through
one-hot m. So each candidate's activation range is the whole batch's, each BatchNormalization clone normalizes with
its own batch statistics (shared scale/bias), and the error reaching candidate k's gradient quantizer is already
multiplied by m[:, k] (its range covers the chosen samples plus 0), as in the release.

The region cloned is every node between the block's input and its output that depends on the input, plus a
trailing Relu that is the output's only consumer (the release's BasicBlock ends in its ReLU, and mixing after it
gives the gate the release's gradient <dL/dx, relu(out_k)>). BatchNormalization's running statistics: in the
training graph candidate k's BatchNormInternal reads the running statistics candidate k - 1's wrote
(`BnChainPass`), so they end as K successive EMA updates in candidate order, the last candidate's batch statistics
written last, in the checkpoint buffers (onnxruntime updates them in place), as the release's K `BatchNorm2d`
forwards per iteration do. Without the chain every clone reads the buffer and onnxruntime's execution order decides
the last writer.

Cost: K times the block's forward and backward compute in the simulation; the run's effective MACs count only
each sample's chosen candidate, as the release's cp does.
"""

from __future__ import annotations

import re

import onnx

from ..errors import FracgraphError
from .base import Pass, PassResult, upstream_nodes

SUFFIX = "::cand"


def candidate_name(name: str, k: int) -> str:
    return f"{name}{SUFFIX}{k}"


def block_region(model: onnx.ModelProto, x: str, y: str) -> tuple[list[onnx.NodeProto], str]:
    """(the nodes computing the block output from x, in graph order; the output tensor), the output extended over
    a Relu that is its only consumer."""
    graph = model.graph
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    after = consumers.get(y, [])
    end = after[0].output[0] if (len(after) == 1 and after[0].op_type == "Relu" and y not in outputs) else y
    producer = {o: n for n in graph.node for o in n.output if o}
    ancestors = {id(n) for n in upstream_nodes(producer, end, x)}
    depends, region = {x}, []
    for n in graph.node:                       # graph order is topological
        if id(n) in ancestors and any(i in depends for i in n.input):
            region.append(n)
            depends.update(o for o in n.output if o)
    leaked = [o for n in region for o in n.output if o and o != end and (o in outputs or any(
        id(c) not in {id(r) for r in region} for c in consumers.get(o, [])))]
    if leaked:
        raise FracgraphError(f"block output {y}: its inner tensor {leaked[0]} is used outside the block, so the block "
                             f"cannot be computed as K candidates; use --granularity sample")
    return region, end


def clone_region(region: list[onnx.NodeProto], k: int) -> list[onnx.NodeProto]:
    """Candidate k of a region: node and inner-tensor names suffixed, outside inputs and initializers shared."""
    inner = {o for n in region for o in n.output if o}
    out = []
    for n in region:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = candidate_name(n.name, k)
        del c.input[:]
        c.input.extend(candidate_name(i, k) if i in inner else i for i in n.input)
        del c.output[:]
        c.output.extend(candidate_name(o, k) if o else o for o in n.output)
        out.append(c)
    return out


class BnChainPass(Pass):
    """Training graph: candidate k's BatchNormInternal takes its running mean/var inputs from candidate k - 1's
    running mean/var outputs (onnxruntime names them `<bn>::cand<k>_BatchNormInternal`)."""

    name = "dfq-bn-chain"
    _NAME = re.compile(r"^(.*)::cand(\d+)_BatchNormInternal$")

    def call(self, model):
        bns = {}
        for n in model.graph.node:
            m = self._NAME.match(n.name)
            if n.op_type == "BatchNormInternal" and m:
                bns[(m.group(1), int(m.group(2)))] = n
        chained = 0
        for (base, k), n in bns.items():
            prev = bns.get((base, k - 1))
            if prev is not None and len(prev.output) >= 3 and all(prev.output[1:3]):
                n.input[3], n.input[4] = prev.output[1], prev.output[2]
                chained += 1
        return PassResult(model, chained > 0, [f"{chained} candidate BatchNorms read the previous candidate's running "
                                               f"statistics"])
