"""fracgraph's fused ops (fracgraph/kernels/fused_ops.c) against numpy, and the fused-ops pass against the ops it replaces.

The numpy references are written from the formulas in fused_ops.c's header (the chain of quantizers.py, and
SplitMix64's finalizer over a per-call key), not from the C code: a kernel that rounds a step differently,
fuses a multiply-add, draws from another stream or depends on the thread count fails bitwise.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from fracgraph import kernels  # noqa: E402
from fracgraph.passes.base import all_nodes  # noqa: E402
from fracgraph.passes.fused_ops import salt  # noqa: E402

from conftest import custom_op_session, sr_noise_ref as noise_ref  # noqa: E402
from test_speed_passes import ConvZoo, _step, build_pair  # noqa: E402


def chain_ref(x, mn, s, lo, hi, noise):
    """quantizers.py's chain in float32, one rounding per op: Round(Clip((x - mn) / s + noise, lo, hi)) * s + mn."""
    f = np.float32
    u = (x - f(mn)) / f(s) + noise.reshape(x.shape)
    return np.round(np.clip(u, f(lo), f(hi))) * f(s) + f(mn)


INPUTS = {"SRQuantize": ["x", "mn", "s", "hi"], "SRQuantizeNoise": ["x", "mn", "s", "hi", "noise"],
          "FakeQuantize": ["x", "mn", "s", "hi"], "MinMax": ["x"], "ReluGrad": ["dy", "x"]}


def session(op: str, threads: int, **attrs) -> ort.InferenceSession:
    return custom_op_session(op, INPUTS[op], ["lo", "hi"] if op == "MinMax" else ["y"], threads, **attrs)


def operands(shape, seed=0, levels=255.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    mn, mx = np.float32(x.min()) if x.size else np.float32(0), np.float32(x.max()) if x.size else np.float32(1)
    s = np.maximum((mx - mn) / np.float32(levels), np.float32(1e-8)).astype(np.float32)
    return x, np.array(mn), np.array(s), np.array(levels, np.float32)


@pytest.mark.parametrize("shape", [(0,), (7,), (3, 5, 11, 13), (2, 16, 40, 40)])   # empty, below, across chunks
@pytest.mark.parametrize("threads", [1, 2])
def test_noise_op_is_the_chain_bitwise(shape, threads):
    x, mn, s, hi = operands(shape)
    noise = np.random.default_rng(1).uniform(-0.5, 0.5, shape).astype(np.float32)
    y = session("SRQuantizeNoise", threads, lo=0.0).run(None, dict(x=x, mn=mn, s=s, hi=hi, noise=noise))[0]
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.array_equal(y, chain_ref(x, mn, s, 0.0, hi, noise))


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 11, 13), (64, 16, 3, 3), (17, 600, 3, 3), (10, 4)])
@pytest.mark.parametrize("threads", [1, 2])
def test_per_channel_weight_quantizer_bitwise(shape, threads):
    """The weight quantizer: min and scale per output channel ([K, 1, ...]), channels across chunk boundaries
    (17 x 5400 elements), 2-D (Linear) weights; bitwise the chain, and MinMaxRows exactly numpy's per-row range;
    a MatMul weight's per-column quantizer (FakeQuantize's last-axis path, MinMaxCols) likewise."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    axes = tuple(range(1, len(shape)))
    lo_r, hi_r = custom_op_session("MinMaxRows", ["x"], ["lo", "hi"], threads).run(None, {"x": x})
    assert lo_r.shape == hi_r.shape == (shape[0],) + (1,) * (len(shape) - 1)
    assert np.array_equal(lo_r, x.min(axis=axes, keepdims=True)) and np.array_equal(hi_r, x.max(axis=axes, keepdims=True))
    s = np.maximum((hi_r - lo_r) / np.float32(15), np.float32(1e-8)).astype(np.float32)
    hi = np.array(15.5, np.float32)
    y = session("FakeQuantize", threads, lo=-0.5).run(None, dict(x=x, mn=lo_r, s=s, hi=hi))[0]
    f = np.float32
    ref = np.round(np.clip((x - lo_r) / s, f(-0.5), hi)) * s + lo_r
    assert np.array_equal(y, ref)
    # a MatMul weight [in, out]: per column ([1, N]), the last axis
    lo_c, hi_c = x.reshape(shape[0], -1).min(0, keepdims=True), x.reshape(shape[0], -1).max(0, keepdims=True)
    s_c = np.maximum((hi_c - lo_c) / np.float32(15), np.float32(1e-8)).astype(np.float32)
    xc = x.reshape(shape[0], -1)
    lo_k, hi_k = custom_op_session("MinMaxCols", ["x"], ["lo", "hi"], threads).run(None, {"x": xc})   # 256 columns a task
    assert np.array_equal(lo_k, lo_c) and np.array_equal(hi_k, hi_c) and lo_k.shape == (1, xc.shape[1])
    y = session("FakeQuantize", threads, lo=-0.5).run(None, dict(x=xc, mn=lo_c, s=s_c, hi=hi))[0]
    assert np.array_equal(y, np.round(np.clip((xc - lo_c) / s_c, f(-0.5), hi)) * s_c + lo_c)
    with pytest.raises(Exception, match="scalars or per channel along one axis"):
        session("FakeQuantize", threads, lo=-0.5).run(None, dict(x=x, mn=lo_r[:1].repeat(2, 0), s=s[:1].repeat(2, 0), hi=hi))


# (X shape, kernel, strides, pads [begin h, w, end h, w], dilations, ceil_mode): resnet18's stem pool, odd maps,
# asymmetric pads, dilation, a window over padding only at the edge, ties (small integers), and ceil mode
# (squeezenet's and googlenet's 3x3/2 pools, a partial last window, inception's 3x3/1 padded)
POOLS = [((2, 8, 16, 16), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 0), ((3, 5, 9, 11), (2, 2), (2, 2), (0, 0, 0, 0), (1, 1), 0),
         ((2, 3, 10, 7), (3, 2), (1, 2), (1, 0, 0, 1), (1, 1), 0), ((1, 4, 12, 12), (3, 3), (2, 2), (2, 2, 2, 2), (2, 2), 0),
         ((2, 8, 15, 15), (3, 3), (2, 2), (0, 0, 0, 0), (1, 1), 1), ((2, 3, 8, 10), (3, 3), (2, 2), (0, 0, 0, 0), (1, 1), 1),
         ((2, 3, 7, 7), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), ((1, 2, 6, 9), (2, 2), (2, 3), (1, 0, 0, 1), (1, 1), 1),
         # rows of 16 and more windows: the AVX-512 path (contiguous loads at stride 1, gathers at 2, dilation)
         ((2, 3, 9, 47), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1), ((1, 2, 5, 40), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 0),
         ((1, 2, 7, 45), (2, 3), (1, 2), (0, 1, 1, 0), (1, 2), 0),
         # googlenet's planes (session 11's flat 16-window chunks): 8x8, 4x4 and 2x2 inception pools (3x3/1 pad 1,
         # a chunk spanning 4 planes at 2x2), its stem's 32x32 -> 16x16 and 4x4 -> 2x2 ceil pools, a 1x1 plane
         ((2, 5, 8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), ((3, 7, 4, 4), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
         ((3, 5, 2, 2), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1), ((2, 3, 32, 32), (3, 3), (2, 2), (0, 0, 0, 0), (1, 1), 1),
         ((3, 5, 4, 4), (2, 2), (2, 2), (0, 0, 0, 0), (1, 1), 1), ((5, 7, 1, 1), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 0)]


@pytest.mark.parametrize("case", POOLS, ids=str)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_is_onnxruntimes_values_and_indices(case, ties):
    """MaxPoolIdx against onnxruntime's own 2-output MaxPool (values and indices, exactly) and PyTorch's values;
    MaxPoolIdxGrad against onnxruntime's MaxPoolGrad on those indices (exactly: the same adds in the same order)."""
    from onnx import TensorProto, helper

    shape, k, st, pads, dil, ceil = case
    rng = np.random.default_rng(4)
    x = (rng.integers(-3, 3, shape) if ties else rng.standard_normal(shape)).astype(np.float32)
    attrs = dict(kernel_shape=list(k), strides=list(st), pads=list(pads), dilations=list(dil), ceil_mode=ceil)
    vi = helper.make_tensor_value_info
    g = helper.make_graph([helper.make_node("MaxPool", ["x"], ["y", "i"], **attrs)], "g",
                          [vi("x", TensorProto.FLOAT, None)], [vi("y", TensorProto.FLOAT, None), vi("i", TensorProto.INT64, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    y0, i0 = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    g.node[0].CopyFrom(helper.make_node("MaxPoolIdx", ["x"], ["y", "i"], domain=kernels.DOMAIN, kh=k[0], kw=k[1],
                                        sh=st[0], sw=st[1], ph=pads[0], pw=pads[1], dh=dil[0], dw=dil[1],
                                        ph_end=pads[2], pw_end=pads[3], ceil_mode=ceil))
    m.opset_import.append(helper.make_opsetid(kernels.DOMAIN, 1))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    kernels.register(so)
    y1, i1 = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert i1.dtype == np.int64 and np.array_equal(y1, y0) and np.array_equal(i1, i0)
    if pads[0] == pads[2] and pads[1] == pads[3] and 2 * max(pads) <= min(k):   # (what PyTorch accepts)
        ref = torch.nn.functional.max_pool2d(torch.from_numpy(x), k, st, (pads[0], pads[1]), dil, ceil_mode=bool(ceil))
        assert np.array_equal(y1, ref.numpy())
    # the gradient: overlapping windows (stride < kernel) add several dY elements into one dX element
    dy = rng.standard_normal(y0.shape).astype(np.float32)
    ref = np.zeros(x.size, np.float32)
    plane = np.repeat(np.arange(shape[0] * shape[1]), y0[0, 0].size)
    inside = i0.ravel() // x[0, 0].size == plane   # a window over padding only (ceil mode) has no input element
    assert inside.all() or ceil
    np.add.at(ref, i0.ravel()[inside], dy.ravel()[inside])   # unbuffered, in dY's order
    grad = helper.make_graph([helper.make_node("Shape", ["x"], ["s"]),
                              helper.make_node("MaxPoolIdxGrad", ["dy", "i", "s"], ["dx"], domain=kernels.DOMAIN)], "g",
                             [vi("x", TensorProto.FLOAT, None), vi("dy", TensorProto.FLOAT, None), vi("i", TensorProto.INT64, None)],
                             [vi("dx", TensorProto.FLOAT, None)])
    gm = helper.make_model(grad, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    gm.ir_version = 8
    dx = ort.InferenceSession(gm.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "dy": dy, "i": i1})[0]
    assert dx.shape == x.shape and np.array_equal(dx.ravel(), ref)


# (X shape, kernel, stride, pad, ceil_mode) as PyTorch writes them: googlenet's pools at small batch, odd sizes
# (plane sizes that are not multiples or divisors of the 16-window chunk, so chunks start mid-plane and mid-row;
# (3, 3, 5, 5)'s 25-window planes over 9 planes take the scalar loop, as do POOLS' (2, 3, 7, 7) and (1, 2, 7, 45))
TORCH_POOLS = [((2, 5, 8, 8), 3, 1, 1, True), ((3, 7, 4, 4), 3, 1, 1, True), ((3, 5, 2, 2), 3, 1, 1, True),
               ((2, 3, 32, 32), 3, 2, 0, True), ((3, 5, 4, 4), 2, 2, 0, True), ((2, 3, 7, 9), 3, 2, 1, True),
               ((3, 3, 5, 5), 3, 1, 1, False), ((2, 5, 13, 11), 3, 2, 0, False), ((2, 3, 6, 5), 2, 1, 0, True)]


@pytest.mark.parametrize("case", TORCH_POOLS, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_max_pool_against_torch_indices_and_backward(case, threads):
    """MaxPoolIdx's values and indices are PyTorch's max_pool2d(return_indices=True) (its in-plane indices offset by
    the plane, on ties too), and MaxPoolIdxGrad's dX is PyTorch's backward through it, on 1 and 2 threads."""
    from onnx import TensorProto, helper

    shape, k, st, p, ceil = case
    rng = np.random.default_rng(11)
    vi = helper.make_tensor_value_info
    g = helper.make_graph([helper.make_node("MaxPoolIdx", ["x"], ["y", "i"], domain=kernels.DOMAIN, kh=k, kw=k, sh=st,
                                            sw=st, ph=p, pw=p, dh=1, dw=1, ph_end=p, pw_end=p, ceil_mode=int(ceil)),
                           helper.make_node("Shape", ["x"], ["s"]),
                           helper.make_node("MaxPoolIdxGrad", ["dy", "i", "s"], ["dx"], domain=kernels.DOMAIN)], "g",
                          [vi("x", TensorProto.FLOAT, None), vi("dy", TensorProto.FLOAT, None)],
                          [vi("y", TensorProto.FLOAT, None), vi("i", TensorProto.INT64, None), vi("dx", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    m.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    kernels.register(so)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for ties in (False, True):
        x = (rng.integers(-2, 2, shape) if ties else rng.standard_normal(shape)).astype(np.float32)
        xt = torch.from_numpy(x).requires_grad_()
        yt, it = torch.nn.functional.max_pool2d(xt, k, st, p, ceil_mode=ceil, return_indices=True)
        dy = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
        yt.backward(torch.from_numpy(dy))
        y, i, dx = sess.run(None, {"x": x, "dy": dy})
        planes = np.arange(shape[0] * shape[1]).reshape(shape[0], shape[1], 1, 1) * shape[2] * shape[3]
        assert np.array_equal(y, yt.detach().numpy()) and np.array_equal(i, it.numpy() + planes)
        # the same dY elements added into each dX element: at most ceil(k / st)^2 terms, in dY's order here
        bound = 4 * np.finfo(np.float32).eps * ((k + st - 1) // st) ** 2 * float(np.abs(dy).max())
        assert dx.shape == x.shape and np.abs(dx - xt.grad.numpy()).max() <= bound


@pytest.mark.parametrize("shape", [(7,), (3, 5, 11, 13), (2, 16, 40, 40)])
@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic_ops_bitwise(shape, threads):
    """FakeQuantize = the noiseless chain (with the activation quantizer's slack bounds), MinMax = min and max,
    ReluGrad = dY where X > 0 else 0."""
    x, mn, s, hi = operands(shape, levels=15.0)
    slack_hi = np.array(15.49, np.float32)
    y = session("FakeQuantize", threads, lo=-0.49).run(None, dict(x=x, mn=mn, s=s, hi=slack_hi))[0]
    assert np.array_equal(y, chain_ref(x, mn, s, -0.49, slack_hi, np.zeros_like(x)))
    x[tuple(k // 2 for k in shape)] = -1e30   # extremes away from the first chunk's first element
    x.reshape(-1)[-1] = 1e30
    lo, top = session("MinMax", threads).run(None, dict(x=x))
    assert lo.shape == () and top.shape == () and lo == x.min() and top == x.max()
    dy = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    x.reshape(-1)[:3] = 0.0   # X = 0 passes no gradient
    dx = session("ReluGrad", threads).run(None, dict(dy=dy, x=x))[0]
    assert np.array_equal(dx, np.where(x > 0, dy, np.float32(0))) and not np.signbit(dx[x <= 0]).any()


def test_min_max_refuses_an_empty_tensor():
    with pytest.raises(Exception, match="empty"):
        session("MinMax", 1).run(None, dict(x=np.zeros((0, 3), np.float32)))


@pytest.mark.parametrize("threads", [1, 2])
def test_generator_is_the_reference_stream(threads):
    """Call c of a node draws noise_ref(G, salt, c): reproducible, fresh every call, whatever the thread count."""
    x, mn, s, hi = operands((4, 8, 33, 31), seed=2, levels=63.0)
    kernels.set_seed(1234)
    sess = session("SRQuantize", threads, lo=0.0, salt=77)
    feeds = dict(x=x, mn=mn, s=s, hi=hi)
    outs = [sess.run(None, feeds)[0] for _ in range(3)]
    for call, y in enumerate(outs):
        assert np.array_equal(y, chain_ref(x, mn, s, 0.0, hi, noise_ref(1234, 77, call, x.size))), call
    assert not np.array_equal(outs[0], outs[1])
    kernels.set_seed(1235)
    assert not np.array_equal(session("SRQuantize", threads, lo=0.0, salt=77).run(None, feeds)[0], outs[0])


def test_generator_statistics():
    """The stream is U(-0.5, 0.5): moments, a 64-bin histogram, no lag, same-hash, cross-salt or cross-call
    correlation."""
    n = 1 << 20
    a, b, c = noise_ref(5, 1, 0, n), noise_ref(5, 2, 0, n), noise_ref(5, 1, 1, n)
    assert abs(a.mean()) < 5 * np.sqrt(1 / 12 / n) and abs(a.var() - 1 / 12) < 1e-3
    assert a.min() >= -0.5 and a.max() < 0.5
    counts = np.histogram(a, bins=64, range=(-0.5, 0.5))[0]
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 63 + 5 * np.sqrt(2 * 63)   # mean 63, sd sqrt(126)
    for other in (a[1:], b[:-1], c[:-1]):
        assert abs(np.corrcoef(a[:-1], other)[0, 1]) < 5 / np.sqrt(n)
    pairs = a.reshape(-1, 32)   # the two noises cut from one hash (elements l and l + 16 of a block of 32)
    assert abs(np.corrcoef(pairs[:, :16].ravel(), pairs[:, 16:].ravel())[0, 1]) < 5 / np.sqrt(n / 2)


def test_stochastic_rounding_is_unbiased():
    """E[q] = x: a value 0.3 of a level rounds up 30% of the time."""
    n = 1 << 18
    kernels.set_seed(9)
    x = np.full(n, 0.3, np.float32)
    y = session("SRQuantize", 2, lo=0.0, salt=3).run(None, dict(x=x, mn=np.array(0, np.float32), s=np.array(1, np.float32), hi=np.array(7, np.float32)))[0]
    assert set(np.unique(y)) == {0.0, 1.0}
    assert abs(y.mean() - 0.3) < 5 * np.sqrt(0.21 / n)


def test_salt_is_stable_and_distinct():
    assert salt("/conv1/Conv::bwq") == salt("/conv1/Conv::bwq") and salt("/conv1/Conv::bwq") != salt("/conv2/Conv::bwq")
    assert 0 <= salt("x") < 2 ** 63


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """ConvZoo with fused ops off and on; conv-grad-w, bn-grad, bn-relu, int-gemm, bias-grad, quant-bits (which makes each
    fused quantizer its *Bits form: tests/passes/test_quant_bits.py) and nchwc-conv (not bitwise: its forms put
    ConvZoo's depthwise conv on fracgraph's DepthwiseConv; each has its own tests) left out."""
    skip = {"skip_passes": ("conv-grad-w", "bn-grad", "bn-relu", "int-gemm", "nchwc-conv", "quant-bits", "bias-grad")}
    return build_pair(ConvZoo(), tmp_path_factory.mktemp("fused"), (2, 3, 9, 9),
                      off={"fused_kernels": False, **skip}, on={"fused_kernels": True, **skip})


@pytest.mark.parametrize("bits", [(8, 8, 8), (4, 4, 6), (8, 8, 2)])
def test_pass_keeps_loss_and_every_gradient_bitwise(pair, bits):
    """Same (exposed, seeded) noise: the fused step's loss and gradients are bitwise those of the op chain."""
    loss0, grads0, noise0 = _step(pair[False][0], bits)
    loss1, grads1, noise1 = _step(pair[True][0], bits)
    assert noise0.keys() == noise1.keys() and all(np.array_equal(noise0[k], noise1[k]) for k in noise0)
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys()
    for name, g in grads0.items():
        assert np.array_equal(grads1[name], g), name


def test_pass_structure(pair):
    art, manifest = pair[True]
    assert manifest.extra["custom_ops"] == kernels.DOMAIN and pair[False][1].extra["custom_ops"] is None
    model = onnx.load(str(art / "training_model.onnx"))
    ops = [n.op_type for n in all_nodes(model.graph)]
    assert ops.count("SRQuantizeNoise") == 8 and "SRQuantize" not in ops   # noise exposed: read from the tensor
    # every conv input and weight; act + error ranges, the weights' per-channel ranges
    assert ops.count("FakeQuantize") == 16 and ops.count("MinMax") == 16 and ops.count("MinMaxRows") == 8
    assert ops.count("ReluGrad") == 7 and "Round" not in ops and "QuantizeLinear" not in ops
    assert not any(n.op_type == "ReluGrad" and n.domain != kernels.DOMAIN for n in all_nodes(model.graph))
    assert "[fused-ops] 24 quantizers, 24 range statistics and 7 ReluGrad on fracgraph's fused ops" in manifest.extra["notes"]


def test_artifacts_without_fused_ops_need_no_library(pair, monkeypatch):
    """--no-fused-kernels artifacts train where no compiler is: the session never asks for the library."""
    monkeypatch.setattr(kernels, "library_path", lambda: (_ for _ in ()).throw(AssertionError("library needed")))
    loss, _, _ = _step(pair[False][0], (8, 8, 8))
    assert np.isfinite(loss)


def test_no_compiler(pair, tmp_path, monkeypatch):
    """Without a C compiler quantize keeps onnxruntime's ops and says so; fused artifacts refuse in one line."""
    from fracgraph.build import build_artifacts
    from fracgraph.errors import FracgraphError
    from fracgraph.runtime import TrainSession

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    manifest = build_artifacts(pair[True][1].source_model, tmp_path / "art")
    assert manifest.extra["custom_ops"] is None
    assert any(n.startswith("fused-ops: the step stays on onnxruntime's own ops") and "C compiler" in n
               for n in manifest.extra["notes"])
    with pytest.raises(FracgraphError, match="C compiler"):
        TrainSession(pair[True][0])


def test_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch):
    """A cache directory that cannot be created says so and how to fix it (no traceback from the build)."""
    from fracgraph.errors import FracgraphError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FRACGRAPH_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(FracgraphError, match="FRACGRAPH_CACHE_DIR"):
        kernels.library_path()


def test_cache_key_covers_headers(tmp_path, monkeypatch):
    """A header the sources include (ort_abi.h) is part of the library's cache key, like the sources."""
    cc = kernels._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    assert [h.name for h in kernels.HEADERS] == ["ort_abi.h"]
    head = tmp_path / "ort_abi.h"
    head.write_text(kernels.HEADERS[0].read_text())
    monkeypatch.setattr(kernels, "HEADERS", [head])
    before = kernels.cache_key(cc)
    head.write_text(head.read_text() + "\n/* changed */\n")
    assert kernels.cache_key(cc) != before


class PoolNet(torch.nn.Module):
    """resnet18's stem pattern at a test's size: conv, ReLU, 3x3/2 max pool (padded), and a 2x2 pool."""

    def __init__(self):
        super().__init__()
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.c0(x)), 3, 2, 1)
        x = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2, 2, ceil_mode=True)   # 5x5 -> 3x3
        return self.fc(x.mean((2, 3)))


def test_max_pool_step_bitwise(tmp_path):
    skip = {"skip_passes": ("conv-grad-w", "bn-grad", "nchwc-conv", "int-gemm")}   # (IntConv sums in another order)
    pair = build_pair(PoolNet(), tmp_path, (2, 3, 9, 9), off={"fused_kernels": False, **skip},
                      on={"fused_kernels": True, **skip})
    ops = [n.op_type for n in onnx.load(str(pair[True][0] / "training_model.onnx")).graph.node]
    assert ops.count("MaxPoolIdx") == 2 and "MaxPool" not in ops and ops.count("MaxPoolIdxGrad") == 2
    assert "MaxPoolGrad" not in ops
    loss0, grads0, _ = _step(pair[False][0], (8, 8, 8))
    loss1, grads1, _ = _step(pair[True][0], (8, 8, 8))
    assert loss0 == loss1 and grads0.keys() == grads1.keys()
    assert all(np.array_equal(grads1[k], g) for k, g in grads0.items())
