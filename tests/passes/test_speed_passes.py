"""The speed passes (ste-grad, conv-grad-split) keep the training step's values: loss and every parameter gradient
with the passes on equal those with them off, on a model with every conv form the split must handle.

The stochastic BW noise is made identical in both builds by giving each RandomUniformLike node a seed derived
from its name (onnxruntime otherwise seeds kernels in creation order, which a rewrite changes). At 0 bits the
step is continuous and the two builds' gradients agree to float rounding (1e-5). With quantized errors, a
rounding-level difference upstream (s*g/s, a conv summed in another order) can move an element across a
stochastic-rounding boundary, which changes it by one quantization step, and the flip cascades through the
quantizers below by an amount that depends on the CPU's kernels; so at quantized bits each build's step is
compared with ConvZoo's PyTorch step (its weights, its noise), every error quantizer replayed on the error that
build quantized (conftest.ErrorReplay), at 1e-4.
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from onnx import helper

torch = pytest.importorskip("torch")
nn = torch.nn

from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.passes.base import all_nodes  # noqa: E402
from fracgraph.passes.conv_grad_split import ConvGradSplitPass  # noqa: E402
from fracgraph.passes.quant_bits import FUSED_BITS  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402

from conftest import STE, ErrorReplay, GradQ, export, fq_ref, seed_noise  # noqa: E402

F = torch.nn.functional


class ConvZoo(nn.Module):
    """Conv-BN stem, depthwise strided, grouped with bias, depthwise, 1x1 strided with bias, 5x5, dilated, 1x1 with pad 1."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)   # before BN: its bias gradient would be ~0
        self.bn0 = nn.BatchNorm2d(8)
        self.dw_s2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=True)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.pw_s2 = nn.Conv2d(12, 16, 1, stride=2, bias=True)
        self.k5 = nn.Conv2d(16, 16, 5, padding=2, bias=False)
        self.dil = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.pad1x1 = nn.Conv2d(16, 16, 1, padding=1, bias=False)
        self.fc = nn.Linear(16, 4)

    def forward(self, x, conv=None):
        conv = conv or (lambda name, inp: getattr(self, name)(inp))   # the reference passes its quantized conv
        x = torch.relu(self.bn0(conv("c0", x)))
        x = torch.relu(conv("dw_s2", x))
        x = torch.relu(conv("grouped", x))
        x = torch.relu(conv("dw", x))
        x = torch.relu(conv("pw_s2", x))
        x = torch.relu(conv("k5", x) + x)
        x = torch.relu(conv("dil", x))
        x = conv("pad1x1", x)
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def build_pair(module, directory, input_shape, option: str | None = None, *, off: dict | None = None,
               on: dict | None = None) -> dict:
    """{False: (artifacts, manifest), True: ...} of `module` built with BuildOptions.<option> off and on (or with the
    `off` and `on` options), the BW noise exposed and seeded alike."""
    torch.manual_seed(0)   # the module's weights, whatever the RNG's state when the caller built it: a test's values
    for m in module.modules():   # then do not depend on which tests ran before it in the process
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    path = export(module, directory / "model.onnx", shape=input_shape)
    variants = {False: off if option is None else {option: False}, True: on if option is None else {option: True}}
    out = {}
    for key, opts in variants.items():
        art = directory / f"art_{key}"
        manifest = build_artifacts(path, art, BuildOptions(expose_noise=True, expose_errors=True, **opts))
        seed_noise(art)
        out[key] = (art, manifest)
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    # odd size: strided convs need output_padding
    return build_pair(ConvZoo(), tmp_path_factory.mktemp("speed"), (2, 3, 9, 9), "fast_backward")


def _step(art, bits, shape=(6, 3, 9, 9), classes=4):
    """Loss, every parameter gradient and the BW noise of one seeded step at `bits` for every block."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, classes, shape[0]).astype(np.int64)
    sess = TrainSession(art, seed=0, threads=1)
    outs = sess.forward_backward(x, y, np.tile(np.asarray(bits, np.float32), (sess.manifest.n_blocks, 1)))
    noise = {n: np.asarray(o) for n, o in zip(sess.module.output_names(), outs) if n.endswith("/noise")}
    return float(outs[0]), {k: sess.gradient(k) for k in sess.trainable}, noise


def assert_same_step(off, on, bits, tol, shape=(6, 3, 9, 9)):
    """One seeded step of two ConvZoo builds. At 0 bits: loss to 1e-6 and every gradient to `tol` (relative), one
    build against the other. At quantized bits: the same noise in both, and each build against ConvZoo's replayed
    PyTorch step (`assert_matches_reference`), loss and every gradient to `tol`."""
    if not any(bits):
        loss0, grads0, _ = _step(off, bits, shape)
        loss1, grads1, _ = _step(on, bits, shape)
        assert abs(loss0 - loss1) <= 1e-6 * abs(loss0)
        assert grads0.keys() == grads1.keys() and len(grads0) >= 11
        for name, g in grads0.items():
            err = np.linalg.norm(grads1[name] - g) / max(np.linalg.norm(g), 1e-12)
            assert err <= tol, f"{name}: relative gradient error {err:.2e}"
        return
    assert shape == (6, 3, 9, 9), "quantized bits are checked against ConvZoo's PyTorch step only"
    noise0, noise1 = assert_matches_reference(off, bits, tol), assert_matches_reference(on, bits, tol)
    assert noise0.keys() == noise1.keys() and all(np.array_equal(noise0[k], noise1[k]) for k in noise0)


def assert_matches_reference(art, bits, tol, shape=(6, 3, 9, 9), classes=4) -> dict:
    """One seeded step of ConvZoo artifacts (built with expose_noise and expose_errors) against ConvZoo in PyTorch
    with the artifacts' weights: every conv's input and weight fake-quantized at bits (a, w), its error at g with
    the step's noise, each error quantizer checked on the error ORT quantized (conftest.ErrorReplay). Returns the
    noise."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, classes, shape[0]).astype(np.int64)
    sess = TrainSession(art, seed=0, threads=1)
    outs = sess.forward_backward(x, y, np.tile(np.asarray(bits, np.float32), (sess.manifest.n_blocks, 1)))
    got = dict(sess.last_outputs)
    noises = {n[: -len("::bwq/noise")]: torch.from_numpy(np.asarray(o)) for n, o in got.items() if n.endswith("::bwq/noise")}
    ref = ConvZoo().train()
    params = dict(ref.named_parameters())
    assert set(params) == set(sess.trainable)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(sess.parameter(name)))
    a, w, g = bits
    replay = ErrorReplay(got, fq_ref)

    def qconv(name, inp):
        conv = getattr(ref, name)
        out = F.conv2d(STE.apply(inp, a, False), STE.apply(conv.weight, w, True), conv.bias, conv.stride,
                       conv.padding, conv.dilation, conv.groups)
        return GradQ.apply(out, g, noises[f"/{name}/Conv"], (replay, f"/{name}/Conv"))

    loss = F.cross_entropy(ref(torch.from_numpy(x), qconv), torch.from_numpy(y))
    loss.backward()
    assert sorted(replay.seen) == sorted(noises) and len(noises) == 8
    assert abs(float(outs[0]) - loss.item()) <= 1e-4 * abs(loss.item())
    for name, p in params.items():
        err = np.linalg.norm(sess.gradient(name) - p.grad.numpy()) / max(np.linalg.norm(p.grad.numpy()), 1e-12)
        assert err <= tol, f"{name}: relative gradient error {err:.2e} against the replayed PyTorch step"
    return {k: v.numpy() for k, v in noises.items()}


@pytest.mark.parametrize("bits,tol", [((0, 0, 0), 1e-5), ((8, 8, 8), 1e-4), ((4, 4, 6), 1e-4)])
def test_passes_keep_loss_and_every_gradient(builds, bits, tol):
    assert_same_step(builds[False][0], builds[True][0], bits, tol)


def test_conv_grad_split_structure_and_reasons(builds):
    _, manifest = builds[True]
    notes = [n for n in manifest.extra["notes"] if n.startswith("[conv-grad-split]")]
    text = "\n".join(notes)
    assert "/c0/Conv_Grad/ConvGrad_0: kept (no dX needed)" in text              # first conv: input needs no grad
    assert "/dw_s2/Conv_Grad/ConvGrad_0: dX as ConvTranspose" in text           # strided depthwise
    assert "/pw_s2/Conv_Grad/ConvGrad_0: dX as ConvTranspose" in text           # strided 1x1 with bias
    for conv in ("grouped", "dw", "k5", "dil"):
        assert f"/{conv}/Conv_Grad/ConvGrad_0: dX as Conv," in text, conv
    assert "/pad1x1/Conv_Grad/ConvGrad_0: kept ConvGrad (pads [1, 1, 1, 1] exceed the kernel reach)" in text
    graph = onnx.load(str(builds[True][0] / "training_model.onnx")).graph
    # dW only: ConvGrad without dX, or the forms of passes/conv_grad_w.py (in int-gemm's weight-gradient If's float
    # branch where IntConvGradW takes the dW at <= 8 bits)
    split = [n for n in all_nodes(graph) if (n.op_type == "ConvGrad" and n.output[0] == "")
             or n.op_type in ("ConvGradW", "ConvGradWCols", "ConvGradWNhwc", "DepthwiseConvGradW")]
    assert len(split) == 7   # six lowered + the first conv, whose dX onnxruntime already drops


def test_ste_grad_removes_the_quantizer_backward(builds):
    before = onnx.load(str(builds[False][0] / "training_model.onnx")).graph
    after = onnx.load(str(builds[True][0] / "training_model.onnx")).graph

    def chain(graph):
        return [n for n in graph.node if ("::fq_" in n.name and "_Grad/" in n.name)]

    assert len(chain(before)) > 50 and chain(after) == []
    assert not any(n.op_type == "DivGrad" for n in after.node)
    assert not any(n.op_type == "Where" for n in after.node)                        # quant-branch
    selects = [n for n in before.node if n.op_type == "Where" and n.input[0].endswith("::on") and "_Grad/" not in n.name]
    # each an If (int-gemm's conv and weight-gradient switches aside), or one node with its switch (quant-bits)
    assert sum(n.op_type == "If" and not n.name.endswith(("::int/switch", "::int_dw/switch"))
               or n.op_type in FUSED_BITS.values() for n in after.node) \
        == len(selects) == 3 * 8   # act, weight, error of 8 convs
    notes = [n for n in builds[True][1].extra["notes"] if n.startswith("[ste-grad]")]
    assert any("/c0/Conv::fq_a0: kept: no gradient" in n for n in notes)     # the data input needs no gradient


def test_split_declines_without_static_shape():
    """A strided conv whose input shape is unknown keeps ConvGrad and says why."""
    w = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 2, 3, 3])
    graph = helper.make_graph(
        [helper.make_node("ConvGrad", ["dy", "x", "w"], ["dx", "dw"], domain="com.microsoft", name="cg",
                          kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
         helper.make_node("Identity", ["dx"], ["out"], name="use")],
        "g", [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("dy", "x")] + [w],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    result = ConvGradSplitPass({})(model)
    assert not result.modified
    assert result.notes == ["cg: kept ConvGrad (strided and the input's spatial shape is not static)"]
