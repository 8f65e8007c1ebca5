"""Small-scale reproduction of FracTrain's PFQ, DFQ and FracTrain results: FP32, static FW8/BW8,
PFQ FW(3,4,6,8)/BW(6,6,8,8), DFQ at cp 3 and FracTrain (cp targets 1.5/2/2.5/3) with the same iterations each, on
CIFAR-10 from ../shared/data. The DFQ rows train their own artifacts (OUT/artifacts-dfq: gates, CIFAR options
(3,6),(4,6),(4,8),(6,8),(6,12), weights 4 bits, first conv and FC FP32; OUT/artifacts-dfq-skip: the same plus the
skip option, for the DFQ-skip row). Prints and saves a table of test accuracy and cumulative
effective GMACs (MACs x bits_a/32 x bits_b/32 over the forward, error and weight-gradient GEMMs).

    python bench/reproduce_small.py --iters 1200 --epoch-iters 60 -o bench-out/repro
    python bench/reproduce_small.py --iters 1200 --epoch-iters 60 -o bench-out/repro --rows DFQ,FracTrain
Paper scale (spec §5.6): --model resnet38 --iters 64000 --epoch-iters 400 --batch 128 (the LR steps at 50%/75%).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
ROWS = {
    "FP32": dict(schedule="static", fw=0, bw=0),
    "FW8/BW8": dict(schedule="static", fw=8, bw=8),
    "PFQ FW(3,4,6,8)/BW(6,6,8,8)": dict(schedule="pfq", fw_schedule=[3, 4, 6, 8], bw_schedule=[6, 6, 8, 8]),
    # the authors' CIFAR train_pfq.py defaults (spec §2); the README's eps 0.05/alpha 0.3 is the row above
    "PFQ-cifar FW(3,4,6,8)/BW(6,6,8,8) eps 0.15 alpha 0.4": dict(schedule="pfq", fw_schedule=[3, 4, 6, 8],
                                                                bw_schedule=[6, 6, 8, 8], eps=0.15, alpha=0.4),
    "DFQ cp3": dict(schedule="dfq", target_cp=3.0),
    "FracTrain cp(1.5,2,2.5,3)": dict(schedule="fractrain", target_cp_schedule=[1.5, 2.0, 2.5, 3.0]),
    # the CIFAR options plus the skip option (spec §3.2): its own artifacts (OUT/artifacts-dfq-skip)
    "DFQ-skip cp3 (CIFAR options + skip)": dict(schedule="dfq", target_cp=3.0, artifacts="artifacts-dfq-skip"),
}
DFQ_ARTIFACTS = {  # artifacts directory -> the DFQ options it is built with
    "artifacts-dfq": lambda DfqOptions: DfqOptions(),
    "artifacts-dfq-skip": lambda DfqOptions: DfqOptions(options=DfqOptions().options + [[0, 0]]),
}
DFQ_SCHEDULES = ("dfq", "fractrain")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default=f"imagefolder:{DEFAULT_DATA}")
    ap.add_argument("--iters", type=int, default=1200)
    ap.add_argument("--epoch-iters", type=int, default=60)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--eval-batches", type=int, default=None, help="test batches per evaluation (None = all 10,000 images)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default=None, help="comma-separated row names to (re)run, e.g. FP32,FW8/BW8; "
                    "rows already in OUT/results.json are kept (default: all)")
    ap.add_argument("-o", "--out", default="bench-out/reproduce_small")
    a = ap.parse_args()

    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.passes.dfq_gate import DfqOptions
    from fracgraph.policy import LayerPolicy
    from fracgraph.train.loop import TrainConfig, train
    from fracgraph.zoo import export

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [r.strip() for r in a.rows.split(",")] if a.rows else list(ROWS)
    unknown = [r for r in wanted if not any(k == r or k.split(" ")[0] == r for k in ROWS)]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; rows: {[k.split(' ')[0] for k in ROWS]}")
    rows = {name: row for name, row in ROWS.items() if name in wanted or name.split(" ")[0] in wanted}
    model = export(a.model, out / f"{a.model}.onnx")
    # artifacts are built once: a resumed or re-run row must train the very graph it started with
    if any(r["schedule"] not in DFQ_SCHEDULES for r in rows.values()) and not (out / "artifacts").exists():
        build_artifacts(model, out / "artifacts", BuildOptions())
    for name, options in DFQ_ARTIFACTS.items():
        if any(_artifacts(r) == name for r in rows.values()) and not (out / name).exists():
            build_artifacts(model, out / name, BuildOptions(dfq=options(DfqOptions), policy=LayerPolicy(first="fp32")))
    saved = out / "results.json"
    results = _read(saved)
    for name, row in rows.items():
        run = out / name.split(" ")[0].replace("/", "_").lower()
        art = out / _artifacts(row)
        row = {k: v for k, v in row.items() if k != "artifacts"}
        t = time.perf_counter()
        s = train(TrainConfig(run_dir=str(run), artifacts=str(art), data=a.data, iters=a.iters,
                              epoch_iters=a.epoch_iters, batch=a.batch, lr=a.lr, seed=a.seed,
                              eval_batches=a.eval_batches, **{"eps": a.eps, "alpha": a.alpha, **row}),
                  resume=(run / "checkpoints").exists())
        results[name] = {"final_acc": s["final_test_acc"], "best_acc": s["best_test_acc"],
                         "cum_eff_gmacs": s["cum_eff_gmacs"], "mean_cp": s["mean_cp"],
                         "transitions": [t_["step"] for t_ in s["transitions"]], "wall_s": time.perf_counter() - t}
        if "dfq" in s:
            results[name]["gated_cp"] = s["dfq"]["mean_gated_cp"]
        print(f"{name}: {results[name]}", flush=True)
        results = {**_read(saved), name: results[name]}     # rows another invocation finished meanwhile survive
        saved.write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    base = results.get("FW8/BW8") or next(iter(results.values()))
    lines = [f"{a.model}, CIFAR-10, {a.iters} iterations x batch {a.batch} each, seed {a.seed}; "
             f"final accuracy on all 10,000 test images", "",
             "| method | final acc % | best acc % | cum. eff. GMACs | saving vs FW8/BW8 | switches at | gated-block cp % |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        saving = 100 * (1 - r["cum_eff_gmacs"] / base["cum_eff_gmacs"])
        lines.append(f"| {name} | {100 * r['final_acc']:.2f} | {100 * r['best_acc']:.2f} | {r['cum_eff_gmacs']:.1f} | "
                     f"{saving:+.1f}% | {r['transitions'] or '-'} | "
                     f"{'-' if r.get('gated_cp') is None else format(r['gated_cp'], '.2f')} |")
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")


def _artifacts(row: dict) -> str:
    return row.get("artifacts") or ("artifacts-dfq" if row["schedule"] in DFQ_SCHEDULES else "artifacts")


def _read(saved: Path) -> dict:
    return json.loads(saved.read_text())["results"] if saved.exists() else {}


if __name__ == "__main__":
    main()
