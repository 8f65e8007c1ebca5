"""The precision trace of a run: which bits each block used at each step, stored compactly.

Precision changes rarely (PFQ stages) or comes from a small option set (DFQ), so the trace is run-length
encoded: segment i covers steps [starts[i], starts[i+1]) with bits[i] ([n_blocks, 3]: act, weight, grad) and
active[i] ([n_blocks]: the share of the batch's samples that ran the block; below 1 only when a DFQ gate chose
`skip`, whose samples compute only the block's shortcut; bits are then those of the samples that ran it).
`train` writes it; `estimate` integrates cost over it. A trace without `active` (older runs) ran every block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FracgraphError

FILENAME = "trace.npz"


@dataclass
class Trace:
    starts: np.ndarray      # int64 [S], strictly increasing, starts[0] == 0
    bits: np.ndarray        # float32 [S, n_blocks, 3]
    total_steps: int
    active: np.ndarray | None = None    # float32 [S, n_blocks]; None = every block ran for every sample

    def __post_init__(self):
        if self.active is None:
            self.active = np.ones(self.bits.shape[:2], np.float32)

    @property
    def skips(self) -> bool:
        return bool((self.active < 1).any())

    def segments(self):
        """Yield (n_steps, bits[n_blocks, 3]) for each constant-precision segment."""
        ends = np.append(self.starts[1:], self.total_steps)
        for s, e, b in zip(self.starts, ends, self.bits):
            if e > s:
                yield int(e - s), b

    def write(self, directory: str | os.PathLike) -> Path:
        from .train.runio import atomic_write_bytes

        return atomic_write_bytes(Path(directory) / FILENAME, lambda f: np.savez(
            f, starts=self.starts, bits=self.bits, total_steps=np.int64(self.total_steps), active=self.active),
            what="trace")

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Trace":
        p = Path(path)
        if p.is_dir():
            p = p / FILENAME
        try:
            with np.load(p, allow_pickle=False) as z:
                active = z["active"].astype(np.float32) if "active" in z.files else None
                bits = z["bits"].astype(np.float32)
                if bits.ndim != 3 or (active is not None and active.shape != bits.shape[:2]):
                    raise ValueError("inconsistent shapes")
                t = cls(z["starts"].astype(np.int64), bits, int(z["total_steps"]), active)
        except (OSError, KeyError, ValueError) as e:
            raise FracgraphError(f"{p}: not a fracgraph trace ({e}); pass a run directory written by `fracgraph train`")
        if t.bits.ndim != 3 or t.bits.shape[2] != 3 or len(t.starts) != len(t.bits):
            raise FracgraphError(f"{p}: trace arrays have inconsistent shapes")
        if not ((t.active >= 0) & (t.active <= 1)).all():
            raise FracgraphError(f"{p}: trace `active` shares must lie in [0, 1]")
        return t


class TraceRecorder:
    """Accumulates per-step bits, storing only the steps where they change."""

    def __init__(self, starts=None, bits=None, total_steps: int = 0, active=None):
        self._starts = list(starts) if starts is not None else []
        self._bits = [np.asarray(b, np.float32) for b in bits] if bits is not None else []
        self._active = [np.asarray(a, np.float32) for a in active] if active is not None else \
            [np.ones(len(b), np.float32) for b in self._bits]
        self.total_steps = total_steps

    def record(self, step: int, bits: np.ndarray, active: np.ndarray | None = None) -> None:
        active = np.ones(len(bits), np.float32) if active is None else np.asarray(active, np.float32)
        if not self._bits or not np.array_equal(self._bits[-1], bits) or not np.array_equal(self._active[-1], active):
            self._starts.append(step)
            self._bits.append(np.array(bits, np.float32, copy=True))
            self._active.append(np.array(active, np.float32, copy=True))
        self.total_steps = step + 1

    def trace(self) -> Trace:
        n = self._bits[0].shape[0] if self._bits else 0
        bits = np.stack(self._bits) if self._bits else np.zeros((0, n, 3), np.float32)
        active = np.stack(self._active) if self._active else np.zeros((0, n), np.float32)
        return Trace(np.asarray(self._starts, np.int64), bits, self.total_steps, active)
