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
    grad_noise: str              # "random" (a draw per error quantizer: the fused SRQuantize's or onnxruntime's) | "shared" (one draw per step) | "exposed" (noise as outputs, tests)
    files: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    dfq: dict | None = None      # DFQ artifacts: options, weight bits, granularity, cost weights (passes/dfq_gate.py)
    task: dict | None = None     # task.Task.to_dict(): classification | language_model (None: written before, classification)
    format: str = FORMAT
    version: int = VERSION

    # -- derived views -------------------------------------------------------------------------------
    def gemm_ops(self) -> list[GemmOp]:
        return [GemmOp.from_dict(d) for d in self.ops]

    def op_block(self) -> dict[str, int | None]:
        """GEMM node name -> block index (None: kept FP32)."""
        return {d["name"]: (d["block"] if d["quantized"] else None) for d in self.ops}

    def task_info(self):
        from .task import Task

        return Task.from_dict(self.task, self)

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
        if not isinstance(d, dict):
            raise FracgraphError(f"{path}: not a manifest (a JSON {type(d).__name__}, not an object); re-run `fracgraph quantize`")
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise FracgraphError(f"{path}: format {d.get('format')!r} v{d.get('version')} is not {FORMAT} v{VERSION}; re-run `fracgraph quantize`")
        try:
            _check_schema(d)
            d["blocks"] = [Block(**b) for b in d["blocks"]]
            d["quant_points"] = [QuantPoint(**q) for q in d["quant_points"]]
            d["decisions"] = [LayerDecision(**x) for x in d["decisions"]]
            m = cls(**d)
            m.gemm_ops()
            return m
        except (TypeError, KeyError, ValueError) as e:
            raise FracgraphError(f"{path}: malformed manifest ({str(e)[:200]}); re-run `fracgraph quantize`")


_NUM = (int, float)
_TOP = {"source_model": str, "input_name": str, "input_shape": list, "label_name": str, "num_classes": int,
        "precision_input": str, "default_bits": list, "blocks": list, "ops": list, "quant_points": list,
        "decisions": list, "optimizer": dict, "act_range_momentum": _NUM, "grad_noise": str, "files": dict,
        "extra": dict}
_OP = {"name": str, "op_type": str, "act": str, "weight": str, "output": str, "in_channels": int,
       "out_channels": int, "macs": int, "quantized": bool}


def _check_schema(d: dict) -> None:
    """Types and cross-references a reader relies on (a hand-edited or damaged manifest must not crash one).
    Raises TypeError/ValueError with what is wrong."""
    for key, typ in _TOP.items():
        if key in d and not isinstance(d[key], typ):
            raise TypeError(f"{key} must be {getattr(typ, '__name__', 'a number')}, not {type(d[key]).__name__}")
    if d.get("task") is not None and not isinstance(d["task"], dict):
        raise TypeError(f"task must be an object, not {type(d['task']).__name__}")
    if not d.get("blocks"):
        raise ValueError("no blocks")
    if len(d.get("default_bits", [])) != 3 or not all(isinstance(v, _NUM) for v in d["default_bits"]):
        raise ValueError("default_bits must be 3 numbers [act, weight, grad]")
    n_blocks = len(d["blocks"])
    for b in d["blocks"]:
        if not isinstance(b, dict) or not isinstance(b.get("ops"), list):
            raise TypeError("each block must be an object with a list of ops")
    names = set()
    for op in d.get("ops", []):
        if not isinstance(op, dict):
            raise TypeError("each op must be an object")
        for key, typ in _OP.items():
            if not isinstance(op.get(key), typ):
                raise TypeError(f"op {op.get('name')!r}: {key} must be {typ.__name__}")
        if op["quantized"] and not (isinstance(op.get("block"), int) and 0 <= op["block"] < n_blocks):
            raise ValueError(f"op {op['name']!r}: block {op.get('block')!r} is not one of the {n_blocks} blocks")
        names.add(op["name"])
    for q in d.get("quant_points", []):
        if not isinstance(q, dict) or not (isinstance(q.get("block"), int) and 0 <= q["block"] < n_blocks):
            raise ValueError("a quant point names no valid block")
    for x in d.get("decisions", []):
        # a GEMM kept FP32 because its shapes are not static has a decision but no row in the op table (no MACs)
        if not isinstance(x, dict) or not isinstance(x.get("op"), str) or (x["op"] not in names and x.get("quantized",
                                                                                                            True)):
            raise ValueError(f"decision for {x.get('op') if isinstance(x, dict) else x!r} names no op")
    for role, name in d.get("files", {}).items():
        if name is not None and (not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")):
            raise ValueError(f"files.{role} must be a file name inside the artifact directory, not {name!r}")
