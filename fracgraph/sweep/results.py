"""A sweep's outputs: results.json/.csv (one row per point), the accuracy-vs-cost Pareto plot, the HTML report."""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

from ..report import figures
from ..report.page import Section, img, write_report
from ..report.rundata import load_run
from ..train import runio
from .runner import Point

COLUMNS = ("point", "status", "final_test_acc", "best_test_acc", "cum_eff_gmacs", "mean_cp", "transitions",
           "wall_s", "pareto", "run_dir", "error")


def rows(points: list[Point]) -> list[dict]:
    """One row per point; `pareto` marks the points no other beats on both final accuracy and effective GMACs."""
    ok = [p for p in points if p.summary is not None and p.status in ("ok", "skipped")
          and p.summary.get("final_test_acc") is not None]
    front = {ok[i].name for i in figures.pareto_front(
        [(p.summary["cum_eff_gmacs"], p.summary["final_test_acc"]) for p in ok])}
    out = []
    for p in points:
        s = p.summary if p.status in ("ok", "skipped") else None
        s = s or {}
        out.append({"point": p.name, **{k: v for k, v in p.overrides.items()}, "status": p.status,
                    "final_test_acc": s.get("final_test_acc"), "best_test_acc": s.get("best_test_acc"),
                    "cum_eff_gmacs": s.get("cum_eff_gmacs"), "mean_cp": s.get("mean_cp"),
                    "transitions": len(s.get("transitions") or []) if s else None, "wall_s": s.get("wall_s"),
                    "pareto": p.name in front, "run_dir": str(p.run_dir), "error": p.error})
    return out


def write_tables(out: Path, table: list[dict], grid_keys: list[str]) -> tuple[Path, Path]:
    j = runio.atomic_write_json(out / "results.json", table, what="sweep results")
    buf = io.StringIO()
    cols = ["point", *grid_keys, *COLUMNS[1:]]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in table:
        w.writerow({k: (":".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()})
    c = runio.atomic_write_bytes(out / "results.csv", buf.getvalue().encode(), what="sweep results")
    return j, c


def pareto_png(table: list[dict]) -> bytes | None:
    done = [r for r in table if r["final_test_acc"] is not None and r["cum_eff_gmacs"] is not None]
    if not done:
        return None
    fig = figures.pareto([r["point"] for r in done], [r["cum_eff_gmacs"] for r in done],
                         [r["final_test_acc"] for r in done],
                         f"Sweep: final test accuracy vs training cost ({len(done)} point(s))")
    return figures.png(fig)


def _table_html(table: list[dict], grid_keys: list[str]) -> str:
    head = ["point", *grid_keys, "status", "final acc.", "cum. eff. GMACs", "mean cp", "transitions", "wall time",
            "Pareto"]

    def cell(v, fmt):
        return "-" if v is None else fmt.format(v)

    body = []
    for r in table:
        status = html.escape(r["status"]) + (f': {html.escape(r["error"])}' if r["error"] else "")
        tds = [f'<td class="l">{html.escape(r["point"])}</td>',
               *(f"<td>{html.escape(str(r.get(k)))}</td>" for k in grid_keys),
               f'<td class="wrap">{status}</td>',
               f'<td>{cell(r["final_test_acc"] and 100 * r["final_test_acc"], "{:.2f}%")}</td>',
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
    sweep = Section("sweep", "Sweep: accuracy vs cost", (
        '<p class="note">Each grid point is one training run; the Pareto front joins the points that no other point '
        "beats on both final test accuracy and cumulative effective GMACs (&#9733; in the table).</p>"
        + img("pareto.png", pareto, "sweep Pareto plot") + _table_html(table, grid_keys)), {"pareto.png": pareto})
    page = write_report(None, out / "report", runs=runs, baseline=baseline, extra=[sweep],
                        title=f"fracgraph sweep: {out.name}")
    paths["report"] = str(page)
    return {"table": table, **paths}
