"""ClipGrad (fracgraph/kernels/clip_grad.c) bitwise against onnxruntime's own Clip_Grad chain (GreaterOrEqual,
LessOrEqual, And, Cast, Mul) and numpy; its two paths (AVX-512, plain C) alike; and the clip-grad pass: loss and
every gradient of a step through ReLU6, Hardtanh, one-bound clamps and HardSwish, bit for bit with the pass on and
off."""

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
BOUNDS = [(0.0, 6.0), (-1.0, 2.0), (-np.inf, 0.5), (0.25, np.inf), (3.0, 3.0), (1.0, -1.0)]


def kernel(dy, x, lo, hi, path):
    """fg_clip_grad on arrays: path 1 AVX-512 (None where this build has none), 0 plain C."""
    lib = kernels._library()
    dy, x = np.ascontiguousarray(dy, np.float32), np.ascontiguousarray(x, np.float32)
    out = np.full_like(x, 7.0)
    r = lib.fg_clip_grad(dy.ctypes.data_as(F32P), x.ctypes.data_as(F32P), out.ctypes.data_as(F32P),
                         ctypes.c_size_t(x.size), ctypes.c_float(lo), ctypes.c_float(hi), ctypes.c_int(path))
    return None if r else out


def sample(n=70_001, seed=0, outside=100.0):
    """Values on and around the bounds, signed zeros, NaN and infinities in both tensors."""
    rng = np.random.default_rng(seed)
    special = np.array([0.0, -0.0, 6.0, -1.0, 2.0, 0.5, 0.25, 3.0, 1.0, np.nextafter(6, 7), np.nextafter(0, -1),
                        np.nan, np.inf, -np.inf], np.float32)
    # and three X outside the bounds: dY inf x 0 = NaN, NaN x 0 = NaN, -1 x 0 = -0
    x = np.concatenate([(rng.standard_normal(n) * 4).astype(np.float32), special, np.float32([outside] * 3)])
    dy = np.concatenate([rng.standard_normal(n).astype(np.float32), special[::-1], np.float32([np.inf, np.nan, -1])])
    return dy, x


def ort_chain(dy, x, lo, hi):
    """onnxruntime's Clip_Grad ops on the same tensors (the chain the pass replaces)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("GreaterOrEqual", ["x", "lo"], ["ge"]), helper.make_node("LessOrEqual", ["x", "hi"], ["le"]),
             helper.make_node("And", ["ge", "le"], ["m"]), helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["dy", "mf"], ["dx"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("dy", "x")],
                              [helper.make_tensor_value_info("dx", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.float32(lo), "lo"), numpy_helper.from_array(np.float32(hi), "hi")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, dict(dy=dy, x=x))[0]


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("lo,hi", BOUNDS)
@pytest.mark.parametrize("path", [1, 0])
def test_kernel_is_the_chain_bit_for_bit(lo, hi, path):
    dy, x = sample(outside=100.0 if hi < 100 else -100.0)
    out = kernel(dy, x, lo, hi, path)
    if out is None:
        pytest.skip("this build has no AVX-512 path (the CPU lacks AVX-512F)")
    with np.errstate(invalid="ignore"):
        ref = dy * ((x >= lo) & (x <= hi)).astype(np.float32)
    assert np.array_equal(bits(out), bits(ref))
    assert np.array_equal(bits(out), bits(ort_chain(dy, x, lo, hi)))
    assert np.isnan(out[-3:-1]).all() and bits(out[-1:])[0] == 0x80000000   # inf x 0, NaN x 0, -1 x 0


@pytest.mark.parametrize("threads", [1, 2])
def test_op_runs_the_kernel_on_every_chunk(threads):
    """Three tasks of 32768 and a tail not a multiple of 16; one-element bounds of shape [] and [1]."""
    rng = np.random.default_rng(threads)
    x = (rng.standard_normal((3, 5, 90, 81)) * 4).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    sess = custom_op_session("ClipGrad", ["dy", "x", "lo", "hi"], ["dx"], threads)
    (dx,) = sess.run(None, dict(dy=dy, x=x, lo=np.array(0.0, np.float32), hi=np.array([6.0], np.float32)))
    assert dx.shape == x.shape and np.array_equal(bits(dx), bits(dy * ((x >= 0) & (x <= 6)).astype(np.float32)))
    with pytest.raises(Exception, match="different element counts"):
        sess.run(None, dict(dy=dy[:1], x=x, lo=np.array(0.0, np.float32), hi=np.array(6.0, np.float32)))
    with pytest.raises(Exception, match="one-element"):
        sess.run(None, dict(dy=dy, x=x, lo=np.zeros(2, np.float32), hi=np.array(6.0, np.float32)))


class ClipNet(torch.nn.Module):
    """Every Clip form: ReLU6 (MobileNetV2), Hardtanh, clamps with one bound, and HardSwish (MobileNetV3, lowered
    by fracgraph to a Clip, onnxruntime has no gradient for it)."""

    def __init__(self):
        super().__init__()
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 16, 1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.c0(x))
        x = torch.nn.functional.hardtanh(self.c1(x), -0.5, 0.75) + torch.clamp(x, min=0.3)
        x = torch.nn.functional.hardswish(self.c2(x)).mean((2, 3))
        return self.fc(torch.clamp(x, max=0.2))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    # hard-act (which takes HardSwish's ClipGrad into its own kernel) left out of both: this tests clip-grad alone
    return build_pair(ClipNet(), tmp_path_factory.mktemp("clip"), (2, 3, 9, 9),
                      off={"skip_passes": ("clip-grad", "hard-act")}, on={"skip_passes": ("hard-act",)})


def test_pass_structure(builds):
    def count(key, op, domain):
        graph = onnx.load(str(builds[key][0] / "training_model.onnx")).graph
        return sum(n.op_type == op and n.domain == domain for n in graph.node)

    fused = count(True, "ClipGrad", kernels.DOMAIN)
    assert fused >= 5 and count(False, "ClipGrad", kernels.DOMAIN) == 0
    assert count(True, "GreaterOrEqual", "") == 0 and count(False, "GreaterOrEqual", "") >= 3
    assert count(True, "LessOrEqual", "") < count(False, "LessOrEqual", "")
    assert f"[clip-grad] {fused} Clip gradients on fracgraph's ClipGrad" in builds[True][1].extra["notes"]


@pytest.mark.parametrize("step_bits", [(0, 0, 0), (8, 8, 8), (4, 4, 6)])
def test_pass_keeps_loss_and_every_gradient_bitwise(builds, step_bits):
    loss0, grads0, noise0 = _step(builds[False][0], step_bits)
    loss1, grads1, noise1 = _step(builds[True][0], step_bits)
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys() and len(grads0) == 8
    for name, g in grads0.items():
        assert np.array_equal(bits(grads1[name]), bits(g)), name
