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


def kernel_order(dy, x, scale, mean, inv_std, rows_per_block=32, lanes=16):
    """The kernel's arithmetic in its own order, in numpy float32 (each array op rounds like the C statement): each
    row's sums of a = dY scale and a b in 16 float lanes over the 16-element chunks, then the tail into lane 0, the
    lanes added in double; dX = inv_std ((a - mean(a)) - b mean(a b)); dscale and dbias as float sums down the rows
    of each 32-row block, the blocks added in double in block order. The vectorized row loop must give exactly this."""
    rows, d = dy.shape
    a = dy * scale
    b = (x - mean) * inv_std
    ab = a * b
    sa, sab = np.zeros((rows, lanes), np.float32), np.zeros((rows, lanes), np.float32)
    full = d // lanes * lanes
    for i in range(0, full, lanes):
        sa += a[:, i:i + lanes]
        sab += ab[:, i:i + lanes]
    for i in range(full, d):
        sa[:, 0] += a[:, i]
        sab[:, 0] += ab[:, i]
    ma, mab = np.zeros(rows), np.zeros(rows)
    for l in range(lanes):
        ma += sa[:, l].astype(np.float64)
        mab += sab[:, l].astype(np.float64)
    fa, fab = (ma / d).astype(np.float32)[:, None], (mab / d).astype(np.float32)[:, None]
    dx = inv_std * ((a - fa) - b * fab)
    acc_s, acc_b = np.zeros(d), np.zeros(d)
    for r0 in range(0, rows, rows_per_block):
        ps, pb = np.zeros(d, np.float32), np.zeros(d, np.float32)
        for r in range(r0, min(r0 + rows_per_block, rows)):
            ps += dy[r] * b[r]
            pb += dy[r]
        acc_s += ps
        acc_b += pb
    return dx, acc_s.astype(np.float32), acc_b.astype(np.float32)


@pytest.mark.parametrize("shape,seed", CASES + [((32, 17, 192), 6)], ids=str)
def test_kernel_is_its_order_bit_for_bit(shape, seed):
    """Bitwise the float32 model of the kernel's order (kernel_order): the row loop's vectorization (restrict
    operands, session 13) changes no value, and any later change to the order shows here, not only in a bound."""
    d, rows = shape[-1], int(np.prod(shape[:-1]))
    dy, x, scale, mean, inv_std = operands(rows, d, seed)
    sess = custom_op_session("LayerNormGrad", ["dy", "x", "scale", "mean", "inv_std"], ["dx", "ds", "db"], 2)
    dx, ds, db = sess.run(None, dict(dy=dy, x=x, scale=scale, mean=mean, inv_std=inv_std))
    want = kernel_order(dy, x, scale, mean, inv_std)
    for got, ref in zip((dx, ds, db), want):
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


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
