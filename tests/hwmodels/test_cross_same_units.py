"""The rebuttal's cross-hardware comparison (FracTrain on Bit-Fusion vs FW8/BW8 on Eyeriss) 'with the same unit
energy and memory size as in Bit-Fusion': Eyeriss config bitfusion_units takes them from Bit-Fusion's parameter file."""

import pytest

from fracgraph.hwmodels import get_model
from fracgraph.hwmodels.base import ConvOp, load_params


def test_same_memory_size_and_unit_energies():
    bf = load_params("bitfusion.json")
    ey = load_params("eyeriss.json", "bitfusion_units")
    word = ey["word_bits"]
    assert ey["gbuf_words"] * word / 8 == bf["wbuf_bytes"] + bf["ibuf_bytes"] + bf["obuf_bytes"]
    assert ey["dram_cost"] * ey["unit_pj"] * ey["dram_scale"] / word == bf["dram_pj_per_bit"]
    assert ey["gbuf_cost"] * ey["unit_pj"] / word == pytest.approx(bf["ibuf_rd_pj_per_bit"], rel=1e-3)
    assert ey["regf_cost"] * ey["unit_pj"] / word == pytest.approx(bf["obuf_rd_pj_per_bit"], rel=1e-3)
    assert ey["frequency_hz"] == bf["frequency_hz"]
    # the default config harmonizes DRAM only (15 pJ/bit on both)
    d = load_params("eyeriss.json")
    assert d["dram_cost"] * d["unit_pj"] * d["dram_scale"] / d["word_bits"] == bf["dram_pj_per_bit"]


def test_same_units_config_costs_less_per_access_and_same_cycles():
    """Only energies and the buffer size change: cycles of a layer that fits either buffer are the same."""
    op = ConvOp(ic=64, oc=64, batch=16, kh=3, kw=3, oh=32, ow=32, a_bits=8, b_bits=8)
    a, b = get_model("eyeriss").conv_cost(op), get_model("eyeriss", "bitfusion_units").conv_cost(op)
    assert b.energy_total_pj < a.energy_total_pj
    assert b.cycles == pytest.approx(a.cycles, rel=0.05)
