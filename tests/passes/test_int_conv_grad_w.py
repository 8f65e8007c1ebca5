"""The conv weight gradient on integer codes (fracgraph/kernels/int_gemm.c `IntConvGradW`) against a numpy float64
weight gradient of the same fake-quantized operands, on every path this CPU has (FRACGRAPH_INT_ISA forces each).

The error dY comes from the BW quantizer (stochastic rounding, per tensor: dY = s_g g + m_g) and the activation X
from the FW quantizer (per tensor: X = s_x q + m_x). The integer sum is exact; what differs from the float64
reference is the fake-quant values' own float32 rounding (a few ulps of max|dY| and max|X| per product) and the
double rescale, so over a reduction of R = N Ho Wo products the error is far below 2^-20 R max|dY| max|X|, while one
wrong code moves an entry by about s_g max|X| (a test below checks that this is well above the bound).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from fracgraph import kernels  # noqa: E402

from conftest import custom_op_session  # noqa: E402

PATHS = ["amx", "vnni", "avx2", "scalar"]


def available(path: str) -> bool:
    return kernels.int_path_available(path)


def skip_unless(path: str) -> None:
    if not available(path):
        pytest.skip(f"this CPU's build has no {path} path" + (" (needs AMX-INT8 and Linux's permission for the tile "
                                                              "state)" if path == "amx" else ""))


def fq_act(x, bits):
    """The FW quantizer's chain in float32 (per tensor): value, min, scale."""
    mn, mx = np.float32(x.min()), np.float32(x.max())
    levels = np.float32(2.0 ** bits - 1)
    s = np.float32(max((mx - mn) / levels, np.float32(1e-8)))
    q = np.round(np.clip((x - mn) / s, np.float32(-0.49), levels + np.float32(0.49))).astype(np.float32)
    return (q * s + mn).astype(np.float32), np.float32(mn), s


def fq_err(g, bits, rng):
    """The BW quantizer's chain in float32: U(-0.5, 0.5) noise before rounding, clamped to [0, levels]."""
    mn, mx = np.float32(g.min()), np.float32(g.max())
    levels = np.float32(2.0 ** bits - 1)
    s = np.float32(max((mx - mn) / levels, np.float32(1e-8)))
    noise = (rng.random(g.shape, dtype=np.float32) - np.float32(0.5)).astype(np.float32)
    q = np.round(np.clip((g - mn) / s + noise, np.float32(0), levels)).astype(np.float32)
    return (q * s + mn).astype(np.float32), np.float32(mn), s


def conv_out(h, k, s, p, d):
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


def reference_dw(dy, x, k, stride, pad, dil):
    """dW[k, c, a, b] = sum_{n, ho, wo} dY[n, k, ho, wo] X_padded[n, c, ho s + a d, wo s + b d], in float64."""
    n, c, h, w = x.shape
    ho, wo = dy.shape[2:]
    reach_h, reach_w = (ho - 1) * stride + (k - 1) * dil + 1, (wo - 1) * stride + (k - 1) * dil + 1
    xp = np.zeros((n, c, max(reach_h, h + pad), max(reach_w, w + pad)))
    xp[:, :, pad:pad + h, pad:pad + w] = x
    dyd = dy.astype(np.float64)
    out = np.zeros((dy.shape[1], c, k, k))
    for a in range(k):
        for b in range(k):
            xs = xp[:, :, a * dil:a * dil + (ho - 1) * stride + 1:stride, b * dil:b * dil + (wo - 1) * stride + 1:stride]
            out[:, :, a, b] = np.einsum("nkhw,nchw->kc", dyd, xs)
    return out


def int_dw(dy, gm, gs, x, xm, xs, k, stride, pad, dil, threads=2):
    sess = custom_op_session("IntConvGradW", ["dy", "gm", "gs", "x", "xm", "xs"], ["dw"], threads=threads,
                             kh=k, kw=k, sh=stride, sw=stride, ph=pad, pw=pad, dh=dil, dw=dil)
    arr = lambda v: np.asarray(v, np.float32)  # noqa: E731
    return sess.run(None, {"dy": dy, "gm": arr(gm), "gs": arr(gs), "x": x, "xm": arr(xm), "xs": arr(xs)})[0]


def operands(case, act_bits, grad_bits, seed=0):
    n, c, h, kout, k, stride, pad, dil = case
    rng = np.random.default_rng([seed, *case, act_bits, grad_bits])
    ho = conv_out(h, k, stride, pad, dil)
    x = rng.standard_normal((n, c, h, h)) * 1.5 + 0.3
    x = (x if c == 3 else np.maximum(x, 0)).astype(np.float32)   # the stem's image has a negative min, others ReLU's 0
    g = (rng.standard_normal((n, kout, ho, ho)) * 1e-3).astype(np.float32)
    xq, xm, xs = fq_act(x, act_bits)
    gq, gm, gs = fq_err(g, grad_bits, rng)
    return gq, gm, gs, xq, xm, xs


# (N, C, H, K, kernel, stride, pad, dilation): the speed passes' shape classes (3x3 stride 1 and 2, 1x1 stride 1
# and 2, padded, the 3-channel stem, channel counts off the vector width, 1x1 maps, dilation, 5x5) and every
# register tile (K = 16: 16 rows x 16 channels; 32, 64: 8 x 32; 40 and 10: a last 8 x 16); N = 20 splits the batch
# over tasks
CASES = [
    (3, 16, 8, 16, 3, 1, 1, 1),
    (20, 16, 8, 32, 3, 2, 1, 1),
    (2, 16, 8, 32, 1, 2, 0, 1),
    (2, 32, 6, 64, 1, 1, 0, 1),
    (2, 3, 9, 16, 3, 1, 1, 1),
    (3, 20, 5, 10, 3, 1, 1, 1),
    (2, 8, 1, 24, 3, 1, 1, 1),
    (2, 12, 7, 40, 3, 1, 2, 2),
    (1, 5, 11, 7, 5, 2, 2, 1),
    (2, 6, 8, 16, 3, 2, 0, 1),    # unpadded stride 2: the last input row and column are never read
    # the amx path runs convs on >= 16 channels on its tiles (fewer: the vnni tiles): its shape classes again
    (2, 16, 9, 16, 3, 1, 2, 2),
    (1, 17, 11, 7, 5, 2, 2, 1),
    (2, 16, 1, 24, 3, 1, 1, 1),
    (2, 40, 6, 48, 3, 1, 1, 1),   # 3 channel blocks (the last partial) x 3 output blocks (a pair and one alone)
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("bits", [(8, 8), (4, 6)], ids=["a8g8", "a4g6"])
def test_kernel_matches_float64_weight_gradient(monkeypatch, path, case, bits):
    skip_unless(path)
    monkeypatch.setenv("FRACGRAPH_INT_ISA", path)
    monkeypatch.setenv("FRACGRAPH_AMX_MIN_CHANNELS", "1")   # amx: every shape on the AMX tiles (default: 16 / 32)
    gq, gm, gs, xq, xm, xs = operands(case, *bits)
    n, c, h, kout, k, stride, pad, dil = case
    dw = int_dw(gq, gm, gs, xq, xm, xs, k, stride, pad, dil)
    if path == "amx" and available("vnni"):   # the same integer sums and rescale: bitwise the vnni path's output
        monkeypatch.setenv("FRACGRAPH_INT_ISA", "vnni")
        np.testing.assert_array_equal(dw, int_dw(gq, gm, gs, xq, xm, xs, k, stride, pad, dil))
    ref = reference_dw(gq, xq, k, stride, pad, dil)
    assert dw.shape == ref.shape == (kout, c, k, k)
    r = n * gq.shape[2] * gq.shape[3]
    bound = 2.0 ** -20 * r * np.abs(gq).max() * np.abs(xq).max()
    err = np.abs(dw - ref).max()
    assert err <= bound, (err, bound)
    # one wrong code is well above the bound (the test can fail): one error code off by one moves an entry by
    # s_g times an activation, up to s_g max|x|
    assert gs * np.abs(xq).max() > 8 * bound


def test_paths_agree_exactly():
    """The three paths compute the same integer sums and the same rescale: bitwise equal outputs."""
    gq, gm, gs, xq, xm, xs = operands((5, 24, 9, 48, 3, 1, 1, 1), 8, 8, seed=3)
    outs = {}
    with pytest.MonkeyPatch.context() as mp:
        for path in [p for p in PATHS if available(p)]:
            mp.setenv("FRACGRAPH_INT_ISA", path)
            outs[path] = int_dw(gq, gm, gs, xq, xm, xs, 3, 1, 1, 1)
    first = next(iter(outs.values()))
    for path, y in outs.items():
        np.testing.assert_array_equal(y, first, err_msg=path)


@pytest.mark.parametrize("case", [(2, 8, 19, 16, 3, 1, 1, 1), (3, 5, 21, 24, 3, 2, 1, 1), (1, 20, 35, 8, 3, 1, 1, 1),
                                  (2, 16, 10, 40, 1, 1, 0, 1)], ids=lambda c: "x".join(map(str, c)))
def test_code_recovery_rounds_half_to_even_and_clamps_on_every_path(monkeypatch, case):
    """IntConvGradW recovers both operands' codes as clip(round_half_even((v - m) / s), 0, 255): vectorized (16
    lanes, masked row tails, the error's transpose by gathers) on the vnni/avx2/amx paths, code_of's loops on scalar.
    Operands that are not fake-quantized values (multiples of 1/2 from -8 to 263, m = 0, s = 1: ties and values out
    of range) give every path the same output, bitwise, and a float64 weight gradient of numpy's codes to the
    output's float32 rounding."""
    n, c, h, kout, k, stride, pad, dil = case
    rng = np.random.default_rng(list(case))
    ho = conv_out(h, k, stride, pad, dil)
    x = (rng.integers(-16, 527, (n, c, h, h)) / 2).astype(np.float32)
    g = (rng.integers(-16, 527, (n, kout, ho, ho)) / 2).astype(np.float32)
    one, zero = np.float32(1), np.float32(0)
    outs = {}
    for path in [p for p in PATHS if available(p)]:
        monkeypatch.setenv("FRACGRAPH_INT_ISA", path)
        monkeypatch.setenv("FRACGRAPH_AMX_MIN_CHANNELS", "1")
        outs[path] = int_dw(g, zero, one, x, zero, one, k, stride, pad, dil)
    assert "scalar" in outs and len(outs) > 1 or pytest.skip("only the scalar path on this CPU")
    for path, y in outs.items():
        np.testing.assert_array_equal(y, outs["scalar"], err_msg=path)
    codes = lambda v: np.clip(np.round(v.astype(np.float64)), 0, 255).astype(np.float32)  # noqa: E731  half to even
    ref = reference_dw(codes(g), codes(x), k, stride, pad, dil)
    # integer operands, m = 0, s = 1: the rescale is exact in double, so only the output's float32 rounding remains
    bound = 2.0 ** -23 * np.abs(ref).max()
    assert np.abs(outs["scalar"] - ref).max() <= bound
    assert 255 > 8 * bound   # a code off by one moves an entry by the other operand's code, up to 255


def test_threads_do_not_change_the_result(monkeypatch):
    monkeypatch.delenv("FRACGRAPH_INT_ISA", raising=False)
    gq, gm, gs, xq, xm, xs = operands((20, 16, 8, 32, 3, 2, 1, 1), 8, 8, seed=4)
    np.testing.assert_array_equal(int_dw(gq, gm, gs, xq, xm, xs, 3, 2, 1, 1, threads=1),
                                  int_dw(gq, gm, gs, xq, xm, xs, 3, 2, 1, 1, threads=2))


@pytest.mark.parametrize("path", PATHS)
def test_large_map_sums_stay_exact(monkeypatch, path):
    """142x142 maps at the extreme codes (x code 255, error code 0, i.e. signed -128): each image's sum is near
    -9.3e8, so the 64 images would run 8 to a task (8 tasks) and overflow int32; the kernel takes at most 3 (its
    int32 bound) and adds the tasks in int64."""
    skip_unless(path)
    monkeypatch.setenv("FRACGRAPH_INT_ISA", path)
    monkeypatch.setenv("FRACGRAPH_AMX_MIN_CHANNELS", "1")   # amx: on the AMX tiles, though the map has one channel
    rng = np.random.default_rng(5)
    x = np.where(rng.random((64, 1, 142, 142)) < 0.999, 1.0, 0.0).astype(np.float32)
    g = np.where(rng.random((64, 1, 142, 142)) < 0.999, -1.0, 1.0).astype(np.float32)
    xq, xm, xs = fq_act(x, 8)
    gq, gm, gs = fq_err(g, 8, rng)
    dw = int_dw(gq, gm, gs, xq, xm, xs, 1, 1, 0, 1)
    ref = reference_dw(gq, xq, 1, 1, 0, 1)
    bound = 2.0 ** -20 * 64 * 142 * 142 * np.abs(gq).max() * np.abs(xq).max()
    assert np.abs(dw - ref).max() <= bound
    assert np.abs(ref).max() > 0.9 * 64 * 142 * 142   # the sums are near the int32 edge, not cancelled away


def test_bad_inputs_fail_in_one_line(monkeypatch):
    one, zero = np.float32(1), np.float32(0)
    x = np.zeros((2, 4, 5, 5), np.float32)
    with pytest.raises(Exception, match="one batch"):
        int_dw(np.zeros((3, 4, 5, 5), np.float32), zero, one, x, zero, one, 1, 1, 0, 1)
    with pytest.raises(Exception, match="must be scalars"):
        int_dw(np.zeros((2, 4, 5, 5), np.float32), np.zeros(4, np.float32), np.ones(4, np.float32), x, zero, one,
               1, 1, 0, 1)
    monkeypatch.setenv("FRACGRAPH_INT_ISA", "sse9")
    with pytest.raises(Exception, match="FRACGRAPH_INT_ISA names a path"):
        int_dw(np.zeros((2, 4, 5, 5), np.float32), zero, one, x, zero, one, 1, 1, 0, 1)


# -- the pass (passes/int_gemm.py): conv weight gradients behind an If on the act and grad bits ---------------------
import onnx  # noqa: E402

from fracgraph.passes.base import all_nodes  # noqa: E402

from test_speed_passes import ConvZoo, _step, assert_same_step, build_pair  # noqa: E402


@pytest.fixture(scope="module")
def dw_builds(tmp_path_factory):
    """ConvZoo without integer kernels and with integer weight gradients only (the forward conv rule left out, so
    that a failing IntConvGradW is the only integer op); its maps are below MIN_DW_POSITIONS and some convs below
    MIN_DW_MACS_PER_CODE, both lifted here, and the pass runs on CPUs without VNNI too."""
    from fracgraph.passes import int_gemm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int_gemm, "MIN_DW_POSITIONS", 0)
        mp.setattr(int_gemm, "MIN_DW_MACS_PER_CODE", 0)
        mp.setattr(int_gemm, "FAST_PATHS", tuple(kernels.INT_PATHS))
        mp.setattr(int_gemm, "RULES", {k: v for k, v in int_gemm.RULES.items() if k != "Conv"})
        # fixed weights: with others an activation code can flip between onnxruntime's and PyTorch's float convs
        # (a value on a rounding boundary), which moves a weight gradient by a quantum, past the tolerance, in
        # either build (seen on the float build's 1x1 stride-2 conv in about one process in three)
        torch.manual_seed(0)
        return build_pair(ConvZoo(), tmp_path_factory.mktemp("intdw"), (2, 3, 9, 9), off={"int_kernels": False}, on={})


def test_pass_structure_and_manifest(dw_builds):
    (off, m_off), (on, m_on) = dw_builds[False], dw_builds[True]
    assert m_off.extra["int_kernels"] is None
    rec = m_on.extra["int_kernels"]
    assert not any(c["int"] for c in rec["convs"])
    decided = {w["name"].split("_Grad/")[0]: w for w in rec["weight_grads"]}
    # c0's float form is onnxruntime's ConvGrad, k5's and dil's im2col-gemm or nhwc-tiles (conv-grad-w's cost model)
    assert {n for n, w in decided.items() if w["int"]} == {"/c0/Conv", "/k5/Conv", "/dil/Conv"}
    assert decided["/pw_s2/Conv"]["reason"] in ("bias gradient", "its bias gradient reads the float form's transposed error")
    assert decided["/pad1x1/Conv"]["reason"] == "ConvGrad computes dX too"   # pads beyond the kernel: not split
    assert decided["/grouped/Conv"]["reason"] in ("grouped", "bias gradient")
    assert "/dw/Conv" not in decided or not decided["/dw/Conv"]["int"]   # depthwise: DepthwiseConvGradW, no entry
    # the float branch is conv-grad-w's pick for the conv, as the manifest records it
    forms = {c["node"].split("_Grad/")[0]: c["form"] for c in m_on.extra["conv_grad_w"]}
    graph = onnx.load(str(on / "training_model.onnx")).graph
    switches = {n.name.split("_Grad/")[0]: n for n in graph.node if n.op_type == "If" and n.name.endswith("::int_dw/switch")}
    assert switches.keys() == {n for n, w in decided.items() if w["int"]}
    kernel_of = {"ConvGradW": "ConvGradW", "im2col-gemm": "ConvGradWCols", "ConvGrad": "ConvGrad",
                 "nhwc-tiles": "ConvGradWNhwc"}
    for name, sw in switches.items():
        branches = {a.name: a.g for a in sw.attribute}
        assert [n.op_type for n in branches["then_branch"].node] == ["IntConvGradW"]
        assert kernel_of[forms[name]] in {n.op_type for n in branches["else_branch"].node}
        assert ".act&" in sw.input[0] and sw.input[0].endswith(".grad::int8")   # the act and grad bits, not the weight's
    # no float weight-gradient node of those convs is left outside the branches
    outer = [n for n in graph.node if n.op_type in ("ConvGradW", "ConvGradWCols", "ConvGrad", "ConvGradWNhwc")]
    assert not any(n.name.split("_Grad/")[0] in switches for n in outer)
    assert sum(n.op_type == "IntConvGradW" for n in all_nodes(graph)) == 3


def test_inspect_lists_the_integer_gemms(dw_builds):
    from typer.testing import CliRunner

    from fracgraph.cli import app
    from fracgraph.inspect import summarize

    on = dw_builds[True][0]
    rows = summarize(str(on))["int_gemms"]
    dw = {r["node"].split("_Grad/")[0]: r for r in rows if r["gemm"] == "weight gradient"}
    assert {n for n, r in dw.items() if r["int"]} == {"/c0/Conv", "/k5/Conv", "/dil/Conv"}
    assert all(r["reason"] for r in rows) and summarize(str(dw_builds[False][0]))["int_gemms"] == []
    r = CliRunner().invoke(app, ["inspect", str(on)], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "integer GEMMs" in r.output and "weight gradient" in r.output


@pytest.mark.parametrize("bits,tol", [((0, 0, 0), 1e-5), ((8, 8, 8), 1e-4), ((4, 4, 6), 1e-4), ((8, 12, 8), 1e-4),
                                      ((8, 8, 16), 1e-4), ((12, 12, 8), 1e-4)])
def test_step_keeps_loss_and_every_gradient(dw_builds, bits, tol):
    """0 bits: the two builds to float rounding; quantized: each build against ConvZoo's replayed PyTorch step (the
    weight gradients on integers at act and grad bits <= 8, whatever the weight bits; at 16-bit errors or 12-bit
    activations the float branch runs)."""
    assert_same_step(dw_builds[False][0], dw_builds[True][0], bits, tol)


def test_switch_follows_act_and_grad_bits_at_run_time(dw_builds, monkeypatch):
    """A path that cannot run makes IntConvGradW fail: the step fails exactly when a conv's act and grad bits are
    both 1..8 (the weight's do not matter), so the switch takes the integer branch there and the float one
    elsewhere."""
    on = dw_builds[True][0]
    monkeypatch.setenv("FRACGRAPH_INT_ISA", "sse9")
    for bits in [(0, 0, 0), (12, 8, 8), (8, 8, 12), (8, 8, 0), (16, 16, 16)]:
        _step(on, bits)
    for bits in [(8, 8, 8), (8, 12, 8), (8, 0, 8), (1, 8, 2)]:
        with pytest.raises(Exception, match="FRACGRAPH_INT_ISA names a path"):
            _step(on, bits)


def test_cost_rules_on_resnet20_shapes():
    """resnet20's 1x1 stride-2 shortcuts keep the float form (5-11 multiply-adds per packed code), its 3x3 convs
    and stem go on integers; maps under 8x8 keep the float form."""
    from fracgraph.passes.int_gemm import decline_dw

    def attrs(k, s):
        return dict(kh=k, kw=k, sh=s, sw=s, ph=k // 2, pw=k // 2, dh=1, dw=1)

    assert "per packed code" in decline_dw(attrs(1, 2), [128, 16, 32, 32], 32)
    assert "per packed code" in decline_dw(attrs(1, 2), [128, 32, 16, 16], 64)
    for k, s, x, ko in [(3, 1, [128, 3, 32, 32], 16), (3, 1, [128, 16, 32, 32], 16), (3, 2, [128, 16, 32, 32], 32),
                        (3, 1, [128, 64, 8, 8], 64)]:
        assert decline_dw(attrs(k, s), x, ko) is None
    assert "output map" in decline_dw(attrs(3, 1), [32, 512, 2, 2], 512)
    assert "int32" in decline_dw(attrs(1, 1), [1, 1, 300, 300], 16)
    assert decline_dw(attrs(3, 1), [None, 16, None, None], 16) == "input shape unknown"


class TileNet(torch.nn.Module):
    """Convs whose float weight gradient is conv-grad-w's ConvGradW tile (16-64 output channels, maps of 8x8 and
    more): stem, 3x3, 3x3 stride 2, at the default cost rules."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c0 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.c1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.c0(x)))
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))



@pytest.fixture(scope="module")
def tile_builds(tmp_path_factory):
    from fracgraph.passes import int_gemm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int_gemm, "FAST_PATHS", tuple(kernels.INT_PATHS))
        mp.setattr(int_gemm, "RULES", {k: v for k, v in int_gemm.RULES.items() if k != "Conv"})
        return build_pair(TileNet(), tmp_path_factory.mktemp("intdw_tile"), (2, 3, 16, 16), off={"int_kernels": False},
                          on={})


@pytest.mark.parametrize("bits", [(8, 8, 8), (4, 8, 6), (8, 12, 8), (12, 8, 8)])
def test_tile_form_step_equals_the_float_one(tile_builds, bits):
    """A weight gradient is read by no error quantizer, so with only the weight gradients on integers every error,
    the loss and every other gradient are the float build's bitwise, and the conv weight gradients differ by float
    summation order only (the integer sum is exact, the float one rounds)."""
    (off, _), (on, m_on) = tile_builds[False], tile_builds[True]
    forms = {c["node"].split("_Grad/")[0]: c["form"] for c in m_on.extra["conv_grad_w"]}
    ints = {w["name"].split("_Grad/")[0] for w in m_on.extra["int_kernels"]["weight_grads"] if w["int"]}
    assert ints == {"/c0/Conv", "/c1/Conv", "/c2/Conv"} and forms["/c1/Conv"] == forms["/c2/Conv"] == "ConvGradW"
    shape = (4, 3, 16, 16)
    loss0, grads0, noise0 = _step(off, bits, shape)
    loss1, grads1, noise1 = _step(on, bits, shape)
    assert loss0 == loss1 and all(np.array_equal(noise0[k], noise1[k]) for k in noise0)
    for name, g in grads0.items():
        if name.startswith(("c0.", "c1.", "c2.")) and name.endswith("weight"):
            err = np.abs(grads1[name] - g).max() / np.abs(g).max()
            assert err <= 1e-5, (name, err)
        else:
            np.testing.assert_array_equal(grads1[name], g, err_msg=name)
