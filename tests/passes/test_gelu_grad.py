"""GeluGrad and FastGeluGrad (fracgraph/kernels/gelu.c) against the float64 GELU derivatives, with an error bound derived from its
approximation's parts; its two paths (AVX-512, plain C) bitwise alike; its non-finite values against onnxruntime's
com.microsoft GeluGrad; and the gelu-grad pass: loss and every gradient of a GELU model's step with the pass on and
off (another erf, so within float rounding at 0 bits, the tolerance of tests/passes/test_speed_passes.py)."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
special = pytest.importorskip("scipy.special")

from fracgraph import kernels  # noqa: E402

from conftest import custom_op_session  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402

U = 2.0 ** -24          # unit roundoff of float32
NR_ERFC = 1.2e-7        # Numerical Recipes' erfcc: fractional error below 1.2e-7 for every argument
EXP_ULPS = 3.0          # Cephes expf: peak relative error 1.7e-7 = 2.9 U (its documentation)
EPS = 2.5e-6            # gelu.c's bound: |g - g(x)| <= EPS (Phi(x) + |x| phi(x)) + TINY for |x| <= 13
TINY = 2e-36            # |x| > 13: E and Phi(-|x|) taken as 0, true |g| below 1.1e-36
P = [-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
     -0.82215223, 0.17087277]   # gelu.c's P0..P9
F32P = ctypes.POINTER(ctypes.c_float)


def test_error_bound_derivation():
    """EPS covers the sum of gelu.c's error terms over t in [1 / (1 + 13 / (2 sqrt 2)), 1] (|x| <= 13), each
    relative to the term it perturbs (Phi(-|x|) = t E exp(P(t)) / 2, and x phi(x) = x E / sqrt(2 pi)):
    - erfc's fit: NR_ERFC; its coefficients rounded to float: U sum |P_k| t^k (absolute in P, relative in exp(P));
    - Horner with fused multiply-adds, one rounding per step: U sum_k |q_k(t)| over the partial sums q_k;
    - t = 1 / fma(a, C_T, 1): C_T's rounding, the fma's and the division's, 3 U relative in h's factor t, and
      moving P by |t P'(t)| 3 U;
    - the two exps: EXP_ULPS U each, E's argument exact to float (a^2 = p + pe split by fma) plus U |r| <= U/2
      where -pe/2 is added to the reduced argument;
    - the products (0.5 t) exp(P) E and x (E / sqrt(2 pi)): 2 roundings each; 1 - h: 1 U; the final sum: 1 U."""
    t = np.linspace(1 / (1 + 13 / (2 * np.sqrt(2))), 1, 100_001)
    q, horner = np.full_like(t, P[9]), np.zeros_like(t)
    for c in P[8::-1]:
        q = q * t + c
        horner += np.abs(q)
    coeff = sum(abs(c) * t ** k for k, c in enumerate(P))
    slope = np.abs(t * sum(k * P[k] * t ** (k - 1) for k in range(1, 10)))
    phi_side = NR_ERFC + U * (coeff + horner + 3 * slope + 3 + 2 * EXP_ULPS + 0.5 + 2 + 1 + 1)
    x_phi_side = U * (EXP_ULPS + 0.5 + 2 + 1)
    derived = max(phi_side.max(), x_phi_side)
    assert derived <= EPS < 2 * derived, derived


def ref_g(x):
    """float64 GELU derivative and the size of its two terms (Phi and |x| phi; the bound is relative to it)."""
    xd = x.astype(np.float64)
    big = 0.5 * special.erfc(-xd / np.sqrt(2))
    phi = np.exp(-xd * xd / 2) / np.sqrt(2 * np.pi)
    return big + xd * phi, big + np.abs(xd) * phi


def kernel(dy, x, path):
    """fg_gelu_grad on arrays: path 1 AVX-512 (None where this build has none), 0 plain C."""
    lib = kernels._library()
    dy, x = np.ascontiguousarray(dy, np.float32), np.ascontiguousarray(x, np.float32)
    out = np.full_like(x, np.nan)
    r = lib.fg_gelu_grad(dy.ctypes.data_as(F32P), x.ctypes.data_as(F32P), out.ctypes.data_as(F32P),
                         ctypes.c_size_t(x.size), ctypes.c_int(path))
    return None if r else out


def sample():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-14, 14, 280_001, dtype=np.float32),                    # step 1e-4
                        (rng.standard_normal(100_000) * 3).astype(np.float32),
                        np.float32(-0.7517916) + np.arange(-2000, 2000, dtype=np.float32) * 2e-7,  # around g's root
                        np.array([0, -0.0, 1e-45, -1e-45, 1e-40, 1.2e-38, 1e-30, 13, -13, 13.000001, -13.000001,
                                  30, -30, 1e19, -1e19, 3e38, -3e38], np.float32)])
    dy = (rng.standard_normal(x.size) * np.exp(rng.uniform(-20, 20, x.size))).astype(np.float32)
    return dy, x


def assert_within_bound(dx, dy, x):
    g, size = ref_g(x)
    dyd = dy.astype(np.float64)
    err = np.abs(dx - dyd * g)
    bound = np.abs(dyd) * (EPS * size + TINY) + U * np.abs(dyd * g) + 2.0 ** -126   # + dX's rounding, denormal
    worst = np.argmax(err / bound)
    assert (err <= bound).all(), f"x={x[worst]!r} dy={dy[worst]!r}: {dx[worst]!r} vs {dyd[worst] * g[worst]!r}"


@pytest.mark.parametrize("path", [1, 0])
def test_kernel_within_derived_bound(path):
    dy, x = sample()
    dx = kernel(dy, x, path)
    if dx is None:
        pytest.skip("this build has no AVX-512 path (the CPU lacks AVX-512F)")
    assert_within_bound(dx, dy, x)
    # and relative to g where the terms do not cancel (EPS * size / |g| <= 3 EPS for g's terms within 3x of g)
    g, size = ref_g(x)
    ok = (np.abs(x) <= 13) & (size <= 3 * np.abs(g)) & (np.abs(dy * g) > 1e-30)
    assert (np.abs(dx[ok] / dy[ok] - g[ok]) <= 4 * EPS * np.abs(g[ok])).all()


def test_paths_are_bitwise_alike():
    dy, x = sample()
    fast, plain = kernel(dy, x, 1), kernel(dy, x, 0)
    if fast is None:
        pytest.skip("this build has no AVX-512 path (the CPU lacks AVX-512F)")
    assert np.array_equal(fast.view(np.uint32), plain.view(np.uint32))


@pytest.mark.parametrize("threads", [1, 2])
def test_op_runs_the_kernel_on_every_chunk(threads):
    """Three tasks of 16384 and a tail not a multiple of 16: the op's output is the kernel's, element for element."""
    rng = np.random.default_rng(threads)
    x = (rng.standard_normal((3, 5, 70, 41)) * 2).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    (dx,) = custom_op_session("GeluGrad", ["dy", "x"], ["dx"], threads).run(None, dict(dy=dy, x=x))
    ref = kernel(dy, x, 1 if kernels._library().fg_gelu_avx512() else 0)
    assert dx.shape == x.shape and np.array_equal(dx.view(np.uint32), ref.reshape(x.shape).view(np.uint32))
    with pytest.raises(Exception, match="different element counts"):
        custom_op_session("GeluGrad", ["dy", "x"], ["dx"], threads).run(None, dict(dy=dy[:1], x=x))


def ort_gelu_grad(dy, x):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("GeluGrad", ["dy", "x"], ["dx"], domain="com.microsoft")], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("dy", "x")],
                              [helper.make_tensor_value_info("dx", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(dy=dy, x=x))[0]


def test_non_finite_values_as_onnxruntime():
    """NaN in x or dY gives NaN; x = +-inf gives dY * (+-inf); an infinite dY gives +-inf where g is not 0 (x > -13):
    where onnxruntime's result is not finite, ours is the same non-finite value."""
    xs = np.array([np.inf, -np.inf, np.nan, 0, 1.5, -1.5, -8, 12], np.float32)
    dys = np.array([1, -2, np.inf, -np.inf, np.nan], np.float32)
    x, dy = np.meshgrid(xs, dys)
    x, dy = x.ravel(), dy.ravel()
    ours = custom_op_session("GeluGrad", ["dy", "x"], ["dx"], 2).run(None, dict(dy=dy, x=x))[0]
    theirs = ort_gelu_grad(dy, x)
    bad = ~np.isfinite(theirs)
    assert bad.sum() >= 20
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    assert np.array_equal(ours[bad & ~np.isnan(theirs)], theirs[bad & ~np.isnan(theirs)])
    assert_within_bound(ours[~bad], dy[~bad], x[~bad])


class GeluNet(torch.nn.Module):
    """ConvNeXt's shape of GELU use (a conv MLP between GELUs) and a Linear MLP with GELU (the GPT's)."""

    def __init__(self):
        super().__init__()
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = torch.nn.Conv2d(8, 16, 1)
        self.fc0 = torch.nn.Linear(16, 24)
        self.fc1 = torch.nn.Linear(24, 4)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.c0(x))
        x = torch.nn.functional.gelu(self.c1(x)).mean((2, 3))
        return self.fc1(torch.nn.functional.gelu(self.fc0(x)))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(GeluNet(), tmp_path_factory.mktemp("gelu"), (2, 3, 9, 9), off={"skip_passes": ("gelu-grad",)},
                      on={})


def test_pass_structure(builds):
    def grads(key):
        graph = onnx.load(str(builds[key][0] / "training_model.onnx")).graph
        return [(n.domain, n.name) for n in graph.node if n.op_type == "GeluGrad"]

    off, on = grads(False), grads(True)
    assert len(off) == 3 and {d for d, _ in off} == {"com.microsoft"}
    assert sorted(on) == sorted((kernels.DOMAIN, f"{name}::gelu_grad") for _, name in off)
    assert "[gelu-grad] 3 GeluGrad on fracgraph's GeluGrad" in builds[True][1].extra["notes"]
    assert builds[True][1].extra["custom_ops"] == kernels.DOMAIN


@pytest.mark.parametrize("bits,tol", [((0, 0, 0), 1e-5), ((8, 8, 8), 5e-2)])
def test_pass_keeps_loss_and_every_gradient(builds, bits, tol):
    """0 bits: within float rounding. 8 bits: the same forward (loss bit for bit); a rounding-level change of dX can
    move an error element across a stochastic-rounding boundary (one quantization step, tests/passes/
    test_speed_passes.py), so the gradients are only checked to be the same to a few quantization steps."""
    loss0, grads0, _ = _step(builds[False][0], bits)
    loss1, grads1, _ = _step(builds[True][0], bits)
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys() and len(grads0) == 8
    for name, g in grads0.items():
        err = np.linalg.norm(grads1[name] - g) / max(np.linalg.norm(g), 1e-12)
        assert err <= tol, f"{name}: relative gradient error {err:.2e}"


# ---- FastGeluGrad: the tanh approximation's derivative (GPT-2's gelu_new) ------------------------------------------
KA, GAMMA = np.sqrt(2 / np.pi), 0.044715
TINY_FAST = 1e-34       # |u| > 42: E and the second term taken as 0; true values below 3e-37 and 5.5e-35


def ref_fast(x):
    """float64 f(x) = (1 + tanh u)/2 + x (1 - tanh^2 u) u'/2 as gelu.c's two terms, (f, |first| + |second|, |u|)."""
    xd = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        u = KA * (xd + GAMMA * xd ** 3)
        e = np.exp(-2 * np.abs(u))
        s = 1 / (1 + e)
        first = np.where(xd > 0, s, e * s)
        second = np.where(np.abs(u) > 42, 0.0, 2 * xd * e * s * s * KA * (1 + 3 * GAMMA * xd * xd))
    return first + second, np.abs(first) + np.abs(second), np.abs(u)


def fast_bound(x):
    """gelu.c's FastGeluGrad error, relative to the size of f's terms (see the C comment):
    - u = x fma(KAG, x^2, KA): KA, KAG rounded to float, x^2, the fma, the product: 5 U relative, so E = exp(-2|u|)
      carries 10 U |u| relative from its argument, plus the exp's EXP_ULPS U: d_E = (3 + 10 |u|) U;
    - s = 1 / (1 + E): 1 + E and the division, 2 U, plus E's d_E scaled by E / (1 + E) <= 1: d_s <= 2 U + d_E;
    - first = s, or E s (+ U): <= d_E + d_s + U;
    - second = ((2x)((E s) s)) u', u' = fma(KB, x^2, KA) (KB, KA, x^2, the fma: 3 U, positive terms): d_E + 2 d_s +
      3 U (products) + 3 U;
    - the sum: U. The largest, 3 d_E + 11 U + U = (21 + 30 |u|) U, bounds every term."""
    _, size, au = ref_fast(x)
    return np.where(au > 42, TINY_FAST, (21 + 30 * np.minimum(au, 42)) * U * size)


def fast_kernel(dy, x, path):
    lib = kernels._library()
    dy, x = np.ascontiguousarray(dy, np.float32), np.ascontiguousarray(x, np.float32)
    out = np.full_like(x, np.nan)
    r = lib.fg_fast_gelu_grad(dy.ctypes.data_as(F32P), x.ctypes.data_as(F32P), out.ctypes.data_as(F32P),
                              ctypes.c_size_t(x.size), ctypes.c_int(path))
    return None if r else out


def fast_sample():
    dy, x = sample()
    x = np.concatenate([x, np.array([9.2, -9.2, 9.3, -9.3, 9.25, -9.25], np.float32)])   # around |u| = 42
    return np.concatenate([dy, np.ones(6, np.float32)]), x


@pytest.mark.parametrize("path", [1, 0])
def test_fast_kernel_within_derived_bound(path):
    dy, x = fast_sample()
    dx = fast_kernel(dy, x, path)
    if dx is None:
        pytest.skip("this build has no AVX-512 path (the CPU lacks AVX-512F)")
    finite = np.isfinite(x)
    f, _, _ = ref_fast(x[finite])
    dyd = dy[finite].astype(np.float64)
    err = np.abs(dx[finite] - dyd * f)
    bound = np.abs(dyd) * fast_bound(x[finite]) + U * np.abs(dyd * f) + 2.0 ** -126
    worst = np.argmax(err / bound)
    assert (err <= bound).all(), f"x={x[finite][worst]!r}: {dx[finite][worst]!r} vs {dyd[worst] * f[worst]!r}"


def test_fast_paths_are_bitwise_alike_and_limits():
    dy, x = fast_sample()
    fast, plain = fast_kernel(dy, x, 1), fast_kernel(dy, x, 0)
    if fast is not None:
        assert np.array_equal(fast.view(np.uint32), plain.view(np.uint32))
    xs = np.array([np.inf, -np.inf, np.nan, 0.0], np.float32)
    out = fast_kernel(np.full(4, 3.0, np.float32), xs, 0)
    assert out[0] == 3.0 and out[1] == 0.0 and np.isnan(out[2]) and out[3] == 1.5   # f(+-inf) = 1, 0; f(0) = 1/2


def ort_fast_gelu_grad(dy, x):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("FastGeluGrad", ["dy", "x"], ["dx"], domain="com.microsoft")], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("dy", "x")],
                              [helper.make_tensor_value_info("dx", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(dy=dy, x=x))[0]


@pytest.mark.parametrize("threads", [1, 2])
def test_fast_op_runs_the_kernel_and_is_onnxruntimes_function(threads):
    """Every chunk (three of 16384 and a tail) is the kernel's; and onnxruntime's FastGeluGrad computes the same
    function: within its own float rounding (absolute ~1e-7 of its 0.5 (1 + tanh) form) of ours."""
    rng = np.random.default_rng(threads)
    x = (rng.standard_normal((3, 5, 70, 41)) * 2).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    (dx,) = custom_op_session("FastGeluGrad", ["dy", "x"], ["dx"], threads).run(None, dict(dy=dy, x=x))
    ref = fast_kernel(dy, x, 1 if kernels._library().fg_gelu_avx512() else 0)
    assert dx.shape == x.shape and np.array_equal(dx.view(np.uint32), ref.reshape(x.shape).view(np.uint32))
    np.testing.assert_allclose(dx, ort_fast_gelu_grad(dy, x), rtol=1e-5, atol=2e-6 * np.abs(dy).max())
    with pytest.raises(Exception, match="different element counts"):
        custom_op_session("FastGeluGrad", ["dy", "x"], ["dx"], threads).run(None, dict(dy=dy[:1], x=x))


def gelu_new(x):
    """transformers' NewGELUActivation (GPT-2's gelu_new), written as it is: onnxruntime fuses this expression into
    FastGelu (torch's gelu(approximate="tanh") exports as another pattern, which it leaves unfused)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class TanhGeluNet(torch.nn.Module):
    """A conv stem and GPT-2's MLP shape: Linear, tanh GELU, Linear."""

    def __init__(self):
        super().__init__()
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc0 = torch.nn.Linear(8, 24)
        self.fc1 = torch.nn.Linear(24, 4)

    def forward(self, x):
        x = gelu_new(self.c0(x)).mean((2, 3))
        return self.fc1(gelu_new(self.fc0(x)))


@pytest.fixture(scope="module")
def fast_builds(tmp_path_factory):
    return build_pair(TanhGeluNet(), tmp_path_factory.mktemp("fast_gelu"), (2, 3, 9, 9),
                      off={"skip_passes": ("gelu-grad",)}, on={})


def test_fast_pass_structure(fast_builds):
    def grads(key):
        graph = onnx.load(str(fast_builds[key][0] / "training_model.onnx")).graph
        return [(n.domain, n.name) for n in graph.node if n.op_type == "FastGeluGrad"]

    off, on = grads(False), grads(True)
    assert len(off) == 2 and {d for d, _ in off} == {"com.microsoft"}
    assert sorted(on) == sorted((kernels.DOMAIN, f"{name}::gelu_grad") for _, name in off)
    assert "[gelu-grad] 2 FastGeluGrad on fracgraph's FastGeluGrad" in fast_builds[True][1].extra["notes"]


@pytest.mark.parametrize("bits,tol", [((0, 0, 0), 1e-5), ((8, 8, 8), 5e-2)])
def test_fast_pass_keeps_loss_and_every_gradient(fast_builds, bits, tol):
    """As test_pass_keeps_loss_and_every_gradient, for the tanh GELU."""
    loss0, grads0, _ = _step(fast_builds[False][0], bits)
    loss1, grads1, _ = _step(fast_builds[True][0], bits)
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys() and len(grads0) == 6
    for name, g in grads0.items():
        err = np.linalg.norm(grads1[name] - g) / max(np.linalg.norm(g), 1e-12)
        assert err <= tol, f"{name}: relative gradient error {err:.2e}"
