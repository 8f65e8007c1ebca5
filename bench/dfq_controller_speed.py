"""How fast the DFQ sign controller follows a rising cp target, as a function of beta (digits, a few minutes).

FracTrain's controller adds reg * beta * C / mean(F) to the loss, reg = -1 if the batch's gated cp < target else +1
(passes/dfq_gate.py): a push of constant size in the direction of the target, so the gates move at a rate set by
beta (and the learning rate). This runs `fracgraph train --schedule fractrain --target-cp-schedule 1.5,3` on digits
with eps 10 (the PFQ indicator then switches the target at its first turning point, the same step for every beta)
and reports, per beta, the steps after the switch until the 20-step mean of the gated cp is within 10% of 3 (or
"not within the run"), the gated cp over the last 100 steps, and the final test accuracy.

    python bench/dfq_controller_speed.py -o bench-out/dfq-speed --betas 0.001 0.003 0.01 0.03 0.1
    python bench/dfq_controller_speed.py -o bench-out/dfq-speed-late --epoch-iters 60 --betas 0.01 0.1
    python bench/dfq_controller_speed.py -o bench-out/dfq-speed-late-const --epoch-iters 60 --lr-schedule constant --betas 0.01
    python bench/dfq_controller_speed.py -o bench-out/dfq-speed-late-lr --epoch-iters 60 --beta-schedule lr --betas 0.01

With --epoch-iters 60 the switch comes at step 300, after the step schedule's first LR decay (x0.1 at step 250).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def follow_steps(recs: list[dict], switch: int, target: float, window: int = 20, tol: float = 0.1) -> int | None:
    """Steps after `switch` (0-based step of the new target) until the trailing `window`-step mean of dfq_cp is
    within tol x target of target; None if never."""
    cp = np.array([r["dfq_cp"] for r in recs], np.float64)
    for end in range(switch + window, len(cp) + 1):
        if abs(cp[end - window:end].mean() - target) <= tol * target:
            return end - switch
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", default="bench-out/dfq-speed")
    ap.add_argument("--betas", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--epoch-iters", type=int, default=25)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--lr-schedule", default="step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beta-schedule", default="constant", help="constant (the authors') or lr (beta x lr0/lr)")
    a = ap.parse_args()

    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.passes.dfq_gate import DfqOptions
    from fracgraph.train.loop import TrainConfig, train
    from fracgraph.zoo import export

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    art = out / "artifacts"
    if not (art / "manifest.json").exists():
        build_artifacts(export("digitnet", out / "digitnet.onnx"), art, BuildOptions(dfq=DfqOptions()), force=True)
    rows = []
    for beta in a.betas:
        run = out / f"beta{beta:g}"
        s = train(TrainConfig(run_dir=str(run), artifacts=str(art), schedule="fractrain", target_cp_schedule=[1.5, 3.0],
                              eps=10.0, alpha=0.3, iters=a.iters, epoch_iters=a.epoch_iters, batch=a.batch, lr=a.lr,
                              lr_schedule=a.lr_schedule, seed=a.seed, beta=beta, beta_schedule=a.beta_schedule),
                  resume=(run / "checkpoints").exists())
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        switch = s["transitions"][0]["step"] if s["transitions"] else None
        n = follow_steps(recs, switch, 3.0) if switch is not None else None
        rows.append({"beta": beta, "switch": switch, "follow_steps": n,
                     "late_gated_cp": float(np.mean([r["dfq_cp"] for r in recs[-100:]])),
                     "pre_switch_gated_cp": float(np.mean([r["dfq_cp"] for r in recs[max(0, (switch or 0) - 20):switch]]))
                     if switch else None,
                     "fed_first": recs[0]["target_cp_fed"], "final_acc": s["final_test_acc"]})
        print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    print(f"digits, fractrain 1.5 -> 3 (fed {rows[0]['fed_first']:.3f} -> 3), {a.iters} steps, batch {a.batch}, "
          f"lr {a.lr} ({a.lr_schedule}), beta schedule {a.beta_schedule}, seed {a.seed}")
    print("| beta | switch at | steps to within 10% of 3 | pre-switch gated cp | gated cp, last 100 | final acc % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['beta']:g} | {r['switch']} | {r['follow_steps'] if r['follow_steps'] is not None else 'not within the run'} "
              f"| {r['pre_switch_gated_cp'] if r['pre_switch_gated_cp'] is None else format(r['pre_switch_gated_cp'], '.2f')} "
              f"| {r['late_gated_cp']:.2f} | {100 * r['final_acc']:.2f} |")


if __name__ == "__main__":
    main()
