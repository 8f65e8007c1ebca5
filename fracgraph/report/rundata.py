"""Read a finished run directory (metrics.jsonl, trace.npz, summary.json) into one object the report draws from.

A report is usually made long after the run, maybe on another machine, so everything that can be missing or
damaged is checked here once and named in one line; the figures never see a half-read run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FracgraphError
from ..trace import FILENAME as TRACE_FILE
from ..trace import Trace

SKIP_BITS = -1.0      # the bits a report shows for a block its DFQ gate skipped ("skip")
from ..train.runio import METRICS_FILE, SUMMARY_FILE, read_json

_NOT_A_RUN = "is it a run directory written by `fracgraph train`?"


@dataclass
class ChoiceCounts:
    """How often each precision choice (act, weight, grad bits; 32 = FP32) was used, per block."""

    counts: dict[tuple, np.ndarray]     # choice -> count per block
    blocks: list[str]
    unit: str                           # what a count is: "steps" or "samples"
    source: str                         # where the counts come from, for the page


@dataclass
class RunData:
    name: str                 # label in plots and tables (unique within a report)
    path: Path
    summary: dict
    records: list[dict]       # metrics.jsonl, one per step
    trace: Trace

    @property
    def config(self) -> dict:
        return self.summary.get("config") or {}

    @property
    def is_lm(self) -> bool:
        """A language model's run: evaluations are validation losses (nats/token), not accuracies."""
        return self.summary.get("task") == "language_model"

    @property
    def evals(self) -> list[dict]:
        """The records that carry a test evaluation (a language model's: a validation loss), in step order."""
        key = "val_loss" if self.is_lm else "test_acc"
        return [r for r in self.records if r.get(key) is not None]

    @property
    def transitions(self) -> list[dict]:
        return list(self.summary.get("transitions") or [])

    def bits_at(self, steps: np.ndarray) -> np.ndarray:
        """Bits [len(steps), n_blocks, 3] in use at each 0-based step, from the run-length-encoded trace."""
        seg = np.searchsorted(self.trace.starts, np.asarray(steps), side="right") - 1
        return self.trace.bits[np.clip(seg, 0, len(self.trace.bits) - 1)]

    def active_at(self, steps: np.ndarray) -> np.ndarray:
        """Share of samples that ran each block [len(steps), n_blocks] (below 1: a DFQ gate chose skip)."""
        seg = np.searchsorted(self.trace.starts, np.asarray(steps), side="right") - 1
        return self.trace.active[np.clip(seg, 0, len(self.trace.active) - 1)]

    def choice_counts(self) -> ChoiceCounts:
        """The DFQ choice histogram of summary.json when the run has one (exact, per sample or batch), else the
        steps each block spent at each bits row of the trace (works for any schedule)."""
        dfq = self.summary.get("dfq") or {}
        hist = dfq.get("choice_histogram")
        try:
            w = float(dfq["weight_bits"])
            counts: dict[tuple, np.ndarray] = {}
            for b, entry in enumerate(hist):
                for label, n in entry["counts"].items():
                    a, g = (SKIP_BITS, SKIP_BITS) if label == "skip" else (float(v) for v in label.split("/"))
                    counts.setdefault((a, w, g), np.zeros(len(hist), np.int64))[b] += int(n)
            blocks = [str(entry.get("block", i)) for i, entry in enumerate(hist)]
            counts = {k: v for k, v in sorted(counts.items()) if v.any()}
            if counts:
                unit = "samples" if dfq.get("granularity") in ("sample", "candidates") else "samples (one choice per batch)"
                return ChoiceCounts(counts, blocks, unit, "the DFQ choice histogram in summary.json")
        except (KeyError, TypeError, ValueError, AttributeError):
            pass                                     # absent or another layout: count the trace instead
        tr = self.trace
        n_blocks = tr.bits.shape[1]
        counts = {}
        for (n, bits), active in zip(tr.segments(), tr.active[np.diff(np.append(tr.starts, tr.total_steps)) > 0]):
            for b in range(n_blocks):
                key = tuple(float(v) if v > 0 else 32.0 for v in bits[b]) if active[b] > 0 else (SKIP_BITS,) * 3
                counts.setdefault(key, np.zeros(n_blocks, np.int64))[b] += n
        return ChoiceCounts(dict(sorted(counts.items())), [f"block {b}" for b in range(n_blocks)], "steps",
                            "the precision trace")

    def artifacts_dir(self) -> Path | None:
        """The artifact directory the run trained, wherever the recorded (possibly relative) path resolves."""
        recorded = self.summary.get("artifacts") or self.config.get("artifacts")
        candidates = []
        if recorded:
            p = Path(recorded)
            candidates += [p] if p.is_absolute() else [Path.cwd() / p, self.path.parent / p, self.path / p]
        candidates.append(self.path / "artifacts")
        return next((c for c in candidates if (c / "manifest.json").is_file()), None)


def _read_metrics(path: Path) -> list[dict]:
    records = []
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        raise FracgraphError(f"{path} does not exist: {_NOT_A_RUN}") from None
    for i, line in enumerate(lines, 1):
        if not line.endswith(b"\n"):
            break                       # a torn last line of a killed run
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FracgraphError(f"{path} line {i} is not JSON: the metrics file is damaged") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise FracgraphError(f"{path} line {i} has no integer 'step': not a fracgraph metrics file")
        records.append(rec)
    if not records:
        raise FracgraphError(f"{path} holds no steps: the run has not trained yet")
    return records


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Load one finished run; any missing or damaged file is a FracgraphError naming it."""
    p = Path(path)
    if not p.is_dir():
        raise FracgraphError(f"{p}: no such run directory")
    summary = read_json(p / SUMMARY_FILE, what="run summary")
    if not isinstance(summary, dict) or "steps" not in summary:
        raise FracgraphError(f"{p / SUMMARY_FILE} is not a run summary (no 'steps'): {_NOT_A_RUN}")
    records = _read_metrics(p / METRICS_FILE)
    if not (p / TRACE_FILE).is_file():
        raise FracgraphError(f"{p / TRACE_FILE} does not exist: {_NOT_A_RUN}")
    trace = Trace.read(p / TRACE_FILE)
    if len(trace.bits) == 0:
        raise FracgraphError(f"{p / TRACE_FILE} is empty: the run recorded no steps")
    return RunData(name or p.resolve().name, p, summary, records, trace)


def load_runs(paths) -> list[RunData]:
    """Load several runs, naming each by its directory (with parents added where two names would clash)."""
    if not paths:
        raise FracgraphError("give at least one run directory")
    resolved = [Path(p).resolve() for p in paths]
    depth = 1
    while depth < 6:
        names = ["/".join(r.parts[-depth:]) for r in resolved]
        if len(set(names)) == len(names):
            break
        depth += 1
    seen: dict[str, int] = {}
    for i, n in enumerate(names):       # the same directory given twice
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n} ({seen[n]})"
    return [load_run(p, n) for p, n in zip(paths, names)]
