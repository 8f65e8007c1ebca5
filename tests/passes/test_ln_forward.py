"""fracgraph's LayerNorm (kernels/layer_norm.c) bit for bit onnxruntime's own LayerNormalization (Y, mean and
inv_std) on the transformers' shapes and odd ones (rows off the kernel's 8-row groups and 64-row tasks, D below 16,
an axis over two dims, 1 and 2 threads); and the ln-forward pass on a pre-norm token net: every LayerNormalization
taken, and the step's loss and every gradient bitwise the same with the pass on and off at 0, 8/8/8 and 4/4/6 bits
(passes/ln_forward.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from conftest import assert_steps_bitwise, custom_op_session, f32_bits  # noqa: E402
from fracgraph import kernels  # noqa: E402

from test_ln_grad import LnNet  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402


def session(op: str, axis: int, eps: float, threads: int):
    """fracgraph's LayerNorm or onnxruntime's LayerNormalization alone, with the same session settings."""
    return custom_op_session(op, ["x", "s", "b"], ["y", "m", "i"], threads, op_domain=None if op == "LayerNorm" else "",
                             axis=axis, epsilon=eps)




# (shape, axis, eps): vit_tiny's [B, 17, 192] (544 rows: 8 tasks of 64, 68 groups of 8), a 197-token ViT, rows off
# the 8-row groups and the 64-row tasks, D below 16, the normalized axes two dims, a large offset (the float sums'
# cancellation in q / D - mean^2 must round exactly as onnxruntime's), and a single row
CASES = [((32, 17, 192), -1, 1e-6), ((2, 197, 192), -1, 1e-6), ((3, 67, 40), -1, 1e-5), ((5, 7), -1, 1e-5),
         ((4, 9, 3, 11), 2, 1e-5), ((70, 64), 1, 1e-12), ((1, 24), -1, 1e-5)]


@pytest.mark.parametrize("shape,axis,eps", CASES, ids=str)
def test_kernel_is_onnxruntimes_layer_norm_bit_for_bit(shape, axis, eps):
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    norm = shape[axis % len(shape):]
    x = (rng.standard_normal(shape) * rng.choice([0.01, 1.0, 30.0], shape) + 5.0).astype(np.float32)
    feeds = dict(x=x, s=rng.standard_normal(norm).astype(np.float32), b=rng.standard_normal(norm).astype(np.float32))
    want = session("LayerNormalization", axis, eps, 1).run(None, feeds)
    assert want[1].shape == want[2].shape == shape[:axis % len(shape)] + (1,) * len(norm)
    for threads in (1, 2):
        got = session("LayerNorm", axis, eps, threads).run(None, feeds)
        for g, w in zip(got, want):
            assert g.shape == w.shape and np.array_equal(f32_bits(g), f32_bits(w))
    # and the formula against float64 (what both compute): Y within the float sums' rounding, relative to the row
    x64 = x.reshape(-1, int(np.prod(norm))).astype(np.float64)
    mean = x64.mean(1, keepdims=True)
    sd = np.sqrt((x64 * x64).mean(1, keepdims=True) - mean ** 2 + eps)
    y64 = (x64 - mean) / sd * feeds["s"].reshape(-1) + feeds["b"].reshape(-1)
    d = x64.shape[1]
    # s and q: d float adds each; var = q/d - mean^2 loses digits by the ratio of mean^2 to var
    rel = (d + 8) * np.finfo(np.float32).eps * (1 + (x64 * x64).mean(1, keepdims=True) / sd ** 2)
    err = np.abs(got[0].reshape(x64.shape) - y64)
    assert np.all(err <= rel * (np.abs((x64 - mean) / sd) + 1) * np.abs(feeds["s"].reshape(-1)) + 1e-6)


def test_kernel_refuses_a_scale_of_another_size():
    x = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(Exception, match="scale and bias"):
        session("LayerNorm", -1, 1e-5, 1).run(None, dict(x=x, s=np.ones(7, np.float32), b=np.ones(8, np.float32)))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(LnNet(), tmp_path_factory.mktemp("lnf"), (2, 3, 3, 3), off={"skip_passes": ("ln-forward",)},
                      on={})


def _ops(art):
    return [(n.domain, n.op_type) for n in onnx.load(str(art / "training_model.onnx")).graph.node]


def test_pass_structure(builds):
    off, on = _ops(builds[False][0]), _ops(builds[True][0])
    assert off.count(("", "LayerNormalization")) == 2 and ("", "LayerNormalization") not in on
    assert on.count((kernels.DOMAIN, "LayerNorm")) == 2
    assert "[ln-forward] 2 LayerNormalization on fracgraph's LayerNorm" in builds[True][1].extra["notes"]


@pytest.mark.parametrize("step_bits", [(0, 0, 0), (8, 8, 8), (4, 4, 6)])
@pytest.mark.parametrize("batch", [5, 3])
def test_pass_keeps_loss_and_every_gradient(builds, step_bits, batch):
    """Y, mean and inv_std are onnxruntime's bits, so the whole step is: loss and all 10 gradients equal, at batch
    sizes other than the export's."""
    assert_steps_bitwise(_step(builds[False][0], step_bits, shape=(batch, 3, 3, 3), classes=4),
                         _step(builds[True][0], step_bits, shape=(batch, 3, 3, 3), classes=4), 10)
