"""Atomic writes under failure, metrics.jsonl resume truncation, checkpoint directories, SGD momentum vs torch."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from fracgraph.errors import FracgraphError
from fracgraph.train import runio as R


def _no_temps(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_replaces_and_keeps_old_on_disk_full(tmp_path, monkeypatch):
    p = tmp_path / "summary.json"
    R.atomic_write_json(p, {"a": 1, "loss": float("nan")})
    assert json.loads(p.read_text()) == {"a": 1, "loss": None}  # strict JSON: NaN -> null
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FracgraphError, match=r"disk full while writing .*summary.json.*previous summary.json is "
                                             r"unchanged"):
        R.atomic_write_json(p, {"a": 2})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads(p.read_text()) == {"a": 1, "loss": None} and _no_temps(tmp_path)

    def writer_dies(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        R.atomic_write_bytes(p, writer_dies)
    assert json.loads(p.read_text())["a"] == 1 and _no_temps(tmp_path)


def test_metrics_writer_resume_truncates_to_uninterrupted(tmp_path):
    recs = [{"step": s, "kind": "train", "loss": 1.0 / s} for s in range(1, 9)]
    recs.insert(4, {"step": 4, "kind": "eval", "acc": 0.5})
    with R.MetricsWriter(tmp_path) as w:
        for r in recs:
            w.write(r)
    uninterrupted = (tmp_path / "metrics.jsonl").read_bytes()
    # crash after step 6, checkpoint at 4, with a torn last line
    (tmp_path / "metrics.jsonl").unlink()
    with R.MetricsWriter(tmp_path) as w:
        for r in recs[:7]:
            w.write(r)
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 7, "kin')
    with R.MetricsWriter(tmp_path, resume_step=4) as w:
        assert [r["step"] for r in R.read_jsonl(w.path)] == [1, 2, 3, 4, 4]
        for r in recs[5:]:
            w.write(r)
        w.sync()
    assert (tmp_path / "metrics.jsonl").read_bytes() == uninterrupted
    with pytest.raises(FracgraphError, match="already has metrics"):
        R.MetricsWriter(tmp_path)


def test_checkpoint_store_atomic_and_pruned(tmp_path):
    store = R.CheckpointStore(tmp_path, keep=2)
    assert store.latest() is None

    def ort_writer(path):
        path.write_bytes(b"ORT")

    for step in (100, 200, 300):
        store.save(step, {"data": {"epoch": step}}, {"model.ckpt": ort_writer, "momentum.npy": b"\x00" * 8})
    step, state, d = store.latest()
    assert step == 300 and state == {"data": {"epoch": 300}} and (d / "model.ckpt").read_bytes() == b"ORT"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000200", "step-00000300"]

    def dies(path):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FracgraphError, match="disk full"):
        store.save(400, {"x": 1}, {"model.ckpt": dies})
    assert store.latest()[0] == 300  # the previous checkpoint is still the one resumed from
    assert not list((tmp_path / "checkpoints").glob(".step-*"))


def test_sgd_momentum_matches_torch():
    """runtime.SGDMomentum (the optimizer `train` uses on ORT's live buffers) against torch.optim.SGD, with a
    save/restore of its momentum half-way through."""
    from types import SimpleNamespace

    from fracgraph.runtime import SGDMomentum

    torch = pytest.importorskip("torch")
    r = np.random.default_rng(0)
    p0 = r.standard_normal(50).astype(np.float32)
    grads = [r.standard_normal(50).astype(np.float32) for _ in range(5)]
    lrs = [0.1, 0.1, 0.05, 0.01, 0.01]
    tp = torch.nn.Parameter(torch.tensor(p0.copy()))
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=1e-4)
    param = SimpleNamespace(data=p0.copy(), grad=None)
    state = SimpleNamespace(parameters={"w": param})
    mine = SGDMomentum(state, ["w"], 0.9, 1e-4)
    for i, (g, lr) in enumerate(zip(grads, lrs)):
        for group in opt.param_groups:
            group["lr"] = lr
        tp.grad = torch.tensor(g)
        opt.step()
        param.grad = g
        mine.set_learning_rate(lr)
        mine.step()
        if i == 2:  # resume half-way through from saved state
            arrays = {k: v.copy() for k, v in mine.state_arrays().items()}
            mine = SGDMomentum(state, ["w"], 0.9, 1e-4)
            mine.load_state_arrays(arrays)
    np.testing.assert_allclose(param.data, tp.detach().numpy(), rtol=1e-6, atol=1e-7)
