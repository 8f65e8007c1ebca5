"""DFQ and FracTrain training: the cp target schedule, and the bookkeeping of the gates' choices per step.

- `dfq`: one cp target for the whole run (cifar/train_dfq.py `--target_ratio`).
- `fractrain`: the PFQ indicator (spec §2, on the epoch mean of the training loss, which includes the cost term as
  in cifar/train_frac.py) advances the target through a list, e.g. 1.5 -> 2 -> 2.5 -> 3 (spec §3.5); the option
  set stays fixed, only the target changes.

The sign controller itself (reg = -1 if cp < target else +1) runs in the graph on the batch's own cp, so the host
only feeds the target and beta each step. The target it feeds is clamped into what the options can reach
(`TargetClamp`): a target at or below the floor (every block on its cheapest option) never sees cp < target, so reg
stays +1, the softmax saturates on the cheapest option and its gradient p(1 - p) vanishes; a later reachable
target then cannot move it (FracTrain's 1.5 against the CIFAR options' 1.76 floor did exactly that). Above the
ceiling it is the mirror image. The graph reports the choice counts per block and option; the cost of
a step is computed from them exactly (per sample in per-sample mode), and the trace gets the bits per block
(per-sample mode: the batch mean of each column, which `estimate` treats as one precision per block).

Static blocks (passes/dfq_gate.py `static_first`, `static`: the first GEMM by default) have no gate: the loop feeds
their rows of the precision input the run's --fw/--bw (`bits_input`), and the step's whole-network cost, the
trace and the cumulative MACs count them at those bits (`ChoiceRecord`). The gated cp (the controller's target,
`TargetClamp`, `mean_gated_cp`) covers the gated blocks only, as the authors count it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ..errors import FracgraphError
from ..manifest import Manifest
from .schedules import PFQIndicator, StagedSchedule

SCHEDULES = ("dfq", "fractrain")


@dataclass
class TargetTransition:
    """The cp target `new` applies from iteration `step` (0-based) on."""

    step: int
    epoch: int
    old: float
    new: float
    reason: str
    losses: list[float] = field(default_factory=list)
    diffs: list[float] = field(default_factory=list)
    threshold: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class TargetSchedule(StagedSchedule):
    """The cp target per iteration; `observe` takes each iteration's training loss (as PrecisionSchedule does)."""

    what = "cp-target schedule"

    def __init__(self, kind: str, targets: Sequence[float], epoch_iters: int, eps: float = 0.05, alpha: float = 0.3,
                 noise_floor: float = 0.0):
        if kind not in SCHEDULES:
            raise FracgraphError(f"cp-target schedule {kind!r} is unknown; use {' or '.join(SCHEDULES)}")
        targets = [float(t) for t in targets]
        if not targets or any(not (0 < t <= 100 and math.isfinite(t)) for t in targets):
            raise FracgraphError(f"cp targets {targets} must be percentages in (0, 100]")
        if kind == "dfq" and len(targets) != 1:
            raise FracgraphError("--schedule dfq takes one --target-cp; use --schedule fractrain for a list")
        super().__init__(epoch_iters)
        self.kind = kind
        self.targets = targets
        self.indicator = PFQIndicator(eps, alpha, num_turning_point=len(targets) - 1, noise_floor=noise_floor) \
            if kind == "fractrain" else None

    def target(self, step: int) -> float:
        return self.targets[sum(1 for t in self.transitions if t.step <= step)]

    def _on_epoch(self, epoch: int, epoch_loss: float) -> TargetTransition | None:
        ind = self.indicator
        if ind is None:
            return None
        window = list(ind.loss[-(ind.epoch_keep - 1):]) + [epoch_loss] if not ind.done else []
        if not ind.update(epoch_loss, self.epoch_noise):
            return None
        old = self.targets[self.stage]
        self.stage += 1
        t = TargetTransition(self.steps_done, epoch, old, self.targets[self.stage],
                             f"PFQ turning point {ind.count}", window, list(ind.loss_diff), ind.last_threshold)
        self.transitions.append(t)
        return t

    def _config(self) -> dict:
        cfg = {"kind": self.kind, "targets": self.targets, "epoch_iters": self.epoch_iters}
        if self.indicator is not None:
            cfg.update(eps=self.indicator.initial_threshold, alpha=self.indicator.decay,
                       noise_floor=self.indicator.noise_floor)
        return cfg

    def _transition_from(self, d: dict) -> TargetTransition:
        return TargetTransition(**d)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "indicator": self.indicator.state_dict() if self.indicator is not None else None}

    def load_state_dict(self, s: dict) -> None:
        super().load_state_dict({"noise_floor": 0.0, **s} if self.indicator is not None else s)
        if self.indicator is not None:
            self.indicator.load_state_dict(s["indicator"])


class TargetClamp:
    """The cp target the graph is fed: the schedule's, clamped into [floor + margin, ceiling] of the gated cp.

    floor/ceiling: every block on its cheapest/dearest option (skip only where the block can skip), weighted as
    the cost term weighs blocks. At the floor itself the controller would still be stuck (cp < target never
    holds), so the lower bound sits MARGIN of the range above it: the lowest target at which both signs of reg
    occur, so the gate keeps a gradient and follows the next target."""

    MARGIN = 0.02

    def __init__(self, manifest: Manifest, clamps: list | None = None):
        d = manifest.dfq
        T, T32 = gated_cost_table(d)
        skip, skippable = d.get("skip_index"), d.get("skippable") or [False] * len(T32)
        lo, hi = [], []
        for l, can in enumerate(skippable):
            allowed = [u for k, u in enumerate(T[l]) if k != skip or can]
            lo.append(min(allowed))
            hi.append(max(allowed))
        self.floor = float(100 * np.sum(lo) / T32.sum())
        self.ceiling = float(100 * np.sum(hi) / T32.sum())
        self.clamps: list[dict] = list(clamps or [])     # one entry per (requested target) that was clamped

    def fed(self, target: float) -> float:
        return float(min(max(target, self.floor + self.MARGIN * (self.ceiling - self.floor)), self.ceiling))

    def note(self, step: int, target: float) -> dict | None:
        """The clamp record (and a one-line message) the first time a requested target is clamped, else None."""
        fed = self.fed(target)
        if fed == target or any(c["requested"] == target for c in self.clamps):
            return None
        side = "at or below the floor" if target < fed else "above the ceiling"
        c = {"step": step, "requested": target, "fed": fed, "floor": self.floor, "ceiling": self.ceiling,
             "message": f"cp target {target:g} is {side} of what the options reach ({self.floor:.3g}..{self.ceiling:.3g}, "
                        f"gated blocks); the controller is fed {fed:.3g}"}
        self.clamps.append(c)
        return c


def gated_cost_table(d: dict) -> tuple[np.ndarray, np.ndarray]:
    """(T [n_blocks, K], T32 [n_blocks]) of a manifest's DFQ section: the controller's cost of block l under option k
    and at FP32, in its unit (`cost_unit`); the gated cp is 100 sum_l T[l, k_l] / sum_l T32[l]. MACs: T = F_l x
    (a w + g w + a g)/1024 for the block's weight GEMMs and F_l x (a a + g a + a g)/1024 for its activation x
    activation GEMMs (attention; `act_frac` of its MACs, absent = 0 in artifacts from before it), T32 = 3 F_l, the
    graph's cost term exactly; a hardware cost (`quantize --dfq --cost`): the table it stored."""
    F = np.array(d["F"], np.float64)
    if d.get("cost_table") is not None:
        try:
            T, T32 = np.array(d["cost_table"], np.float64), np.array(d.get("cost_fp32"), np.float64)
        except (TypeError, ValueError):
            T = T32 = np.zeros(0)
        if T.shape != (len(F), len(d["options"])) or T32.shape != (len(F),) or not (T32 > 0).all() or (T < 0).any():
            raise FracgraphError("manifest.json: the DFQ cost table (dfq.cost_table, dfq.cost_fp32) does not fit the "
                                 "blocks and options, or is not positive; rebuild the artifacts with `fracgraph "
                                 "quantize --dfq --cost ...`")
        return T, T32
    uw = np.array(d["unit_costs"], np.float64).sum(1)
    frac = np.array(d.get("act_frac") or [0.0] * len(F), np.float64).reshape(-1, 1)
    if frac.shape != (len(F), 1) or (frac < 0).any() or (frac > 1).any() or (frac > 0).any() and "act_unit_costs" not in d:
        raise FracgraphError("manifest.json: dfq.act_frac (the blocks' share of activation x activation MACs) does "
                             "not fit the blocks; rebuild the artifacts with `fracgraph quantize --dfq`")
    ua = np.array(d.get("act_unit_costs") or d["unit_costs"], np.float64).sum(1)
    return F[:, None] * (uw[None, :] + frac * (ua - uw)[None, :]), 3 * F


def cost_label(d: dict | None) -> str:
    """What the DFQ controller's cp counts: 'effective MACs' or e.g. 'bitfusion energy'."""
    if not d or d.get("cost", "macs") == "macs":
        return "effective MACs"
    return f"{d['cost']} {d['cost_metric']}"


def require_dfq(manifest: Manifest, schedule: str, where: str) -> dict:
    """The manifest's DFQ section, or a one-line error when the schedule and the artifacts do not fit together."""
    if schedule in SCHEDULES and manifest.dfq is None:
        raise FracgraphError(f"{where}: --schedule {schedule} needs DFQ artifacts; build them with "
                             f"`fracgraph quantize MODEL -o ART --dfq`")
    if schedule not in SCHEDULES and manifest.dfq is not None:
        raise FracgraphError(f"{where}: these are DFQ artifacts (the gates choose the bits); train them with "
                             f"--schedule dfq or fractrain")
    return manifest.dfq


def gated_blocks(manifest: Manifest) -> list[int]:
    """Indices of the gated blocks, in gate order (artifacts from before static blocks: every block)."""
    return list(manifest.dfq.get("gated", range(manifest.n_blocks)))


def static_blocks(manifest: Manifest) -> list[int]:
    """Indices of the blocks without a gate (quantized at the run's static --fw/--bw)."""
    gated = set(gated_blocks(manifest))
    return [l for l in range(manifest.n_blocks) if l not in gated]


def bits_input(manifest: Manifest, fw: float = 8, bw: float = 8) -> np.ndarray:
    """The precision input of DFQ artifacts: a gated block's row is read only in its weight column (the static
    weight bits); a static block's row is read whole: act/weight at `fw`, grad at `bw`, as the plain artifacts."""
    bits = np.zeros((manifest.n_blocks, 3), np.float32)
    bits[:, 1] = manifest.dfq["weight_bits"]
    bits[static_blocks(manifest)] = [fw, fw, bw]
    return bits


class ChoiceRecord:
    """Per-block choice histogram over the run and the exact cost of each step from the gates' counts."""

    def __init__(self, manifest: Manifest, meter, hist: list | None = None, static_bits: tuple = (8, 8)):
        d = manifest.dfq
        self.gated = np.array(gated_blocks(manifest), np.int64)
        self.static = np.array(static_blocks(manifest), np.int64)
        fw, bw = (float(v) for v in static_bits)
        self.static_row = np.array([fw, fw, bw], np.float64)
        self.options = np.array(d["options"], np.float64)            # [K, 2] act, grad bits
        self.F = np.array(d["F"], np.float64)                         # the cost term's block weights
        self.table, self.table_fp32 = gated_cost_table(d)            # the controller's cost, its unit
        self.w = float(d["weight_bits"])
        self.meter = meter
        n, K = len(self.gated), len(self.options)
        self.skip = d.get("skip_index")
        # MACs of each block's shortcut GEMMs (the downsample conv): a skipped block still computes them, FP32
        macs = {o["name"]: o["macs"] for o in manifest.ops}
        self.shortcut_macs = np.array([sum(macs[g] for g in ops) for ops in d.get("shortcut_ops") or [[]] * n],
                                      np.float64).reshape(n)
        self.hist = np.array(hist, np.int64) if hist is not None else np.zeros((n, K), np.int64)
        if self.hist.shape != (n, K):
            raise FracgraphError(f"checkpoint choice histogram has shape {self.hist.shape}, expected {(n, K)}")

    def step(self, counts: np.ndarray, batch: int) -> tuple[dict, np.ndarray, np.ndarray]:
        """(cost dict like CostMeter.step, bits [n_blocks, 3] and active share [n_blocks] for the trace) of a step
        with these counts ([n_gated, K]). A skipped sample costs nothing in its block but the shortcut GEMMs, at
        FP32; the bits are the mean over the samples that ran the block (0 when none did). Static blocks run at
        the static bits for every sample; FP32 GEMMs at 32 bits."""
        counts = np.rint(np.asarray(counts, np.float64)).astype(np.int64)
        if counts.shape != self.hist.shape or (counts.sum(1) != batch).any():
            raise FracgraphError(f"the gates' choice counts {counts.tolist()} do not cover the batch of {batch}")
        self.hist += counts
        frac = counts / batch                                        # [n, K] share of samples per option
        a, g, w = self.options[:, 0] / 32, self.options[:, 1] / 32, self.w / 32
        G, S = self.gated, self.static
        m_all, fp = self.meter.block_macs, self.meter.fp32_macs
        mw_all = getattr(self.meter, "weight_macs", m_all)
        maa_all = getattr(self.meter, "act_act_macs", 0 * m_all)
        m, mw, maa = m_all[G], mw_all[G], maa_all[G]
        skipped = frac[:, self.skip] if self.skip is not None else np.zeros(len(frac))
        fp = fp + float(self.shortcut_macs @ skipped)
        # static blocks at the static bits for every sample (0 bits = FP32, as CostMeter)
        sa, sw, sg = np.where(self.static_row > 0, self.static_row, 32.0) / 32
        ms, msw, msaa = float(m_all[S].sum()), float(mw_all[S].sum()), float(maa_all[S].sum())
        # attention's activation x activation GEMMs: act bits on both operands (a x a forward, g x a error)
        fw = float(mw @ (frac @ (a * w)) + maa @ (frac @ (a * a)) + msw * sa * sw + msaa * sa * sa + fp) * batch
        err = float(mw @ (frac @ (g * w)) + maa @ (frac @ (g * a)) + msw * sg * sw + msaa * sg * sa + fp) * batch
        wg = float(m @ (frac @ (a * g)) + ms * sa * sg + fp) * batch
        cost = {"fw": fw, "err": err, "wgrad": wg, "cp": 100 * (fw + err + wg) / (3 * self.meter.total * batch)}
        n_all = len(self.meter.block_macs)
        active = np.ones(n_all)
        active[self.gated] = 1.0 - skipped
        ran = np.where(active[self.gated] > 0, active[self.gated], 1.0)
        bits = np.tile(self.static_row, (n_all, 1))
        bits[self.gated] = np.stack([frac @ self.options[:, 0] / ran, np.where(active[self.gated] > 0, self.w, 0.0),
                                     frac @ self.options[:, 1] / ran], 1)
        return cost, bits.astype(np.float32), active.astype(np.float32)

    def histogram(self, block_names: list[str]) -> list[dict]:
        from ..passes.dfq_gate import option_label

        labels = [option_label(o) for o in self.options]
        names = [block_names[l] for l in self.gated]     # gated blocks only: a static block has no choice
        return [{"block": name, "counts": dict(zip(labels, row.tolist()))} for name, row in zip(names, self.hist)]

    def mean_gated_cp(self) -> float | None:
        """The controlled cp (gated blocks, in the cost table's unit: effective MACs with the cost term's block
        weights, or a hardware model's energy/latency) averaged over every sample of the run."""
        n = self.hist.sum(1, keepdims=True)
        if not n.all():
            return None
        return float(100 * np.sum((self.hist / n) * self.table) / self.table_fp32.sum())
