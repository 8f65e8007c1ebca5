"""fracgraph's ChannelMulGrad (kernels/channel_mul.c): dA bitwise numpy's float32 product, dg against a float64
sum within a bound from the lanes' lengths, the same on 1 and 2 threads; and the channel-mul pass on a
ConvNeXt-style net (layer scale): structure, and loss and every gradient of a step with the pass on and off."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from conftest import custom_op_session  # noqa: E402
from fracgraph import kernels  # noqa: E402
from test_ln_channels import CnxNet  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402

EPS = np.finfo(np.float32).eps

# [N, C, S...] and g's shape: planes off the 16 lanes (7x7: three vectors and a tail), tiny planes below a vector
# (2x2, 1x1, 13, 15: the per-plane double path, many planes per task), a plane of exactly one vector (4x4),
# planes above a task (160x160 > 16384), rank 3 and 2, g as [C, 1, 1]
CASES = [((2, 5, 7, 7), (1, 5, 1, 1)), ((32, 320, 2, 2), (1, 320, 1, 1)), ((2, 3, 160, 160), (1, 3, 1, 1)),
         ((3, 6, 13), (1, 6, 1)), ((5, 9), (1, 9)), ((2, 4, 3, 5), (4, 1, 1)), ((6, 160, 4, 4), (1, 160, 1, 1)),
         ((7, 320, 1, 1), (1, 320, 1, 1))]


@pytest.mark.parametrize("shape,gshape", CASES, ids=str)
def test_kernel(shape, gshape):
    rng = np.random.default_rng(sum(shape))
    dy = rng.standard_normal(shape).astype(np.float32)
    a = (rng.standard_normal(shape) + 0.3).astype(np.float32)
    g = rng.standard_normal(gshape).astype(np.float32)
    outs = [custom_op_session("ChannelMulGrad", ["dy", "a", "g"], ["da", "dg"], t).run(None, dict(dy=dy, a=a, g=g))
            for t in (1, 2)]
    assert all(np.array_equal(x, y) for x, y in zip(*outs))
    da, dg = outs[0]
    gb = g.reshape((1, -1) + (1,) * (len(shape) - 2))
    assert np.array_equal(da, dy * gb)   # the same float multiply
    axes = (0, *range(2, len(shape)))
    assert dg.shape == (1, shape[1]) + (1,) * (len(shape) - 2)
    prod = dy.astype(np.float64) * a.astype(np.float64)
    ref = prod.sum(axes, keepdims=True)
    s = int(np.prod(shape[2:]))
    # each product rounded once, each lane a float sum of ceil(S/16) terms, then double: (2 + S/16) roundings
    assert np.all(np.abs(dg - ref) <= (2 + s / 16) * EPS * np.abs(prod).sum(axes, keepdims=True))


def test_kernel_refuses_wrong_channel_count():
    sess = custom_op_session("ChannelMulGrad", ["dy", "a", "g"], ["da", "dg"], 1)
    x = np.ones((2, 4, 3, 3), np.float32)
    with pytest.raises(Exception, match="one value per channel"):
        sess.run(None, dict(dy=x, a=x, g=np.ones((1, 3, 1, 1), np.float32)))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(CnxNet(), tmp_path_factory.mktemp("cmul"), (2, 3, 10, 10), off={"skip_passes": ("channel-mul",)},
                      on={})


def test_pass_structure(builds):
    def ops(key):
        return [(n.domain, n.op_type, n.name) for n in onnx.load(str(builds[key][0] / "training_model.onnx")).graph.node]

    off, on = ops(False), ops(True)
    fused = [n for d, t, n in on if (d, t) == (kernels.DOMAIN, "ChannelMulGrad")]
    assert len(fused) == 1 and fused[0].endswith("::cmul")   # the layer scale's; nothing else is a channel scale
    assert sum(t == "ReduceSum" for _, t, _ in off) - sum(t == "ReduceSum" for _, t, _ in on) == 1
    assert sum(t == "Mul" for _, t, _ in off) - sum(t == "Mul" for _, t, _ in on) == 2
    assert "[channel-mul] 1 channel-scale gradient (Mul, Mul, ReduceSum) on fracgraph's ChannelMulGrad" in \
        builds[True][1].extra["notes"]


@pytest.mark.parametrize("bits", [(0, 0, 0), (8, 8, 8)], ids=str)
def test_pass_keeps_loss_and_every_gradient(builds, bits):
    """dA is bitwise; dgamma differs by summation order only. At 8 bits the same seeded noise: every gradient but
    the layer scale's is then bitwise (the quantized error reads dA), gamma's within its sum's rounding."""
    loss0, grads0, _ = _step(builds[False][0], bits, shape=(3, 3, 10, 10), classes=4)
    loss1, grads1, _ = _step(builds[True][0], bits, shape=(3, 3, 10, 10), classes=4)
    assert loss0 == loss1 and grads0.keys() == grads1.keys() and len(grads0) == 21
    for name, g in grads0.items():
        if g.shape == (1, 8, 1, 1):   # the layer scale (the exporter folds gamma.view(1, -1, 1, 1) into it)
            assert np.linalg.norm(grads1[name] - g) <= 1e-5 * np.linalg.norm(g)
        else:
            assert np.array_equal(grads1[name], g), name
