"""Crash safety of `fracgraph train`: SIGKILL a run at random moments, resume it each time with `--resume`, and
check that the finished run equals an uninterrupted one bit for bit.

The run trains digitnet (zoo) on the bundled digits, from the ONNX model (so quantizing into RUN/artifacts is
inside the killable window too). Kill moments are seeded: sorted targets spread over the whole life of a run,
from process start-up and the first checkpoint, through training steps, checkpoints and evaluations (best.onnx
export), to the final checkpoint, last.onnx export and summary. A target is a training step: the killer waits
until the resumed process has written that step to metrics.jsonl, then waits a random fraction of a checkpoint
interval; targets before step 1 are a random delay after launch; targets past the end, a random delay after the
last step. Compared at the end: every initializer of last.onnx and best.onnx, metrics.jsonl (minus wall
times), trace.npz, and summary.json (minus wall time and paths).

    python bench/kill_resume.py [--kills 20] [--iters 300] [--checkpoint-every 10] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def fracgraph_cmd() -> list[str]:
    """The installed console script beside this interpreter (what a user runs), else the same entry point."""
    script = Path(sys.executable).with_name("fracgraph")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from fracgraph.cli import app; app()"]


def train_argv(model: Path, run: Path, iters: int, ckpt_every: int, batch: int, epoch_iters: int,
               resume: bool) -> list[str]:
    argv = [*fracgraph_cmd(), "train", str(model), "-o", str(run), "--schedule", "pfq", "--iters", str(iters),
            "--epoch-iters", str(epoch_iters), "--checkpoint-every", str(ckpt_every), "--batch", str(batch),
            "--json"]
    return argv + (["--resume"] if resume else [])


def last_step(run: Path, since_ns: int) -> int | None:
    """Step of the last complete metrics line, if the file was written after `since_ns` (else None)."""
    p = run / "metrics.jsonl"
    try:
        if p.stat().st_mtime_ns <= since_ns:
            return None
        data = p.read_bytes()
    except OSError:
        return None
    lines = data.split(b"\n")[:-1]           # a torn last line has no newline
    if not lines:
        return None
    try:
        return int(json.loads(lines[-1])["step"])
    except (ValueError, KeyError):
        return None


def latest_checkpoint(run: Path) -> int | None:
    try:
        return int(json.loads((run / "checkpoints" / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class Attempt:
    target: float | None
    killed: bool
    rc: int | None
    resumed_from: int | None       # latest checkpoint when this attempt started
    step_at_kill: int | None       # last metrics step when it was killed (or finished)
    seconds: float
    stderr: str


def run_attempt(argv, run: Path, target: float | None, iters: int, jitter_s: float, startup_s: float, tail_s: float,
                rng, timeout: float = 600.0) -> Attempt:
    """Launch, wait for the kill moment that `target` names, SIGKILL (unless it finished first; None: no kill)."""
    resumed_from = latest_checkpoint(run)
    t0 = time.monotonic()
    since = time.time_ns()
    err_path = run.parent / f".{run.name}.stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    # start-up targets: a random delay after launch, but at the latest when the first new step is written
    # (start-up time is noisy on a busy machine); step targets: that step, then a random part of a checkpoint
    # interval; end targets: the last step, then a random part of what follows it
    # a process resumed from the final checkpoint writes no step: its kill moment is a delay after launch
    # (it re-exports last.onnx and rewrites the summary)
    done = resumed_from is not None and resumed_from >= iters
    if target is not None and (target < 1 or done):
        deadline = t0 + rng.uniform(0, startup_s + (tail_s if done else 0))
    else:
        deadline = None
    want = 1 if target is None or target < 1 else min(int(target), iters)
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if target is not None:
            s = last_step(run, since)
            if s is not None and s >= want:
                if target < 1 or done:
                    break
                if deadline is None:
                    deadline = time.monotonic() + rng.uniform(0, tail_s if target > iters else jitter_s)
            if deadline is not None and time.monotonic() >= deadline:
                break
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    stderr = err_path.read_text(errors="replace")
    err_path.unlink()
    return Attempt(target, killed, None if killed else rc, resumed_from, last_step(run, 0), time.monotonic() - t0,
                   stderr)


def weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def compare_runs(a: Path, b: Path) -> list[str]:
    """Differences between two finished runs (empty: identical results)."""
    diffs = []
    for name in ("last.onnx", "best.onnx"):
        wa, wb = weights(a / name), weights(b / name)
        if wa.keys() != wb.keys():
            diffs.append(f"{name}: initializer names differ")
            continue
        bad = [k for k in wa if wa[k].shape != wb[k].shape or not np.array_equal(wa[k], wb[k])]
        if bad:
            diffs.append(f"{name}: {len(bad)}/{len(wa)} initializers differ (e.g. {bad[0]})")

    def records(run):
        return [{k: v for k, v in json.loads(ln).items() if k != "wall"}
                for ln in (run / "metrics.jsonl").read_text().splitlines()]

    ra, rb = records(a), records(b)
    if ra != rb:
        first = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
        diffs.append(f"metrics.jsonl differs ({len(ra)} vs {len(rb)} lines; first difference at line {first + 1})")
    with np.load(a / "trace.npz") as ta, np.load(b / "trace.npz") as tb:
        if ta.files != tb.files or any(not np.array_equal(ta[k], tb[k]) for k in ta.files):
            diffs.append("trace.npz differs")

    def summary(run):
        s = json.loads((run / "summary.json").read_text())
        for k in ("wall_s", "run_dir", "artifacts"):
            s.pop(k, None)
        s.get("config", {}).pop("run_dir", None)
        return s

    if summary(a) != summary(b):
        sa, sb = summary(a), summary(b)
        keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        diffs.append(f"summary.json differs in {keys}")
    return diffs


def kill_campaign(workdir: Path, kills: int = 20, iters: int = 300, ckpt_every: int = 10, batch: int = 128,
                  epoch_iters: int = 50, seed: int = 0, log=print, target: Path | None = None) -> dict:
    """Reference run, then one run killed `kills` times and resumed each time; returns the figures.
    `target`: what to train (default: the digitnet model, exported here; an artifact directory skips quantize)."""
    if target is None:
        from fracgraph.zoo import export

        target = export("digitnet", workdir / "digitnet.onnx")
    model = Path(target)
    ref, run = workdir / "reference", workdir / "killed"
    t0 = time.monotonic()
    since = time.time_ns()
    proc = subprocess.Popen(train_argv(model, ref, iters, ckpt_every, batch, epoch_iters, False),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_step_at = None
    last_step_at = None
    while proc.poll() is None:
        s = last_step(ref, since)
        if s is not None and first_step_at is None:
            first_step_at = time.monotonic() - t0
        if s == iters and last_step_at is None:
            last_step_at = time.monotonic() - t0
        time.sleep(0.005)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed ({proc.returncode}): {err[-2000:]}")
    total = time.monotonic() - t0
    first_step_at = first_step_at or total
    last_step_at = last_step_at or total
    step_s = (last_step_at - first_step_at) / max(iters - 1, 1)
    tail_s = max(total - last_step_at, 0.05)
    log(f"reference: {iters} steps in {total:.1f} s (start-up {first_step_at:.1f} s, {step_s * 1e3:.0f} ms/step, "
        f"after the last step {tail_s:.1f} s)")

    rng = np.random.default_rng(seed)
    # targets over the run's life: start-up (< 1), steps 1..iters, and the end phase (> iters); an attempt that
    # finishes before its moment does not count as a kill, and the campaign goes on until `kills` were delivered
    targets = list(np.sort(rng.uniform(-0.1 * iters, 1.1 * iters, kills)))
    attempts: list[Attempt] = []
    i = 0
    while sum(a.killed for a in attempts) < kills and i < 2 * kills:
        target = targets[i] if i < len(targets) else rng.uniform(iters, 1.1 * iters)
        a = run_attempt(train_argv(model, run, iters, ckpt_every, batch, epoch_iters, resume=i > 0), run,
                        float(target), iters, jitter_s=step_s * ckpt_every, startup_s=first_step_at * 1.2,
                        tail_s=tail_s, rng=rng)
        attempts.append(a)
        what = "killed" if a.killed else f"exited {a.rc}"
        log(f"attempt {i + 1:2d}: target {target:7.1f}  resumed from checkpoint {a.resumed_from}  {what} at "
            f"step {a.step_at_kill} after {a.seconds:.1f} s")
        if not a.killed and a.rc != 0:
            log(f"    did not resume: {a.stderr.strip().splitlines()[-1] if a.stderr.strip() else '(no stderr)'}")
        i += 1
    final = run_attempt(train_argv(model, run, iters, ckpt_every, batch, epoch_iters, resume=True), run,
                        None, iters, 0, 0, 0, rng)
    log(f"final resume from checkpoint {final.resumed_from}: exited {final.rc} after {final.seconds:.1f} s")
    failed = [a for a in attempts + [final] if not a.killed and a.rc != 0]
    diffs = compare_runs(ref, run) if final.rc == 0 else ["the final resume failed: " + final.stderr[-500:]]
    leftovers = sorted(str(p.relative_to(run)) for p in run.rglob(".*"))
    return {"kills": sum(a.killed for a in attempts), "attempts": len(attempts) + 1,
            "finished_before_kill": sum(not a.killed for a in attempts),
            "failed_resumes": len(failed), "diffs": diffs, "identical": not diffs and not failed,
            "killed_at_steps": [a.step_at_kill for a in attempts if a.killed],
            "resumed_from": [a.resumed_from for a in attempts[1:]] + [final.resumed_from],
            "temp_leftovers": leftovers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--epoch-iters", type=int, default=50)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="work in this directory and keep it")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fracgraph-kill-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        r = kill_campaign(work, args.kills, args.iters, args.checkpoint_every, args.batch, args.epoch_iters, args.seed)
    print()
    print(f"{r['kills']} SIGKILLs at seeded random moments ({r['finished_before_kill']} attempts finished before "
          f"their kill moment), {r['attempts']} launches, {r['failed_resumes']} failed resumes")
    print(f"killed at steps {r['killed_at_steps']}")
    print(f"resumed from checkpoints {r['resumed_from']}")
    print(f"left-over temporary files: {r['temp_leftovers'] or 'none'}")
    print("final run vs uninterrupted run: " + ("identical (last.onnx and best.onnx initializers, metrics.jsonl, "
                                                 "trace.npz, summary.json)" if r["identical"] else "; ".join(r["diffs"])))
    return 0 if r["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
