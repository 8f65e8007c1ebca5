"""fracgraph's DepthwiseConv kernel (fracgraph/kernels/fused_ops.c) against PyTorch's float64 depthwise conv and,
with `flip`, against PyTorch's input gradient of the forward conv (what conv-grad-split's stride-1 dX conv with
the flipped weight computes): the shapes of convnext (7x7 on 16x16 down to 2x2 maps), efficientnet and
mobilenet (3x3, 5x5, strided), rows wider than one vector with a masked tail, dilated, asymmetric pads and
kernels, one image.

Each output is a float32 sum of at most kh*kw products in tap order, so it is bounded by float32 rounding of that
sum: 2 * taps * eps * sum |w x| (the float64 conv of |x| with |w|).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
F = torch.nn.functional

from conftest import custom_op_session  # noqa: E402

EPS = float(np.finfo(np.float32).eps)

# (N, C, H, W, kernel, stride, leading pads, trailing pads, dilation)
CASES = [
    (2, 5, 16, 16, (7, 7), (1, 1), (3, 3), (3, 3), (1, 1)),     # convnext 16x16
    (3, 4, 2, 2, (7, 7), (1, 1), (3, 3), (3, 3), (1, 1)),       # convnext 2x2: most taps in the padding
    (2, 3, 9, 37, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),      # rows of 37: two vectors and a tail
    (2, 6, 11, 11, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),     # efficientnet's stride 2
    (2, 4, 16, 40, (5, 5), (2, 2), (2, 2), (2, 2), (1, 1)),     # 5x5 stride 2 on wide rows
    (1, 3, 12, 10, (3, 3), (1, 1), (2, 2), (2, 2), (2, 2)),     # dilated
    (2, 2, 7, 9, (3, 5), (1, 3), (1, 0), (0, 2), (1, 1)),       # asymmetric kernel, strides and pads
    (2, 3, 7, 7, (3, 3), (2, 2), (1, 1), (0, 0), (1, 1)),       # trailing pad below the leading one
    (1, 1, 5, 6, (1, 1), (1, 1), (0, 0), (0, 0), (1, 1)),       # 1x1, one plane
]


def _attrs(case, flip=0, pads=None):
    n, c, h, w, k, s, p, pe, d = case
    p, pe = pads or (p, pe)
    return dict(kh=k[0], kw=k[1], sh=s[0], sw=s[1], ph=p[0], pw=p[1], ph_end=pe[0], pw_end=pe[1], dh=d[0],
                dw=d[1], flip=flip)


def _conv64(x, w, case):
    n, c, h, wd, k, s, p, pe, d = case
    xp = F.pad(torch.from_numpy(x).double(), (p[1], pe[1], p[0], pe[0]))
    return F.conv2d(xp, torch.from_numpy(w).double(), stride=s, dilation=d, groups=c)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_matches_pytorch(case, threads):
    n, c, h, w, k = case[:5]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 1, *k)).astype(np.float32)
    ref = _conv64(x, wt, case).numpy()
    got = custom_op_session("DepthwiseConv", ["x", "w"], ["y"], threads, **_attrs(case)).run(None, dict(x=x, w=wt))[0]
    assert got.shape == ref.shape and got.dtype == np.float32
    bound = 2 * k[0] * k[1] * EPS * _conv64(np.abs(x), np.abs(wt), case).numpy()
    assert np.all(np.abs(got - ref) <= bound + 1e-30)


@pytest.mark.parametrize("case", [c for c in CASES if c[5] == (1, 1)], ids=str)
def test_flip_is_the_stride1_input_gradient(case):
    """DepthwiseConv(dY, W, flip=1) with pads d (k - 1) - p is dX of the forward conv (PyTorch's autograd)."""
    n, c, h, w, k, s, p, pe, d = case
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((n, c, h, w))).double().requires_grad_()
    wt = rng.standard_normal((c, 1, *k)).astype(np.float32)
    y = F.conv2d(F.pad(x, (p[1], pe[1], p[0], pe[0])), torch.from_numpy(wt).double(), dilation=d, groups=c)
    dy = rng.standard_normal(tuple(y.shape)).astype(np.float32)
    y.backward(torch.from_numpy(dy).double())
    ref = x.grad.numpy()
    reach = (d[0] * (k[0] - 1), d[1] * (k[1] - 1))
    pads = ((reach[0] - p[0], reach[1] - p[1]), (reach[0] - pe[0], reach[1] - pe[1]))
    got = custom_op_session("DepthwiseConv", ["dy", "w"], ["dx"], 2, **_attrs(case, flip=1, pads=pads)).run(
        None, dict(dy=dy, w=wt))[0]
    assert got.shape == ref.shape
    flipped = np.abs(wt[:, :, ::-1, ::-1]).copy()
    bound = 2 * k[0] * k[1] * EPS * _conv64(np.abs(dy), flipped, (n, c, 0, 0, k, s, *pads, d)).numpy()
    assert np.all(np.abs(got - ref) <= bound + 1e-30)


# strided dX (DepthwiseConvT, fracgraph/kernels/dw_convt.c): the strided CASES and wider, odd and tiny shapes
T_CASES = [c for c in CASES if c[5] != (1, 1)] + [
    (2, 6, 32, 32, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),     # mobilenet_v2's first strided depthwise
    (2, 5, 70, 67, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),     # rows of 67: three column chunks, odd width
    (2, 4, 4, 4, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),       # 4x4 -> 2x2
    (1, 3, 13, 13, (3, 3), (2, 2), (2, 2), (2, 2), (2, 2)),     # dilated and strided
    (2, 3, 10, 10, (3, 3), (3, 3), (1, 1), (1, 1), (1, 1)),     # stride 3: the plain path only
    (1, 2, 8, 8, (1, 1), (2, 2), (0, 0), (0, 0), (1, 1)),       # 1x1 stride 2: every other column is 0
]


def _convt_inputs(case, seed=5):
    n, c, h, w, k, s, p, pe, d = case
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, c, h, w))).double().requires_grad_()
    wt = rng.standard_normal((c, 1, *k)).astype(np.float32)
    y = F.conv2d(F.pad(x, (p[1], pe[1], p[0], pe[0])), torch.from_numpy(wt).double(), stride=s, dilation=d, groups=c)
    dy = rng.standard_normal(tuple(y.shape)).astype(np.float32)
    y.backward(torch.from_numpy(dy).double())
    attrs = dict(kh=k[0], kw=k[1], sh=s[0], sw=s[1], ph=p[0], pw=p[1], dh=d[0], dw=d[1], oh=h, ow=w)
    return dy, wt, x.grad.numpy(), attrs


def _convt_bound(dy, wt, case, attrs):
    """Each dX element is a float32 sum of at most kh*kw products: 2 taps eps sum |w dy| (float64, autograd of |.|)."""
    n, c, h, w, k, s, p, pe, d = case
    x = torch.zeros((n, c, h, w), dtype=torch.float64, requires_grad=True)
    y = F.conv2d(F.pad(x, (p[1], pe[1], p[0], pe[0])), torch.from_numpy(np.abs(wt)).double(), stride=s, dilation=d,
                 groups=c)
    y.backward(torch.from_numpy(np.abs(dy)).double())
    return 2 * k[0] * k[1] * EPS * x.grad.numpy()


@pytest.mark.parametrize("case", T_CASES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_convt_is_the_strided_input_gradient(case, threads):
    """DepthwiseConvT(dY, W) is dX of the strided forward conv (PyTorch's float64 autograd)."""
    dy, wt, ref, attrs = _convt_inputs(case)
    got = custom_op_session("DepthwiseConvT", ["dy", "w"], ["dx"], threads, **attrs).run(None, dict(dy=dy, w=wt))[0]
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.all(np.abs(got - ref) <= _convt_bound(dy, wt, case, attrs) + 1e-30)


@pytest.mark.parametrize("case", T_CASES, ids=str)
def test_convt_paths_are_bitwise_alike(case):
    """The AVX-512 stride-2 path and the plain path sum each element's taps in the same order."""
    import ctypes

    from fracgraph import kernels

    dy, wt, _, attrs = _convt_inputs(case)
    a = np.array([attrs[k] for k in ("kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "oh", "ow")], np.int64)
    f32 = ctypes.POINTER(ctypes.c_float)
    outs = []
    for path in (1, 0):
        out = np.full(dy.shape[:2] + (attrs["oh"], attrs["ow"]), np.nan, np.float32)
        r = kernels._library().fg_dw_convt(dy.ctypes.data_as(f32), wt.ctypes.data_as(f32), out.ctypes.data_as(f32),
                                           *(ctypes.c_int64(v) for v in dy.shape),
                                           a.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), ctypes.c_int(path))
        outs.append(out if r == 0 else None)
    if outs[0] is None:
        assert attrs["sw"] != 2 or not kernels._library().fg_gelu_avx512()
        pytest.skip("no AVX-512 stride-2 path for this shape or build")
    assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))


def test_convt_refuses_bad_inputs():
    attrs = dict(kh=3, kw=3, sh=2, sw=2, ph=1, pw=1, dh=1, dw=1, oh=8, ow=8)
    with pytest.raises(Exception, match="W must be \\[C, 1, kh, kw\\]"):
        custom_op_session("DepthwiseConvT", ["dy", "w"], ["dx"], 1, **attrs).run(
            None, dict(dy=np.zeros((2, 5, 4, 4), np.float32), w=np.zeros((4, 1, 3, 3), np.float32)))
    with pytest.raises(Exception, match="strides and dilations"):
        custom_op_session("DepthwiseConvT", ["dy", "w"], ["dx"], 1, **{**attrs, "sh": 0}).run(
            None, dict(dy=np.zeros((2, 5, 4, 4), np.float32), w=np.zeros((5, 1, 3, 3), np.float32)))


def test_refuses_bad_inputs():
    case = CASES[0]
    with pytest.raises(Exception, match="W \\[C, 1, kh, kw\\]"):
        custom_op_session("DepthwiseConv", ["x", "w"], ["y"], 1, **_attrs(case)).run(
            None, dict(x=np.zeros((2, 5, 16, 16), np.float32), w=np.zeros((4, 1, 7, 7), np.float32)))
    with pytest.raises(Exception, match="larger than the padded input"):
        custom_op_session("DepthwiseConv", ["x", "w"], ["y"], 1, **_attrs(case, pads=((0, 0), (0, 0)))).run(
            None, dict(x=np.zeros((2, 5, 3, 3), np.float32), w=np.zeros((5, 1, 7, 7), np.float32)))


# nchwc-conv's choice (bench/kernel_probes.py --only dwconv --cpu-time, ratios to onnxruntime's Conv)
def _shape(c, hw, k, s):
    from fracgraph.passes.conv_grad_w import ConvShape

    p = k // 2
    return ConvShape(ci=c, h=hw, w=hw, co=c, kh=k, kw=k, sh=s, sw=s, ph=p, pw=p, ph_end=p, pw_end=p, dh=1, dw=1,
                     group=c, bias=False)


DW_CHOICES = [   # shape, role, with NCHWc, without NCHWc
    (_shape(40, 16, 7, 1), "forward", "depthwise", "depthwise"),   # convnext stage 1: 0.14x (no NCHWc at 40 channels)
    (_shape(40, 16, 7, 1), "dX", "depthwise", "depthwise"),        # 0.20x
    (_shape(32, 32, 3, 1), "forward", "depthwise", "depthwise"),   # efficientnet: 0.41x, NCHWc 0.90x
    (_shape(144, 16, 3, 1), "dX", "depthwise", "depthwise"),       # 0.41x, NCHWc 0.59x
    (_shape(240, 8, 5, 1), "forward", "NCHWc", "depthwise"),       # NCHWc 0.16x, the kernel 0.39x
    (_shape(160, 4, 7, 1), "dX", "NCHWc", "depthwise"),            # NCHWc 0.04x, the kernel 0.28x
    (_shape(960, 2, 3, 1), "dX", "NCHWc", "Conv"),                 # the kernel 0.73-1.12x
    (_shape(96, 32, 3, 2), "forward", "NCHWc", "Conv"),            # strided: the kernel 1.9x
    (_shape(96, 32, 3, 2), "dX-strided", "depthwise-t", "depthwise-t"),   # ConvTranspose: 3.7-5.8x the kernel's time
]


@pytest.mark.parametrize("shape,role,form,without_nchwc", DW_CHOICES, ids=str)
def test_form_choices(shape, role, form, without_nchwc):
    from fracgraph.passes.nchwc_conv import choose_form

    nchwc = role != "dX-strided"
    assert choose_form(shape, role, nchwc, gemm=True, avx512=True)[0] == form
    assert choose_form(shape, role, False, gemm=True, avx512=True)[0] == without_nchwc
    assert choose_form(shape, role, nchwc, gemm=True, avx512=False)[0] not in ("depthwise",)   # AVX-512 only
    assert choose_form(shape, role, nchwc, gemm=False, avx512=True)[0] not in ("depthwise", "depthwise-t")
    if role == "dX-strided":   # the strided kernel has a plain path too
        assert choose_form(shape, role, nchwc, gemm=True, avx512=False)[0] == "depthwise-t"


class DwNet(torch.nn.Module):
    """convnext's 7x7 depthwise (biased) on 16 columns, a 3x3 one with dilation 2, and a strided one (its forward
    kept, its dX on DepthwiseConvT)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 40, 3, padding=1, bias=False)
        self.dw7 = nn.Conv2d(40, 40, 7, padding=3, groups=40, bias=True)
        self.dil = nn.Conv2d(40, 40, 3, padding=2, dilation=2, groups=40, bias=False)
        self.s2 = nn.Conv2d(40, 40, 3, stride=2, padding=1, groups=40, bias=False)
        self.fc = nn.Linear(40, 4)

    def forward(self, x):
        r = torch.relu
        x = r(self.stem(x))
        x = r(self.dw7(x) + x)
        x = r(self.s2(r(self.dil(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_pass_takes_the_kernel_and_keeps_the_step(tmp_path):
    import onnx

    from fracgraph.passes.conv_grad_w import _has_avx512
    from test_speed_passes import _step, build_pair

    if not _has_avx512():
        pytest.skip("the depthwise form is taken with AVX-512 only")
    pair = build_pair(DwNet(), tmp_path, (2, 3, 16, 16), off={"skip_passes": ("nchwc-conv",)}, on={})
    art, manifest = pair[True]
    got = {(c["node"].split("/")[1], c["role"]): c["form"] for c in manifest.extra["conv_forms"]}
    assert got[("dw7", "forward")] == got[("dw7", "dX")] == "depthwise"
    assert got[("dil", "forward")] == got[("dil", "dX")] == "depthwise"
    assert got[("s2", "forward")] != "depthwise" and got[("s2", "dX-strided")] == "depthwise-t"
    graph = onnx.load(str(art / "training_model.onnx")).graph
    dwc = [n for n in graph.node if n.op_type == "DepthwiseConv"]
    flips = {n.name.split("/")[1]: onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "flip"))
             for n in dwc if "split" in n.name}
    assert len(dwc) == 4 and flips and all(flips.values())   # the dX convs read the forward weight, flipped
    # the forward conv's (quantized) weight itself, no transpose or flip of it
    assert [n.input[1] for n in graph.node if n.op_type == "DepthwiseConvT"] == ["/s2/Conv::fq_w1/out"]
    assert not any(n.output[0].endswith("::split/w_flip") and ("dw7" in n.output[0] or "dil" in n.output[0])
                   for n in graph.node)
    # 0 bits: the kernel differs from onnxruntime's conv only in float summation order
    loss0, grads0, _ = _step(pair[False][0], (0, 0, 0), shape=(4, 3, 16, 16))
    loss1, grads1, _ = _step(art, (0, 0, 0), shape=(4, 3, 16, 16))
    assert abs(loss0 - loss1) <= 1e-6 * abs(loss0)
    assert grads0.keys() == grads1.keys()
    for name, g in grads0.items():
        err = np.linalg.norm(grads1[name] - g) / max(np.linalg.norm(g), 1e-30)
        assert err <= 1e-5, f"{name}: relative gradient error {err:.2e}"
