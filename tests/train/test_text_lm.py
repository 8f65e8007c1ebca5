"""Text data (`--data text:PATH`), the language-model task in the train loop, `fracgraph sample`, and their bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from fracgraph.cli import app
from fracgraph.errors import FracgraphError
from fracgraph.train.text import TextStream, load_text, validation_windows

SIZES = dict(layers=1, heads=2, width=16, context=8, vocab=12)
TEXT = "the cat sat on a mat. " * 60          # 11 distinct characters, a pattern a tiny model learns fast


@pytest.fixture(scope="module")
def gpt_art(tmp_path_factory):
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.zoo import export_gpt

    d = tmp_path_factory.mktemp("lm")
    export_gpt(d / "gpt.onnx", seed=0, **SIZES)
    build_artifacts(d / "gpt.onnx", d / "art", BuildOptions(optimizer="adamw", weight_decay=0.0))
    (d / "text.txt").write_text(TEXT, encoding="utf-8")
    return d


def test_load_text_split_and_vocabulary(tmp_path):
    text = "abcdefghij" * 9 + "jihgfedcbz"      # 'z' only in the last 10%
    p = tmp_path / "t.txt"
    p.write_text(text.replace("z", "a"), encoding="utf-8")
    ds = load_text(p)
    assert ds.chars == "abcdefghij" and len(ds.train) == 90 and len(ds.val) == 10
    assert "".join(ds.chars[i] for i in np.concatenate([ds.train, ds.val])) == text.replace("z", "a")
    p.write_text(text, encoding="utf-8")
    with pytest.raises(FracgraphError, match="validation split .* 1 characters that the training split never"):
        load_text(p)
    p.write_bytes(b"abc\xff\xfeabc" * 10)
    with pytest.raises(FracgraphError, match="not UTF-8"):
        load_text(p)


def test_text_checks_against_the_model(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcd" * 5, encoding="utf-8")   # 20 characters: train 18, validation 2
    ds = load_text(p)
    with pytest.raises(FracgraphError, match="shorter than two contexts"):
        ds.check_model(context=16, vocab=4)
    with pytest.raises(FracgraphError, match="validation split .* shorter than one window"):
        ds.check_model(context=4, vocab=4)
    with pytest.raises(FracgraphError, match="vocabulary has 3 tokens but .* has 4"):
        ds.check_model(context=1, vocab=3)


def test_stream_windows_are_contiguous_seeded_and_resumable(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(TEXT, encoding="utf-8")
    ds = load_text(p)
    s = TextStream(ds, 4, seed=3, context=8)
    batches = [next(s) for _ in range(3)]
    for x, y in batches:
        assert x.shape == y.shape == (4, 8) and x.dtype == np.int64
        assert (x[:, 1:] == y[:, :-1]).all()                       # labels are the next characters
        for row_x, row_y in zip(x, y):                             # a window of the training text
            w = "".join(ds.chars[i] for i in np.append(row_x, row_y[-1]))
            assert w in "".join(ds.chars[i] for i in ds.train)
    s2 = TextStream(ds, 4, seed=3, context=8)
    next(s2)
    state = s2.state_dict()
    s3 = TextStream(ds, 4, seed=3, context=8)
    s3.load_state_dict(state)
    assert all((a == b).all() for a, b in zip(next(s3), batches[1]))
    assert not all((a == b).all() for a, b in zip(next(TextStream(ds, 4, seed=4, context=8)), batches[0]))
    starts = validation_windows(ds, 8, 4)
    assert (np.diff(starts) == 8).all() and starts[-1] + 9 <= len(ds.val)


def test_language_model_trains_samples_and_reports_loss(gpt_art, tmp_path):
    from fracgraph.sample import sample
    from fracgraph.train.loop import TrainConfig, train

    run = tmp_path / "run"
    s = train(TrainConfig(run_dir=str(run), artifacts=str(gpt_art / "art"), data=f"text:{gpt_art / 'text.txt'}",
                          schedule="pfq", fw_schedule=[4, 8], bw_schedule=[8, 8], iters=120, epoch_iters=30,
                          batch=8, lr=1e-2, lr_schedule="constant"))
    assert s["task"] == "language_model" and "final_test_acc" not in s
    # the repeating sentence is learned: far below the 11-character uniform entropy (ln 11 = 2.40)
    assert s["final_val_loss"] < 1.0 and s["best_val_loss"] <= s["final_val_loss"] + 1e-12
    assert s["final_val_ppl"] == pytest.approx(math.exp(s["final_val_loss"]))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "train_token_acc" in recs[0] and "val_loss" in recs[29] and "val_ppl" in recs[-1]
    assert json.loads((run / "vocab.json").read_text())["chars"] == "".join(sorted(set(TEXT)))

    # greedy sampling: every character is the argmax of the model's logits at the last real position, whatever
    # fills the positions after it (the causal mask): replayed here with random filler instead of zeros
    import onnxruntime as ort

    from fracgraph.trace import Trace

    text = sample(str(run), tokens=20, prompt="the ", temperature=0)
    chars = json.loads((run / "vocab.json").read_text())["chars"]
    sess = ort.InferenceSession(str(run / "last.onnx"), providers=["CPUExecutionProvider"])
    bits = Trace.read(run).bits[-1]
    ids = [chars.index(c) for c in "the "]
    rng = np.random.default_rng(1)
    for c in text:
        window = ids[-8:]
        x = rng.integers(0, len(chars), (1, 8)).astype(np.int64)
        x[0, :len(window)] = window
        logits = sess.run(None, {"ids": x, "fracgraph_bits": bits})[0][0, len(window) - 1, :len(chars)]
        assert chars[int(np.argmax(logits))] == c
        ids.append(chars.index(c))
    assert "cat" in text or "mat" in text or "sat" in text   # and it learned the sentence
    assert sample(str(run), tokens=30, prompt="a", temperature=1.0, seed=5) == \
        sample(str(run), tokens=30, prompt="a", temperature=1.0, seed=5)

    from fracgraph.report.page import write_report   # the report shows validation loss, not accuracy

    html = (write_report([run], tmp_path / "report", hw_names=("bitfusion",))).read_text()
    assert "final val loss" in html and f"{s['final_val_loss']:.4f}" in html and "final acc." not in html


def test_bad_task_data_is_one_line_and_writes_nothing(gpt_art, tmp_path, small_model):
    runner = CliRunner()
    short = tmp_path / "short.txt"
    short.write_text("abc" * 4, encoding="utf-8")
    cases = [
        ([str(gpt_art / "art"), "--data", f"text:{short}"], "shorter than two contexts"),
        ([str(gpt_art / "art")], "is not text; use --data text:PATH"),                     # digits into a GPT
        ([str(small_model[1]), "--data", f"text:{gpt_art / 'text.txt'}"], "text needs a language model"),
    ]
    for i, (argv, msg) in enumerate(cases):
        out = tmp_path / f"run{i}"
        res = runner.invoke(app, ["train", *argv, "-o", str(out), "--iters", "2"])
        assert res.exit_code == 2, res.output
        assert msg in " ".join(res.output.split()) and "Traceback" not in res.output
        assert not out.exists()
    res = runner.invoke(app, ["sample", str(gpt_art / "art")])
    assert res.exit_code == 2 and "no vocab.json" in res.output


@pytest.mark.parametrize("fmt", ["float", "qdq"])
def test_exported_language_model_reproduces_the_run_validation_loss(gpt_art, tmp_path, fmt):
    """`fracgraph export` of a GPT run: only the token input, precisions baked in, and plain onnxruntime gives the
    run's final validation loss over the same windows."""
    import onnxruntime as ort

    from fracgraph.export import ExportOptions, evaluate_export, export_run
    from fracgraph.train.loop import TrainConfig, train

    run = tmp_path / "run"
    s = train(TrainConfig(run_dir=str(run), artifacts=str(gpt_art / "art"), data=f"text:{gpt_art / 'text.txt'}",
                          schedule="static", fw=6, bw=8, iters=30, epoch_iters=15, batch=8, lr=1e-2,
                          lr_schedule="constant"))
    res = export_run(str(run), str(tmp_path / "gpt.onnx"), ExportOptions(format=fmt))
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    assert len(sess.get_inputs()) == 1 and "fracgraph_bits" not in {i.name for i in sess.get_inputs()}
    e = evaluate_export(res.path, str(run))
    assert e["run_final_val_loss"] == s["final_val_loss"]
    assert e["val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-4)
