"""ColSum and MinMaxColSum (fracgraph/kernels/bias_grad.c) bitwise against onnxruntime's ReduceSum over the leading
axes and numpy's min/max, on the ViTs' bias-gradient shapes and odd ones (rows and columns not multiples of 16 or of
the kernel's 32-column tasks, -0.0 columns); and the bias-grad pass on a tiny timm-style attention block: every
bias gradient's ReduceSum taken, and the step's loss and every gradient the same with the pass on and off, at 0 and
at quantized bits."""

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
# vit_tiny's four linears at batch 32, 17 tokens; the head's [B, classes]; odd rows and columns
SHAPES = [(32, 17, 192), (32, 17, 576), (32, 17, 768), (32, 10), (3, 5, 7), (2, 13, 33), (1, 1, 40), (7, 95),
          (2, 3, 4, 65)]


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def same_sums(s, ref):
    """Bitwise, but for the sign of a zero sum: onnxruntime's own ReduceSum paths disagree on it (a column of -0.0
    sums to -0.0 on [B, T, N], where the sum starts from row 0, and to +0.0 on [B, N] and [1, 1, N])."""
    return s.shape == ref.shape and bool(np.all((bits(s) == bits(ref)) | ((s == 0) & (ref == 0))))


def sample(shape, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 1e3], shape)).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[:, 0] = -0.0                      # a column of -0.0: its sum is -0.0 only when it starts from row 0
    if shape[-1] > 3:
        flat[0, 3] = -0.0                  # -0.0 in row 0 of a non-zero column
    return x


def ort_reduce_sum(x):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    axes = list(range(x.ndim - 1))
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, dict(x=x))[0]


def kernel(x, with_range):
    lib = kernels._library()
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[-1]
    s = np.full(n, 7.0, np.float32)
    lo, hi = np.float32([7.0]), np.float32([7.0])
    r = lib.fg_col_sum(x.ctypes.data_as(F32P), ctypes.c_size_t(x.size // n), ctypes.c_size_t(n), s.ctypes.data_as(F32P),
                       lo.ctypes.data_as(F32P) if with_range else None, hi.ctypes.data_as(F32P) if with_range else None)
    assert r == 0
    return s, lo[0], hi[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_is_onnxruntimes_reduce_sum_bit_for_bit(shape):
    x = sample(shape, len(shape) + shape[-1])
    ref = ort_reduce_sum(x)
    s, lo, hi = kernel(x, True)
    assert same_sums(s, ref) and bits(s)[0] == 0x80000000   # column 0 (all -0.0) starts from row 0
    assert lo == x.min() and hi == x.max()
    assert np.array_equal(bits(kernel(x, False)[0]), bits(s))
    # and against numpy in float64: the float sum's error is bounded by (rows - 1) roundings of partial sums
    rows = x.size // shape[-1]
    exact = x.reshape(rows, -1).astype(np.float64).sum(0)
    bound = (rows - 1) * np.finfo(np.float32).eps / 2 * np.abs(x.reshape(rows, -1)).astype(np.float64).sum(0)
    assert np.all(np.abs(s - exact) <= bound + 1e-45)


@pytest.mark.parametrize("threads", [1, 2])
def test_ops_on_the_sessions_threads(threads):
    """Several 32-column tasks and a tail (N = 200), above the one-thread size; both ops; the error line."""
    x = sample((6, 37, 200), threads)
    ref = ort_reduce_sum(x)
    (s,) = custom_op_session("ColSum", ["x"], ["s"], threads).run(None, dict(x=x))
    assert s.shape == (200,) and same_sums(s, ref)
    lo, hi, s2 = custom_op_session("MinMaxColSum", ["x"], ["lo", "hi", "s"], threads).run(None, dict(x=x))
    assert lo.shape == () and hi.shape == () and lo == x.min() and hi == x.max()
    assert np.array_equal(bits(s2), bits(s))
    (s3,) = custom_op_session("ColSum", ["x"], ["s"], threads).run(None, dict(x=np.zeros((0, 5), np.float32)))
    assert s3.shape == (5,) and not s3.any()
    with pytest.raises(Exception, match="empty"):
        custom_op_session("MinMaxColSum", ["x"], ["lo", "hi", "s"], threads).run(None, dict(x=np.zeros((0, 5), np.float32)))


class Block(torch.nn.Module):
    """A timm-style pre-norm ViT block (qkv Linear, heads, softmax attention, proj, GELU MLP) on 5 tokens of 9, and a
    head: every Linear's bias gradient is a ReduceSum over [B, T] or [B]."""

    def __init__(self, d=12, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Linear(9, d)
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 20), torch.nn.Linear(20, d)
        self.head = torch.nn.Linear(d, 4)

    def forward(self, x):   # x [B, 5, 3, 3]
        t = self.embed(x.flatten(2))
        b, n, c = t.shape
        qkv = self.qkv(self.norm1(t)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = ((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        t = t + self.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        t = t + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(t))))
        return self.head(t.mean(1))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(Block(), tmp_path_factory.mktemp("bias"), (2, 5, 3, 3), off={"skip_passes": ("bias-grad",)},
                      on={})


def _ops(art):
    return [(n.domain, n.op_type) for n in onnx.load(str(art / "training_model.onnx")).graph.node]


def test_pass_structure(builds):
    off, on = _ops(builds[False][0]), _ops(builds[True][0])
    sums = off.count(("", "ReduceSum"))
    assert sums >= 6   # embed, qkv, proj, fc1, fc2, head
    assert on.count(("", "ReduceSum")) == 0
    fused = on.count((kernels.DOMAIN, "MinMaxColSum")), on.count((kernels.DOMAIN, "ColSum"))
    assert sum(fused) == sums and fused[0] >= 5   # every quantized linear's dY range read with its bias sum
    assert on.count((kernels.DOMAIN, "MinMax")) == off.count((kernels.DOMAIN, "MinMax")) - fused[0]
    note = (f"[bias-grad] {sums} ReduceSum over the leading axes on fracgraph's kernels: {fused[0]} with the error "
            f"quantizer's MinMax of the same tensor (MinMaxColSum), {fused[1]} alone (ColSum)")
    assert note in builds[True][1].extra["notes"]


@pytest.mark.parametrize("step_bits", [(0, 0, 0), (8, 8, 8), (4, 4, 6)])
def test_pass_keeps_loss_and_every_gradient(builds, step_bits):
    """The sums are bitwise ReduceSum's and the ranges MinMax's numbers: the same loss and gradients (as numbers:
    a quantizer's range of +-0.0 may differ in the zero's sign only)."""
    shape = (6, 5, 3, 3)
    loss0, grads0, noise0 = _step(builds[False][0], step_bits, shape=shape)
    loss1, grads1, noise1 = _step(builds[True][0], step_bits, shape=shape)
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys() and len(grads0) == 16
    for name, g in grads0.items():
        assert np.array_equal(grads1[name], g), name
    assert noise0.keys() == noise1.keys() and all(np.array_equal(noise0[k], noise1[k]) for k in noise0)
