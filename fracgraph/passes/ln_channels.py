"""Training-graph pass: LayerNorm over the channels of an NCHW tensor without its Transposes
(`LayerNormChannels`, `LayerNormChannelsGrad`, kernels/ln_channels.c).

ConvNeXt-style nets normalize over the channel axis of a channels-first tensor: timm's LayerNorm2d (its blocks'
norm after the 7x7 depthwise conv, the stem's and the downsamples' norms) exports as Transpose [0, 2, 3, 1] ->
LayerNormalization(axis -1) -> Transpose [0, 3, 1, 2], and onnxruntime's gradient builder adds the mirror image:
Transpose of dY -> LayerNormalizationGrad -> Transpose of dX. Four whole-tensor permutations per norm (68 of
convnext_atto's 72 Permutes) that exist only to move the channel axis last and back. This pass matches the six
nodes of one such norm (any rank >= 3: [N, C, S...] with the perm moving axis 1 last and its inverse) and writes
two: LayerNormChannels(X, scale, bias) -> (Y, mean, inv_std) and LayerNormChannelsGrad(dY, X, scale, mean,
inv_std) -> (dX, dscale, dbias), which read and write NCHW directly, the channel sums running over 16 positions
at a time. Same formulas as onnxruntime's ops (statistics summed in double), so the step is the chain's up to
float rounding: tests/passes/test_ln_channels.py bounds the kernels against float64 and compares the loss and
every gradient of a ConvNeXt-style block's step with the pass on and off.

Declined, with the reason in the notes: a norm whose intermediate tensors have other readers (the channels-last
tensor read elsewhere: the Transposes must stay), one without the gradient chain (a frozen or eval-only norm),
one without a bias, a scale that is not one value per channel, or a channel count the graph does not know.
Runs before ln-grad (which would otherwise take the LayerNormalizationGrad) and before permute.
On with the fused kernels; off with `--no-fused-kernels` or `BuildOptions.skip_passes=("ln-channels",)`.
"""

from __future__ import annotations

from onnx import helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, graph_links, replace_nodes
from .fused_ops import import_domain
from .ln_grad import _shapes

PREFIX = "::lnc"   # names this pass creates: <LayerNormalization's name>::lnc/...


def _perm(n) -> list[int] | None:
    if n is None or n.op_type != "Transpose" or n.domain not in ("", "ai.onnx"):
        return None
    return next((list(helper.get_attribute_value(a)) for a in n.attribute if a.name == "perm"), None)


def to_last(rank: int) -> list[int]:
    """The perm moving axis 1 last: [0, 2, ..., rank-1, 1]."""
    return [0, *range(2, rank), 1]


def to_first(rank: int) -> list[int]:
    """Its inverse: [0, rank-1, 1, ..., rank-2]."""
    return [0, rank - 1, *range(1, rank - 1)]


class LnChannelsPass(Pass):
    name = "ln-channels"
    fused = 0   # norms rewritten by the last call

    def call(self, model):
        graph = model.graph
        producer, consumers = graph_links(graph)
        shapes = _shapes(graph)
        outputs = {o.name for o in graph.output}
        pairs, notes = [], []
        for ln in graph.node:
            if ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx"):
                continue
            match = self._match(ln, producer, consumers, shapes, outputs)
            if isinstance(match, str):
                if match:
                    notes.append(f"{ln.name}: kept the Transposes around LayerNormalization ({match})")
                continue
            t_in, t_out, grad, t_dy, t_dx = match
            base = f"{ln.name}{PREFIX}"
            mean, inv = f"{base}/mean", f"{base}/inv_std"
            eps = next((helper.get_attribute_value(a) for a in ln.attribute if a.name == "epsilon"), 1e-5)
            fwd = helper.make_node("LayerNormChannels", [t_in.input[0], ln.input[1], ln.input[2]],
                                   [t_out.output[0], mean, inv], name=f"{base}/fwd", domain=DOMAIN, epsilon=float(eps))
            bwd = helper.make_node("LayerNormChannelsGrad", [t_dy.input[0], t_in.input[0], ln.input[1], mean, inv],
                                   [t_dx.output[0], grad.output[1], grad.output[2]], name=f"{base}/grad", domain=DOMAIN)
            pairs += [(t_in, []), (ln, [fwd]), (t_out, []), (t_dy, []), (grad, [bwd]), (t_dx, [])]
        replace_nodes(graph, pairs)
        alive = {o for _, new in pairs for n in new for o in n.output}
        gone = {o for old, _ in pairs for o in old.output} - alive   # the channels-last tensors and old statistics
        keep = [v for v in graph.value_info if v.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(keep)
        self.fused = len(pairs) // 6
        if pairs:
            import_domain(model)
        msg = [f"{self.fused} channels-first LayerNorm (Transpose, LayerNormalization, Transpose and its gradient's "
               f"three nodes) on fracgraph's LayerNormChannels(Grad)"] if pairs else []
        return PassResult(model, bool(pairs), msg + notes)

    @staticmethod
    def _match(ln, producer, consumers, shapes, outputs):
        """(Transpose in, Transpose out, LayerNormalizationGrad, its dY Transpose, its dX Transpose), or the reason
        the norm is declined ("" for a LayerNormalization that is no channels-first norm at all: no note)."""
        t_in = producer.get(ln.input[0])
        x = shapes.get(t_in.input[0]) if t_in is not None else None
        rank = len(x) if x else None
        if rank is None or rank < 3 or _perm(t_in) != to_last(rank):
            return ""
        axis = next((helper.get_attribute_value(a) for a in ln.attribute if a.name == "axis"), -1)
        if axis % rank != rank - 1:
            return ""
        if len(ln.input) < 3 or not ln.input[2]:
            return "no bias"
        scale = shapes.get(ln.input[1])
        if x[1] is None or scale is None or list(scale) != [x[1]]:
            return f"scale {scale} is not one value per channel of {x}"
        if len(ln.output) != 3 or not all(ln.output):
            return "no saved mean and inv_std (not a training graph)"
        readers = consumers.get(ln.output[0], [])
        t_out = readers[0] if len(readers) == 1 else None
        if _perm(t_out) != to_first(rank):
            return "its output is not only transposed back to channels-first"
        grads = [r for r in consumers.get(ln.output[1], []) if r.op_type == "LayerNormalizationGrad"]
        if len(grads) != 1 or grads[0].domain != "com.microsoft":
            return "no LayerNormalizationGrad (frozen norm)"
        grad = grads[0]
        if (len(grad.input) != 5 or list(grad.input[1:]) != [t_in.output[0], ln.input[1], ln.output[1], ln.output[2]] or len(grad.output) != 3 or not all(grad.output)):
            return "its gradient is not the 5-input, 3-output form on this norm's tensors"
        if {id(r) for r in consumers.get(t_in.output[0], [])} != {id(ln), id(grad)}:
            return "the channels-last input has other readers"
        if any(id(r) != id(grad) for t in ln.output[1:] for r in consumers.get(t, [])):
            return "mean or inv_std has other readers"
        t_dy = producer.get(grad.input[0])
        if _perm(t_dy) != to_last(rank) or [id(r) for r in consumers.get(t_dy.output[0], [])] != [id(grad)]:
            return "its gradient's dY is not only the channels-first gradient transposed"
        dx_readers = consumers.get(grad.output[0], [])
        t_dx = dx_readers[0] if len(dx_readers) == 1 else None
        if _perm(t_dx) != to_first(rank):
            return "its gradient's dX is not only transposed back to channels-first"
        inner = [t_in.output[0], *ln.output, t_dy.output[0], grad.output[0]]
        if any(t in outputs for t in inner):
            return "a channels-last tensor is a graph output"
        return t_in, t_out, grad, t_dy, t_dx

    def ensures(self, model):
        assert_inputs_defined(model)
