"""Character GPT on tinyshakespeare under FP32, FW8/BW8, PFQ, DFQ and FracTrain (issue 16 item 7).

The model is `fracgraph zoo gpt` (4 layers, 4 heads, width 128, context 64, vocab 65), trained with AdamW
(lr 1e-3, cosine) at batch 12 on `../shared/data/tinyshakespeare.txt` (first 90% train, last 10% validation), the
configuration ../shared/data/README.md quotes (about 1.88 validation nats/char after 2,000 iterations in FP32).
Every row trains the same iterations from the same initial weights and data order; the table has the final
validation loss (all validation windows), cumulative effective GMACs (forward, error and weight-gradient GEMMs at
the bits used) and the saving against FW8/BW8. A step-time row compares the FW8/BW8 fracgraph step with the same
model in PyTorch eager FP32 (AdamW), interleaved rounds in this process, reported as a range of ratios.

Resumable: each row is an ordinary `fracgraph train` run in OUT/runs/NAME; a finished row (summary.json with the
same settings) is kept, an interrupted one resumes from its checkpoint. `--rows` re-runs only some rows.

    python bench/lm_small.py -o bench-out/lm --iters 2000            # the issue's size (hours on 2 shared cores)
    python bench/lm_small.py -o bench-out/lm --iters 300 --epoch-iters 25 --eval-batches 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def rows(args) -> dict[str, dict]:
    """name -> (artifact kind, train options)."""
    t = [float(v) for v in args.fractrain_targets.split(",")]
    return {
        "FP32": {"art": "plain", "schedule": "static", "fw": 0, "bw": 0},
        "FW8/BW8": {"art": "plain", "schedule": "static", "fw": 8, "bw": 8},
        "PFQ FW(4,6,8)/BW(8,8,8)": {"art": "plain", "schedule": "pfq", "fw_schedule": [4, 6, 8],
                                    "bw_schedule": [8, 8, 8], "eps": args.eps, "alpha": args.alpha},
        f"DFQ cp{args.target_cp:g}": {"art": "dfq", "schedule": "dfq", "target_cp": args.target_cp, "beta": args.beta},
        f"FracTrain cp({args.fractrain_targets})": {"art": "dfq", "schedule": "fractrain", "target_cp_schedule": t,
                                                   "beta": args.beta, "eps": args.eps, "alpha": args.alpha},
    }


def build(out: Path, args) -> dict[str, Path]:
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.passes.dfq_gate import DfqOptions, parse_options
    from fracgraph.policy import LayerPolicy
    from fracgraph.zoo import export_gpt

    model = out / "gpt.onnx"
    if not model.exists():
        export_gpt(model, seed=0)
    arts = {"plain": out / "art", "dfq": out / "art-dfq"}
    common = dict(optimizer="adamw", weight_decay=args.weight_decay)
    if not (arts["plain"] / "manifest.json").exists():
        build_artifacts(model, arts["plain"], BuildOptions(**common), force=True)
    if not (arts["dfq"] / "manifest.json").exists():
        # every block GEMM gated, the first one included (a GPT's first GEMM is not an image stem)
        dfq = DfqOptions(options=parse_options(args.options), weight_bits=args.weight_bits)
        build_artifacts(model, arts["dfq"], BuildOptions(**common, dfq=dfq, policy=LayerPolicy(first="quantize")),
                        force=True)
    return arts


def train_row(name: str, spec: dict, arts: dict, out: Path, args) -> dict:
    from fracgraph.train.loop import TrainConfig, train

    run = out / "runs" / name.replace("/", "_").replace(" ", "_")
    opts = {k: v for k, v in spec.items() if k != "art"}
    cfg = TrainConfig(run_dir=str(run), artifacts=str(arts[spec["art"]]), data=f"text:{args.data}", iters=args.iters,
                      epoch_iters=args.epoch_iters, batch=args.batch, lr=args.lr, lr_schedule="cosine", seed=0,
                      eval_batches=args.eval_batches, threads=args.threads, **opts)
    summary_file = run / "summary.json"
    if summary_file.exists():
        s = json.loads(summary_file.read_text())
        if s["config"]["iters"] == args.iters and s["config"]["schedule"] == spec["schedule"]:
            return s
        raise SystemExit(f"{run} holds a finished run with other settings; move it away or use another -o")
    resume = (run / "checkpoints").exists()
    t0 = time.time()

    def progress(rec):
        if "val_loss" in rec:
            print(f"  {name} step {rec['step']}: val {rec['val_loss']:.4f} train {rec['loss']:.4f} "
                  f"FW{rec['fw']}/BW{rec['bw']} cum {rec['cum_gmacs']:.1f} GMACs ({time.time() - t0:.0f} s)", flush=True)

    return train(cfg, resume=resume, progress=progress)


def before_artifacts(arts: dict, args) -> Path:
    """The plain artifacts built with the mask lowering and the gather-grad pass off (the graph the step ran
    before them)."""
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.lowering.base import LOWERINGS

    out = arts["plain"].with_name("art-where-mask")
    if not (out / "manifest.json").exists():
        where = LOWERINGS.pop("Where")
        try:
            build_artifacts(arts["plain"].parent / "gpt.onnx", out,
                            BuildOptions(optimizer="adamw", weight_decay=args.weight_decay,
                                         skip_passes=("gather-grad",)), force=True)
        finally:
            LOWERINGS["Where"] = where
    return out


def step_time(arts: dict, args, rounds: int, steps: int) -> dict:
    """FW8/BW8 fracgraph step vs PyTorch eager FP32 (AdamW) on the same model and batch, interleaved."""
    import torch

    from fracgraph.runtime import TrainSession
    from fracgraph.zoo import build_gpt

    torch.set_num_threads(args.threads or 2)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65, (args.batch, 64)).astype(np.int64)
    y = rng.integers(0, 65, (args.batch, 64)).astype(np.int64)
    sess = TrainSession(arts["plain"], threads=args.threads, seed=0)
    # the step as it was before issue 16's speed fixes: the causal mask's Where kept (lowering/mask.py off), the
    # embedding's GatherGrad kept (passes/gather_grad.py off) and no denormal flush (SESSION_TUNING["flush_denormals"])
    before = TrainSession(before_artifacts(arts, args), threads=args.threads, seed=0,
                    tuning={"flush_denormals": False})
    bits = np.tile(np.array([8, 8, 8], np.float32), (sess.manifest.n_blocks, 1))
    model = build_gpt(seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=args.weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def torch_step():
        loss = torch.nn.functional.cross_entropy(model(xt).flatten(0, 1), yt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):   # warm-up
        sess.step(x, y, bits, 1e-3)
        before.step(x, y, bits, 1e-3)
        torch_step()
    ours, old, theirs = [], [], []
    for _ in range(rounds):
        for times, step in ((ours, lambda: sess.step(x, y, bits, 1e-3)),
                            (old, lambda: before.step(x, y, bits, 1e-3)), (theirs, torch_step)):
            t = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t) / steps)
    ratios = [a / b for a, b in zip(ours, theirs)]
    now_before = [a / b for a, b in zip(ours, old)]
    return {"fracgraph_fw8bw8_s": statistics.median(ours), "pytorch_fp32_s": statistics.median(theirs),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "ratio_median": statistics.median(ratios),
            "before_s": statistics.median(old), "now_before_min": min(now_before), "now_before_max": max(now_before),
            "now_before_median": statistics.median(now_before), "load_avg": os.getloadavg()[0],
            "rounds": rounds, "steps_per_round": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default="bench-out/lm")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--epoch-iters", type=int, default=100, help="PFQ/FracTrain indicator epoch, eval, checkpoint")
    ap.add_argument("--eval-batches", type=int, default=20, help="validation batches per intermediate evaluation")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--options", default="3/6,4/6,4/8,6/8,8/8", help="DFQ options FW/BW")
    ap.add_argument("--weight-bits", type=int, default=8)
    ap.add_argument("--target-cp", type=float, default=4.0)
    ap.add_argument("--fractrain-targets", default="3,3.5,4,4.5")
    ap.add_argument("--beta", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", default=None, help="comma-separated row-name prefixes to run (a finished row is read "
                    "back, an interrupted one resumed); the other rows in results.json are kept")
    ap.add_argument("--step-rounds", type=int, default=5, help="step-time rounds (0: skip the step-time comparison)")
    ap.add_argument("--step-steps", type=int, default=5)
    args = ap.parse_args(argv)
    if not Path(args.data).is_file():
        print(f"{args.data} is absent; the bench needs tinyshakespeare.txt", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arts = build(out, args)
    table = rows(args)
    wanted = [r.strip() for r in args.rows.split(",")] if args.rows else None
    results = {}
    if (out / "results.json").exists():
        results = json.loads((out / "results.json").read_text()).get("rows", {})
    for name, spec in table.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        print(f"row {name}", flush=True)
        s = train_row(name, spec, arts, out, args)
        results[name] = {k: s.get(k) for k in ("final_val_loss", "best_val_loss", "final_val_ppl", "cum_eff_gmacs",
                                               "fp32_gmacs", "mean_cp", "transitions", "wall_s", "steps")}
        if "dfq" in s:
            results[name]["gated_cp"] = s["dfq"]["mean_gated_cp"]
        _write(out, args, results, None)
    timing = step_time(arts, args, args.step_rounds, args.step_steps) if args.step_rounds > 0 else None
    _write(out, args, results, timing)
    print((out / "results.md").read_text())
    return 0


def _write(out: Path, args, results: dict, timing: dict | None) -> None:
    """results.md/json; rows and the step time another process (--rows) wrote meanwhile are kept."""
    if (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        results = {**old.get("rows", {}), **results}
        timing = timing or old.get("step_time")
    results = {n: results[n] for n in rows(args) if n in results}    # table order
    base = results.get("FW8/BW8", {}).get("cum_eff_gmacs")
    lines = [f"GPT 4x4x128, context 64, batch {args.batch}, {args.iters} iterations, tinyshakespeare, AdamW lr "
             f"{args.lr:g} cosine, seed 0", "",
             "| method | final val loss (nats/char) | best val loss | val ppl | cum. eff. GMACs | saving vs FW8/BW8 | "
             "mean cp % | switches at | gated cp % |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        sav = f"{100 * (1 - r['cum_eff_gmacs'] / base):+.1f}%" if base else "-"
        sw = [t["step"] for t in r.get("transitions") or []] or "-"
        gated = f"{r['gated_cp']:.2f}" if r.get("gated_cp") is not None else "-"
        lines.append(f"| {name} | {r['final_val_loss']:.4f} | {r['best_val_loss']:.4f} | {r['final_val_ppl']:.2f} | "
                     f"{r['cum_eff_gmacs']:.1f} | {sav} | {r['mean_cp']:.2f} | {sw} | {gated} |")
    if timing:
        lines += ["", f"Step time (batch {args.batch}, {timing['rounds']} interleaved rounds of "
                      f"{timing['steps_per_round']} steps): fracgraph FW8/BW8 {1000 * timing['fracgraph_fw8bw8_s']:.0f} "
                      f"ms, PyTorch eager FP32 {1000 * timing['pytorch_fp32_s']:.0f} ms (medians); ratio "
                      f"{timing['ratio_min']:.2f}-{timing['ratio_max']:.2f}x (median {timing['ratio_median']:.2f}x)"]
        if "before_s" in timing:
            lines[-1] += (f"; the step before issue 16's speed fixes (mask Where, GatherGrad, no denormal flush) "
                          f"{1000 * timing['before_s']:.0f} ms (now/before {timing['now_before_min']:.2f}-"
                          f"{timing['now_before_max']:.2f}x, median {timing['now_before_median']:.2f}x); load "
                          f"average {timing['load_avg']:.1f}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": results, "step_time": timing}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
