"""ZC706 FPGA with one recursive mixed-precision engine (EDD-style, spec hwmodels.md §3).

One compute engine of Tn input x Tm output lanes is reused layer after layer (so a step's latency is the sum of
its ops). Its DSPs pack several narrow MACs: MAC/DSP = 1 at <= 16 bits, 2 at <= 8, 4 at <= 4 (Auto-NBA's q/16
convention; WP486 for 2 x INT8 sharing an operand), 1/2 for FP32, with q = max(operand bits). Packed MACs share
the input operand, so packing widens the output-channel lanes. Layer cycles = max(tiled compute, DRAM traffic /
interface width) + the first tile's fill. Energy = power x time: dynamic power while the DSPs are busy,
static power for the whole latency, plus an optional DRAM pJ/bit (0 when board power already includes DDR).
"""

from __future__ import annotations

from .base import LEVELS, ConvOp, Cost, MemOp, load_params, mem_cost_generic

PARAMS_FILE = "fpga.json"


def _cdiv(a, b):
    return -(-a // b)


def macs_per_dsp(bits: int) -> float:
    q = int(bits)
    if q <= 4:
        return 4.0
    if q <= 8:
        return 2.0
    if q <= 16:
        return 1.0
    return 16.0 / q


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

    def conv_cost(self, op: ConvOp) -> Cost:
        p = self.p
        q = max(int(op.a_bits), int(op.b_bits))
        pack = macs_per_dsp(q)
        tn = p["lanes_in"]
        tm = max(1, int(p["lanes_out"] * pack))      # FP32 (pack 1/2): each MAC takes 2 DSPs -> half the lanes
        compute = op.batch * op.oh * op.ow * op.kh * op.kw * _cdiv(op.oc, tm) * _cdiv(op.ic, tn)
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
