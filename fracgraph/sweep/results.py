"""A sweep's outputs: results.json/.csv (one row per point), the quality-vs-cost Pareto plot, the HTML report.

Quality is the final test accuracy (higher is better) of a classifier's runs, or the final validation loss in nats
per token (lower is better) of a language model's (`--data text:`; `metric`).
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass
from pathlib import Path

from ..report import figures
from ..report.page import Section, img, write_report
from ..report.rundata import load_run
from ..train import runio
from .runner import Point

COLUMNS = ("point", "status", "final_test_acc", "best_test_acc", "cum_eff_gmacs", "mean_cp", "transitions",
           "wall_s", "pareto", "run_dir", "error")
LM_COLUMNS = ("point", "status", "final_val_loss", "best_val_loss", "final_val_ppl", "cum_eff_gmacs", "mean_cp",
              "transitions", "wall_s", "pareto", "run_dir", "error")


@dataclass(frozen=True)
class Metric:
    key: str             # the summary's field
    label: str           # for tables and axes
    higher: bool         # True: higher is better
    scale: float         # shown as value x scale
    fmt: str


ACCURACY = Metric("final_test_acc", "final test accuracy (%)", True, 100.0, "{:.2f}%")
VAL_LOSS = Metric("final_val_loss", "final validation loss (nats/token)", False, 1.0, "{:.4f}")


def metric(points: list[Point]) -> Metric:
    """Validation loss when the sweep's runs are a language model's, else test accuracy."""
    tasks = {(p.summary or {}).get("task") for p in points if p.summary is not None}
    return VAL_LOSS if "language_model" in tasks else ACCURACY


def rows(points: list[Point]) -> list[dict]:
    """One row per point; `pareto` marks the points no other beats on both the quality metric (final accuracy, or
    final validation loss) and effective GMACs."""
    m = metric(points)
    ok = [p for p in points if p.summary is not None and p.status in ("ok", "skipped")
          and p.summary.get(m.key) is not None]
    front = {ok[i].name for i in figures.pareto_front(
        [(p.summary["cum_eff_gmacs"], p.summary[m.key] if m.higher else -p.summary[m.key]) for p in ok])}
    out = []
    for p in points:
        s = p.summary if p.status in ("ok", "skipped") else None
        s = s or {}
        quality = {"final_val_loss": s.get("final_val_loss"), "best_val_loss": s.get("best_val_loss"),
                   "final_val_ppl": s.get("final_val_ppl")} if m is VAL_LOSS else \
            {"final_test_acc": s.get("final_test_acc"), "best_test_acc": s.get("best_test_acc")}
        out.append({"point": p.name, **{k: v for k, v in p.overrides.items()}, "status": p.status, **quality,
                    "cum_eff_gmacs": s.get("cum_eff_gmacs"), "mean_cp": s.get("mean_cp"),
                    "transitions": len(s.get("transitions") or []) if s else None, "wall_s": s.get("wall_s"),
                    "pareto": p.name in front, "run_dir": str(p.run_dir), "error": p.error})
    return out


def _metric_of(table: list[dict]) -> Metric:
    return VAL_LOSS if any("final_val_loss" in r for r in table) else ACCURACY


def write_tables(out: Path, table: list[dict], grid_keys: list[str]) -> tuple[Path, Path]:
    j = runio.atomic_write_json(out / "results.json", table, what="sweep results")
    buf = io.StringIO()
    cols = ["point", *grid_keys, *(LM_COLUMNS if _metric_of(table) is VAL_LOSS else COLUMNS)[1:]]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in table:
        w.writerow({k: (":".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()})
    c = runio.atomic_write_bytes(out / "results.csv", buf.getvalue().encode(), what="sweep results")
    return j, c


def pareto_png(table: list[dict]) -> bytes | None:
    m = _metric_of(table)
    done = [r for r in table if r[m.key] is not None and r["cum_eff_gmacs"] is not None]
    if not done:
        return None
    fig = figures.pareto([r["point"] for r in done], [r["cum_eff_gmacs"] for r in done], [r[m.key] for r in done],
                         f"Sweep: {m.label.split(' (')[0]} vs training cost ({len(done)} point(s))",
                         ylabel=m.label, scale=m.scale, higher=m.higher)
    return figures.png(fig)


def _table_html(table: list[dict], grid_keys: list[str]) -> str:
    m = _metric_of(table)
    head = ["point", *grid_keys, "status", "final acc." if m is ACCURACY else "final val loss", "cum. eff. GMACs",
            "mean cp", "transitions", "wall time", "Pareto"]

    def cell(v, fmt):
        return "-" if v is None else fmt.format(v)

    body = []
    for r in table:
        status = html.escape(r["status"]) + (f': {html.escape(r["error"])}' if r["error"] else "")
        tds = [f'<td class="l">{html.escape(r["point"])}</td>',
               *(f"<td>{html.escape(str(r.get(k)))}</td>" for k in grid_keys),
               f'<td class="wrap">{status}</td>',
               f'<td>{cell(None if r[m.key] is None else m.scale * r[m.key], m.fmt)}</td>',
               f'<td>{cell(r["cum_eff_gmacs"], "{:.4g}")}</td>', f'<td>{cell(r["mean_cp"], "{:.2f}%")}</td>',
               f'<td>{cell(r["transitions"], "{}")}</td>', f'<td>{cell(r["wall_s"], "{:.1f} s")}</td>',
               f'<td>{"&#9733;" if r["pareto"] else ""}</td>']
        body.append(f"<tr>{''.join(tds)}</tr>")
    return (f'<div class="scroll"><table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>'
            f'{"".join(body)}</table></div>')


def write_outputs(out: Path, points: list[Point], grid_keys: list[str], baseline: str | None = None) -> dict:
    """results.json/.csv, pareto.png, and report/index.html of every finished point with the sweep on top."""
    table = rows(points)
    j, c = write_tables(out, table, grid_keys)
    pareto = pareto_png(table)
    paths = {"results_json": str(j), "results_csv": str(c), "pareto": None, "report": None}
    if pareto is None:
        return {"table": table, **paths}
    paths["pareto"] = str(runio.atomic_write_bytes(out / "pareto.png", pareto, what="figure"))
    finished = [p for p in points if p.status in ("ok", "skipped") and p.summary is not None]
    runs = [load_run(p.run_dir, p.name) for p in finished]
    m = _metric_of(table)
    what = "final test accuracy" if m is ACCURACY else "final validation loss"
    sweep = Section("sweep", f"Sweep: {'accuracy' if m is ACCURACY else 'validation loss'} vs cost", (
        '<p class="note">Each grid point is one training run; the Pareto front joins the points that no other point '
        f"beats on both {what} and cumulative effective GMACs (&#9733; in the table).</p>"
        + img("pareto.png", pareto, "sweep Pareto plot") + _table_html(table, grid_keys)), {"pareto.png": pareto})
    page = write_report(None, out / "report", runs=runs, baseline=baseline, extra=[sweep],
                        title=f"fracgraph sweep: {out.name}")
    paths["report"] = str(page)
    return {"table": table, **paths}
