"""Hardware-aware DFQ against MAC-costed DFQ (issue 17 item 5): resnet20 on CIFAR-10, DFQ with the controller's cost
table in effective MACs (`quantize --dfq`, target cp in % of FP32 MACs) and in Bit-Fusion energy (`quantize --dfq
--cost bitfusion`, target in % of the gated blocks' FP32 Bit-Fusion energy); then the Bit-Fusion energy of each run
(`estimate --trace`, whole step and GEMMs only) beside its accuracy.

    python bench/dfq_hw_cost.py --rows macs -o bench-out/dfqhw          # one row per process, resumable
    python bench/dfq_hw_cost.py --rows bitfusion -o bench-out/dfqhw
    python bench/dfq_hw_cost.py --table -o bench-out/dfqhw              # the table from whatever the runs reached

A killed row resumes from its checkpoint when started again. `--table` reads each run's metrics as far as they got
(a run that has not finished is labelled with its step count; its energy is estimated over the steps done).

At the converged protocol of bench/reproduce.py (4,000 iterations, the first conv static at FW8/BW8), the two rows
are reproduce.py's `dfq` row (MAC table, cp 3) and its opt-in `dfq-bitfusion` row (Bit-Fusion energy table):

    python bench/reproduce.py -o bench-out/reproduce --rows dfq-bitfusion
    python bench/dfq_hw_cost.py --reproduce bench-out/reproduce        # the table from those two runs

Below the table: the headroom, i.e. the gated blocks' Bit-Fusion energy with every block on its cheapest option
against the MAC-costed run's, which bounds what any controller over these options can save on the same blocks.
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


def _rows(a) -> dict:
    """row -> (controller cost, target, run dir, artifacts dir)."""
    if a.reproduce:
        import importlib.util

        spec = importlib.util.spec_from_file_location("reproduce", Path(__file__).with_name("reproduce.py"))
        rep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rep)
        out = Path(a.reproduce)
        return {"macs": ("macs", rep.ROWS["dfq"][1]["target_cp"], out / "runs" / "dfq", out / "artifacts-dfq"),
                "bitfusion": ("bitfusion", rep.ROWS["dfq-bitfusion"][1]["target_cp"], out / "runs" / "dfq-bitfusion",
                              out / "artifacts-dfq-bitfusion")}
    out = Path(a.out)
    return {name: (row["cost"], a.target.get(name, row["target"]), out / f"run-{name}", out / f"artifacts-{row['cost']}")
            for name, row in ROWS.items()}


def table(a) -> str:
    import numpy as np

    from fracgraph.analysis.estimate import Estimator, load_source
    from fracgraph.hwmodels import get_model
    from fracgraph.train.dfq import gated_cost_table
    from fracgraph.manifest import Manifest

    rows = _rows(a)
    bf = rows["bitfusion"][3]
    if not (bf / "manifest.json").exists():
        return f"{bf} does not exist yet: run the bitfusion row first"
    T, T32 = gated_cost_table(Manifest.read(bf).dfq)     # the gated blocks' Bit-Fusion energy per option
    lines = ["| row | controller cost | target | steps | test acc % | mean MAC cp % | mean gated cp (own unit) "
             "| gated MAC cp % | gated Bit-Fusion energy cp % | Bit-Fusion energy, whole run (J) | GEMMs only (J) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    gated_e = {}
    for name, (cost, target, run, art) in rows.items():
        if not (run / "metrics.jsonl").exists():
            lines.append(f"| {name} | {cost} | {target:g} | not started | | | | | | | |")
            continue
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        accs = [r for r in recs if "test_acc" in r]
        m = Manifest.read(art)
        # the gated blocks' Bit-Fusion energy cp of the choices made, from the Bit-Fusion table of the same graph
        opts = [tuple(o) for o in m.dfq["options"]]
        G = list(m.dfq.get("gated", range(m.n_blocks)))   # T's rows, in gate order (a static block has none)

        def gated(T, T32):
            return np.mean([100 * sum(T[j, opts.index((int(round(r["bits"][l][0])), int(round(r["bits"][l][2]))))]
                                      for j, l in enumerate(G)) / T32.sum() for r in recs])
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
        gated_e[name] = e_cp
        acc = f"{100 * accs[-1]['test_acc']:.2f} (eval, step {accs[-1]['step']})" if accs else "-"
        if (run / "summary.json").exists():
            acc = f"{100 * json.loads((run / 'summary.json').read_text())['final_test_acc']:.2f} (final, whole test set)"
        lines.append(f"| {name} | {cost} | {target:g} | {len(recs)} | {acc} | "
                     f"{np.mean([r['cp'] for r in recs]):.3f} | {np.mean([r['dfq_cp'] for r in recs]):.3f} | "
                     f"{m_cp:.3f} | {e_cp:.3f} | {tot / 1e12:.2f} | {gem / 1e12:.2f} |")
    # headroom: no choice over these options costs less than every gated block on its cheapest option
    opts = [tuple(o) for o in Manifest.read(bf).dfq["options"]]
    per_opt = ", ".join(f"{o[0]}/{o[1]} {100 * T[:, k].sum() / T32.sum():.2f}" for k, o in enumerate(opts))
    floor = 100 * T.min(1).sum() / T32.sum()
    lines += ["", f"Gated Bit-Fusion energy cp % with every gated block on one option: {per_opt}; the floor (each "
              f"block on its cheapest option) is {floor:.2f}."]
    if "macs" in gated_e:
        lines.append(f"Against the MAC-costed run's {gated_e['macs']:.2f}, no controller over these options can save "
                     f"more than {100 * (1 - floor / gated_e['macs']):.1f}% of the gated blocks' Bit-Fusion GEMM energy "
                     f"(and only by putting every block on its cheapest option).")
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
    ap.add_argument("--reproduce", default=None, metavar="OUT", help="print the table for bench/reproduce.py's `dfq` "
                    "and `dfq-bitfusion` rows in OUT (the converged protocol) instead of this bench's own rows")
    a = ap.parse_args()
    if a.reproduce:
        print(table(a))
        return
    a.target = {k: float(v) for k, v in (t.split("=") for t in a.target)}
    for name in [r.strip() for r in a.rows.split(",") if r.strip()]:
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        run_row(a, name)
    if a.table:
        print(table(a))


if __name__ == "__main__":
    main()
