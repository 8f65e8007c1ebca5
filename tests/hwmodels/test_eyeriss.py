"""Eyeriss row-stationary model against nn_dataflow's own validation (spec hwmodels.md V7-V9)."""

import pytest

from fracgraph.hwmodels.base import ConvOp
from fracgraph.hwmodels.eyeriss import Eyeriss, repl_fold

ALEX = {"conv1": [(3, 48, 55, 11, 4)] * 2, "conv2": [(48, 128, 27, 5, 1)] * 2, "conv3": [(256, 192, 13, 3, 1)] * 2,
        "conv4": [(192, 192, 13, 3, 1)] * 2, "conv5": [(192, 128, 13, 3, 1)] * 2, "fc1": [(256, 4096, 1, 6, 1)],
        "fc2": [(4096, 4096, 1, 1, 1)], "fc3": [(4096, 1000, 1, 1, 1)]}


def op(c, k, p, r, s, n, bits=16):
    return ConvOp(ic=c, oc=k, batch=n, kh=r, kw=r, oh=p, ow=p, stride=s, a_bits=bits, b_bits=bits)


V7 = {"conv1": (1.69, 2.46, 6.75), "conv2": (3.58, 2.27, 14.33), "conv3": (2.39, 2.02, 9.57),
      "conv4": (1.79, 1.57, 7.18), "conv5": (1.20, 1.05, 4.78), "fc1": (0.60, 7.78, 2.42),
      "fc2": (0.27, 3.39, 1.07), "fc3": (0.07, 0.84, 0.26)}


@pytest.mark.parametrize("layer", sorted(V7))
def test_v7_isca16_fig10(layer):
    """ALU / DRAM / RF energy (x1e9 normalized units), AlexNet B=16 on 16x16 PEs: within 10% (and nn_dataflow's 0.1)."""
    ey = Eyeriss("isca16")
    alu = dram = rf = 0.0
    for shape in ALEX[layer]:
        c = ey.conv_cost(op(*shape, 16))
        alu += c.energy_pj["compute"]
        dram += c.energy_pj["dram"]
        rf += c.detail["e_regf"]
    got = (alu / 1e9, dram / 1e9, rf / 1e9)
    for g, w in zip(got, V7[layer]):
        assert g == pytest.approx(w, rel=0.10)
        assert abs(g - w) < 0.1


V8 = {"conv1": (332, 16.5, 421.66), "conv2": (288, 39.2, 895.79), "conv3": (266, 21.8, 598.1),
      "conv4": (235, 16.0, 448.6), "conv5": (236, 10.0, 299.0)}


@pytest.mark.parametrize("layer", sorted(V8))
def test_v8_isscc16_chip(layer):
    """On-chip power in 0.6-1.0x and latency in 0.8-1.0x of the chip (12x14, B=4, 200 MHz), MOPs exact."""
    ey = Eyeriss("isscc16")
    onchip = cycles = macs = 0.0
    for shape in ALEX[layer]:
        c = ey.conv_cost(op(*shape, 4))
        onchip += c.energy_total_pj - c.energy_pj["dram"]
        cycles += c.cycles
        macs += c.macs
    ms = cycles / 200e3
    power_mw = onchip * 1e-12 / (ms * 1e-3) * 1e3
    ref_p, ref_ms, ref_mops = V8[layer]
    assert 0.6 * ref_p < power_mw < ref_p
    assert 0.8 * ref_ms < ms < ref_ms
    assert macs / 1e6 == pytest.approx(ref_mops, abs=0.1)


V9 = {"conv1": 11151360, "conv2": 26542080, "conv3": 12460032, "conv4": 9345024, "conv5": 6230016,
      "fc1": 3145728, "fc2": 1048576, "fc3": 262144}


@pytest.mark.parametrize("layer", sorted(V9))
def test_v9_cycles(layer):
    ey = Eyeriss("bitfusion_isca18")
    cyc = sum(ey.conv_cost(op(*s, 16)).cycles for s in ALEX[layer])
    assert cyc == pytest.approx(V9[layer], rel=0.20)


def test_repl_fold():
    assert repl_fold(11, 55, 16, 16) == ((1, 4), (1, 1))
    assert repl_fold(5, 27, 16, 16) == ((1, 1), (1, 1))       # width fold moved into spare height
    assert repl_fold(3, 13, 16, 16) == ((1, 1), (5, 1))


def test_no_gain_below_16_bits_and_multipass_above():
    ey = Eyeriss()
    base = op(64, 64, 16, 3, 1, 16, bits=16)
    c16 = ey.conv_cost(base)
    for b in (2, 4, 8):
        c = ey.conv_cost(op(64, 64, 16, 3, 1, 16, bits=b))
        assert c.cycles == c16.cycles and c.energy_total_pj == pytest.approx(c16.energy_total_pj)
    c32 = ey.conv_cost(op(64, 64, 16, 3, 1, 16, bits=32))
    assert c32.cycles == 4 * c16.cycles and c32.energy_total_pj > 2 * c16.energy_total_pj
