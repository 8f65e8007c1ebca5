"""Quant points on branching graphs: a tensor read by quantized GEMMs of several blocks (Inception branches, a
SqueezeNet fire module), a ShuffleNet channel split + shuffle + concat, a residual block whose input feeds conv1 and
the downsample conv, and a first conv whose output is max-pooled before anything else.

Semantics under test (passes/fw_quant.py): a tensor has one range (batch min/max, one EMA running range, one
manifest point); each reader is quantized at the act bits of its own block. Checked three ways: one training
step against a PyTorch implementation of exactly that (different act bits per block, every error quantizer
replayed: conftest.ErrorReplay), every speed pass on vs off (loss and every gradient), and the shared running
range after a step, read by every reader in the eval graph.
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
from fracgraph.manifest import Manifest  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402

from conftest import STE, ErrorReplay, GradQ, export, fq_ref  # noqa: E402
from conftest import seed_noise  # noqa: E402

SHAPE = (6, 3, 10, 10)
CLASSES = 4


class Branchy(nn.Module):
    """stem (first conv, then MaxPool) -> Inception (three convs read one tensor; one branch 1x1 -> 3x3) ->
    fire (squeeze, expand 1x1 / 3x3) -> residual block (conv1 and downsample read its input) -> ShuffleNet unit
    (channel split, conv on one half, concat, shuffle) -> pool, FC."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)            # 10x10 -> 5x5, then MaxPool -> 4x4
        self.b1 = nn.Conv2d(16, 16, 1)
        self.b2a = nn.Conv2d(16, 8, 1, bias=False)
        self.b2b = nn.Conv2d(8, 16, 3, padding=1)
        self.b3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.sq = nn.Conv2d(48, 16, 1)
        self.e1 = nn.Conv2d(16, 16, 1, bias=False)
        self.e3 = nn.Conv2d(16, 16, 3, padding=1)
        self.r1 = nn.Conv2d(32, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.r2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.down = nn.Conv2d(32, 16, 1, stride=2, bias=False)
        self.s1 = nn.Conv2d(8, 8, 1, bias=False)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x, conv=None):
        conv = conv or (lambda name, inp: getattr(self, name)(inp))
        h = torch.relu(F.max_pool2d(conv("stem", x), 2, 2, ceil_mode=True))
        h = torch.cat([torch.relu(conv("b1", h)), torch.relu(conv("b2b", torch.relu(conv("b2a", h)))),
                       torch.relu(conv("b3", h))], 1)
        q = torch.relu(conv("sq", h))
        h = torch.cat([torch.relu(conv("e1", q)), torch.relu(conv("e3", q))], 1)
        y = self.bn2(conv("r2", torch.relu(self.bn1(conv("r1", h)))))
        h = torch.relu(y + conv("down", h))
        a, b = h.split(8, 1)
        h = torch.cat([a, torch.relu(conv("s1", b))], 1)
        n, c, hh, ww = h.shape
        h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


# conv -> its block: single-layer blocks, except the residual block's r1, r2 and down
CONVS = ["stem", "b1", "b2a", "b2b", "b3", "sq", "e1", "e3", "r1", "r2", "down", "s1"]


def reference_step(model, x, y, bits_of, noises, seen=None, replay=None):
    """Loss and gradients of one step with every conv's input quantized at its own block's act bits against the
    input's own batch range, its weight per channel at the block's weight bits, its error at the block's grad bits
    with the replayed noise; FC FP32. `seen` (a dict) collects each conv's unquantized input."""
    ref = copy.deepcopy(model).train()

    def qconv(name, inp):
        a, w, g = bits_of[name]
        if seen is not None:
            seen[name] = inp.detach().numpy()
        conv = getattr(ref, name)
        out = F.conv2d(STE.apply(inp, a, False), STE.apply(conv.weight, w, True), conv.bias, conv.stride, conv.padding)
        gemm = f"/{name}/Conv"
        return GradQ.apply(out, g, noises[gemm], None if replay is None else (replay, gemm))

    loss = F.cross_entropy(ref(torch.from_numpy(x), qconv), torch.from_numpy(y))
    loss.backward()
    return loss.item(), {k: p.grad.numpy() for k, p in ref.named_parameters()}


@pytest.fixture(scope="module")
def branchy(tmp_path_factory):
    torch.manual_seed(0)
    model = Branchy()
    d = tmp_path_factory.mktemp("branchy")
    path = export(model, d / "branchy.onnx", shape=(2, 3, 10, 10))
    arts = {}
    for key, opts in {"on": {}, "off": {"fast_backward": False, "nchwc": False}}.items():
        arts[key] = d / key
        build_artifacts(path, arts[key], BuildOptions(expose_noise=True, expose_errors=True, **opts))
        seed_noise(arts[key])
    return model, arts


def _bits(manifest, act_by_block=None, w=8, g=8):
    """[n_blocks, 3]: act bits per block from `act_by_block` (cycled), weight and grad bits fixed."""
    n = manifest.n_blocks
    acts = [act_by_block[i % len(act_by_block)] for i in range(n)] if act_by_block else [8] * n
    return np.array([[a, w, g] for a in acts], np.float32)


def _step(art, bits):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    y = rng.integers(0, CLASSES, SHAPE[0]).astype(np.int64)
    sess = TrainSession(art, seed=0, threads=1)
    outs = sess.forward_backward(x, y, bits)
    noise = {n.split("::bwq")[0]: np.asarray(o) for n, o in zip(sess.module.output_names(), outs) if n.endswith("/noise")}
    return x, y, float(outs[0]), {k: sess.gradient(k) for k in sess.trainable}, noise, sess


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_one_range_per_tensor_and_each_reader_at_its_blocks_bits(branchy):
    _, arts = branchy
    m = Manifest.read(arts["on"])
    block_of = {op: i for i, b in enumerate(m.blocks) for op in b.ops}
    # the Inception input is read by b1, b2a, b3 (three blocks), the fire squeeze output by e1, e3 (two)
    assert len({block_of[f"/{c}/Conv"] for c in ("b1", "b2a", "b3")}) == 3
    assert block_of["/r1/Conv"] == block_of["/down/Conv"] == block_of["/r2/Conv"]
    act = [p for p in m.quant_points if p.kind == "act"]
    assert len({p.tensor for p in act}) == len(act)           # one point (one running range) per tensor
    assert len(act) == len(CONVS) - 4                         # b2a, b3 read b1's range; e3 e1's; down r1's
    notes = "\n".join(m.extra["notes"])
    for reader, owner in (("b2a", "b1"), ("b3", "b1"), ("e3", "e1")):
        assert f"/{reader}/Conv: its input" in notes and f"shares the range of /{owner}/Conv::fq_a0" in notes
    # every act quantizer's backward is the STE and every quantizer fused (none kept)
    assert not [n for n in m.extra["notes"] if n.startswith(("[ste-grad]", "[fused-ops]")) and ": kept" in n
                and "no gradient is computed" not in n]
    graph = onnx.load(str(arts["on"] / "training_model.onnx")).graph
    assert not [n for n in graph.node if "::fq_" in n.name and "_Grad/" in n.name]


@pytest.mark.parametrize("build,acts,w,g", [("on", (8,), 8, 8), ("on", (3, 5, 8, 4), 4, 6), ("off", (3, 5, 8, 4), 4, 6)])
def test_step_matches_pytorch(branchy, build, acts, w, g):
    """Readers of one tensor in blocks at 3, 5, 8, 4 act bits: each quantized at its own bits against the shared
    batch range; loss and every gradient at 1e-4, with every speed pass (on) and with none (off). The BW noise is
    replayed and every error quantizer checked on the error ORT quantized (conftest.ErrorReplay)."""
    model, arts = branchy
    manifest = Manifest.read(arts[build])
    bits = _bits(manifest, acts, w, g)
    block_of = {op: i for i, b in enumerate(manifest.blocks) for op in b.ops}
    bits_of = {c: tuple(float(v) for v in bits[block_of[f"/{c}/Conv"]]) for c in CONVS}
    x, y, loss, grads, noise, sess = _step(arts[build], bits)
    assert len(noise) == len(CONVS)
    replay = ErrorReplay(sess.last_outputs, fq_ref)
    ref_loss, ref_grads = reference_step(model, x, y, bits_of, {k: torch.from_numpy(v) for k, v in noise.items()},
                                         replay=replay)
    assert sorted(replay.seen) == sorted(f"/{c}/Conv" for c in CONVS)
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert set(sess.trainable) == set(ref_grads)
    for name in sess.trainable:
        assert _rel(grads[name], ref_grads[name]) <= 1e-4, name


def test_speed_passes_keep_loss_and_every_gradient(branchy):
    """ste-grad, conv-grad-split, fused ops, conv-grad-w, bn-grad, quant-branch, NCHWc on vs all off, directly, at
    0 bits (the step is continuous: float order only). At quantized bits the two builds are compared through the
    replayed PyTorch step above (each at 1e-4), not with each other: their float orders differ (NCHWc against
    plain Conv, fused against unfused ops) and one build cannot replay the other's stochastic roundings, so a
    rounding boundary crossed in one and not the other cascades into the gradients below it, by an amount that
    depends on the CPU's kernels."""
    _, arts = branchy
    bits = _bits(Manifest.read(arts["on"]), (0,), 0, 0)
    _, _, loss0, grads0, noise0, _ = _step(arts["off"], bits)
    _, _, loss1, grads1, noise1, _ = _step(arts["on"], bits)
    assert abs(loss0 - loss1) <= 1e-6 * abs(loss0)
    assert grads0.keys() == grads1.keys() and len(grads0) >= 20
    for name, gr in grads0.items():
        assert _rel(grads1[name], gr) <= 1e-5, name


def test_one_running_range_per_tensor_read_by_every_reader(branchy):
    """After one step the tensor's one EMA range holds (1 - m) x its batch range (buffers start at 0), and in the
    eval graph every reader's quantizer reads it (no reader has a range of its own)."""
    model, arts = branchy
    manifest = Manifest.read(arts["on"])
    bits = _bits(manifest, (3, 5, 8, 4))
    block_of = {op: i for i, b in enumerate(manifest.blocks) for op in b.ops}
    bits_of = {c: tuple(float(v) for v in bits[block_of[f"/{c}/Conv"]]) for c in CONVS}
    x, y, _, _, noise, sess = _step(arts["on"], bits)
    seen = {}
    reference_step(model, x, y, bits_of, {k: torch.from_numpy(v) for k, v in noise.items()}, seen,
                   ErrorReplay(sess.last_outputs, fq_ref))
    m = 1.0 - sess.manifest.act_range_momentum
    for owner, readers in (("b1", ("b2a", "b3")), ("e1", ("e3",)), ("r1", ("down",))):
        assert all(np.array_equal(seen[owner], seen[r]) for r in readers)   # the readers read this very tensor
        run_min = float(sess.parameter(f"/{owner}/Conv::fq_a0.run_min"))
        run_range = float(sess.parameter(f"/{owner}/Conv::fq_a0.run_range"))
        t = seen[owner]
        assert run_min == pytest.approx(m * float(t.min()), rel=1e-5, abs=1e-7)
        assert run_range == pytest.approx(m * float(t.max() - t.min()), rel=1e-5)
    graph = onnx.load(str(arts["on"] / "eval_model.onnx")).graph
    reads = {i for n in graph.node for i in n.input}
    assert "/b1/Conv::fq_a0.run_min" in reads and "/b1/Conv::fq_a0.run_range" in reads
    assert not [i for i in reads if any(f"/{r}/Conv::fq_a0.run" in i for r in ("b2a", "b3", "e3", "down"))]
    loss, logits = sess.evaluate(x, y, bits)
    assert np.isfinite(loss) and np.asarray(logits).shape == (SHAPE[0], CLASSES)
