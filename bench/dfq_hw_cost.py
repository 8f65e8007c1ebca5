"""Hardware-aware DFQ against MAC-costed DFQ (issue 17 item 5): resnet20 on CIFAR-10, DFQ with the controller's cost
table in effective MACs (`quantize --dfq`, target cp in % of FP32 MACs) and in Bit-Fusion energy (`quantize --dfq
--cost bitfusion`, target in % of the gated blocks' FP32 Bit-Fusion energy); then the Bit-Fusion energy of each run
(`estimate --trace`, whole step and GEMMs only) beside its accuracy.

    python bench/dfq_hw_cost.py --rows macs -o bench-out/dfqhw          # one row per process, resumable
    python bench/dfq_hw_cost.py --rows bitfusion -o bench-out/dfqhw
    python bench/dfq_hw_cost.py --table -o bench-out/dfqhw              # the table from whatever the runs reached

A killed row resumes from its checkpoint when started again. `--table` reads each run's metrics as far as they got
(a run that has not finished is labelled with its step count; its energy is estimated over the steps done).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
ROWS = {"macs": {"cost": "macs", "target": 3.0}, "bitfusion": {"cost": "bitfusion", "target": 11.0}}


def build(out: Path, model: Path, cost: str) -> Path:
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.passes.dfq_gate import DfqOptions
    from fracgraph.policy import LayerPolicy

    art = out / f"artifacts-{cost}"
    if not art.exists():   # built once: a resumed row must train the very graph it started with
        build_artifacts(model, art, BuildOptions(dfq=DfqOptions(cost=cost), policy=LayerPolicy(first="fp32")))
    return art


def run_row(a, name: str) -> None:
    from fracgraph.train.loop import TrainConfig, train
    from fracgraph.zoo import export

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "resnet20.onnx"
    if not model.exists():
        export("resnet20", model)
    row = ROWS[name]
    target = a.target.get(name, row["target"])
    art = build(out, model, row["cost"])
    run = out / f"run-{name}"
    s = train(TrainConfig(run_dir=str(run), artifacts=str(art), data=a.data, schedule="dfq", target_cp=target,
                          iters=a.iters, epoch_iters=a.epoch_iters, batch=128, lr=0.1, seed=a.seed,
                          eval_batches=a.eval_batches, threads=a.threads),
              resume=(run / "checkpoints").exists())
    print(json.dumps({"row": name, "final_acc": s["final_test_acc"], "mean_gated_cp": s["dfq"]["mean_gated_cp"]}))


def table(a) -> str:
    import numpy as np

    from fracgraph.analysis.estimate import Estimator, load_source
    from fracgraph.hwmodels import get_model
    from fracgraph.train.dfq import gated_cost_table
    from fracgraph.manifest import Manifest

    out = Path(a.out)
    lines = ["| row | controller cost | target | steps | last test acc % (eval) | mean MAC cp % | mean gated cp (own unit) "
             "| gated MAC cp % | gated Bit-Fusion energy cp % | Bit-Fusion energy, whole run (J) | GEMMs only (J) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in ROWS.items():
        run = out / f"run-{name}"
        art = out / f"artifacts-{row['cost']}"
        if not (run / "metrics.jsonl").exists():
            lines.append(f"| {name} | {row['cost']} | | not started | | | | | | | |")
            continue
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        accs = [r for r in recs if "test_acc" in r]
        m = Manifest.read(art)
        # the gated blocks' Bit-Fusion energy cp of the choices made, from the Bit-Fusion table of the same graph
        bf = out / "artifacts-bitfusion"
        T, T32 = gated_cost_table(Manifest.read(bf).dfq)
        opts = [tuple(o) for o in m.dfq["options"]]
        def gated(T, T32):
            return np.mean([100 * sum(T[l, opts.index((int(round(b[0])), int(round(b[2]))))]
                                      for l, b in enumerate(r["bits"])) / T32.sum() for r in recs])
        e_cp = gated(T, T32)
        m_cp = gated(*gated_cost_table({**m.dfq, "cost_table": None}))   # gated MAC cp
        # the run's Bit-Fusion energy from its per-step bits (the trace is written at the end; metrics as they are)
        src = load_source(art, 128)
        est = Estimator(src.step, get_model("bitfusion"))
        bits = np.array([r["bits"] for r in recs], np.float64)
        uniq, inv = np.unique(bits.reshape(len(bits), -1), axis=0, return_inverse=True)
        # weigh each distinct configuration by how many steps used it
        counts = np.bincount(inv.reshape(-1), minlength=len(uniq))
        tot = gem = 0.0
        for u in range(len(uniq)):
            r1 = est.run_cost(np.array([0]), uniq[u].reshape(1, -1, 3), int(counts[u]))
            tot += r1["energy_total_pj"]
            gem += r1["gemm_energy_pj"]
        acc = f"{100 * accs[-1]['test_acc']:.2f} (step {accs[-1]['step']})" if accs else "-"
        target = a.target.get(name, row["target"])
        lines.append(f"| {name} | {row['cost']} | {target:g} | {len(recs)} | {acc} | "
                     f"{np.mean([r['cp'] for r in recs]):.3f} | {np.mean([r['dfq_cp'] for r in recs]):.3f} | "
                     f"{m_cp:.3f} | {e_cp:.3f} | {tot / 1e12:.2f} | {gem / 1e12:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", default="bench-out/dfqhw")
    ap.add_argument("--rows", default="", help="macs and/or bitfusion (comma-separated): train these rows")
    ap.add_argument("--table", action="store_true", help="print the comparison table")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--epoch-iters", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", action="append", default=[], help="ROW=CP, e.g. bitfusion=11 (defaults: macs 3, "
                    "bitfusion 11: about every block on 4/8, which Bit-Fusion computes as 3/6)")
    ap.add_argument("--data", default=f"imagefolder:{DEFAULT_DATA}")
    a = ap.parse_args()
    a.target = {k: float(v) for k, v in (t.split("=") for t in a.target)}
    for name in [r.strip() for r in a.rows.split(",") if r.strip()]:
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        run_row(a, name)
    if a.table:
        print(table(a))


if __name__ == "__main__":
    main()
