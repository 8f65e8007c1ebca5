"""DFQ `--granularity candidates` (the released CIFAR code's K-candidate block, spec §3.3): one ORT step against a
PyTorch implementation of that block: every candidate computed on the full batch at its own (a_k, w, g_k) with its
own BatchNorm batch statistics (shared parameters), mixed per sample by the straight-through one-hot; loss, logits,
choices, cp, every gradient and the BatchNorm running statistics (K successive updates)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.errors import FracgraphError  # noqa: E402
from fracgraph.passes.dfq_gate import COUNTS_OUTPUT, CP_OUTPUT, DfqOptions  # noqa: E402
from fracgraph.policy import LayerPolicy  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402

from conftest import ErrorReplay, export  # noqa: E402
from test_dfq_gate import (STE, GradQ, TwoBlockNet, _inputs, choose, finish_step, fq, gate_probs,  # noqa: E402
                           rel_err, torch_gate)

# the CIFAR-like set has two candidates with equal act bits (their forwards agree, their error quantizers must not be
# merged); the high_bw set has distinct act bits, so the BN update order is visible. Every error quantizer is
# checked on ORT's input and the reference continues from ORT's quantized error (conftest.ErrorReplay), so
# every gradient is compared at 1e-4 in both.
OPTION_SETS = {"cifar": [[3, 6], [4, 6], [4, 12]], "high_bw": [[3, 20], [4, 22], [6, 24]]}
W = 4
BNS = ("bn1", "bn2", "bn3", "bn4", "bn5")


def reference_step(model, gate, x, y, beta, target, noises, block_macs, OPTIONS, replay=None):
    """The release's ResNetRecurrentGateSP block loop: out_k = relu(block(x, a_k, w, g_k)) for every k on the full
    batch, x = sum_k m[:, k] out_k; the cost as in the other modes (per sample)."""
    acts = torch.tensor([a for a, _ in OPTIONS], dtype=torch.float32)
    grads = torch.tensor([g for _, g in OPTIONS], dtype=torch.float32)
    unit = (acts * W + grads * W + acts * grads) / 1024.0
    Fl = torch.tensor(block_macs, dtype=torch.float64)
    Fn = (Fl / Fl.mean()).float()
    B = x.shape[0]
    h = model.stem_fn(x)
    state, cost, chosen = None, 0.0, []
    for l, block in enumerate((model.block0, model.block1)):
        p, state = gate_probs(gate, l, h, state)
        c, hard, mask = choose(p, batch=False)
        cost = cost + (mask * unit).sum() * Fn[l]
        chosen.append(c.numpy())
        mixed = 0.0
        for k in range(len(OPTIONS)):
            def qconv(name, inp, k=k):
                conv = getattr(model, name)
                out = F.conv2d(STE.apply(inp, acts[k], False), STE.apply(conv.weight, W, True), None, conv.stride,
                               conv.padding)
                gemm = f"/{name}/Conv::cand{k}"
                return GradQ.apply(out, grads[k], noises[gemm], None if replay is None else (replay, gemm))

            mixed = mixed + mask[:, k].view(-1, 1, 1, 1) * torch.relu(block(h, qconv))
        h = mixed
    return finish_step(model, h, y, cost, B, block_macs, target, beta, chosen)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(1)
    model = TwoBlockNet()
    d = tmp_path_factory.mktemp("cands")
    path = export(model, d / "two.onnx")
    arts = {}
    for name, options in OPTION_SETS.items():
        arts[name] = d / name
        build_artifacts(path, arts[name], BuildOptions(dfq=DfqOptions(options=options, granularity="candidates"),
                                                       policy=LayerPolicy(first="fp32"), expose_noise=True,
                                                       expose_errors=True))
    return model, arts


def _gate(sess, options):
    import test_dfq_gate as base

    saved, base.OPTIONS = base.OPTIONS, options
    try:
        return torch_gate(sess, 2)
    finally:
        base.OPTIONS = saved


@pytest.mark.parametrize("options,seed,target", [("cifar", 1, 0.0), ("cifar", 3, 100.0), ("high_bw", 1, 0.0)])
def test_candidates_step_matches_pytorch(setup, options, seed, target):
    model, arts = setup
    OPTIONS = OPTION_SETS[options]
    sess = TrainSession(arts[options], seed=0)
    assert sess.manifest.dfq["granularity"] == "candidates" and sess.manifest.n_blocks == 2
    for l in range(2):      # a sharper gate than at init, so that the samples of one batch choose differently
        sess.state.parameters[f"dfq::b{l}/w1"].data[...] *= 10
    sess.state.parameters["dfq::proj/w"].data[...] *= 10
    running0 = {n: np.array(p.data) for n, p in sess.state.parameters if ".running_" in n}
    x, y = _inputs(seed)
    sess.module.lazy_reset_grad()
    outs = sess.forward_backward(x, y, np.tile(np.array([0, W, 0], np.float32), (2, 1)), target=target, beta=0.05)
    got = dict(sess.last_outputs)
    noises = {n.split("::bwq")[0]: torch.from_numpy(np.asarray(o)) for n, o in got.items() if n.endswith("/noise")}
    assert len(noises) == 5 * len(OPTIONS)                       # every candidate's GEMMs have their own error quantizer
    ref = copy.deepcopy(model).train()
    stats = {b: [] for b in BNS}                                  # batch mean / biased var of every BN call, in order
    for b in BNS:
        getattr(ref, b).register_forward_hook(lambda mod, inp, out, b=b: stats[b].append(
            (inp[0].detach().mean((0, 2, 3)).numpy(), inp[0].detach().var((0, 2, 3), unbiased=False).numpy())))
    gate, gate_names = _gate(sess, OPTIONS)
    replay = ErrorReplay(got, fq)
    loss, logits, chosen, cp = reference_step(ref, gate, torch.from_numpy(x), torch.from_numpy(y), 0.05, target, noises,
                                              sess.manifest.dfq["F"], OPTIONS, replay)
    assert sorted(replay.seen) == sorted(noises)
    assert abs(float(outs[0]) - loss.item()) <= 1e-5 * abs(loss.item())
    np.testing.assert_allclose(got["logits"], logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    for l, c in enumerate(chosen):
        np.testing.assert_array_equal(got[COUNTS_OUTPUT][l], np.bincount(c, minlength=len(OPTIONS)))
    assert len(set(np.concatenate(chosen).tolist())) > 1
    assert abs(float(got[CP_OUTPUT]) - cp) <= 1e-5 * cp
    params = dict(ref.named_parameters())
    ref_grads = {n: params[n].grad.numpy() for n in sess.trainable if not n.startswith("dfq::")}
    ref_grads.update({n: to_ort(t.grad).numpy() for n, (t, to_ort) in gate_names.items()})
    assert set(ref_grads) == set(sess.trainable)
    for name, g in ref_grads.items():
        assert rel_err(sess.gradient(name), g) <= 1e-4, name
    # BatchNorm running statistics: K successive EMA updates (momentum 0.1, ORT's biased variance), as the release's
    # K BatchNorm2d forwards; the last candidate's batch statistics written last
    for b in BNS:
        assert len(stats[b]) == len(OPTIONS)
        mean, var = running0[f"{b}.running_mean"].astype(np.float64), running0[f"{b}.running_var"].astype(np.float64)
        for m_k, v_k in stats[b]:
            mean, var = 0.9 * mean + 0.1 * m_k, 0.9 * var + 0.1 * v_k
        np.testing.assert_allclose(sess.state.parameters[f"{b}.running_mean"].data, mean, rtol=1e-4, atol=1e-6, err_msg=b)
        np.testing.assert_allclose(sess.state.parameters[f"{b}.running_var"].data, var, rtol=1e-4, atol=1e-6, err_msg=b)


def test_structure(setup):
    _, arts = setup
    art = arts["cifar"]
    train = onnx.load(str(art / "training_model.onnx"))
    names = {n.name for n in train.graph.node}
    assert "/conv1/Conv" not in names and all(f"/conv1/Conv::cand{k}" in names for k in range(3))
    m = __import__("fracgraph.manifest", fromlist=["Manifest"]).Manifest.read(art)
    assert [d["name"] for d in m.ops if d["quantized"]] == ["/conv1/Conv", "/conv2/Conv", "/down/Conv", "/conv3/Conv",
                                                            "/conv4/Conv"]          # the op table costs one block each


def test_candidates_refuse_skip_and_task_grad():
    with pytest.raises(FracgraphError, match="skip option is not available"):
        DfqOptions(options=[[4, 8], [0, 0]], granularity="candidates")
    with pytest.raises(FracgraphError, match="--task-grad"):
        DfqOptions(granularity="candidates", task_grad="chosen")
