"""Replay FracTrain's PFQ indicator offline on recorded training losses, to see how epoch length, eps and alpha
decide when it switches, and how much of that is noise.

The indicator (spec §2, `fracgraph.train.schedules.PFQIndicator`) compares epoch-mean train losses: a turning point
needs the 4 older losses of a 5-epoch window all within `threshold x scale_loss` of the newest, with thresholds
eps, eps*alpha, eps*alpha^2 for the three switches. An epoch-mean loss carries noise: with per-step noise sigma
(the spread of the step losses around their trend) an epoch of E iterations has noise sigma/sqrt(E), so at E=40
it is sqrt(10) = 3.2x the noise of the paper's E=400. This script measures sigma from a run's metrics.jsonl and
replays the real indicator on the run's losses for a grid of (epoch iterations, eps, alpha), printing the
iterations at which it would switch and, per threshold, the chance that pure noise alone lets 4 differences
pass (so a threshold far below the noise can never fire, whatever the loss does).

It reads the training loss only (never the test set), so it is a fair way to choose eps/alpha/epoch length.
Caveat: the replay uses the losses of the recorded run (e.g. FW8/BW8); under PFQ the losses of the low-precision
stages are higher and flatten at other times, so the switch steps are indicative, the noise figures are not.

    python bench/pfq_replay.py RUN/metrics.jsonl [--epoch-iters 40,100,200,400] [--eps 0.05,0.15] [--alpha 0.3,0.4]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np


def losses(path: str) -> np.ndarray:
    with open(path) as f:
        return np.array([json.loads(line)["loss"] for line in f if line.strip()], float)


def step_noise(loss: np.ndarray, window: int = 41) -> float:
    """Robust spread of the step losses around their trend (centred moving median): 1.4826 x MAD of residuals."""
    h = window // 2
    trend = np.array([np.median(loss[max(0, i - h): i + h + 1]) for i in range(len(loss))])
    r = (loss - trend)[h: len(loss) - h]
    return float(1.4826 * np.median(np.abs(r - np.median(r)))) if len(r) else float("nan")


def pass_probability(threshold_abs: float, sigma_epoch: float, trials: int = 20000, seed: int = 0) -> float:
    """P(all 4 |L_i - L_5| <= threshold) for 5 i.i.d. N(0, sigma_epoch^2) epoch losses (a flat loss curve)."""
    rng = np.random.default_rng(seed)
    L = rng.normal(0, sigma_epoch, (trials, 5))
    return float(np.mean(np.all(np.abs(L[:, :4] - L[:, 4:]) <= threshold_abs, axis=1)))


def replay(loss: np.ndarray, epoch_iters: int, eps: float, alpha: float, noise_floor: float = 0.0):
    """The switch iterations of fracgraph's PFQ schedule (train --pfq-noise-floor) fed these losses."""
    from fracgraph.train.schedules import PFQSchedule

    sched = PFQSchedule([3, 4, 6, 8], [6, 6, 8, 8], epoch_iters, eps=eps, alpha=alpha, noise_floor=noise_floor)
    for i, v in enumerate(loss):
        sched.observe(i, float(v))
    return [t.step for t in sched.transitions], sched.indicator.scale_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", help="a run's metrics.jsonl")
    ap.add_argument("--epoch-iters", default="40,100,200,400")
    ap.add_argument("--eps", default="0.05,0.15")
    ap.add_argument("--alpha", default="0.3,0.4")
    ap.add_argument("--noise-floor", type=float, default=2.0, help="train --pfq-noise-floor for the second column")
    a = ap.parse_args()
    loss = losses(a.metrics)
    sigma = step_noise(loss)
    print(f"{a.metrics}: {len(loss)} steps; per-step loss noise sigma = {sigma:.4f} (1.4826 MAD around a 41-step "
          f"moving median)")
    grid_e = [int(v) for v in a.epoch_iters.split(",")]
    grid_eps = [float(v) for v in a.eps.split(",")]
    grid_alpha = [float(v) for v in a.alpha.split(",")]
    print(f"\n| epoch iters | eps | alpha | scale_loss | switches at (authors' thresholds) | switches at (noise floor "
          f"{a.noise_floor}) | P(noise passes) at eps, eps*a, eps*a^2 |")
    print("|---|---|---|---|---|---|---|")
    for E in grid_e:
        sig_e = sigma / math.sqrt(E)
        for eps in grid_eps:
            for alpha in grid_alpha:
                sw, scale = replay(loss, E, eps, alpha)
                sw_floor, _ = replay(loss, E, eps, alpha, a.noise_floor)
                probs = [pass_probability(eps * alpha ** k * scale, sig_e) for k in range(3)]
                print(f"| {E} | {eps} | {alpha} | {scale:.3f} | {sw or '-'} | {sw_floor or '-'} | "
                      f"{', '.join(f'{p:.3f}' for p in probs)} |")


if __name__ == "__main__":
    main()
