"""Crash safety of `fracgraph train`: SIGKILL and resume (a small bench/kill_resume.py), a real file-size limit
hit while writing a checkpoint, a kill before the first checkpoint and after the last one."""

from __future__ import annotations

import importlib.util
import json
import resource
import signal
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from fracgraph.cli import app
from fracgraph.train import runio
from fracgraph.train.loop import TrainConfig, train

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kill_resume.py"


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from fracgraph.build import build_artifacts
    from fracgraph.zoo import export

    d = tmp_path_factory.mktemp("cs")
    build_artifacts(export("digitnet", d / "dn.onnx"), d / "art")
    return d / "art"


def _cfg(run, art, **kw):
    return TrainConfig(**{**dict(run_dir=str(run), artifacts=str(art), schedule="pfq", iters=12, epoch_iters=6,
                                 checkpoint_every=3, batch=32, lr=0.05, eps=0.5, alpha=0.5), **kw})


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a / "last.onnx"), _weights(b / "last.onnx")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)

    def recs(run):
        return [{k: v for k, v in json.loads(x).items() if k != "wall"} for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert recs(a) == recs(b)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    for s in (sa, sb):
        for k in ("wall_s", "run_dir", "config"):
            s.pop(k)
    assert sa == sb


def test_sigkill_twice_then_resume_equals_uninterrupted(art, tmp_path):
    spec = importlib.util.spec_from_file_location("kill_resume", BENCH)
    kr = importlib.util.module_from_spec(spec)
    sys.modules["kill_resume"] = kr          # dataclasses look their module up while the file executes
    spec.loader.exec_module(kr)
    r = kr.kill_campaign(tmp_path, kills=2, iters=12, ckpt_every=3, batch=32, epoch_iters=6, seed=0, log=lambda s: None,
                         target=art)
    assert r["failed_resumes"] == 0 and r["kills"] >= 1 and r["kills"] + r["finished_before_kill"] == 2
    assert r["identical"], r["diffs"]


class Crash(Exception):
    pass


def test_kill_before_the_first_checkpoint_restarts_and_after_the_last_keeps_the_summary(art, tmp_path,
                                                                                      monkeypatch):
    full = train(_cfg(tmp_path / "full", art))
    # dies while writing the first checkpoint: metrics.jsonl exists, no checkpoint does
    real_save = runio.CheckpointStore.save

    def dies(self, step, state, files=None):
        raise Crash()

    monkeypatch.setattr(runio.CheckpointStore, "save", dies)
    with pytest.raises(Crash):
        train(_cfg(tmp_path / "a", art))
    assert (tmp_path / "a" / "metrics.jsonl").exists() and runio.CheckpointStore(tmp_path / "a").latest() is None
    monkeypatch.setattr(runio.CheckpointStore, "save", real_save)
    train(_cfg(tmp_path / "a", art), resume=True)
    _same_run(tmp_path / "full", tmp_path / "a")
    # dies after the final checkpoint, before last.onnx and the summary: the resume reports the same accuracy
    monkeypatch.setattr(runio, "write_summary", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        train(_cfg(tmp_path / "b", art))
    monkeypatch.undo()
    resumed = train(_cfg(tmp_path / "b", art), resume=True)
    assert resumed["final_test_acc"] == full["final_test_acc"] is not None
    _same_run(tmp_path / "full", tmp_path / "b")


def test_file_size_limit_during_a_checkpoint_gives_one_line_and_keeps_the_previous(art, tmp_path, monkeypatch):
    """A real EFBIG from the kernel (RLIMIT_FSIZE, SIGXFSZ ignored) while onnxruntime writes checkpoint 6."""
    ref = train(_cfg(tmp_path / "ref", art))
    run = tmp_path / "run"
    real_save = runio.CheckpointStore.save
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def save_with_limit(self, step, state, files=None):
        if step >= 6:   # files up to 20 kB may still be written: metrics lines, state.json; not the 80 kB checkpoint
            resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
        try:
            return real_save(self, step, state, files)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(runio.CheckpointStore, "save", save_with_limit)
    try:
        r = CliRunner().invoke(app, ["train", str(art), "-o", str(run), "--schedule", "pfq", "--iters", "12",
                                     "--epoch-iters", "6", "--checkpoint-every", "3", "--batch", "32", "--lr", "0.05",
                                     "--eps", "0.5", "--alpha", "0.5", "--json"])
    finally:
        signal.signal(signal.SIGXFSZ, old_handler)
    monkeypatch.undo()
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert "file too large" in lines[0] and "ort_checkpoint" in lines[0] and "previous checkpoint is unchanged" in lines[0]
    store = runio.CheckpointStore(run)
    step, _, d = store.latest()
    assert step == 3 and sorted(p.name for p in d.iterdir()) == ["momentum.npz", "ort_checkpoint", "state.json"]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]          # no half-written directory
    resumed = train(_cfg(run, art), resume=True)
    assert resumed["steps"] == 12 and resumed["final_test_acc"] == ref["final_test_acc"]
    _same_run(tmp_path / "ref", run)
