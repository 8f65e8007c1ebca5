"""Character-level text for language models: `--data text:PATH` (a UTF-8 file).

The vocabulary is the sorted set of characters of the training split (the first 90% of the text; the last 10% is
the validation split, nanoGPT's shakespeare_char convention). Training batches are random contiguous windows of the
model's context T: inputs ids[s:s+T], labels ids[s+1:s+T+1], the starts drawn from (seed, step), so the stream's
whole state is its position. Validation reads every non-overlapping window of the validation split in order (a
fixed random subset of them with --eval-batches), and reports the mean cross-entropy in nats per token.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FracgraphError
from ..memory import available_memory

TRAIN_FRACTION = 0.9
VOCAB_FILE = "vocab.json"


@dataclass
class TextDataset:
    name: str
    chars: str                 # the vocabulary: token i is chars[i]
    train: np.ndarray          # int64 ids
    val: np.ndarray
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.chars)

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train):,} train / {len(self.val):,} validation characters, "
                f"vocabulary {len(self.chars)}")

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        missing = sorted({c for c in text if c not in index})
        if missing:
            raise FracgraphError(f"characters {''.join(missing)!r} are not in the vocabulary of {self.name}")
        return np.array([index[c] for c in text], np.int64)

    def check_model(self, context: int, vocab: int) -> None:
        """The model's context must fit in each split, and its vocabulary hold every character."""
        if vocab < self.num_classes:
            raise FracgraphError(f"the model's vocabulary has {vocab} tokens but {self.name} has {self.num_classes} "
                                 f"characters: export it with `fracgraph zoo gpt --vocab {self.num_classes}`")
        n = len(self.train) + len(self.val)
        if n < 2 * (context + 1):
            raise FracgraphError(f"{self.name} has {n} characters, shorter than two contexts of the model "
                                 f"({context} + 1 characters each); use a longer text or a model with a shorter "
                                 f"context")
        for split, ids in (("training", self.train), ("validation", self.val)):
            if len(ids) < context + 1:
                raise FracgraphError(f"the {split} split of {self.name} ({len(ids)} characters, "
                                     f"{'first 90%' if split == 'training' else 'last 10%'} of the text) is shorter "
                                     f"than one window of the model's context + 1 ({context + 1}); use a longer text "
                                     f"or a model with a shorter context")

    def write_vocab(self, directory: str | os.PathLike) -> Path:
        from .runio import atomic_write_bytes

        return atomic_write_bytes(Path(directory) / VOCAB_FILE,
                                  json.dumps({"chars": self.chars, "source": self.source}).encode(), what="vocabulary")


def read_vocab(directory: str | os.PathLike) -> str:
    p = Path(directory) / VOCAB_FILE
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        chars = d["chars"]
        assert isinstance(chars, str) and len(chars) == len(set(chars)) and chars
    except FileNotFoundError:
        raise FracgraphError(f"{directory}: no {VOCAB_FILE}; is it a run of a language model trained with "
                             f"--data text:PATH?")
    except Exception:
        raise FracgraphError(f"{p}: not a fracgraph vocabulary file; the run directory is damaged")
    return chars


def load_text(path: str | os.PathLike) -> TextDataset:
    p = Path(path)
    if not p.is_file():
        raise FracgraphError(f"--data text:{path}: not a file; give a UTF-8 text file")
    size = p.stat().st_size
    if 12 * size > available_memory():   # the text, its ids (8 bytes per character) and slack
        raise FracgraphError(f"--data text:{path}: {size:,} bytes do not fit in memory as token ids; use a shorter text")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FracgraphError(f"--data text:{path}: not UTF-8 (byte {e.start}: {e.reason}); convert the file to UTF-8")
    if len(text) < 2:
        raise FracgraphError(f"--data text:{path}: the file holds {len(text)} characters; a language model needs text")
    n_train = int(len(text) * TRAIN_FRACTION)
    train_text, val_text = text[:n_train], text[n_train:]
    chars = "".join(sorted(set(train_text)))
    unseen = sorted(set(val_text) - set(chars))
    if unseen:
        shown = "".join(unseen[:20])
        raise FracgraphError(f"--data text:{path}: the validation split (last 10%) has {len(unseen)} characters that "
                             f"the training split never shows ({shown!r}); the character vocabulary comes from the "
                             f"training split, so use a text whose first 90% holds every character")
    lut = {c: i for i, c in enumerate(chars)}
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    table = np.full(max(map(ord, chars)) + 1, -1, np.int64)
    for c, i in lut.items():
        table[ord(c)] = i
    ids = table[codes]
    return TextDataset(p.name, chars, ids[:n_train].copy(), ids[n_train:].copy(), source=str(p))


class TextStream:
    """Endless training batches of random contiguous windows; batch i depends only on (seed, i)."""

    def __init__(self, dataset: TextDataset, batch_size: int, seed: int, context: int, dtype: str = "int64"):
        if batch_size < 1:
            raise FracgraphError(f"batch size must be at least 1, got {batch_size}")
        if not (isinstance(seed, (int, np.integer)) and seed >= 0):
            raise FracgraphError(f"seed must be a non-negative integer, got {seed!r}")
        self.ds, self.batch_size, self.seed, self.context = dataset, int(batch_size), int(seed), int(context)
        self.dtype = np.dtype(dtype)
        self.index = 0
        self._offsets = np.arange(self.context + 1)

    def make_batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng([self.seed, 0, index])
        starts = r.integers(0, len(self.ds.train) - self.context, self.batch_size)
        w = self.ds.train[starts[:, None] + self._offsets]
        return w[:, :-1].astype(self.dtype), w[:, 1:].astype(np.int64)

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.make_batch(self.index)
        self.index += 1
        return batch

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"kind": "TextStream", "version": 1, "seed": self.seed, "index": self.index,
                "batch_size": self.batch_size, "context": self.context, "n": len(self.ds.train)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("kind", "seed", "batch_size", "context", "n"):
            if state.get(k) != mine[k]:
                raise FracgraphError(f"cannot resume the data stream: checkpoint has {k}={state.get(k)!r} but this "
                                     f"run has {mine[k]!r}; resume with the same --data, --batch and --seed")
        self.index = int(state["index"])


def validation_windows(dataset: TextDataset, context: int, batch: int, limit: int | None = None):
    """Start offsets of the validation windows: every non-overlapping one, or a fixed random subset of
    limit*batch of them."""
    starts = np.arange(0, len(dataset.val) - context, context)
    if limit is not None and limit * batch < len(starts):
        starts = np.sort(np.random.default_rng(0).permutation(starts)[: limit * batch])
    return starts


def evaluate_lm(session, dataset: TextDataset, bits: np.ndarray, batch: int, context: int, dtype: str = "int64",
                limit: int | None = None) -> float:
    """Mean validation cross-entropy in nats per token (each window's mean weighted by its tokens)."""
    starts = validation_windows(dataset, context, batch, limit)
    offsets = np.arange(context + 1)
    total = 0.0
    for i in range(0, len(starts), batch):
        w = dataset.val[starts[i:i + batch, None] + offsets]
        loss, _ = session.evaluate(w[:, :-1].astype(dtype), w[:, 1:].astype(np.int64), bits)
        total += loss * len(w)
    return total / max(len(starts), 1)


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(min(loss, 700.0))
