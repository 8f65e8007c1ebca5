"""The model corpus (`fracgraph/zoo_external.py`: torchvision and timm architectures with random weights, and
hand-built legacy opset-9 graphs) through `quantize` at the default settings (FW8/BW8, speed passes and fused
kernels on) and three training steps; one row per model, failures included.

Per model, in its own process (a crash or a hang costs that row only):
  export (torch models: opset 17, TorchScript exporter, EVAL mode, no constant folding) at --size x --size;
  quantize (`build_artifacts`, timed); a refusal is checked through the CLI too: one line on stderr, exit code 2,
  no output directory;
  GEMMs quantized / total (the manifest's layer decisions);
  3 training steps on one fixed batch (--batch, random normal inputs, random labels, SGD lr --lr, all bits 8):
  the loss must be finite and the third below the first;
  step time: the median of --steps steps of the fracgraph FW8/BW8 step and of the plain onnxruntime FP32 step of
  the same (normalized) model, interleaved one step each, in the same process.

    python bench/model_corpus.py [--size 64] [--batch 32] [--steps 5] [--threads 2] [--models a,b] [--json OUT]
        # --models also takes any torchvision / timm architecture as tv:NAME or timm:NAME
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def one_line(exc: BaseException) -> str:
    """The first line; for onnxruntime's errors the part naming the node, not the C++ source location."""
    msg = (str(exc).strip().splitlines() or [""])[0]
    for marker in ("returned while running ", "[ONNXRuntimeError] : "):
        if marker in msg:
            msg = "onnxruntime: " + msg[msg.index(marker):]
            break
    return f"{type(exc).__name__}: {msg}"[:300]


def plain_artifacts(model_path: Path, out: Path):
    """The unquantized onnxruntime-training artifacts of the same normalized model (SGD, cross-entropy; a language
    model: its extra inputs filled in-graph and the mean token cross-entropy, as `quantize` does)."""
    from onnxruntime.training import artifacts as ort_artifacts

    from fracgraph.build import classify_initializers, model_task
    from fracgraph.model import load_model
    from fracgraph.task import lm_loss_block

    model, task, _head = model_task(load_model(model_path))   # the same logits head the quantizer trains
    tr, fr = classify_initializers(model)
    out.mkdir()
    loss, loss_inputs = ort_artifacts.LossType.CrossEntropyLoss, None
    if task.is_lm:
        loss, loss_inputs = lm_loss_block(), [model.graph.output[0].name]
    ort_artifacts.generate_artifacts(model, requires_grad=tr, frozen_params=fr, loss=loss,
                                     loss_input_names=loss_inputs,
                                     optimizer=ort_artifacts.OptimType.SGD, artifact_directory=str(out))


def plain_step(directory: Path, x, y, threads: int):
    from onnxruntime.training import api

    from fracgraph.runtime import session_options

    st = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    mod = api.Module(str(directory / "training_model.onnx"), st, session_options=session_options(threads))
    opt = api.Optimizer(str(directory / "optimizer_model.onnx"), mod)
    mod.train()

    def step():
        mod(x, y)
        opt.step()
        mod.lazy_reset_grad()
    return step


def check_refusal(model_path: Path, d: Path) -> str:
    """The CLI's answer to a model build_artifacts refused: 'ok' if one stderr line, exit 2, no output dir."""
    out = d / "cli_art"
    fg = Path(sys.executable).with_name("fracgraph")
    cmd = [str(fg)] if fg.exists() else [sys.executable, "-m", "fracgraph.cli"]
    r = subprocess.run(cmd + ["quantize", str(model_path), "-o", str(out)], capture_output=True, text=True,
                       timeout=600)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    problems = []
    if r.returncode != 2:
        problems.append(f"exit {r.returncode}")
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    if out.exists():
        problems.append("output directory written")
    return "one line, exit 2, no output" if not problems else "BAD: " + ", ".join(problems)


def run_one(a) -> dict:
    from fracgraph import zoo_external as zx
    from fracgraph.errors import FracgraphError

    e = zx.entry(a.one)
    row: dict = {"model": e.name, "source": e.source, "covers": e.covers}
    lm = e.source == "huggingface"   # a language model: vocabulary --vocab, context --context
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        try:
            model_path = zx.export_entry(e, d / f"{e.name}.onnx", classes=a.vocab if lm else a.classes,
                                         size=a.context if lm else a.size)
        except zx.SourceMissing as exc:
            row["error"] = f"skipped: {exc}"
            return row
        except Exception as exc:
            row["error"] = f"export failed: {one_line(exc)}"
            return row
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        from fracgraph.build import BuildOptions, build_artifacts
        from fracgraph.runtime import TrainSession

        t = time.perf_counter()
        try:
            manifest = build_artifacts(model_path, d / "art", BuildOptions())
        except FracgraphError as exc:
            row["quantize"] = "refused"
            row["error"] = (str(exc).strip().splitlines() or [""])[0][:400]
            row["cli"] = check_refusal(model_path, d)
            return row
        except Exception as exc:
            row["quantize"] = "crashed"
            row["error"] = one_line(exc)
            row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
            return row
        row["quantize"] = "ok"
        row["quantize_s"] = time.perf_counter() - t
        row["gemms_quantized"] = sum(1 for x in manifest.decisions if x.quantized)
        row["gemms_total"] = len(manifest.decisions)

        rng = np.random.default_rng(0)
        if lm:   # random token ids [B, T] in the model's dtype, next-token labels [B, T]
            task = manifest.task_info()
            ids = rng.integers(0, task.num_classes, (a.batch, task.context + 1))
            x, y = ids[:, :-1].astype(task.input_dtype), ids[:, 1:].astype(np.int64)
            row["extra_inputs"] = [f"{e['name']} ({e['fill']})" for e in task.extra_inputs]
        else:
            x = rng.standard_normal((a.batch, *[int(v) for v in manifest.input_shape])).astype(np.float32)
            y = rng.integers(0, manifest.num_classes, a.batch).astype(np.int64)
        try:
            sess = TrainSession(d / "art", threads=a.threads, seed=0)
            bits = np.full((sess.manifest.n_blocks, 3), 8, np.float32)
            losses = [sess.step(x, y, bits, a.lr)[0] for _ in range(3)]
        except Exception as exc:
            row["train"] = "failed"
            row["error"] = one_line(exc)
            return row
        row["losses"] = losses
        ok = bool(np.all(np.isfinite(losses)) and losses[2] < losses[0])
        row["train"] = "ok" if ok else "not decreasing" if np.all(np.isfinite(losses)) else "non-finite"

        fg_step = lambda: sess.step(x, y, bits, a.lr)  # noqa: E731
        try:
            plain_artifacts(model_path, d / "plain")
            pl_step = plain_step(d / "plain", x, y, a.threads)
        except Exception as exc:
            row["plain_error"] = one_line(exc)
            pl_step = None
        times = {"fg": [], "plain": []}
        if pl_step:
            try:   # warm-up of the plain step
                pl_step()
            except Exception as exc:
                row["plain_error"] = one_line(exc)
                pl_step = None
        steps = [("fg", fg_step)] + ([("plain", pl_step)] if pl_step else [])
        fg_step()
        for i in range(a.steps):
            for k, f in (steps if i % 2 == 0 else steps[::-1]):
                time.sleep(a.settle)
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        row["step_ms"] = 1000 * statistics.median(times["fg"])
        if pl_step:
            row["plain_ms"] = 1000 * statistics.median(times["plain"])
            row["step_vs_plain"] = row["step_ms"] / row["plain_ms"]
    return row


def fmt_row(r: dict) -> str:
    q = r.get("quantize", "-")
    g = f"{r['gemms_quantized']}/{r['gemms_total']}" if "gemms_total" in r else "-"
    tr = r.get("train", "-")
    if "losses" in r:
        tr += " (" + " ".join(f"{v:.3g}" for v in r["losses"]) + ")"
    st = f"{r['step_ms']:.0f} ms" if "step_ms" in r else "-"
    ratio = f"{r['step_vs_plain']:.2f}" if "step_vs_plain" in r else "-"
    qt = f"{r['quantize_s']:.1f}" if "quantize_s" in r else "-"
    err = r.get("error", "")
    if r.get("cli"):
        err += f" [CLI: {r['cli']}]"
    if r.get("plain_error"):
        err += f" [plain ORT: {r['plain_error']}]"
    return f"| {r['model']} | {r['source']} | {q} | {g} | {tr} | {st} | {ratio} | {qt} | {err} |"


HEADER = ("| model | source | quantize | GEMMs quantized / total | 3 steps (losses) | FW8/BW8 step | / plain ORT FP32 "
          "| quantize s | error |\n|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--context", type=int, default=32, help="hf: language models' context T")
    ap.add_argument("--vocab", type=int, default=96, help="hf: language models' vocabulary (>= 65: tinyshakespeare)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    ap.add_argument("--settle", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--models", help="comma-separated names (default: the whole corpus)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("ROW " + json.dumps(run_one(a)), flush=True)
        return

    from fracgraph import zoo_external as zx

    names = a.models.split(",") if a.models else [e.name for e in zx.ALL]
    for n in names:
        zx.entry(n)
    hf = [n for n in names if n.startswith("hf:")]
    lm = f"; language models: context {a.context}, vocabulary {a.vocab}" if hf else ""
    print(f"model corpus: {len(names)} models, input {a.size}x{a.size}{lm}, batch {a.batch}, {a.threads} threads, "
          f"lr {a.lr}, median of {a.steps} interleaved steps")
    print(HEADER, flush=True)
    rows = []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for n in names:
        e = zx.entry(n)
        cmd = [sys.executable, __file__, "--one", n, "--size", str(max(a.size, e.min_size)), "--batch", str(a.batch),
               "--classes", str(a.classes), "--context", str(a.context), "--vocab", str(a.vocab), "--steps", str(a.steps), "--settle", str(a.settle), "--lr", str(a.lr),
               "--threads", str(a.threads)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
            got = [ln[4:] for ln in r.stdout.splitlines() if ln.startswith("ROW ")]
            row = json.loads(got[-1]) if got else {
                "model": n, "source": e.source,
                "error": f"worker died (exit {r.returncode}): " + (r.stderr.strip().splitlines() or [""])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"model": n, "source": e.source, "error": f"timed out after {a.timeout:.0f} s"}
        rows.append(row)
        print(fmt_row(row), flush=True)
    ok = [r for r in rows if r.get("train") == "ok"]
    print(f"{len(ok)}/{len(rows)} models quantize and train (finite, decreasing loss over 3 steps)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
