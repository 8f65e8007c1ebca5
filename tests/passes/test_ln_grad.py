"""fracgraph's LayerNormGrad (fused_ops.c) against a float64 reference of onnxruntime's LayerNormalizationGrad
formula, within a bound derived from the sums' lengths, the same on 1 and 2 threads; and the ln-grad pass: loss
and every gradient of a LayerNorm model's step with the pass on and off (passes/ln_grad.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from conftest import custom_op_session  # noqa: E402
from fracgraph import kernels  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402

EPS = np.finfo(np.float32).eps


def operands(rows, d, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, d)) * 2 + 0.5).astype(np.float32)
    mean = x.mean(1, keepdims=True, dtype=np.float64)
    inv_std = 1 / np.sqrt(x.var(1, keepdims=True, dtype=np.float64) + 1e-5)
    dy = rng.standard_normal((rows, d)).astype(np.float32)
    scale = (rng.standard_normal(d) * 0.5 + 1).astype(np.float32)
    return dy, x, scale, mean.astype(np.float32), inv_std.astype(np.float32)


def reference(dy, x, scale, mean, inv_std):
    dy, x, scale, mean, inv_std = (t.astype(np.float64) for t in (dy, x, scale, mean, inv_std))
    a, b = dy * scale, (x - mean) * inv_std
    dx = inv_std * (a - a.mean(1, keepdims=True) - b * (a * b).mean(1, keepdims=True))
    return dx, (dy * b).sum(0), dy.sum(0), a, b


# (rows, D): one block, several blocks with a partial last one (32 rows a block), D off the 16 lanes, D < 16,
# a ViT's width, and a shape given as [batch, tokens, D]
CASES = [((3, 5, 128), 1), ((100, 48), 2), ((70, 33), 3), ((9, 7), 4), ((2, 65, 192), 5)]


@pytest.mark.parametrize("shape,seed", CASES, ids=str)
def test_kernel_matches_float64_within_bound(shape, seed):
    d, rows = shape[-1], int(np.prod(shape[:-1]))
    dy, x, scale, mean, inv_std = operands(rows, d, seed)
    outs = []
    for threads in (1, 2):
        sess = custom_op_session("LayerNormGrad", ["dy", "x", "scale", "mean", "inv_std"], ["dx", "ds", "db"], threads)
        feeds = dict(dy=dy.reshape(shape), x=x.reshape(shape), scale=scale, mean=mean.reshape(shape[:-1] + (1,)),
                     inv_std=inv_std.reshape(shape[:-1] + (1,)))
        outs.append(sess.run(None, feeds))
    assert all(np.array_equal(o1, o2) for o1, o2 in zip(*outs))   # the same sums on any thread count
    dx, ds, db = outs[0]
    assert dx.shape == shape and ds.shape == db.shape == (d,)
    rdx, rds, rdb, a, b = reference(dy, x, scale, mean, inv_std)
    # dx: a and b to a few roundings each, their row sums in float lanes of D/16 terms (then double), and the
    # final combination: 8 + D/16 roundings of terms no larger than |a| + |b| max|a b| per element, times inv_std
    terms = np.abs(a) + np.abs(b) * np.abs(a * b).max(1, keepdims=True) + np.abs(a).max(1, keepdims=True)
    bound = (8 + d / 16) * EPS * np.abs(inv_std) * terms
    assert np.all(np.abs(dx.reshape(rows, d) - rdx) <= bound)
    # dscale, dbias: float sums over the up to 32 rows of a block (then double): 34 roundings of the terms' sum
    assert np.all(np.abs(ds - rds) <= 34 * EPS * np.abs(dy * b).sum(0))
    assert np.all(np.abs(db - rdb) <= 34 * EPS * np.abs(dy).sum(0))


def test_kernel_refuses_mismatched_statistics():
    dy, x, scale, mean, inv_std = operands(6, 16, 0)
    sess = custom_op_session("LayerNormGrad", ["dy", "x", "scale", "mean", "inv_std"], ["dx", "ds", "db"], 1)
    with pytest.raises(Exception, match="one value per normalized row"):
        sess.run(None, dict(dy=dy, x=x, scale=scale, mean=mean[:5], inv_std=inv_std[:5]))


class LnNet(torch.nn.Module):
    """A token MLP block with pre-LayerNorm (the ViTs' and the GPT's use) and a final LayerNorm over two axes."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(9, 24)
        self.ln0 = torch.nn.LayerNorm(24)
        self.fc = torch.nn.Linear(24, 24)
        self.ln1 = torch.nn.LayerNorm([3, 24])
        self.head = torch.nn.Linear(24, 4)

    def forward(self, x):   # x [N, 3, 3, 3] read as 3 tokens of 9
        t = self.embed(x.flatten(2))
        t = t + self.fc(torch.relu(self.ln0(t)))
        return self.head(self.ln1(t).mean(1))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(LnNet(), tmp_path_factory.mktemp("ln"), (2, 3, 3, 3), off={"skip_passes": ("ln-grad",)}, on={})


def test_pass_structure(builds):
    def grads(key):
        return sorted((n.domain, n.op_type) for n in onnx.load(str(builds[key][0] / "training_model.onnx")).graph.node
                      if "LayerNorm" in n.op_type and "Grad" in n.op_type)

    assert grads(False) == [("com.microsoft", "LayerNormalizationGrad")] * 2
    assert grads(True) == [(kernels.DOMAIN, "LayerNormGrad")] * 2
    assert "[ln-grad] 2 LayerNormalizationGrad on fracgraph's LayerNormGrad" in builds[True][1].extra["notes"]


def test_pass_keeps_loss_and_every_gradient(builds):
    """0 bits (FP32): the two builds differ only in the LayerNorm backward's summation order."""
    loss0, grads0, _ = _step(builds[False][0], (0, 0, 0), shape=(4, 3, 3, 3), classes=4)
    loss1, grads1, _ = _step(builds[True][0], (0, 0, 0), shape=(4, 3, 3, 3), classes=4)
    assert loss0 == loss1 and grads0.keys() == grads1.keys() and len(grads0) == 10
    for name, g in grads0.items():
        err = np.linalg.norm(grads1[name] - g) / max(np.linalg.norm(g), 1e-12)
        assert err <= 1e-5, f"{name}: relative gradient error {err:.2e}"
