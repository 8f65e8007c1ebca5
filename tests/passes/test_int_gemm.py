"""Integer convolution (fracgraph/kernels/int_gemm.c, passes/int_gemm.py): the kernel against a float64 conv of
the same fake-quantized operands, on every path this CPU has (FRACGRAPH_INT_ISA forces each), and the pass.

The bound: the integer sum is exact, so the kernel's error is the float rescale of int32 sums and correction
terms, each at most K * max|x| * max|w| in size (K = C * kh * kw, the reduction length), plus the fake-quant
values' own rounding (one ulp each); the FP32 conv it replaces errs by up to K ulps of the same size. Both are
far below 2^-20 * K * max|x| * max|w|, while one wrong code moves an output by about max|x| * max|w| / 255.
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
    import ctypes

    lib = ctypes.CDLL(str(kernels.library_path()))
    return bool(lib.fg_int_isa_available({"scalar": 0, "avx2": 1, "vnni": 2, "amx": 3}[path]))


def skip_unless(path: str) -> None:
    if not available(path):
        pytest.skip(f"this CPU's build has no {path} path" + (" (needs AMX-INT8 and Linux's permission for the tile "
                                                              "state)" if path == "amx" else ""))


def fake_quant(x, bits, axes=None):
    """quantizers.py's chain in float32 (per tensor, or per output channel over `axes`): value, min, scale."""
    mn = x.min(axis=axes, keepdims=axes is not None).astype(np.float32)
    mx = x.max(axis=axes, keepdims=axes is not None).astype(np.float32)
    levels = np.float32(2.0 ** bits - 1)
    s = np.maximum((mx - mn) / levels, np.float32(1e-8)).astype(np.float32)
    q = np.round(np.clip((x - mn) / s, -0.49, levels + np.float32(0.49))).astype(np.float32) * s + mn
    return q.astype(np.float32), np.asarray(mn, np.float32), np.asarray(s, np.float32)


def int_conv(xq, mx, sx, wq, mw, sw, kernel, stride, pad, dilation, threads=2):
    kh, kw = kernel
    sess = custom_op_session("IntConv", ["x", "mx", "sx", "w", "mw", "sw"], ["y"], threads=threads,
                             kh=kh, kw=kw, sh=stride, sw=stride, ph=pad, pw=pad, dh=dilation, dw=dilation)
    return sess.run(None, {"x": xq, "mx": mx, "sx": sx, "w": wq, "mw": mw, "sw": sw})[0]


def reference(xq, wq, stride, pad, dilation):
    return torch.nn.functional.conv2d(torch.from_numpy(xq).double(), torch.from_numpy(wq).double(),
                                      stride=stride, padding=pad, dilation=dilation).numpy()


# (N, C, H, K, kernel, stride, pad, dilation): the speed passes' shape classes (3x3, 1x1, strided 3x3 and 1x1,
# a 3-channel stem, tiny maps, channel counts off the vector width, dilation)
CASES = [
    (3, 16, 8, 16, 3, 1, 1, 1),
    (2, 16, 8, 32, 3, 2, 1, 1),
    (2, 16, 8, 32, 1, 2, 0, 1),
    (2, 32, 6, 16, 1, 1, 0, 1),
    (2, 3, 9, 16, 3, 1, 1, 1),
    (3, 20, 2, 10, 3, 1, 1, 1),
    (2, 8, 1, 24, 3, 1, 1, 1),
    (2, 12, 7, 20, 3, 1, 2, 2),
    (1, 5, 11, 7, 5, 2, 2, 1),
    # the amx path runs convs on >= 16 channels on its tiles (fewer: the vnni tiles): its shape classes again
    (2, 16, 9, 16, 3, 1, 2, 2),
    (1, 17, 11, 7, 5, 2, 2, 1),
    (2, 16, 1, 24, 3, 1, 1, 1),
    (2, 72, 5, 20, 3, 1, 1, 1),   # two reduction chunks of 64 channels, the second partial
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_float64_conv(monkeypatch, path, case, bits):
    skip_unless(path)
    monkeypatch.setenv("FRACGRAPH_INT_ISA", path)
    monkeypatch.setenv("FRACGRAPH_AMX_MIN_CHANNELS", "1")   # amx: every shape on the AMX tiles (default: 16 / 32)
    n, c, h, k, ks, stride, pad, dil = case
    rng = np.random.default_rng(hash(case) % 2**32 + bits)
    x = (rng.standard_normal((n, c, h, h)) * 1.5 + 0.3).astype(np.float32)
    w = (rng.standard_normal((k, c, ks, ks)) * 0.2).astype(np.float32)
    xq, mx, sx = fake_quant(x, bits)
    wq, mw, sw = fake_quant(w, bits, axes=(1, 2, 3))
    y = int_conv(xq, mx, sx, wq, mw.reshape(k, 1, 1, 1), sw.reshape(k, 1, 1, 1), (ks, ks), stride, pad, dil)
    if path == "amx" and available("vnni"):   # the same integer sums and rescale: bitwise the vnni path's output
        monkeypatch.setenv("FRACGRAPH_INT_ISA", "vnni")
        np.testing.assert_array_equal(y, int_conv(xq, mx, sx, wq, mw.reshape(k, 1, 1, 1), sw.reshape(k, 1, 1, 1),
                                                  (ks, ks), stride, pad, dil))
    ref = reference(xq, wq, stride, pad, dil)
    assert y.shape == ref.shape
    bound = 2.0 ** -20 * c * ks * ks * np.abs(xq).max() * np.abs(wq).max()
    err = np.abs(y - ref).max()
    assert err <= bound, (err, bound)
    # one wrong code is well above the bound (the test can fail): shift one weight by a quantization step
    assert np.abs(sw).min() * np.abs(xq).max() > 8 * bound


def test_paths_agree_exactly_on_integer_sums(monkeypatch):
    """The three paths compute the same int32 sums and the same float rescale: bitwise equal outputs."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 24, 9, 9)).astype(np.float32)
    w = (rng.standard_normal((40, 24, 3, 3)) * 0.1).astype(np.float32)
    xq, mx, sx = fake_quant(x, 8)
    wq, mw, sw = fake_quant(w, 8, axes=(1, 2, 3))
    outs = {}
    for path in [p for p in PATHS if available(p)]:
        monkeypatch.setenv("FRACGRAPH_INT_ISA", path)
        outs[path] = int_conv(xq, mx, sx, wq, mw.reshape(-1, 1, 1, 1), sw.reshape(-1, 1, 1, 1), (3, 3), 1, 1, 1)
    first = next(iter(outs.values()))
    for path, y in outs.items():
        np.testing.assert_array_equal(y, first, err_msg=path)


@pytest.mark.parametrize("case", [(2, 8, 19, 16, 3, 1, 1, 1), (2, 5, 21, 16, 3, 2, 1, 1), (1, 6, 35, 8, 3, 1, 1, 1),
                                  (1, 40, 13, 32, 3, 1, 1, 1)], ids=lambda c: "x".join(map(str, c)))
def test_code_recovery_rounds_half_to_even_and_clamps_on_every_path(monkeypatch, case):
    """IntConv recovers the codes as clip(round_half_even((x - m) / s), 0, 255): vectorized (16 lanes, masked row
    tails) on the vnni/avx2/amx paths, code_of's loop on scalar. Activations that are not fake-quantized values
    (multiples of 1/2 from -8 to 263 with m = 0, s = 1: ties and values out of range) give every path the same
    output, bitwise, within the bound of a float64 conv of numpy's codes."""
    n, c, h, k, ks, stride, pad, dil = case
    rng = np.random.default_rng(list(case))
    x = (rng.integers(-16, 527, (n, c, h, h)) / 2).astype(np.float32)
    w = (rng.standard_normal((k, c, ks, ks)) * 0.2).astype(np.float32)
    wq, mw, sw = fake_quant(w, 8, axes=(1, 2, 3))
    mx, sx = np.asarray(0, np.float32), np.asarray(1, np.float32)
    outs = {}
    for path in [p for p in PATHS if available(p)]:
        monkeypatch.setenv("FRACGRAPH_INT_ISA", path)
        monkeypatch.setenv("FRACGRAPH_AMX_MIN_CHANNELS", "1")
        outs[path] = int_conv(x, mx, sx, wq, mw.reshape(k, 1, 1, 1), sw.reshape(k, 1, 1, 1), (ks, ks), stride, pad, dil)
    assert "scalar" in outs and len(outs) > 1 or pytest.skip("only the scalar path on this CPU")
    for path, y in outs.items():
        np.testing.assert_array_equal(y, outs["scalar"], err_msg=path)
    codes = np.clip(np.round(x.astype(np.float64)), 0, 255).astype(np.float32)   # numpy rounds half to even
    ref = reference(codes, wq, stride, pad, dil)
    bound = 2.0 ** -20 * c * ks * ks * 255 * np.abs(wq).max()
    assert np.abs(outs["scalar"] - ref).max() <= bound
    assert np.abs(wq).max() > 8 * bound   # a code off by one under the largest weight moves an output by max|w|


def test_unknown_or_missing_path_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("FRACGRAPH_INT_ISA", "sse9")
    x = np.zeros((1, 4, 3, 3), np.float32)
    w = np.zeros((4, 4, 1, 1), np.float32)
    one = np.ones((4, 1, 1, 1), np.float32)
    with pytest.raises(Exception, match="FRACGRAPH_INT_ISA names a path"):
        int_conv(x, np.zeros((), np.float32), np.ones((), np.float32), w, one * 0, one, (1, 1), 1, 0, 1)


# -- the pass ----------------------------------------------------------------------------------------------------
from fracgraph.errors import FracgraphError  # noqa: E402
from fracgraph.passes.base import all_nodes  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402

from test_speed_passes import ConvZoo, _step, assert_same_step, build_pair  # noqa: E402


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """ConvZoo (stem, depthwise, grouped with bias, 1x1 strided with bias, 5x5, dilated, 1x1 with pads) without and
    with integer convs; its convs are too small for the cost rule (MIN_MACS_PER_CODE), which is lifted here so
    that the 1x1, strided and biased forms run on IntConv too."""
    from fracgraph.passes import int_gemm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int_gemm, "MIN_MACS_PER_CODE", 0)
        mp.setattr(int_gemm, "MIN_POSITIONS", 0)       # ConvZoo's maps are smaller than 8x8 too
        mp.setattr(int_gemm, "MIN_STRIDED_CHANNELS", 0)   # and a strided stem would stay float
        mp.setattr(int_gemm, "FAST_PATHS", tuple(kernels.INT_PATHS))   # the pass on CPUs without VNNI too
        mp.setattr(int_gemm, "MIN_DW_POSITIONS", 10**9)   # forward convs only (weight gradients: test_int_conv_grad_w.py)
        return build_pair(ConvZoo(), tmp_path_factory.mktemp("intgemm"), (2, 3, 9, 9), off={"int_kernels": False}, on={})


def test_without_a_fast_path_the_pass_keeps_every_gemm(small_model, tmp_path, monkeypatch):
    from fracgraph.build import build_artifacts

    monkeypatch.setenv("FRACGRAPH_INT_ISA", "scalar")   # as on a CPU without VNNI
    m = build_artifacts(small_model[1], tmp_path / "art")
    assert m.extra["int_kernels"] is None
    assert any("int-gemm: this CPU's integer path (scalar) is not faster" in n for n in m.extra["notes"])


def test_cost_rule_keeps_convs_with_few_macs_per_code_on_floats():
    from onnx import helper

    from fracgraph.passes.int_gemm import RULES

    def decide(o, k, stride):
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], strides=[stride, stride],
                                pads=[k // 2] * 4)
        return RULES["Conv"].decline(node, [o, 32, k, k])

    assert decide(64, 1, 2) is not None and "multiply-adds per input code" in decide(64, 1, 2)   # resnet20 shortcut
    assert decide(32, 3, 2) is None and decide(16, 3, 1) is None and decide(32, 1, 1) is None
    # maps under 8x8 (resnet18's layer3/layer4 at 64x64) keep the float forms: IntConv's position lanes would idle
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)
    assert "output map" in RULES["Conv"].decline(node, [512, 512, 3, 3], [32, 512, 2, 2])
    assert "output map" in RULES["Conv"].decline(node, [256, 256, 3, 3], [32, 256, 4, 4])
    assert RULES["Conv"].decline(node, [64, 64, 3, 3], [128, 64, 8, 8]) is None
    # strided stems on 3 channels keep NCHWc's float kernel; resnet20's stride-1 stem goes to IntConv
    stem = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[7, 7], strides=[2, 2], pads=[3] * 4)
    assert "input channel" in RULES["Conv"].decline(stem, [64, 3, 7, 7], [32, 64, 32, 32])
    assert RULES["Conv"].decline(node, [16, 3, 3, 3], [128, 16, 32, 32]) is None


def test_pass_structure_and_manifest(builds):
    import onnx

    (off, m_off), (on, m_on) = builds[False], builds[True]
    assert m_off.extra["int_kernels"] is None
    assert not any(n.op_type == "IntConv" for n in all_nodes(onnx.load(str(off / "training_model.onnx")).graph))
    rec = m_on.extra["int_kernels"]
    assert rec["built_on"] == kernels.int_path() and rec["max_bits"] == 8
    # an AMX build needs only VNNI: the same decisions, and auto takes amx at run time where the CPU has it
    assert rec["path"] == ("vnni" if rec["built_on"] == "amx" else rec["built_on"])
    assert rec["cpu_flag"] == kernels.INT_PATHS[rec["path"]][1]
    decided = {c["name"]: c for c in rec["convs"]}
    assert {n for n, c in decided.items() if c["int"]} == {"/c0/Conv", "/pw_s2/Conv", "/k5/Conv", "/dil/Conv", "/pad1x1/Conv"}
    assert {decided[n]["reason"] for n in ("/dw_s2/Conv", "/grouped/Conv", "/dw/Conv")} == {"grouped"}
    graph = onnx.load(str(on / "training_model.onnx")).graph
    switches = [n for n in graph.node if n.op_type == "If" and n.name.endswith("::int/switch")]
    assert len(switches) == 5
    for sw in switches:
        branches = {a.name: a.g for a in sw.attribute}
        assert [n.op_type for n in branches["then_branch"].node][0] == "IntConv"
        float_ops = {n.op_type for n in branches["else_branch"].node}
        assert "Conv" in float_ops   # plain or NCHWc (with its reorders) as the build's other convs
    # the forward convs of both operands' bits are gone from the outer graph; the dX convs stay
    assert not any(n.op_type == "Conv" and n.name in decided and decided[n.name]["int"] for n in graph.node)


@pytest.mark.parametrize("bits,tol", [((0, 0, 0), 1e-5), ((8, 8, 8), 1e-4), ((4, 4, 6), 1e-4), ((8, 8, 16), 1e-4),
                                      ((12, 12, 8), 1e-4)])
def test_step_keeps_loss_and_every_gradient(builds, bits, tol):
    """0 bits: the two builds to float rounding; quantized: each build against ConvZoo's replayed PyTorch step
    (at 12-bit activations the float branch runs)."""
    assert_same_step(builds[False][0], builds[True][0], bits, tol)


def test_switch_follows_the_bits_at_run_time(builds, monkeypatch):
    """A path that cannot run makes IntConv fail: the step fails exactly when a conv's act and weight bits are
    both 1..8, so the switch takes the integer branch there and the float one elsewhere."""
    on = builds[True][0]
    monkeypatch.setenv("FRACGRAPH_INT_ISA", "sse9")   # set: the manifest check defers to it; the kernel refuses
    for bits in [(0, 0, 0), (12, 12, 8), (8, 12, 8), (12, 8, 8), (16, 16, 16)]:
        _step(on, bits)
    for bits in [(8, 8, 8), (1, 8, 12), (8, 2, 0)]:
        with pytest.raises(Exception, match="FRACGRAPH_INT_ISA names a path"):
            _step(on, bits)


def test_cpu_without_the_recorded_path_is_refused_in_one_line(builds, monkeypatch):
    on = builds[True][0]
    monkeypatch.delenv("FRACGRAPH_INT_ISA", raising=False)
    monkeypatch.setattr(kernels, "int_path_available", lambda path: path == "scalar")
    with pytest.raises(FracgraphError, match="needs the CPU flag") as e:
        TrainSession(on, threads=1)
    assert "\n" not in str(e.value) and "--no-int-kernels" in str(e.value)
    TrainSession(builds[False][0], threads=1)   # artifacts without integer convs load anywhere
    monkeypatch.setenv("FRACGRAPH_INT_ISA", "scalar")   # an explicit path: loads and runs
    TrainSession(on, threads=1)


def test_cli_no_int_kernels_keeps_the_float_convs(small_model, tmp_path):
    from typer.testing import CliRunner

    from fracgraph.cli import app
    from fracgraph.manifest import Manifest

    runner = CliRunner()
    from fracgraph.passes import int_gemm

    if kernels.int_path() not in int_gemm.FAST_PATHS:
        pytest.skip("without AMX or VNNI the default build keeps the float convs (int_gemm.FAST_PATHS)")
    for flag, expect in (([], True), (["--no-int-kernels"], False)):
        out = tmp_path / f"art{len(flag)}"
        r = runner.invoke(app, ["quantize", str(small_model[1]), "-o", str(out), *flag])
        assert r.exit_code == 0, r.output
        rec = Manifest.read(out).extra["int_kernels"]
        assert (rec is not None and any(c["int"] for c in rec["convs"])) is expect


# -- MatMul: codes for onnxruntime's MatMulInteger and the rescale ------------------------------------------------
def int_matmul(aq, am, as_, bq, bm, bs, threads=2):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes = [helper.make_node("IntCodesU8", ["a", "am", "as"], ["qa"], domain=kernels.DOMAIN),
             helper.make_node("IntCodesS8", ["b", "bm", "bs"], ["qb"], domain=kernels.DOMAIN),
             helper.make_node("MatMulInteger", ["qa", "qb"], ["acc"]),
             helper.make_node("IntMatMulRescale", ["acc", "qa", "qb", "am", "as", "bm", "bs"], ["y"], domain=kernels.DOMAIN)]
    names = ["a", "am", "as", "b", "bm", "bs"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    kernels.register(so)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(names, [aq, am, as_, bq, bm, bs])))[0]


@pytest.mark.parametrize("a_shape,b_shape,per_column", [
    ((37, 64), (64, 48), True),            # a linear layer: weight ranges per output column
    ((2, 5, 32), (32, 128), True),         # batched activations, one weight
    ((2, 3, 9, 16), (2, 3, 16, 9), False),  # attention: two activations, both per tensor
])
@pytest.mark.parametrize("bits", [8, 4])
def test_int_matmul_matches_float64(a_shape, b_shape, per_column, bits):
    rng = np.random.default_rng(len(a_shape) * 10 + bits)
    a = (rng.standard_normal(a_shape) + 0.7).astype(np.float32)
    b = (rng.standard_normal(b_shape) * 0.3 - 0.1).astype(np.float32)
    aq, am, as_ = fake_quant(a, bits)
    if per_column:
        bq, bm, bs = fake_quant(b, bits, axes=(0,))
    else:
        bq, bm, bs = fake_quant(b, bits)
    y = int_matmul(aq, am, as_, bq, bm, bs)
    ref = np.matmul(aq.astype(np.float64), bq.astype(np.float64))
    k = a_shape[-1]
    bound = 2.0 ** -20 * k * np.abs(aq).max() * np.abs(bq).max()
    assert y.shape == ref.shape and np.abs(y - ref).max() <= bound
    assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max()   # rescaled in double: a float GEMM's rounding


@pytest.fixture(scope="module")
def gpt_builds(tmp_path_factory):
    """The zoo GPT (tests/test_gpt_step_reference.py's size) with integer MatMuls off (the default) and on."""
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.zoo import export_gpt
    from test_gpt_step_reference import SIZES

    from fracgraph.passes import int_gemm

    d = tmp_path_factory.mktemp("intgpt")
    path = export_gpt(d / "gpt.onnx", seed=0, **SIZES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int_gemm, "FAST_PATHS", tuple(kernels.INT_PATHS))
        return {key: (d / str(key), build_artifacts(path, d / str(key), BuildOptions(int_matmul=key)))
                for key in (False, True)}, SIZES


def test_gpt_weight_matmuls_on_integers(gpt_builds):
    builds, sizes = gpt_builds
    rec = builds[True][1].extra["int_kernels"]
    assert builds[False][1].extra["int_kernels"] is None
    mats = [c for c in rec["convs"] if c["op_type"] == "MatMul"]
    # q, k, v, proj, fc, fc_proj per layer (the head stays FP32 by the default policy; QK^T and AV are not matched)
    assert len(mats) == 6 * sizes["layers"] and all(c["int"] for c in mats)
    # their weight gradients: onnxruntime's MatMul_Grad Gemm(A^T, dY), each switched to IntMatMulGradW
    grads = [c for c in rec["weight_grads"] if c["float_form"] == "Gemm"]
    assert sorted(c["name"] for c in grads) == sorted(c["name"] for c in mats) and all(c["int"] for c in grads)
    import onnx

    graph = onnx.load(str(builds[True][0] / "training_model.onnx")).graph
    ops = {}
    for n in graph.node:
        if n.op_type == "If" and "::int" in n.name:
            branches = {a.name: a.g for a in n.attribute}
            ops.setdefault(tuple(x.op_type for x in branches["then_branch"].node), []).append(
                tuple(x.op_type for x in branches["else_branch"].node))
    # one op a branch: the fused integer GEMM, or the float op it replaces; every GPT linear has a bias, which
    # int-bias (passes/int_bias.py) takes into the switch: IntMatMul's seventh input, an Add after the float MatMul
    assert ops == {("IntMatMul",): [("MatMul", "Add")] * len(mats), ("IntMatMulGradW",): [("Gemm",)] * len(grads)}
    assert all(len(x.input) == 7 for n in graph.node if n.op_type == "If" for a in n.attribute for x in a.g.node
               if x.op_type == "IntMatMul")


@pytest.mark.parametrize("bits", [(8, 8, 0), (4, 4, 0), (6, 8, 0), (12, 12, 0), (16, 8, 16)])
def test_gpt_step_integer_matmuls_equal_float_ones(gpt_builds, bits):
    """FP32 errors (a stochastic rounding would amplify a last-bit difference into one quantizer step, see
    test_gpt_step_reference): the integer forward gives the float one's loss, logits and every gradient to float
    rounding; at 12-16 act bits the float branch runs, the same ops as the float build."""
    builds, sizes = gpt_builds
    rng = np.random.default_rng(0)
    ids = rng.integers(0, sizes["vocab"], (3, sizes["context"])).astype(np.int64)
    labels = rng.integers(0, sizes["vocab"], (3, sizes["context"])).astype(np.int64)
    got = {}
    for key, (art, m) in builds.items():
        sess = TrainSession(art, seed=0, threads=1)
        outs = sess.forward_backward(ids, labels, np.tile(np.array(bits, np.float32), (m.n_blocks, 1)))
        got[key] = float(outs[0]), np.asarray(outs[1]), {n: sess.gradient(n) for n in sess.trainable}
    (l0, y0, g0), (l1, y1, g1) = got[False], got[True]
    # The integer GEMM's sum is exact and the float one's is not, so a GEMM output can differ in its last bits, and
    # where the next activation quantizer rounds that output at a code boundary it takes the neighbouring code: one
    # step of a 6-bit code is 1/63 of the range. Whether any value of this batch lies that close to a boundary depends
    # on the float GEMM's summation order, which differs between CPUs (MLAS's kernels per ISA): on an AMD EPYC (AVX-512)
    # one flip at FW6 moved the logits by 2e-4 of their range, and no flip occurred on the Intel machines before. The
    # bounds therefore allow a few code flips (1e-3 of the logits' range, 1e-3 of each gradient's norm), which is still
    # far below what a wrong scale, zero point or code would give (tens of percent). A flipped activation a[t, c]
    # also enters the next GEMM's weight gradient A^T dY directly, as one step times dY[t] in row c: with 24 tokens
    # that is about one percent of the gradient's norm (measured: 0.9% on blocks.1.attn.proj.weight), hence 5%.
    quantized = bits[0] < 12                      # 12-16 bits: the float branch, the same ops in both builds
    y_tol, g_tol = (2e-3, 5e-2) if quantized else (1e-5, 1e-5)
    assert abs(l1 - l0) <= (1e-4 if quantized else 1e-6) * abs(l0) and np.abs(y1 - y0).max() <= y_tol * np.abs(y0).max()
    for name, g in g0.items():
        ref = g0[name.replace("k.bias", "q.bias")] if name.endswith("attn.k.bias") else g   # ~0 by shift invariance
        assert np.linalg.norm(g1[name] - g) <= g_tol * np.linalg.norm(ref), name


@pytest.mark.parametrize("bits", [(8, 16, 8), (4, 12, 6)])
def test_gpt_integer_weight_gradients_equal_float_ones(gpt_builds, bits):
    """Weight bits above 8: the forward runs its float branch in both builds, so the loss and every error (with its
    stochastic rounding, replayed from the same seed) are the float build's bitwise, and only the weight gradients of
    the quantized linear layers come from IntMatMulGradW: within float rounding of the Gemm's (a wrong error code
    would move an entry by a quantizer step, far more)."""
    builds, sizes = gpt_builds
    rng = np.random.default_rng(1)
    ids = rng.integers(0, sizes["vocab"], (3, sizes["context"])).astype(np.int64)
    labels = rng.integers(0, sizes["vocab"], (3, sizes["context"])).astype(np.int64)
    got = {}
    for key, (art, m) in builds.items():
        sess = TrainSession(art, seed=0, threads=1)
        outs = sess.forward_backward(ids, labels, np.tile(np.array(bits, np.float32), (m.n_blocks, 1)))
        got[key] = float(outs[0]), {n: sess.gradient(n) for n in sess.trainable}
    (l0, g0), (l1, g1) = got[False], got[True]
    assert l1 == l0
    weights = {c["name"] for c in builds[True][1].extra["int_kernels"]["weight_grads"]}
    differ = []
    for name, g in g0.items():
        if np.array_equal(g1[name], g):
            continue
        differ.append(name)
        assert np.linalg.norm(g1[name] - g) <= 1e-5 * np.linalg.norm(g), name
    # the integer branch ran: exactly the switched layers' weights differ (in the last bits)
    assert differ and all(n.endswith(".weight") and any(n.startswith(w.strip("/").split("/MatMul")[0].replace("/", "."))
                                                        for w in weights) for n in differ), differ


def test_gpt_switch_follows_the_bits_at_run_time(gpt_builds, monkeypatch):
    """IntMatMul runs when act and weight bits are 1..8, IntMatMulGradW when act and grad bits are: a path that
    cannot run makes exactly those steps fail."""
    builds, sizes = gpt_builds
    art, m = builds[True]
    ids = np.zeros((2, sizes["context"]), np.int64)
    monkeypatch.setenv("FRACGRAPH_INT_ISA", "sse9")
    sess = TrainSession(art, seed=0, threads=1)

    def step(bits):
        sess.forward_backward(ids, ids, np.tile(np.array(bits, np.float32), (m.n_blocks, 1)))

    for bits in [(0, 0, 0), (12, 8, 8), (8, 12, 12), (16, 16, 16)]:
        step(bits)
    for bits in [(8, 8, 0), (8, 16, 8), (2, 3, 4)]:
        with pytest.raises(Exception, match="FRACGRAPH_INT_ISA names a path"):
            step(bits)


def test_cli_no_int_matmul_keeps_the_float_linear_gemms(gpt_builds, tmp_path):
    """`quantize` switches the linear layers' MatMuls by default; --no-int-matmul keeps them (and their Gemm weight
    gradients) float."""
    from typer.testing import CliRunner

    from fracgraph.cli import app
    from fracgraph.manifest import Manifest

    builds, _ = gpt_builds
    onnx_path = builds[True][0].parent / "gpt.onnx"
    out = tmp_path / "art"
    r = CliRunner().invoke(app, ["quantize", str(onnx_path), "-o", str(out), "--no-int-matmul"])
    assert r.exit_code == 0, r.output
    assert Manifest.read(out).extra["int_kernels"] is None   # the GPT has no convs: nothing on integers
    assert builds[True][1].extra["int_kernels"]["convs"]      # ... while the default build has its MatMuls


def test_only_matmul_grads_gemm_form_is_matched():
    from onnx import helper

    from fracgraph.passes.int_gemm import _gemm_attrs_ok

    assert _gemm_attrs_ok(helper.make_node("Gemm", ["a", "g"], ["w"], transA=1)) is None
    assert "not MatMul_Grad" in _gemm_attrs_ok(helper.make_node("Gemm", ["a", "g"], ["w"], transA=1, transB=1))
    assert "not MatMul_Grad" in _gemm_attrs_ok(helper.make_node("Gemm", ["a", "g"], ["w"]))
    assert "not MatMul_Grad" in _gemm_attrs_ok(helper.make_node("Gemm", ["a", "g"], ["w"], transA=1, alpha=0.5))
    assert "C input" in _gemm_attrs_ok(helper.make_node("Gemm", ["a", "g", "c"], ["w"], transA=1))


# -- Gemm-form linear layers (torchvision's exports: Gemm(x, W, b, transB=1)) on IntGemm -----------------------------
def _gemm_mlp(path):
    """x [N, 12] -> Gemm(transB=1, bias) -> Relu -> Gemm(transB=0, no C) -> Relu -> Gemm(transB=1, bias) head."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), n) for n, s in
             [("w1", (40, 12)), ("b1", (40,)), ("w2", (40, 24)), ("w3", (10, 24)), ("b3", (10,))]]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Gemm", ["r1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], name="head", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def gemm_builds(tmp_path_factory):
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.passes import int_gemm

    d = tmp_path_factory.mktemp("intgemm")
    path = _gemm_mlp(d / "mlp.onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int_gemm, "FAST_PATHS", tuple(kernels.INT_PATHS))
        return {key: (d / str(key), build_artifacts(path, d / str(key), BuildOptions(int_matmul=key)))
                for key in (False, True)}


def test_gemm_forwards_on_int_gemm(gemm_builds):
    import onnx

    art, m = gemm_builds[True]
    rec = m.extra["int_kernels"]["convs"]
    gemms = {c["name"]: c for c in rec if c["op_type"] == "Gemm"}
    assert set(gemms) >= {"fc1", "fc2"} and gemms["fc1"]["int"] and gemms["fc2"]["int"], rec
    graph = onnx.load(str(art / "training_model.onnx")).graph
    switched = {}
    for n in graph.node:
        if n.op_type == "If" and n.name.endswith("::int/switch"):
            br = {a.name: a.g for a in n.attribute}
            (op,), (fl,) = br["then_branch"].node, br["else_branch"].node
            switched[n.name.split("::")[0]] = (op.op_type, {a.name: a.i for a in op.attribute}, list(op.input), fl.op_type)
    assert switched["fc1"][0] == "IntGemm" and switched["fc1"][1] == {"trans_b": 1} and switched["fc1"][2][6] == "b1"
    assert switched["fc2"][0] == "IntGemm" and switched["fc2"][1] == {"trans_b": 0} and switched["fc2"][3] == "Gemm"
    # the weight gradients: fc2's Gemm(A, dY, transA=1) (MatMul_Grad's form) and fc1's Gemm(dY, A, transA=1)
    grads = {c["name"]: c for c in m.extra["int_kernels"]["weight_grads"]}
    assert grads["fc1"]["int"] and grads["fc2"]["int"] and "head" not in grads, grads
    dws = {}
    for n in graph.node:
        if n.op_type == "If" and n.name.endswith("::int_dw/switch"):
            (op,) = {a.name: a.g for a in n.attribute}["then_branch"].node
            dws[n.name.split("::")[0]] = (op.op_type, list(op.input))
    assert {k: v[0] for k, v in dws.items()} == {"fc1": "IntMatMulGradW", "fc2": "IntMatMulGradW"}
    # each operand's (min, scale) is its own quantizer's: the error's first in fc1 (dY^T A), the activation's in fc2
    (_, i1), (_, i2) = dws["fc1"], dws["fc2"]
    assert "::bwq" in i1[1] and "::bwq" in i1[2] and "::fq_a" in i1[4] and "::fq_a" in i1[5], i1
    assert "::fq_a" in i2[1] and "::fq_a" in i2[2] and "::bwq" in i2[4] and "::bwq" in i2[5], i2
    assert gemm_builds[False][1].extra["int_kernels"] is None or not any(
        c["op_type"] == "Gemm" for c in gemm_builds[False][1].extra["int_kernels"]["convs"])


@pytest.mark.parametrize("bits", [(8, 8, 0), (4, 6, 0), (12, 12, 0)])
def test_gemm_step_integer_forwards_equal_float_ones(gemm_builds, bits):
    """FP32 errors: the integer forward gives the float build's loss, logits and every gradient to float rounding
    (one wrong code would move a logit by a quantizer step); at 12 bits the float branch runs."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 12)).astype(np.float32)
    y = rng.integers(0, 10, 6).astype(np.int64)
    got = {}
    for key, (art, m) in gemm_builds.items():
        sess = TrainSession(art, seed=0, threads=1)
        outs = sess.forward_backward(x, y, np.tile(np.array(bits, np.float32), (m.n_blocks, 1)))
        got[key] = float(outs[0]), np.asarray(outs[1]), {n: sess.gradient(n) for n in sess.trainable}
    (l0, y0, g0), (l1, y1, g1) = got[False], got[True]
    assert abs(l1 - l0) <= 1e-6 * abs(l0) and np.abs(y1 - y0).max() <= 1e-5 * np.abs(y0).max()
    for name, g in g0.items():
        assert np.linalg.norm(g1[name] - g) <= 1e-5 * np.linalg.norm(g), name
    if bits[0] > 8:
        assert l1 == l0 and np.array_equal(y1, y0)


def test_gemm_rule_declines_what_int_gemm_cannot_run():
    from onnx import helper

    from fracgraph.passes.int_gemm import _GemmRule

    ok = helper.make_node("Gemm", ["a", "w", "c"], ["y"], transB=1)
    assert _GemmRule.decline(ok, [8, 4], None, {"c": [8]}) is None
    assert _GemmRule.decline(ok, [8, 4], None, {"c": [1, 8]}) is None
    assert _GemmRule.decline(ok, [8, 4], None, {"c": [1]}) is None
    assert "not one value per output column" in _GemmRule.decline(ok, [8, 4], None, {"c": [5, 8]})
    assert "not one value per output column" in _GemmRule.decline(ok, [8, 4], None, {"c": [4]})
    assert "bias shape unknown" in _GemmRule.decline(ok, [8, 4], None, {})
    assert "transA" in _GemmRule.decline(helper.make_node("Gemm", ["a", "w"], ["y"], transA=1), [8, 4])
    assert "alpha or beta" in _GemmRule.decline(helper.make_node("Gemm", ["a", "w"], ["y"], alpha=2.0), [8, 4])
    assert "alpha or beta" in _GemmRule.decline(helper.make_node("Gemm", ["a", "w", "c"], ["y"], beta=0.5), [8, 4],
                                                None, {"c": [4]})
    assert _GemmRule.decline(helper.make_node("Gemm", ["a", "w"], ["y"], beta=0.5), [8, 4]) is None   # no C: beta unused
    assert "static 2-D" in _GemmRule.decline(helper.make_node("Gemm", ["a", "w"], ["y"]), None)


def test_gemm_switch_follows_the_bits_at_run_time(gemm_builds, monkeypatch):
    """IntGemm runs exactly when act and weight bits are 1..8 (and fc2's weight gradient, the MatMul_Grad form
    Gemm(A, dY, transA=1) of a transB = 0 Gemm, on IntMatMulGradW when act and grad bits are): a path that cannot run
    fails those steps alone."""
    art, m = gemm_builds[True]
    x, y = np.zeros((2, 12), np.float32), np.zeros(2, np.int64)
    monkeypatch.setenv("FRACGRAPH_INT_ISA", "sse9")
    sess = TrainSession(art, seed=0, threads=1)

    def step(bits):
        sess.forward_backward(x, y, np.tile(np.array(bits, np.float32), (m.n_blocks, 1)))

    for bits in [(0, 0, 0), (12, 8, 8), (16, 16, 16)]:
        step(bits)
    for bits in [(8, 8, 0), (2, 3, 4), (8, 12, 8)]:
        with pytest.raises(Exception, match="FRACGRAPH_INT_ISA names a path"):
            step(bits)


@pytest.mark.parametrize("bits", [(8, 16, 8), (4, 12, 6)])
def test_gemm_integer_weight_gradients_equal_float_ones(gemm_builds, bits):
    """Weight bits above 8: both builds run the float forward, so the loss and every error (its stochastic rounding
    replayed from the same seed) are the float build's bitwise; only fc1's and fc2's weight gradients come from
    IntMatMulGradW, within float rounding of the Gemm's (a wrong error code would move an entry by a quantizer step)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 12)).astype(np.float32)
    y = rng.integers(0, 10, 6).astype(np.int64)
    got = {}
    for key, (art, m) in gemm_builds.items():
        sess = TrainSession(art, seed=0, threads=1)
        outs = sess.forward_backward(x, y, np.tile(np.array(bits, np.float32), (m.n_blocks, 1)))
        got[key] = float(outs[0]), {n: sess.gradient(n) for n in sess.trainable}
    (l0, g0), (l1, g1) = got[False], got[True]
    assert l1 == l0
    differ = sorted(n for n, g in g0.items() if not np.array_equal(g1[n], g))
    assert differ == ["w1", "w2"], differ
    for name in differ:
        assert np.linalg.norm(g1[name] - g0[name]) <= 1e-5 * np.linalg.norm(g0[name]), name
