"""HardAct and HardActGrad (fracgraph/kernels/hard_act.c) bitwise against the float32 chains they replace (numpy,
one rounding per op as onnxruntime's Mul, Add, Clip, ClipGrad, Mul and Sum), on both paths (AVX-512, plain C); and
the hard-act pass: a net with HardSwish and HardSigmoid (the lowered chains and onnxruntime's gradients of them),
loss and every gradient bit for bit with the pass on and off."""

from __future__ import annotations

import ctypes

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from fracgraph import kernels  # noqa: E402

from conftest import custom_op_session  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402

F32P = ctypes.POINTER(ctypes.c_float)
A, B = np.float32(1.0 / 6.0), np.float32(0.5)


def chain(dy, x, alpha, beta, swish):
    """The lowered forward and onnxruntime's gradient of it, op by op in float32."""
    t = x * alpha + beta
    c = np.minimum(np.maximum(t, np.float32(0)), np.float32(1))
    m = ((t >= 0) & (t <= 1)).astype(np.float32)
    if swish:
        return x * c, dy * c + ((dy * x) * m) * alpha
    return c, (dy * m) * alpha


def kernel(dy, x, alpha, beta, swish, grad, path):
    out = np.full_like(x, np.nan)
    r = kernels._library().fg_hard_act(dy.ctypes.data_as(F32P), x.ctypes.data_as(F32P), out.ctypes.data_as(F32P),
                                       ctypes.c_size_t(x.size), ctypes.c_float(alpha), ctypes.c_float(beta),
                                       ctypes.c_int(swish), ctypes.c_int(grad), ctypes.c_int(path))
    return None if r else out


def sample(n=50_003):
    rng = np.random.default_rng(0)
    # around the clip's corners (t = 0 at x = -3, t = 1 at x = 3 for alpha 1/6, beta 1/2) and everywhere else
    x = np.concatenate([(rng.standard_normal(n) * 4).astype(np.float32), np.float32([-3, 3, 0, -0.0, 1e-30, -1e30]),
                        np.nextafter(np.float32([-3, 3, -3, 3]), np.float32([-4, 4, 0, 0]))])
    return rng.standard_normal(x.size).astype(np.float32), x


@pytest.mark.parametrize("swish", [1, 0])
@pytest.mark.parametrize("path", [1, 0])
@pytest.mark.parametrize("alpha,beta", [(A, B), (np.float32(0.2), np.float32(0.5))])
def test_kernels_are_the_chains_bit_for_bit(swish, path, alpha, beta):
    dy, x = sample()
    ref_y, ref_dx = chain(dy, x, alpha, beta, swish)
    y, dx = kernel(dy, x, alpha, beta, swish, 0, path), kernel(dy, x, alpha, beta, swish, 1, path)
    if y is None:
        pytest.skip("this build has no AVX-512 path (the CPU lacks AVX-512F)")
    assert np.array_equal(y, ref_y) and np.array_equal(dx, ref_dx)


@pytest.mark.parametrize("threads", [1, 2])
def test_ops_run_the_kernels_on_every_chunk(threads):
    rng = np.random.default_rng(threads)
    x = (rng.standard_normal((3, 7, 61, 59)) * 4).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    ref_y, ref_dx = chain(dy, x, A, B, 1)
    attrs = dict(alpha=float(A), beta=float(B), swish=1)
    (y,) = custom_op_session("HardAct", ["x"], ["y"], threads, **attrs).run(None, dict(x=x))
    (dx,) = custom_op_session("HardActGrad", ["dy", "x"], ["dx"], threads, **attrs).run(None, dict(dy=dy, x=x))
    assert np.array_equal(y, ref_y) and np.array_equal(dx, ref_dx)
    with pytest.raises(Exception, match="different element counts"):
        custom_op_session("HardActGrad", ["dy", "x"], ["dx"], threads, **attrs).run(None, dict(dy=dy[:1], x=x))


class HardNet(torch.nn.Module):
    """MobileNetV3's uses: HardSwish after a conv (and one whose input also feeds a residual), a squeeze-excite
    HardSigmoid gate, and a HardSigmoid with other constants."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c0, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.nn.functional.hardswish(self.c0(x))
        h = self.c1(x)
        x = torch.nn.functional.hardswish(h) + h                    # h's gradient has a third part: kept
        se = torch.nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        x = (x * se).mean((2, 3))
        return self.fc(torch.clamp(0.2 * x + 0.5, 0, 1))             # HardSigmoid's shape with other constants


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(HardNet(), tmp_path_factory.mktemp("hard"), (2, 3, 9, 9), off={"skip_passes": ("hard-act",)},
                      on={})


def test_pass_structure(builds):
    graph = onnx.load(str(builds[True][0] / "training_model.onnx")).graph
    count = lambda op: sum(n.op_type == op for n in graph.node)   # noqa: E731
    note = next(n for n in builds[True][1].extra["notes"] if n.startswith("[hard-act]"))
    assert count("HardAct") == count("HardActGrad") >= 3
    assert note.startswith("[hard-act] 1 HardSwish and ")
    assert any("X's gradient is not the Sum of the HardSwish's two" in n for n in builds[True][1].extra["notes"])


@pytest.mark.parametrize("step_bits", [(0, 0, 0), (8, 8, 8), (4, 4, 6)])
def test_pass_keeps_loss_and_every_gradient_bitwise(builds, step_bits):
    loss0, grads0, _ = _step(builds[False][0], step_bits)
    loss1, grads1, _ = _step(builds[True][0], step_bits)
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys() and len(grads0) == 10
    for name, g in grads0.items():
        assert np.array_equal(grads1[name], g), name
