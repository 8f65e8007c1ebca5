"""nchwc-conv's shape-aware forms (issue 20): the Im2Col/Col2Im kernels against PyTorch's unfold/fold, the
im2col-gemm forward and dX forms (what the pass emits, run by onnxruntime) against PyTorch's float64 conv and its
input gradient on the shapes that select them and on every shape class the form can meet (large channel counts
on tiny maps, strided, dilated, grouped, depthwise, 1x1, 7x7 stride 2, asymmetric), the cost model's choice on
the corpus shapes of `bench/kernel_probes.py --only forms`, and a training step with the forms against the same
step on onnxruntime's own convs, listed by the manifest and `fracgraph inspect`.

The forms sum in another order than PyTorch (a float32 GEMM of K products, then up to kh*kw taps in Col2Im), so
each value is bounded by float32 rounding of its own sum: c * (K + taps) * eps * sum |terms|.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
F = torch.nn.functional

from fracgraph import kernels  # noqa: E402
from fracgraph.passes.conv_grad_split import ConvGradSplitPass  # noqa: E402
from fracgraph.passes.conv_grad_w import ConvGradWPass, ConvShape  # noqa: E402
from fracgraph.passes.nchwc_conv import NchwcConvPass, choose_form  # noqa: E402
from fracgraph.runtime import nchwc_block_size  # noqa: E402

from conftest import custom_op_session  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402

EPS = float(np.finfo(np.float32).eps)
BLOCK = nchwc_block_size()

# (N, C, H, W, kernel, stride, leading pads, trailing pads, dilation)
COL_CASES = [
    (2, 5, 6, 7, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),
    (3, 4, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),
    (2, 3, 11, 10, (7, 7), (2, 2), (3, 3), (3, 3), (1, 1)),
    (1, 6, 8, 8, (3, 3), (1, 1), (2, 2), (2, 2), (2, 2)),
    (2, 4, 5, 9, (1, 3), (1, 2), (0, 1), (0, 0), (1, 1)),
    (2, 8, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),
    (3, 4, 6, 6, (1, 1), (2, 2), (0, 0), (0, 0), (1, 1)),
    (2, 4, 7, 7, (3, 3), (2, 2), (1, 1), (0, 0), (1, 1)),   # trailing pad below the leading one
]


def _out(size, k, s, p0, p1, d):
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


def _col_attrs(case):
    n, c, h, w, k, s, p, pe, d = case
    return dict(kh=k[0], kw=k[1], sh=s[0], sw=s[1], ph=p[0], pw=p[1], dh=d[0], dw=d[1], h=h, w=w,
                ho=_out(h, k[0], s[0], p[0], pe[0], d[0]), wo=_out(w, k[1], s[1], p[1], pe[1], d[1]))


@pytest.mark.parametrize("case", COL_CASES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_im2col_and_col2im_match_pytorch(case, threads):
    n, c, h, w, k, s, p, pe, d = case
    a = _col_attrs(case)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    xp = F.pad(torch.from_numpy(x).double(), (p[1], pe[1], p[0], pe[0]))
    ref = F.unfold(xp, k, dilation=d, stride=s)                       # [N, C*kh*kw, L]
    assert ref.shape[2] == a["ho"] * a["wo"]
    col = custom_op_session("Im2Col", ["x"], ["col"], threads, **a).run(None, {"x": x})[0]
    # a copy, no arithmetic: exact
    np.testing.assert_array_equal(col, ref.permute(1, 0, 2).reshape(ref.shape[1], -1).numpy().astype(np.float32))
    cols = rng.standard_normal(col.shape).astype(np.float32)
    got = custom_op_session("Col2Im", ["c"], ["y"], threads, **a).run(None, {"c": cols})[0]
    tc = torch.from_numpy(cols).double().reshape(ref.shape[1], n, -1).permute(1, 0, 2)
    full = (h + p[0] + pe[0], w + p[1] + pe[1])
    want = F.fold(tc, full, k, dilation=d, stride=s)[:, :, p[0]:p[0] + h, p[1]:p[1] + w]
    bound = F.fold(tc.abs(), full, k, dilation=d, stride=s)[:, :, p[0]:p[0] + h, p[1]:p[1] + w]
    assert got.shape == (n, c, h, w)
    assert np.all(np.abs(got - want.numpy()) <= k[0] * k[1] * EPS * bound.numpy() + 1e-30)


def test_col_kernels_refuse_bad_inputs():
    a = _col_attrs(COL_CASES[0])
    with pytest.raises(Exception, match="Im2Col: X must be"):
        custom_op_session("Im2Col", ["x"], ["col"], 1, **a).run(None, {"x": np.zeros((2, 5, 6, 8), np.float32)})
    with pytest.raises(Exception, match="Col2Im: cols must be"):
        custom_op_session("Col2Im", ["c"], ["y"], 1, **a).run(None, {"c": np.zeros((45, 7), np.float32)})
    with pytest.raises(Exception, match="invalid conv attributes"):
        custom_op_session("Im2Col", ["x"], ["col"], 1, **{**a, "sh": 0}).run(None, {"x": np.zeros((2, 5, 6, 7), np.float32)})


# (N, Ci, H=W, Co, k, stride, pad, dilation, group, bias): the shapes that select im2col-gemm (large channel
# counts on 2x2 outputs, stride 1 and 2, 1x1 strided dX) and every class the form can be forced onto
FORM_CASES = [
    (3, 192, 2, 192, 3, 1, 1, 1, 1, True),
    (2, 64, 4, 192, 3, 2, 1, 1, 1, False),
    (2, 64, 4, 96, 1, 2, 0, 1, 1, False),
    (2, 48, 8, 48, 3, 1, 1, 1, 4, False),     # grouped
    (2, 48, 7, 48, 3, 2, 1, 1, 3, True),      # grouped, strided, odd map
    (2, 16, 6, 16, 3, 1, 1, 1, 16, False),    # depthwise
    (2, 3, 19, 16, 7, 2, 3, 1, 1, False),     # 7x7 stride 2
    (2, 8, 9, 16, 3, 1, 2, 2, 1, False),      # dilated
    (2, 24, 5, 40, 1, 1, 0, 1, 1, True),      # 1x1
]


def _conv_graph(case):
    """Conv(x, w[, b]) -> y and its ConvGrad(dy, x, w) -> (dx, dw), as the generated training graph has them."""
    n, ci, hw, co, k, s, p, d, g, bias = case
    ho = _out(hw, k, s, p, p, d)
    conv = dict(kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, dilations=[d, d], group=g)
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], name="fwd", **conv),
             helper.make_node("ConvGrad", ["dy", "x", "w"], ["dx_", "dw"], name="grad", domain="com.microsoft", **conv),
             helper.make_node("Identity", ["dx_"], ["dx"], name="dx")]   # (conv-grad-split keeps a dX that is a graph output)
    shapes = {"x": [n, ci, hw, hw], "w": [co, ci // g, k, k], "b": [co], "dy": [n, co, ho, ho]}
    vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes.get(name))  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi("x"), vi("w"), vi("dy")] + ([vi("b")] if bias else []),
                              [vi("y"), vi("dx"), vi("dw")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model, shapes


def _run_forms(case, force):
    model, shapes = _conv_graph(case)
    model = ConvGradSplitPass(shapes).call(model).model
    p = NchwcConvPass(shapes, BLOCK, fused=True, force=force)
    model = p.call(model).model
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    kernels.register(so)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, model, p.choices


@pytest.mark.parametrize("case", FORM_CASES, ids=str)
def test_gemm_forms_match_pytorch(case):
    n, ci, hw, co, k, s, p, d, g, bias = case
    sess, model, choices = _run_forms(case, "im2col-gemm")
    ops = [nd.op_type for nd in model.graph.node]
    assert {c["role"]: c["form"] for c in choices} == {"forward": "im2col-gemm", "dX" if s == 1 else "dX-strided": "im2col-gemm"}
    assert "Conv" not in ops and "ConvTranspose" not in ops and ops.count("Col2Im") == 2
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, ci, hw, hw)).astype(np.float32)
    w = rng.standard_normal((co, ci // g, k, k)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32)
    ho = _out(hw, k, s, p, p, d)
    dy = rng.standard_normal((n, co, ho, ho)).astype(np.float32)
    feeds = {"x": x, "w": w, "dy": dy, **({"b": b} if bias else {})}
    y, dx, _ = sess.run(["y", "dx", "dw"], feeds)
    tx = torch.from_numpy(x).double().requires_grad_()
    conv = lambda x_, w_, b_=None: F.conv2d(x_, w_, b_, stride=s, padding=p, dilation=d, groups=g)  # noqa: E731
    ty = conv(tx, torch.from_numpy(w).double(), torch.from_numpy(b).double() if bias else None)
    (tdx,) = torch.autograd.grad(ty, tx, torch.from_numpy(dy).double())
    K = ci // g * k * k
    ybound = conv(tx.detach().abs(), torch.from_numpy(w).double().abs()) + (abs(float(b.max())) if bias else 0)
    assert np.all(np.abs(y - ty.detach().numpy()) <= 2 * (K + 1) * EPS * ybound.numpy() + 1e-30)
    (xbound,) = torch.autograd.grad(conv(tx, torch.from_numpy(w).double().abs()), tx, torch.from_numpy(dy).double().abs())
    assert np.all(np.abs(dx - tdx.numpy()) <= 2 * (co // g + k * k) * EPS * xbound.numpy() + 1e-30)


def _shape(ci, hw, co, k, s, g=1):
    p = k // 2
    return ConvShape(ci=ci, h=hw, w=hw, co=co, kh=k, kw=k, sh=s, sw=s, ph=p, pw=p, ph_end=p, pw_end=p, dh=1, dw=1,
                     group=g, bias=False)


# the shapes of bench/kernel_probes.py --only forms and the forms its timings favoured: with NCHWc where its rules
# take the shape, and with onnxruntime's Conv/ConvTranspose only (a CPU without NCHWc kernels, or grouped convs)
CHOICES = [
    (_shape(512, 2, 512, 3, 1), "forward", "im2col-gemm", "im2col-gemm"),   # 0.32-0.36x Conv; NCHWc 0.47-0.54x
    (_shape(512, 2, 512, 3, 1), "dX", "im2col-gemm", "im2col-gemm"),
    (_shape(256, 4, 256, 3, 1), "forward", "NCHWc", "Conv"),                # im2col-gemm 0.73-1.26x Conv, NCHWc 0.61-0.73x
    (_shape(128, 8, 128, 3, 1), "dX", "NCHWc", "Conv"),
    (_shape(64, 16, 64, 3, 1), "forward", "NCHWc", "Conv"),
    (_shape(256, 4, 512, 3, 2), "forward", "im2col-gemm", "im2col-gemm"),   # 0.30-0.39x Conv; NCHWc 0.48-0.84x
    (_shape(256, 4, 512, 3, 2), "dX-strided", "im2col-gemm", "im2col-gemm"),   # 0.17-0.26x ConvTranspose
    (_shape(128, 8, 256, 3, 2), "dX-strided", "ConvTranspose", "ConvTranspose"),   # im2col-gemm 0.56-1.2x: too close
    (_shape(16, 32, 32, 3, 2), "dX-strided", "ConvTranspose", "ConvTranspose"),    # resnet20
    (_shape(256, 4, 512, 1, 2), "forward", "NCHWc", "im2col-gemm"),   # 1x1 strided: NCHWc 0.06-0.61x, im2col-gemm 0.12-0.69x
    (_shape(256, 4, 512, 1, 2), "dX-strided", "im2col-gemm", "im2col-gemm"),   # 0.10-0.38x ConvTranspose
    (_shape(128, 2, 32, 3, 1), "forward", "NCHWc", "im2col-gemm"),    # densenet's growth conv: NCHWc 0.13x, im2col-gemm 0.86-0.94x
    (_shape(400, 2, 400, 3, 1, g=25), "forward", "NCHWc", "Conv"),    # grouped, 16 a group: NCHWc 0.14-0.30x Conv,
    (_shape(64, 8, 64, 3, 1, g=4), "dX", "NCHWc", "Conv"),            # im2col-gemm 0.6-2.9x
    (_shape(128, 4, 128, 3, 1, g=32), "forward", "Conv", "Conv"),     # 4 a group: no NCHWc, no im2col-gemm
    (_shape(240, 8, 240, 5, 1, g=240), "forward", "NCHWc", "Conv"),   # depthwise
]


@pytest.mark.parametrize("shape,role,form,without_nchwc", CHOICES, ids=str)
def test_cost_model_choices(shape, role, form, without_nchwc):
    per_group = shape.group == 1 or ((shape.ci // shape.group) % 16 == 0 and (shape.co // shape.group) % 16 == 0)
    nchwc = role != "dX-strided" and (per_group or shape.group == shape.ci)
    assert choose_form(shape, role, nchwc, gemm=True)[0] == form
    assert choose_form(shape, role, False, gemm=True)[0] == without_nchwc
    assert choose_form(shape, role, nchwc, gemm=False)[0] != "im2col-gemm"


class FormsNet(torch.nn.Module):
    """One conv per choice at a test's size (4x4 input): the stem and a depthwise and 1x1 conv on NCHWc (or Conv),
    a strided conv whose dX goes to im2col-gemm, 192-channel 2x2 convs (biased, dilated) on im2col-gemm both ways,
    a grouped one with 16 channels a group on NCHWc and one with 4 a group on onnxruntime's Conv."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.down = nn.Conv2d(32, 192, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv2d(192, 192, 3, padding=1, bias=True)
        self.dil = nn.Conv2d(192, 192, 3, padding=2, dilation=2, bias=False)
        self.g = nn.Conv2d(192, 192, 3, padding=1, groups=12, bias=False)
        self.g4 = nn.Conv2d(192, 192, 3, padding=1, groups=48, bias=False)
        self.dw = nn.Conv2d(192, 192, 3, padding=1, groups=192, bias=False)
        self.pw = nn.Conv2d(192, 32, 1, bias=False)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        r = torch.relu
        x = r(self.down(r(self.stem(x))))
        x = r(self.c3(x) + x)
        x = r(self.g4(r(self.g(r(self.dil(x))))))
        x = self.pw(r(self.dw(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    return build_pair(FormsNet(), tmp_path_factory.mktemp("forms"), (2, 3, 4, 4), off={"skip_passes": ("nchwc-conv",)},
                      on={})


def _layer(node: str) -> str:
    return node.split("/")[1]


def test_each_conv_gets_its_form_and_inspect_lists_it(forms):
    from typer.testing import CliRunner

    from fracgraph.cli import app
    from fracgraph.inspect import summarize

    base = "NCHWc" if BLOCK > 1 else "Conv"
    art, manifest = forms[True]
    got = {(_layer(c["node"]), c["role"]): c["form"] for c in manifest.extra["conv_forms"]}
    assert got == {("stem", "forward"): base, ("down", "forward"): base, ("down", "dX-strided"): "im2col-gemm",
                   ("c3", "forward"): "im2col-gemm", ("c3", "dX"): "im2col-gemm",
                   ("dil", "forward"): "im2col-gemm", ("dil", "dX"): "im2col-gemm",
                   ("g", "forward"): base, ("g", "dX"): base, ("g4", "forward"): "Conv", ("g4", "dX"): "Conv",
                   ("dw", "forward"): base, ("dw", "dX"): base,
                   ("pw", "forward"): base, ("pw", "dX"): base}
    graph = onnx.load(str(art / "training_model.onnx")).graph
    # a dX form reads the dYt that conv-grad-w's ConvGradWCols already wrote for the same conv's weight gradient;
    # where conv-grad-w chose nhwc-tiles for it (AVX-512: c3's and dil's dW), the form writes its own (Im2Col of dY)
    dyts = {n.output[0] for n in graph.node if n.op_type == "ConvGradWCols"}
    own = {n.output[0] for n in graph.node if n.op_type == "Im2Col" and n.output[0].endswith("::gemm/dyt")}
    tiles = {_layer(c["node"]) for c in manifest.extra["conv_grad_w"] if c["form"] == "nhwc-tiles"}
    assert tiles == ({"down", "c3", "dil", "g", "g4"} if ConvGradWPass().avx512 else set())
    assert any(n.op_type == "FusedMatMul" and n.input[1] in (own if "c3" in tiles else dyts) for n in graph.node)
    assert not any(n.output[0].endswith(("::split/w_t", "::split/w_flip")) and "c3" in n.output[0] for n in graph.node)
    assert forms[False][1].extra["conv_forms"] is None
    rows = summarize(str(art))["conv_forms"]
    c3 = next(r for r in rows if _layer(r["node"]) == "c3" and r["role"] == "forward")
    assert c3["shape"] == "Ci192 2x2 -> Co192 3x3/1, 2x2 out" and c3["costs"]["im2col-gemm"] * 1.25 < c3["costs"][base]
    r = CliRunner().invoke(app, ["inspect", str(art)], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "conv forward and input-gradient forms" in r.output and "dX-strided" in r.output


def test_forms_keep_loss_and_every_gradient(forms):
    # 0 bits: the forms differ from onnxruntime's convs only in float summation order
    loss0, grads0, _ = _step(forms[False][0], (0, 0, 0), shape=(6, 3, 4, 4))
    loss1, grads1, _ = _step(forms[True][0], (0, 0, 0), shape=(6, 3, 4, 4))
    assert abs(loss0 - loss1) <= 1e-6 * abs(loss0)
    assert grads0.keys() == grads1.keys() and len(grads0) == 11
    for name, g in grads0.items():
        err = np.linalg.norm(grads1[name] - g) / max(np.linalg.norm(g), 1e-30)
        assert err <= 1e-5, f"{name}: relative gradient error {err:.2e}"
