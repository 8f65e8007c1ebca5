"""DFQ gate pass: one ORT training step against an independent PyTorch implementation of FracTrain's DFQ.

The reference is written from the spec (fractrain.md §3): SkipNet/FracTrain's gate (pooling, two 1x1 convs, a
torch.nn.LSTMCell shared over blocks, linear, softmax), the straight-through mask `hard - p.detach() + p`, the
cost C = sum m * cost_k * F_l, and the block quantized at the chosen (a, w, g) with the very BW noise ORT drew.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.errors import FracgraphError  # noqa: E402
from fracgraph.passes.dfq_gate import (BITS_OUTPUT, COUNTS_OUTPUT, CP_OUTPUT, DfqOptions,  # noqa: E402
                                       parse_options)
from fracgraph.policy import LayerPolicy  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402

from conftest import ErrorReplay, export  # noqa: E402

OPTIONS = [[3, 6], [4, 6], [4, 8], [6, 8], [6, 12]]


class TwoBlockNet(nn.Module):
    """FP32 stem, a downsampling residual block and an identity residual block, FP32 classifier."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.down = nn.Conv2d(8, 12, 1, stride=2, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(12)
        self.conv4 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn5 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, classes)

    def stem_fn(self, x):
        return torch.relu(self.bn0(self.stem(x)))

    def block0(self, x, conv):
        y = torch.relu(self.bn1(conv("conv1", x)))
        return self.bn2(conv("conv2", y)) + self.bn3(conv("down", x))

    def block1(self, x, conv):
        y = torch.relu(self.bn4(conv("conv3", x)))
        return self.bn5(conv("conv4", y)) + x

    def forward(self, x):
        plain = lambda name, inp: getattr(self, name)(inp)  # noqa: E731
        x = self.stem_fn(x)
        x = torch.relu(self.block0(x, plain))
        x = torch.relu(self.block1(x, plain))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --------------------------------------------------------------------------------- reference quantizers


def fq(x, bits, per_channel=False, noise=None):
    """FracTrain's min/max fake quantizer; `bits` may be a tensor broadcasting over x (per-sample bits)."""
    if per_channel:
        shape = (-1,) + (1,) * (x.dim() - 1)
        mn, mx = x.flatten(1).min(1).values.view(shape), x.flatten(1).max(1).values.view(shape)
    else:
        mn, mx = x.min(), x.max()
    levels = 2.0 ** bits - 1
    scale = torch.clamp((mx - mn) / levels, min=1e-8)
    y = (x - mn) / scale
    if noise is not None:
        y = y + noise
    return torch.round(torch.minimum(torch.clamp(y, min=0), levels + 0 * y)) * scale + mn


class STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits, per_channel):
        return fq(x, bits, per_channel)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class GradQ(torch.autograd.Function):
    """Identity forward; backward quantizes the error with the replayed noise. With `replay` (an ErrorReplay and
    the GEMM's name) the quantizer is checked on the error ORT quantized and the backward carries on from ORT's
    quantized error."""

    @staticmethod
    def forward(ctx, y, bits, noise, replay=None):
        ctx.bits, ctx.noise, ctx.replay = bits, noise, replay
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        if ctx.replay is not None:
            replay, gemm = ctx.replay
            return replay.quantize(gemm, g, ctx.bits, ctx.noise), None, None, None
        return fq(g, ctx.bits, noise=ctx.noise), None, None, None


def gate_probs(gate, l, h, state):
    """Block l's gate on its input h: option probabilities per sample and the LSTM state carried on."""
    emb = gate["emb"][l](F.adaptive_avg_pool2d(h, 1)).flatten(1)
    state = gate["lstm"](emb, state)
    return torch.softmax(gate["proj"](state[0]), dim=1), state


def choose(p, batch: bool):
    """The hard choice and its straight-through mask: per mini-batch (argmax of the mean probability, c an int) or
    per sample (c a tensor)."""
    q = p.mean(0) if batch else p
    c = int(torch.argmax(q)) if batch else torch.argmax(p, 1)
    hard = F.one_hot(torch.tensor(c) if batch else c, p.shape[1]).float()
    return c, hard, hard - q.detach() + q


def finish_step(model, h, y, cost, B, block_macs, target, beta, chosen):
    """The reference step after the blocks: classifier, cp, the sign controller's cost term, backward."""
    logits = model.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
    cp = 100 * float(cost.detach()) / (3 * B * len(block_macs))
    reg = -1.0 if cp < target else 1.0
    loss = F.cross_entropy(logits, y) + reg * beta * cost
    loss.backward()
    return loss, logits, chosen, cp


def reference_step(model, gate, x, y, beta, target, granularity, weight_bits, noises, block_macs, task_grad,
                   replay=None, stem_bits=None):
    """Loss of one DFQ step and the chosen bits, in PyTorch; gradients land in model/gate parameters. `replay`: an
    ErrorReplay, each error quantizer checked on ORT's input and the backward continued from ORT's output.
    stem_bits (fw, bw): the stem conv is a static block, quantized at those bits with no gate (else FP32)."""
    acts = torch.tensor([a for a, _ in OPTIONS], dtype=torch.float32)
    grads = torch.tensor([g for _, g in OPTIONS], dtype=torch.float32)
    w = float(weight_bits)
    unit = (acts * w + grads * w + acts * grads) / 1024.0
    Fl = torch.tensor(block_macs, dtype=torch.float64)
    Fn = (Fl / Fl.mean()).float()
    B = x.shape[0]
    if stem_bits is None:
        h = model.stem_fn(x)
    else:
        sf, sb = (float(v) for v in stem_bits)
        conv = model.stem
        out = F.conv2d(STE.apply(x, sf, False), STE.apply(conv.weight, sf, True), None, conv.stride, conv.padding)
        gemm = "/stem/Conv"
        h = torch.relu(model.bn0(GradQ.apply(out, sb, noises[gemm], None if replay is None else (replay, gemm))))
    state = None
    cost = 0.0
    chosen = []
    for l, block in enumerate((model.block0, model.block1)):
        p, state = gate_probs(gate, l, h, state)
        c, hard, mask = choose(p, granularity == "batch")
        if granularity == "batch":
            m_c = mask[c]
            a_bits, g_bits, scale = acts[c], grads[c], m_c
            cost = cost + B * (mask * unit).sum() * Fn[l]
            chosen.append(c)
        else:
            m_c = (mask * hard).sum(1)
            a_bits, g_bits, scale = acts[c].view(-1, 1, 1, 1), grads[c].view(-1, 1, 1, 1), m_c.view(-1, 1, 1, 1)
            cost = cost + (mask * unit).sum() * Fn[l]
            chosen.append(c.numpy())

        def qconv(name, inp, a=a_bits, g=g_bits):
            conv = getattr(model, name)
            out = F.conv2d(STE.apply(inp, a, False), STE.apply(conv.weight, w, True), None, conv.stride, conv.padding)
            gemm = f"/{name}/Conv"
            return GradQ.apply(out, g, noises[gemm], None if replay is None else (replay, gemm))

        h = torch.relu(block(h, qconv) * scale if task_grad == "chosen" else block(h, qconv))
    return finish_step(model, h, y, cost, B, block_macs, target, beta, chosen)


def torch_gate(sess, n_blocks, first=0):
    """The gate modules of the reference, initialized from the artifacts' initial gate parameters (gates of blocks
    first .. first + n_blocks - 1; block `first` is the first gated one, its LSTM state zero)."""
    P = lambda n: torch.from_numpy(sess.parameter(n))  # noqa: E731
    emb = []
    for l in range(first, first + n_blocks):
        w1, b1, w2, b2 = (P(f"dfq::b{l}/{k}") for k in ("w1", "b1", "w2", "b2"))
        c1 = nn.Conv2d(w1.shape[0], w1.shape[1], 1)
        c2 = nn.Conv2d(w2.shape[0], w2.shape[1], 1)
        with torch.no_grad():
            c1.weight.copy_(w1.T[:, :, None, None]), c1.bias.copy_(b1)
            c2.weight.copy_(w2.T[:, :, None, None]), c2.bias.copy_(b2)
        emb.append(nn.Sequential(c1, nn.ReLU(), c2))
    lstm = nn.LSTMCell(16, 16)
    proj = nn.Linear(16, len(OPTIONS))
    with torch.no_grad():
        lstm.weight_ih.copy_(P("dfq::lstm/w_ih").T), lstm.bias_ih.copy_(P("dfq::lstm/b_ih"))
        lstm.weight_hh.copy_(P("dfq::lstm/w_hh").T), lstm.bias_hh.copy_(P("dfq::lstm/b_hh"))
        proj.weight.copy_(P("dfq::proj/w").T), proj.bias.copy_(P("dfq::proj/b"))
    names = {}
    for l, e in enumerate(emb, first):
        names[f"dfq::b{l}/w1"] = (e[0].weight, lambda g: g[:, :, 0, 0].T)
        names[f"dfq::b{l}/b1"] = (e[0].bias, lambda g: g)
        names[f"dfq::b{l}/w2"] = (e[2].weight, lambda g: g[:, :, 0, 0].T)
        names[f"dfq::b{l}/b2"] = (e[2].bias, lambda g: g)
    names.update({"dfq::lstm/w_ih": (lstm.weight_ih, lambda g: g.T), "dfq::lstm/b_ih": (lstm.bias_ih, lambda g: g),
                  "dfq::lstm/w_hh": (lstm.weight_hh, lambda g: g.T), "dfq::lstm/b_hh": (lstm.bias_hh, lambda g: g),
                  "dfq::proj/w": (proj.weight, lambda g: g.T), "dfq::proj/b": (proj.bias, lambda g: g)})
    return {"emb": emb, "lstm": lstm, "proj": proj}, names


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.fixture(scope="module")
def two_block(tmp_path_factory):
    torch.manual_seed(1)
    model = TwoBlockNet()
    path = export(model, tmp_path_factory.mktemp("twoblock") / "two.onnx")
    return model, path


def _build(path, tmp_path_factory, **dfq):
    out = tmp_path_factory.mktemp("dfq") / "art"
    build_artifacts(path, out, BuildOptions(dfq=DfqOptions(**dfq), policy=LayerPolicy(first="fp32"), expose_noise=True,
                                            expose_errors=True))
    return out


@pytest.fixture(scope="module")
def art_batch(two_block, tmp_path_factory):
    return _build(two_block[1], tmp_path_factory, granularity="batch", task_grad="chosen")


@pytest.fixture(scope="module")
def art_batch_default(two_block, tmp_path_factory):
    return _build(two_block[1], tmp_path_factory)


@pytest.fixture(scope="module")
def art_sample(two_block, tmp_path_factory):
    return _build(two_block[1], tmp_path_factory, granularity="sample", task_grad="chosen")


def _inputs(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, n).astype(np.int64)


def _compare_step(model, sess, x, y, beta, granularity, target=0.0, stem_bits=None):
    """One ORT step and the PyTorch reference with the noise ORT drew, every error quantizer checked on ORT's input
    and the backward continued from ORT's output (ErrorReplay): (ORT outputs, ORT grads, reference grads,
    reference loss/logits/choices/cp). stem_bits (fw, bw): the artifacts' block 0 is the static stem, fed them."""
    bits_in = np.tile(np.array([0, 4, 0], np.float32), (2, 1))   # only the weight column is read in DFQ
    if stem_bits is not None:   # a static block's row is read whole: [fw, fw, bw]
        bits_in = np.concatenate([np.array([[stem_bits[0], stem_bits[0], stem_bits[1]]], np.float32), bits_in])
    sess.module.lazy_reset_grad()
    outs = sess.forward_backward(x, y, bits_in, target=target, beta=beta)
    got = dict(sess.last_outputs)
    noises = {n.split("::bwq")[0]: torch.from_numpy(np.asarray(o)) for n, o in got.items() if n.endswith("/noise")}
    assert len(noises) == (5 if stem_bits is None else 6)
    ref = copy.deepcopy(model).train()
    gate, gate_names = torch_gate(sess, 2, first=0 if stem_bits is None else 1)
    replay = ErrorReplay(got, fq)
    res = reference_step(ref, gate, torch.from_numpy(x), torch.from_numpy(y), beta, target, granularity, 4, noises,
                         sess.manifest.dfq["F"], sess.manifest.dfq["task_grad"], replay, stem_bits)
    assert sorted(replay.seen) == sorted(noises)   # every error quantizer checked, once
    ort_grads = {n: sess.gradient(n) for n in sess.trainable}
    params = dict(ref.named_parameters())
    ref_grads = {n: params[n].grad.numpy() for n in sess.trainable if not n.startswith("dfq::")}
    ref_grads.update({n: to_ort(t.grad).numpy() for n, (t, to_ort) in gate_names.items()})
    assert set(ref_grads) == set(ort_grads)
    return outs, got, ort_grads, ref_grads, res


@pytest.mark.parametrize("granularity,target,task_grad", [("batch", 0.0, "none"), ("batch", 100.0, "chosen"),
                                                          ("sample", 0.0, "chosen")])
def test_step_matches_pytorch(two_block, art_batch, art_batch_default, art_sample, granularity, target, task_grad):
    """Loss, every backbone gradient and every gate gradient (task loss + cost term) against PyTorch; target 0
    makes the controller's reg +1 (cp above target), target 100 makes it -1."""
    model, _ = two_block
    art = art_sample if granularity == "sample" else art_batch if task_grad == "chosen" else art_batch_default
    sess = TrainSession(art, seed=0)
    assert sess.manifest.n_blocks == 2 and sess.manifest.dfq["granularity"] == granularity
    assert sess.manifest.dfq["task_grad"] == task_grad
    if granularity == "sample":   # a sharper gate than at init, so that the samples of one batch choose differently
        for l in range(2):
            sess.state.parameters[f"dfq::b{l}/w1"].data[...] *= 10
        sess.state.parameters["dfq::proj/w"].data[...] *= 10
    x, y = _inputs(1)
    outs, got, ort_grads, ref_grads, (loss, logits, chosen, cp) = _compare_step(model, sess, x, y, 0.05, granularity, target)
    assert abs(float(outs[0]) - loss.item()) <= 1e-5 * abs(loss.item())
    np.testing.assert_allclose(got["logits"], logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    counts = got[COUNTS_OUTPUT]
    for l, c in enumerate(chosen):
        expect = np.bincount(np.atleast_1d(c), minlength=5) * (len(y) if granularity == "batch" else 1)
        np.testing.assert_array_equal(counts[l], expect)
    assert abs(float(got[CP_OUTPUT]) - cp) <= 1e-5 * cp
    if granularity == "batch":
        np.testing.assert_array_equal(got[BITS_OUTPUT], [[OPTIONS[c][0], 4, OPTIONS[c][1]] for c in chosen])
    else:
        assert len(set(np.concatenate(chosen).tolist())) > 1, "per-sample choices should differ in this batch"
    for name, g in ref_grads.items():
        assert rel_err(ort_grads[name], g) <= 1e-4, name


@pytest.fixture(scope="module")
def art_static(two_block, tmp_path_factory):
    """The default --dfq layout: the stem (first GEMM) quantized in a static block 0 without a gate."""
    out = tmp_path_factory.mktemp("dfq") / "static"
    build_artifacts(two_block[1], out, BuildOptions(dfq=DfqOptions(task_grad="chosen"), expose_noise=True,
                                                    expose_errors=True))
    return out


@pytest.mark.parametrize("target", [0.0, 100.0])
def test_static_first_block_matches_pytorch(two_block, art_static, target):
    """A static first block: the stem quantized at the fed (fw, bw) = (6, 8) with no gate, the gates on blocks 1-2
    (LSTM state zero at block 1), cp over the gated blocks; loss and every gradient against PyTorch."""
    model, _ = two_block
    sess = TrainSession(art_static, seed=0)
    m = sess.manifest
    assert m.n_blocks == 3 and m.dfq["gated"] == [1, 2] and m.dfq["static_blocks"] == [0]
    assert len(m.dfq["F"]) == 2 and m.blocks[0].ops == ["/stem/Conv"]
    assert not any(n.startswith("dfq::b0/") for n in sess.trainable)          # no gate on the static block
    x, y = _inputs(2)
    outs, got, ort_grads, ref_grads, (loss, logits, chosen, cp) = _compare_step(model, sess, x, y, 0.05, "batch",
                                                                                target, stem_bits=(6, 8))
    assert abs(float(outs[0]) - loss.item()) <= 1e-5 * abs(loss.item())
    np.testing.assert_allclose(got["logits"], logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert got[COUNTS_OUTPUT].shape == (2, 5) and abs(float(got[CP_OUTPUT]) - cp) <= 1e-5 * cp
    np.testing.assert_array_equal(got[BITS_OUTPUT], [[OPTIONS[c][0], 4, OPTIONS[c][1]] for c in chosen])
    assert "stem.weight" in ref_grads
    for name, g in ref_grads.items():
        assert rel_err(ort_grads[name], g) <= 1e-4, name
    # the stem's bits are the fed ones: other static bits give other logits (4/8 is far from 6/8 on the image)
    sess.forward_backward(x, y, np.array([[4, 4, 8], [0, 4, 0], [0, 4, 0]], np.float32), target=target, beta=0.05)
    assert np.abs(np.asarray(sess.last_outputs["logits"]) - got["logits"]).max() > 1e-3


def test_cost_term_gradient(two_block, art_batch):
    """The cost term's own gradient: d(coef=1) - d(coef=0) of every gate parameter, ORT against PyTorch."""
    model, _ = two_block
    sess = TrainSession(art_batch, seed=0)
    x, y = _inputs(3)
    _, _, ort0, ref0, _ = _compare_step(model, sess, x, y, 0.0, "batch")
    _, _, ort1, ref1, _ = _compare_step(model, sess, x, y, 1.0, "batch")
    for name in ref0:
        if name.startswith("dfq::"):
            want = ref1[name] - ref0[name]
            assert np.linalg.norm(want) > 1e-3 * np.linalg.norm(ref1[name]), name   # the term is not negligible
            assert rel_err(ort1[name] - ort0[name], want) <= 1e-3, name


def test_forward_one_hot_is_exact(two_block, art_batch, tmp_path):
    """The DFQ forward at its chosen bits is bit-for-bit the plain quantized network fed those bits."""
    _, path = two_block
    plain = tmp_path / "plain"
    build_artifacts(path, plain, BuildOptions(policy=LayerPolicy(first="fp32"), expose_noise=True))
    dfq, ref = TrainSession(art_batch, seed=0), TrainSession(plain, seed=0)
    for seed in range(3):
        x, y = _inputs(seed, n=8 + seed)
        dfq.forward_backward(x, y, np.tile(np.array([0, 4, 0], np.float32), (2, 1)))
        bits = np.asarray(dfq.last_outputs[BITS_OUTPUT])
        counts = np.asarray(dfq.last_outputs[COUNTS_OUTPUT])
        assert set(np.unique(counts)) <= {0.0, float(len(y))} and (counts.sum(1) == len(y)).all()
        assert all([int(b[0]), int(b[2])] in OPTIONS for b in bits) and (bits[:, 1] == 4).all()
        ref.forward_backward(x, y, bits)
        np.testing.assert_array_equal(dfq.last_outputs["logits"], ref.last_outputs["logits"])


def test_manifest_and_structure(art_batch):
    from fracgraph.manifest import Manifest

    m = Manifest.read(art_batch)
    assert m.dfq["options"] == OPTIONS and m.dfq["weight_bits"] == 4 and m.dfq["granularity"] == "batch"
    assert not any(d["name"].startswith("dfq::") for d in m.ops)          # gates are not costed GEMMs
    assert not any(q.op.startswith("dfq::") for q in m.quant_points)      # ... nor quantized
    train = onnx.load(str(art_batch / "training_model.onnx"))
    gate_ops = {n.op_type for n in train.graph.node if n.name.startswith("dfq::")}
    assert {"GlobalAveragePool", "MatMul", "Sigmoid", "Tanh", "Softmax", "ArgMax", "OneHot"} <= gate_ops
    assert "LSTM" not in {n.op_type for n in train.graph.node}
    # the block's act/grad bits come from the gate, not from the runtime precision input
    gathers = [n for n in train.graph.node if n.op_type == "Gather" and n.input[0] == "fracgraph_bits::flat"]
    assert all(n.output[0].endswith(".weight") for n in gathers)


def test_options_parsing_and_errors():
    assert parse_options("3/6, 4/8") == [[3, 6], [4, 8]]
    with pytest.raises(FracgraphError, match="FW/BW"):
        parse_options("3-6")
    with pytest.raises(FracgraphError, match="at least 2"):
        DfqOptions(options=[[4, 8]])
    with pytest.raises(FracgraphError, match="skip"):       # 0 bits: only the skip option (test_dfq_skip.py)
        DfqOptions(options=[[0, 6], [4, 8]])
    with pytest.raises(FracgraphError, match="granularity"):
        DfqOptions(granularity="layer")


def test_cli_quantize_dfq_and_inspect(two_block, tmp_path):
    import json

    from typer.testing import CliRunner

    from fracgraph.cli import app

    runner = CliRunner()
    out = tmp_path / "art"
    r = runner.invoke(app, ["quantize", str(two_block[1]), "-o", str(out), "--dfq", "--options", "3/6,4/8",
                            "--weight-bits", "6", "--granularity", "sample"])
    assert r.exit_code == 0, r.output
    # --dfq quantizes the first GEMM in a static block (no gate) by default
    assert ("DFQ: 2 gates (1 static block at the run's --fw/--bw), options (FW/BW) 3/6, 4/8, weights 6 bits, "
            "choice per sample") in r.output
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--format", "json"]).output)
    assert info["dfq"]["options"] == [[3, 6], [4, 8]] and info["dfq"]["weight_bits"] == 6
    assert info["decisions"][0]["quantized"] and info["decisions"][0]["block"] == 0
    assert info["dfq"]["gated"] == [1, 2] and info["dfq"]["static_blocks"] == [0]
    assert "except static block(s) [0]" in runner.invoke(app, ["inspect", str(out)]).output
    # --first fp32: the authors' DFQ ResNet (first conv FP32, every quantized block gated)
    fp = tmp_path / "fp"
    r = runner.invoke(app, ["quantize", str(two_block[1]), "-o", str(fp), "--dfq", "--options", "3/6,4/8", "--first", "fp32"])
    assert r.exit_code == 0 and "DFQ: 2 gates, options" in r.output, r.output
    info = json.loads(runner.invoke(app, ["inspect", str(fp), "--format", "json"]).output)
    first = info["decisions"][0]
    assert not first["quantized"] and "first" in first["reason"] and info["dfq"]["static_blocks"] == []
    assert "DFQ: one gate per block (GAP" in runner.invoke(app, ["inspect", str(fp)]).output
    # --keep-static: a glob's block has no gate either; bad globs and flags without --dfq are one clear line
    ks = tmp_path / "ks"
    r = runner.invoke(app, ["quantize", str(two_block[1]), "-o", str(ks), "--dfq", "--options", "3/6,4/8",
                            "--keep-static", "/conv3/*"])
    assert r.exit_code == 0 and "DFQ: 1 gates (2 static blocks" in r.output, r.output
    for args, msg in ((["--dfq", "--keep-static", "/nope*"], "matches no quantized GEMM"),
                      (["--first", "static"], "add --dfq"),
                      (["--dfq", "--keep-static", "*"], "no gate to train"),
                      (["--dfq", "--first", "gated"], "static, fp32 or quantize")):
        bad = runner.invoke(app, ["quantize", str(two_block[1]), "-o", str(tmp_path / "b2")] + args)
        assert bad.exit_code == 2 and msg in bad.output and "Traceback" not in bad.output, (args, bad.output)
        assert not (tmp_path / "b2").exists()
    bad = runner.invoke(app, ["quantize", str(two_block[1]), "-o", str(tmp_path / "b"), "--dfq", "--options", "4/8"])
    assert bad.exit_code == 2 and "at least 2" in bad.output and "Traceback" not in bad.output
