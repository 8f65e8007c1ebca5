"""BatchNormGrad and BatchNormTrain (fracgraph/kernels/fused_ops.c) against float64 numpy batch norms, and the
bn-grad pass against onnxruntime's BatchNormalizationGrad and BatchNormInternal: loss and every gradient with the
pass on and off (another summation order, so the tolerances of tests/passes/test_speed_passes.py), and the running
statistics after training steps (the eval graph's output)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from fracgraph import kernels  # noqa: E402

from conftest import custom_op_session  # noqa: E402
from test_speed_passes import ConvZoo, assert_same_step, build_pair  # noqa: E402


def bn_grad(dy, x, scale, mean, inv_std, threads):
    sess = custom_op_session("BatchNormGrad", ["dy", "x", "scale", "mean", "inv_std"], ["dx", "ds", "db"], threads)
    return sess.run(None, dict(dy=dy, x=x, scale=scale, mean=mean, inv_std=inv_std))


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 37), (9, 16, 6, 7), (2, 1, 5, 5)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_float64(shape, threads):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    axes = (0,) + tuple(range(2, len(shape)))
    mean = x.mean(axes).astype(np.float32)
    inv_std = (1 / np.sqrt(x.var(axes) + 1e-5)).astype(np.float32)
    scale = rng.standard_normal(shape[1]).astype(np.float32)
    dx, ds, db = bn_grad(dy, x, scale, mean, inv_std, threads)
    bc = (1, -1) + (1,) * (len(shape) - 2)
    xd, dyd, m = x.astype(np.float64), dy.astype(np.float64), x.size / shape[1]
    xmu = xd - mean.reshape(bc)
    ref_db = dyd.sum(axes)
    s = (dyd * xmu).sum(axes)
    ref_ds = s * inv_std
    ref_dx = (scale * inv_std).reshape(bc) * (dyd - (ref_db / m).reshape(bc) - xmu * (inv_std ** 2 * s / m).reshape(bc))
    for got, ref in ((dx, ref_dx), (ds, ref_ds), (db, ref_db)):
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)


def test_kernel_refuses_mismatched_channels():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(Exception, match="one value per channel"):
        bn_grad(x, x, np.ones(2, np.float32), np.zeros(3, np.float32), np.ones(3, np.float32), 1)


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 37), (9, 16, 6, 7), (2, 1, 5, 5)])
def test_forward_kernel_matches_float64(shape):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    c = shape[1]
    scale, bias = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    rmean, rvar = rng.standard_normal(c).astype(np.float32), (rng.random(c) + 0.5).astype(np.float32)
    sess = custom_op_session("BatchNormTrain", ["x", "scale", "b", "rm", "rv"], ["y", "rm2", "rv2", "mean", "inv_std"], 2,
                             epsilon=1e-5, momentum=0.9)
    y, rm2, rv2, mean, inv_std = sess.run(None, dict(x=x, scale=scale, b=bias, rm=rmean.copy(), rv=rvar.copy()))
    axes = (0,) + tuple(range(2, len(shape)))
    bc = (1, -1) + (1,) * (len(shape) - 2)
    xd = x.astype(np.float64)
    ref_mean, ref_var = xd.mean(axes), xd.var(axes)
    ref_inv = 1 / np.sqrt(ref_var + 1e-5)
    ref_y = (xd - ref_mean.reshape(bc)) * (ref_inv * scale).reshape(bc) + bias.reshape(bc)
    for got, ref in ((mean, ref_mean), (inv_std, ref_inv), (y, ref_y), (rm2, rmean * 0.9 + ref_mean * 0.1),
                     (rv2, rvar * 0.9 + ref_var * 0.1)):
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(ConvZoo(), tmp_path_factory.mktemp("bn"), (2, 3, 9, 9), off={"skip_passes": ("bn-grad", "bn-relu")},
                      on={"skip_passes": ("bn-relu",)})   # bn-relu (test_bn_relu.py) would fuse the BN further


def test_pass_structure(builds):
    graph = onnx.load(str(builds[True][0] / "training_model.onnx")).graph
    assert [n.domain for n in graph.node if n.op_type.startswith("BatchNorm") and "Grad" in n.op_type] == [kernels.DOMAIN]
    assert [n.domain for n in graph.node if n.op_type in ("BatchNormInternal", "BatchNormTrain")] == [kernels.DOMAIN]
    assert "[bn-grad] 1 BatchNormalizationGrad on fracgraph's BatchNormGrad, 1 BatchNormInternal on BatchNormTrain" \
        in builds[True][1].extra["notes"]


def test_running_statistics_are_updated_in_place(builds):
    """onnxruntime's BatchNormInternal updates the model's running mean and variance (frozen parameters, which the
    eval graph reads) through its output aliases; BatchNormTrain writes them in place too: after three steps they
    have moved, and by the same amounts in both builds."""
    from fracgraph.runtime import TrainSession

    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 3, 9, 9)).astype(np.float32) * 2 + 1
    y = rng.integers(0, 4, 6).astype(np.int64)
    stats = {}
    for key in (False, True):
        sess = TrainSession(builds[key][0], seed=0, threads=1)
        names = sorted(n for n, _ in sess.state.parameters if "running_" in n)
        before = {n: sess.parameter(n) for n in names}
        bits = np.zeros((sess.manifest.n_blocks, 3), np.float32)
        for _ in range(3):
            sess.step(x, y, bits, lr=0.0)
        stats[key] = {n: sess.parameter(n) for n in names}
        assert names and all(np.abs(stats[key][n] - before[n]).max() > 1e-2 for n in names)
    assert stats[True].keys() == stats[False].keys()
    for n, v in stats[False].items():
        assert np.allclose(stats[True][n], v, rtol=1e-5, atol=1e-6), n
