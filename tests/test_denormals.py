"""The step runs with denormals flushed to zero (runtime.SESSION_TUNING["flush_denormals"]): onnxruntime's Softmax
on causally masked scores, and GELU's gradient, underflow into denormals, which x86 computes in microcode. The
caller's thread gets its own mode back after every call, and the step's numbers are those of an unflushed step."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from fracgraph.runtime import TrainSession, _flushing, flushed_denormals  # noqa: E402


def test_flush_is_scoped_to_the_call():
    assert not _flushing()
    with flushed_denormals():
        assert _flushing()
        with flushed_denormals():          # nested: the outer scope still restores
            assert _flushing()
        assert _flushing()
    assert not _flushing()
    with flushed_denormals(False):
        assert not _flushing()


@pytest.fixture(scope="module")
def gpt_art(tmp_path_factory):
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.zoo import export_gpt

    d = tmp_path_factory.mktemp("den")
    export_gpt(d / "gpt.onnx", seed=0, layers=1, heads=2, width=16, context=8, vocab=11)
    build_artifacts(d / "gpt.onnx", d / "art", BuildOptions(optimizer="adamw"))
    return d / "art"


def test_step_with_flushed_denormals_equals_the_plain_step(gpt_art):
    """Loss, logits and every gradient of a FW8 step (FP32 errors: no stochastic rounding to flip) with the flush
    on and off agree to float32 rounding; the thread's mode is back after creating, stepping and evaluating."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, (4, 8)).astype(np.int64)
    labels = rng.integers(0, 11, (4, 8)).astype(np.int64)
    out = {}
    for flush in (True, False):
        sess = TrainSession(gpt_art, seed=0, threads=1, tuning={"flush_denormals": flush})
        bits = np.tile(np.array([8, 8, 0], np.float32), (sess.manifest.n_blocks, 1))
        loss, logits = sess.forward_backward(ids, labels, bits)[:2]
        out[flush] = (float(loss), np.asarray(logits), {n: sess.gradient(n) for n in sess.trainable})
        sess.step(ids, labels, bits, 1e-3)
        sess.evaluate(ids, labels, bits)
        assert not _flushing()
    (l1, z1, g1), (l0, z0, g0) = out[True], out[False]
    assert l1 == pytest.approx(l0, rel=1e-6)
    np.testing.assert_allclose(z1, z0, rtol=1e-5, atol=1e-6)
    for n in g0:
        np.testing.assert_allclose(g1[n], g0[n], rtol=1e-4, atol=1e-7 * np.abs(g0[n]).max())
