"""One training step of the generated artifacts against an independent PyTorch implementation of the FW/BW step.

The reference is written from the spec (fractrain.md §1), not from the ONNX graph: a straight-through fake
quantizer on conv inputs and weights, and an identity-forward / quantized-backward op on conv outputs using the
very stochastic-rounding noise the ORT step drew (exposed as graph outputs). Each error quantizer is checked on the
error ORT quantized and the backward continues from ORT's quantized error (conftest.ErrorReplay), so that a
float-order difference cannot flip a stochastic rounding and cascade into the gradients of the layers below.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402

from conftest import STE, ErrorReplay, GradQ, fq_ref  # noqa: E402


def quantized_forward(model, x, bits, noises, replay=None):
    """The SmallResNet forward with every conv quantized at (a, w, g) = bits, FC in FP32 (`replay`: an ErrorReplay)."""
    a, w, g = bits

    def qconv(name, inp):
        conv = getattr(model, name)
        out = F.conv2d(STE.apply(inp, a, False), STE.apply(conv.weight, w, True), None, conv.stride, conv.padding)
        gemm = f"/{name}/Conv"
        return GradQ.apply(out, g, noises.get(gemm), None if replay is None else (replay, gemm))

    h = torch.relu(model.bn0(qconv("stem", x)))
    y = torch.relu(model.bn1(qconv("conv1", h)))
    y = model.bn2(qconv("conv2", y))
    h = torch.relu(y + model.bn3(qconv("down", h)))
    return model.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.fixture(scope="module", params=["independent", "shared", "fused-rng"])
def artifacts(small_model, tmp_path_factory, request):
    """Every noise mode: the replayed step must match PyTorch whichever way the noise was drawn. The exposed
    modes read it from graph outputs; fused-rng (the default build, its errors exposed) regenerates the fused
    kernels' stream."""
    _, path = small_model
    out = tmp_path_factory.mktemp("art") / "art"
    if request.param == "fused-rng":
        build_artifacts(path, out, BuildOptions(expose_errors=True))
    else:
        build_artifacts(path, out, BuildOptions(expose_noise=True, expose_errors=True, sr_noise=request.param))
    return out


def replay_noises(sess, names, outs, seed):
    """Per conv: the BW noise of this first step, exposed by the graph or regenerated from the fused kernels'
    counter-based stream (call 0 of the node's salt under the session seed; conftest.sr_noise_ref)."""
    exposed = {n.split("::bwq")[0]: torch.from_numpy(np.asarray(o)) for n, o in zip(names, outs) if n.endswith("/noise")}
    if exposed or not sess.manifest.extra.get("custom_ops"):
        return exposed
    from conftest import sr_noise_ref
    from fracgraph.passes.fused_ops import salt

    def stream(gemm):
        return lambda shape: torch.from_numpy(sr_noise_ref(seed, salt(f"{gemm}::bwq"), 0, int(np.prod(shape))).reshape(shape))

    return {f"/{c}/Conv": stream(f"/{c}/Conv") for c in ("stem", "conv1", "conv2", "down")}


@pytest.mark.parametrize("bits", [(8, 8, 8), (4, 4, 6), (3, 4, 8)])
def test_quantized_step_matches_pytorch(small_model, artifacts, batch, bits):
    model, _ = small_model
    x, y = batch
    sess = TrainSession(artifacts, seed=0)
    names = sess.module.output_names()
    n_blocks = sess.manifest.n_blocks
    outs = sess.forward_backward(x, y, np.tile(np.array(bits, np.float32), (n_blocks, 1)))
    noises = replay_noises(sess, names, outs, 0)
    assert len(noises) == 4

    ref = copy.deepcopy(model).train()
    replay = ErrorReplay(sess.last_outputs, fq_ref)
    loss = F.cross_entropy(quantized_forward(ref, torch.from_numpy(x), bits, noises, replay), torch.from_numpy(y))
    loss.backward()
    assert sorted(replay.seen) == sorted(f"/{c}/Conv" for c in ("stem", "conv1", "conv2", "down"))
    assert abs(float(outs[0]) - loss.item()) <= 1e-4 * abs(loss.item())
    grads = dict(ref.named_parameters())
    for name in sess.trainable:
        assert rel_err(sess.gradient(name), grads[name].grad.numpy()) <= 1e-4, name


def test_zero_bits_matches_unquantized_ort_step(small_model, artifacts, batch, tmp_path):
    """0 bits everywhere = FP32 passthrough: same loss and gradients as artifacts built from the raw model."""
    import onnx
    from onnxruntime.training import api, artifacts as ort_artifacts

    from fracgraph.build import classify_initializers
    from fracgraph.model import load_model

    _, path = small_model
    x, y = batch
    plain = load_model(path)
    trainable, frozen = classify_initializers(plain)
    ort_artifacts.generate_artifacts(plain, requires_grad=trainable, frozen_params=frozen,
                                     loss=ort_artifacts.LossType.CrossEntropyLoss, artifact_directory=str(tmp_path))
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = api.Module(str(tmp_path / "training_model.onnx"), state)
    module.train()
    out = module(x, y)
    ref_loss = float(out[0] if isinstance(out, (list, tuple)) else out)

    sess = TrainSession(artifacts, seed=0)
    loss = float(sess.forward_backward(x, y, np.zeros((sess.manifest.n_blocks, 3), np.float32))[0])
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name in trainable:
        assert rel_err(sess.gradient(name), np.array(state.parameters[name].grad)) <= 1e-5, name
    assert onnx.load(str(artifacts / "training_model.onnx"))  # artifacts stay loadable


def test_shared_noise_is_one_draw_read_at_random_offsets(small_model, tmp_path, batch):
    """--sr-noise shared: every error quantizer's noise is a contiguous piece of one U(-0.5, 0.5) draw (the largest
    layer's noise is the whole draw), at offsets that change from step to step."""
    _, path = small_model
    art = tmp_path / "shared"
    build_artifacts(path, art, BuildOptions(expose_noise=True, sr_noise="shared"))
    x, y = batch
    sess = TrainSession(art, seed=0)
    bits = np.tile(np.array([8, 8, 8], np.float32), (sess.manifest.n_blocks, 1))
    offsets = []
    for _ in range(2):
        outs = sess.forward_backward(x, y, bits)
        noises = [np.asarray(o).ravel() for n, o in zip(sess.module.output_names(), outs) if n.endswith("/noise")]
        draw = max(noises, key=len)
        assert len(noises) == 4 and len(np.unique(draw)) > 0.99 * len(draw)
        assert draw.min() >= -0.5 and draw.max() < 0.5 and abs(draw.mean()) < 0.02
        step = []
        for nz in noises:
            starts = np.flatnonzero(draw == nz[0])
            hits = [int(o) for o in starts if o + len(nz) <= len(draw) and np.array_equal(draw[o:o + len(nz)], nz)]
            assert hits, "a layer's noise is not a contiguous piece of the shared draw"
            step.append(hits[0])
        offsets.append((draw[:4].tolist(), step))
    assert offsets[0] != offsets[1]
