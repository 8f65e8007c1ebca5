"""ConvGradW (fracgraph/kernels/fused_ops.c) against PyTorch's float64 conv weight gradient, and the conv-grad-w
pass against onnxruntime's ConvGrad: loss and every gradient with the pass on and off.

The kernel sums in another order than ConvGrad, so the step comparison has the tolerances of the other
non-bitwise speed passes (tests/passes/test_speed_passes.py says why 1e-4 with quantized errors).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from fracgraph import kernels  # noqa: E402
from fracgraph.passes.base import all_nodes  # noqa: E402

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


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(ConvZoo(), tmp_path_factory.mktemp("cgw"), (2, 3, 9, 9), "fused_kernels")


def test_pass_structure_and_reasons(builds):
    art, manifest = builds[True]
    ops = [(n.op_type, n.domain) for n in all_nodes(onnx.load(str(art / "training_model.onnx")).graph)]
    # stride-1 group-1 convs whose dX conv-grad-split took: c0 (no dX needed), k5, dil
    assert ops.count(("ConvGradW", kernels.DOMAIN)) == 3
    notes = "\n".join(n for n in manifest.extra["notes"] if n.startswith("[conv-grad-w]"))
    assert "3 conv weight gradients on fracgraph's ConvGradW" in notes
    assert "/pad1x1/Conv_Grad/ConvGrad_0: kept ConvGrad (it computes dX)" in notes   # pads beyond the kernel reach
    assert "/pw_s2/Conv_Grad/ConvGrad_0: kept ConvGrad (it computes the bias gradient)" in notes
    assert "/grouped/Conv_Grad/ConvGrad_0: kept ConvGrad (it computes the bias gradient)" in notes
    assert "/dw/Conv_Grad/ConvGrad_0: kept ConvGrad (grouped)" in notes
    assert "/dw_s2/Conv_Grad/ConvGrad_0: kept ConvGrad (grouped)" in notes


@pytest.mark.parametrize("bits,tol", [((0, 0, 0), 1e-5), ((8, 8, 8), 1e-4), ((4, 4, 6), 1e-4)])
def test_pass_keeps_loss_and_every_gradient(builds, bits, tol):
    assert_same_step(builds[False][0], builds[True][0], bits, tol)
