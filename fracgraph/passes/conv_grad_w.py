"""Training-graph pass: each conv's weight gradient on the implementation that suits its shape (fracgraph/kernels).

After conv-grad-split a conv's `ConvGrad(dY, X, W)` computes dW (and dB) only. onnxruntime runs it per image:
an im2col of the image and one GEMM `dW += dY_n (Co x P) @ col_n^T (P x K)` (K = Ci/G x kh x kw, P = Ho x Wo),
one image after another. That is fast where P is large, but on the tiny maps of deep layers (P = 4 on resnet18's
2x2 layer4) each image's GEMM is a rank-P update that reads and writes all of dW (K x Co = 2.4 M floats there):
memory-bound, 32 times per step. The forms this pass chooses from (a registry keyed by form name, `FORMS`):

- `ConvGradW` (fracgraph's kernel): images as tasks, an AVX-512 register tile over 16-64 output channels; the
  fastest where that tile applies (resnet20's shapes, resnet18's layer1: 0.4-0.65x onnxruntime's ConvGrad;
  resnet20's strided ones 0.57-0.86x), except for strided convs of 3-channel inputs (the stem: 1-6x);
- `im2col-gemm`: `ConvGradWCols(dY, X) -> (dYt [G, Co/G, N*P], col [G, Kg, N*P])` (fracgraph's kernel: the whole
  batch's im2col and dY with the batch moved next to the positions), then one `FusedMatMul(dYt, col^T)` on
  onnxruntime's MLAS: one GEMM with inner dimension N*P, so dW is written once instead of once per image (and
  grouped convs are one batched GEMM); dB, where asked for, is a ReduceSum of dYt;
- `nhwc-tiles`: `ConvGradWNhwc(dY, X)` (fracgraph's kernel, kernels/conv_grad_w.c, AVX-512): X and dY copied once
  into channel-blocked layouts, then tiles of dW (a block of 16 or 32 of a group's input channels x one tap x the
  group's output channels in register blocks of 8 or 16) each reduce over all N*P positions in registers: dW
  written once, no im2col, and each tap runs over its valid output range only, so the padding's zeros are never
  multiplied (on a 2x2 map with a 3x3 kernel that is 5/9 of the im2col's multiply-adds); grouped convs are tiles
  inside one group;
- `depthwise`: `DepthwiseConvGradW(dY, X)` (fracgraph's kernel): group = Ci = Co has no GEMM to speak of (one
  output row per channel); channels as tasks, each tap a dot product over the images;
- `ConvGrad`: onnxruntime's own op, kept.

The choice is a cost model (`dw_costs`), not a timing at quantize time: the same artifacts come out on every
machine of a kind, quantize stays fast and deterministic, and the model's terms are the costs that the probes
separate (bench/kernel_probes.py --only dwshapes, on the corpus shapes): GEMM multiply-adds (the same in every
form, so they cancel), the per-image read and write of dW and per-call overhead of ConvGrad, the whole-batch col
and dYt that im2col-gemm writes and reads back, and ConvGradW's register tile (AVX-512 and 16-64 channels, else
its plain loops, which are slower than ConvGrad everywhere measured: 7-48x on the corpus' 1x1 convs and 3-7x on
resnet18's 128-512 channel layers, which the old rule gave it). im2col-gemm must win by a margin
(`MARGIN`) so that a shape near the break-even point stays on onnxruntime's op: never slower than it by more than
the model's error. ConvGradW keeps the shapes it was tuned for (tile applies, P >= 64, not 1x1 stride 1, stride 1 or >= 16
input channels).

1x1 stride-1 unpadded convs (densenet's bottlenecks and transitions, convnext's MLP, efficientnet's expansions
and projections): ConvGrad skips the im2col there and its GEMM reads X in place, and the per-image update of dW
stays in cache, so its per-image dW term is `PW_DW` instead of 2 (a full read and write). im2col-gemm (whose
ConvGradWCols then copies each plane as it is) wins only on the smallest maps: `python bench/kernel_probes.py
--only dwshapes --cpu-time --match "densenet 1x1,convnext 1x1,effnet 1x1,regnet 1x1"` measured it at 0.6-0.9x
ConvGrad's CPU time on 2x2 maps (densenet's block 4, convnext's last stage, efficientnet's head) and 1.1-1.7x on
4x4 and larger; `PW_DW` sits inside the window those ratios leave (0.12-0.2).

nhwc-tiles' term (`NT_*`, fitted on `--only dwshapes --cpu-time` over resnet18's, regnet's and densenet's shapes,
two to three runs each): the copies of X and dY, plus the multiply-adds it does (those off the padding, times the
vector lanes a group's input channels fill, times 1 + NT_SLOW: its tile is slower per multiply-add than MLAS's
packed GEMM) minus the GEMM's that the other forms' costs leave out; so the term is negative where the padding's
share is large. It must win by NT_MARGIN over both other forms, comes after the depthwise and ConvGradW rules, and
competes only where `tiles_apply` says (its measured losses: group-1 1x1 convs, group-1 strided convs of inputs
above 8x8, 3-channel stems). Measured, CPU time / ConvGrad's: regnet's grouped 3x3 convs (group width 16) 0.15-0.49,
densenet's 128 -> 32 growth convs on 4x4 and 2x2 0.17-0.27, resnet18's 3x3 convs of 128-512 channels on 8x8-2x2
maps 0.36-0.91.

Every form's values are the same sums in another order (float rounding differs), so the step is compared with
the pass on and off within float rounding, and each kernel against PyTorch's float64 weight gradient
(tests/passes/test_conv_grad_w.py). The choice per node, with its reason and the model's costs, is in the
manifest (`extra["conv_grad_w"]`) and `fracgraph inspect` lists it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..kernels import DOMAIN
from ..quantizers import Emitter
from .base import Pass, PassResult, assert_inputs_defined, opset, replace_nodes
from .fused_ops import import_domain

MARGIN = 1.5          # im2col-gemm replaces ConvGrad only where the model says it is this many times cheaper
TILE_MIN_P = 64       # ConvGradW's register tile measured down to 8x8 maps (resnet20's last stage)
# cost-model constants, in units of one float read from or written to memory (bench/kernel_probes.py --only dwshapes)
CALL = 4000.0         # one GEMM call of onnxruntime's ConvGrad (per image and group): dispatch onto the thread pool
CACHE = 0.3           # a float of an image's im2col that stays in cache (ConvGrad's per-image col)
PW_DW = 0.15          # 1x1 stride 1: ConvGrad's per-image update of dW, which stays in cache (--only dwshapes --cpu-time)
# nhwc-tiles (ConvGradWNhwc): fitted on bench/kernel_probes.py --only dwshapes --cpu-time (resnet18, regnet, densenet)
NT_COPY = 0.5         # a float of X or dY copied into the channel-blocked layouts (a streaming copy)
NT_MAC = 0.03         # one multiply-add at MLAS's GEMM rate, in the same units (the other forms' MACs cancel)
NT_SLOW = 0.4         # the kernel's extra time per multiply-add over MLAS's (its tile is 8 x 32 or 16 x 16)
NT_MARGIN = 1.25      # nhwc-tiles replaces ConvGrad / im2col-gemm only where it is modelled this many times cheaper


@dataclass(frozen=True)
class ConvShape:
    """A 2-D conv's weight-gradient problem, per image (the batch scales every form alike)."""
    ci: int
    h: int
    w: int
    co: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    ph_end: int
    pw_end: int
    dh: int
    dw: int
    group: int
    bias: bool

    @property
    def ho(self) -> int:
        return (self.h + self.ph + self.ph_end - self.dh * (self.kh - 1) - 1) // self.sh + 1

    @property
    def wo(self) -> int:
        return (self.w + self.pw + self.pw_end - self.dw * (self.kw - 1) - 1) // self.sw + 1

    @property
    def p(self) -> int:
        return self.ho * self.wo

    @property
    def kg(self) -> int:
        return self.ci // self.group * self.kh * self.kw

    @property
    def depthwise(self) -> bool:
        return self.group == self.ci == self.co

    @property
    def valid_taps(self) -> int:
        """Sum over the kernel's taps of the output positions whose input lies inside X (not in the padding)."""
        def one(size, out, stride, pad, dil, k):
            return sum(1 for t in range(k) for o in range(out) if 0 <= o * stride - pad + t * dil < size)
        return one(self.h, self.ho, self.sh, self.ph, self.dh, self.kh) * one(self.w, self.wo, self.sw, self.pw, self.dw, self.kw)

    @property
    def pointwise(self) -> bool:
        return self.kh == self.kw == 1 and self.sh == self.sw == 1 and self.ph == self.pw == self.ph_end == self.pw_end == 0


def dw_costs(s: ConvShape, avx512: bool) -> dict[str, float | None]:
    """Modelled cost per image of each form beyond the GEMM's multiply-adds (None: the form does not apply)."""
    cog = s.co // s.group
    convgrad = s.group * (CALL + (PW_DW if s.pointwise else 2) * cog * s.kg + (0 if s.pointwise else CACHE * s.kg * s.p))
    gemm = 3 * s.p * (s.group * s.kg + s.co)   # col and dYt: written, read back (and packed) by the GEMM
    tile = avx512 and s.group == 1 and s.co % 16 == 0 and s.co <= 64 and not s.bias and \
        (s.sh == s.sw == 1 or s.ci >= 16)
    cig = s.ci // s.group
    macs, valid = s.co * s.kg * s.p, s.co * cig * s.valid_taps    # per image: the GEMM's and those off the padding
    lanes = 16 * -(-cig // 16) / cig                               # vector lanes per input channel (16 per register)
    tiles = NT_COPY * (s.ci * s.h * s.w + s.co * s.p) + NT_MAC * (lanes * valid * (1 + NT_SLOW) - macs)
    return {
        "ConvGrad": convgrad,
        "im2col-gemm": gemm,
        "nhwc-tiles": tiles if avx512 and tiles_apply(s) else None,
        # the tile keeps dW^T in registers over the image: its extra cost is the image's col or padded copy
        "ConvGradW": CACHE * s.kg * s.p if tile else None,
        "depthwise": CACHE * s.kh * s.kw * s.p * s.ci if s.depthwise else None,
    }


def tiles_apply(s: ConvShape) -> bool:
    """Where nhwc-tiles competes: not depthwise (its own kernel), not a group-1 1x1 conv (1.05-2.4x ConvGrad on 4x4
    and larger maps, level with im2col-gemm on 2x2, 1.5x on a 1x1 map), and not a group-1 strided conv of an input
    above 8x8 (resnet18's 64 -> 128 3x3/2 on 16x16: 0.82-1.69x ConvGrad over three runs; the strided tap's reads
    skip positions of a slice larger than L1), nor where a group's input channels fill fewer than 4 of a vector's 16
    lanes (3-channel stems: 4.6-7.9x ConvGrad on resnet18's 7x7/2)."""
    if s.depthwise or (s.group == 1 and s.kh == s.kw == 1) or s.ci // s.group < 4:
        return False
    return s.group > 1 or (s.sh == s.sw == 1) or s.h * s.w <= 64


def choose(s: ConvShape, avx512: bool) -> tuple[str, str]:
    """(form, reason) for one conv's weight gradient."""
    c = dw_costs(s, avx512)
    if s.depthwise and s.kh * s.kw <= 256:   # the kernel's tap limit
        return "depthwise", "depthwise: one output row per channel, no GEMM"
    if c["ConvGradW"] is not None and s.p >= TILE_MIN_P and not s.pointwise:
        return "ConvGradW", f"AVX-512 tile over {s.co} output channels on {s.ho}x{s.wo} maps"
    if c["nhwc-tiles"] is not None and c["nhwc-tiles"] * NT_MARGIN < min(c["ConvGrad"], c["im2col-gemm"]):
        return "nhwc-tiles", (f"modelled {c['nhwc-tiles']:,.0f} vs ConvGrad's {c['ConvGrad']:,.0f} and im2col-gemm's "
                              f"{c['im2col-gemm']:,.0f} per image (below 1/{NT_MARGIN:g})")
    if c["im2col-gemm"] * MARGIN < c["ConvGrad"]:
        return "im2col-gemm", (f"modelled {c['im2col-gemm']:,.0f} vs ConvGrad's {c['ConvGrad']:,.0f} per image "
                               f"(below 1/{MARGIN:g})")
    pw = "1x1 stride 1, X read in place: " if s.pointwise else ""
    return "ConvGrad", (f"{pw}modelled {c['ConvGrad']:,.0f} vs im2col-gemm's {c['im2col-gemm']:,.0f} per image "
                        f"(im2col-gemm needs below 1/{MARGIN:g})")


class ConvGradWPass(Pass):
    name = "conv-grad-w"
    fused = 0   # nodes moved onto fracgraph kernels by the last call

    def __init__(self, shapes: dict[str, list] | None = None, avx512: bool | None = None):
        self.shapes = shapes or {}   # tensor name -> static shape (forward shape inference)
        self.avx512 = _has_avx512() if avx512 is None else avx512
        self.choices: list[dict] = []   # per ConvGrad node: form, reason, shape, modelled costs

    def call(self, model):
        graph = model.graph
        em = Emitter(graph, opset(model))
        shapes = dict(self.shapes)
        for vi in list(graph.value_info) + list(graph.input):
            shapes.setdefault(vi.name, [d.dim_value if d.HasField("dim_value") else None
                                        for d in vi.type.tensor_type.shape.dim])
        shapes.update({t.name: list(t.dims) for t in graph.initializer})
        pairs, notes, self.choices, fused = [], [], [], 0
        for n in graph.node:
            if n.op_type != "ConvGrad" or n.domain != "com.microsoft":
                continue
            s, why = _shape(n, shapes)
            if s is None:
                notes.append(f"{n.name}: kept ConvGrad ({why})")
                self.choices.append({"node": n.name, "form": "ConvGrad", "reason": why})
                continue
            form, reason = choose(s, self.avx512)
            costs = {k: v for k, v in dw_costs(s, self.avx512).items() if v is not None}
            self.choices.append({"node": n.name, "form": form, "reason": reason, "shape": _describe(s),
                                 "costs": {k: round(v) for k, v in costs.items()}})
            notes.append(f"{n.name}: dW on {form} ({reason})")
            if form == "ConvGrad":
                continue
            FORMS[form](em, n, s)
            pairs.append((n, em.nodes))
            em.nodes = []
            fused += 1
        replace_nodes(graph, pairs)
        self.fused = fused
        if pairs:
            import_domain(model)
            if not any(o.domain == "com.microsoft" for o in model.opset_import):
                model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        counts = {f: sum(c["form"] == f for c in self.choices)
                  for f in ("ConvGradW", "im2col-gemm", "nhwc-tiles", "depthwise", "ConvGrad")}
        notes.insert(0, "conv weight gradients: " + ", ".join(f"{v} on {k}" for k, v in counts.items()))
        return PassResult(model, bool(pairs), notes)

    def ensures(self, model):
        assert_inputs_defined(model)


def _conv_attrs(s: ConvShape) -> dict:
    return dict(kh=s.kh, kw=s.kw, sh=s.sh, sw=s.sw, ph=s.ph, pw=s.pw, dh=s.dh, dw=s.dw)


def _emit_tile(em: Emitter, n, s: ConvShape) -> None:
    em.nodes.append(helper.make_node("ConvGradW", [n.input[0], n.input[1]], [n.output[1]], name=n.name,
                                     domain=DOMAIN, **_conv_attrs(s)))


def _emit_gemm(em: Emitter, n, s: ConvShape) -> None:
    base = f"{n.name}::cgw"
    dyt, col = f"{base}/dyt", f"{base}/col"
    em.node("ConvGradWCols", [n.input[0], n.input[1]], dyt, domain=DOMAIN, outputs=[dyt, col], group=s.group,
            **_conv_attrs(s))
    g = em.node("FusedMatMul", [dyt, col], f"{base}/dw_g", domain="com.microsoft", transB=1)
    em.nodes.append(helper.make_node("Reshape", [g, em.const([s.co, s.ci // s.group, s.kh, s.kw], np.int64)],
                                     [n.output[1]], name=f"{base}/dw"))
    if len(n.output) > 2 and n.output[2]:
        db = _reduce_sum(em, dyt, [2], f"{base}/db_g")
        em.nodes.append(helper.make_node("Reshape", [db, em.const([s.co], np.int64)], [n.output[2]], name=f"{base}/db"))


def _emit_tiles(em: Emitter, n, s: ConvShape) -> None:
    base = f"{n.name}::cgw"
    em.nodes.append(helper.make_node("ConvGradWNhwc", [n.input[0], n.input[1]], [n.output[1]], name=f"{base}/dw",
                                     domain=DOMAIN, group=s.group, **_conv_attrs(s)))
    if len(n.output) > 2 and n.output[2]:
        db = _reduce_sum(em, n.input[0], [0, 2, 3], f"{base}/db_c")
        em.nodes.append(helper.make_node("Identity", [db], [n.output[2]], name=f"{base}/db"))


def _emit_depthwise(em: Emitter, n, s: ConvShape) -> None:
    base = f"{n.name}::cgw"
    em.nodes.append(helper.make_node("DepthwiseConvGradW", [n.input[0], n.input[1]], [n.output[1]], name=f"{base}/dw",
                                     domain=DOMAIN, **_conv_attrs(s)))
    if len(n.output) > 2 and n.output[2]:
        db = _reduce_sum(em, n.input[0], [0, 2, 3], f"{base}/db_c")
        em.nodes.append(helper.make_node("Identity", [db], [n.output[2]], name=f"{base}/db"))


def _reduce_sum(em: Emitter, x: str, axes: list[int], out: str) -> str:
    if em.opset >= 13:
        return em.node("ReduceSum", [x, em.const(axes, np.int64)], out, keepdims=0)
    return em.node("ReduceSum", [x], out, axes=axes, keepdims=0)


FORMS = {"ConvGradW": _emit_tile, "im2col-gemm": _emit_gemm, "nhwc-tiles": _emit_tiles, "depthwise": _emit_depthwise}


def _shape(n, shapes) -> tuple[ConvShape | None, str]:
    at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    kernel = list(at.get("kernel_shape", []))
    strides, pads = list(at.get("strides", [1, 1])), list(at.get("pads", [0, 0, 0, 0]))
    dil, group = list(at.get("dilations", [1, 1])), int(at.get("group", 1))
    outs = list(n.output) + [""] * (3 - len(n.output))
    why = ("not 2-D" if len(kernel) != 2 or len(pads) != 4 or len(dil) != 2 or len(strides) != 2 else
           "it computes dX" if outs[0] else
           "no weight gradient" if not outs[1] else
           "strides or dilations below 1" if min(strides + dil) < 1 else
           "auto_pad" if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", 0, b"", "") else None)
    if why:
        return None, why
    x, w = shapes.get(n.input[1]), shapes.get(n.input[2])
    if not x or len(x) != 4 or any(d is None for d in x[1:]):
        return None, "input shape unknown"
    if not w or len(w) != 4 or any(d is None for d in w):
        return None, "weight shape unknown"
    s = ConvShape(ci=x[1], h=x[2], w=x[3], co=w[0], kh=kernel[0], kw=kernel[1], sh=strides[0], sw=strides[1],
                  ph=pads[0], pw=pads[1], ph_end=pads[2], pw_end=pads[3], dh=dil[0], dw=dil[1], group=group, bias=bool(outs[2]))
    if s.ho < 1 or s.wo < 1 or w[1] * group != s.ci or s.co % group:
        return None, "shapes inconsistent"
    return s, ""


def _describe(s: ConvShape) -> str:
    g = f" group {s.group}" if s.group > 1 else ""
    return f"Ci{s.ci} {s.h}x{s.w} -> Co{s.co} {s.kh}x{s.kw}/{s.sh}{g}, {s.ho}x{s.wo} out"


def _has_avx512() -> bool:
    from ..kernels import _cpu_flags

    return " avx512f" in _cpu_flags()
