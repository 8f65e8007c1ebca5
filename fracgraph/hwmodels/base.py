"""The common protocol of the hardware models: a lowered op goes in, cycles/latency/energy by level come out.

Every model costs the same two kinds of op, so the analyzer never needs to know which model it feeds:
`ConvOp` (a conv/GEMM call after the training lowering of spec hwmodels.md §4) and `MemOp` (a memory-bound op
such as BN, ReLU, pooling, an elementwise op or the optimizer update: bits in and out of DRAM).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Protocol

from ..errors import FracgraphError

LEVELS = ("compute", "buffer", "dram", "static")


@dataclass(frozen=True)
class ConvOp:
    """One conv call `(kernel, out size, stride, IC, OC, batch)` with operand bits; a GEMM is a 1x1 conv.

    `a_bits` is the operand streamed along the batch/pixel dimensions (activation or error), `b_bits` the one
    indexed by (IC, OC) (weight, or the error in the weight-gradient GEMM). 32 stands for FP32. `repeat` counts
    identical independent calls (the groups of a grouped conv, the s^2 sub-convs of a strided error conv).
    `im2col` marks a layer whose input is lowered on the host (Bit-Fusion's first-layer mode).
    """

    ic: int
    oc: int
    batch: int
    kh: int = 1
    kw: int = 1
    oh: int = 1
    ow: int = 1
    stride: int = 1
    a_bits: int = 8
    b_bits: int = 8
    repeat: int = 1
    im2col: bool = False

    @property
    def macs(self) -> int:
        return self.repeat * self.batch * self.oc * self.ic * self.kh * self.kw * self.oh * self.ow


@dataclass(frozen=True)
class MemOp:
    """A memory-bound op: it reads and writes `read_bits`/`write_bits` of DRAM and does no GEMM work."""

    read_bits: int
    write_bits: int
    kind: str = "eltwise"


@dataclass
class Cost:
    """Cost of one op (or a sum of ops). Energy in pJ by level (see LEVELS); `detail` keeps model-specific counts."""

    cycles: float = 0.0
    stall_cycles: float = 0.0
    latency_s: float = 0.0
    macs: float = 0.0
    energy_pj: dict = field(default_factory=lambda: {k: 0.0 for k in LEVELS})
    detail: dict = field(default_factory=dict)

    @property
    def energy_total_pj(self) -> float:
        return float(sum(self.energy_pj.values()))

    def __add__(self, other: "Cost") -> "Cost":
        det = dict(self.detail)
        for k, v in other.detail.items():
            if isinstance(v, (int, float)) and isinstance(det.get(k, 0), (int, float)):
                det[k] = det.get(k, 0) + v
        return Cost(self.cycles + other.cycles, self.stall_cycles + other.stall_cycles,
                    self.latency_s + other.latency_s, self.macs + other.macs,
                    {k: self.energy_pj.get(k, 0.0) + other.energy_pj.get(k, 0.0) for k in LEVELS}, det)

    def scaled(self, n: float) -> "Cost":
        return Cost(self.cycles * n, self.stall_cycles * n, self.latency_s * n, self.macs * n,
                    {k: v * n for k, v in self.energy_pj.items()},
                    {k: (v * n if isinstance(v, (int, float)) else v) for k, v in self.detail.items()})


class HwModel(Protocol):
    """What the analyzer needs of a hardware model."""

    name: str
    freq_hz: float
    static_power_w: float

    def conv_cost(self, op: ConvOp) -> Cost: ...

    def mem_cost(self, op: MemOp) -> Cost: ...


def load_params(filename: str, config: str | None = None, overrides: dict | None = None) -> dict:
    """Values of a model's parameter file (`{"params": {key: {"value", "source"}}, "configs": {...}}`).

    A named config overrides some values (for example the chip configuration a validation case uses);
    `overrides` are the caller's own values on top.
    """
    text = resources.files(__package__).joinpath(filename).read_text()
    d = json.loads(text)
    vals = {k: v["value"] for k, v in d["params"].items()}
    if config:
        configs = d.get("configs", {})
        if config not in configs:
            raise FracgraphError(f"{filename}: unknown config {config!r}; known: {', '.join(sorted(configs))}")
        for k, v in configs[config].items():
            if k.startswith("_"):
                continue
            if k not in vals:
                raise FracgraphError(f"{filename}: config {config!r} sets unknown parameter {k!r}")
            vals[k] = v
    for k, v in (overrides or {}).items():
        if k not in vals:
            raise FracgraphError(f"unknown {filename} parameter {k!r}")
        vals[k] = v
    return vals


def mem_cost_generic(op: MemOp, *, freq_hz: float, dram_bits_per_cycle: float, dram_pj_per_bit: float,
                     static_power_w: float) -> Cost:
    """Memory-bound op: time = bits / DRAM interface width, energy = bits x DRAM pJ/bit (+ static power x time)."""
    bits = op.read_bits + op.write_bits
    cycles = -(-bits // int(dram_bits_per_cycle)) if bits else 0
    lat = cycles / freq_hz
    e = {k: 0.0 for k in LEVELS}
    e["dram"] = bits * dram_pj_per_bit
    e["static"] = static_power_w * lat * 1e12
    return Cost(cycles=cycles, stall_cycles=cycles, latency_s=lat, macs=0, energy_pj=e,
                detail={"dram_bits": bits})
