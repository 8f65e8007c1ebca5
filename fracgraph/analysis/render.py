"""Render an estimate report (`estimate.report`) as rich tables or CSV; no computation here."""

from __future__ import annotations

import csv
import io

PHASES = ("fw", "bw_data", "bw_weight")


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x):
    return "n/a" if x is None else f"{x:.2f}%"


def _e(pj):
    """pJ -> a readable joule unit."""
    for unit, f in (("J", 1e12), ("mJ", 1e9), ("uJ", 1e6)):
        if abs(pj) >= f:
            return f"{pj / f:.3g} {unit}"
    return f"{pj:.3g} pJ"


def _t(s):
    for unit, f in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def render_table(rep: dict, console=None, max_layers: int = 60) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    con.print(f"[bold]{rep['model']}[/bold]: batch {rep['batch']}, {rep['steps']} steps ({rep['mode']}), "
              f"{rep['blocks']} precision block(s), {rep['schedule']} schedule, baseline {rep['baseline']}, "
              f"scope {rep.get('scope', 'step')}" + (" (GEMMs only)" if rep.get("scope") == "gemm" else " (every op)"))
    for name, h in rep["hw"].items():
        t = Table(title=f"{name}: one training step, per GEMM layer", title_justify="left")
        for col in ("layer", "bits a x w", "MACs (M)", "fw", "error", "w-grad", "energy"):
            t.add_column(col, justify="left" if col == "layer" else "right")
        layers = h["layers"]
        for r in layers[:max_layers]:
            ph = r["phases"]
            t.add_row(r["layer"], r["bits"] or "", f"{r['macs'] / 1e6:.1f}",
                      *[_t(ph[p]["latency_s"]) if p in ph else "-" for p in PHASES], _e(r["energy_pj"]))
        if len(layers) > max_layers:
            t.add_row(f"... {len(layers) - max_layers} more (--format csv lists all)", "", "", "", "", "", "")
        m = h["memory_ops"]
        t.add_row(f"memory-bound ops ({m['count']})", "", "", "", "", "", _e(m["energy_pj"]))
        con.print(t)
        s, b, r, br, sv = h["step"], h["baseline_step"], h["run"], h["baseline_run"], h["savings"]
        lv = " ".join(f"{k} {_e(v)}" for k, v in s["energy_pj"].items())
        con.print(f"  step: {_t(s['latency_s'])}, {_e(s['energy_total_pj'])} ({lv}); memory-bound ops "
                  f"{_t(m['latency_s'])}; {rep['baseline']}: {_t(b['latency_s'])}, {_e(b['energy_total_pj'])}")
        con.print(f"  run ({r['steps']} steps, {r['segments']} segment(s)): {_t(r['latency_s'])}, "
                  f"{_e(r['energy_total_pj'])}; {rep['baseline']}: {_t(br['latency_s'])}, "
                  f"{_e(br['energy_total_pj'])}")
        con.print(f"  savings vs {rep['baseline']} on {name}: latency {_pct(sv['latency'])}, energy "
                  f"{_pct(sv['energy'])} (GEMMs only: {_pct(sv['gemm_latency'])}, {_pct(sv['gemm_energy'])})")
        cp = h.get("cp")
        if cp:
            con.print(f"  cp (% of FP32): effective MACs {_num(cp['macs'])}, {name} energy {_num(cp['energy'])}, "
                      f"latency {_num(cp['latency'])}")
    if "cross" in rep:
        c = rep["cross"]
        con.print(f"[bold]{c['what']}[/bold]: latency {_pct(c['latency'])}, energy {_pct(c['energy'])} "
                  f"(GEMMs only: {_pct(c['gemm_latency'])}, {_pct(c['gemm_energy'])})")


def to_csv(rep: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["hw", "layer", "bits", "macs", *[f"{p}_latency_s" for p in PHASES], "latency_s", "energy_pj"])
    for name, h in rep["hw"].items():
        for r in h["layers"]:
            ph = r["phases"]
            w.writerow([name, r["layer"], r["bits"] or "", int(r["macs"]),
                        *[f"{ph[p]['latency_s']:.9g}" if p in ph else "" for p in PHASES],
                        f"{r['latency_s']:.9g}", f"{r['energy_pj']:.6g}"])
        m = h["memory_ops"]
        w.writerow([name, "memory-bound ops", "", 0, "", "", "", f"{m['latency_s']:.9g}", f"{m['energy_pj']:.6g}"])
        for key in ("step", "baseline_step"):
            w.writerow([name, f"TOTAL {key}", "", int(h[key]["macs"]), "", "", "",
                        f"{h[key]['latency_s']:.9g}", f"{h[key]['energy_total_pj']:.6g}"])
        for key in ("run", "baseline_run"):
            w.writerow([name, f"TOTAL {key}", "", "", "", "", "", f"{h[key]['latency_s']:.9g}",
                        f"{h[key]['energy_total_pj']:.6g}"])
    return buf.getvalue()
