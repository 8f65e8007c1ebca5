"""LayerNormGrad's optional sixth input R (fracgraph/kernels/fused_ops.c): dX + R bitwise the kernel's dX plus R in
float32 (the Sum it replaces), on 1 and 2 threads, and refused when R's shape is not dY's; and the ln-grad-sum pass
on a pre-norm token net: the residual gradient's Sum folded, the step's loss and every gradient bitwise the same
with the pass on and off at 0, 8/8/8 and 4/4/6 bits, at two batch sizes (passes/ln_grad_sum.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from conftest import assert_steps_bitwise, custom_op_session, f32_bits  # noqa: E402
from fracgraph import kernels  # noqa: E402
from test_ln_grad import CASES, LnNet, operands  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402

INS = ["dy", "x", "scale", "mean", "inv_std"]




@pytest.mark.parametrize("shape,seed", CASES + [((32, 17, 192), 6)], ids=str)
def test_residual_input_is_the_sum_bit_for_bit(shape, seed):
    d, rows = shape[-1], int(np.prod(shape[:-1]))
    dy, x, scale, mean, inv_std = operands(rows, d, seed)
    feeds = dict(dy=dy.reshape(shape), x=x.reshape(shape), scale=scale, mean=mean.reshape(shape[:-1] + (1,)),
                 inv_std=inv_std.reshape(shape[:-1] + (1,)))
    r = (np.random.default_rng(seed).standard_normal(shape) * 3).astype(np.float32)
    dx, ds, db = custom_op_session("LayerNormGrad", INS, ["dx", "ds", "db"], 1).run(None, feeds)
    for threads in (1, 2):
        got = custom_op_session("LayerNormGrad", INS + ["r"], ["dx", "ds", "db"], threads).run(None, dict(feeds, r=r))
        assert np.array_equal(f32_bits(got[0]), f32_bits(dx + r))   # numpy's float32 add: one rounding, the Sum's
        assert np.array_equal(f32_bits(got[1]), f32_bits(ds)) and np.array_equal(f32_bits(got[2]), f32_bits(db))


def test_residual_of_another_shape_is_refused():
    dy, x, scale, mean, inv_std = operands(6, 16, 0)
    sess = custom_op_session("LayerNormGrad", INS + ["r"], ["dx", "ds", "db"], 1)
    with pytest.raises(Exception, match="R must have dY's shape"):
        sess.run(None, dict(dy=dy, x=x, scale=scale, mean=mean, inv_std=inv_std, r=np.zeros((6, 1), np.float32)))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(LnNet(), tmp_path_factory.mktemp("lns"), (2, 3, 3, 3), off={"skip_passes": ("ln-grad-sum",)},
                      on={})


def _ops(art):
    return [(n.domain, n.op_type, len(n.input)) for n in onnx.load(str(art / "training_model.onnx")).graph.node]


def test_pass_structure(builds):
    off, on = _ops(builds[False][0]), _ops(builds[True][0])
    sums = lambda ops: sum(1 for d, t, _ in ops if t == "Sum")   # noqa: E731
    assert [k for d, t, k in off if t == "LayerNormGrad"] == [5, 5]
    assert sorted(k for d, t, k in on if t == "LayerNormGrad") == [5, 6]   # ln0's dX meets the residual's; ln1's not
    assert sums(on) == sums(off) - 1
    notes = builds[True][1].extra["notes"]
    assert "[ln-grad-sum] 1 residual gradient Sums folded into LayerNormGrad" in notes


@pytest.mark.parametrize("step_bits", [(0, 0, 0), (8, 8, 8), (4, 4, 6)])
@pytest.mark.parametrize("batch", [5, 3])
def test_pass_keeps_loss_and_every_gradient(builds, step_bits, batch):
    assert_steps_bitwise(_step(builds[False][0], step_bits, shape=(batch, 3, 3, 3), classes=4),
                         _step(builds[True][0], step_bits, shape=(batch, 3, 3, 3), classes=4), 10)
