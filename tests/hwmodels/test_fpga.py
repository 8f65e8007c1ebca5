"""ZC706 recursive-engine model: DSP packing, peak throughput, energy = power x time."""

import pytest

from fracgraph.hwmodels.base import ConvOp
from fracgraph.hwmodels.fpga import ZC706, macs_per_dsp


def test_packing():
    assert [macs_per_dsp(b) for b in (2, 4, 6, 8, 16, 32)] == [4, 4, 2, 2, 1, 0.5]


def test_peak_throughput_matches_spec():
    """Compute-bound big layer: 900 DSPs x packing at 200 MHz = 180 / 360 / 720 GMAC/s at 16 / 8 / 4 bits."""
    m = ZC706()
    for bits, gmacs in ((16, 180), (8, 360), (4, 720)):
        op = ConvOp(ic=240, oc=240, batch=16, kh=3, kw=3, oh=32, ow=32, a_bits=bits, b_bits=bits)
        c = m.conv_cost(op)
        assert op.macs / (c.detail["compute"] / 200e6) / 1e9 == pytest.approx(gmacs, rel=1e-9)
        assert c.cycles >= c.detail["compute"]


def test_energy_is_power_times_time():
    m = ZC706(dram_pj_per_bit=0.0)
    c = m.conv_cost(ConvOp(ic=64, oc=64, batch=16, kh=3, kw=3, oh=16, ow=16, a_bits=8, b_bits=8))
    assert c.energy_pj["static"] == pytest.approx(2.0 * c.latency_s * 1e12)
    assert c.energy_pj["compute"] == pytest.approx(2.5 * c.detail["compute"] / 200e6 * 1e12)


def test_fewer_bits_faster_and_asymmetric_takes_max():
    m = ZC706()
    base = dict(ic=128, oc=128, batch=16, kh=3, kw=3, oh=16, ow=16)
    c8, c4, c48 = (m.conv_cost(ConvOp(**base, a_bits=a, b_bits=b)) for a, b in ((8, 8), (4, 4), (4, 8)))
    assert c4.cycles < c8.cycles
    assert c48.detail["compute"] == c8.detail["compute"]


def test_linear_packing_is_auto_nba_q_over_16():
    """Auto-NBA: a q-bit MAC takes q/16 DSP -> 16/q MACs per DSP, from min_pack_bits (4) up; FP32 half a MAC."""
    assert [macs_per_dsp(b, "linear") for b in (2, 3, 4, 6, 8, 12, 16, 32)] == [4, 4, 4, 16 / 6, 2, 16 / 12, 1, 0.5]


def _reference_compute(n, c, k, r, p, q, bits, lanes=30):
    """Packed pixels: ceil(pixels x R x S x ceil(K/lanes) x ceil(C/lanes) / (16/q)), q = max(bits, 4)."""
    import math
    return math.ceil(n * p * p * r * r * math.ceil(k / lanes) * math.ceil(c / lanes) / (16 / max(bits, 4)))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_pixel_lanes_against_reference(bits):
    m = ZC706()
    c = m.conv_cost(ConvOp(ic=16, oc=16, batch=8, kh=3, kw=3, oh=32, ow=32, a_bits=bits, b_bits=4))
    assert c.detail["compute"] == _reference_compute(8, 16, 16, 3, 32, 32, max(bits, 4))


def test_narrow_layer_gains_only_with_pixel_lanes():
    """16 output channels: packing widens 30 output lanes to 60/120, which 16 channels cannot use ('out', the
    earlier model, config dsp_step); along the pixels 4-bit MACs run at twice the 8-bit rate."""
    op = dict(ic=16, oc=16, batch=128, kh=3, kw=3, oh=32, ow=32)
    for cfg, gain in ((None, 2.0), ("dsp_step", 1.0)):
        m = ZC706(cfg)
        c8 = m.conv_cost(ConvOp(**op, a_bits=8, b_bits=8)).detail["compute"]
        c4 = m.conv_cost(ConvOp(**op, a_bits=4, b_bits=4)).detail["compute"]
        assert c8 / c4 == pytest.approx(gain, rel=1e-6)
