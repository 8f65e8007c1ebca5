"""Training-graph pass: a linear layer's bias Add taken into its integer/float GEMM switch (kernels/int_gemm.c).

int-gemm writes each quantized MatMul as `If(int8 bits) then IntMatMul else MatMul`; the exporters' Linear adds its
bias after it, `Add(MatMul_out, b)`, one more pass over the layer's whole output (vit_tiny: 48 Adds, ~2% of the
profiled step). This pass moves the Add into the switch: the integer branch's IntMatMul takes b as its optional
seventh input and adds it to each output as rounded (the Add's own float addition, so the values are bitwise the
same), the float branch gets the Add itself after its MatMul. The forward no longer writes the GEMM's output and
reads it back; the backward is untouched (the Add's gradient reads neither of its inputs).

Taken: an If whose branches are one IntMatMul (six inputs) and one MatMul, whose output reaches (through Identity
markers, each read by nothing else) one Add with a 1-D float b of the output's last dim, nothing else reading the
GEMM's output. Runs last among the fused-op passes; off with `--no-int-kernels`, `--no-fused-kernels` or
`BuildOptions.skip_passes=("int-bias",)`. tests/passes/test_int_bias.py: the kernel bitwise IntMatMul + b, the step
bitwise with the pass on and off.
"""

from __future__ import annotations

from collections import Counter

from onnx import TensorProto, helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, graph_links, replace_nodes


def _dims(graph) -> dict[str, list]:
    out = {}
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = ([d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim], t.elem_type)
    out.update({t.name: (list(t.dims), t.data_type) for t in graph.initializer})
    return out


def _branches(node):
    g = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
    return g.get("then_branch"), g.get("else_branch")


class IntBiasPass(Pass):
    name = "int-bias"

    def call(self, model):
        graph = model.graph
        dims = _dims(graph)
        _, consumers = graph_links(graph)
        outputs = {o.name for o in graph.output}
        pairs, kept, taken = [], Counter(), 0
        for sw in list(graph.node):
            if sw.op_type != "If" or len(sw.output) != 1:
                continue
            then_g, else_g = _branches(sw)
            if then_g is None or else_g is None or len(then_g.node) != 1 or len(else_g.node) != 1:
                continue
            mm_int, mm = then_g.node[0], else_g.node[0]
            if not (mm_int.op_type == "IntMatMul" and mm_int.domain == DOMAIN and len(mm_int.input) == 6
                    and mm.op_type == "MatMul" and mm.domain in ("", "ai.onnx")):
                continue
            chain, t = [], sw.output[0]
            while True:   # the Identity markers between the switch and its reader
                readers = consumers.get(t, [])
                if t in outputs or len(readers) != 1:
                    readers = None
                    break
                if readers[0].op_type == "Identity" and readers[0].domain in ("", "ai.onnx"):
                    chain.append(readers[0])
                    t = readers[0].output[0]
                    continue
                break
            add = readers[0] if readers else None
            if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
                kept["the GEMM's output is not read by one Add only"] += 1
                continue
            first = add.input[0] == t
            b = add.input[1] if first else add.input[0]
            bd, y = dims.get(b), dims.get(t) or dims.get(sw.output[0])
            if (bd is None or bd[1] != TensorProto.FLOAT or len(bd[0]) != 1 or y is None or not y[0]
                    or bd[0][0] is None or y[0][-1] != bd[0][0] or b == t):
                kept["the Add's other operand is not a float bias of the output's last dim"] += 1
                continue
            y_int, y_float = f"{sw.name}::int_bias/y", f"{sw.name}::int_bias/y_float"
            mm_int.input.append(b)
            mm_int.output[0] = y_int
            then_g.output[0].name = y_int
            add_f = helper.make_node("Add", [mm.output[0], b] if first else [b, mm.output[0]], [y_float],
                                     name=f"{sw.name}::int_bias/add")
            else_g.node.append(add_f)
            else_g.output[0].name = y_float
            sw.output[0] = add.output[0]
            pairs += [(n, []) for n in chain] + [(add, [])]
            taken += 1
        replace_nodes(graph, pairs)
        notes = [f"{taken} bias Adds taken into their integer/float GEMM switch"] if taken else []
        notes += [f"{c} GEMM switches kept apart from their bias ({why})" for why, c in sorted(kept.items())]
        return PassResult(model, bool(taken), notes)

    def ensures(self, model):
        assert_inputs_defined(model)
