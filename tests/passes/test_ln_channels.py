"""fracgraph's LayerNormChannels and LayerNormChannelsGrad (kernels/ln_channels.c) against float64 references of
onnxruntime's LayerNormalization and LayerNormalizationGrad formulas over axis 1 of NCHW tensors, within bounds
derived from the sums' lengths, the same on 1 and 2 threads; and the ln-channels pass: the structure of a
ConvNeXt-style block's training graph and its step's loss and every gradient with the pass on and off
(passes/ln_channels.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from conftest import custom_op_session  # noqa: E402
from fracgraph import kernels  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402

EPS = np.finfo(np.float32).eps

# [N, C, S...]: positions off the 16 lanes and the 64-position tasks (7x7 = 49, 9x9 = 81), several 16-lane blocks
# with a partial one, one image, rank 5 (30 positions: two images a task); maps under 16 positions (the flat path
# over channels, runs of lcm(S, 16) elements): ConvNeXt's stage-3 2x2 x 320 with 40 images (12 a task: 4 tasks),
# 1x1 with a partial vector (33 channels), 3x3 (runs of 144, a partial run and a partial vector), 3x5 (runs of
# 240, a partial one), rank 3 with fewer elements than a run (7 x 13), an image smaller than one vector (3 x 2x2);
# 4x4 (one vector per image, 4 images a task)
SHAPES = [(2, 5, 7, 7), (3, 40, 9, 9), (40, 320, 2, 2), (1, 24, 17, 3), (3, 7, 13), (2, 3, 2, 3, 5),
          (3, 33, 1, 1), (5, 70, 3, 3), (2, 17, 3, 5), (5, 3, 2, 2), (6, 48, 4, 4)]


def operands(shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 0.7).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    scale = (rng.standard_normal(c) * 0.5 + 1).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    return x, dy, scale, bias


def bcast(v, shape):
    return v.reshape((1, -1) + (1,) * (len(shape) - 2))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_float64_within_bound(shape):
    x, _, scale, bias = operands(shape, 1)
    eps = 1e-6
    outs = [custom_op_session("LayerNormChannels", ["x", "s", "b"], ["y", "m", "i"], t, epsilon=eps)
            .run(None, dict(x=x, s=scale, b=bias)) for t in (1, 2)]
    assert all(np.array_equal(a, b) for a, b in zip(*outs))
    y, mean, inv = outs[0]
    stat_shape = (shape[0], 1) + shape[2:]
    assert y.shape == shape and mean.shape == inv.shape == stat_shape
    x64 = x.astype(np.float64)
    rmean = x64.mean(1, keepdims=True)
    rinv = 1 / np.sqrt(x64.var(1, keepdims=True) + eps)
    # statistics: double sums, then one rounding to float (var from E[x^2] - mean^2 in double: C * 2^-52 relative)
    assert np.all(np.abs(mean - rmean) <= 2 * EPS * np.abs(rmean) + 1e-12)
    assert np.all(np.abs(inv - rinv) <= 2 * EPS * rinv)
    # y from the rounded statistics: (x - mean) * inv * scale + bias, 4 roundings of terms of its size, plus the
    # statistics' own rounding carried through
    ry = (x64 - rmean) * rinv * bcast(scale, shape) + bcast(bias, shape)
    terms = (np.abs(x64) + np.abs(rmean)) * rinv * np.abs(bcast(scale, shape)) + np.abs(bcast(bias, shape))
    assert np.all(np.abs(y - ry) <= 8 * EPS * terms)
    # onnxruntime's chain on the same values: Transpose, LayerNormalization(axis -1), Transpose
    ort_y = ort_chain(x, scale, bias, eps)
    assert np.all(np.abs(y - ort_y) <= 16 * EPS * terms)


def ort_chain(x, scale, bias, eps):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    r = x.ndim
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, *range(2, r), 1]),
             helper.make_node("LayerNormalization", ["xt", "s", "b"], ["yt"], axis=-1, epsilon=eps),
             helper.make_node("Transpose", ["yt"], ["y"], perm=[0, r - 1, *range(1, r - 1)])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "xsb"],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, dict(x=x, s=scale, b=bias))[0]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradient_matches_float64_within_bound(shape):
    x, dy, scale, _ = operands(shape, 2)
    x64 = x.astype(np.float64)
    mean = x64.mean(1, keepdims=True).astype(np.float32)
    inv = (1 / np.sqrt(x64.var(1, keepdims=True) + 1e-6)).astype(np.float32)
    outs = [custom_op_session("LayerNormChannelsGrad", ["dy", "x", "s", "m", "i"], ["dx", "ds", "db"], t)
            .run(None, dict(dy=dy, x=x, s=scale, m=mean, i=inv)) for t in (1, 2)]
    assert all(np.array_equal(a, b) for a, b in zip(*outs))   # the same sums on any thread count
    dx, ds, db = outs[0]
    assert dx.shape == shape and ds.shape == db.shape == (shape[1],)
    c = shape[1]
    d64, m64, i64 = dy.astype(np.float64), mean.astype(np.float64), inv.astype(np.float64)
    a, b = d64 * bcast(scale.astype(np.float64), shape), (x64 - m64) * i64
    rdx = i64 * (a - a.mean(1, keepdims=True) - b * (a * b).mean(1, keepdims=True))
    # dx: a and b to a few roundings each (sums over C in double), then the combination: 8 roundings of terms no
    # larger than |a| + |b| max|a b| + max|a| per element, times inv_std
    terms = np.abs(a) + np.abs(b) * np.abs(a * b).max(1, keepdims=True) + np.abs(a).max(1, keepdims=True)
    assert np.all(np.abs(dx - rdx) <= 10 * EPS * i64 * terms)
    # dscale, dbias: each term d * b to 3 roundings (x - mean, * inv_std, * d); maps of 16 positions or more: float
    # lanes of at most 4 terms each (3 roundings), then double, then float: 7 roundings of the terms' size
    axes = (0, *range(2, len(shape)))
    terms_ds, terms_db = np.abs(d64 * b).sum(axes), np.abs(d64).sum(axes)
    assert np.all(np.abs(ds - (d64 * b).sum(axes)) <= 8 * EPS * terms_ds)
    assert np.all(np.abs(db - d64.sum(axes)) <= 8 * EPS * terms_db)
    if np.prod(shape[2:]) < 16:
        # maps under 16 positions: the terms added in double (n terms: n 2^-53 relative), one rounding to float
        n = dy.size // c
        assert np.all(np.abs(ds - (d64 * b).sum(axes)) <= (4 * EPS + n * 2.0 ** -53) * terms_ds)
        assert np.all(np.abs(db - d64.sum(axes)) <= (EPS + n * 2.0 ** -53) * terms_db)
    assert c == scale.size


def test_kernel_refuses_mismatched_scale():
    x, _, scale, bias = operands((2, 5, 3, 3), 0)
    sess = custom_op_session("LayerNormChannels", ["x", "s", "b"], ["y", "m", "i"], 1)
    with pytest.raises(Exception, match="one value per channel"):
        sess.run(None, dict(x=x, s=scale[:4], b=bias[:4]))


class LayerNorm2d(torch.nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm over the channels of an NCHW tensor, through permutes."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class CnxNet(torch.nn.Module):
    """A ConvNeXt-style net: 2x2 stem + norm, a block (7x7 depthwise, norm, 1x1 MLP with GELU, layer scale,
    residual), a downsample (norm + 2x2 stride 2), and a channels-last LayerNorm that is no channels-first norm."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 2, 2)
        self.n0 = LayerNorm2d(8, eps=1e-6)
        self.dw = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.n1 = LayerNorm2d(8, eps=1e-6)
        self.fc1 = torch.nn.Conv2d(8, 16, 1)
        self.fc2 = torch.nn.Conv2d(16, 8, 1)
        self.gamma = torch.nn.Parameter(torch.full((8,), 0.5))
        self.n2 = LayerNorm2d(8, eps=1e-6)
        self.down = torch.nn.Conv2d(8, 12, 2, 2)
        self.head_norm = torch.nn.LayerNorm(12)
        self.head = torch.nn.Linear(12, 4)

    def forward(self, x):
        x = self.n0(self.stem(x))
        y = self.fc2(torch.nn.functional.gelu(self.fc1(self.n1(self.dw(x)))))
        x = x + y * self.gamma.view(1, -1, 1, 1)
        x = self.down(self.n2(x))
        return self.head(self.head_norm(x.mean((2, 3))))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(CnxNet(), tmp_path_factory.mktemp("lnc"), (2, 3, 10, 10), off={"skip_passes": ("ln-channels",)},
                      on={})


def _ops(art):
    return [(n.domain, n.op_type) for n in onnx.load(str(art / "training_model.onnx")).graph.node]


def test_pass_structure(builds):
    off, on = _ops(builds[False][0]), _ops(builds[True][0])
    assert off.count((kernels.DOMAIN, "LayerNormGrad")) == 4 and off.count((kernels.DOMAIN, "Permute")) >= 12
    assert on.count((kernels.DOMAIN, "LayerNormChannels")) == 3
    assert on.count((kernels.DOMAIN, "LayerNormChannelsGrad")) == 3
    assert on.count((kernels.DOMAIN, "LayerNormGrad")) == 1   # the head's channels-last norm stays on ln-grad
    assert off.count((kernels.DOMAIN, "Permute")) - on.count((kernels.DOMAIN, "Permute")) == 12
    notes = builds[True][1].extra["notes"]
    assert any(n.startswith("[ln-channels] 3 channels-first LayerNorm") for n in notes)
    names = [n.name for n in onnx.load(str(builds[True][0] / "training_model.onnx")).graph.node
             if n.op_type.startswith("LayerNormChannels")]
    assert all("::lnc/" in n for n in names)


@pytest.mark.parametrize("bits", [(0, 0, 0), (8, 8, 8)], ids=str)
def test_pass_keeps_loss_and_every_gradient(builds, bits):
    """The two builds differ only in the norms' summation order (and at 8 bits the same seeded noise)."""
    loss0, grads0, noise0 = _step(builds[False][0], bits, shape=(3, 3, 10, 10), classes=4)
    loss1, grads1, noise1 = _step(builds[True][0], bits, shape=(3, 3, 10, 10), classes=4)
    assert abs(loss0 - loss1) <= 1e-5 * abs(loss0)
    assert grads0.keys() == grads1.keys() and len(grads0) == 21
    # at 8 bits a value moved by rounding can cross a quantizer step: bound the error by the relative size of one
    # step of the 8-bit error quantizer (1/255), over the whole gradient
    tol = 1e-5 if not any(bits) else 2 / 255
    for name, g in grads0.items():
        err = np.linalg.norm(grads1[name] - g) / max(np.linalg.norm(g), 1e-12)
        assert err <= tol, f"{name}: relative gradient error {err:.2e}"
