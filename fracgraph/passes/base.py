"""The pass contract: one entry point returning what it did, with checked pre- and postconditions."""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field

import onnx

from ..errors import FracgraphError


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    notes: list[str] = field(default_factory=list)   # what the pass did or declined, with reasons


class PassError(FracgraphError):
    """A pass failed or its contract did not hold; the message names the pass."""


class Pass:
    """Subclasses implement `call`; `requires`/`ensures` raise (any exception) when the contract is broken."""

    name = "pass"

    def requires(self, model: onnx.ModelProto) -> None:
        pass

    def ensures(self, model: onnx.ModelProto) -> None:
        pass

    def call(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        try:
            self.requires(model)
        except Exception as e:
            raise PassError(f"{self.name}: precondition failed: {e}") from e
        try:
            result = self.call(model)
        except FracgraphError:
            raise
        except Exception as e:
            raise PassError(f"{self.name}: {type(e).__name__}: {e}") from e
        try:
            self.ensures(result.model)
        except Exception as e:
            raise PassError(f"{self.name}: postcondition failed: {e}") from e
        return result


def run_passes(model: onnx.ModelProto, passes: list[Pass]) -> tuple[onnx.ModelProto, list[str]]:
    notes: list[str] = []
    for p in passes:
        result = p(model)
        model = result.model
        if result.modified:
            toposort(model)
        notes.extend(f"[{p.name}] {n}" for n in result.notes)
    return model, notes


def node_by_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


def opset(model: onnx.ModelProto) -> int:
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))


def toposort(model: onnx.ModelProto) -> None:
    """Reorder graph nodes topologically, stable (Kahn's algorithm taking the lowest original index first, so an
    order that is already valid is kept); linear in the graph size, which matters for resnet164's ~20k nodes."""
    graph = model.graph
    nodes = list(graph.node)
    avail = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    users = defaultdict(list)
    indegree = [0] * len(nodes)
    for k, n in enumerate(nodes):
        for j in {producer[x] for x in node_inputs(n) if x not in avail and x in producer}:
            users[j].append(k)
            indegree[k] += 1
    ready = [k for k, d in enumerate(indegree) if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users[k]:
            indegree[u] -= 1
            if indegree[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        stuck = next(k for k, d in enumerate(indegree) if d > 0)
        raise ValueError(f"graph has a cycle through {nodes[stuck].name}")
    ordered = [nodes[k] for k in order]
    del graph.node[:]
    graph.node.extend(ordered)


def replace_nodes(graph: onnx.GraphProto, pairs: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]]) -> None:
    """Rebuild graph.node once, each given node replaced by its list (empty: deleted); one pass instead of a
    remove/insert per rewrite, which is quadratic in the graph size. `pairs` holds the nodes, so their id()s stay
    theirs while the map below uses them."""
    if not pairs:
        return
    by_id = {id(old): new for old, new in pairs}
    nodes = []
    for n in graph.node:
        nodes.extend(by_id.get(id(n), [n]))
    del graph.node[:]
    graph.node.extend(nodes)


def all_nodes(graph: onnx.GraphProto):
    """Every node of the graph and, depth first, of its nodes' subgraphs (If branches)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)


def graph_links(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """(producer, consumers) of the graph's own nodes: tensor -> the node writing it, tensor -> the nodes reading
    it (in graph order; a node reading a tensor twice is listed twice)."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    return producer, consumers


def upstream_nodes(producer: dict, start: str, stop: str) -> list[onnx.NodeProto]:
    """The nodes `start` depends on, walking back through `producer` (tensor -> node) and not past `stop`."""
    found, stack, seen = {}, [start], set()
    while stack:
        t = stack.pop()
        if t == stop or t in seen or not t:
            continue
        seen.add(t)
        n = producer.get(t)
        if n is not None and id(n) not in found:
            found[id(n)] = n
            stack.extend(n.input)
    return list(found.values())


def assert_inputs_defined(model: onnx.ModelProto) -> None:
    """Every node input is a graph input, an initializer or some node's output (a rewrite left no dangling edge)."""
    graph = model.graph
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    known |= {o for n in graph.node for o in n.output}
    for n in graph.node:
        missing = [i for i in node_inputs(n) if i not in known]
        assert not missing, f"{n.name} reads undefined tensor {missing[0]}"


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus the outer-scope tensors its subgraphs (If/Loop bodies) read."""
    names = list(node.input)
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            names += [x for n in g.node for x in node_inputs(n) if x not in inner]
    return names
