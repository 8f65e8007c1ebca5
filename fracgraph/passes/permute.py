"""Training-graph pass: onnxruntime's Transpose as fracgraph's `Permute` (kernels/permute.c).

The transformers' training graphs are full of permutations: the attention heads' split ([B, N, 3, H, D] ->
[3, B, H, N, D]) and merge ([B, H, N, D] -> [B, N, H, D]), K's transpose, nn.MultiheadAttention's sequence-first
layout ([N, B, C] <-> [B, N, C]) and the patch embedding's flatten, and the gradient of each of them (the inverse
permutation) that onnxruntime's gradient builder adds: 66 Transposes in vit_tv's step, 74 in vit_tiny's, none of
which onnxruntime's graph optimizer folds into a GEMM (their consumers are Reshape, Mul, MinMax, Split, ...).
onnxruntime 1.19.2 runs them at 1.3-3x the time of a plain copy of the same tensor (16 ms, 12.6%, of vit_tv's
profiled FW8/BW8 step). `Permute` does the same permutation as one cache-blocked copy on the session's threads
(row copies where the innermost axis stays, 8 x 8 register-transposed tiles otherwise; permute.c). A permutation
moves values only, so the step is bitwise the same with the pass on and off (tests/passes/test_permute.py).

Kept on onnxruntime's Transpose, with the reason in the notes: a Transpose read only by MatMuls or Gemms
(onnxruntime's MatmulTransposeFusion and GemmTransposeFusion may fold it into them at session creation and drop it,
which a custom op would prevent; one that also has other readers runs anyway, so it is taken), one whose input is
not a float tensor, and ranks 0 and above 15 (the kernel's perm code).
On with the fused kernels; off with `--no-fused-kernels` or `BuildOptions.skip_passes=("permute",)`. Runs after
every other pass that rewrites Transposes (nchwc-conv folds conv-grad-split's weight Transposes into its
NchwcWeight reorders, which a Permute would hide from it: tests/passes/test_nchwc_conv.py).
"""

from __future__ import annotations

from onnx import TensorProto, helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, replace_nodes
from .fused_ops import import_domain

MAX_RANK = 15   # permute.c: 4 bits per axis in the int64 perm_code
# consumers whose Transpose onnxruntime's optimizer may fold into the GEMM itself (transA/transB/transBatch*)
GEMM_READERS = {"MatMul", "Gemm", "FusedMatMul", "TransposeMatMul", "FusedGemm", "TransposeScaleMatMul"}


def perm_code(perm: list[int]) -> int:
    """Permute's perm_code attribute: output axis i's source axis in bits 4i..4i+3."""
    return sum(int(p) << (4 * i) for i, p in enumerate(perm))


def decode(code: int, rank: int) -> list[int]:
    return [(code >> (4 * i)) & 15 for i in range(rank)]


def _types(graph) -> dict[str, tuple[int, int | None]]:
    """tensor -> (element type, rank or None) where the graph says."""
    out = {}
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = v.type.tensor_type
        out[v.name] = (t.elem_type, len(t.shape.dim) if t.HasField("shape") else None)
    out.update({t.name: (t.data_type, len(t.dims)) for t in graph.initializer})
    return out


class PermutePass(Pass):
    name = "permute"
    fused = 0   # Permute nodes written by the last call: the artifacts then need the kernels library

    def call(self, model):
        graph = model.graph
        types = _types(graph)
        readers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        outputs = {o.name for o in graph.output}
        pairs, kept = [], {}
        for n in graph.node:
            if n.op_type != "Transpose" or n.domain not in ("", "ai.onnx"):
                continue
            why, perm = self._decline(n, types, readers, outputs)
            if why:
                kept[why] = kept.get(why, 0) + 1
                continue
            pairs.append((n, [helper.make_node("Permute", [n.input[0]], [n.output[0]], name=f"{n.name}::permute",
                                               domain=DOMAIN, perm_code=perm_code(perm), rank=len(perm))]))
        replace_nodes(graph, pairs)
        self.fused = len(pairs)
        if pairs:
            import_domain(model)
        notes = [f"{len(pairs)} Transpose on fracgraph's Permute"] if pairs else []
        notes += [f"{c} Transpose kept on onnxruntime's kernel: {why}" for why, c in sorted(kept.items())]
        return PassResult(model, bool(pairs), notes)

    @staticmethod
    def _decline(n, types, readers, outputs) -> tuple[str | None, list[int]]:
        elem, rank = types.get(n.input[0], (None, None))
        if elem != TensorProto.FLOAT:
            return "input not a float tensor (or its type unknown)", []
        perm = next((list(helper.get_attribute_value(a)) for a in n.attribute if a.name == "perm"), None)
        if perm is None:
            if rank is None:
                return "no perm and the input's rank unknown", []
            perm = list(range(rank))[::-1]   # ONNX's default: reverse the axes
        if rank is not None and rank != len(perm):
            return "perm's length is not the input's rank", []
        if not perm or len(perm) > MAX_RANK:
            return f"rank 0 or above {MAX_RANK}", []
        if sorted(perm) != list(range(len(perm))):
            return "perm is not a permutation", []
        rs = readers.get(n.output[0], [])
        if rs and all(r.op_type in GEMM_READERS for r in rs) and n.output[0] not in outputs:
            return "read only by GEMMs (onnxruntime may fold it into them)", []
        return None, perm

    def ensures(self, model):
        assert_inputs_defined(model)
        for n in model.graph.node:
            if n.op_type == "Permute" and n.domain == DOMAIN:
                a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
                if sorted(decode(a["perm_code"], a["rank"])) != list(range(a["rank"])):
                    raise AssertionError(f"{n.name}: perm_code {a['perm_code']} is not a permutation of "
                                         f"{a['rank']} axes")
