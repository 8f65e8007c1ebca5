"""The training loop: artifacts + data + precision schedule -> a run directory that can always be resumed.

Determinism: data order comes from (seed, epoch, position); the stochastic-rounding noise comes from ORT's
random kernels, seeded when the session is created. The session is therefore re-created, with a seed derived
from (seed, step), right after every checkpoint, in an uninterrupted run as in a resumed one, so a run resumed
from the checkpoint of step S draws exactly the noise the uninterrupted run drew after S.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import FracgraphError
from ..manifest import Manifest
from ..passes.dfq_gate import COUNTS_OUTPUT as DFQ_COUNTS
from ..passes.dfq_gate import CP_OUTPUT as DFQ_CP
from ..runtime import TrainSession
from ..trace import TraceRecorder
from . import runio
from .data import BatchStream, check_num_classes, fit_to_input, hold_out, load_dataset
from .dfq import SCHEDULES as DFQ_SCHEDULES
from .dfq import ChoiceRecord, TargetClamp, TargetSchedule, cost_label, require_dfq
from .dfq import bits_input as dfq_bits_input
from .schedules import LRSchedule, PFQSchedule, StaticSchedule
from .text import TextDataset, TextStream, evaluate_lm, perplexity

ARTIFACTS = "artifacts"
ORT_CHECKPOINT = "ort_checkpoint"
MOMENTUM = "momentum.npz"
BEST_MODEL, LAST_MODEL = "best.onnx", "last.onnx"


@dataclass
class TrainConfig:
    run_dir: str
    artifacts: str | None = None          # an artifact directory ...
    model: str | None = None              # ... or a model to quantize into RUN/artifacts
    schedule: str = "static"              # static | pfq | dfq | fractrain
    fw: int = 8
    bw: int = 8
    fw_schedule: list[int] = field(default_factory=lambda: [3, 4, 6, 8])
    bw_schedule: list[int] = field(default_factory=lambda: [6, 6, 8, 8])
    eps: float = 0.05
    alpha: float = 0.3
    pfq_noise_floor: float = 0.0          # PFQ/FracTrain thresholds >= this x the epoch loss's noise (0: the authors', the default: README)
    data: str | None = None
    iters: int = 200
    epoch_iters: int = 50
    batch: int = 128
    lr: float = 0.1
    lr_schedule: str = "step"
    seed: int = 0
    eval_every: int | None = None         # default: every epoch
    checkpoint_every: int | None = None   # default: every epoch
    eval_batches: int | None = None       # limit test batches per evaluation (None = whole test set)
    holdout: int = 0                      # > 0: evaluate on this many held-out training images, never the test set
    threads: int | None = None
    momentum: float | None = None         # SGD momentum / weight decay; None = the artifacts' (quantize) values
    weight_decay: float | None = None
    target_cp: float = 3.0                # DFQ: cp target (%) of the gated blocks (train_dfq --target_ratio)
    target_cp_schedule: list[float] = field(default_factory=lambda: [1.5, 2.0, 2.5, 3.0])   # FracTrain stages
    beta: float = 1e-3                    # DFQ: weight of the cost term
    beta_schedule: str = "constant"       # DFQ: constant (authors') | lr: beta x lr0/lr(step), see dfq_beta()


def check_task_data(task, dataset, spec: str | None):
    """The data must suit the model's task: text for a language model, images (or arrays) for a classifier; returns
    the dataset as the model reads it (images resized to the model's input: data.fit_to_input)."""
    if task.is_lm:
        if not isinstance(dataset, TextDataset):
            raise FracgraphError(f"the model is a language model (token ids {task.input_name} [batch, {task.context}]) "
                                 f"but --data {spec or '(digits)'} is not text; use --data text:PATH")
        dataset.check_model(task.context, task.num_classes)
        return dataset
    if isinstance(dataset, TextDataset):
        raise FracgraphError(f"--data {spec} is text, but the model is a classifier with a float input "
                             f"{task.input_name}; text needs a language model (e.g. `fracgraph zoo gpt`)")
    check_num_classes(dataset, task.num_classes)
    return fit_to_input(dataset, tuple(task.input_shape))


def _session_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**31 - 1)


class CostMeter:
    """Effective MACs of a step's forward, error and weight-gradient GEMMs at the bits used (fractrain §4)."""

    def __init__(self, manifest: Manifest):
        ops = manifest.ops
        self.block_macs = np.zeros(manifest.n_blocks)
        self.act_act_macs = np.zeros(manifest.n_blocks)    # of which activation x activation GEMMs (attention)
        self.fp32_macs = 0.0
        for d in ops:
            if d["quantized"]:
                self.block_macs[d["block"]] += d["macs"]
                if not d.get("weight_is_param", True):
                    self.act_act_macs[d["block"]] += d["macs"]
            else:
                self.fp32_macs += d["macs"]
        self.weight_macs = self.block_macs - self.act_act_macs
        self.total = float(self.block_macs.sum() + self.fp32_macs)

    def step(self, bits: np.ndarray, batch: int) -> dict:
        b = np.where(bits > 0, bits, 32.0) / 32.0          # 0 bits = FP32
        a, w, g = b[:, 0], b[:, 1], b[:, 2]
        # forward a x w and error g x w; an activation x activation GEMM has the act bits on both operands
        fw = float(self.weight_macs @ (a * w) + self.act_act_macs @ (a * a) + self.fp32_macs) * batch
        err = float(self.weight_macs @ (g * w) + self.act_act_macs @ (g * a) + self.fp32_macs) * batch
        wg = float(self.block_macs @ (a * g) + self.fp32_macs) * batch
        return {"fw": fw, "err": err, "wgrad": wg, "cp": 100 * (fw + err + wg) / (3 * self.total * batch)}


BETA_SCHEDULES = ("constant", "lr")
BETA_LR_CAP = 100.0


def dfq_beta(cfg: "TrainConfig", lr: float) -> float:
    """The cost weight fed at a step with learning rate `lr`. The sign controller's push on the gates is
    lr x beta x (cost gradient): at a constant beta it shrinks with every LR decay (x0.1 at 50% and 75% of the run
    with the step schedule), so a target that rises late is followed 10-100x more slowly
    (bench/dfq_controller_speed.py). "lr" feeds beta x lr0/lr, capped at BETA_LR_CAP (cosine ends at lr 0): the
    gates then move at the first LR stage's speed all run long."""
    if cfg.beta_schedule == "constant" or cfg.lr <= 0:
        return cfg.beta
    return cfg.beta * min(cfg.lr / max(lr, 1e-30), BETA_LR_CAP)


def _bits(manifest: Manifest, fw: int, bw: int) -> np.ndarray:
    return np.tile(np.array([fw, fw, bw], np.float32), (manifest.n_blocks, 1))


def evaluate(session: TrainSession, dataset, bits: np.ndarray, batch: int, limit: int | None = None) -> tuple[float, float]:
    """Test accuracy and loss; with `limit`, on a fixed random subset of limit*batch images (test sets are often
    stored sorted by class, so the first batches would be one class)."""
    x_all, y_all = dataset.x_test, dataset.y_test
    if limit is not None and limit * batch < len(y_all):
        idx = np.sort(np.random.default_rng(0).permutation(len(y_all))[: limit * batch])
        x_all, y_all = x_all[idx], y_all[idx]
    correct = total = 0
    loss_sum = 0.0
    for i in range(0, len(y_all), batch):
        x, y = dataset.normalize(x_all[i:i + batch]), y_all[i:i + batch]
        loss, logits = session.evaluate(x, y, bits)
        correct += int((np.argmax(logits, 1) == y).sum())
        loss_sum += loss * len(y)
        total += len(y)
    return correct / max(total, 1), loss_sum / max(total, 1)


def _prepare_artifacts(cfg: TrainConfig, run: Path, resume: bool) -> Path:
    if cfg.artifacts:
        return Path(cfg.artifacts)
    if not cfg.model:
        raise FracgraphError("give an artifact directory or a model to train")
    art = run / ARTIFACTS
    if not (resume and (art / "manifest.json").exists()):
        from ..build import BuildOptions, build_artifacts

        if cfg.schedule in DFQ_SCHEDULES:   # DFQ artifacts with the CIFAR defaults; first GEMM static at --fw/--bw
            from ..passes.dfq_gate import DfqOptions

            opts = BuildOptions(fw=cfg.fw, bw=cfg.bw, dfq=DfqOptions())
        else:
            opts = BuildOptions(fw=cfg.fw, bw=cfg.bw)
        build_artifacts(cfg.model, art, opts, force=True)
    return art


def train(cfg: TrainConfig, resume: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) training; returns the summary also written to RUN/summary.json."""
    run = Path(cfg.run_dir)
    store = runio.CheckpointStore(run)
    # --resume with no complete checkpoint (killed before the first one finished) starts again from step 0:
    # nothing was trained that could be continued, and the metrics file is cut back to empty
    latest = store.latest() if resume else None
    if not resume and store.latest() is not None:
        raise FracgraphError(f"{run} already holds a run; pass --resume to continue it, or use a new -o directory")
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    try:
        return _train(cfg, run, store, latest, resume, progress)
    except FracgraphError:
        # bad input found before the run's first checkpoint: leave nothing behind (a resumed run keeps its files)
        if created and latest is None and store.latest() is None:
            import shutil

            shutil.rmtree(run, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, run: Path, store, latest, resume: bool, progress) -> dict:
    if latest is not None:
        cfg = TrainConfig(**{**asdict(cfg), **latest[1]["config"], "run_dir": str(run)})
    art = _prepare_artifacts(cfg, run, resume)
    manifest = Manifest.read(art)
    task = manifest.task_info()
    dataset = load_dataset(cfg.data)
    if cfg.holdout:
        if task.is_lm or isinstance(dataset, TextDataset):
            raise FracgraphError("--holdout is for image classifiers; a language model already evaluates on the "
                                 "text's last 10%, which it never trains on")
        dataset = hold_out(dataset, cfg.holdout)
    dataset = check_task_data(task, dataset, cfg.data)
    if cfg.iters < 1 or cfg.epoch_iters < 1 or cfg.batch < 1:
        raise FracgraphError("--iters, --epoch-iters and --batch must be at least 1")

    dfq = require_dfq(manifest, cfg.schedule, str(art))
    if cfg.schedule == "static":
        sched = StaticSchedule(cfg.fw, cfg.bw, cfg.epoch_iters)
    elif cfg.schedule == "pfq":
        sched = PFQSchedule(cfg.fw_schedule, cfg.bw_schedule, cfg.epoch_iters, eps=cfg.eps, alpha=cfg.alpha,
                            noise_floor=cfg.pfq_noise_floor)
    elif cfg.schedule in DFQ_SCHEDULES:
        targets = [cfg.target_cp] if cfg.schedule == "dfq" else cfg.target_cp_schedule
        sched = TargetSchedule(cfg.schedule, targets, cfg.epoch_iters, eps=cfg.eps, alpha=cfg.alpha,
                               noise_floor=cfg.pfq_noise_floor)
    else:
        raise FracgraphError(f"--schedule {cfg.schedule!r} is not available; use static, pfq, dfq or fractrain")
    lrs = LRSchedule(cfg.lr_schedule, cfg.lr, cfg.iters)
    if cfg.beta_schedule not in BETA_SCHEDULES:
        raise FracgraphError(f"--beta-schedule {cfg.beta_schedule!r}: use {' or '.join(BETA_SCHEDULES)}")
    if task.is_lm:
        stream = TextStream(dataset, cfg.batch, cfg.seed, task.context, task.input_dtype)
        dataset.write_vocab(run)   # `fracgraph sample` decodes with it
    else:
        stream = BatchStream(dataset, cfg.batch, cfg.seed)
    meter = CostMeter(manifest)
    choices = ChoiceRecord(manifest, meter, static_bits=(cfg.fw, cfg.bw)) if dfq else None
    clamp = TargetClamp(manifest) if dfq else None
    eval_every = cfg.eval_every or cfg.epoch_iters
    ckpt_every = cfg.checkpoint_every or cfg.epoch_iters

    # best score so far: test accuracy, or minus the validation loss of a language model
    step, best_acc, cum = 0, (-1e30 if task.is_lm else -1.0), {"fw": 0.0, "err": 0.0, "wgrad": 0.0}
    samples = 0          # trained samples: an epoch's last batch can be short, so not batch x steps
    recorder = TraceRecorder()
    ckpt = None
    if latest is not None:
        step, st, ckpt_dir = latest
        stream.load_state_dict(st["stream"])
        sched.load_state_dict(st["schedule"])
        best_acc, cum = st["best_acc"], st["cum_macs"]
        last_loss = st.get("last_val_loss")
        samples = st.get("samples", cfg.batch * step)
        if choices is not None:
            choices = ChoiceRecord(manifest, meter, st["dfq_hist"], static_bits=(cfg.fw, cfg.bw))
            clamp = TargetClamp(manifest, st.get("dfq_clamps"))
        recorder = TraceRecorder(st["trace"]["starts"], [np.array(b, np.float32) for b in st["trace"]["bits"]], step,
                                 st["trace"].get("active"))
        ckpt = ckpt_dir / ORT_CHECKPOINT
    session = _open_session(art, ckpt, cfg, step)
    if latest is not None and hasattr(session.optimizer, "load_state_arrays"):
        with np.load(latest[2] / MOMENTUM) as z:
            session.optimizer.load_state_arrays(dict(z))
    metrics = runio.MetricsWriter(run, resume_step=step if resume else None)
    t0 = time.perf_counter()
    last_acc = latest[1].get("last_acc") if latest is not None else None
    if latest is None:
        last_loss = None

    def save_checkpoint(at: int) -> None:
        nonlocal session
        metrics.sync()
        trace = recorder.trace()
        state = {"config": asdict(cfg), "stream": stream.state_dict(), "schedule": sched.state_dict(),
                 "best_acc": best_acc, "last_acc": last_acc, "last_val_loss": last_loss, "cum_macs": cum,
                 "samples": samples,
                 "trace": {"starts": trace.starts.tolist(), "bits": trace.bits.tolist(), "active": trace.active.tolist()},
                 "dfq_hist": choices.hist.tolist() if choices is not None else None,
                 "dfq_clamps": clamp.clamps if clamp is not None else None}
        files = {ORT_CHECKPOINT: session.save_checkpoint}
        if hasattr(session.optimizer, "state_arrays"):
            arrays = session.optimizer.state_arrays()
            files[MOMENTUM] = lambda p: _savez(p, arrays)
        saved = store.save(at, state, files)
        # a fresh session seeded from the step: the noise from here on no longer depends on whether we resumed
        momentum = session.optimizer.state_arrays() if hasattr(session.optimizer, "state_arrays") else None
        session = _open_session(art, saved / ORT_CHECKPOINT, cfg, at)
        if momentum is not None:
            session.optimizer.load_state_arrays(momentum)

    try:
        if latest is None:
            save_checkpoint(0)      # a run is resumable from its first moment
        while step < cfg.iters:
            x, y = next(stream)
            lr = lrs(step)
            if dfq:   # the gates choose; the input carries the static weight bits and the static blocks' bits
                bits, target = dfq_bits_input(manifest, cfg.fw, cfg.bw), sched.target(step)
                clamped = clamp.note(step, target)
                beta = dfq_beta(cfg, lr)
                loss, logits = session.step(x, y, bits, lr, target=clamp.fed(target), beta=beta)
            else:
                fw, bw = sched.bits(step)
                bits = _bits(manifest, fw, bw)
                loss, logits = session.step(x, y, bits, lr)
            if not math.isfinite(loss):
                raise FracgraphError(f"loss became {loss} at step {step}; the run stopped and its last checkpoint "
                                     f"(step {latest_step(store)}) is kept: lower --lr or raise the precision")
            if dfq:
                cost, used, active = choices.step(session.last_outputs[DFQ_COUNTS], len(y))
                fw, bw = (round(float(v), 2) for v in (meter.block_macs @ used[:, [0, 2]]) / meter.block_macs.sum())
            else:
                cost, used, active = meter.step(bits, len(y)), bits, None
            for k in cum:
                cum[k] += cost[k]
            samples += len(y)
            recorder.record(step, used, active)
            ended = sched.observe(step, loss)
            step += 1
            rec = {"step": step, "epoch": step / cfg.epoch_iters, "loss": loss, "lr": lr, "fw": fw, "bw": bw,
                   "bits": (used.round(2) if dfq else used.astype(int)).tolist(), **task.train_metrics(logits, y),
                   "eff_gmacs": (cost["fw"] + cost["err"] + cost["wgrad"]) / 1e9, "cp": cost["cp"],
                   "cum_gmacs": sum(cum.values()) / 1e9, "wall": time.perf_counter() - t0}
            if dfq:
                rec.update(target_cp=target, target_cp_fed=clamp.fed(target), dfq_cp=float(session.last_outputs[DFQ_CP]),
                           beta=beta)
                if clamped is not None:
                    rec["target_clamp"] = clamped
            if ended is not None and ended.transition is not None:
                rec["transition"] = ended.transition.as_dict()
            if step % eval_every == 0 or step == cfg.iters:
                # the final evaluation always covers the whole test set, so the reported accuracy is the real one
                limit = None if step == cfg.iters else cfg.eval_batches
                if task.is_lm:   # the score is minus the validation loss (nats per token)
                    last_loss = evaluate_lm(session, dataset, bits, cfg.batch, task.context, task.input_dtype, limit)
                    rec.update(val_loss=last_loss, val_ppl=perplexity(last_loss))
                    acc = -last_loss
                else:
                    acc, tloss = evaluate(session, dataset, bits, cfg.batch, limit)
                    rec.update(test_acc=acc, test_loss=tloss)
                    last_acc = acc
                if acc > best_acc:
                    best_acc = acc
                    _export_atomic(session, run / BEST_MODEL)
            metrics.write(rec)
            if progress:
                progress(rec)
            if step % ckpt_every == 0 or step == cfg.iters:
                save_checkpoint(step)
    finally:
        stream.close()
        metrics.close()

    _export_atomic(session, run / LAST_MODEL)
    recorder.trace().write(run)
    per_block = np.array([b for b in recorder.trace().bits]) if len(recorder.trace().bits) else None
    summary = {
        "run_dir": str(run), "artifacts": str(art), "schedule": cfg.schedule, "steps": step,
        "task": task.kind, "eval_split": f"holdout:{cfg.holdout}" if cfg.holdout else ("validation" if task.is_lm else "test"),
        **({"final_val_loss": last_loss, "best_val_loss": -best_acc, "final_val_ppl": perplexity(last_loss),
            "best_val_ppl": perplexity(-best_acc)} if task.is_lm else
           {"final_test_acc": last_acc, "best_test_acc": best_acc}),
        "cum_eff_gmacs": sum(cum.values()) / 1e9, "cum_eff_gmacs_by_gemm": {k: v / 1e9 for k, v in cum.items()},
        "fp32_gmacs": 3 * meter.total * samples / 1e9,
        "mean_cp": 100 * sum(cum.values()) / (3 * meter.total * samples) if samples else None,
        "transitions": [t.as_dict() for t in sched.transitions],
        "precision_segments": int(per_block.shape[0]) if per_block is not None else 0,
        "wall_s": time.perf_counter() - t0, "config": asdict(cfg),
    }
    if choices is not None:
        summary["dfq"] = {"options": dfq["options"], "weight_bits": dfq["weight_bits"],
                          "granularity": dfq["granularity"], "static_blocks": [
                              {"block": manifest.blocks[l].name, "fw": cfg.fw, "bw": cfg.bw} for l in choices.static],
                          "final_target_cp": sched.target(max(step - 1, 0)),
                          "mean_gated_cp": choices.mean_gated_cp(), "cp_unit": cost_label(dfq),
                          "reachable_cp": [clamp.floor, clamp.ceiling], "target_clamps": clamp.clamps,
                          "choice_histogram": choices.histogram([b.name for b in manifest.blocks])}
    runio.write_summary(run, summary)
    return summary


def _open_session(art: Path, checkpoint, cfg: TrainConfig, step: int) -> TrainSession:
    session = TrainSession(art, checkpoint=checkpoint, threads=cfg.threads, seed=_session_seed(cfg.seed, step))
    opt = session.optimizer
    if (cfg.momentum is not None or cfg.weight_decay is not None) and not hasattr(opt, "momentum"):
        raise FracgraphError("--momentum/--weight-decay apply to SGD artifacts; these were built with AdamW")
    if cfg.momentum is not None:
        opt.momentum = cfg.momentum
    if cfg.weight_decay is not None:
        opt.weight_decay = cfg.weight_decay
    return session


def _savez(path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _export_atomic(session: TrainSession, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        session.export_inference(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise runio._io_error(e, path, "model") from None
    except RuntimeError as e:  # onnxruntime's export reports a failed write this way
        tmp.unlink(missing_ok=True)
        raise runio.native_write_error(e, path, "model") from None


def latest_step(store: runio.CheckpointStore) -> int | None:
    got = store.latest()
    return got[0] if got else None
