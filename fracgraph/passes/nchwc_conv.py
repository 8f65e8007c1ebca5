"""Training-graph pass: run 2-D `Conv`s on onnxruntime's NCHWc kernels.

onnxruntime's fastest CPU convolution is `com.microsoft.nchwc.Conv` on channel-blocked tensors (blocks of 8
channels with AVX2, 16 with AVX-512), but its inference-time NchwcTransformer only rewrites convs whose weight is
a constant, and a training graph's weights are not. This pass does the rewrite with the weight reordered in the
graph every step, so the forward convs and the stride-1 dX convs of `conv-grad-split` use it:

    X --ReorderInput--> NchwcConv(W reordered) --ReorderOutput--> Y

The reorder of W [O, C, kh, kw] is a Reshape and a Transpose into the kernel's filter layout (the tensor keeps
its logical OIHW shape): OIHWBiBo = [O/B, C/B, kh, kw, Bi, Bo] when C is a multiple of B, OIHWBo =
[O/B, C, kh, kw, Bo] when C < B (the input then stays NCHW) and for depthwise convs. The rules: O a multiple of
B, C < B or a multiple of B; grouped convs depthwise, or with the per-group C and O/G multiples of B (MLAS's NCHWc
kernel runs each group on its own channel blocks, filter OIHWBiBo as above; regnet's 16-channel groups on AVX-512
took 0.14-0.88x onnxruntime's Conv, forward and dX: `bench/kernel_probes.py --only forms --match regnet
--cpu-time`; per-group channels below B, e.g. resnext's 4, stay on Conv). The values are the same
convolution, summed in another order (float rounding differs). Measured per conv on resnet20 shapes on 2 cores,
reorders included, the NCHWc form takes 0.5-0.75x the time of Conv (bench/kernel_probes.py; bench/step_time.py
for the whole step).

With fracgraph's kernels (the default), the reorder is one `NchwcWeight(W)` (fused_ops.c) instead of Reshape,
Transpose and Reshape: onnxruntime's 6-D Transpose ran resnet18's 512x512x3x3 reorder at ~40x the time of an
Add over the same tensor (bench/kernel_probes.py --only reorder), 28% of resnet18's step before. It also folds
in conv-grad-split's channel transpose and kernel flip of the weight of a stride-1 dX conv (whose Transpose and
Slice are then dropped), so that weight is read once per step instead of three times. Since session 11 the kernel
computes its source offsets once per output-channel block (an AVX-512 gather per output vector): 1.0-1.6x the
time of an Add over the weight on every layout regnet_x_400mf and resnet18 use, where the transposed (dX) layouts
took 5.7-13x (`bench/kernel_probes.py --only reorder --cpu-time`).

B is the block size of the machine that builds (`runtime.nchwc_block_size`); the manifest records it and a
session on a CPU with another block size refuses the artifacts (the reorder would be wrong there).

Shape-aware forms (issue 20). NCHWc is not the fastest form everywhere: on tiny maps (resnet18's 2x2 layer4) its
kernel runs a few output columns per call and spends its time on the padded edges, and it does not take grouped
convs whose groups are narrower than a block (onnxruntime's plain Conv then runs one small GEMM per image and
group). With fracgraph's kernels,
each conv the pass sees (the forward convs, conv-grad-split's stride-1 dX convs and its strided dX
ConvTransposes) goes to the form a cost model (`conv_costs`/`choose_form`) says is cheapest:

- `NCHWc` (above);
- `im2col-gemm`, the whole batch as one GEMM on onnxruntime's MLAS: forward `Y = Col2Im1x1(W[G, Co/G, Kg] @
  Im2Col(X))` (Im2Col: [Ci*kh*kw, N*P]; a 1x1 Col2Im is the transpose back to NCHW); dX, stride 1 or strided,
  as its adjoint `dX = Col2Im(W^T @ dYt)` on the forward weight itself (no transpose or flip of W), dYt [Co, N*P]
  the one ConvGradWCols already wrote for the conv's weight gradient where conv-grad-w chose im2col-gemm, else an
  Im2Col1x1 of dY;
- `depthwise-t` (session 10): fracgraph's `DepthwiseConvT(dY, W)` for a depthwise conv's strided dX (kernels/dw_convt.c,
  on the forward weight itself), whatever the shape: onnxruntime's grouped ConvTranspose runs a single-channel GEMM
  and col2im per image and channel, and took 1.7-3.8x the kernel's CPU time on the corpus's strided depthwise
  shapes (`python bench/kernel_probes.py --only dwconvt --threads 2 --cpu-time`);
- `depthwise`: fracgraph's `DepthwiseConv(X, W)` for a depthwise conv's forward and its stride-1 dX (the flipped
  kernel, `flip=1` on the forward weight itself): vectors along the output row over a zero-padded copy of each
  plane (fused_ops.c). `python bench/kernel_probes.py --only dwconv --cpu-time` (convnext's 7x7, efficientnet's
  and mobilenet's 3x3/5x5): 0.14-0.41x onnxruntime's Conv on maps 16 columns wide and more, where NCHWc took
  0.39-0.90x (or does not apply: convnext's 40 channels); on 8x8 and smaller maps NCHWc (0.02-0.21x) beats it
  (0.28-1.1x), and strided it loses (0.8-1.9x). So it is taken (AVX-512 only) for stride-1 depthwise convs whose
  output rows are >= `DW_MIN_W` wide, or >= `DW_MIN_W_NO_NCHWC` where NCHWc's rules decline the conv;
- `Conv` / `ConvTranspose`: onnxruntime's own op, kept.

The model counts, per image and in units of one float read or written, what separates the forms (the GEMM's
multiply-adds are the same in all): im2col-gemm writes and reads back the col and the output or dYt
(3 P (G Kg + Co)); NCHWc pays ROW x MACs x the fraction of a row's output columns whose window reaches into the
padding (it runs those one at a time: all of them on a 2x2 map, none in an unpadded 1x1 conv) plus the activation
reorders; onnxruntime's Conv and ConvTranspose run one GEMM per image and group (a
call, the weight read, exposed below HIDE output positions, and the image's col in cache). The constants come
from `python bench/kernel_probes.py --only forms` (every form on resnet18's, regnet's and resnet20's shapes,
printed next to the model's costs): im2col-gemm took 0.6x NCHWc's time on 2x2 outputs and 1.4-3.3x on 4x4 and
larger, and 0.17x onnxruntime's ConvTranspose on resnet18's strided dX into layer4 but 0.6-1.2x (noise) one
stage up. im2col-gemm must win by `GEMM_MARGIN`. Depthwise convs (no GEMM to speak of), 1x1 stride-1 convs (the
others read X in place) and grouped convs (onnxruntime's per-group GEMMs of regnet's 16-channel groups were
0.5-7.7x faster than one batched MatMul in the probe) never take it. The choice per node is in the manifest
(`extra["conv_forms"]`) and `fracgraph inspect`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..kernels import DOMAIN
from ..quantizers import Emitter
from .base import Pass, PassResult, assert_inputs_defined, opset, replace_nodes
from .conv_grad_w import CACHE, CALL, ConvShape, _describe, _has_avx512
from .fused_ops import import_domain

NCHWC_DOMAIN = "com.microsoft.nchwc"
ROW = 0.025           # NCHWc: cost per multiply-add, per edge column of a row (fitted on --only forms)
HIDE = 16             # onnxruntime's per-image GEMM: the weight read is hidden behind the multiply-adds from P = HIDE
GEMM_MARGIN = 1.25    # im2col-gemm replaces NCHWc/Conv only where the model says it is this many times cheaper
DW_MIN_W = 16          # depthwise kernel: output row width from which it beats NCHWc (one full vector per row)
DW_MIN_W_NO_NCHWC = 4  # ... and from which it beats onnxruntime's plain Conv (2x2 maps: 0.6-1.1x, not taken)
SPLIT_W = ("::split/w_flip", "::split/w_t", "::split/w_gt", "::split/w_g")   # conv-grad-split's W' chain


def conv_costs(s: ConvShape, role: str, nchwc: bool) -> dict[str, float | None]:
    """Modelled cost per image, beyond the multiply-adds, of each form of a conv's forward (role "forward") or
    input gradient ("dX": stride 1, a Conv in the graph; "dX-strided": a ConvTranspose). `s` is the forward conv."""
    cog, macs = s.co // s.group, s.co * s.kg * s.p
    out_w = s.wo if role == "forward" else s.w
    edges = edge_columns(s, role)
    # per image and group: a call, the weight read (exposed on maps of fewer than HIDE positions), the col in cache
    own = s.group * (CALL + cog * s.kg * max(0.0, 1.0 - s.p / HIDE) + CACHE * s.kg * s.p)
    return {
        "NCHWc": ROW * macs * edges / out_w + s.ci * s.h * s.w + s.co * s.p if nchwc and role != "dX-strided" else None,
        "im2col-gemm": 3.0 * s.p * (s.group * s.kg + s.co),
        "ConvTranspose" if role == "dX-strided" else "Conv": own,
    }


def edge_columns(s: ConvShape, role: str) -> int:
    """Output columns of a row whose window reaches into the padding (NCHWc runs them one at a time): of the forward
    conv, or (role "dX") of the stride-1 dX conv, dY padded by d (k - 1) - p."""
    reach = s.dw * (s.kw - 1)
    if role == "forward":
        return sum(wo * s.sw - s.pw < 0 or wo * s.sw - s.pw + reach >= s.w for wo in range(s.wo))
    pad = reach - s.pw
    return sum(x - pad < 0 or x - pad + reach >= s.wo for x in range(s.w))


def choose_form(s: ConvShape, role: str, nchwc: bool, gemm: bool, avx512: bool = False) -> tuple[str, str]:
    """(form, reason) for one conv: `nchwc` whether NCHWc's rules take it, `gemm` whether fracgraph's kernels do,
    `avx512` whether the CPU has the depthwise kernel's vectors."""
    c = {k: v for k, v in conv_costs(s, role, nchwc).items() if v is not None}
    base = "NCHWc" if "NCHWc" in c else next(k for k in c if k in ("Conv", "ConvTranspose"))
    if not gemm:
        return base, "fracgraph's kernels not in use"
    if s.depthwise and role == "dX-strided":
        return "depthwise-t", ("depthwise strided dX: fracgraph's DepthwiseConvT, 0.26-0.60x onnxruntime's ConvTranspose "
                               "(one single-channel GEMM per image and channel; bench/kernel_probes.py --only dwconvt)")
    if s.depthwise:
        out_w = s.wo if role == "forward" else s.w
        need = DW_MIN_W if base == "NCHWc" else DW_MIN_W_NO_NCHWC
        if avx512 and role != "dX-strided" and s.sh == s.sw == 1 and out_w >= need:
            return "depthwise", (f"depthwise stride 1, rows of {out_w} >= {need}: fracgraph's kernel beats {base} "
                                 f"(bench/kernel_probes.py --only dwconv)")
        return base, "depthwise: no GEMM to speak of" + (
            "" if not avx512 or s.sh != 1 or s.sw != 1 or role == "dX-strided" else f"; rows of {out_w} < {need}")
    if s.group > 1:
        return base, ("grouped: NCHWc per group (0.14-0.88x Conv: bench/kernel_probes.py --only forms --match regnet)"
                      if base == "NCHWc" else "grouped: im2col-gemm's batched GEMM is slower than the per-group GEMMs")
    if s.pointwise:
        return base, "1x1 stride 1: reads X in place"
    if c["im2col-gemm"] * GEMM_MARGIN < c[base]:
        return "im2col-gemm", (f"modelled {c['im2col-gemm']:,.0f} vs {base}'s {c[base]:,.0f} per image "
                               f"(below 1/{GEMM_MARGIN:g})")
    return base, f"modelled {c[base]:,.0f} vs im2col-gemm's {c['im2col-gemm']:,.0f} per image"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class NchwcConvPass(Pass):
    name = "nchwc-conv"

    def __init__(self, shapes: dict[str, list], block: int, fused: bool = False, force: str | None = None,
                 avx512: bool | None = None):
        self.shapes = shapes   # tensor name -> static shape, for the weights
        self.block = block
        self.avx512 = _has_avx512() if avx512 is None else avx512   # the depthwise kernel's vectors
        self.fused = fused     # weight reorders on fracgraph's NchwcWeight, and the im2col-gemm form (the kernels build here)
        self.force = force     # "im2col-gemm": every conv with static shapes on it, whatever the model says (tests)
        self.choices: list[dict] = []   # per conv node: role, form, reason, shape, modelled costs

    def call(self, model):
        graph = model.graph
        if self.block <= 1 and not self.fused:
            return PassResult(model, False, ["nchwc-conv: this CPU's onnxruntime has no NCHWc kernels; convs kept"])
        em = Emitter(graph, opset(model))
        shapes = dict(self.shapes)
        for vi in list(graph.value_info) + list(graph.input):
            shapes.setdefault(vi.name, [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim])
        shapes.update({t.name: list(t.dims) for t in graph.initializer})
        notes, pairs, self.choices = [], [], []
        self._producer = {o: n for n in graph.node for o in n.output}
        cols = {n.input[0]: n for n in graph.node if n.op_type == "ConvGradWCols" and n.domain == DOMAIN}
        after: dict[int, list] = {}   # id(ConvGradWCols node) -> dX forms that read its dYt, placed after it
        n_nchwc = n_gemm = n_dw = n_dwt = 0
        for node in list(graph.node):
            if node.domain not in ("", "ai.onnx") or not (node.op_type == "Conv" or (
                    node.op_type == "ConvTranspose" and node.output[0].endswith("::split/dX"))):
                continue
            role = "forward" if node.op_type == "Conv" and not node.output[0].endswith("::split/dX") else \
                "dX" if node.op_type == "Conv" else "dX-strided"
            nchwc_why = "strided dX (ConvTranspose)" if role == "dX-strided" else \
                "this CPU's onnxruntime has no NCHWc kernels" if self.block <= 1 else \
                self._nchwc_rule(node, shapes.get(node.input[1]))
            s, w = _conv_shape(node, role, shapes, self._forward_weight)
            if s is None:
                form, reason = ("NCHWc", "") if nchwc_why is None else (node.op_type, f"{w}; {nchwc_why}")
            else:
                form, reason = choose_form(s, role, nchwc_why is None, self.fused, self.avx512)
                if self.force == "im2col-gemm" and self.fused:
                    form, reason = "im2col-gemm", "forced"
                if form == node.op_type and nchwc_why:
                    reason = f"{reason}; no NCHWc: {nchwc_why}"
            entry = {"node": node.name or node.output[0], "role": role, "form": form, "reason": reason}
            if s is not None:
                entry.update(shape=_describe(s), costs={k: round(v) for k, v in
                                                        conv_costs(s, role, nchwc_why is None).items() if v is not None})
            self.choices.append(entry)
            if form == "NCHWc":
                self._rewrite(em, node, shapes.get(node.input[1]))
                pairs.append((node, em.nodes))
                n_nchwc += 1
            elif form == "im2col-gemm":
                owner = _emit_gemm(em, node, role, s, w, cols)
                if owner is None:
                    pairs.append((node, em.nodes))
                else:   # reads the ConvGradWCols' dYt, which comes later in the graph
                    after.setdefault(id(owner), [owner]).extend(em.nodes)
                    pairs.append((node, []))
                n_gemm += 1
            elif form == "depthwise":
                self._depthwise(em, node, role, s)
                pairs.append((node, em.nodes))
                n_dw += 1
            elif form == "depthwise-t":
                pairs.append((node, [self._depthwise_t(node, s)]))
                n_dwt += 1
            else:
                notes.append(f"{entry['node']}: kept {form} ({reason})")
            em.nodes = []
        by_id = {id(n): n for n in graph.node}
        pairs += [(by_id[i], nodes) for i, nodes in after.items()]
        replace_nodes(graph, pairs)
        if self.fused and pairs:
            _drop_dead(graph, SPLIT_W)
            import_domain(model)
        if n_dw:
            notes.insert(0, f"{n_dw} depthwise conv(s) on fracgraph's DepthwiseConv (shape-aware forms)")
        if n_dwt:
            notes.insert(0, f"{n_dwt} strided depthwise dX on fracgraph's DepthwiseConvT (shape-aware forms)")
        if n_gemm:
            notes.insert(0, f"{n_gemm} conv(s) as im2col + one GEMM (shape-aware forms)")
            if not any(o.domain == "com.microsoft" for o in model.opset_import):
                model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        if n_nchwc:
            notes.insert(0, f"{n_nchwc} Conv on NCHWc kernels (block {self.block})"
                            + (", weights reordered by fracgraph's NchwcWeight" if self.fused else ""))
            if not any(o.domain == NCHWC_DOMAIN for o in model.opset_import):
                model.opset_import.append(helper.make_opsetid(NCHWC_DOMAIN, 1))
        return PassResult(model, bool(pairs), notes)

    def _forward_weight(self, w: str) -> str:
        """The forward weight W behind conv-grad-split's W' (its Transpose/Reshape and flip chain)."""
        node = self._producer.get(w)
        while node is not None and node.output[0].endswith(SPLIT_W):
            w = node.input[0]
            node = self._producer.get(w)
        return w

    def _nchwc_rule(self, node, w_shape) -> str | None:
        """Why NCHWc does not take this conv (None: it does); the NchwcTransformer's rules."""
        a = _attrs(node)
        B = self.block
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad"
        if not w_shape or len(w_shape) != 4 or any(not d for d in w_shape):
            return "weight shape not static 2-D"
        o, c, kh, kw = w_shape
        group = a.get("group", 1)
        if o % B:
            return f"{o} output channels, not a multiple of {B}"
        if group == 1:
            if c >= B and c % B:
                return f"{c} input channels, neither < {B} nor a multiple of it"
        elif not (c == 1 and o == group) and (c % B or (o // group) % B):
            return f"grouped with {c} input and {o // group} output channels per group, not multiples of {B}"
        return None

    def _rewrite(self, em: Emitter, node, w_shape) -> None:
        a = _attrs(node)
        B = self.block
        o, c, kh, kw = w_shape
        group = a.get("group", 1)
        depthwise = group > 1 and c == 1 and o == group
        blocked_in = c >= B or group > 1   # input reordered; filter OIHWBo where C < B and for depthwise
        filter_bibo = blocked_in and not depthwise   # OIHWBiBo: also grouped convs (C and O/G multiples of B)
        base = f"{node.name}::nchwc"
        w = node.input[1]
        if self.fused:   # one pass over W, folding in conv-grad-split's transpose and flip of it
            src, transpose, flip = self._source(w, group)
            wb = em.node("NchwcWeight", [src], f"{base}/w", domain=DOMAIN, block=B, blocked_in=int(filter_bibo),
                         transpose=transpose, flip=int(flip))
        elif filter_bibo:   # OIHWBiBo
            r = em.node("Reshape", [w, em.const([o // B, B, c // B, B, kh, kw], np.int64)], f"{base}/w6")
            t = em.node("Transpose", [r], f"{base}/w6t", perm=[0, 2, 4, 5, 3, 1])
        else:                            # OIHWBo
            r = em.node("Reshape", [w, em.const([o // B, B, c, kh, kw], np.int64)], f"{base}/w5")
            t = em.node("Transpose", [r], f"{base}/w5t", perm=[0, 2, 3, 4, 1])
        if not self.fused:
            wb = em.node("Reshape", [t, em.const([o, c, kh, kw], np.int64)], f"{base}/w")
        x = node.input[0]
        if blocked_in:
            x = em.node("ReorderInput", [x], f"{base}/x", domain=NCHWC_DOMAIN)
        attrs = {k: v for k, v in a.items() if k in ("dilations", "group", "pads", "strides")}
        y = em.node("Conv", [x, wb] + list(node.input[2:3]), f"{base}/y", domain=NCHWC_DOMAIN,
                    kernel_shape=[kh, kw], **attrs)
        em.nodes.append(helper.make_node("ReorderOutput", [y], [node.output[0]], name=f"{base}/out",
                                         domain=NCHWC_DOMAIN, channels=o))

    def _depthwise(self, em: Emitter, node, role: str, s: ConvShape) -> None:
        """DepthwiseConv(X, W) for a depthwise forward conv (bias as an Add), or for a stride-1 dX conv on the
        forward weight with flip=1 where its W' is conv-grad-split's flip of it."""
        a = _attrs(node)
        kh, kw = s.kh, s.kw
        pads, dil, st = list(a.get("pads", [0, 0, 0, 0])), list(a.get("dilations", [1, 1])), list(a.get("strides", [1, 1]))
        w, flip = node.input[1], False
        if role == "dX":
            w, _, flip = self._source(w, int(a.get("group", 1)))
        base = f"{node.name or node.output[0]}::dwconv"
        bias = len(node.input) > 2 and bool(node.input[2])
        out = f"{base}/y" if bias else node.output[0]
        em.nodes.append(helper.make_node("DepthwiseConv", [node.input[0], w], [out], name=f"{base}/conv", domain=DOMAIN,
                                         kh=kh, kw=kw, sh=st[0], sw=st[1], ph=pads[0], pw=pads[1], ph_end=pads[2],
                                         pw_end=pads[3], dh=dil[0], dw=dil[1], flip=int(flip)))
        if bias:
            b = em.node("Reshape", [node.input[2], em.const([-1, 1, 1], np.int64)], f"{base}/b")
            em.nodes.append(helper.make_node("Add", [out, b], [node.output[0]], name=f"{base}/out"))

    @staticmethod
    def _depthwise_t(node, s: ConvShape) -> onnx.NodeProto:
        """DepthwiseConvT(dY, W) for conv-grad-split's strided depthwise dX (a ConvTranspose on the forward weight,
        output X's spatial size)."""
        return helper.make_node("DepthwiseConvT", [node.input[0], node.input[1]], [node.output[0]],
                                name=f"{node.name or node.output[0]}::dwconvt", domain=DOMAIN, kh=s.kh, kw=s.kw,
                                sh=s.sh, sw=s.sw, ph=s.ph, pw=s.pw, dh=s.dh, dw=s.dw, oh=s.h, ow=s.w)

    def _source(self, w: str, group: int) -> tuple[str, int, bool]:
        """(tensor, transpose, flip): W' = w, or conv-grad-split's flip (Slice; kernels above 1x1) of its channel
        transpose (a Transpose for group 1; Reshape, Transpose, Reshape per group: `transpose` is then the group
        count, NchwcWeight's attribute) or of the weight itself (depthwise), followed back to the forward weight."""
        src, flip = w, False
        node = self._producer.get(src)
        if node is not None and node.op_type == "Slice" and node.output[0].endswith("::split/w_flip"):
            src, flip = node.input[0], True
            node = self._producer.get(src)
        if group == 1 and node is not None and node.op_type == "Transpose" and node.output[0].endswith("::split/w_t") \
                and list(helper.get_attribute_value(node.attribute[0])) == [1, 0, 2, 3]:
            return node.input[0], 1, flip
        if group > 1 and node is not None and node.op_type == "Reshape" and node.output[0].endswith("::split/w_t"):
            t = self._producer.get(node.input[0])
            g5 = self._producer.get(t.input[0]) if t is not None and t.op_type == "Transpose" else None
            if g5 is not None and g5.op_type == "Reshape" and g5.output[0].endswith("::split/w_g") \
                    and list(helper.get_attribute_value(t.attribute[0])) == [0, 2, 1, 3, 4]:
                return g5.input[0], group, flip
        if group == 1 and flip:   # a flip of something else: leave W' as it is
            return w, 0, False
        return src, 0, flip

    def ensures(self, model):
        assert_inputs_defined(model)


def _conv_shape(node, role: str, shapes: dict, forward_weight) -> tuple[ConvShape | None, str]:
    """(the forward conv's shape, its weight W) for a forward Conv, a stride-1 dX Conv or a strided dX
    ConvTranspose of conv-grad-split; (None, why) where a shape is not static."""
    a = _attrs(node)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None, "auto_pad"
    w = node.input[1] if role != "dX" else forward_weight(node.input[1])
    ws = shapes.get(w)
    x = shapes.get(node.input[0] if role == "forward" else node.output[0])   # X, or dX (X's shape)
    if not ws or len(ws) != 4 or any(not d for d in ws):
        return None, "weight shape not static 2-D"
    if not x or len(x) != 4 or any(not d for d in x[1:]):
        return None, "input shape not static"
    co, cig, kh, kw = ws
    group = int(a.get("group", 1))
    strides, dil = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if role == "dX":   # the dX conv's pads are d (k - 1) - p
        pads = [dil[i % 2] * ((kh, kw)[i % 2] - 1) - pads[i] for i in range(4)]
    if len(strides) != 2 or len(dil) != 2 or len(pads) != 4:
        return None, "not 2-D"
    s = ConvShape(ci=x[1], h=x[2], w=x[3], co=co, kh=kh, kw=kw, sh=strides[0], sw=strides[1], ph=pads[0],
                  pw=pads[1], ph_end=pads[2], pw_end=pads[3], dh=dil[0], dw=dil[1], group=group,
                  bias=role == "forward" and len(node.input) > 2 and bool(node.input[2]))
    if s.ho < 1 or s.wo < 1 or cig * group != s.ci or co % group or min(strides + dil) < 1:
        return None, "shapes inconsistent"
    return s, w


def _emit_gemm(em: Emitter, node, role: str, s: ConvShape, w: str, cols: dict):
    """The im2col-gemm form of a forward conv or of a dX; returns the ConvGradWCols node whose dYt it reads (the
    form must then come after it), else None."""
    base = f"{node.name or node.output[0]}::gemm"
    G, cog, kg = s.group, s.co // s.group, s.kg
    ka = dict(kh=s.kh, kw=s.kw, sh=s.sh, sw=s.sw, ph=s.ph, pw=s.pw, dh=s.dh, dw=s.dw)
    one = dict(kh=1, kw=1, sh=1, sw=1, ph=0, pw=0, dh=1, dw=1)
    w2 = em.node("Reshape", [w, em.const([s.co, kg] if G == 1 else [G, cog, kg], np.int64)], f"{base}/w")
    if role == "forward":
        col = em.node("Im2Col", [node.input[0]], f"{base}/col", domain=DOMAIN, h=s.h, w=s.w, ho=s.ho, wo=s.wo, **ka)
        if G > 1:
            col = em.node("Reshape", [col, em.const([G, kg, -1], np.int64)], f"{base}/col_g")
        y = em.node("MatMul", [w2, col], f"{base}/y")
        out = f"{base}/y_nchw" if s.bias else node.output[0]
        em.nodes.append(helper.make_node("Col2Im", [y], [out], name=f"{base}/nchw", domain=DOMAIN, h=s.ho, w=s.wo,
                                         ho=s.ho, wo=s.wo, **one))
        if s.bias:
            b = em.node("Reshape", [node.input[2], em.const([s.co, 1, 1], np.int64)], f"{base}/b")
            em.nodes.append(helper.make_node("Add", [out, b], [node.output[0]], name=f"{base}/out"))
        return None
    owner = cols.get(node.input[0])
    if owner is not None and _attrs(owner).get("group") == G:
        dyt = owner.output[0]   # [G, Co/G, N*P]
    else:
        owner = None
        dyt = em.node("Im2Col", [node.input[0]], f"{base}/dyt", domain=DOMAIN, h=s.ho, w=s.wo, ho=s.ho, wo=s.wo, **one)
        if G > 1:
            dyt = em.node("Reshape", [dyt, em.const([G, cog, -1], np.int64)], f"{base}/dyt_g")
    c = em.node("FusedMatMul", [w2, dyt], f"{base}/cols", domain="com.microsoft", transA=1)
    em.nodes.append(helper.make_node("Col2Im", [c], [node.output[0]], name=f"{base}/dx", domain=DOMAIN, h=s.h, w=s.w,
                                     ho=s.ho, wo=s.wo, **ka))
    return owner


def _drop_dead(graph: onnx.GraphProto, suffixes: tuple[str, ...]) -> None:
    """Remove the nodes with an output ending in one of `suffixes` that nothing reads any more (conv-grad-split's
    weight transposes and flips, now folded into NchwcWeight), with their value_info."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.output[0].endswith(suffixes) and not any(o in used for o in n.output)]
        if not dead:
            return
        names, gone = {o for n in dead for o in n.output}, {id(n) for n in dead}
        keep = [n for n in graph.node if id(n) not in gone]
        del graph.node[:]
        graph.node.extend(keep)
        keep_vi = [v for v in graph.value_info if v.name not in names]
        del graph.value_info[:]
        graph.value_info.extend(keep_vi)
