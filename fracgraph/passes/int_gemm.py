"""Training-graph pass: quantized forward GEMMs (Conv, MatMul, Gemm) on integer codes, chosen at run time from the
precision input (fracgraph/kernels/int_gemm.c).

FracTrain's forward GEMM reads an activation and a weight that are both fake-quantized (fw-quant): the values are
s q + m with integer codes q (activation per tensor, weight per output channel). When both operands' bits are in
1..8 in a step, the GEMM's sum of products is the integer sum of the codes plus correction terms (int_gemm.c's
header), computed with 8-bit multiplies and int32 accumulation and rescaled once. Everything else about the step
stays: the fake-quantized float tensors are still computed (the backward reads them), and so are the ranges.

    Conv(x_fq, w_fq[, b]) -> If(0 < act bits <= 8 and 0 < weight bits <= 8)
                                then: IntConv(x_fq, x_min, x_scale, w_fq, w_min, w_scale) [+ b]
                                else: Conv(x_fq, w_fq[, b])    (on NCHWc kernels when the build uses them)
    MatMul(a_fq, w_fq)    -> If(the same)
                                then: IntMatMul(a_fq, a_min, a_scale, w_fq, w_min, w_scale)
                                else: MatMul(a_fq, w_fq)
    Gemm(a_fq, w_fq[, c]) -> If(the same)      (transA 0, alpha 1, beta 1; transB 1: w [N, K] per row, 0: per column)
                                then: IntGemm(a_fq, a_min, a_scale, w_fq, w_min, w_scale, c or 0; trans_b)
                                else: Gemm(a_fq, w_fq[, c])

Convs run on fracgraph's own kernel (onnxruntime 1.19.2's ConvInteger takes u8 weights only and ran at the speed
of its FP32 NCHWc conv, without the correction terms: bench/kernel_probes.py --only intconv). A linear layer's
MatMul (a [..., M, K] per tensor, w [K, N] per column, the MatMul weight quantizer's MinMaxCols ranges) runs on
IntMatMul: one op that recovers the codes while packing, runs the int8 products (AMX tiles, or vnni / avx2 / scalar,
bitwise the same) and rescales in its epilogue, so no code tensors or rescale passes appear in the graph. It is on
by default (`BuildOptions.int_matmul`, `quantize --no-int-matmul` keeps the float MatMuls): on vit_tiny's and the
GPT's linear shapes it took 0.37-0.85x MLAS's float MatMul's CPU time on amx (bench/kernel_probes.py --only intmatmul,
one thread). The older form (IntCodesU8/S8 + onnxruntime's MatMulInteger + IntMatMulRescale, three extra ops and
their tensors around each GEMM) made the zoo GPT's step 1.15-1.23x slower and is no longer written.

The switch is the same mechanism as quant-branch's: a schedule that moves a block to 12 or 16 bits, or to FP32
(0 bits), runs the float op of today's graph, without a rebuild. The operands' ranges and scales are read from
the quantizers' own tensors (Identity'd in the outer graph, so that every pass sees their readers).

Per-op rules (RULES, keyed by op type) decline, with the reason in the notes and the manifest (the op keeps
today's form): grouped convs, auto_pad or asymmetric pads, a non-2-D or dynamic weight shape, convs with few
multiply-adds per input code (MIN_MACS_PER_CODE: 1x1 strided convs, where the float conv is faster), strided
convs on fewer than 4 input channels (MIN_STRIDED_CHANNELS: the stems of torchvision's models), MatMuls
whose weight is not a 2-D matrix. Not matched at all: GEMMs whose operands are not both fw-quant outputs
(the first conv under `--first fp32`, conv-grad-split's dX convs, which read errors), attention's MatMuls of two
activations (batched GEMMs of the heads' width; the older code-and-rescale form took 3.5x the float MatMul on the
score shape, IntMatMul takes one weight matrix and is not measured there),
per-sample (DFQ) bits. A Gemm-form linear layer (torchvision's exports write nn.Linear as Gemm(x, W, b, transB=1))
runs on IntGemm, IntMatMul's kernels with the weight read transposed while packing and the bias added in the
double-precision epilogue (so y is rounded once); declined: transA, alpha or beta not 1, a bias that is not one
value per output column.

The weight gradient of a conv (dW = sum over images and positions of dY x im2col(X)) reads the error the BW
quantizer wrote (stochastic rounding, per tensor: dY = s_g g + m_g) and the activation the FW quantizer wrote (per
tensor: X = s_x q + m_x): both scales lie outside its reduction, so it is one integer sum plus correction terms
(int_gemm.c's IntConvGradW). It is switched on the activation and error bits (the weight's do not enter it):

    <conv-grad-w's float form of dW>(dY, X) -> If(0 < act bits <= 8 and 0 < grad bits <= 8)
                                                 then: IntConvGradW(dY, g_min, g_scale, X, x_min, x_scale)
                                                 else: the float form, moved into the branch as it was

The pass runs after conv-grad-w (build.py's order), so the float branch is whatever form conv-grad-w's cost model
chose for the shape (ConvGradW, im2col-gemm's ConvGradWCols + FusedMatMul + Reshape, or onnxruntime's ConvGrad)
and its manifest record stays true of the float branch; DW_FORMS (keyed by the op type of the node that reads dY
and X) says how to find each form's nodes. Declined, with the reason: grouped convs, a bias gradient (computed
from the float form's tensors), a ConvGrad that still computes dX, unknown input shapes, maps under
MIN_DW_POSITIONS or over the int32 bound, and few multiply-adds per packed code (MIN_DW_MACS_PER_CODE: the 1x1
stride-2 shortcuts). The error GEMM (dX) cannot be integer with today's math: the weight's per-output-channel
scales lie along its reduction axis, so its sum does not factor into one integer sum and one rescale.

A linear layer's weight gradient, as onnxruntime's gradient builder writes it (MatMul_Grad: Gemm(Reshape(a_fq),
Reshape(dY), transA=1), or on the 2-D tensors themselves), reads the FW quantizer's activation and the BW quantizer's
error, both per tensor: it is switched the same way (with `int_matmul`), the Gemm moved into the else branch:

    Gemm(A_2d, dY_2d, transA=1) -> If(0 < act bits <= 8 and 0 < grad bits <= 8)
                                     then: IntMatMulGradW(A_2d, a_min, a_scale, dY_2d, g_min, g_scale)
                                     else: Gemm(A_2d, dY_2d, transA=1)

A transB = 1 Gemm's weight gradient, which onnxruntime writes Gemm(dY, A, transA=1) (dW = dY^T A, [N, K]), is
switched the same way (IntMatMulGradW(dY, g_min, g_scale, A, a_min, a_scale): both per tensor). Its error GEMM
(FusedMatMul(dY, W^T), or the Gemm's dA) stays float, for the reason above. Not matched: MatMuls whose weight is
transposed after its quantizer (vit_tv's attention in-projection).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..kernels import DOMAIN
from ..quantizers import Emitter
from .base import Pass, PassResult, assert_inputs_defined, opset, replace_nodes
from .fused_ops import import_domain

MAX_BITS = 8
# IntConv packs every input code once per image and then runs K * taps / (sh * sw) multiply-adds per packed code;
# below this many the packing costs more than the integer GEMM saves (bench/kernel_probes.py --only intconv, one
# thread: resnet20's 1x1 stride-2 32 -> 64 conv, 16 per code, took 2.4-5.2x a plain Conv's time; the 3x3
# stride-2 16 -> 32 conv, 72 per code, 0.39-0.41x)
MIN_MACS_PER_CODE = 32
# IntConv's vector lanes run along the output positions (16 per tile), so maps smaller than 8x8 leave most lanes idle;
# there nchwc-conv's im2col-gemm form (one GEMM over the whole batch) is the faster forward: resnet18 at 64x64 (layer3
# 4x4, layer4 2x2) stepped in 0.43-0.48 s with IntConv on every eligible conv against 0.33-0.39 s with the float
# forms (`python bench/model_speed.py --models resnet18 --rounds 2 --steps 2 --off int-gemm`, idle machine)
MIN_POSITIONS = 64
# A strided conv on fewer input channels than one VNNI group of 4 (the stems of torchvision's models) packs a
# gather of a few channels per tap, where NCHWc's float kernel (OIHWBo on the plain NCHW image) runs at full width:
# `bench/kernel_probes.py --only intconv --cpu-time --threads 1` took IntConv at 2.4-2.8x NCHWc's time on resnet18's
# 3 -> 64 7x7/2 stem and 1.2-1.5x on efficientnet's 3 -> 32 3x3/2, but 0.84x on resnet20's stride-1 3 -> 16 stem
MIN_STRIDED_CHANNELS = 4
# The integer paths that beat the float convs they replace: VNNI ran resnet20's 3x3 convs in 0.52-0.85x the time
# of the NCHWc conv, AVX2 (vpmaddwd on 16-bit codes) in 1.1-1.6x (--only intconv, one thread), so on a CPU
# without VNNI the pass leaves the convs as they are (the AVX2 and scalar paths serve artifacts moved there with
# FRACGRAPH_INT_ISA set, and the tests)
FAST_PATHS = ("amx", "vnni")   # amx: the same sums on AMX tiles (bench/kernel_probes.py --only intdw / intconv)
# IntConvGradW packs every activation and error code once per image and then runs K C kh kw Ho Wo multiply-adds;
# per packed code (C H W + K Ho Wo) resnet20's 1x1 stride-2 shortcuts have 5-11 and took 1.65-1.83x the float
# form's CPU time, its 3x3 stem 23 (0.51-0.61x), its 3x3 convs 48-72 (0.42-0.86x) (bench/kernel_probes.py --only
# intdw --threads 1 --cpu-time, two runs)
MIN_DW_MACS_PER_CODE = 16
# measured down to resnet20's 8x8 maps; smaller maps leave each register tile a few steps of work
MIN_DW_POSITIONS = 64
# each image's integer sum is below Ho Wo 255 128, which must fit in int32 (the kernel refuses larger maps)
MAX_DW_POSITIONS = (2**31 - 1) // (255 * 128)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _ConvRule:
    @staticmethod
    def decline(node, w_shape, y_shape=None, shapes=None) -> str | None:
        a = _attrs(node)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad"
        if a.get("group", 1) != 1:
            return "grouped"
        if not w_shape or len(w_shape) != 4 or any(not d for d in w_shape):
            return "weight shape not static 2-D"
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if pads[:2] != pads[2:]:
            return f"asymmetric pads {pads}"
        o, c, kh, kw = w_shape
        sh, sw = list(a.get("strides", [1, 1]))
        if c < MIN_STRIDED_CHANNELS and sh * sw > 1:
            return (f"strided conv on {c} input channel(s) (< {MIN_STRIDED_CHANNELS}): IntConv's strided gather of "
                    f"so few channels is slower than NCHWc's float kernel")
        per_code = o * kh * kw / (sh * sw)
        if per_code < MIN_MACS_PER_CODE:
            return (f"{per_code:g} multiply-adds per input code (< {MIN_MACS_PER_CODE}): packing the codes costs more "
                    f"than the integer GEMM saves")
        if y_shape and len(y_shape) == 4 and all(isinstance(d, int) and d > 0 for d in y_shape[2:]) \
                and y_shape[2] * y_shape[3] < MIN_POSITIONS:
            return (f"{y_shape[2]}x{y_shape[3]} output map (< {MIN_POSITIONS} positions): IntConv's 16-position lanes "
                    f"would idle; the float forms are faster there")
        return None

    @staticmethod
    def integer(node, base, w_shape, xm, xs, wm, ws, out) -> list[onnx.NodeProto]:
        a = _attrs(node)
        _, _, kh, kw = w_shape
        st, pads, dil = list(a.get("strides", [1, 1])), list(a.get("pads", [0, 0, 0, 0])), list(a.get("dilations", [1, 1]))
        return [helper.make_node("IntConv", [node.input[0], xm, xs, node.input[1], wm, ws], [out], name=f"{base}/conv",
                                 domain=DOMAIN, kh=kh, kw=kw, sh=st[0], sw=st[1], ph=pads[0], pw=pads[1],
                                 dh=dil[0], dw=dil[1])]


class _MatMulRule:
    @staticmethod
    def decline(node, w_shape, y_shape=None, shapes=None) -> str | None:
        if not w_shape or len(w_shape) != 2 or any(not d for d in w_shape):
            return "weight not a static 2-D matrix"
        return None

    @staticmethod
    def integer(node, base, w_shape, xm, xs, wm, ws, out) -> list[onnx.NodeProto]:
        """One op: the codes recovered while packing, the int8 GEMM and the rescale in its epilogue."""
        return [helper.make_node("IntMatMul", [node.input[0], xm, xs, node.input[1], wm, ws], [out], name=f"{base}/mm",
                                 domain=DOMAIN)]


class _GemmRule:
    """ONNX Gemm(a, w[, c]) as a linear layer writes it (torchvision's exports: transB = 1, w [N, K] quantized per
    row, i.e. per output channel; transB = 0, w [K, N] per column): IntGemm, the bias added in its epilogue."""

    @staticmethod
    def decline(node, w_shape, y_shape=None, shapes=None) -> str | None:
        a = _attrs(node)
        if a.get("transA", 0) != 0:
            return "transA = 1 (the activation transposed)"
        has_c = len(node.input) > 2 and bool(node.input[2])
        if float(a.get("alpha", 1.0)) != 1.0 or (has_c and float(a.get("beta", 1.0)) != 1.0):
            return "alpha or beta not 1"
        if not w_shape or len(w_shape) != 2 or any(not d for d in w_shape):
            return "weight not a static 2-D matrix"
        if has_c:
            n = w_shape[0] if a.get("transB", 0) else w_shape[1]
            c_shape = (shapes or {}).get(node.input[2])
            if c_shape is None or any(not isinstance(d, int) for d in c_shape):
                return "bias shape unknown"
            size = int(np.prod(c_shape)) if c_shape else 1
            if size not in (1, n) or (size == n and n > 1 and c_shape[-1] != n):
                return f"bias of shape {list(c_shape)} is not one value per output column"
        return None

    @staticmethod
    def integer(node, base, w_shape, xm, xs, wm, ws, out, bias) -> list[onnx.NodeProto]:
        return [helper.make_node("IntGemm", [node.input[0], xm, xs, node.input[1], wm, ws, bias], [out],
                                 name=f"{base}/gemm", domain=DOMAIN, trans_b=int(_attrs(node).get("transB", 0)))]


RULES = {"Conv": _ConvRule, "MatMul": _MatMulRule, "Gemm": _GemmRule}   # one entry per op type the pass puts on integers
LINEAR = (_MatMulRule, _GemmRule)   # the linear layers' forms, switched with `matmul` (quantize --int-matmul)

_DW_ATTRS = ("kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw")


def _fg_conv_attrs(node) -> tuple[dict, int]:
    a = _attrs(node)
    return {k: int(a[k]) for k in _DW_ATTRS}, int(a.get("group", 1))


def _form_tile(node, consumers):
    """ConvGradW(dY, X) -> dW: one node."""
    attrs, _ = _fg_conv_attrs(node)
    return [node], node.output[0], attrs


def _form_nhwc(node, consumers):
    """ConvGradWNhwc(dY, X) -> dW (nhwc-tiles): one node; grouped ones stay float (IntConvGradW is group 1)."""
    attrs, group = _fg_conv_attrs(node)
    if group != 1:
        return "grouped"
    return [node], node.output[0], attrs


def _form_cols(node, consumers):
    """ConvGradWCols(dY, X) -> (dYt, col), FusedMatMul(dYt, col^T), Reshape -> dW (im2col-gemm)."""
    attrs, group = _fg_conv_attrs(node)
    if group != 1:
        return "grouped"
    dyt, col = node.output[0], node.output[1]
    if len(consumers[dyt]) != 1:
        return "its bias gradient reads the float form's transposed error"
    mm = consumers[dyt][0]
    if mm.op_type != "FusedMatMul" or consumers[col] != [mm] or len(consumers[mm.output[0]]) != 1:
        return "not conv-grad-w's im2col-gemm form"
    rs = consumers[mm.output[0]][0]
    if rs.op_type != "Reshape":
        return "not conv-grad-w's im2col-gemm form"
    return [node, mm, rs], rs.output[0], attrs


def _form_convgrad(node, consumers):
    """onnxruntime's ConvGrad(dY, X, W) -> ("", dW), kept by conv-grad-w."""
    a = _attrs(node)
    outs = list(node.output) + [""] * (3 - len(node.output))
    kernel, pads = list(a.get("kernel_shape", [])), list(a.get("pads", [0, 0, 0, 0]))
    strides, dil = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
    if outs[0]:
        return "ConvGrad computes dX too"
    if outs[2]:
        return "bias gradient"
    if a.get("group", 1) != 1:
        return "grouped"
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return "auto_pad"
    if len(kernel) != 2 or len(pads) != 4 or len(strides) != 2 or len(dil) != 2:
        return "not 2-D"
    attrs = dict(kh=kernel[0], kw=kernel[1], sh=strides[0], sw=strides[1], ph=pads[0], pw=pads[1], dh=dil[0], dw=dil[1])
    return [node], outs[1], {k: int(v) for k, v in attrs.items()}


# the float forms of a conv's weight gradient (passes/conv_grad_w.py), keyed by the op type of the node that reads
# dY and X: each returns (its nodes in graph order, the dW tensor, the conv attributes) or why it declines
DW_FORMS = {("ai.fracgraph", "ConvGradW"): _form_tile, ("ai.fracgraph", "ConvGradWCols"): _form_cols,
            ("ai.fracgraph", "ConvGradWNhwc"): _form_nhwc, ("com.microsoft", "ConvGrad"): _form_convgrad}


def decline_dw(attrs: dict, x_shape, k_out: int | None) -> str | None:
    """Why a conv's weight gradient keeps its float form (None: it goes on IntConvGradW)."""
    if not x_shape or len(x_shape) != 4 or any(not isinstance(d, int) or d <= 0 for d in x_shape[1:]):
        return "input shape unknown"
    if not k_out:
        return "output channels unknown"
    _, c, h, w = x_shape
    a = attrs
    ho = (h + 2 * a["ph"] - a["dh"] * (a["kh"] - 1) - 1) // a["sh"] + 1
    wo = (w + 2 * a["pw"] - a["dw"] * (a["kw"] - 1) - 1) // a["sw"] + 1
    p = ho * wo
    if p < MIN_DW_POSITIONS:
        return f"{ho}x{wo} output map (< {MIN_DW_POSITIONS} positions, not measured)"
    if p > MAX_DW_POSITIONS:
        return f"{ho}x{wo} output map: an image's integer sum could overflow int32"
    per_code = k_out * c * a["kh"] * a["kw"] * p / (c * h * w + k_out * p)
    if per_code < MIN_DW_MACS_PER_CODE:
        return (f"{per_code:.1f} multiply-adds per packed code (< {MIN_DW_MACS_PER_CODE}): packing the codes costs "
                f"more than the integer GEMM saves")
    return None


def _gemm_attrs_ok(node) -> str | None:
    """onnxruntime's MatMul_Grad weight gradient: Gemm(A_2d, dY_2d, transA=1, transB=0, alpha=1) without C."""
    a = _attrs(node)
    if a.get("transA", 0) != 1 or a.get("transB", 0) != 0 or float(a.get("alpha", 1.0)) != 1.0:
        return "not MatMul_Grad's Gemm(A^T, dY)"
    if len(node.input) > 2 and node.input[2]:
        return "Gemm with a C input"
    return None


class IntGemmPass(Pass):
    name = "int-gemm"

    def __init__(self, shapes: dict[str, list], nchwc_block: int = 1, fused: bool = True, matmul: bool = False):
        self.shapes = shapes              # tensor name -> static shape (the weights)
        self.matmul = matmul              # MatMuls (forward and weight gradient) too (build.py turns it on by default)
        self.nchwc_block = nchwc_block    # > 1: a float branch's conv goes onto NCHWc kernels like the others
        self.fused = fused
        self.convs: list[dict] = []       # what the manifest records: each GEMM's name, op type and decision
        self.weight_grads: list[dict] = []   # ... and each conv weight gradient's (name, float form, decision)

    def call(self, model):
        from .. import kernels

        graph = model.graph
        path = kernels.int_path()
        if path not in FAST_PATHS:
            return PassResult(model, False, [f"int-gemm: this CPU's integer path ({path}) is not faster than the float "
                                             f"ops; GEMMs kept"])
        self.producer = {o: n for n in graph.node for o in n.output}
        em = Emitter(graph, opset(model))
        shapes = dict(self.shapes)
        for i in graph.input:   # the trainable parameters are the training graph's inputs (a Gemm's bias)
            if i.name not in shapes and i.type.HasField("tensor_type") and i.type.tensor_type.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                if all(dims):
                    shapes[i.name] = dims
        shapes.update({t.name: list(t.dims) for t in graph.initializer})
        notes, pairs, self.convs = [], [], []
        counts = defaultdict(int)
        # each conv's weight shape by the conv's name (the BW quantizer of its output error is `<name>::bwq`)
        self.conv_weights = {n.name: shapes.get(n.input[1]) for n in graph.node if n.op_type == "Conv" and len(n.input) > 1}
        for node in list(graph.node):
            rule = RULES.get(node.op_type)
            if rule is None or node.domain not in ("", "ai.onnx") or (rule in LINEAR and not self.matmul):
                continue
            x, w = self._operand(node.input[0], "::fq_a"), self._operand(node.input[1], "::fq_w")
            if x is None or w is None:
                continue   # not an activation x quantized weight GEMM (see the module docstring): nothing to say
            reason = rule.decline(node, shapes.get(node.input[1]), shapes.get(node.output[0]), shapes)
            self.convs.append({"name": node.name, "op_type": node.op_type, "int": reason is None,
                               "reason": reason or "both operands <= 8 bits"})
            if reason is not None:
                notes.append(f"{node.name}: kept the float {node.op_type} ({reason})")
                continue
            pairs.append((node, self._rewrite(em, model, node, shapes, x, w, rule)))
            counts[node.op_type] += 1
            em.nodes = []
        replace_nodes(graph, pairs)
        if pairs:
            import_domain(model)
            what = " and ".join(f"{n} {op}" for op, n in counts.items())
            notes.insert(0, f"{what} forward on integer kernels when act and weight bits are 1..{MAX_BITS}, the float "
                            f"op otherwise")
        dw_pairs, dw_notes = self._weight_grads(model, em, shapes)
        if self.matmul:
            mm_pairs, mm_notes = self._matmul_weight_grads(model, em)
            dw_pairs, dw_notes = dw_pairs + mm_pairs, dw_notes + mm_notes
        replace_nodes(graph, dw_pairs)
        if dw_pairs:
            import_domain(model)
        return PassResult(model, bool(pairs) or bool(dw_pairs), notes + dw_notes)

    def _weight_grads(self, model, em: Emitter, shapes) -> tuple[list, list[str]]:
        """Every conv weight gradient whose dY is a BW quantizer's output and X a FW quantizer's: its float form
        (DW_FORMS) into the else branch of an If whose then branch is IntConvGradW."""
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output}
        consumers = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                consumers[i].append(n)
        outputs = {o.name for o in graph.output}
        pairs, notes, self.weight_grads = [], [], []
        for node in list(graph.node):
            form = DW_FORMS.get((node.domain, node.op_type))
            if form is None or len(node.input) < 2:
                continue
            g, x = self._operand(node.input[0], "::bwq"), self._operand(node.input[1], "::fq_a")
            if g is None or x is None or not g["prefix"].endswith("::bwq"):
                continue   # not a quantized error x quantized activation product (e.g. --first fp32's conv)
            name = node.name.split("::cgw/")[0]
            found = form(node, consumers)
            if isinstance(found, str):
                reason = found
            else:
                cone, dw, attrs = found
                w_shape = self.conv_weights.get(g["prefix"][: -len("::bwq")])
                reason = "its weight gradient is a graph output" if dw in outputs else \
                    decline_dw(attrs, shapes.get(node.input[1]), w_shape[0] if w_shape and w_shape[0] else None)
            self.weight_grads.append({"name": name, "float_form": node.op_type, "int": reason is None,
                                      "reason": reason or "activation and error both <= 8 bits"})
            if reason is not None:
                notes.append(f"{name}: weight gradient kept on {node.op_type} ({reason})")
                continue
            new = self._rewrite_dw(em, name, node, cone, dw, attrs, g, x)
            pairs += [(n, []) for n in cone[:-1]] + [(cone[-1], new)]
            em.nodes = []
        if pairs:
            n = sum(w["int"] for w in self.weight_grads)
            notes.insert(0, f"{n} conv weight gradients on IntConvGradW when act and grad bits are 1..{MAX_BITS}, "
                            f"their float form otherwise")
        return pairs, notes

    def _matmul_weight_grads(self, model, em: Emitter) -> tuple[list, list[str]]:
        """Every MatMul weight gradient onnxruntime's gradient builder wrote as Gemm(Reshape(A), Reshape(dY), transA=1)
        (or on the 2-D tensors themselves) with A a FW quantizer's output and dY a BW quantizer's, and every transB = 1
        Gemm's, written Gemm(dY, A, transA=1) (dW = dY^T A, [N, K]): the Gemm into the else branch of an If whose then
        branch is IntMatMulGradW on the same two 2-D tensors in the Gemm's order (both per tensor)."""
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output}
        outputs = {o.name for o in graph.output}
        pairs, notes, n_int = [], [], 0
        for node in list(graph.node):
            if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
                continue
            x = self._operand(self._through_reshape(node.input[0]), "::fq_a")
            g = self._operand(self._through_reshape(node.input[1]), "::bwq")
            if x is None and g is None:   # a transB = 1 Gemm's weight gradient dW = dY^T A: Gemm(dY, A, transA=1)
                g = self._operand(self._through_reshape(node.input[0]), "::bwq")
                x = self._operand(self._through_reshape(node.input[1]), "::fq_a")
                first, second = (g, x)
            else:
                first, second = (x, g)
            if x is None or g is None or not g["prefix"].endswith("::bwq"):
                continue   # not a quantized activation x quantized error product (e.g. the FP32 head's)
            name = node.name.split("_Grad/")[0]
            reason = _gemm_attrs_ok(node) or ("its weight gradient is a graph output" if node.output[0] in outputs
                                              else None)
            self.weight_grads.append({"name": name, "float_form": "Gemm", "int": reason is None,
                                      "reason": reason or "activation and error both <= 8 bits"})
            if reason is not None:
                notes.append(f"{name}: weight gradient kept on Gemm ({reason})")
                continue
            base = f"{name}::int_dw"
            cond = self._switch(em, x["bits"], g["bits"])
            ins = [node.input[0], self._scalar_reader(em, first, "min"), self._scalar_reader(em, first, "scale"),
                   node.input[1], self._scalar_reader(em, second, "min"), self._scalar_reader(em, second, "scale")]
            then_out, else_out = f"{base}/dw", f"{base}/dw_float"
            then_graph = helper.make_graph(
                [helper.make_node("IntMatMulGradW", ins, [then_out], name=f"{base}/int", domain=DOMAIN)],
                f"{base}/integer", [], [helper.make_tensor_value_info(then_out, TensorProto.FLOAT, None)])
            moved = onnx.NodeProto()
            moved.CopyFrom(node)
            moved.output[0] = else_out
            else_graph = helper.make_graph([moved], f"{base}/float", [],
                                           [helper.make_tensor_value_info(else_out, TensorProto.FLOAT, None)])
            branch = helper.make_node("If", [cond], [node.output[0]], name=f"{base}/switch", then_branch=then_graph,
                                      else_branch=else_graph)
            pairs.append((node, em.nodes + [branch]))
            em.nodes = []
            n_int += 1
        if n_int:
            notes.insert(0, f"{n_int} MatMul weight gradients on IntMatMulGradW when act and grad bits are "
                            f"1..{MAX_BITS}, their Gemm otherwise")
        return pairs, notes

    def _through_reshape(self, tensor: str) -> str:
        n = self.producer.get(tensor)
        return n.input[0] if n is not None and n.op_type == "Reshape" else tensor

    def _scalar_reader(self, em: Emitter, q: dict, key: str) -> str:
        """A quantizer's min or scale read through one outer-graph Identity per quantizer (shared by its GEMMs'
        integer forms), so every later pass sees a reader."""
        name = f"{q['prefix']}::int_{key}"
        return name if em.has(name) else em.node("Identity", [q[key]], name)

    def _rewrite_dw(self, em: Emitter, name, node, cone, dw, attrs, g, x) -> list[onnx.NodeProto]:
        base = f"{name}::int_dw"
        cond = self._switch(em, x["bits"], g["bits"])
        ins = [node.input[0]] + [em.node("Identity", [g[k]], f"{base}/g_{k}") for k in ("min", "scale")] + \
              [node.input[1]] + [em.node("Identity", [x[k]], f"{base}/x_{k}") for k in ("min", "scale")]
        then_out, else_out = f"{base}/dw", f"{base}/dw_float"
        then_graph = helper.make_graph(
            [helper.make_node("IntConvGradW", ins, [then_out], name=f"{base}/int", domain=DOMAIN, **attrs)],
            f"{base}/integer", [], [helper.make_tensor_value_info(then_out, TensorProto.FLOAT, None)])
        moved = []
        for n in cone:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            for i, o in enumerate(c.output):
                if o == dw:
                    c.output[i] = else_out
            moved.append(c)
        else_graph = helper.make_graph(moved, f"{base}/float", [],
                                       [helper.make_tensor_value_info(else_out, TensorProto.FLOAT, None)])
        branch = helper.make_node("If", [cond], [dw], name=f"{base}/switch", then_branch=then_graph,
                                  else_branch=else_graph)
        return em.nodes + [branch]

    def _operand(self, tensor: str, tag: str) -> dict | None:
        """The quantizer behind a fw-quant (or bw-quant) output: `Where(<bits>::on, <prefix>/q, x)` with q a
        FakeQuantize or SRQuantize(Noise) (fused) or the chain's `Add(<prefix>/descaled, min)`; its bits, min and
        scale tensors."""
        where = self.producer.get(tensor)
        if where is None or where.op_type != "Where" or not where.input[0].endswith("::on"):
            return None
        q = self.producer.get(where.input[1])
        if q is None or not q.name.endswith("/q") or tag not in q.name:
            return None
        if q.op_type in ("FakeQuantize", "SRQuantize", "SRQuantizeNoise"):
            mn, s = q.input[1], q.input[2]
        elif q.op_type == "Add":
            mul = self.producer.get(q.input[0])
            if mul is None or mul.op_type != "Mul":
                return None
            mn, s = q.input[1], mul.input[1]
        else:
            return None
        return {"bits": where.input[0][: -len("::on")], "min": mn, "scale": s, "prefix": q.name[: -len("/q")]}

    def _switch(self, em: Emitter, act_bits: str, w_bits: str) -> str:
        """One bool per (act bits, weight bits) pair: both in 1..MAX_BITS."""
        name = f"{act_bits}&{w_bits}::int{MAX_BITS}"
        if not em.has(name):
            conds = []
            for b in (act_bits, w_bits):
                ok = f"{b}::int_ok"
                if not em.has(ok):
                    lo = em.node("Greater", [b, em.const(0.0)], f"{b}::int_lo")
                    hi = em.node("LessOrEqual", [b, em.const(float(MAX_BITS))], f"{b}::int_hi")
                    em.node("And", [lo, hi], ok)
                conds.append(ok)
            em.node("And", conds, name)
        return name

    def _rewrite(self, em: Emitter, model, node, shapes, x, w, rule) -> list[onnx.NodeProto]:
        base = f"{node.name}::int"
        cond = self._switch(em, x["bits"], w["bits"])
        # the quantizers' tensors, read through outer-graph Identities so every later pass sees a reader
        if node.op_type in ("MatMul", "Gemm"):   # shared with the weight gradient's IntMatMulGradW (one Identity a quantizer)
            xm, xs, wm, ws = (self._scalar_reader(em, q, k) for q in (x, w) for k in ("min", "scale"))
        else:
            xm = em.node("Identity", [x["min"]], f"{base}/x_min")
            xs = em.node("Identity", [x["scale"]], f"{base}/x_scale")
            wm = em.node("Identity", [w["min"]], f"{base}/w_min")
            ws = em.node("Identity", [w["scale"]], f"{base}/w_scale")
        then_out = f"{base}/y"
        has_bias = len(node.input) > 2 and node.input[2]
        if rule is _GemmRule:   # the bias goes into IntGemm's epilogue (a Gemm without C: 0)
            then_nodes = rule.integer(node, base, shapes[node.input[1]], xm, xs, wm, ws, then_out,
                                      node.input[2] if has_bias else em.const(0.0))
            has_bias = False
        else:
            then_nodes = rule.integer(node, base, shapes[node.input[1]], xm, xs, wm, ws,
                                      f"{base}/y_nobias" if has_bias else then_out)
        if has_bias:
            b4 = em.node("Reshape", [node.input[2], em.const([1, -1, 1, 1], "int64")], f"{base}/bias")
            then_nodes.append(helper.make_node("Add", [f"{base}/y_nobias", b4], [then_out], name=f"{base}/add_bias"))
        then_graph = helper.make_graph(then_nodes, f"{base}/integer", [],
                                       [helper.make_tensor_value_info(then_out, TensorProto.FLOAT, None)])
        else_out = f"{base}/y_float"
        float_op = helper.make_node(node.op_type, list(node.input), [else_out], name=f"{base}/float", **_attrs(node))
        else_graph = helper.make_graph([float_op], f"{base}/float", [],
                                       [helper.make_tensor_value_info(else_out, TensorProto.FLOAT, None)])
        if self.nchwc_block > 1 and node.op_type == "Conv":
            else_graph = self._nchwc(model, else_graph, shapes, base)
        branch = helper.make_node("If", [cond], [node.output[0]], name=f"{base}/switch", then_branch=then_graph,
                                  else_branch=else_graph)
        return em.nodes + [branch]

    def _nchwc(self, model, graph: onnx.GraphProto, shapes, base: str) -> onnx.GraphProto:
        """The float branch's conv on NCHWc kernels, by the nchwc-conv pass run on the branch (its constants renamed
        under the conv's prefix: a subgraph may not redefine an outer name)."""
        from .nchwc_conv import NchwcConvPass

        sub = helper.make_model(graph, opset_imports=list(model.opset_import))
        res = NchwcConvPass(shapes, self.nchwc_block, fused=self.fused).call(sub)
        if not res.modified:
            return graph
        for o in res.model.opset_import:
            if not any(m.domain == o.domain for m in model.opset_import):
                model.opset_import.append(helper.make_opsetid(o.domain, o.version))
        out = res.model.graph
        renamed = {t.name: f"{base}/{t.name}" for t in out.initializer}
        for t in out.initializer:
            t.name = renamed[t.name]
        for n in out.node:
            for i, name in enumerate(n.input):
                n.input[i] = renamed.get(name, name)
        return out

    def ensures(self, model):
        assert_inputs_defined(model)
