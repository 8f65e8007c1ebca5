"""Training-graph pass: an embedding's padding row gets no gradient from its lookups, as in PyTorch.

`nn.Embedding(padding_idx=p)` starts row p at zeros and leaves it out of the lookup's gradient, so it stays zero;
every HuggingFace LM's token table has one (the pad token), and RoBERTa-style position tables too. ONNX's Gather
has no such attribute, so the exported lookup trains row p like any other. That is not only a difference from
PyTorch: the padding row's lookups feed a LayerNorm of a zero vector wherever the other embeddings of the token
are padding rows too (MPNet: pad token at the padding position), whose input gradient there is scaled by
1/sqrt(eps) = 1e6 at HF's eps 1e-12, and one SGD step at lr 0.01 took MPNet's loss from 4.6 to 825.

The padding row is recognized from the weights: a table read by a Gather whose rows are all non-zero but exactly
one, which is all zeros (what PyTorch's init writes and its training keeps). The lookup's gradient (onnxruntime's
`GatherGrad`, before gather-grad rewrites it) is multiplied by a constant mask that zeroes that row. Other
gradients of the same table (a tied LM head) are summed apart and keep the row's, as PyTorch's do. A table with no
zero row, or with several, is left as it is (a zero-initialized table is not padding). With the embedding
quantizers on (policy "embeddings": "quantize") the mask applies to the quantized table's gradient, which the
straight-through estimator hands the table unchanged.
Always on: it changes what trains, not how fast.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from .base import Pass, PassResult, assert_inputs_defined, graph_links, replace_nodes


def padding_row(table: np.ndarray) -> int | None:
    """The one all-zero row of a table whose other rows are not all zero, else None."""
    if table.ndim < 2 or table.shape[0] < 2:
        return None
    zero = ~table.reshape(table.shape[0], -1).any(axis=1)
    return int(np.flatnonzero(zero)[0]) if zero.sum() == 1 else None


def _upstream_table(x: str, producer: dict, inits: dict, trainable, depth: int = 12) -> str | None:
    """The one trainable table (rank >= 2) among the few nodes above `x` (a table's quantizer), else None."""
    seen, frontier, found = set(), [x], set()
    for _ in range(depth):
        nxt = []
        for name in frontier:
            node = producer.get(name)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            for i in node.input:
                if i in inits:
                    if i in trainable and len(inits[i].dims) >= 2:
                        found.add(i)
                elif i:
                    nxt.append(i)
        frontier = nxt
    return found.pop() if len(found) == 1 else None


def padding_rows(model, trainable) -> tuple[dict[str, int], dict[str, tuple]]:
    """({gathered tensor: padding row}, {gathered tensor: its table's shape}) for the trainable tables a Gather
    reads in the forward model (whose initializers hold the weights; in the training graph they are inputs): the
    table itself, or its fake-quantized value (policy "embeddings": "quantize"), found up the first inputs."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    rows, shapes = {}, {}
    for node in model.graph.node:
        x = node.input[0] if node.op_type == "Gather" and node.input else None
        table = x if x in inits else _upstream_table(x, producer, inits, trainable) if x is not None else None
        if x is not None and table in inits and table in trainable and x not in rows:
            row = padding_row(numpy_helper.to_array(inits[table]))
            if row is not None:
                rows[x], shapes[x] = row, tuple(inits[table].dims)
    return rows, shapes


class EmbeddingPaddingPass(Pass):
    name = "embedding-padding"

    def __init__(self, rows: dict[str, int], shapes: dict[str, tuple]):
        self.rows, self.shapes = rows, shapes     # from `padding_rows` on the forward model

    def call(self, model):
        graph = model.graph
        producer, _ = graph_links(graph)
        notes, pairs = [], []
        for node in list(graph.node):
            if node.op_type != "GatherGrad" or node.domain != "com.microsoft":
                continue
            if next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0) != 0:
                continue
            shape = producer.get(node.input[0])
            if shape is None or shape.op_type != "Shape" or shape.input[0] not in self.rows:
                continue
            row, dims = self.rows[shape.input[0]], self.shapes[shape.input[0]]
            q = f"{node.name}::padding"
            mask = np.ones((dims[0],) + (1,) * (len(dims) - 1), np.float32)
            mask[row] = 0.0
            graph.initializer.append(numpy_helper.from_array(mask, f"{q}/mask"))
            out = node.output[0]
            raw = f"{q}/lookup_grad"
            node.output[0] = raw
            pairs.append((node, [node, helper.make_node("Mul", [raw, f"{q}/mask"], [out], name=f"{q}/mul")]))
            notes.append(f"{node.name}: row {row} of the table is all zeros (a padding_idx): its lookups' gradient masked")
        if not pairs:
            return PassResult(model, False, notes)
        replace_nodes(graph, pairs)
        return PassResult(model, True, notes)

    def ensures(self, model):
        assert_inputs_defined(model)
