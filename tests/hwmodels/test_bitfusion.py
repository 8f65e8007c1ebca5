"""Bit-Fusion port against the released simulator's own outputs (spec hwmodels.md V1-V4, V11)."""

import pytest

from fracgraph.hwmodels.base import ConvOp, MemOp
from fracgraph.hwmodels.bitfusion import BitFusion, perf_factor, time_multiplex


@pytest.fixture(scope="module")
def bf():
    return BitFusion("isca18")


# rows of results/bitfusion-eyeriss-sim-sweep.csv (cycles, stall, WBUF rd/wr, OBUF rd/wr, IBUF rd/wr, DRAM rd/wr)
V_ROWS = {
    "V1 conv1_b": (ConvOp(ic=3, oc=96, batch=16, kh=11, kw=11, oh=55, ow=55, stride=4, a_bits=8, b_bits=8, im2col=True),
                   (3746423, 406823, 13493145600, 282624, 297369600, 297369600, 13493145600, 421660800, 570628224, 148684800)),
    "V2 conv2_a": (ConvOp(ic=96, oc=256, batch=16, kh=5, kw=5, oh=27, ow=27, a_bits=4, b_bits=4),
                   (5018849, 1249, 41104179200, 3276800, 411041792, 411041792, 41104179200, 462422016, 671219712, 205520896)),
    "V3 fc3": (ConvOp(ic=8192, oc=1000, batch=16, a_bits=8, b_bits=8),
               (398679, 136535, 1073741824, 67108864, 8388608, 8388608, 1073741824, 1048576, 72351744, 4194304)),
}


@pytest.mark.parametrize("case", sorted(V_ROWS))
def test_v1_v3_exact(bf, case):
    op, want = V_ROWS[case]
    r = bf.search(op)
    got = (r["cycles"], r["stall"], r["wbuf_rd"], r["wbuf_wr"], r["obuf_rd"], r["obuf_wr"], r["ibuf_rd"], r["ibuf_wr"],
           r["dram_rd"], r["dram_wr"])
    assert got == want


def test_v1_compute_formula(bf):
    op, _ = V_ROWS["V1 conv1_b"]
    assert bf.search(op)["compute"] == 16 * 55 * 55 * 3 * -(-363 // 16) == 3339600
    assert bf.search(V_ROWS["V3 fc3"][0])["compute"] == 262144


def test_v4_energy_constants(bf):
    p = bf.p
    assert p["core_pj_per_cycle"] == pytest.approx(235.104)
    for key, want in [("wbuf_rd", 0.021), ("wbuf_wr", 0.029), ("ibuf_rd", 0.059), ("ibuf_wr", 0.114),
                      ("obuf_rd", 0.033), ("obuf_wr", 0.073)]:
        assert round(p[f"{key}_pj_per_bit"], 3) == pytest.approx(want, abs=1e-3), key
    assert p["dram_pj_per_bit"] == 15.0


@pytest.mark.parametrize("bits,fw,stall,gemm,energy_mj", [
    (8, 1180484, 836, 1181057, (0.277, 0.413, 3.150)),
    (4, 384428, 89516, 415063, (0.069, 0.203, 1.107)),
    (2, 367105, 72193, 207532, (0.069, 0.105, 1.057)),
])
def test_v11_training_layer(bf, bits, fw, stall, gemm, energy_mj):
    """Spec 4.1: 3x3 conv C=K=64, 32x32, N=16; forward, error (same call) and GEMM-form weight gradient."""
    op = ConvOp(ic=64, oc=64, batch=16, kh=3, kw=3, oh=32, ow=32, a_bits=bits, b_bits=bits)
    r = bf.search(op)
    assert (r["cycles"], r["stall"]) == (fw, stall)
    assert bf.search(ConvOp(ic=16 * 32 * 32, oc=64, batch=64 * 9, a_bits=bits, b_bits=bits))["cycles"] == gemm
    e = bf.conv_cost(op).energy_pj
    assert (round(e["compute"] / 1e9, 3), round(e["buffer"] / 1e9, 3), round(e["dram"] / 1e9, 3)) == energy_mj


def test_precision_rules():
    assert perf_factor(2, 2) == 16 and perf_factor(4, 8) == 2 and perf_factor(3, 3) == 4 and perf_factor(6, 6) == 1
    assert perf_factor(1, 1) == 16                           # binary clamps to 2 bits
    assert perf_factor(16, 8) == 1 and time_multiplex(16, 8) == 2 and time_multiplex(16, 16) == 4
    assert time_multiplex(32, 32) == 16


def test_wide_operands_time_multiplexed(bf):
    """>8-bit operands: same tiling as 8 bits compute-wise, x2 cycles per operand (released code divides by 0)."""
    base = dict(ic=256, oc=256, batch=16, kh=3, kw=3, oh=8, ow=8)
    c8 = bf.search(ConvOp(**base, a_bits=8, b_bits=8))["compute"]
    c16 = bf.search(ConvOp(**base, a_bits=16, b_bits=8))["compute"]
    c1616 = bf.search(ConvOp(**base, a_bits=16, b_bits=16))["compute"]
    assert c16 == 2 * c8 and c1616 == 4 * c8


def test_lower_bits_never_slower(bf):
    for ic in (16, 64, 512):
        cyc = [bf.conv_cost(ConvOp(ic=ic, oc=128, batch=16, kh=3, kw=3, oh=16, ow=16, a_bits=b, b_bits=b)).cycles
               for b in (16, 8, 4, 2)]
        assert cyc == sorted(cyc, reverse=True)
        assert cyc[1] > cyc[2]


def test_repeat_and_memop(bf):
    op = ConvOp(ic=8, oc=32, batch=16, kh=3, kw=3, oh=16, ow=16, repeat=4)
    one = bf.conv_cost(ConvOp(ic=8, oc=32, batch=16, kh=3, kw=3, oh=16, ow=16))
    four = bf.conv_cost(op)
    assert four.cycles == 4 * one.cycles and four.macs == op.macs
    m = bf.mem_cost(MemOp(read_bits=1920, write_bits=192))
    assert m.cycles == 11 and m.energy_pj["dram"] == 2112 * 15.0
