"""Shared fixtures: a small CNN with every layer kind the passes must handle, exported the verified way."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn


class SmallResNet(nn.Module):
    """conv-BN-ReLU stem, one residual block with a downsample conv, global pooling, FC."""

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
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = torch.relu(y + self.bn3(self.down(x)))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def export(model, path, shape=(2, 3, 8, 8)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), torch.randn(*shape), str(path), dynamo=False, training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
        )
    return path


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallResNet()
    path = export(model, tmp_path_factory.mktemp("small") / "small.onnx")
    return model, path


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 8).astype(np.int64)


def seed_noise(art) -> None:
    """Give each RandomUniformLike of an artifact dir's training graph a seed from its name. Unseeded, onnxruntime
    seeds them by their place in the graph, so any rewrite elsewhere in the graph draws other noise; with the
    name's seed a step's noise is the same whatever the other passes did."""
    import zlib

    import onnx
    from onnx import helper

    path = str(art / "training_model.onnx")
    model = onnx.load(path)
    for n in model.graph.node:
        if n.op_type == "RandomUniformLike" and not any(a.name == "seed" for a in n.attribute):
            n.attribute.append(helper.make_attribute("seed", float(zlib.crc32(n.name.encode()) % 100003)))
    onnx.save(model, path)


def custom_op_session(op: str, inputs: list[str], outputs: list[str], threads: int = 2, op_domain: str | None = None,
                      **attrs):
    """An onnxruntime session running the single op `op` on float tensors: a fracgraph custom op (fracgraph/kernels;
    the default domain) or, with `op_domain=""`, onnxruntime's own, with the same session settings."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from fracgraph import kernels

    domain = kernels.DOMAIN if op_domain is None else op_domain
    graph = helper.make_graph([helper.make_node(op, inputs, outputs, domain=domain, **attrs)], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    kernels.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _mix(z):
    """SplitMix64's finalizer on uint64 arrays (wrapping multiplies)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sr_noise_ref(seed: int, node_salt: int, call: int, n: int) -> np.ndarray:
    """The fused error quantizer's noise (fracgraph/kernels/fused_ops.c's header, written from its formula):
    U(-0.5, 0.5) of the `call`-th run of a node with `node_salt` under process seed `seed`."""
    i = np.arange(n, dtype=np.uint64)
    j = (i // np.uint64(32)) * np.uint64(16) + i % np.uint64(16)   # element i's hash: two elements per hash
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed) ^ _mix(np.uint64(node_salt) ^ _mix(np.uint64(call))))
        z = _mix(key + (j + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
    bits = np.where(i % np.uint64(32) < np.uint64(16), z >> np.uint64(40), (z >> np.uint64(16)) & np.uint64(0xFFFFFF))
    return bits.astype(np.float32) * np.float32(2.0 ** -24) - np.float32(0.5)


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


class ErrorReplay:
    """A reference's error quantizers replayed on ORT's (an `expose_errors` build's `<gemm>::bwq/error`, the error
    entering each BW quantizer, and `/error_q`, its output), so that every comparison stays local.

    Without it, a ~1e-7 float-order difference between ORT and the reference upstream of a stochastic quantizer
    moves an element across a rounding boundary now and then; the one-step flip reaches the quantizer above it and
    flips more there, and gradients behind two or more quantizers differ by up to ~2e-2, depending on the CPU
    (issue 14 item 5). With it: (1) the error reaching each quantizer equals ORT's to `tol` (a wrong backward of
    any op shows here or in the gradients); (2) `quantizer` (the reference's, written from the spec) applied to
    ORT's input with the replayed noise equals ORT's output to float rounding (1e-5 of its largest value), except
    for elements exactly one quantization step apart, at most a `max_flips` share of them (x/s + noise at a
    rounding boundary); wrong bits, noise or range change most elements; (3) the backward continues from ORT's quantized error, so the gradients are
    compared at `tol` too. `quantize` is what the reference's backward calls."""

    def __init__(self, outputs: dict, quantizer, tol: float = 1e-4, max_flips: float = 1e-4):
        self.error = {n[: -len("::bwq/error")]: torch.from_numpy(np.asarray(o)) for n, o in outputs.items()
                      if n.endswith("::bwq/error")}
        self.error_q = {n[: -len("::bwq/error_q")]: np.asarray(o) for n, o in outputs.items()
                        if n.endswith("::bwq/error_q")}
        assert self.error and self.error.keys() == self.error_q.keys(), "build with BuildOptions(expose_errors=True)"
        self.fq, self.tol, self.max_flips = quantizer, tol, max_flips
        self.seen = []

    def quantize(self, gemm: str, g, bits, noise):
        err = self.error[gemm]
        assert rel_err(g.numpy(), err.numpy()) <= self.tol, f"{gemm}: the error reaching its BW quantizer"
        ours = self.fq(err, bits, noise=noise).numpy()
        theirs = self.error_q[gemm]
        b = torch.clamp(torch.as_tensor(bits, dtype=torch.float32), min=1.0)   # 0 bits pass through: no step
        step = torch.clamp((err.max() - err.min()) / (2.0 ** b - 1), min=1e-8).expand_as(err).numpy()
        d = np.abs(ours - theirs)
        tiny = 1e-5 * float(np.abs(theirs).max())   # float rounding of a dequantized value (any kernel's op order)
        off = d > tiny
        one_step = np.abs(d[off] - step[off]) <= tiny + 1e-3 * step[off]
        assert one_step.all(), f"{gemm}: quantized error off by other than one step"
        assert off.sum() <= self.max_flips * off.size + 1, f"{gemm}: {off.sum()} of {off.size} elements one step off"
        self.seen.append(gemm)
        return torch.from_numpy(theirs.copy())


def fq_ref(x, bits, per_channel=False, noise=None, axis=None):
    """FracTrain's min/max fake quantizer (spec fractrain.md §1.1) in PyTorch: per tensor, per output channel
    (`per_channel`, i.e. axis 0) or one range per slice along `axis`; `noise` added before rounding (stochastic
    rounding of errors); 0 bits pass x through."""
    if bits == 0:
        return x
    if per_channel:
        axis = 0
    if axis is not None:
        dims = [d for d in range(x.dim()) if d != axis % x.dim()]
        mn, mx = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    else:
        mn, mx = x.min(), x.max()
    levels = 2.0 ** bits - 1
    scale = torch.clamp((mx - mn) / levels, min=1e-8)
    y = (x - mn) / scale
    if noise is not None:
        y = y + noise
    return torch.round(torch.clamp(y, 0, levels)) * scale + mn


class STE(torch.autograd.Function):
    """Forward fake quantization, straight-through backward."""

    @staticmethod
    def forward(ctx, x, bits, per_channel):
        return fq_ref(x, bits, per_channel)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class GradQ(torch.autograd.Function):
    """Identity forward; the backward quantizes the error with the replayed noise, or with `replay` = (ErrorReplay,
    GEMM name) checks the quantizer on ORT's error and continues from ORT's quantized error."""

    @staticmethod
    def forward(ctx, y, bits, noise, replay=None):
        ctx.bits, ctx.noise, ctx.replay = bits, noise, replay
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        noise = ctx.noise(g.shape) if callable(ctx.noise) else ctx.noise   # callable: regenerated from a stream
        if ctx.replay is not None:
            replay, gemm = ctx.replay
            return replay.quantize(gemm, g, ctx.bits, noise), None, None, None
        return fq_ref(g, ctx.bits, noise=noise), None, None, None


class MacsModel:
    """A stand-in hardware model whose 'energy' is the effective MACs of a GEMM (MACs x a/32 x b/32): a hardware cost
    table built with it must reproduce the MAC cost table (tests/train/test_dfq_hw_cost.py,
    tests/passes/test_dfq_attention_cost.py)."""

    name, freq_hz, static_power_w = "macs", 1.0, 0.0

    def conv_cost(self, op):
        from fracgraph.hwmodels import LEVELS, Cost

        e = {k: 0.0 for k in LEVELS}
        e["compute"] = op.macs * op.a_bits / 32 * op.b_bits / 32
        return Cost(latency_s=1.0, macs=op.macs, energy_pj=e)

    def mem_cost(self, op):
        from fracgraph.hwmodels import Cost

        return Cost()


def f32_bits(a):
    """A float32 array's bit patterns (uint32): compare with np.array_equal for bitwise equality (NaN, -0.0)."""
    return np.ascontiguousarray(a).view(np.uint32)


def assert_steps_bitwise(step_off, step_on, n_grads: int):
    """Two steps' (loss, {gradient name: array}, {noise name: array}) the same bit for bit, with `n_grads` gradients."""
    (loss0, grads0, noise0), (loss1, grads1, noise1) = step_off, step_on
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys() and len(grads0) == n_grads
    for name, g in grads0.items():
        assert np.array_equal(f32_bits(grads1[name]), f32_bits(g)), name
    assert noise0.keys() == noise1.keys() and all(np.array_equal(noise0[k], noise1[k]) for k in noise0)


def torch_sgd_losses(net, loss_of, steps: int, lr: float, momentum: float = 0.0) -> list[float]:
    """The losses of `steps` torch.optim.SGD steps of `net` (every parameter), `loss_of(net)` the step's loss."""
    import torch

    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(net)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses
