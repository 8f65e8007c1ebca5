"""A linear layer's GEMMs on codes (fracgraph/kernels/int_gemm.c's IntMatMul and IntMatMulGradW, passes/int_gemm.py).

The kernels read fake-quantized float tensors (values s q + m), recover the codes and compute the integer sum
exactly, so their error is the one float rounding of the double-precision rescale, plus the fake-quant values' own
rounding (an ulp each): far below 2^-20 * Rn * max|L| * max|R| (Rn the reduction length), while one wrong code moves
an output by a quantizer step times the other operand's largest value (asserted to be well above the bound, so the
tests can fail). The reference is numpy's float64 product of the same fake-quantized tensors.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import custom_op_session  # noqa: E402
from test_int_gemm import PATHS, available, fake_quant, skip_unless  # noqa: E402


def run(op, a, am, as_, b, bm, bs, threads=2):
    sess = custom_op_session(op, ["a", "am", "as", "b", "bm", "bs"], ["y"], threads=threads)
    return sess.run(None, {"a": a, "am": am, "as": as_, "b": b, "bm": bm, "bs": bs})[0]


def operands(a_shape, b_shape, abits, bbits, per_column, seed):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(a_shape) + 0.7).astype(np.float32)
    b = (rng.standard_normal(b_shape) * 0.3 - 0.1).astype(np.float32)
    aq, am, as_ = fake_quant(a, abits)
    if per_column:   # the MatMul weight quantizer: one range per output column (MinMaxCols)
        bq, bm, bs = fake_quant(b, bbits, axes=(0,))
        bm, bs = bm.reshape(-1), bs.reshape(-1)
    else:
        bq, bm, bs = fake_quant(b.reshape(-1, b_shape[-1]), bbits)
        bq = bq.reshape(b_shape)
    return aq, am, as_, bq, bm, bs


def check(y, ref, rn, lmax, rmax, step):
    bound = 2.0 ** -20 * rn * lmax * rmax
    err = np.abs(y.astype(np.float64) - ref).max()
    assert y.shape == ref.shape and err <= bound, (err, bound)
    assert step > 8 * bound   # one wrong code would fail the test


# (a, w): a linear layer, 3-D and 4-D activations (leading dims flattened), K and N off 16/64, M off 16 and 32
FW_CASES = [((37, 64), (64, 48)), ((2, 17, 100), (100, 70)), ((3, 5, 7, 33), (33, 129)), ((1, 2), (2, 1))]
# (a, g): the activation and error of one linear layer (rows = images x tokens)
DW_CASES = [((37, 64), (37, 48)), ((2, 17, 100), (2, 17, 70)), ((300, 19), (300, 130)), ((5, 3), (5, 1))]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", range(len(FW_CASES)))
@pytest.mark.parametrize("bits", [(8, 8), (4, 6)])
def test_forward_matches_float64(monkeypatch, path, case, bits):
    skip_unless(path)
    monkeypatch.setenv("FRACGRAPH_INT_ISA", path)
    a_shape, w_shape = FW_CASES[case]
    aq, am, as_, wq, wm, ws = operands(a_shape, w_shape, *bits, per_column=True, seed=case)
    y = run("IntMatMul", aq, am, as_, wq, wm, ws)
    ref = np.matmul(aq.astype(np.float64), wq.astype(np.float64))
    check(y, ref, w_shape[0], np.abs(aq).max(), np.abs(wq).max(), ws.min() * np.abs(aq).max())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", range(len(DW_CASES)))
@pytest.mark.parametrize("bits", [(8, 8), (4, 6)])
def test_weight_gradient_matches_float64(monkeypatch, path, case, bits):
    skip_unless(path)
    monkeypatch.setenv("FRACGRAPH_INT_ISA", path)
    a_shape, g_shape = DW_CASES[case]
    aq, am, as_, gq, gm, gs = operands(a_shape, g_shape, *bits, per_column=False, seed=10 + case)
    y = run("IntMatMulGradW", aq, am, as_, gq, gm, gs)
    a2, g2 = aq.reshape(-1, a_shape[-1]).astype(np.float64), gq.reshape(-1, g_shape[-1]).astype(np.float64)
    ref = a2.T @ g2
    check(y, ref, a2.shape[0], np.abs(aq).max(), np.abs(gq).max(), gs * np.abs(aq).max())


def test_paths_agree_bitwise():
    import os

    outs = {}
    aq, am, as_, wq, wm, ws = operands((3, 45, 200), (200, 90), 8, 8, per_column=True, seed=3)
    ga, gam, gas, gq, gm, gs = operands((3, 45, 200), (3, 45, 90), 8, 5, per_column=False, seed=4)
    for path in [p for p in PATHS if available(p)]:
        os.environ["FRACGRAPH_INT_ISA"] = path
        try:
            outs[path] = (run("IntMatMul", aq, am, as_, wq, wm, ws), run("IntMatMulGradW", ga, gam, gas, gq, gm, gs))
        finally:
            del os.environ["FRACGRAPH_INT_ISA"]
    first = next(iter(outs.values()))
    assert len(outs) >= 2
    for path, (y, dw) in outs.items():
        np.testing.assert_array_equal(y, first[0], err_msg=path)
        np.testing.assert_array_equal(dw, first[1], err_msg=path)


@pytest.mark.parametrize("path", ["vnni", "scalar"])
def test_reduction_past_the_int32_bound_runs_in_chunks(monkeypatch, path):
    """70,000 rows at the extreme codes: |acc| = 70000 * 255 * 128 > 2^31, so one int32 sum would wrap; the kernel
    sums chunks of 65,536 rows in int64 (exact: the result is the float64 product to float rounding)."""
    skip_unless(path)
    monkeypatch.setenv("FRACGRAPH_INT_ISA", path)
    rows = 70_000
    a = np.full((rows, 3), 2.0, np.float32)
    a[0] = -1.0                       # min -1, the other rows at the top code 255
    g = np.full((rows, 2), -0.5, np.float32)
    g[0] = 0.5                        # the other rows at code 0 (signed -128 in the sum)
    am, as_ = np.array(-1.0, np.float32), np.array(3.0 / 255, np.float32)
    gm, gs = np.array(-0.5, np.float32), np.array(1.0 / 255, np.float32)
    y = run("IntMatMulGradW", a, am, as_, g, gm, gs, threads=1)
    ref = a.astype(np.float64).T @ g.astype(np.float64)
    assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("op,a_shape,b_shape,bn,message", [
    ("IntMatMul", (4, 8), (9, 3), 3, "a must be \\[..., K\\] and w \\[K, N\\] with the same K"),
    ("IntMatMul", (4, 8), (8, 3), 2, "one value per column"),
    ("IntMatMulGradW", (4, 8), (5, 3), 1, "same leading dimensions"),
])
def test_bad_shapes_fail_in_one_line(op, a_shape, b_shape, bn, message):
    one = np.ones((), np.float32)
    with pytest.raises(Exception, match=message):
        run(op, np.zeros(a_shape, np.float32), np.zeros((), np.float32), one, np.zeros(b_shape, np.float32),
            np.zeros(bn, np.float32), np.ones(bn, np.float32))


# -- IntGemm: ONNX Gemm(a, w, bias, transB) forwards (torchvision's linear layers) ------------------------------------
def run_gemm(a, am, as_, w, wm, ws, bias, trans_b=1, threads=2):
    sess = custom_op_session("IntGemm", ["a", "am", "as", "w", "wm", "ws", "b"], ["y"], threads=threads, trans_b=trans_b)
    return sess.run(None, {"a": a, "am": am, "as": as_, "w": w, "wm": wm, "ws": ws, "b": bias})[0]


def gemm_operands(m, k, n, abits, wbits, trans_b, seed):
    """a [M, K] per tensor; w [N, K] per row (the Gemm weight quantizer's ranges under transB = 1) or [K, N] per
    column; a bias of N values."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((m, k)) + 0.7).astype(np.float32)
    w = (rng.standard_normal((n, k) if trans_b else (k, n)) * 0.3 - 0.1).astype(np.float32)
    aq, am, as_ = fake_quant(a, abits)
    wq, wm, ws = fake_quant(w, wbits, axes=(1,) if trans_b else (0,))
    bias = (rng.standard_normal(n) * 2).astype(np.float32)
    return aq, am, as_, wq, wm.reshape(-1), ws.reshape(-1), bias


# (M, K, N): vit_tv's shapes scaled down (tokens x width), K and N off 16/64, M off 16 and 32, a 1 x 1
GEMM_CASES = [(37, 64, 48), (51, 100, 70), (5, 33, 129), (1, 2, 1)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", range(len(GEMM_CASES)))
@pytest.mark.parametrize("bits", [(8, 8), (4, 6)])
@pytest.mark.parametrize("trans_b", [1, 0])
def test_gemm_forward_matches_float64(monkeypatch, path, case, bits, trans_b):
    skip_unless(path)
    monkeypatch.setenv("FRACGRAPH_INT_ISA", path)
    m, k, n = GEMM_CASES[case]
    aq, am, as_, wq, wm, ws, bias = gemm_operands(m, k, n, *bits, trans_b, seed=20 + case)
    y = run_gemm(aq, am, as_, wq, wm, ws, bias, trans_b)
    w64 = wq.astype(np.float64).T if trans_b else wq.astype(np.float64)
    ref = aq.astype(np.float64) @ w64 + bias.astype(np.float64)
    # the bias adds its own float rounding (an ulp of the output) to the product's bound
    check(y, ref, k, np.abs(aq).max(), np.abs(wq).max(), ws.min() * np.abs(aq).max())


def test_gemm_paths_agree_bitwise_and_a_scalar_bias_broadcasts():
    import os

    outs = {}
    aq, am, as_, wq, wm, ws, bias = gemm_operands(45, 200, 90, 8, 8, 1, seed=5)
    one = np.array([0.25], np.float32)
    for path in [p for p in PATHS if available(p)]:
        os.environ["FRACGRAPH_INT_ISA"] = path
        try:
            outs[path] = (run_gemm(aq, am, as_, wq, wm, ws, bias), run_gemm(aq, am, as_, wq, wm, ws, one))
        finally:
            del os.environ["FRACGRAPH_INT_ISA"]
    first = next(iter(outs.values()))
    assert len(outs) >= 2
    for path, (y, y1) in outs.items():
        np.testing.assert_array_equal(y, first[0], err_msg=path)
        np.testing.assert_array_equal(y1, first[1], err_msg=path)
    # the same product with the bias moved: y - bias == y1 - 0.25 up to the output's rounding
    ref = aq.astype(np.float64) @ wq.astype(np.float64).T
    check(first[1], ref + 0.25, 200, np.abs(aq).max(), np.abs(wq).max(), ws.min() * np.abs(aq).max())
    # and the transposed packing is the untransposed one's: IntMatMul on w^T (per column) with the bias added
    y_mm = run("IntMatMul", aq, am, as_, np.ascontiguousarray(wq.T), wm, ws)
    assert np.abs(first[0] - (y_mm.astype(np.float64) + bias)).max() <= 2.0 ** -20 * 200 * np.abs(aq).max() * np.abs(wq).max()


@pytest.mark.parametrize("a_shape,w_shape,bn,nb,trans_b,message", [
    ((4, 8), (3, 9), 3, 3, 1, "a must be \\[M, K\\] and w \\[N, K\\] with the same K"),
    ((4, 8), (9, 3), 3, 3, 0, "a must be \\[M, K\\] and w \\[K, N\\] with the same K"),
    ((2, 4, 8), (3, 8), 3, 3, 1, "a must be \\[M, K\\]"),
    ((4, 8), (3, 8), 3, 2, 1, "the bias must hold one value per output column \\(3\\) or one in all"),
    ((4, 8), (3, 8), 2, 3, 1, "one value per column"),
])
def test_gemm_bad_shapes_fail_in_one_line(a_shape, w_shape, bn, nb, trans_b, message):
    one = np.ones((), np.float32)
    with pytest.raises(Exception, match=message):
        run_gemm(np.zeros(a_shape, np.float32), np.zeros((), np.float32), one, np.zeros(w_shape, np.float32),
                 np.zeros(bn, np.float32), np.ones(bn, np.float32), np.zeros(nb, np.float32), trans_b)
