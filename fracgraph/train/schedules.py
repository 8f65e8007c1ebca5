"""Precision schedules (static, fixed-iteration, PFQ) and learning-rate schedules, all resumable.

PFQ follows spec §2, which is the official `loss_diff_indicator` of FracTrain's train_pfq.py: one "epoch" is
`epoch_iters` iterations; its loss is the mean train loss over them; scale_loss is the running mean of the losses
of epochs 1..10; once 5 epoch losses are in the window, a turning point needs all 4 |L[i] - L[-1]| / scale_loss to
be <= threshold; then the stage advances, the threshold is multiplied by alpha only on the 1st and 2nd turning
point, and the window restarts (so every stage lasts at least 5 epochs); after `num_turning_point` switches the
last precision stays. The new bits apply from the next iteration on.

The reference divides the epoch's summed loss by len(train_loader) (391) although an epoch is 400 iterations; the
decisions depend only on ratios of epoch losses, which that constant factor cancels out of, so the mean is used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..errors import FracgraphError

log = logging.getLogger("fracgraph.train")


# --------------------------------------------------------------------------------------------------- indicator


class PFQIndicator:
    """The turning-point detector, fed one epoch loss at a time. State is plain JSON."""

    def __init__(self, threshold: float = 0.05, decay: float = 0.3, epoch_keep: int = 5,
                 num_turning_point: int = 3, scale_epochs: int = 10, noise_floor: float = 0.0):
        if not (threshold >= 0 and math.isfinite(threshold)):
            raise FracgraphError(f"PFQ epsilon must be a finite number >= 0, got {threshold}")
        if not (decay > 0 and math.isfinite(decay)):
            raise FracgraphError(f"PFQ alpha must be a finite number > 0, got {decay}")
        if epoch_keep < 2:
            raise FracgraphError(f"PFQ window must hold at least 2 epoch losses, got {epoch_keep}")
        if not (noise_floor >= 0 and math.isfinite(noise_floor)):
            raise FracgraphError(f"PFQ noise floor must be a finite number >= 0, got {noise_floor}")
        if num_turning_point < 0:
            raise FracgraphError(f"number of PFQ turning points must be >= 0, got {num_turning_point}")
        self.initial_threshold = float(threshold)
        self.decay = float(decay)
        self.epoch_keep = int(epoch_keep)
        self.num_turning_point = int(num_turning_point)
        self.scale_epochs = int(scale_epochs)
        self.threshold = float(threshold)
        self.noise_floor = float(noise_floor)
        self.last_threshold = float(threshold)   # the threshold the last update compared against
        self.loss: list[float] = []
        self.loss_diff: list[float] = [1.0] * (self.epoch_keep - 1)
        self.scale_sum = 0.0
        self.scale_loss = 1.0
        self.epoch = 0  # epochs consumed
        self.count = 0  # turning points found

    @property
    def done(self) -> bool:
        return self.count >= self.num_turning_point

    def effective_threshold(self, epoch_noise: float | None) -> float:
        """The threshold, raised to `noise_floor` x (the epoch loss's noise / scale_loss) when that is larger.

        With per-step loss noise sigma an epoch mean of E steps has noise sigma/sqrt(E); 4 differences of flat
        epoch losses all pass a threshold of 2 x that noise about half the time, while eps*alpha^2 (0.0045 at the
        README's 0.05/0.3) is far below it at short epochs and then never fires (bench/pfq_replay.py)."""
        if self.noise_floor <= 0 or epoch_noise is None or not math.isfinite(epoch_noise) or self.scale_loss <= 0:
            return self.threshold
        return max(self.threshold, self.noise_floor * epoch_noise / self.scale_loss)

    def update(self, epoch_loss: float, epoch_noise: float | None = None) -> bool:
        """Consume the loss of the next epoch (and the standard error of that mean, for the noise floor); True when
        it is a turning point (count already advanced)."""
        epoch_loss = float(epoch_loss)
        if not math.isfinite(epoch_loss):
            raise FracgraphError(f"epoch {self.epoch + 1} train loss is {epoch_loss}: training diverged; lower the "
                                 f"learning rate or raise the starting precision")
        self.epoch += 1
        if self.epoch <= self.scale_epochs:
            self.scale_sum += epoch_loss
            self.scale_loss = self.scale_sum / self.epoch
        if self.done:
            return False
        if len(self.loss) >= self.epoch_keep:
            self.loss.pop(0)
        self.loss.append(epoch_loss)
        if len(self.loss) < self.epoch_keep:
            return False
        now = self.loss[-1]
        self.loss_diff = [_ratio(abs(pre - now), self.scale_loss) for pre in self.loss[:-1]]
        self.last_threshold = self.effective_threshold(epoch_noise)
        if any(d > self.last_threshold for d in self.loss_diff):  # reference: any diff above -> no switch
            return False
        self.count += 1
        if self.count in (1, 2):  # reference adaptive_threshold: decay only on the 1st and 2nd turning point
            self.threshold *= self.decay
        self.loss = []
        return True

    def state_dict(self) -> dict:
        return {"kind": "PFQIndicator", "initial_threshold": self.initial_threshold, "decay": self.decay,
                "epoch_keep": self.epoch_keep, "num_turning_point": self.num_turning_point,
                "scale_epochs": self.scale_epochs, "noise_floor": self.noise_floor, "threshold": self.threshold,
                "last_threshold": self.last_threshold, "loss": list(self.loss),
                "loss_diff": list(self.loss_diff), "scale_sum": self.scale_sum, "scale_loss": self.scale_loss,
                "epoch": self.epoch, "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        s = {"noise_floor": 0.0, **s}   # checkpoints written before the noise floor existed ran without one
        _same_config(self.state_dict(), s, ("initial_threshold", "decay", "epoch_keep", "num_turning_point",
                                             "scale_epochs", "noise_floor"), "PFQ indicator")
        self.threshold = float(s["threshold"])
        self.last_threshold = float(s.get("last_threshold", s["threshold"]))
        self.loss = [float(v) for v in s["loss"]]
        self.loss_diff = [float(v) for v in s["loss_diff"]]
        self.scale_sum = float(s["scale_sum"])
        self.scale_loss = float(s["scale_loss"])
        self.epoch = int(s["epoch"])
        self.count = int(s["count"])


def _ratio(num: float, den: float) -> float:
    # numpy float semantics of the reference: x/0 -> inf, 0/0 -> nan (and nan > t is False, i.e. "within")
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _same_config(mine: dict, theirs: dict, keys: Sequence[str], what: str) -> None:
    for k in keys:
        if theirs.get(k) != mine.get(k):
            raise FracgraphError(f"cannot resume the {what}: checkpoint has {k}={theirs.get(k)!r} but this run has "
                                 f"{mine.get(k)!r}; resume with the same options")


# --------------------------------------------------------------------------------------------------- precision


@dataclass
class Transition:
    """One precision switch: bits `new` are used from iteration `step` (0-based) on."""

    step: int
    epoch: int
    old: tuple[int, int]
    new: tuple[int, int]
    reason: str
    losses: list[float] = field(default_factory=list)
    diffs: list[float] = field(default_factory=list)
    threshold: float | None = None
    scale_loss: float | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["old"], d["new"] = list(self.old), list(self.new)
        return d


@dataclass
class EpochEnd:
    """Returned by `observe` when an epoch (epoch_iters iterations) completes."""

    epoch: int
    step: int  # iterations completed
    loss: float
    transition: Transition | None = None


class StagedSchedule:
    """Stages advanced at epoch ends, with the run's loss bookkeeping and resumable state; the precision schedules
    and DFQ's cp-target schedule (train/dfq.py) differ only in what a stage holds.

    Call `observe(step, loss)` after iteration `step` (0-based): every `epoch_iters` iterations it returns an
    EpochEnd (with the transition, if the epoch caused one). Subclasses give `what` (for messages), `_config`
    (checked on resume), `_transition_from` (a saved transition back) and the `_on_step`/`_on_epoch` hooks."""

    kind = "base"
    what = "schedule"

    def __init__(self, epoch_iters: int):
        if epoch_iters < 1:
            raise FracgraphError(f"--epoch-iters must be at least 1, got {epoch_iters}")
        self.epoch_iters = int(epoch_iters)
        self.stage = 0
        self.steps_done = 0
        self.loss_sum = 0.0
        self.loss_sq_sum = 0.0
        self.epoch_noise: float | None = None   # standard error of the last epoch's mean loss
        self.transitions: list = []
        self.epoch_losses: list[float] = []

    def observe(self, step: int, loss: float) -> EpochEnd | None:
        if step != self.steps_done:
            raise FracgraphError(f"{self.what} got the loss of iteration {step} but expected {self.steps_done}"
                                 f" (losses must be reported once per iteration, in order; was the run resumed from "
                                 f"a mismatched checkpoint?)")
        self.steps_done += 1
        self.loss_sum += float(loss)
        self.loss_sq_sum += float(loss) ** 2
        self._on_step(self.steps_done)
        if self.steps_done % self.epoch_iters:
            return None
        n = self.epoch_iters
        epoch_loss = self.loss_sum / n
        var = max(0.0, self.loss_sq_sum / n - epoch_loss ** 2) * n / (n - 1) if n > 1 else float("nan")
        self.epoch_noise = math.sqrt(var / n) if n > 1 else None
        self.loss_sum = self.loss_sq_sum = 0.0
        self.epoch_losses.append(epoch_loss)
        epoch = self.steps_done // self.epoch_iters
        t = self._on_epoch(epoch, epoch_loss)
        return EpochEnd(epoch, self.steps_done, epoch_loss, t)

    def _on_step(self, steps_done: int) -> None:
        pass

    def _on_epoch(self, epoch: int, epoch_loss: float):
        return None

    # state: the subclass config is checked, the progress restored
    def _config(self) -> dict:
        return {"kind": self.kind, "epoch_iters": self.epoch_iters}

    def _transition_from(self, d: dict):
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {**self._config(), "stage": self.stage, "steps_done": self.steps_done, "loss_sum": self.loss_sum,
                "loss_sq_sum": self.loss_sq_sum,
                "epoch_losses": list(self.epoch_losses), "transitions": [t.as_dict() for t in self.transitions]}

    def load_state_dict(self, s: dict) -> None:
        cfg = self._config()
        _same_config(cfg, s, list(cfg), self.what)
        self.stage = int(s["stage"])
        self.steps_done = int(s["steps_done"])
        self.loss_sum = float(s["loss_sum"])
        self.loss_sq_sum = float(s.get("loss_sq_sum", 0.0))
        self.epoch_losses = [float(v) for v in s["epoch_losses"]]
        self.transitions = [self._transition_from(t) for t in s["transitions"]]


class PrecisionSchedule(StagedSchedule):
    """Gives the (fw, bw) bits for each iteration and consumes per-iteration train losses.

    Call `bits(step)` before iteration `step` (0-based) and `observe(step, loss)` after it."""

    what = "precision schedule"

    def __init__(self, stages: Sequence[tuple[int, int]], epoch_iters: int):
        super().__init__(epoch_iters)
        for fw, bw in stages:
            for b, what in ((fw, "FW"), (bw, "BW")):
                if not (isinstance(b, int) and 0 <= b <= 32):
                    raise FracgraphError(f"{what} precision {b!r} is not an integer number of bits in 0..32 "
                                         f"(0 = full precision)")
        self.stages = [(int(f), int(b)) for f, b in stages]

    def current(self) -> tuple[int, int]:
        return self.stages[self.stage]

    def bits(self, step: int) -> tuple[int, int]:
        """Bits for iteration `step`: transition k starts stage k+1, so past steps come from the record."""
        return self.stages[sum(1 for t in self.transitions if t.step <= step)]

    def _switch(self, epoch: int, reason: str, **info) -> Transition:
        old = self.current()
        self.stage += 1
        t = Transition(step=self.steps_done, epoch=epoch, old=old, new=self.current(), reason=reason, **info)
        self.transitions.append(t)
        log.info("precision FW/BW %d/%d -> %d/%d from iteration %d (epoch %d, %s%s)", *old, *t.new, t.step, epoch,
                 reason, f"; losses {['%.4f' % v for v in t.losses]}" if t.losses else "")
        return t

    def _config(self) -> dict:
        return {"kind": self.kind, "stages": [list(s) for s in self.stages], "epoch_iters": self.epoch_iters}

    def _transition_from(self, d: dict) -> Transition:
        return Transition(**{**d, "old": tuple(d["old"]), "new": tuple(d["new"])})


class StaticSchedule(PrecisionSchedule):
    """One (fw, bw) for the whole run (the static baselines FW-8/BW-8 etc.)."""

    kind = "static"

    def __init__(self, fw: int, bw: int, epoch_iters: int = 400):
        super().__init__([(fw, bw)], epoch_iters)


class IterationSchedule(PrecisionSchedule):
    """Switch at fixed iterations (the reference's train_base.py `--schedule it1 it2 it3`, e.g. 8190/16380/24180):
    stage k+1 starts at iteration switch_steps[k]."""

    kind = "iterations"

    def __init__(self, fw_schedule: Sequence[int], bw_schedule: Sequence[int], switch_steps: Sequence[int],
                 epoch_iters: int = 400):
        _check_lengths(fw_schedule, bw_schedule, len(switch_steps))
        steps = [int(s) for s in switch_steps]
        if any(b <= a for a, b in zip(steps, steps[1:])) or (steps and steps[0] < 1):
            raise FracgraphError(f"switch iterations {steps} must be positive and strictly increasing")
        self.switch_steps = steps
        super().__init__(list(zip(fw_schedule, bw_schedule)), epoch_iters)

    def _on_step(self, steps_done: int) -> None:
        if self.stage < len(self.switch_steps) and steps_done == self.switch_steps[self.stage]:
            self._switch(steps_done // self.epoch_iters, "fixed schedule")

    def _config(self) -> dict:
        return {**super()._config(), "switch_steps": self.switch_steps}


class PFQSchedule(PrecisionSchedule):
    """Progressive fractional quantization driven by the §2 indicator (defaults: eps 0.05, alpha 0.3, 3 switches)."""

    kind = "pfq"

    def __init__(self, fw_schedule: Sequence[int], bw_schedule: Sequence[int], epoch_iters: int = 400,
                 eps: float = 0.05, alpha: float = 0.3, num_turning_point: int | None = None, epoch_keep: int = 5,
                 scale_epochs: int = 10, noise_floor: float = 0.0):
        ntp = len(fw_schedule) - 1 if num_turning_point is None else int(num_turning_point)
        _check_lengths(fw_schedule, bw_schedule, ntp)
        super().__init__(list(zip(fw_schedule, bw_schedule)), epoch_iters)
        self.indicator = PFQIndicator(eps, alpha, epoch_keep, ntp, scale_epochs, noise_floor)

    def _on_epoch(self, epoch: int, epoch_loss: float) -> Transition | None:
        ind = self.indicator
        window = list(ind.loss[-(ind.epoch_keep - 1):]) + [epoch_loss] if not ind.done else []
        if not ind.update(epoch_loss, self.epoch_noise):
            return None
        return self._switch(epoch, f"PFQ turning point {ind.count}", losses=window, diffs=list(ind.loss_diff),
                            threshold=ind.last_threshold, scale_loss=ind.scale_loss)

    def _config(self) -> dict:
        i = self.indicator
        return {**super()._config(), "eps": i.initial_threshold, "alpha": i.decay, "epoch_keep": i.epoch_keep,
                "num_turning_point": i.num_turning_point, "scale_epochs": i.scale_epochs, "noise_floor": i.noise_floor}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "indicator": self.indicator.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        super().load_state_dict({"noise_floor": 0.0, **s})
        self.indicator.load_state_dict(s["indicator"])


def _check_lengths(fw: Sequence[int], bw: Sequence[int], switches: int) -> None:
    if len(fw) != len(bw):
        raise FracgraphError(f"FW schedule {list(fw)} and BW schedule {list(bw)} must have the same length")
    if len(fw) != switches + 1:
        raise FracgraphError(f"{switches} switches need {switches + 1} precisions per schedule, got {len(fw)} "
                             f"({list(fw)}); give one more precision than switches")


# --------------------------------------------------------------------------------------------------- LR


class LRSchedule:
    """Learning rate per iteration (0-based), a pure function of the step, so resuming needs only the config.

    - "step": x gamma at 50% and 75% of total_iters (CIFAR reference: 0.1, x0.1 at 32k and 48k of 64k)
    - "piecewise": x gamma at each explicit milestone iteration
    - "cosine": reference 'anneal_cosine', min_lr + (lr - min_lr)(1 + cos(pi t/T))/2, min_lr = lr * gamma^2
    - "constant"
    An optional constant warm-up (reference --warm_up: lr 0.01 for the first 400 iterations) comes first.
    """

    KINDS = ("step", "piecewise", "cosine", "constant")

    def __init__(self, kind: str = "step", base_lr: float = 0.1, total_iters: int = 64000,
                 milestones: Sequence[int] | None = None, gamma: float = 0.1, min_lr: float | None = None,
                 warmup_iters: int = 0, warmup_lr: float = 0.01):
        if kind not in self.KINDS:
            raise FracgraphError(f"learning-rate schedule {kind!r} is unknown; use one of {', '.join(self.KINDS)}")
        if not (base_lr > 0 and math.isfinite(base_lr)):
            raise FracgraphError(f"learning rate must be > 0, got {base_lr}")
        if total_iters < 1:
            raise FracgraphError(f"total iterations must be at least 1, got {total_iters}")
        if kind == "piecewise":
            if not milestones:
                raise FracgraphError("a piecewise learning-rate schedule needs milestone iterations")
            ms = [int(m) for m in milestones]
            if any(b <= a for a, b in zip(ms, ms[1:])) or ms[0] < 1:
                raise FracgraphError(f"learning-rate milestones {ms} must be positive and strictly increasing")
        elif kind == "step":
            ms = [int(total_iters * 0.5), int(total_iters * 0.75)]
        else:
            ms = []
        self.kind = kind
        self.base_lr = float(base_lr)
        self.total_iters = int(total_iters)
        self.milestones = ms
        self.gamma = float(gamma)
        self.min_lr = float(base_lr * gamma ** 2 if min_lr is None else min_lr)
        self.warmup_iters = int(warmup_iters)
        self.warmup_lr = float(warmup_lr)

    def lr(self, step: int) -> float:
        if step < self.warmup_iters:
            return self.warmup_lr
        if self.kind in ("step", "piecewise"):
            return self.base_lr * self.gamma ** sum(1 for m in self.milestones if step >= m)
        if self.kind == "cosine":
            t = min(step, self.total_iters) / self.total_iters
            return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))
        return self.base_lr

    __call__ = lr

    def state_dict(self) -> dict:
        return {"kind": self.kind, "base_lr": self.base_lr, "total_iters": self.total_iters,
                "milestones": list(self.milestones), "gamma": self.gamma, "min_lr": self.min_lr,
                "warmup_iters": self.warmup_iters, "warmup_lr": self.warmup_lr}

    def load_state_dict(self, s: dict) -> None:
        _same_config(self.state_dict(), s, list(self.state_dict()), "learning-rate schedule")


def schedule_from_state(state: dict[str, Any]) -> PrecisionSchedule:
    """Rebuild a precision schedule from its state_dict alone (what `fracgraph train --resume` needs)."""
    kind = state.get("kind")
    stages = state["stages"]
    fw, bw = [s[0] for s in stages], [s[1] for s in stages]
    if kind == "static":
        sched: PrecisionSchedule = StaticSchedule(fw[0], bw[0], state["epoch_iters"])
    elif kind == "iterations":
        sched = IterationSchedule(fw, bw, state["switch_steps"], state["epoch_iters"])
    elif kind == "pfq":
        sched = PFQSchedule(fw, bw, state["epoch_iters"], state["eps"], state["alpha"], state["num_turning_point"],
                            state["epoch_keep"], state["scale_epochs"], state.get("noise_floor", 0.0))
    else:
        raise FracgraphError(f"checkpoint holds an unknown precision schedule kind {kind!r}")
    sched.load_state_dict(state)
    return sched
