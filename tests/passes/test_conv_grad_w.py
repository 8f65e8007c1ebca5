"""ConvGradW (fracgraph/kernels/fused_ops.c) against PyTorch's float64 conv weight gradient, and the conv-grad-w
pass against onnxruntime's ConvGrad: loss and every gradient with the pass on and off.

The kernel sums in another order than ConvGrad, so the step comparison has the tolerances of the other
non-bitwise speed passes (tests/passes/test_speed_passes.py says why 1e-4 with quantized errors).
"""

from __future__ import annotations

import ctypes

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from fracgraph import kernels  # noqa: E402
from fracgraph.passes.base import all_nodes  # noqa: E402
from fracgraph.passes.conv_grad_w import ConvGradWPass, ConvShape, choose  # noqa: E402

from conftest import custom_op_session  # noqa: E402
from test_speed_passes import ConvZoo, assert_same_step, build_pair  # noqa: E402


def conv_grad_w(dy, x, kernel, stride, pad, dilation, threads=2):
    sess = custom_op_session("ConvGradW", ["dy", "x"], ["dw"], threads, kh=kernel[0], kw=kernel[1], sh=stride[0],
                             sw=stride[1], ph=pad[0], pw=pad[1], dh=dilation[0], dw=dilation[1])
    return sess.run(None, dict(dy=dy, x=x))[0]


# (N, Ci, H, W, Co, kernel, stride, pad, dilation): the AVX-512 tiles (Co 16/32/48/64), the plain loops (Co 12, 80),
# fewer images than tasks, odd sizes, 1x1, 5x5, dilation, asymmetric kernels, and the im2col path (strided)
CASES = [
    (9, 16, 12, 12, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
    (3, 32, 8, 10, 32, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 5, 7, 9, 48, (3, 3), (1, 1), (1, 1), (1, 1)),
    (11, 64, 4, 4, 64, (3, 3), (1, 1), (1, 1), (1, 1)),
    (4, 7, 9, 11, 12, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 3, 6, 6, 80, (1, 1), (1, 1), (0, 0), (1, 1)),
    (5, 6, 11, 10, 16, (5, 5), (1, 1), (2, 2), (1, 1)),
    (3, 4, 12, 12, 16, (3, 3), (1, 1), (2, 2), (2, 2)),
    (3, 4, 9, 12, 32, (1, 3), (1, 1), (0, 1), (1, 1)),
    (3, 4, 9, 9, 16, (3, 3), (1, 1), (0, 0), (1, 1)),
    (6, 8, 9, 9, 16, (3, 3), (2, 2), (1, 1), (1, 1)),
    (6, 8, 10, 10, 32, (1, 1), (2, 2), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-Ci{}-{}x{}-Co{}-k{}-s{}-p{}-d{}".format(*c[:4], c[4], *c[5:]))
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_pytorch(case, threads):
    n, ci, h, w, co, kernel, stride, pad, dilation = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, ci, h, w)).astype(np.float32)
    ho = (h + 2 * pad[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * pad[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    dy = rng.standard_normal((n, co, ho, wo)).astype(np.float32)
    ref = torch.nn.grad.conv2d_weight(torch.from_numpy(x).double(), (co, ci, *kernel), torch.from_numpy(dy).double(),
                                      stride=stride, padding=pad, dilation=dilation).numpy()
    got = conv_grad_w(dy, x, kernel, stride, pad, dilation, threads)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)


def test_kernel_refuses_mismatched_batches():
    with pytest.raises(Exception, match="one batch"):
        conv_grad_w(np.zeros((2, 4, 3, 3), np.float32), np.zeros((3, 4, 3, 3), np.float32), (3, 3), (1, 1), (1, 1), (1, 1))


def conv_shape_case(case, groups=1, seed=0):
    """x, dy and PyTorch's float64 dW (and dB) for (N, Ci, H, W, Co, kernel, stride, pad, dilation)."""
    n, ci, h, w, co, kernel, stride, pad, dilation = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, ci, h, w)).astype(np.float32)
    ho = (h + 2 * pad[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * pad[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    dy = rng.standard_normal((n, co, ho, wo)).astype(np.float32)
    ref = torch.nn.grad.conv2d_weight(torch.from_numpy(x).double(), (co, ci // groups, *kernel),
                                      torch.from_numpy(dy).double(), stride=stride, padding=pad, dilation=dilation,
                                      groups=groups).numpy()
    return x, dy, ref


def conv_attrs(kernel, stride, pad, dilation):
    return dict(kh=kernel[0], kw=kernel[1], sh=stride[0], sw=stride[1], ph=pad[0], pw=pad[1], dh=dilation[0],
                dw=dilation[1])


# (case, groups): the shape classes that select im2col-gemm: large channel counts on tiny maps (stride 1 and 2),
# grouped (regnet's group width 16, strided), 1x1 strided, 7x7 stride 2, dilated, asymmetric kernels, one image
GEMM_CASES = [
    ((3, 128, 2, 2, 96, (3, 3), (1, 1), (1, 1), (1, 1)), 1),
    ((2, 64, 4, 4, 128, (3, 3), (2, 2), (1, 1), (1, 1)), 1),
    ((3, 64, 8, 8, 64, (3, 3), (1, 1), (1, 1), (1, 1)), 4),
    ((2, 48, 7, 7, 48, (3, 3), (2, 2), (1, 1), (1, 1)), 3),
    ((2, 24, 9, 9, 40, (1, 1), (2, 2), (0, 0), (1, 1)), 1),
    ((2, 3, 19, 21, 16, (7, 7), (2, 2), (3, 3), (1, 1)), 1),
    ((2, 8, 9, 9, 16, (3, 3), (1, 1), (2, 2), (2, 2)), 2),
    ((1, 5, 6, 9, 7, (1, 3), (1, 2), (0, 1), (1, 1)), 1),
    # 1x1 stride 1 unpadded (each plane copied as it is): densenet's and convnext's 2x2 maps, grouped, not square
    ((3, 48, 2, 2, 24, (1, 1), (1, 1), (0, 0), (1, 1)), 1),
    ((2, 12, 5, 3, 8, (1, 1), (1, 1), (0, 0), (1, 1)), 4),
]


@pytest.mark.parametrize("case,groups", GEMM_CASES, ids=lambda c: str(c))
def test_gemm_operands_match_pytorch(case, groups):
    """ConvGradWCols + onnxruntime's FusedMatMul (what the pass emits) against PyTorch's float64 dW and dB."""
    x, dy, ref = conv_shape_case(case, groups)
    attrs = conv_attrs(*case[5:])
    sess = custom_op_session("ConvGradWCols", ["dy", "x"], ["dyt", "col"], 2, group=groups, **attrs)
    dyt, col = sess.run(None, dict(dy=dy, x=x))
    n, ci, co = case[0], case[1], case[4]
    p = dy.shape[2] * dy.shape[3]
    assert dyt.shape == (groups, co // groups, n * p) and col.shape == (groups, ref[0].size, n * p)
    # the operands are copies (no arithmetic): exact against numpy's im2col of the same tensors
    np.testing.assert_array_equal(dyt.reshape(co, n, p), dy.reshape(n, co, p).transpose(1, 0, 2))
    got = np.matmul(dyt.astype(np.float64), col.astype(np.float64).transpose(0, 2, 1)).reshape(ref.shape)
    assert np.abs(got - ref).max() <= 1e-9 * max(np.abs(ref).max(), 1.0)
    # and the float32 GEMM as onnxruntime runs it: a sum of n*p products, bounded by float32 rounding of it
    f32 = np.matmul(dyt, col.transpose(0, 2, 1)).reshape(ref.shape)
    bound = 4 * n * p * np.finfo(np.float32).eps * np.matmul(np.abs(dyt).astype(np.float64),
                                                                np.abs(col).astype(np.float64).transpose(0, 2, 1)).reshape(ref.shape)
    assert np.all(np.abs(f32 - ref) <= bound + 1e-30)


# depthwise: 3x3 and 5x5, strided (efficientnet's), dilated, asymmetric pads and kernels, tiny maps, one image
DW_CASES = [
    (3, 16, 8, 8, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 24, 11, 11, 24, (3, 3), (2, 2), (1, 1), (1, 1)),
    (2, 40, 9, 9, 40, (5, 5), (2, 2), (2, 2), (1, 1)),
    (3, 32, 2, 2, 32, (5, 5), (1, 1), (2, 2), (1, 1)),
    (2, 8, 12, 10, 8, (3, 3), (1, 1), (2, 2), (2, 2)),
    (1, 5, 7, 13, 5, (3, 5), (1, 3), (1, 0), (1, 1)),
    # the AVX-512 form's vectors along the output row: rows of 19 and 40 columns (a full vector and a masked tail),
    # convnext's 7x7 on 16x16 and 2x2 maps, more than 8 taps in a kernel row (two tap groups), dilated and strided
    (2, 6, 20, 37, 6, (3, 3), (2, 2), (1, 1), (1, 1)),
    (2, 3, 18, 40, 3, (7, 7), (1, 1), (3, 3), (1, 1)),
    (2, 4, 16, 16, 4, (7, 7), (1, 1), (3, 3), (1, 1)),
    (3, 4, 2, 2, 4, (7, 7), (1, 1), (3, 3), (1, 1)),
    (1, 2, 9, 30, 2, (2, 11), (1, 1), (0, 5), (1, 2)),
    (2, 3, 13, 29, 3, (5, 9), (2, 3), (2, 4), (2, 1)),
]


@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("threads", [1, 2])
def test_depthwise_kernel_matches_pytorch(case, threads):
    x, dy, ref = conv_shape_case(case, groups=case[1])
    sess = custom_op_session("DepthwiseConvGradW", ["dy", "x"], ["dw"], threads, **conv_attrs(*case[5:]))
    got = sess.run(None, dict(dy=dy, x=x))[0]
    assert got.shape == ref.shape and got.dtype == np.float32
    # float lanes per image added in double: within float32 rounding of each image's dot product
    p = dy.shape[2] * dy.shape[3]
    scale = np.einsum("nchw->c", np.abs(dy).astype(np.float64)) * np.abs(x).max()   # >= sum |dY X| of a tap
    assert np.all(np.abs(got - ref) <= 2 * p * np.finfo(np.float32).eps * scale[:, None, None, None])


# nhwc-tiles (ConvGradWNhwc, kernels/conv_grad_w.c): the shape classes that select it (large channel counts on
# 2x2-8x8 maps, grouped with 16 channels per group) and every class it meets when forced: input channels per group
# not a multiple of 16 (masked last vector: 40 = 32 + 8, 33 = 32 + 1, 24, 5, 4, 3), output channels not a multiple
# of the register block (20, 17, 7), strided, dilated, 1x1 (stride 1: one row per image; strided), 7x7 stride 2,
# unpadded, asymmetric kernels and strides, one image, several image slices per tap (70 images of 2x2; 20x20 maps),
# output channels in several chunks (160 = 3 chunks of 48 + 16; 400 = chunks of 128), grouped 1x1
TILE_CASES = [
    ((3, 40, 5, 6, 20, (3, 3), (1, 1), (1, 1), (1, 1)), 1),
    ((3, 128, 2, 2, 96, (3, 3), (1, 1), (1, 1), (1, 1)), 1),
    ((2, 64, 4, 4, 48, (3, 3), (2, 2), (1, 1), (1, 1)), 4),
    ((2, 160, 5, 5, 160, (3, 3), (1, 1), (1, 1), (1, 1)), 10),
    ((2, 48, 7, 7, 48, (3, 3), (2, 2), (1, 1), (1, 1)), 2),
    ((2, 33, 7, 7, 17, (1, 1), (1, 1), (0, 0), (1, 1)), 1),
    ((3, 48, 2, 2, 24, (1, 1), (1, 1), (0, 0), (1, 1)), 1),
    ((2, 12, 5, 3, 8, (1, 1), (1, 1), (0, 0), (1, 1)), 4),
    ((2, 24, 9, 9, 40, (1, 1), (2, 2), (0, 0), (1, 1)), 1),
    ((2, 8, 9, 9, 16, (3, 3), (1, 1), (2, 2), (2, 2)), 2),
    ((2, 3, 19, 21, 16, (7, 7), (2, 2), (3, 3), (1, 1)), 1),
    ((2, 32, 3, 3, 32, (3, 3), (1, 1), (0, 0), (1, 1)), 1),
    ((1, 5, 6, 9, 7, (1, 3), (1, 2), (0, 1), (1, 1)), 1),
    ((70, 16, 2, 2, 16, (3, 3), (1, 1), (1, 1), (1, 1)), 1),
    ((3, 16, 20, 20, 16, (3, 3), (1, 1), (1, 1), (1, 1)), 1),
    ((2, 16, 2, 2, 160, (3, 3), (1, 1), (1, 1), (1, 1)), 1),
    ((1, 320, 2, 2, 400, (3, 3), (1, 1), (1, 1), (1, 1)), 1),
    # 1x1 stride 1 on 4x4 / 4x8 / 8x8 maps (one row of 16-64 positions per image), grouped
    ((2, 40, 4, 4, 22, (1, 1), (1, 1), (0, 0), (1, 1)), 1),
    ((3, 100, 4, 8, 70, (1, 1), (1, 1), (0, 0), (1, 1)), 1),
    ((2, 12, 8, 8, 8, (1, 1), (1, 1), (0, 0), (1, 1)), 4),
]
F32P, I64P = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int64)


def tiles_on_arrays(dy, x, case, groups, path):
    """fg_conv_grad_w_nhwc (one thread) on arrays: path 1 AVX-512 (None where this build has none), 0 plain C."""
    n, ci, h, w, co, kernel, stride, pad, dilation = case
    out = np.full((co, ci // groups, *kernel), np.nan, np.float32)
    xd, dd = np.array(x.shape, np.int64), np.array(dy.shape, np.int64)
    conv = np.array([*kernel, *stride, *pad, *dilation, groups], np.int64)
    r = kernels._library().fg_conv_grad_w_nhwc(dy.ctypes.data_as(F32P), x.ctypes.data_as(F32P), out.ctypes.data_as(F32P),
                                               xd.ctypes.data_as(I64P), dd.ctypes.data_as(I64P),
                                               conv.ctypes.data_as(I64P), ctypes.c_int(path))
    assert r in (0, 1)
    return None if r else out


def summation_bound(x, dy, case, groups):
    """|computed - exact| of each dW element: a sum of at most N*P float32 products, each added by one fused
    multiply-add (one rounding of the running sum): gamma_L * sum |dY X| with L = N*P (Higham, eq. 3.5)."""
    n, ci, h, w, co, kernel, stride, pad, dilation = case
    length = n * dy.shape[2] * dy.shape[3]
    u = 2.0 ** -24
    mag = torch.nn.grad.conv2d_weight(torch.from_numpy(np.abs(x)).double(), (co, ci // groups, *kernel),
                                      torch.from_numpy(np.abs(dy)).double(), stride=stride, padding=pad,
                                      dilation=dilation, groups=groups).numpy()
    return length * u / (1 - length * u) * mag


@pytest.mark.parametrize("case,groups", TILE_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("threads", [1, 2])
def test_tiles_kernel_matches_pytorch(case, groups, threads):
    x, dy, ref = conv_shape_case(case, groups)
    sess = custom_op_session("ConvGradWNhwc", ["dy", "x"], ["dw"], threads, group=groups, **conv_attrs(*case[5:]))
    got = sess.run(None, dict(dy=dy, x=x))[0]
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.all(np.abs(got - ref) <= summation_bound(x, dy, case, groups))
    # each dW element is one running sum over the positions in a fixed order, whatever the thread count and path:
    # the op, the plain-C path and the AVX-512 path give bitwise the same values
    plain = tiles_on_arrays(dy, x, case, groups, 0)
    assert np.array_equal(got.view(np.uint32), plain.view(np.uint32))
    fast = tiles_on_arrays(dy, x, case, groups, 1)
    if fast is not None:
        assert np.array_equal(fast.view(np.uint32), plain.view(np.uint32))


def test_new_kernels_refuse_bad_inputs():
    attrs = conv_attrs((3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(Exception, match="one batch"):
        custom_op_session("ConvGradWCols", ["dy", "x"], ["dyt", "col"], 1, group=1, **attrs).run(
            None, dict(dy=np.zeros((2, 4, 3, 3), np.float32), x=np.zeros((3, 4, 3, 3), np.float32)))
    with pytest.raises(Exception, match="group must divide"):
        custom_op_session("ConvGradWCols", ["dy", "x"], ["dyt", "col"], 1, group=3, **attrs).run(
            None, dict(dy=np.zeros((2, 4, 3, 3), np.float32), x=np.zeros((2, 4, 3, 3), np.float32)))
    with pytest.raises(Exception, match="group must divide"):
        custom_op_session("ConvGradWNhwc", ["dy", "x"], ["dw"], 1, group=3, **attrs).run(
            None, dict(dy=np.zeros((2, 4, 3, 3), np.float32), x=np.zeros((2, 4, 3, 3), np.float32)))
    with pytest.raises(Exception, match="one batch"):
        custom_op_session("ConvGradWNhwc", ["dy", "x"], ["dw"], 1, group=1, **attrs).run(
            None, dict(dy=np.zeros((2, 4, 3, 3), np.float32), x=np.zeros((3, 4, 3, 3), np.float32)))
    with pytest.raises(Exception, match="same channel count"):
        custom_op_session("DepthwiseConvGradW", ["dy", "x"], ["dw"], 1, **attrs).run(
            None, dict(dy=np.zeros((2, 5, 3, 3), np.float32), x=np.zeros((2, 4, 3, 3), np.float32)))


def _shape(ci, hw, co, k, s, g=1, bias=False):
    p = k // 2
    return ConvShape(ci=ci, h=hw, w=hw, co=co, kh=k, kw=k, sh=s, sw=s, ph=p, pw=p, ph_end=p, pw_end=p, dh=1, dw=1,
                     group=g, bias=bias)


# the corpus shapes of bench/kernel_probes.py --only dwshapes and the form its timings favour (x: CPU time / ConvGrad's,
# 2 threads; nhwc-tiles from the session-8 run, the others as measured before)
CHOICES = [
    (_shape(512, 2, 512, 3, 1), "nhwc-tiles"),      # resnet18 layer4: nhwc-tiles 0.48x, im2col-gemm 0.80x
    (_shape(256, 4, 512, 3, 2), "nhwc-tiles"),      # resnet18 layer4 strided: nhwc-tiles 0.36-0.81x, im2col-gemm 0.43-0.73x
    (_shape(256, 4, 256, 3, 1), "nhwc-tiles"),      # resnet18 layer3: nhwc-tiles 0.68x, im2col-gemm 1.09x
    (_shape(128, 8, 128, 3, 1), "nhwc-tiles"),      # resnet18 layer2: nhwc-tiles 0.91x, im2col-gemm 2.1x
    (_shape(64, 16, 128, 3, 2), "ConvGrad"),        # resnet18 layer2 strided: nhwc-tiles 0.8-1.7x, im2col-gemm 1.2-2.2x
    (_shape(64, 16, 64, 3, 1), "ConvGradW"),        # resnet18 layer1 / resnet20: 0.6x
    (_shape(16, 32, 16, 3, 1), "ConvGradW"),
    (_shape(16, 32, 32, 3, 2), "ConvGradW"),        # resnet20's strided convs: 0.6-0.9x (README table)
    (_shape(32, 16, 64, 1, 2), "ConvGradW"),
    (_shape(64, 16, 128, 1, 2), "ConvGrad"),        # 1x1 strided: im2col-gemm 0.9-1.9x, ConvGradW 9-23x, nhwc-tiles 1.4x
    (_shape(144, 16, 24, 1, 1), "ConvGrad"),        # 1x1: ConvGrad reads X in place; im2col-gemm 1.5-1.7x
    # 1x1 on 2x2 maps (--only dwshapes --cpu-time): im2col-gemm 0.6-0.9x ConvGrad; on 4x4 and up 1.1-1.7x, and
    # nhwc-tiles 1.05-2.4x there (its copies of X and dY into the blocked layouts are not hidden by a 1x1's few MACs)
    (_shape(1152, 2, 192, 1, 1), "im2col-gemm"),    # efficientnet's head
    (_shape(512, 2, 128, 1, 1), "im2col-gemm"),     # densenet block 4 (nhwc-tiles 0.18-0.87x, im2col-gemm 0.23-0.80x)
    (_shape(992, 2, 128, 1, 1), "im2col-gemm"),     # (nhwc-tiles 0.31-0.88x, im2col-gemm 0.38-0.97x: level)
    (_shape(1280, 2, 320, 1, 1), "im2col-gemm"),    # convnext's last MLP
    (_shape(320, 2, 1280, 1, 1), "im2col-gemm"),
    (_shape(992, 4, 128, 1, 1), "ConvGrad"),        # densenet block 3 (nhwc-tiles 1.19x)
    (_shape(1024, 4, 512, 1, 1), "ConvGrad"),       # (nhwc-tiles 1.56x)
    (_shape(640, 4, 160, 1, 1), "ConvGrad"),        # convnext stage 3
    (_shape(160, 4, 400, 1, 1), "ConvGrad"),        # regnet (nhwc-tiles 1.43x)
    (_shape(480, 8, 128, 1, 1), "ConvGrad"),        # densenet block 2 (nhwc-tiles 1.31x)
    (_shape(224, 16, 128, 1, 1), "ConvGrad"),       # densenet block 1 (nhwc-tiles 2.4x)
    (_shape(40, 16, 160, 1, 1), "ConvGrad"),        # convnext stage 1
    (_shape(3, 64, 32, 3, 2), "ConvGrad"),          # 3-channel stem: im2col-gemm 2-6x, ConvGradW 3-6x
    (_shape(3, 64, 64, 7, 2), "ConvGrad"),          # resnet18's 7x7 stride 2 (nhwc-tiles 4.6-7.9x: 3 of 16 lanes)
    (_shape(400, 2, 400, 3, 1, g=25), "nhwc-tiles"),    # regnet group width 16 on 2x2: nhwc-tiles 0.15x, im2col-gemm 1.3x
    (_shape(64, 8, 64, 3, 1, g=4), "nhwc-tiles"),       # and on 8x8: nhwc-tiles 0.26x, im2col-gemm 1.3x
    (_shape(160, 8, 160, 3, 2, g=10), "nhwc-tiles"),    # strided: nhwc-tiles 0.35-0.49x, im2col-gemm 1.5-1.6x
    (_shape(32, 16, 32, 3, 1, g=2), "nhwc-tiles"),      # regnet's first stage, 16x16: 0.28-0.30x (ConvGrad before)
    (_shape(480, 1, 20, 1, 1), "im2col-gemm"),          # efficientnet's SE 1x1 on a 1x1 map: nhwc-tiles 1.5x
    # densenet's growth convs, 128 -> 32: ConvGradW's 16-64 channels on 16x16 and 8x8 (nhwc-tiles 0.30-0.52x,
    # ConvGradW 0.44-0.56x: its rule comes first), nhwc-tiles on 4x4 and 2x2 (0.17-0.27x; im2col-gemm 0.9-1.4x)
    (_shape(128, 8, 32, 3, 1), "ConvGradW"),
    (_shape(128, 4, 32, 3, 1), "nhwc-tiles"),
    (_shape(128, 2, 32, 3, 1), "nhwc-tiles"),
    (_shape(240, 8, 240, 5, 1, g=240), "depthwise"),
]


@pytest.mark.parametrize("shape,form", CHOICES, ids=lambda c: str(c))
def test_cost_model_choices(shape, form):
    assert choose(shape, avx512=True)[0] == form


def test_without_avx512_the_tile_is_never_chosen():
    assert choose(_shape(64, 16, 64, 3, 1), avx512=False)[0] != "ConvGradW"
    assert all(choose(s, avx512=False)[0] not in ("ConvGradW", "nhwc-tiles") for s, _ in CHOICES)
    # the shapes nhwc-tiles takes fall back to the form they had before it
    assert choose(_shape(512, 2, 512, 3, 1), avx512=False)[0] == "im2col-gemm"
    assert choose(_shape(400, 2, 400, 3, 1, g=25), avx512=False)[0] == "im2col-gemm"


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(ConvZoo(), tmp_path_factory.mktemp("cgw"), (2, 3, 9, 9), "fused_kernels")


def test_pass_structure_and_reasons(builds):
    art, manifest = builds[True]
    ops = [(n.op_type, n.domain) for n in all_nodes(onnx.load(str(art / "training_model.onnx")).graph)]
    tiles = 2 if ConvGradWPass().avx512 else 0                                # k5, dil
    assert ops.count(("DepthwiseConvGradW", kernels.DOMAIN)) == 2             # dw, dw_s2
    assert ops.count(("ConvGradWNhwc", kernels.DOMAIN)) == tiles
    assert ops.count(("ConvGradWCols", kernels.DOMAIN)) == 4 - tiles          # grouped (bias; 2 channels per group), pw_s2 (bias)
    notes = "\n".join(n for n in manifest.extra["notes"] if n.startswith("[conv-grad-w]"))
    assert f"0 on ConvGradW, {4 - tiles} on im2col-gemm, {tiles} on nhwc-tiles, 2 on depthwise, 2 on ConvGrad" in notes
    assert "/pad1x1/Conv_Grad/ConvGrad_0: kept ConvGrad (it computes dX)" in notes   # pads beyond the kernel reach
    assert "/grouped/Conv_Grad/ConvGrad_0: dW on im2col-gemm (modelled" in notes
    assert "/c0/Conv_Grad/ConvGrad_0: dW on ConvGrad (modelled" in notes
    choices = {c["node"]: c for c in manifest.extra["conv_grad_w"]}
    assert choices["/dw_s2/Conv_Grad/ConvGrad_0"]["form"] == "depthwise"
    assert choices["/grouped/Conv_Grad/ConvGrad_0"]["shape"] == "Ci8 5x5 -> Co12 3x3/1 group 4, 5x5 out"


@pytest.mark.parametrize("bits,tol", [((0, 0, 0), 1e-5), ((8, 8, 8), 1e-4), ((4, 4, 6), 1e-4)])
def test_pass_keeps_loss_and_every_gradient(builds, bits, tol):
    assert_same_step(builds[False][0], builds[True][0], bits, tol)


class WideZoo(torch.nn.Module):
    """The shapes that select each form at a test's size: ConvGradW (16 channels, 8x8, stride 1, dilated),
    nhwc-tiles (64 channels on 4x4 and 2x2 maps, strided, grouped with a bias; im2col-gemm without AVX-512),
    im2col-gemm (a 1x1 with bias on 2x2), depthwise (with a bias), and ConvGrad (1x1 on 8x8)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c0 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.c1 = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.pw0 = nn.Conv2d(16, 16, 1, bias=False)
        self.down = nn.Conv2d(16, 64, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.g = nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=4, bias=True)   # nhwc-tiles' dB: a ReduceSum of dY
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=True)   # its dB as a ReduceSum of dY
        self.pw = nn.Conv2d(64, 32, 1, bias=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        r = torch.relu
        x = r(self.bn0(self.c0(x)))
        x = r(self.pw0(r(self.c1(x) + x)))
        x = r(self.c3(r(self.down(x))))
        x = r(self.dw(r(self.g(x))))
        x = self.pw(x)
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return build_pair(WideZoo(), tmp_path_factory.mktemp("cgw_wide"), (2, 3, 8, 8), "fused_kernels")


def test_every_form_is_chosen_on_its_shape(wide):
    choices = {c["node"].split("/")[1]: c["form"] for c in wide[True][1].extra["conv_grad_w"]}
    avx512 = ConvGradWPass().avx512
    tiles = "nhwc-tiles" if avx512 else "im2col-gemm"
    assert choices == {"c0": "ConvGradW" if avx512 else "ConvGrad", "c1": "ConvGradW" if avx512 else "ConvGrad",
                       "pw0": "ConvGrad", "down": tiles, "c3": tiles, "g": tiles, "dw": "depthwise", "pw": "im2col-gemm"}


def test_every_form_keeps_loss_and_every_gradient(wide):
    # at 0 bits: the forms differ only in float summation order, and no stochastic rounding can amplify that into a
    # flipped quantization step (the quantized on/off equality is checked against PyTorch on ConvZoo)
    assert_same_step(wide[False][0], wide[True][0], (0, 0, 0), 1e-5, shape=(6, 3, 8, 8))


def test_inspect_lists_each_choice_with_its_reason(wide):
    from typer.testing import CliRunner

    from fracgraph.cli import app
    from fracgraph.inspect import summarize

    art = wide[True][0]
    rows = {c["node"].split("/")[1]: c for c in summarize(str(art))["conv_weight_gradients"]}
    assert rows["c3"]["shape"] == "Ci64 4x4 -> Co64 3x3/1, 4x4 out"
    if ConvGradWPass().avx512:
        assert rows["c3"]["form"] == "nhwc-tiles"
        assert rows["c3"]["costs"]["nhwc-tiles"] * 1.25 < min(rows["c3"]["costs"]["ConvGrad"], rows["c3"]["costs"]["im2col-gemm"])
    else:
        assert rows["c3"]["form"] == "im2col-gemm"
        assert rows["c3"]["costs"]["im2col-gemm"] * 1.5 < rows["c3"]["costs"]["ConvGrad"]
    r = CliRunner().invoke(app, ["inspect", str(art)], env={"COLUMNS": "250"})
    assert r.exit_code == 0
    assert "conv weight gradients" in r.output and "/c3/Conv_Grad/ConvGrad_0" in r.output
    assert "depthwise: one output row per channel" in r.output
