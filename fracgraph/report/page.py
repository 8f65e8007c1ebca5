"""Assemble the report: figures as PNG files plus one self-contained HTML page that embeds them.

The page must open anywhere, offline and years later, so nothing is fetched: the CSS is inline, every image is a
base64 data URI of the PNG written beside it, and there is no script.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

from ..errors import FracgraphError
from ..train.runio import atomic_write_bytes
from . import figures
from .rundata import RunData, load_runs

PAGE = "index.html"
HW_DEFAULT = ("bitfusion", "eyeriss", "fpga")


@dataclass
class Section:
    """A block of the page: an anchor id, a heading, its HTML and the PNGs it refers to ({file name: bytes})."""

    id: str
    title: str
    html: str
    images: dict[str, bytes] = field(default_factory=dict)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-") or "run"


def img(name: str, data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}" title="{html.escape(name)}">'
            f'<p class="note">Also written as <code>{html.escape(name)}</code>.</p>')


def figure_section(id: str, title: str, name: str, fig, alt: str, note: str = "") -> Section:
    data = figures.png(fig)
    body = (f'<p class="note">{note}</p>' if note else "") + img(name, data, alt)
    return Section(id, title, body, {name: data})


def _pct(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    v = round(100 * x, digits)
    return f"{v or 0.0:.{digits}f}%"       # -0.0 is falsy: no "-0.0%" for a saving that rounds to nothing


def _num(x, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _swatch(i: int) -> str:
    r, g, b, _ = figures.color(i)
    return f'<span class="swatch" style="background: rgb({int(255 * r)},{int(255 * g)},{int(255 * b)})"></span>'


def _transitions_text(run: RunData) -> str:
    ts = run.transitions
    if not ts:
        return "none"
    return "; ".join(f"step {t['step']}: {figures.stage_label(t['old'])}&rarr;{figures.stage_label(t['new'])}"
                     for t in ts)


def _row(cells: list[tuple[str, str]], cls: str = "") -> str:
    tds = "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for c, v in cells)
    return f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>"


def summary_section(runs: list[RunData], base: RunData) -> Section:
    """Accuracy, cost and time per run, with the saving in effective GMACs against the chosen baseline run."""
    head = ("run", "schedule", "steps", "final acc.", "best acc.", "&Delta; final vs base", "cum. eff. GMACs",
            "saving vs base", "mean cp", "DFQ gated cp", "wall time", "transitions")
    rows = []
    lm = all(r.is_lm for r in runs)   # language models: validation loss in nats/token instead of accuracy
    if lm:
        head = ("run", "schedule", "steps", "final val loss", "best val loss", "&Delta; final vs base",
                *head[6:])
    metric, best = ("final_val_loss", "best_val_loss") if lm else ("final_test_acc", "best_test_acc")
    b_cost, b_acc = base.summary.get("cum_eff_gmacs"), base.summary.get(metric)
    for i, r in enumerate(runs):
        s = r.summary
        cost, acc = s.get("cum_eff_gmacs"), s.get(metric)
        saving = (1 - cost / b_cost) if (cost is not None and b_cost) else None
        if lm:
            delta = f"{acc - b_acc:+.4f} nats" if acc is not None and b_acc is not None else "-"
            shown = (_num(acc, "{:.4f}"), _num(s.get(best), "{:.4f}"))
        else:
            delta = (f"{100 * (acc - b_acc):+.2f} pp" if acc is not None and b_acc is not None else "-")
            shown = (_pct(acc), _pct(s.get(best)))
        rows.append(_row([
            ("l", _swatch(i) + html.escape(r.name)), ("l", html.escape(str(s.get("schedule", "?")))),
            ("", str(s.get("steps"))), ("", shown[0]), ("", shown[1]), ("", delta),
            ("", _num(cost, "{:.4g}")), ("", _pct(saving, 1)), ("", _num(s.get("mean_cp"), "{:.2f}%")),
            ("", _gated_cp(s.get("dfq"))), ("", _num(s.get("wall_s"), "{:.1f} s")), ("wrap", _transitions_text(r)),
        ], "base" if r is base else ""))
    table = (f'<div class="scroll"><table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>'
             f'{"".join(rows)}</table></div>')
    note = (f"Baseline (highlighted): <b>{html.escape(base.name)}</b>. " + (
            "Final validation loss is the last evaluation's mean cross-entropy (nats per token) over every validation "
            "window; " if lm else "Final accuracy is the last evaluation, on the whole test set; ") + "cum. eff. GMACs counts the forward, error and weight-gradient GEMMs of every step at "
            "the bits used (MACs &times; bits<sub>a</sub>/32 &times; bits<sub>b</sub>/32); mean cp is that as a "
            "percentage of the same steps in FP32. DFQ gated cp is what the controller steered: the gated blocks' "
            "cost in its table's unit (effective MACs, or a hardware model's energy/latency with "
            "<code>quantize --dfq --cost</code>) as a percentage of their FP32 cost.")
    runs_list = "".join(f"<li>{_swatch(i)}<b>{html.escape(r.name)}</b>: <code>{html.escape(str(r.path))}</code></li>"
                        for i, r in enumerate(runs))
    return Section("summary", "Summary", f'<p class="note">{note}</p>{table}<ul>{runs_list}</ul>')


def _cp3(cp: dict | None) -> str:
    """cp of the run in effective MACs and in the hardware's own energy and latency (% of FP32 on it)."""
    if not cp:
        return "-"
    return " / ".join("-" if cp.get(k) is None else f"{cp[k]:.2f}%" for k in ("macs", "energy", "latency"))


def _gated_cp(d: dict | None) -> str:
    if not d or d.get("mean_gated_cp") is None:
        return "-"
    return f"{d['mean_gated_cp']:.2f}% ({html.escape(d.get('cp_unit', 'effective MACs'))})"


def precision_section(runs: list[RunData]) -> Section:
    parts, images = [], {}
    for r in runs:
        name = f"precision-{slug(r.name)}.png"
        data = figures.png(figures.precision(r))
        images[name] = data
        parts.append(f"<h3>{html.escape(r.name)}</h3>" + img(name, data, f"precision over time of {r.name}"))
    note = ("Top: bits of the forward (activations) and backward (errors) quantizers, mean over blocks (shaded: "
            "min to max when blocks differ); dashed lines are PFQ stage transitions. Below: the bits of every block "
            "at every step, from the run's precision trace.")
    return Section("precision", "Precision over time", f'<p class="note">{note}</p>' + "".join(parts), images)


def choices_section(runs: list[RunData]) -> Section:
    parts, images = [], {}
    for r in runs:
        cc = r.choice_counts()
        head = f"<h3>{html.escape(r.name)}</h3>"
        if len(cc.counts) == 1:
            (key,) = cc.counts
            parts.append(head + f'<p class="note">One precision choice throughout: every one of the '
                         f"{len(cc.blocks)} block(s) used {figures.choice_label(*key)} for all "
                         f"{r.trace.total_steps} steps (no precision change, so no choices to show).</p>")
            continue
        name = f"choices-{slug(r.name)}.png"
        data = figures.png(figures.choices(r))
        images[name] = data
        per_block = r.summary.get("dfq") is not None or bool((r.trace.bits != r.trace.bits[:, :1]).any())
        parts.append(head + img(name, data, f"precision choices per block of {r.name}")
                     + f'<p class="note">Counted from {html.escape(cc.source)}.'
                     + ("" if per_block else " No per-block (DFQ) choices in this run: the blocks changed precision "
                                             "together, so each bar shows the share of steps in each stage.")
                     + "</p>")
    note = ("For every block, the share of training spent at each (FW, BW) choice: from a DFQ run's choice "
            "histogram (summary.json) when it has one, otherwise counted from the precision trace, so it is drawn "
            "for any run: DFQ's per-block choices, PFQ's stages, or a static run's one choice.")
    return Section("choices", "Precision choices per block", f'<p class="note">{note}</p>' + "".join(parts), images)


def estimate_runs(runs: list[RunData], hw_names) -> tuple[dict[str, dict], dict[str, str]]:
    """`estimate` over each run's trace on each hardware model; a run that cannot be costed gets a note instead."""
    from ..analysis.estimate import report

    estimates, notes = {}, {}
    for r in runs:
        art = r.artifacts_dir()
        if art is None:
            notes[r.name] = (f"artifacts {r.summary.get('artifacts')!r} not found (looked beside the run and in the "
                             "current directory): no hardware estimate")
            continue
        try:
            estimates[r.name] = report(art, list(hw_names), trace_dir=r.path, batch=int(r.config.get("batch") or 128))
        except FracgraphError as e:
            notes[r.name] = f"no hardware estimate: {e}"
    return estimates, notes


def hardware_section(runs: list[RunData], estimates: dict, notes: dict) -> Section:
    warn = "".join(f'<p class="warn">{html.escape(n)}: {html.escape(m)}</p>' for n, m in notes.items())
    if not estimates:
        return Section("hardware", "Energy and latency on hardware models", warn or "<p>no estimates</p>")
    order = [r.name for r in runs]
    name = "hardware.png"
    data = figures.png(figures.hardware(estimates, order))
    rows = []
    for n in order:
        if n not in estimates:
            continue
        rep = estimates[n]
        for hw, h in rep["hw"].items():
            sv = h["savings"]
            rows.append(_row([
                ("l", _swatch(order.index(n)) + html.escape(n)), ("l", hw), ("", str(h["run"]["steps"])),
                ("", _energy(h["run"]["energy_total_pj"])), ("", _time(h["run"]["latency_s"])),
                ("", _energy(h["baseline_run"]["energy_total_pj"])),
                ("", _time(h["baseline_run"]["latency_s"])), ("", _pct(sv["energy"], 1)),
                ("", _pct(sv["latency"], 1)), ("", _cp3(h.get("cp")))]))
    base = next(iter(estimates.values()))["baseline"]
    head = ("run", "hardware", "steps", "energy", "latency", f"{base} energy", f"{base} latency", "energy saving",
            "latency saving", "cp: MACs / energy / latency")
    table = (f'<div class="scroll"><table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>'
             f'{"".join(rows)}</table></div>')
    note = (f"<code>fracgraph estimate ART/ --trace RUN/</code> for each run: the training step costed at the bits of "
            f"every trace segment, beside a static {base} run of the same length and batch on the same hardware.")
    return Section("hardware", "Energy and latency on hardware models",
                   f'<p class="note">{note}</p>{warn}' + img(name, data, "energy and latency per hardware model")
                   + table, {name: data})


def _energy(pj: float) -> str:
    unit, scale = figures.pick_unit([pj], figures.ENERGY_UNITS)
    return f"{pj / scale:.3g} {unit}"


def _time(s: float) -> str:
    unit, scale = figures.pick_unit([s], figures.TIME_UNITS)
    return f"{s / scale:.3g} {unit}"


def pick_baseline(runs: list[RunData], baseline: str | None) -> RunData:
    if baseline is None:
        return runs[0]
    for r in runs:
        if baseline == r.name or Path(baseline).resolve() == r.path.resolve():
            return r
    raise FracgraphError(f"--baseline {baseline!r} is none of the runs; give one of: "
                         + ", ".join(r.name for r in runs))


def render_page(title: str, subtitle: str, sections: list[Section]) -> str:
    template = Template(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>\n{s.html}\n</section>' for s in sections)
    return template.substitute(title=html.escape(title), subtitle=subtitle, nav=nav, body=body)


def write_report(run_dirs, out_dir, *, baseline: str | None = None, hw_names=HW_DEFAULT,
                 title: str = "fracgraph training report", extra: list[Section] | None = None,
                 runs: list[RunData] | None = None) -> Path:
    """Load the runs, draw every figure, write the PNGs and OUT/index.html; returns the page's path."""
    runs = runs if runs is not None else load_runs(run_dirs)
    base = pick_baseline(runs, baseline)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FracgraphError(f"{out} exists and is not a directory: choose another -o")
    estimates, notes = estimate_runs(runs, hw_names)
    sections = [summary_section(runs, base),
                figure_section("trajectory", ("Validation loss" if runs and all(r.is_lm for r in runs) else
                                              "Test accuracy") + " vs cumulative effective GMACs", "trajectory.png",
                               figures.trajectory(runs), "the evaluations against cumulative effective GMACs",
                               "Every evaluation of every run; the curve that reaches a given accuracy further left "
                               "reached it with less training computation."),
                *(extra or []),
                precision_section(runs), choices_section(runs), hardware_section(runs, estimates, notes)]
    for s in sections:
        for name, data in s.images.items():
            atomic_write_bytes(out / name, data, what="figure")
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = html.escape(f"{len(runs)} run(s), baseline {base.name}; generated {when}")
    page = render_page(title, subtitle, sections)
    return atomic_write_bytes(out / PAGE, page.encode("utf-8"), what="report page")
