"""One quantized training step of the zoo GPT against an independent PyTorch implementation (issue 16 item 5).

The reference is the nanoGPT math written in torch (functional, from the zoo module's parameters), with the
quantizers of fractrain.md §1 inserted where FracTrain puts them: every block GEMM's operands fake-quantized
(straight-through), weights per output column, activations per tensor, and for the attention's
activation-by-activation GEMMs (QK^T, attention x V) both operands per tensor at the act bits; every block GEMM's
output error quantized with stochastic rounding, using the very noise the ORT step drew (exposed as graph outputs,
or regenerated from the fused kernels' counter-based stream). The head stays FP32 (last-layer policy), the
embeddings FP32 (default policy) or, with policy "embeddings": "quantize", the token table fake-quantized per row at
block 0's weight bits with a straight-through gradient. Loss: cross-entropy over the vocabulary, mean over every
token.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402
from fracgraph.zoo import build_gpt, export_gpt  # noqa: E402
from conftest import fq_ref  # noqa: E402

SIZES = dict(layers=2, heads=2, width=16, context=8, vocab=11)


def fq(x, bits, axis=None, noise=None):
    """Min/max fake quantization: per tensor (axis None) or one range per slice along `axis` (conftest's)."""
    return fq_ref(x, bits, noise=noise, axis=axis)


class STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits, axis):
        return fq(x.detach(), bits, axis)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class GradQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, bits, noise):
        ctx.bits, ctx.noise = bits, noise
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        noise = ctx.noise(g.shape) if callable(ctx.noise) else ctx.noise
        return fq(g, ctx.bits, noise=noise), None, None


def reference_loss(model, ids, labels, bits, noises, embeddings="fp32"):
    """The quantized GPT step in PyTorch; `noises[gemm node name]` = that GEMM's error noise."""
    a, w, g = bits
    T, C, H = model.context, model.tok.weight.shape[1], model.blocks[0].attn.heads
    D = C // H

    def linear(name, x, lin):   # weight GEMM: act per tensor, weight [in, out] per output column
        out = torch.matmul(STE.apply(x, a, None), STE.apply(lin.weight.t(), w, 1))
        return GradQ.apply(out, g, noises[name]) + lin.bias

    def actmm(name, x, y):      # activation x activation: both per tensor at the act bits
        return GradQ.apply(torch.matmul(STE.apply(x, a, None), STE.apply(y, a, None)), g, noises[name])

    def ln(x, m):
        d = x - x.mean(-1, keepdim=True)
        return d / torch.sqrt((d * d).mean(-1, keepdim=True) + 1e-5) * m.weight + m.bias

    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    table = model.tok.weight if embeddings == "fp32" else STE.apply(model.tok.weight, w, 0)   # per row
    x = table[ids] + model.pos
    for i, blk in enumerate(model.blocks):
        p = f"/blocks.{i}/attn"
        h = ln(x, blk.ln1)
        q, k, v = (linear(f"{p}/{n}/MatMul", h, getattr(blk.attn, n)).reshape(-1, T, H, D).transpose(1, 2)
                   for n in "qkv")
        att = actmm(f"{p}/MatMul", q, k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
        att = torch.softmax(att.masked_fill(future, float("-inf")), -1)
        y = actmm(f"{p}/MatMul_1", att, v).transpose(1, 2).reshape(-1, T, C)
        x = x + linear(f"{p}/proj/MatMul", y, blk.attn.proj)
        h = F.gelu(linear(f"/blocks.{i}/fc/MatMul", ln(x, blk.ln2), blk.fc))
        x = x + linear(f"/blocks.{i}/fc_proj/MatMul", h, blk.fc_proj)
    logits = torch.matmul(ln(x, model.ln_f), model.head.weight.t())   # head FP32
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten()), logits


@pytest.fixture(scope="module")
def gpt_model(tmp_path_factory):
    path = export_gpt(tmp_path_factory.mktemp("gpt") / "gpt.onnx", seed=0, **SIZES)
    return build_gpt(**SIZES, seed=0), path


def _artifacts(gpt_model, tmp_path_factory, mode, embeddings="fp32"):
    """Noise exposed as graph outputs, or the default build (fused kernels, noise regenerated from their stream)."""
    from fracgraph.policy import LayerPolicy

    out = tmp_path_factory.mktemp("gart") / "art"
    # gelu-grad left out: its GeluGrad (another erf, within 2.5e-6 of the float64 derivative) moves one more error
    # element across a stochastic-rounding boundary than onnxruntime's does at (8, 8, 8) here, and that flip reaches
    # four gradients (blocks.0's q and k), past the one the assertion below allows; the pass is checked by
    # tests/passes/test_gelu_grad.py (the kernel against float64, the step with the pass on and off)
    # the integer MatMuls (int_matmul) left out for the same reason: their exact integer sums differ from PyTorch's
    # float sums by rounding, which moves error elements across stochastic-rounding boundaries; with one noise draw
    # (the one quant-bits' node order gives at (8, 8, 8)) a flip in the top layer's error reached all 33 gradients.
    # They are checked against the float MatMuls with FP32 errors in tests/passes/test_int_gemm.py (loss and every
    # gradient to 1e-5) and against float64 in tests/passes/test_int_matmul.py.
    build_artifacts(gpt_model[1], out, BuildOptions(expose_noise=mode == "exposed", skip_passes=("gelu-grad",),
                                                    int_matmul=False, policy=LayerPolicy(embeddings=embeddings)))
    return out


def _noises(sess, outs, seed, gemms):
    exposed = {n.split("::bwq")[0]: torch.from_numpy(np.asarray(o))
               for n, o in zip(sess.module.output_names(), outs) if n.endswith("/noise")}
    if exposed:
        return exposed
    from conftest import sr_noise_ref
    from fracgraph.passes.fused_ops import salt

    def stream(gemm):
        return lambda shape: torch.from_numpy(
            sr_noise_ref(seed, salt(f"{gemm}::bwq"), 0, int(np.prod(shape))).reshape(shape))

    return {gm: stream(gm) for gm in gemms}


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.mark.parametrize("mode,bits,embeddings", [("exposed", (8, 8, 8), "fp32"), ("fused-rng", (4, 4, 6), "fp32"),
                                                   ("fused-rng", (6, 4, 6), "quantize")])
def test_gpt_quantized_step_matches_pytorch(gpt_model, tmp_path_factory, mode, bits, embeddings):
    model, _ = gpt_model
    gpt_artifacts = _artifacts(gpt_model, tmp_path_factory, mode, embeddings)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, SIZES["vocab"], (3, SIZES["context"])).astype(np.int64)
    labels = rng.integers(0, SIZES["vocab"], (3, SIZES["context"])).astype(np.int64)
    sess = TrainSession(gpt_artifacts, seed=0)
    m = sess.manifest
    assert m.task["kind"] == "language_model" and m.n_blocks == 2 * SIZES["layers"]
    gemms = [d["name"] for d in m.ops if d["quantized"]]
    assert sum(not d["weight_is_param"] for d in m.ops if d["quantized"]) == 2 * SIZES["layers"]   # QK^T, AV
    outs = sess.forward_backward(ids, labels, np.tile(np.array(bits, np.float32), (m.n_blocks, 1)))
    noises = _noises(sess, outs, 0, gemms)
    assert set(gemms) <= set(noises)

    ref = build_gpt(**SIZES, seed=0).train()
    ref.load_state_dict(model.state_dict())
    loss, logits = reference_loss(ref, torch.from_numpy(ids), torch.from_numpy(labels), bits, noises, embeddings)
    loss.backward()
    assert abs(float(outs[0]) - loss.item()) <= 1e-4 * abs(loss.item())
    assert rel_err(np.asarray(outs[1]), logits.detach().numpy()) <= 1e-4
    params = dict(ref.named_parameters())
    assert set(sess.trainable) == set(params)           # every parameter trained, embeddings included
    errs = {}
    for name in sess.trainable:
        want = params[name].grad.numpy()
        got = sess.gradient(name)
        if got.ndim == 2 and name not in ("tok.weight", "pos"):   # Linear weights are stored [in, out] in the ONNX model
            got = got.T
        if name.endswith("attn.k.bias"):
            # softmax is shift-invariant along the keys, so dL/db_k is 0 up to the quantizers' effect: measured
            # against the query bias's gradient, not against its own near-zero norm
            scale = np.linalg.norm(params[name.replace("k.bias", "q.bias")].grad.numpy())
            errs[name] = float(np.linalg.norm(got - want) / scale)
        else:
            errs[name] = rel_err(got, want)
    # A float-order difference upstream (ORT's vs torch's summation) can move one element of a quantized operand
    # across a rounding boundary, i.e. by one quantizer step: at most one parameter may then differ, and by less
    # than one act step relative to its gradient; every other gradient matches to 1e-4.
    step = 1.0 / (2 ** bits[0] - 1)
    off = {n: e for n, e in errs.items() if e > 1e-4}
    assert len(off) <= 1 and all(e <= step for e in off.values()), off
