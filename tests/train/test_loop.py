"""The training loop on real (embedded) data: resume equality, BN/eval agreement, PFQ logging, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from fracgraph.cli import app
from fracgraph.errors import FracgraphError
from fracgraph.train.data import eval_batches, load_dataset
from fracgraph.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def digitnet(tmp_path_factory):
    from fracgraph.build import build_artifacts
    from fracgraph.zoo import export

    d = tmp_path_factory.mktemp("dn")
    build_artifacts(export("digitnet", d / "dn.onnx"), d / "art")
    return d


def _cfg(run, art, **kw):
    base = dict(run_dir=str(run), artifacts=str(art), schedule="pfq", fw_schedule=[3, 4, 6, 8],
                bw_schedule=[6, 6, 8, 8], eps=0.5, alpha=0.5, iters=48, epoch_iters=6, batch=32, lr=0.05)
    return TrainConfig(**{**base, **kw})


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _records(run):
    return [{k: v for k, v in json.loads(line).items() if k != "wall"} for line in (run / "metrics.jsonl").read_text().splitlines()]


class Crash(Exception):
    pass


def test_resume_after_crash_equals_uninterrupted_run(digitnet, tmp_path):
    art = digitnet / "art"
    full = train(_cfg(tmp_path / "a", art))
    assert len(full["transitions"]) >= 1                     # PFQ switched and logged it

    def crash_at(step):
        def cb(rec):
            if rec["step"] == step:
                raise Crash()
        return cb

    with pytest.raises(Crash):
        train(_cfg(tmp_path / "b", art), progress=crash_at(17))   # between checkpoints 12 and 18
    resumed = train(_cfg(tmp_path / "b", art), resume=True)
    assert resumed["steps"] == full["steps"] == 48
    wa, wb = _weights(tmp_path / "a" / "last.onnx"), _weights(tmp_path / "b" / "last.onnx")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    assert _records(tmp_path / "a") == _records(tmp_path / "b")
    assert resumed["transitions"] == full["transitions"]
    from fracgraph.trace import Trace

    ta, tb = Trace.read(tmp_path / "a"), Trace.read(tmp_path / "b")
    assert np.array_equal(ta.starts, tb.starts) and np.array_equal(ta.bits, tb.bits) and ta.total_steps == 48


def test_reported_accuracy_equals_exported_inference_model(digitnet, tmp_path):
    summary = train(_cfg(tmp_path / "r", digitnet / "art", schedule="static", fw=4, bw=8, iters=30, epoch_iters=10))
    ds = load_dataset(None)
    sess = ort.InferenceSession(str(tmp_path / "r" / "last.onnx"), providers=["CPUExecutionProvider"])
    n_blocks = len(json.loads((digitnet / "art" / "manifest.json").read_text())["blocks"])
    bits = np.tile(np.array([4, 4, 8], np.float32), (n_blocks, 1))
    correct = total = 0
    for x, y in eval_batches(ds, 64):
        logits = sess.run(None, {"input": x, "fracgraph_bits": bits})[0]
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    assert correct / total == summary["final_test_acc"]
    assert summary["final_test_acc"] > 0.3                  # it learned something in 30 steps
    # cost accounting: static FW4/BW8, weights at 4 -> each quantized GEMM costs (4*4 + 8*4 + 4*8)/1024 of 3 FP32
    # GEMMs; the FP32 classifier costs 3 full ones
    ops = json.loads((digitnet / "art" / "manifest.json").read_text())["ops"]
    q = sum(d["macs"] for d in ops if d["quantized"])
    f = sum(d["macs"] for d in ops if not d["quantized"])
    recs = _records(tmp_path / "r")
    assert recs[0]["cp"] == pytest.approx(100 * (q * 80 / 1024 + 3 * f) / (3 * (q + f)), rel=1e-9)
    assert recs[0]["eff_gmacs"] == pytest.approx((q * 80 / 1024 + 3 * f) * 32 / 1e9, rel=1e-9)


def test_errors_are_one_line(digitnet, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["train", str(digitnet / "art"), "-o", str(tmp_path / "x"), "--data", "cifar10:/nonexistent"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    from fracgraph.zoo import export

    export("resnet20", tmp_path / "r20.onnx")
    with pytest.raises(FracgraphError, match="shape"):
        train(TrainConfig(run_dir=str(tmp_path / "y"), model=str(tmp_path / "r20.onnx"), iters=2))
    train(_cfg(tmp_path / "z", digitnet / "art", iters=6))
    with pytest.raises(FracgraphError, match="--resume"):
        train(_cfg(tmp_path / "z", digitnet / "art", iters=6))


def test_nan_loss_stops_with_step_named_and_checkpoint_kept(digitnet, tmp_path):
    with pytest.raises(FracgraphError, match=r"at step \d+"):
        train(_cfg(tmp_path / "n", digitnet / "art", schedule="static", lr=1e12, iters=40, epoch_iters=4))
    from fracgraph.train.runio import CheckpointStore

    assert CheckpointStore(tmp_path / "n").latest() is not None


def test_momentum_and_weight_decay_override_the_artifacts(digitnet, tmp_path):
    from fracgraph.train.loop import _open_session

    art = digitnet / "art"
    s = _open_session(art, None, _cfg(tmp_path / "x", art, momentum=0.5, weight_decay=0.0), 0)
    assert (s.optimizer.momentum, s.optimizer.weight_decay) == (0.5, 0.0)
    a = train(_cfg(tmp_path / "a", art, iters=6, momentum=0.0, weight_decay=0.0))
    b = train(_cfg(tmp_path / "b", art, iters=6))
    wa, wb = _weights(tmp_path / "a" / "last.onnx"), _weights(tmp_path / "b" / "last.onnx")
    assert a["config"]["momentum"] == 0.0 and b["config"]["momentum"] is None
    assert any(not np.array_equal(wa[k], wb[k]) for k in wa)


def test_fp32_run_costs_exactly_100_percent_with_short_last_batches(digitnet, tmp_path):
    # digits' training split is not a multiple of 32, so an epoch ends in a short batch inside these 60 steps
    s = train(_cfg(tmp_path / "f", digitnet / "art", schedule="static", fw=0, bw=0, iters=60, epoch_iters=30))
    assert s["mean_cp"] == pytest.approx(100.0, rel=1e-9)
    assert s["fp32_gmacs"] * 1e9 == pytest.approx(s["cum_eff_gmacs"] * 1e9, rel=1e-9)


def test_holdout_evaluates_on_held_out_training_images_only(digitnet, tmp_path):
    from fracgraph.train.data import hold_out

    ds = load_dataset(None)
    h = hold_out(ds, 200)
    # a partition of the training split, the same for every run (not --seed), the test split unused
    assert len(h.y_test) == 200 and len(h.y_train) == len(ds.y_train) - 200
    rows = {x.tobytes(): y for x, y in zip(ds.x_train, ds.y_train)}
    assert all(rows[x.tobytes()] == y for x, y in zip(np.concatenate([h.x_train, h.x_test]),
                                                       np.concatenate([h.y_train, h.y_test])))
    assert len({x.tobytes() for x in h.x_train} & {x.tobytes() for x in h.x_test}) == 0
    assert np.array_equal(hold_out(ds, 200).x_test, h.x_test)
    summary = train(_cfg(tmp_path / "r", digitnet / "art", schedule="static", iters=12, epoch_iters=6, holdout=200, seed=3))
    assert summary["eval_split"] == "holdout:200"
    sess = ort.InferenceSession(str(tmp_path / "r" / "last.onnx"), providers=["CPUExecutionProvider"])
    n_blocks = len(json.loads((digitnet / "art" / "manifest.json").read_text())["blocks"])
    bits = np.tile(np.array([8, 8, 8], np.float32), (n_blocks, 1))   # static FW8/BW8: act, weight, grad
    correct = 0
    for x, y in eval_batches(h, 64):
        correct += int((sess.run(None, {"input": x, "fracgraph_bits": bits})[0].argmax(1) == y).sum())
    assert correct / 200 == summary["final_test_acc"]
    r = CliRunner().invoke(app, ["train", str(digitnet / "art"), "-o", str(tmp_path / "bad"), "--holdout", "100000"])
    assert r.exit_code == 2 and "--holdout 100000" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "bad").exists()
