"""BatchNormGrad (fracgraph/kernels/fused_ops.c) against a float64 numpy batch-norm backward, and the bn-grad pass
against onnxruntime's BatchNormalizationGrad: loss and every gradient with the pass on and off (another summation
order, so the tolerances of tests/passes/test_speed_passes.py)."""

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


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(ConvZoo(), tmp_path_factory.mktemp("bn"), (2, 3, 9, 9), off={"skip_passes": ("bn-grad",)}, on={})


def test_pass_structure(builds):
    graph = onnx.load(str(builds[True][0] / "training_model.onnx")).graph
    assert [n.domain for n in graph.node if n.op_type.startswith("BatchNorm") and "Grad" in n.op_type] == [kernels.DOMAIN]
    assert "[bn-grad] 1 BatchNormalizationGrad on fracgraph's BatchNormGrad" in builds[True][1].extra["notes"]


@pytest.mark.parametrize("bits,tol", [((0, 0, 0), 1e-5), ((8, 8, 8), 1e-4), ((4, 4, 6), 1e-4)])
def test_pass_keeps_loss_and_every_gradient(builds, bits, tol):
    assert_same_step(builds[False][0], builds[True][0], bits, tol)
