"""ZC706 FPGA with one recursive mixed-precision engine (EDD-style, spec hwmodels.md §3; FracTrain rebuttal).

One compute engine of Tn input x Tm output lanes (DSP slices) is reused layer after layer and precision after
precision (the rebuttal: "the same computation unit is reused by different precisions"; a dynamic schedule
switches it per mini-batch, modelled at no cost), so a step's latency is the sum of its ops. Each DSP slice
packs several narrow MACs that share one operand; two parameters say how (fpga.json):

- `packing`: "linear" (default): a q-bit MAC takes q/16 of a DSP, i.e. 16/q MACs per DSP with q = max(operand
  bits), not below `min_pack_bits` (Auto-NBA's analytical model `dsp = pf_m * pf_n * (q/16)`, the FracTrain
  authors' group's FPGA model); "step": 4 / 2 / 1 MACs per DSP at <= 4 / 8 / 16 bits (WP486's two INT8 MACs per
  DSP, doubled once more at 4 bits). FP32 takes 2 DSPs per MAC either way.
- `pack_lanes`: which loop the packed MACs of one DSP run along. "pixels" (default): the MACs share the weight
  (or, in the error and weight-gradient GEMMs, the stationary operand) and take neighbouring output pixels / batch
  rows, the loop every training GEMM has thousands of; "out": they share the input and widen the output-channel
  lanes, which a CIFAR ResNet (16-64 output channels) cannot fill beyond the 8-bit lanes: that is why the "out"
  model saves ~3% (README "Hardware estimates").

Layer cycles = max(tiled compute, DRAM traffic / interface width) + the first tile's fill. Energy = power x time:
dynamic power while the DSPs are busy, static power for the whole latency, plus an optional DRAM pJ/bit (0 when
board power already includes DDR).
"""

from __future__ import annotations

import math

from .base import LEVELS, ConvOp, Cost, MemOp, load_params, mem_cost_generic

PARAMS_FILE = "fpga.json"


def _cdiv(a, b):
    return -(-a // b)


def macs_per_dsp(bits: int, packing: str = "step", min_bits: int = 4) -> float:
    """MACs one DSP slice computes per cycle at operand width q = max(a, b) bits (FP32: half a MAC)."""
    q = int(bits)
    if q > 16:
        return 16.0 / q
    if packing == "linear":
        return 16.0 / max(q, int(min_bits))
    if packing != "step":
        raise ValueError(f"fpga.json: packing must be linear or step, not {packing!r}")
    if q <= 4:
        return 4.0
    if q <= 8:
        return 2.0
    return 1.0


class ZC706:
    """Recursive-engine FPGA model; parameters in fpga.json."""

    name = "fpga"

    def __init__(self, config: str | None = None, **overrides):
        p = load_params(PARAMS_FILE, config, overrides)
        self.p = p
        self.freq_hz = float(p["frequency_hz"])
        self.static_power_w = float(p["static_power_w"])
        if p["lanes_in"] * p["lanes_out"] > p["dsps"]:
            raise ValueError("fpga.json: lanes_in x lanes_out exceeds the DSP count")
        if p["pack_lanes"] not in ("pixels", "out"):
            raise ValueError(f"fpga.json: pack_lanes must be pixels or out, not {p['pack_lanes']!r}")
        macs_per_dsp(8, p["packing"])

    def conv_cost(self, op: ConvOp) -> Cost:
        p = self.p
        q = max(int(op.a_bits), int(op.b_bits))
        pack = macs_per_dsp(q, p["packing"], p["min_pack_bits"])
        tn = p["lanes_in"]
        pixels = op.batch * op.oh * op.ow
        if p["pack_lanes"] == "out" or pack < 1:     # FP32 (pack 1/2): each MAC takes 2 DSPs -> half the lanes
            tm = max(1, int(p["lanes_out"] * pack))
            compute = pixels * op.kh * op.kw * _cdiv(op.oc, tm) * _cdiv(op.ic, tn)
        else:                                        # `pack` pixels per DSP per cycle (fractional: a DSP's lanes
            tm = p["lanes_out"]                      # are re-split every few cycles, so the mean rate is kept)
            compute = math.ceil(pixels * op.kh * op.kw * _cdiv(op.oc, tm) * _cdiv(op.ic, tn) / pack)
        in_h = (op.oh - 1) * op.stride + op.kh
        in_w = (op.ow - 1) * op.stride + op.kw
        wbits = op.oc * op.ic * op.kh * op.kw * int(op.b_bits)
        abits = op.batch * op.ic * in_h * in_w * int(op.a_bits)
        obits = op.batch * op.oc * op.oh * op.ow * p["out_bits"]
        dram_bits = wbits + abits + obits
        bw = p["dram_bits_per_cycle"]
        mem = _cdiv(dram_bits, bw)
        fill = _cdiv(min(op.ic, tn) * min(op.oc, tm) * op.kh * op.kw * int(op.b_bits)
                     + min(op.ic, tn) * in_w * op.kh * int(op.a_bits), bw)
        cycles = max(compute, mem) + fill
        lat = cycles / self.freq_hz
        e = {k: 0.0 for k in LEVELS}
        e["compute"] = p["dynamic_power_w"] * (compute / self.freq_hz) * 1e12
        e["dram"] = dram_bits * p["dram_pj_per_bit"]
        e["static"] = self.static_power_w * lat * 1e12
        c = Cost(cycles=cycles, stall_cycles=cycles - compute, latency_s=lat, macs=op.macs / op.repeat,
                 energy_pj=e, detail={"compute": compute, "dram_bits": dram_bits, "lanes_out": tm})
        return c.scaled(op.repeat) if op.repeat != 1 else c

    def mem_cost(self, op: MemOp) -> Cost:
        p = self.p
        return mem_cost_generic(op, freq_hz=self.freq_hz, dram_bits_per_cycle=p["dram_bits_per_cycle"],
                                dram_pj_per_bit=p["dram_pj_per_bit"], static_power_w=self.static_power_w)
