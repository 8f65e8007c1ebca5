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
