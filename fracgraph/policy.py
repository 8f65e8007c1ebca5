"""The layer policy: which GEMMs are quantized, each decision with its reason.

Defaults follow the authors' PFQ ResNet (spec §1.3): every conv quantized, the first one included; the classifier
(last GEMM) kept FP32. A policy file (JSON) or flags override: {"first": "fp32"|"quantize", "last": ...,
"fp32": [patterns], "quantize": [patterns], "embeddings": "fp32"|"quantize"}; patterns are fnmatch globs on node
names.

Embedding tables (a Gather of a float initializer by token ids; `decide_tables`): FP32 by default, since a lookup
has no MACs to save and FracTrain quantizes GEMM operands only. "embeddings": "quantize" FW-quantizes each table
per row (one min/max range per token's vector, nearest rounding, straight-through gradient to the table) at the
weight bits of the block of the first quantized GEMM that reads the lookup. Per row rather than per tensor: a row
is what the lookup returns, the analogue of a weight's output channel (the spec's weight granularity), and rows of
rare tokens stay near their small initialization while frequent ones grow, so one range for the table would leave
the rare rows a few levels; row-wise is also how embedding tables are stored for inference (FBGEMM's and PyTorch's
8-bit row-wise embeddings).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from .analysis.optable import GemmOp
from .errors import FracgraphError

_CHOICES = ("fp32", "quantize")


@dataclass
class LayerPolicy:
    first: str = "quantize"
    last: str = "fp32"
    fp32: list[str] = field(default_factory=list)
    quantize: list[str] = field(default_factory=list)
    embeddings: str = "fp32"       # embedding tables: fp32 | quantize (per row; see the module docstring)

    def __post_init__(self):
        for key in ("first", "last", "embeddings"):
            if getattr(self, key) not in _CHOICES:
                raise FracgraphError(f"policy: {key!r} must be one of {', '.join(_CHOICES)}, got {getattr(self, key)!r}")

    @classmethod
    def from_file(cls, path: str | Path) -> "LayerPolicy":
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FracgraphError(f"policy file {path} does not exist")
        except (OSError, ValueError) as e:
            raise FracgraphError(f"policy file {path}: not valid JSON ({e})")
        if not isinstance(d, dict) or set(d) - {"first", "last", "fp32", "quantize", "embeddings"}:
            raise FracgraphError(f"policy file {path}: expected an object with keys first, last, fp32, quantize, "
                                 f"embeddings")
        for key in ("fp32", "quantize"):
            if not isinstance(d.get(key, []), list) or not all(isinstance(p, str) for p in d.get(key, [])):
                raise FracgraphError(f"policy file {path}: {key!r} must be a list of node-name patterns")
        return cls(**d)

    def decide(self, ops: list[GemmOp]) -> list[tuple[GemmOp, bool, str]]:
        """(op, quantized, reason) for every GEMM, in graph order."""
        out = []
        for i, op in enumerate(ops):
            if any(fnmatch.fnmatchcase(op.name, p) for p in self.fp32):
                out.append((op, False, "kept FP32: named in the policy's fp32 list"))
            elif any(fnmatch.fnmatchcase(op.name, p) for p in self.quantize):
                out.append((op, True, "quantized: named in the policy's quantize list"))
            elif i == 0 and self.first == "fp32":
                out.append((op, False, "kept FP32: first-layer policy"))
            elif i == len(ops) - 1 and len(ops) > 1 and self.last == "fp32":
                out.append((op, False, "kept FP32: last-layer (classifier) policy"))
            else:
                out.append((op, True, "quantized: " + ("first layer" if i == 0 else "last layer" if i == len(ops) - 1 else "default")))
        return out

    def decide_tables(self, tables: list[dict]) -> list[dict]:
        """Each embedding table (`node`, `table`, `block`: the block of the first quantized GEMM reading the lookup,
        None when none does) with `quantized` and its `reason`."""
        out = []
        for t in tables:
            if self.embeddings == "fp32":
                q, why = False, ("kept FP32: embedding table (a Gather, not a GEMM: a lookup has no MACs to save, and "
                                 "FracTrain quantizes GEMM operands only; policy \"embeddings\": \"quantize\" "
                                 "quantizes it per row)")
            elif t.get("block") is None:
                q, why = False, "kept FP32: no quantized GEMM reads this lookup, so no block's bits apply to it"
            else:
                q, why = True, (f"quantized per row at the weight bits of block {t['block']} (the first quantized "
                                f"GEMM reading the lookup): policy \"embeddings\": \"quantize\"")
            out.append(dict(t, quantized=q, reason=why))
        return out
