"""Find the precision blocks of a model from its structure: residual blocks, or single layers where there are none.

A residual block is the region a residual `Add` closes: the nodes on paths from the Add's fork point (its
immediate dominator in the data-flow graph) to the Add. Each GEMM belongs to the innermost such region; a GEMM
in no region is a block of its own. This finds ResNet BasicBlocks (with their downsample conv), pre-activation
bottlenecks and MobileNetV2 inverted residuals without knowing any of those architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import onnx

from .optable import GemmOp

_SOURCE = "__graph_inputs__"


@dataclass
class BlockInfo:
    name: str
    ops: list[str]        # GEMM node names, graph order
    kind: str             # "residual" | "layer"


def dataflow_graph(model: onnx.ModelProto) -> nx.DiGraph:
    """Node-level DAG (edges follow tensors); one virtual source feeds every graph input. A Shape or Size node reads
    its input's shape, not its values, so no edge enters it: values computed from shapes only (an attention mask of
    ones the size of the token ids, task.py `fill_extra_inputs`; positions 0..T-1) are no path of the data around
    a block's input."""
    g = nx.DiGraph()
    producer: dict[str, str] = {}
    g.add_node(_SOURCE)
    for i in model.graph.input:
        producer[i.name] = _SOURCE
    for node in model.graph.node:
        g.add_node(node.name)
        if node.op_type in ("Shape", "Size"):
            for o in node.output:
                producer[o] = node.name
            continue
        for x in node.input:
            if x in producer:
                g.add_edge(producer[x], node.name)
        for o in node.output:
            producer[o] = node.name
    return g


def _is_residual_add(node: onnx.NodeProto, inits: set[str]) -> bool:
    return node.op_type in ("Add", "Sum") and len([x for x in node.input if x and x not in inits]) >= 2


def find_blocks(model: onnx.ModelProto, gemms: list[GemmOp], member: set[str]) -> list[BlockInfo]:
    """Blocks over the GEMMs named in `member` (the quantized ones), in graph order."""
    g = dataflow_graph(model)
    inits = {t.name for t in model.graph.initializer}
    idom = nx.immediate_dominators(g, _SOURCE)
    regions: list[tuple[str, set[str]]] = []
    for node in model.graph.node:
        if not _is_residual_add(node, inits) or node.name not in idom:
            continue
        fork = idom[node.name]
        inside = (nx.descendants(g, fork) & nx.ancestors(g, node.name)) | {node.name}
        regions.append((node.name, inside))
    order = {op.name: i for i, op in enumerate(gemms)}
    owner: dict[str, tuple[int, str]] = {}
    for add, inside in regions:
        for op in gemms:
            if op.name in inside and op.name in member:
                size = len(inside)
                if op.name not in owner or size < owner[op.name][0]:
                    owner[op.name] = (size, add)
    blocks: dict[str, BlockInfo] = {}
    result: list[BlockInfo] = []
    for op in gemms:
        if op.name not in member:
            continue
        if op.name in owner:
            add = owner[op.name][1]
            if add not in blocks:
                blocks[add] = BlockInfo(name=f"block@{add}", ops=[], kind="residual")
                result.append(blocks[add])
            blocks[add].ops.append(op.name)
        else:
            result.append(BlockInfo(name=f"layer@{op.name}", ops=[op.name], kind="layer"))
    result.sort(key=lambda b: order[b.ops[0]])
    return result
