"""Hardware cost models behind one protocol (`base.HwModel`): op -> cycles, latency, energy by level.

One file per model, one parameter JSON per model with each value's source. `get_model(name)` is the registry.
"""

from __future__ import annotations

from ..errors import FracgraphError
from .base import LEVELS, ConvOp, Cost, HwModel, MemOp

MODEL_NAMES = ("bitfusion", "eyeriss", "fpga")


def get_model(name: str, config: str | None = None, **overrides) -> HwModel:
    """A hardware model by name (bitfusion | eyeriss | fpga), optionally a named config of its parameter file."""
    if name == "bitfusion":
        from .bitfusion import BitFusion
        return BitFusion(config, **overrides)
    if name == "eyeriss":
        from .eyeriss import Eyeriss
        return Eyeriss(config, **overrides)
    if name == "fpga":
        from .fpga import ZC706
        return ZC706(config, **overrides)
    raise FracgraphError(f"unknown hardware model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


__all__ = ["LEVELS", "ConvOp", "Cost", "HwModel", "MemOp", "MODEL_NAMES", "get_model"]
