"""DFQ's cost term on a transformer block (issue 16): attention's activation x activation GEMMs (QK^T, attention x V)
cost a x a forward and g x a + a x g backward per MAC, not a w + g w + a g. Checked against a hand count of the GPT's
MACs from its sizes, against the loop's CostMeter (the run's `cp`/`cum_gmacs`) and against `estimate`'s op list
costed by a MAC-proportional hardware model; a CNN's cost table is the release's formula unchanged."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from fracgraph.analysis.estimate import block_option_costs, from_artifacts  # noqa: E402
from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.passes.dfq_gate import COUNTS_OUTPUT, CP_OUTPUT, DfqOptions, block_costs  # noqa: E402
from fracgraph.policy import LayerPolicy  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402
from fracgraph.train.dfq import gated_cost_table  # noqa: E402
from fracgraph.train.loop import CostMeter  # noqa: E402
from fracgraph.zoo import export_gpt  # noqa: E402

from conftest import MacsModel  # noqa: E402

C, T, V, HEADS = 16, 8, 11, 2
OPTIONS = [[3, 6], [4, 8], [6, 8], [8, 8]]
W = 4


def hand_table() -> tuple[np.ndarray, np.ndarray]:
    """(T [2, K], T32 [2]) per sample from the model's sizes: the attention sub-layer has q, k, v and the output
    projection (4 T C^2 MACs, weight GEMMs) and QK^T and attention x V (T^2 C each: heads x T x T x C/heads, both
    operands activations); the MLP sub-layer fc and fc_proj (8 T C^2)."""
    w_attn, aa_attn, w_mlp = 4 * T * C * C, 2 * T * T * C, 8 * T * C * C
    rows = []
    for a, g in OPTIONS:
        weight_unit = (a * W + g * W + a * g) / 1024
        act_unit = (a * a + g * a + a * g) / 1024
        rows.append([w_attn * weight_unit + aa_attn * act_unit, w_mlp * weight_unit])
    return np.array(rows).T, 3.0 * np.array([w_attn + aa_attn, w_mlp])



@pytest.fixture(scope="module")
def gpt_art(tmp_path_factory):
    d = tmp_path_factory.mktemp("dfq_attn")
    export_gpt(d / "gpt.onnx", seed=0, layers=1, heads=HEADS, width=C, context=T, vocab=V)
    m = build_artifacts(d / "gpt.onnx", d / "art", BuildOptions(dfq=DfqOptions(options=OPTIONS, weight_bits=W),
                                                                policy=LayerPolicy(first="quantize"),
                                                                fused_kernels=False))
    return d / "art", m


def test_gpt_cost_table_is_the_hand_count(gpt_art):
    art, m = gpt_art
    d = m.dfq
    want_T, want_T32 = hand_table()
    assert d["gated"] == [0, 1] and np.allclose(d["F"], want_T32 / 3)
    assert d["act_frac"] == pytest.approx([2 * T * T * C / (4 * T * C * C + 2 * T * T * C), 0.0])
    got_T, got_T32 = gated_cost_table(d)
    np.testing.assert_allclose(got_T, want_T, rtol=1e-12)
    np.testing.assert_allclose(got_T32, want_T32, rtol=1e-12)
    # the old formula (every GEMM a w + g w + a g) differs on the attention block wherever the act bits are not the
    # weight bits: the test can tell them apart
    old = np.array(d["F"])[0] * np.array([(a * W + g * W + a * g) / 1024 for a, g in OPTIONS])
    differs = np.abs(old - want_T[0]) > 1e-3 * want_T[0]
    assert differs.tolist() == [a != W for a, _ in OPTIONS] and differs.sum() == 3
    # `estimate`'s op list (attention GEMMs at act x act, two error GEMMs) costed by effective MACs: the same table
    src = from_artifacts(art, 4)
    hw_T, hw_T32 = block_option_costs(src.step, MacsModel(), OPTIONS, W)
    np.testing.assert_allclose(hw_T, want_T, rtol=1e-9)
    np.testing.assert_allclose(hw_T32, want_T32, rtol=1e-9)


def test_gpt_step_cost_term_and_cp(gpt_art):
    """One training forward: the graph's cp and cost term are the hand count of the options the gates chose, and
    the gated effective MACs equal what the loop's CostMeter counts for the same bits."""
    art, m = gpt_art
    sess = TrainSession(art, seed=0)
    rng = np.random.default_rng(0)
    B = 4
    ids = rng.integers(0, V, (B, T)).astype(np.int64)
    labels = rng.integers(0, V, (B, T)).astype(np.int64)
    bits = np.zeros((2, 3), np.float32)
    bits[:, 1] = W
    with_cost = float(sess.forward_backward(ids, labels, bits, target=0.0, beta=1.0)[0])   # cp > 0: reg = +1
    cp = float(sess.last_outputs[CP_OUTPUT])
    counts = np.asarray(sess.last_outputs[COUNTS_OUTPUT])
    plain = float(sess.forward_backward(ids, labels, bits, target=0.0, beta=0.0)[0])
    chosen = counts.argmax(1)
    assert (counts.sum(1) == B).all() and (counts.max(1) == B).all()          # batch mode: one option per block
    want_T, want_T32 = hand_table()
    eff = sum(want_T[l, k] for l, k in enumerate(chosen))                      # effective MACs per sample
    assert cp == pytest.approx(100 * eff / want_T32.sum(), rel=1e-5)
    F = want_T32 / 3
    assert with_cost - plain == pytest.approx(B * eff / F.mean(), rel=1e-4, abs=1e-5)
    # the run's own accounting (train/loop.py CostMeter: cp, cum_gmacs) of the same bits
    meter = CostMeter(m)
    rows = np.array([[OPTIONS[k][0], W, OPTIONS[k][1]] for k in chosen], np.float64)
    cost = meter.step(rows, B)
    gated_macs = cost["fw"] + cost["err"] + cost["wgrad"] - 3 * meter.fp32_macs * B     # minus the FP32 head
    assert gated_macs == pytest.approx(B * eff, rel=1e-9)


def test_cnn_cost_unchanged():
    """No activation x activation GEMM: every block's unit cost is exactly the release's (a w + g w + a g)/1024."""
    o = DfqOptions()
    unit = o.unit_costs().sum(1)
    got = o.block_unit_costs(np.zeros(3))
    assert (got == unit[None, :]).all()
    F = np.array([3.0, 5.0, 9.0])
    u, r = block_costs(got, F, None)
    u0, r0 = block_costs(unit, F, None)
    assert (u == u0).all() and (r == r0).all()
    d = {"F": F.tolist(), "unit_costs": o.unit_costs().tolist(), "options": o.options}
    T_old, _ = gated_cost_table(d)                                          # artifacts from before act_frac
    T_new, _ = gated_cost_table({**d, "act_frac": [0.0] * 3, "act_unit_costs": o.act_unit_costs().tolist()})
    assert (T_old == F[:, None] * unit[None, :]).all() and (T_new == T_old).all()
