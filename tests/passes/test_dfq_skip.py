"""DFQ's skip option: the mixed block output (exact one-hot forward), every gradient against PyTorch, single layers
masked out, `estimate` over a trace with skips, and a short digits run in which the gates choose skip."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.errors import FracgraphError  # noqa: E402
from fracgraph.passes.dfq_gate import COUNTS_OUTPUT, CP_OUTPUT, DfqOptions, option_label, parse_options  # noqa: E402
from fracgraph.policy import LayerPolicy  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402

from conftest import ErrorReplay, export  # noqa: E402
from test_dfq_gate import (STE, GradQ, TwoBlockNet, _inputs, choose, finish_step,  # noqa: E402
                           fq, gate_probs, rel_err, torch_gate)

OPTIONS = [[3, 6], [4, 8], [0, 0]]          # the last one is `skip`
SKIP = 2
W = 4


def fq_or_pass(x, bits, per_channel=False, noise=None):
    """FracTrain's quantizer with bits 0 (a tensor per sample, or a number) passing x through, as the graph does."""
    b = torch.as_tensor(bits, dtype=torch.float32)
    q = fq(x, torch.clamp(b, min=1.0), per_channel, noise)
    return torch.where(b > 0, q, x)


class STE0(STE):   # the straight-through backward of test_dfq_gate.py, around the quantizer that passes 0 bits
    @staticmethod
    def forward(ctx, x, bits, per_channel):
        return fq_or_pass(x, bits, per_channel)


class GradQ0(GradQ):
    @staticmethod
    def backward(ctx, g):
        if ctx.replay is not None:   # checked on ORT's error, continued from ORT's quantized error (test_dfq_gate)
            replay, gemm = ctx.replay
            return replay.quantize(gemm, g, ctx.bits, ctx.noise), None, None, None
        return fq_or_pass(g, ctx.bits, noise=ctx.noise), None, None, None


def blocks(model):
    """The two blocks as (residual sum, shortcut) so that the skip mix can be written out."""
    def block0(x, conv):
        y = torch.relu(model.bn1(conv("conv1", x)))
        sc = model.bn3(conv("down", x))
        return model.bn2(conv("conv2", y)) + sc, sc

    def block1(x, conv):
        y = torch.relu(model.bn4(conv("conv3", x)))
        return model.bn5(conv("conv4", y)) + x, x

    return block0, block1


def reference_step(model, gate, x, y, beta, target, granularity, noises, block_macs, task_grad, replay=None):
    """One DFQ step with a skip option, in PyTorch: block output (1 - m_skip) * block + m_skip * shortcut ("none") or
    m_chosen * block + m_skip * shortcut ("chosen"); a skipped block (sample) runs FP32 on its unused branch."""
    acts = torch.tensor([a for a, _ in OPTIONS], dtype=torch.float32)
    grads = torch.tensor([g for _, g in OPTIONS], dtype=torch.float32)
    unit = (acts * W + grads * W + acts * grads) / 1024.0
    Fl = torch.tensor(block_macs, dtype=torch.float64)
    Fn = (Fl / Fl.mean()).float()
    not_skip = (torch.arange(len(OPTIONS)) != SKIP).float()
    B = x.shape[0]
    h = model.stem_fn(x)
    state, cost, chosen = None, 0.0, []
    for l, block in enumerate(blocks(model)):
        p, state = gate_probs(gate, l, h, state)
        c, hard, mask = choose(p, granularity == "batch")
        if granularity == "batch":
            m_s, m_c = mask[SKIP], (mask * hard * not_skip).sum()
            a_bits, g_bits = acts[c], grads[c]
            w_bits = 0.0 if c == SKIP else W            # a skipped block runs FP32, weights included
            cost = cost + B * (mask * unit).sum() * Fn[l]
            chosen.append(c)
        else:
            shape = (-1, 1, 1, 1)
            m_s, m_c = mask[:, SKIP].view(shape), (mask * hard * not_skip).sum(1).view(shape)
            a_bits, g_bits, w_bits = acts[c].view(shape), grads[c].view(shape), W
            cost = cost + (mask * unit).sum() * Fn[l]
            chosen.append(c.numpy())

        def qconv(name, inp, a=a_bits, g=g_bits, w=w_bits):
            conv = getattr(model, name)
            out = F.conv2d(STE0.apply(inp, a, False), STE0.apply(conv.weight, w, True), None, conv.stride, conv.padding)
            gemm = f"/{name}/Conv"
            return GradQ0.apply(out, g, noises[gemm], None if replay is None else (replay, gemm))

        res, sc = block(h, qconv)
        keep = (1 - m_s) if task_grad == "none" else m_c
        h = torch.relu(keep * res + m_s * sc)
    return finish_step(model, h, y, cost, B, block_macs, target, beta, chosen)


@pytest.fixture(scope="module")
def two_block(tmp_path_factory):
    torch.manual_seed(1)
    model = TwoBlockNet()
    return model, export(model, tmp_path_factory.mktemp("twoskip") / "two.onnx")


def _build(path, tmp_path_factory, policy=None, **dfq):
    out = tmp_path_factory.mktemp("dfqskip") / "art"
    build_artifacts(path, out, BuildOptions(dfq=DfqOptions(options=OPTIONS, **dfq),
                                            policy=policy or LayerPolicy(first="fp32"), expose_noise=True,
                                            expose_errors=True))
    return out


def _step(model, sess, x, y, granularity, skip_bias, beta=0.05, target=0.0):
    sess.state.parameters["dfq::proj/b"].data[...] = [0.0, 0.0, skip_bias]
    sess.module.lazy_reset_grad()
    bits_in = np.tile(np.array([0, W, 0], np.float32), (2, 1))
    outs = sess.forward_backward(x, y, bits_in, target=target, beta=beta)
    got = dict(sess.last_outputs)
    noises = {n.split("::bwq")[0]: torch.from_numpy(np.asarray(o)) for n, o in got.items() if n.endswith("/noise")}
    ref = copy.deepcopy(model).train()
    gate, gate_names = torch_gate_k(sess)
    replay = ErrorReplay(got, fq_or_pass)
    res = reference_step(ref, gate, torch.from_numpy(x), torch.from_numpy(y), beta, target, granularity, noises,
                         sess.manifest.dfq["F"], sess.manifest.dfq["task_grad"], replay)
    assert sorted(replay.seen) == sorted(noises)
    ort_grads = {n: sess.gradient(n) for n in sess.trainable}
    params = dict(ref.named_parameters())
    ref_grads = {n: params[n].grad.numpy() for n in sess.trainable if not n.startswith("dfq::")}
    ref_grads.update({n: to_ort(t.grad).numpy() for n, (t, to_ort) in gate_names.items()})
    return outs, got, ort_grads, ref_grads, res


def torch_gate_k(sess):
    """test_dfq_gate's reference gate with a projection to K = len(OPTIONS)."""
    import test_dfq_gate as base

    saved = base.OPTIONS
    base.OPTIONS = OPTIONS
    try:
        return torch_gate(sess, 2)
    finally:
        base.OPTIONS = saved


# (input seed, skip-logit bias) per step: chosen so that skip and a precision are both exercised (per sample: in the
# downsampling block too). Every error quantizer is checked on ORT's input (conftest.ErrorReplay), so every
# gradient is compared at 1e-4.
CASES = {"batch": [(1, 0.4), (1, 3.4), (1, -3.0)], "sample": [(3, 0.0), (1, 3.0), (3, -3.0)]}


@pytest.mark.parametrize("granularity,task_grad", [("batch", "none"), ("batch", "chosen"), ("sample", "none")])
def test_skip_step_matches_pytorch(two_block, tmp_path_factory, granularity, task_grad):
    """Loss, logits, choices, cp and every gradient (backbone, gate: task loss through the skip mix plus the cost
    term) against the PyTorch reference."""
    model, path = two_block
    art = _build(path, tmp_path_factory, granularity=granularity, task_grad=task_grad)
    sess = TrainSession(art, seed=0)
    assert sess.manifest.dfq["skippable"] == [True, True]
    assert sess.manifest.dfq["shortcut_ops"] == [["/down/Conv"], []]
    if granularity == "sample":   # a sharper gate, so that the samples of one batch choose differently
        for l in range(2):
            sess.state.parameters[f"dfq::b{l}/w1"].data[...] *= 10
        sess.state.parameters["dfq::proj/w"].data[...] *= 10
    seen = set()
    for seed, bias in CASES[granularity]:
        x, y = _inputs(seed)
        outs, got, ort_grads, ref_grads, (loss, logits, chosen, cp) = _step(model, sess, x, y, granularity, bias)
        assert abs(float(outs[0]) - loss.item()) <= 1e-5 * abs(loss.item())
        np.testing.assert_allclose(got["logits"], logits.detach().numpy(), rtol=1e-4, atol=1e-5)
        for l, c in enumerate(chosen):
            expect = np.bincount(np.atleast_1d(c), minlength=3) * (len(y) if granularity == "batch" else 1)
            np.testing.assert_array_equal(got[COUNTS_OUTPUT][l], expect)
        assert abs(float(got[CP_OUTPUT]) - cp) <= 1e-5 * max(cp, 1e-3)
        for name, g in ref_grads.items():
            assert rel_err(ort_grads[name], g) <= 1e-4, (bias, name)
        seen |= {int(v) for c in chosen for v in np.atleast_1d(c)}
        if granularity == "sample" and seed == 1:
            assert 0 < np.sum(chosen[0] == SKIP) < len(y)   # some samples skip the downsampling block, some not
    assert SKIP in seen and seen - {SKIP}, seen          # both skip and a precision were exercised


def test_skipped_block_is_its_shortcut_exactly(two_block, tmp_path_factory):
    """Every block skipped: the logits are those of the network made of the stem, the two shortcuts (the downsample
    FP32, weights included) and the classifier: the mix passes the shortcut through unchanged (1 * s + 0 * block)."""
    model, path = two_block
    art = _build(path, tmp_path_factory, granularity="batch")
    sess = TrainSession(art, seed=0)
    x, y = _inputs(2)
    _, got, _, _, (_, _, chosen, _) = _step(model, sess, x, y, "batch", 50.0)
    assert chosen == [SKIP, SKIP]
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        h = torch.relu(ref.bn3(ref.down(ref.stem_fn(torch.from_numpy(x)))))
        h = torch.relu(h)                                  # block 1's shortcut is the identity
        want = ref.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
    np.testing.assert_allclose(got["logits"], want.numpy(), rtol=1e-5, atol=1e-6)


def test_single_layer_blocks_mask_skip(two_block, tmp_path_factory):
    """With the stem quantized and gated (`--first quantize`: a single-layer block, no shortcut) its gate never picks
    skip, however strongly the shared projection favours it; the residual blocks still can."""
    model, path = two_block
    art = _build(path, tmp_path_factory, policy=LayerPolicy(), granularity="sample", static_first=False)
    sess = TrainSession(art, seed=0)
    m = sess.manifest
    assert m.dfq["skippable"] == [False, True, True] and m.dfq["shortcut_ops"][0] == []
    sess.state.parameters["dfq::proj/b"].data[...] = [0.0, 0.0, 50.0]
    x, y = _inputs(3)
    sess.forward_backward(x, y, np.tile(np.array([0, W, 0], np.float32), (3, 1)), target=0.0, beta=0.05)
    counts = np.asarray(sess.last_outputs[COUNTS_OUTPUT])
    assert counts[0, SKIP] == 0 and counts[1, SKIP] == len(y) and counts[2, SKIP] == len(y)


def test_options_with_skip():
    assert parse_options("3/6,4/8,skip") == [[3, 6], [4, 8], [0, 0]]
    assert option_label([0, 0]) == "skip" and option_label([4, 8]) == "4/8"
    assert DfqOptions(options=[[3, 6], [0, 0]]).skip_index == 1
    assert DfqOptions(options=[[3, 6], [0, 0]]).unit_costs()[1].tolist() == [0, 0, 0]
    for bad, what in (("0/6,4/8", "write `skip`"), ("4/0,4/8", "write `skip`"), ("3-6", "FW/BW")):
        with pytest.raises(FracgraphError, match=what):
            parse_options(bad)
    with pytest.raises(FracgraphError, match="more than once"):
        DfqOptions(options=[[0, 0], [4, 8], [0, 0]])
    assert DfqOptions(options=[[4, 8], [0, 0]]).skip_index == 1     # run at 4/8 or skip


def test_skip_needs_a_residual_block(tmp_path):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(torch.relu(self.c2(torch.relu(self.c1(x)))), 1).flatten(1))

    path = export(Plain(), tmp_path / "plain.onnx")
    with pytest.raises(FracgraphError, match="needs residual blocks"):
        build_artifacts(path, tmp_path / "a", BuildOptions(dfq=DfqOptions(options=[[4, 8], [0, 0]])))
