"""The artifact manifest: the contract between `quantize`, `train` and `estimate`.

It says which quant points exist, which block each belongs to, which graph input carries the precisions,
and the GEMM op table with shapes and MACs. Readers trust it; they never re-derive it from the graphs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .analysis.optable import GemmOp
from .errors import FracgraphError

FORMAT = "fracgraph-artifacts"
VERSION = 1
FILENAME = "manifest.json"

# The precision input is one float tensor [n_blocks, 3]; its columns:
PRECISION_COLUMNS = ("act", "weight", "grad")


@dataclass
class QuantPoint:
    """One fake-quantizer in the graph."""

    name: str            # deterministic node-name prefix, e.g. "/layer1/conv1/Conv::fq_act"
    kind: str            # "act" | "weight" | "grad"
    tensor: str          # the tensor it quantizes (for "grad": the forward tensor whose gradient is quantized)
    op: str              # the GEMM node it feeds (or, for "grad", whose output error it quantizes)
    block: int           # index into Manifest.blocks: the row of the precision input it reads
    granularity: str     # "per_tensor" | "per_channel"
    rounding: str        # "nearest" | "stochastic"


@dataclass
class Block:
    name: str
    ops: list[str]       # GEMM node names in this block
    kind: str            # "residual" | "layer"


@dataclass
class LayerDecision:
    """Why a GEMM is or is not quantized (shown by `fracgraph inspect`)."""

    op: str
    quantized: bool
    reason: str
    block: int | None


@dataclass
class Manifest:
    source_model: str
    input_name: str
    input_shape: list            # per-sample shape with the batch as None
    label_name: str
    num_classes: int
    precision_input: str
    default_bits: list[float]    # [act, weight, grad] the artifacts were built with as defaults
    blocks: list[Block]
    ops: list[dict]              # GemmOp.to_dict() plus "block" and "quantized"
    quant_points: list[QuantPoint]
    decisions: list[LayerDecision]
    optimizer: dict
    act_range_momentum: float
    grad_noise: str              # "random" (production) | "input" (noise fed as inputs, for exact tests)
    files: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    dfq: dict | None = None      # DFQ artifacts: options, weight bits, granularity, cost weights (passes/dfq_gate.py)
    format: str = FORMAT
    version: int = VERSION

    # -- derived views -------------------------------------------------------------------------------
    def gemm_ops(self) -> list[GemmOp]:
        return [GemmOp.from_dict(d) for d in self.ops]

    def op_block(self) -> dict[str, int | None]:
        """GEMM node name -> block index (None: kept FP32)."""
        return {d["name"]: (d["block"] if d["quantized"] else None) for d in self.ops}

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    # -- io ------------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def write(self, directory: str | os.PathLike) -> Path:
        from .train.runio import atomic_write_bytes

        return atomic_write_bytes(Path(directory) / FILENAME, self.to_json().encode(), what="manifest")

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Manifest":
        path = Path(directory) / FILENAME
        if not path.is_file():
            raise FracgraphError(f"{directory}: no {FILENAME}; is this an artifact directory written by `fracgraph quantize`?")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FracgraphError(f"{path}: not readable JSON ({e}); re-run `fracgraph quantize`")
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise FracgraphError(f"{path}: format {d.get('format')!r} v{d.get('version')} is not {FORMAT} v{VERSION}; re-run `fracgraph quantize`")
        try:
            d["blocks"] = [Block(**b) for b in d["blocks"]]
            d["quant_points"] = [QuantPoint(**q) for q in d["quant_points"]]
            d["decisions"] = [LayerDecision(**x) for x in d["decisions"]]
            return cls(**d)
        except (TypeError, KeyError) as e:
            raise FracgraphError(f"{path}: malformed manifest ({e}); re-run `fracgraph quantize`")
