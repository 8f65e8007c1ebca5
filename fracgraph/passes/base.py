"""The pass contract: one entry point returning what it did, with checked pre- and postconditions."""

from __future__ import annotations

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
    """Reorder graph nodes topologically (stable: keeps the existing order where it is already valid)."""
    graph = model.graph
    nodes = list(graph.node)
    avail = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producers = {o for n in nodes for o in n.output}
    pending = nodes
    ordered = []
    while pending:
        rest = []
        progressed = False
        for n in pending:
            if all(x in avail or x not in producers for x in node_inputs(n)):
                ordered.append(n)
                avail.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            raise ValueError(f"graph has a cycle through {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


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
