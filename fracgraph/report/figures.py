"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display).

Each function takes loaded runs (or estimate reports) and returns a Figure; `png` turns one into bytes. Colors
follow the run's position in the report, so a run has the same color in every figure.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from .rundata import SKIP_BITS, RunData

MAX_COLUMNS = 1200   # precision heatmaps sample at most this many steps (a DFQ trace can change every step)


def color(i: int):
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def sequential(n: int) -> list:
    """n colors from low to high bits (viridis, without its darkest and lightest ends)."""
    from matplotlib import colormaps

    return [colormaps["viridis"](v) for v in np.linspace(0.15, 0.9, n)] if n > 1 else [colormaps["viridis"](0.5)]


def png(fig: Figure, dpi: int = 110) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def bits_label(b: float) -> str:
    return "skip" if b < 0 else "32" if b == 0 else f"{b:g}"


def choice_label(act: float, weight: float, grad: float, show_weight: bool | None = None) -> str:
    """'FW4/BW8'; the weight bits are named when they differ from the activations' (or when asked); 'skip'."""
    if act < 0:
        return "skip"
    show = weight != act if show_weight is None else show_weight
    w = f" W{bits_label(weight)}" if show else ""
    return f"FW{bits_label(act)}{w}/BW{bits_label(grad)}"


def trajectory(runs: list[RunData]) -> Figure:
    """Test accuracy against cumulative effective GMACs, one line per run (FracTrain's trajectory figure)."""
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    lm = bool(runs) and all(r.is_lm for r in runs)   # language models: validation loss (lower is better)
    for i, r in enumerate(runs):
        ev = r.evals
        if not ev:
            continue
        x = [e["cum_gmacs"] for e in ev]
        y = [e["val_loss"] if lm else 100 * e["test_acc"] for e in ev]
        ax.plot(x, y, marker="o", ms=3, lw=1.5, color=color(i), label=r.name)
        ax.plot(x[-1], y[-1], marker="*", ms=12, color=color(i))
    ax.set_xlabel("cumulative effective GMACs (forward + error + weight-gradient GEMMs)")
    ax.set_ylabel("validation loss (nats/token)" if lm else "test accuracy (%)")
    ax.set_title(("Validation loss" if lm else "Test accuracy") + " vs training cost (star: final evaluation)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small", loc="upper right" if lm else "lower right")
    return fig


def _sampled_steps(total: int) -> np.ndarray:
    if total <= MAX_COLUMNS:
        return np.arange(total)
    return np.linspace(0, total - 1, MAX_COLUMNS).round().astype(np.int64)


def stage_label(stage) -> str:
    """A schedule stage: PFQ's (FW, BW) pair, or FracTrain's cp target (a number)."""
    if isinstance(stage, (int, float)):
        return f"cp {stage:g}%"
    return f"FW{stage[0]}/BW{stage[1]}"


def precision(run: RunData) -> Figure:
    """FW/BW bits over the run: block means as lines with stage transitions marked, then one heatmap row per block."""
    tr = run.trace
    total = max(tr.total_steps, 1)
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax_line, ax_fw, ax_bw = fig.subplots(3, 1, sharex=True, height_ratios=[1.2, 1, 1])
    edges = np.append(tr.starts, total)
    shown = np.where(tr.bits == 0, 32.0, tr.bits)       # FP32 passthrough drawn at 32 bits
    shown = np.where(tr.active[..., None] > 0, shown, 0.0)    # a block every sample skipped: drawn at 0 ("skip")
    series = [("FW (activations)", 0, "tab:blue", "-", 3.5), ("BW (errors)", 2, "tab:red", "--", 2)]
    if not np.array_equal(tr.bits[:, :, 1], tr.bits[:, :, 0]):
        series.insert(1, ("weights", 1, "tab:green", ":", 2))
    for label, k, c, ls, lw in series:
        mean = shown[:, :, k].mean(axis=1)
        ax_line.step(edges, np.append(mean, mean[-1]), where="post", color=c, ls=ls, lw=lw, label=f"{label}, block mean")
        lo, hi = shown[:, :, k].min(axis=1), shown[:, :, k].max(axis=1)
        if np.any(lo != hi):
            ax_line.fill_between(edges, np.append(lo, lo[-1]), np.append(hi, hi[-1]), step="post", color=c, alpha=0.15)
    for t in run.transitions:
        for ax in (ax_line, ax_fw, ax_bw):
            ax.axvline(t["step"], color="black", ls="--", lw=0.9)
        ax_line.annotate(stage_label(t["new"]), (t["step"], 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -12), textcoords="offset points", fontsize="small")
    ax_line.set_ylabel("bits")
    ax_line.set_ylim(0, shown.max() + 2)
    ticks = np.unique(shown[:, :, [k for _, k, *_ in series]])
    if len(ticks) <= 8:
        ax_line.set_yticks(ticks)
    fig.suptitle(f"{run.name}: precision over time ({len(run.transitions)} stage transition(s), dashed)")
    ax_line.legend(fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(series), frameon=False)
    ax_line.grid(alpha=0.3)

    steps = _sampled_steps(total)
    grid = run.bits_at(steps)                            # [cols, blocks, 3]
    grid = np.where(run.active_at(steps)[..., None] > 0, grid, SKIP_BITS)   # skipped: its own level, "skip"
    levels = np.unique(grid[:, :, [0, 2]])
    discrete = len(levels) <= 10     # a few bit widths: one color each; per-step mean bits: a continuous scale
    if discrete:
        cmap, values = ListedColormap(sequential(len(levels))), np.searchsorted(levels, grid)
        norm = BoundaryNorm(np.arange(len(levels) + 1) - 0.5, len(levels))
    else:
        cmap, values, norm = "viridis", np.where(grid == 0, 32.0, np.maximum(grid, 0.0)), None
    n_blocks = grid.shape[1]
    for ax, k, what in ((ax_fw, 0, "FW"), (ax_bw, 2, "BW")):
        im = ax.imshow(values[:, :, k].T, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                       extent=(0, total, n_blocks - 0.5, -0.5))
        ax.set_ylabel(f"{what} bits\nblock")
        if n_blocks <= 12:
            ax.set_yticks(range(n_blocks))
    cb = fig.colorbar(im, ax=[ax_fw, ax_bw], ticks=range(len(levels)) if discrete else None, fraction=0.04)
    if discrete:
        cb.ax.set_yticklabels([bits_label(v) for v in levels])
    cb.set_label("bits (32 = FP32)" + (", skip = block skipped" if tr.skips else ""))
    sampled = "" if len(steps) == total else f" (sampled at {len(steps)} steps)"
    ax_bw.set_xlabel(f"training step{sampled}")
    return fig


MAX_CHOICES = 12      # more distinct choices than this (e.g. per-step mean bits) are drawn as the largest + "other"


def choices(run: RunData) -> Figure:
    """Per block, the share of each precision choice, as one stacked bar per block."""
    cc = run.choice_counts()
    n_blocks = len(cc.blocks)
    items = sorted(cc.counts.items(), key=lambda kv: -kv[1].sum())
    if len(items) > MAX_CHOICES:
        rest = sum(v for _, v in items[MAX_CHOICES - 1:])
        items = sorted(items[:MAX_CHOICES - 1]) + [("other", rest)]
    else:
        items = sorted(items)
    totals = np.maximum(sum(v for _, v in items), 1)
    fig = Figure(figsize=(9, 1.6 + 0.35 * n_blocks + 0.25 * (len(items) // 5 + 1)), layout="constrained")
    ax = fig.add_subplot()
    left = np.zeros(n_blocks)
    show_w = any(k != "other" and k[1] != k[0] for k, _ in items)   # name weight bits everywhere if any differ
    for col, (key, c) in zip(sequential(len(items)), items):
        share = 100 * c / totals
        label = key if key == "other" else choice_label(*key, show_w)
        ax.barh(np.arange(n_blocks), share, left=left, color="lightgray" if key == "other" else col, label=label,
                height=0.7)
        left += share
    ax.set_yticks(range(n_blocks), cc.blocks, fontsize="small" if n_blocks > 12 else None)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"share of training {cc.unit} (%)")
    ax.set_title(f"{run.name}: precision choices per block")
    fig.legend(*ax.get_legend_handles_labels(), fontsize="small", ncols=min(len(items), 5), loc="outside lower center")
    return fig


def pick_unit(values, units):
    top = max((abs(v) for v in values), default=0.0)
    for name, scale in units:
        if top >= scale:
            return name, scale
    return units[-1]


ENERGY_UNITS = (("J", 1e12), ("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3), ("pJ", 1.0))
TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))


def hardware(estimates: dict[str, dict], order: list[str]) -> Figure:
    """Energy and latency of each run on each hardware model, beside the static baseline of the same length."""
    hw_names = sorted({h for rep in estimates.values() for h in rep["hw"]})
    fig = Figure(figsize=(4.2 * max(len(hw_names), 1) + 1, 7), layout="constrained")
    axes = fig.subplots(2, max(len(hw_names), 1), squeeze=False)
    runs = [n for n in order if n in estimates]
    width = 0.38
    for j, hw in enumerate(hw_names):
        for row, (key, base_key, units, what) in enumerate((
                ("energy_total_pj", "energy_total_pj", ENERGY_UNITS, "energy"),
                ("latency_s", "latency_s", TIME_UNITS, "latency"))):
            ax = axes[row][j]
            vals = [estimates[n]["hw"][hw]["run"][key] for n in runs if hw in estimates[n]["hw"]]
            bases = [estimates[n]["hw"][hw]["baseline_run"][base_key] for n in runs if hw in estimates[n]["hw"]]
            uname, scale = pick_unit(vals + bases, units)
            names = [n for n in runs if hw in estimates[n]["hw"]]
            x = np.arange(len(names))
            for i, n in enumerate(names):
                k = order.index(n)
                ax.bar(x[i] - width / 2, vals[i] / scale, width, color=color(k))
                ax.bar(x[i] + width / 2, bases[i] / scale, width, color="lightgray", hatch="//", edgecolor="gray")
                if bases[i] > 0:
                    change = round(100 * (vals[i] / bases[i] - 1), 1) or 0.0     # never "-0.0%"
                    ax.annotate(f"{change:+.1f}%", (x[i] - width / 2, vals[i] / scale),
                                xytext=(0, 2), textcoords="offset points", ha="center", fontsize="small")
            base_name = estimates[names[0]]["baseline"] if names else "baseline"
            ax.set_xticks(x, names, rotation=20, ha="right", fontsize="small")
            ax.set_ylabel(f"{what} per run ({uname})")
            ax.set_title(f"{hw}: {what} (hatched: static {base_name})", fontsize="medium")
            ax.grid(axis="y", alpha=0.3)
            ax.margins(y=0.12)
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) no other point beats on both (lower cost, higher accuracy)."""
    front = []
    for i, (c, a) in enumerate(points):
        if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto(labels: list[str], cost: list[float], acc: list[float], title: str,
           ylabel: str = "final test accuracy (%)", scale: float = 100.0, higher: bool = True) -> Figure:
    """Accuracy (or, higher=False, a loss) against cost for sweep points, the Pareto front joined and labeled."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    pts = list(zip(cost, acc))
    front = pareto_front(pts if higher else [(c, -a) for c, a in pts])
    ax.scatter(cost, [scale * a for a in acc], color="gray", s=30, zorder=2, label="grid point")
    ax.plot([cost[i] for i in front], [scale * acc[i] for i in front], "-o", color="tab:red", zorder=3,
            label="Pareto front")
    same: dict[tuple, list[int]] = {}               # points with identical results share one label
    for i, pt in enumerate(pts):
        same.setdefault(pt, []).append(i)
    for (c, a), idx in same.items():
        ax.annotate("\n".join(labels[i] for i in idx), (c, scale * a), xytext=(4, 4), textcoords="offset points",
                    fontsize="x-small", color="tab:red" if any(i in front for i in idx) else "dimgray")
    ax.margins(x=0.12, y=0.15)                      # room for the labels
    ax.set_xlabel("cumulative effective GMACs of the run")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right" if higher else "upper right")
    return fig
