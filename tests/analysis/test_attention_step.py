"""The training-step analyzer on a transformer: one GPT layer's op list against hand-counted MACs, bits per operand,
memory-bound LayerNorm/softmax/GELU ops, and an estimate on every hardware model (issue 16 item 6)."""

from __future__ import annotations

import numpy as np
import pytest

from fracgraph.analysis.estimate import Estimator, from_artifacts
from fracgraph.hwmodels import get_model

B, T, C, H, V = 3, 8, 16, 2, 11
D = C // H


@pytest.fixture(scope="module")
def gpt_art(tmp_path_factory):
    pytest.importorskip("torch")
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.zoo import export_gpt

    d = tmp_path_factory.mktemp("gpt")
    export_gpt(d / "gpt.onnx", seed=0, layers=1, heads=H, width=C, context=T, vocab=V)
    build_artifacts(d / "gpt.onnx", d / "art", BuildOptions(fused_kernels=False, nchwc=False))
    return d / "art"


def test_one_block_op_list_against_hand_counted_macs(gpt_art):
    step = from_artifacts(gpt_art, batch=B).step
    gemm = {(o.layer, o.phase): o for o in step.gemm_ops()}
    a = "/blocks.0/attn"
    proj = B * T * C * C                     # a [B*T, C] x [C, C] projection
    attn = B * H * T * T * D                 # QK^T: [T, D] x [D, T] per head; AV: [T, T] x [T, D] per head
    mlp = B * T * C * 4 * C
    want = {
        **{(f"{a}/{n}/MatMul", ph): proj for n in "qkv" for ph in ("fw", "bw_data", "bw_weight")},
        **{(f"{a}/proj/MatMul", ph): proj for ph in ("fw", "bw_data", "bw_weight")},
        # activation x activation: forward and two error GEMMs (dA = dY B^T, dB = A^T dY), no weight update
        **{(f"{a}/MatMul", ph): attn for ph in ("fw", "bw_data", "bw_weight")},
        **{(f"{a}/MatMul_1", ph): attn for ph in ("fw", "bw_data", "bw_weight")},
        **{(f"/blocks.0/{n}/MatMul", ph): mlp for n in ("fc", "fc_proj") for ph in ("fw", "bw_data", "bw_weight")},
        **{("/head/MatMul", ph): B * T * C * V for ph in ("fw", "bw_data", "bw_weight")},
    }
    assert {k: o.macs for k, o in gemm.items()} == want
    # operands: attention's GEMMs read the act bits on both activation operands
    assert gemm[(f"{a}/MatMul", "fw")].operands == ("act", "act")
    assert gemm[(f"{a}/MatMul", "bw_data")].operands == ("grad", "act")
    assert gemm[(f"{a}/MatMul_1", "bw_weight")].operands == ("act", "grad")
    assert gemm[(f"{a}/q/MatMul", "fw")].operands == ("act", "weight")
    updates = {o.layer for o in step.ops if o.phase == "update"}
    assert f"{a}/MatMul" not in updates and f"{a}/q/MatMul" in updates
    # blocks: the attention sub-layer (block 0) and the MLP (block 1), the head FP32
    assert {o.block for (layer, _), o in gemm.items() if layer.startswith(a)} == {0}
    assert gemm[("/blocks.0/fc/MatMul", "fw")].block == 1 and gemm[("/head/MatMul", "fw")].block is None
    # LayerNorm (as ReduceMean/Sub/Pow|Mul/Sqrt/Div), softmax and GELU (Erf) are memory-bound ops, fw and bw
    mem = {(o.layer.rsplit("/", 1)[-1].split("_")[0], o.phase) for o in step.ops if o.kind == "mem"}
    for op in ("Softmax", "Erf", "ReduceMean", "Sqrt", "Div"):
        assert (op, "fw") in mem and (op, "bw") in mem, op
    # the causal mask: a bias Add since lowering/mask.py (a Where before), memory-bound too
    assert any(o.kind == "mem" and o.phase == "fw" and o.layer.startswith(f"fg::lower/{a}/Where/add_bias")
               for o in step.ops)


def test_attention_is_costed_on_every_hardware_model(gpt_art):
    step = from_artifacts(gpt_art, batch=B).step
    rows = np.array([[8, 8, 8], [8, 8, 8]], float)
    low = np.array([[4, 4, 8], [8, 8, 8]], float)     # only block 0 (attention) lower
    for hw in ("bitfusion", "eyeriss", "fpga"):
        est = Estimator(step, get_model(hw))
        s8, s4 = est.step_cost(rows), est.step_cost(low)
        by8 = {op.name: c for op, c in s8.ops}
        by4 = {op.name: c for op, c in s4.ops}
        for name in ("/blocks.0/attn/MatMul/fw", "/blocks.0/attn/MatMul/bw_data", "/blocks.0/attn/MatMul_1/bw_weight"):
            assert by8[name].latency_s > 0 and by8[name].energy_total_pj > 0, (hw, name)
            assert by4[name].detail["_bits"] in ("4x4", "8x4", "4x8"), (hw, name, by4[name].detail["_bits"])
        assert s8.latency_s > 0
        if hw == "bitfusion":        # bit-flexible: 4-bit attention operands are cheaper
            assert by4["/blocks.0/attn/MatMul/fw"].energy_total_pj < by8["/blocks.0/attn/MatMul/fw"].energy_total_pj
            assert s4.total.energy_total_pj < s8.total.energy_total_pj
