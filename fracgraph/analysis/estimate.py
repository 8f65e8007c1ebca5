"""Cost a training step and a training run on a hardware model (the library behind `fracgraph estimate`).

Bits come from the precision input's layout ([n_blocks, 3]: act, weight, grad; 0 = FP32). A run integrates the
step cost over the precision trace segment by segment: per block, the cost of each *distinct* bit triple is
computed once, so a 64k-segment DFQ trace is a few numpy gathers.

DFQ's skip option: a trace records per block the share of samples that ran it (`active`). A skipped sample costs
its block's GEMMs nothing except the shortcut's (the downsample conv), which the simulation computes at FP32 as the
release's `prev`; the host-side cp of a run (metrics `cp`, `cum_gmacs`) counts it the same way. The controller's
cost term counts a skip as 0 (the release's cost table), so the gated-block cp it steers excludes the shortcut.
Memory-bound ops (BN, ReLU, the add) of a skipped block are costed as if it ran.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import FracgraphError
from ..hwmodels import LEVELS, Cost, HwModel
from .training import COLS, FP32, StepOp, TrainingStep, training_step

_KEY = (4096, 64, 1)          # bit triple -> integer key (bits < 64)
SCOPES = ("step", "gemm")     # what a step counts: every op, or only the GEMMs (forward, error, weight gradient)


def bits_of(row, operands) -> tuple[int, int]:
    """Operand bits of a GEMM from its block's precision row; 0 (or a missing row) means FP32."""
    out = []
    for c in operands:
        v = int(round(float(row[COLS[c]]))) if row is not None else 0
        out.append(FP32 if v <= 0 else v)
    return out[0], out[1]


@dataclass
class StepCost:
    ops: list[tuple[StepOp, Cost]]
    total: Cost
    latency_s: float                  # under the chosen schedule (sequential sum or critical path)
    schedule: str

    def layers(self) -> list[dict]:
        """Per forward layer: its GEMM phases and memory-bound ops, in graph order."""
        rows: dict[str, dict] = {}
        for op, c in self.ops:
            key = op.layer or "loss"
            r = rows.setdefault(key, {"layer": key, "kind": op.kind, "macs": 0, "latency_s": 0.0,
                                      "energy_pj": 0.0, "phases": {}, "bits": None})
            if op.kind == "gemm":
                r["kind"] = "gemm"
            r["macs"] += c.macs
            r["latency_s"] += c.latency_s
            r["energy_pj"] += c.energy_total_pj
            ph = r["phases"].setdefault(op.phase, {"latency_s": 0.0, "energy_pj": 0.0, "macs": 0})
            ph["latency_s"] += c.latency_s
            ph["energy_pj"] += c.energy_total_pj
            ph["macs"] += c.macs
            if op.kind == "gemm" and op.phase == "fw":
                r["bits"] = op_bits_label(op, c)
        return list(rows.values())


def op_bits_label(op: StepOp, c: Cost) -> str:
    return c.detail.get("_bits", "")


class Estimator:
    """A training step on one hardware model; `overlap=True` schedules independent ops concurrently."""

    def __init__(self, step: TrainingStep, hw: HwModel, overlap: bool = False, shortcut_layers=(),
                 scope: str = "step"):
        if scope not in SCOPES:
            raise FracgraphError(f"--scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        self.step = step
        self.hw = hw
        self.overlap = overlap
        self.scope = scope                                  # gemm: memory-bound ops cost nothing
        self.shortcut_layers = frozenset(shortcut_layers)   # GEMMs a skipped block still runs (FP32)
        self._mem = {op.id: (hw.mem_cost(op.mem) if scope == "step" else Cost())
                     for op in step.ops if op.kind == "mem"}
        self._topo = step.topo()
        self._preds = [list(step.graph.predecessors(i)) for i in range(len(step.ops))]

    # -- one op, one step --------------------------------------------------------------------------------------
    def op_cost(self, op: StepOp, bits: np.ndarray | None, active: np.ndarray | None = None) -> Cost:
        if op.kind == "mem":
            return self._mem[op.id]
        row = bits[op.block] if (op.block is not None and bits is not None) else None
        a, b = bits_of(row, op.operands)
        total = Cost()
        for cv in op.convs:
            total = total + self.hw.conv_cost(replace(cv, a_bits=a, b_bits=b))
        total.detail["_bits"] = f"{a}x{b}"
        f = 1.0 if active is None or op.block is None else float(active[op.block])
        if f < 1.0:   # the skipped share: nothing, or the shortcut's GEMM at FP32
            label = total.detail["_bits"]
            total = total.scaled(f) + self.skipped_cost(op).scaled(1.0 - f)
            total.detail["_bits"] = label if f > 0 else "skip"
        return total

    def skipped_cost(self, op: StepOp) -> Cost:
        """A GEMM of a block whose gate chose skip: the shortcut's GEMMs run FP32, the others not at all."""
        if op.layer not in self.shortcut_layers:
            return Cost()
        return self.op_cost(replace(op, block=None), None)

    def step_cost(self, bits: np.ndarray | None, active: np.ndarray | None = None) -> StepCost:
        bits = None if bits is None else np.asarray(bits, dtype=np.float64).reshape(-1, 3)
        if bits is not None and self.step.n_blocks and bits.shape[0] != self.step.n_blocks:
            raise FracgraphError(f"precision has {bits.shape[0]} rows; the model has {self.step.n_blocks} blocks")
        per = [(op, self.op_cost(op, bits, active)) for op in self.step.ops]
        total = Cost()
        for _, c in per:
            total = total + c
        lat = self._critical_path(np.array([[c.latency_s for _, c in per]]))[0] if self.overlap else total.latency_s
        return StepCost(per, total, float(lat), "overlap" if self.overlap else "sequential")

    def _critical_path(self, lat: np.ndarray) -> np.ndarray:
        """Longest path through the step DAG for each row of per-op latencies [U, n_ops]."""
        fin = np.zeros_like(lat)
        for i in self._topo:
            p = self._preds[i]
            start = fin[:, p].max(axis=1) if p else 0.0
            fin[:, i] = start + lat[:, i]
        return fin.max(axis=1)

    def macs_cp(self, bits: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        """Effective MACs (MACs x a/32 x b/32, DESIGN.md) as % of FP32 MACs, per row of bits [S, n_blocks, 3]
        (active [S, n_blocks]: the share of samples that ran each block; a skipped sample runs only the shortcut
        GEMMs, FP32). Over the GEMMs the step runs: a layer that reads the data input has no error GEMM (the train
        loop's `cp` counts three GEMMs for every layer, so it differs by that layer's share)."""
        bits = np.asarray(bits, np.float64).reshape(-1, self.step.n_blocks, 3)
        act = np.ones(bits.shape[:2]) if active is None else np.asarray(active, np.float64).reshape(bits.shape[:2])
        eff = np.zeros(len(bits))
        total = 0.0
        for op in self.step.gemm_ops():
            total += op.macs
            if op.block is None:
                eff += op.macs
                continue
            a, b = (bits[:, op.block, COLS[c]] for c in op.operands)
            a, b = np.where(a <= 0, FP32, np.rint(a)), np.where(b <= 0, FP32, np.rint(b))
            ran = act[:, op.block]
            eff += op.macs * (ran * a * b / FP32 ** 2 + (1 - ran) * (op.layer in self.shortcut_layers))
        return 100 * eff / total

    # -- a run -------------------------------------------------------------------------------------------------
    def run_cost(self, starts: np.ndarray, bits: np.ndarray, total_steps: int, active: np.ndarray | None = None) -> dict:
        """Integrate over run-length segments: starts [S], bits [S, n_blocks, 3], active [S, n_blocks] (share of
        samples that ran each block; None = all). Returns totals and per-segment."""
        starts = np.asarray(starts, dtype=np.int64)
        bits = np.asarray(bits, dtype=np.float64)
        if bits.ndim != 3 or bits.shape[1] != self.step.n_blocks:
            raise FracgraphError(f"trace has {bits.shape[1] if bits.ndim == 3 else '?'} blocks; "
                                 f"the model has {self.step.n_blocks}")
        act = np.ones(bits.shape[:2]) if active is None else np.asarray(active, dtype=np.float64)
        n = np.diff(np.append(starts, total_steps)).clip(min=0).astype(np.float64)
        ib = np.rint(bits).astype(np.int64).clip(0, 63)
        keys = ib[..., 0] * _KEY[0] + ib[..., 1] * _KEY[1] + ib[..., 2]           # [S, B]
        uk, inv = np.unique(keys, return_inverse=True)
        inv = inv.reshape(keys.shape)
        U, B = len(uk), self.step.n_blocks
        L = len(LEVELS)
        n_ops = len(self.step.ops)
        const_lat = 0.0
        const_en = np.zeros(L)
        mem_lat, mem_en = 0.0, 0.0
        blk_lat = np.zeros((B, U))
        blk_en = np.zeros((B, U, L))
        skip_lat = np.zeros(B)          # a skipped block: its shortcut GEMMs at FP32
        skip_en = np.zeros((B, L))
        op_skip_lat = np.zeros(n_ops)
        present = [np.unique(inv[:, b]) for b in range(B)]
        op_lat_tab: dict[int, np.ndarray] = {}         # op id -> [U] latency (for the critical path)
        for op in self.step.ops:
            if op.kind == "mem" or op.block is None:
                c = self.op_cost(op, None)
                if op.kind == "mem":
                    mem_lat += c.latency_s
                    mem_en += c.energy_total_pj
                const_lat += c.latency_s
                const_en += [c.energy_pj[k] for k in LEVELS]
                op_lat_tab[op.id] = np.full(U, c.latency_s)
                continue
            tab = np.zeros(U)
            for u in present[op.block]:
                k = int(uk[u])
                row = np.array([k // _KEY[0], (k // _KEY[1]) % 64, k % 64], dtype=np.float64)
                c = self.op_cost(replace(op, block=0), row[None, :])
                tab[u] = c.latency_s
                blk_lat[op.block, u] += c.latency_s
                blk_en[op.block, u] += [c.energy_pj[k2] for k2 in LEVELS]
            op_lat_tab[op.id] = tab
            sc = self.skipped_cost(op)
            skip_lat[op.block] += sc.latency_s
            skip_en[op.block] += [sc.energy_pj[k2] for k2 in LEVELS]
            op_skip_lat[op.id] = sc.latency_s
        cols = np.arange(B)[None, :]
        seg_lat_seq = const_lat + (act * blk_lat[cols, inv] + (1 - act) * skip_lat[None, :]).sum(axis=1)   # [S]
        seg_en = const_en[None, :] + (act[..., None] * blk_en[cols, inv]
                                      + (1 - act[..., None]) * skip_en[None]).sum(axis=1)                  # [S, L]
        if self.overlap:
            cfg, cinv = np.unique(np.concatenate([inv, act], axis=1), axis=0, return_inverse=True)
            cinv = cinv.reshape(-1)
            crit = np.empty(len(cfg))
            blocks = np.array([-1 if (o.kind == "mem" or o.block is None) else o.block for o in self.step.ops])
            for s0 in range(0, len(cfg), 2048):
                chunk = cfg[s0:s0 + 2048, :B].astype(np.int64)
                share = cfg[s0:s0 + 2048, B:]
                lat = np.empty((len(chunk), n_ops))
                for op in self.step.ops:
                    b = blocks[op.id]
                    lat[:, op.id] = (share[:, b] * op_lat_tab[op.id][chunk[:, b]] + (1 - share[:, b]) * op_skip_lat[op.id]
                                     if b >= 0 else op_lat_tab[op.id][0])
                crit[s0:s0 + 2048] = self._critical_path(lat)
            seg_lat = crit[cinv]
        else:
            seg_lat = seg_lat_seq
        energy = (seg_en * n[:, None]).sum(axis=0)
        return {"steps": int(n.sum()), "latency_s": float((seg_lat * n).sum()),
                "energy_pj": {k: float(v) for k, v in zip(LEVELS, energy)},
                "energy_total_pj": float(energy.sum()), "segments": len(starts),
                "gemm_latency_s": float(((seg_lat_seq - mem_lat) * n).sum()),
                "gemm_energy_pj": float(((seg_en.sum(axis=1) - mem_en) * n).sum())}


# -- inputs ------------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """What `estimate` analyzes: a training step plus the layout of its precision input."""

    step: TrainingStep
    default_bits: np.ndarray           # [n_blocks, 3]
    quantized_blocks: list[int]
    name: str
    blocks: list[str] = field(default_factory=list)
    shortcut_layers: list[str] = field(default_factory=list)   # DFQ skip: GEMMs a skipped block still runs

    def uniform_bits(self, fw: float, bw: float) -> np.ndarray:
        """Every block at act=weight=fw, grad=bw (PFQ's convention: weights at the forward bits)."""
        return np.tile(np.array([fw, fw, bw], dtype=np.float64), (self.step.n_blocks, 1))


def _load(path) -> "object":
    from ..model import load_model
    return load_model(path)


def from_onnx(path, batch: int, strided_bw: str = "ideal", mem_bits: int = 32) -> Source:
    """A plain ONNX model: one precision row for all GEMMs, the layer policy's FP32 choices (last layer FP32)."""
    from ..policy import LayerPolicy
    from .optable import gemm_table
    model = _load(path)
    gemms = gemm_table(model)
    decisions = LayerPolicy().decide(gemms)
    op_block = {op.name: (0 if q else None) for op, q, _ in decisions}
    step = training_step(model, batch, op_block=op_block, n_blocks=1, gemms=gemms, strided_bw=strided_bw,
                         mem_bits=mem_bits)
    return Source(step, np.array([[8.0, 8.0, 8.0]]), [0], Path(str(path)).name, ["all"])


def from_artifacts(directory, batch: int, strided_bw: str = "ideal", mem_bits: int = 32) -> Source:
    """Artifacts: GEMMs and blocks from the manifest; memory-bound ops from the source (or eval) graph."""
    from ..manifest import Manifest
    from .optable import GemmOp
    m = Manifest.read(directory)
    d = Path(directory)
    src = Path(m.source_model)
    if src.is_file():
        model, skip = _load(src), (lambda n: False)
    else:
        ev = d / m.files.get("eval", "eval_model.onnx")
        if not ev.is_file():
            raise FracgraphError(f"{directory}: neither the source model {m.source_model} nor {ev.name} exists")
        import onnx
        model = onnx.shape_inference.infer_shapes(onnx.load(str(ev)))
        skip = (lambda n: "::" in n.name)        # nodes the quantize passes added (prefixed names)
    gemms = [GemmOp.from_dict(o) for o in m.ops]
    op_block = m.op_block()
    opt = m.optimizer or {}
    words = 5 if float(opt.get("momentum", 0) or 0) > 0 else 3
    step = training_step(model, batch, op_block=op_block, n_blocks=m.n_blocks, gemms=gemms,
                         strided_bw=strided_bw, optimizer_words=words, skip_nodes=skip, mem_bits=mem_bits)
    default = np.tile(np.asarray(m.default_bits, dtype=np.float64), (m.n_blocks, 1))
    shortcuts = [g for ops in ((m.dfq or {}).get("shortcut_ops") or []) for g in ops]
    return Source(step, default, sorted({b for b in op_block.values() if b is not None}), d.name,
                  [b.name for b in m.blocks], shortcuts)


def load_source(path, batch: int, strided_bw: str = "ideal", mem_bits: int = 32) -> Source:
    if strided_bw not in ("ideal", "naive"):
        raise FracgraphError(f"strided error convolution must be ideal or naive, not {strided_bw!r}")
    if mem_bits <= 0:
        raise FracgraphError(f"memory-op data width must be positive, not {mem_bits}")
    p = Path(path)
    if p.is_dir():
        return from_artifacts(p, batch, strided_bw, mem_bits)
    if p.is_file():
        return from_onnx(p, batch, strided_bw, mem_bits)
    raise FracgraphError(f"{path}: no such artifact directory or ONNX file")


def parse_baseline(s: str) -> tuple[float, float]:
    """'fw8bw8' -> (8, 8)."""
    m = re.fullmatch(r"\s*fw(\d+)\s*bw(\d+)\s*", s.lower())
    if not m:
        raise FracgraphError(f"--baseline {s!r}: expected the form fw8bw8")
    return float(m.group(1)), float(m.group(2))


# -- the report behind `fracgraph estimate` ----------------------------------------------------------------------

def _cost_dict(c: Cost, latency_s: float | None = None) -> dict:
    return {"latency_s": float(c.latency_s if latency_s is None else latency_s), "cycles": float(c.cycles),
            "macs": float(c.macs), "energy_pj": {k: float(v) for k, v in c.energy_pj.items()},
            "energy_total_pj": c.energy_total_pj}


def _ratio(x: float, base: float) -> float | None:
    """x as % of base (a cp in hardware units)."""
    return None if base <= 0 else 100.0 * x / base


def _saving(x: float, base: float) -> float | None:
    return None if base <= 0 else 1.0 - x / base


def report(path, hw_names, *, trace_dir=None, fw: float | None = None, bw: float | None = None, batch: int = 128,
           steps: int | None = None, baseline: str = "fw8bw8", overlap: bool = False,
           strided_bw: str = "ideal", hw_configs: dict | None = None, mem_bits: int = 32,
           scope: str = "step") -> dict:
    """Per-layer costs, per-step and per-run totals, and savings against a static baseline, on each model.

    `scope` "step" counts every op of the training step; "gemm" only the forward, error and weight-gradient
    GEMMs (memory-bound ops and the weight update cost nothing), the accounting the FracTrain paper's figures
    fit (README "Hardware estimates"). Each model also reports cp in its own units: the run's energy and latency
    as % of the same run at FP32 on that hardware (same scope), beside the effective-MAC cp."""
    from ..hwmodels import get_model
    from ..trace import Trace
    if batch <= 0:
        raise FracgraphError(f"--batch must be positive, not {batch}")
    if steps is not None and steps <= 0:
        raise FracgraphError(f"--steps must be positive, not {steps}")
    if (fw is None) != (bw is None):
        raise FracgraphError("give both --fw and --bw, or neither")
    if trace_dir is not None and fw is not None:
        raise FracgraphError("--trace and --fw/--bw are alternatives: the trace records the bits of every step")
    if scope not in SCOPES:
        raise FracgraphError(f"--scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    src = load_source(path, batch, strided_bw, mem_bits)
    bfw, bbw = parse_baseline(baseline)
    base_bits = src.uniform_bits(bfw, bbw)
    trace = Trace.read(trace_dir) if trace_dir is not None else None
    if trace is not None and trace.bits.shape[1] != src.step.n_blocks:
        raise FracgraphError(f"{trace_dir}: the trace has {trace.bits.shape[1]} blocks, the model "
                             f"{src.step.n_blocks}; was it recorded with these artifacts?")
    if trace is not None:
        step_bits = trace.bits[-1].astype(np.float64) if len(trace.bits) else src.default_bits
        step_active = trace.active[-1].astype(np.float64) if len(trace.bits) else None
        n_steps = trace.total_steps
        mode = "trace"
    else:
        step_bits = src.uniform_bits(fw, bw) if fw is not None else src.default_bits
        step_active = None
        n_steps = steps if steps is not None else 64000
        mode = "static"
    out = {"model": src.name, "batch": batch, "steps": n_steps, "mode": mode, "baseline": baseline,
           "schedule": "overlap" if overlap else "sequential", "scope": scope, "blocks": src.step.n_blocks, "hw": {}}
    fp32_bits = np.zeros((src.step.n_blocks, 3))
    for name in hw_names:
        hw = get_model(name, (hw_configs or {}).get(name))
        est = Estimator(src.step, hw, overlap=overlap, shortcut_layers=src.shortcut_layers, scope=scope)
        sc = est.step_cost(step_bits, step_active)
        bc = est.step_cost(base_bits)
        if trace is not None:
            run = est.run_cost(trace.starts, trace.bits, trace.total_steps, trace.active)
        else:
            run = est.run_cost(np.array([0]), step_bits[None], n_steps)
        brun = est.run_cost(np.array([0]), base_bits[None], n_steps)
        frun = est.run_cost(np.array([0]), fp32_bits[None], run["steps"])
        if trace is not None:
            w = np.diff(np.append(trace.starts, trace.total_steps)).clip(min=0)
            mcp = float(np.average(est.macs_cp(trace.bits, trace.active), weights=w)) if w.sum() else None
        else:
            mcp = float(est.macs_cp(step_bits[None])[0])
        gemm = [r for r in sc.layers() if r["kind"] == "gemm"]
        mem = [r for r in sc.layers() if r["kind"] != "gemm"]
        out["hw"][name] = {
            "freq_hz": hw.freq_hz,
            "layers": gemm,
            "memory_ops": {"count": len(mem), "latency_s": sum(r["latency_s"] for r in mem),
                           "energy_pj": sum(r["energy_pj"] for r in mem)},
            "step": _cost_dict(sc.total, sc.latency_s),
            "baseline_step": _cost_dict(bc.total, bc.latency_s),
            "run": run, "baseline_run": brun,
            "cp": {"macs": mcp, "energy": _ratio(run["energy_total_pj"], frun["energy_total_pj"]),
                   "latency": _ratio(run["latency_s"], frun["latency_s"])},
            "savings": {"macs": None if mcp is None else _saving(mcp, float(est.macs_cp(base_bits[None])[0])),
                        "latency": _saving(run["latency_s"], brun["latency_s"]),
                        "energy": _saving(run["energy_total_pj"], brun["energy_total_pj"]),
                        "gemm_latency": _saving(run["gemm_latency_s"], brun["gemm_latency_s"]),
                        "gemm_energy": _saving(run["gemm_energy_pj"], brun["gemm_energy_pj"])},
        }
    if "bitfusion" in out["hw"] and "eyeriss" in out["hw"]:
        a, b = out["hw"]["bitfusion"]["run"], out["hw"]["eyeriss"]["baseline_run"]
        out["cross"] = {"what": f"this run on bitfusion vs {baseline} on eyeriss",
                        "latency": _saving(a["latency_s"], b["latency_s"]),
                        "energy": _saving(a["energy_total_pj"], b["energy_total_pj"]),
                        "gemm_latency": _saving(a["gemm_latency_s"], b["gemm_latency_s"]),
                        "gemm_energy": _saving(a["gemm_energy_pj"], b["gemm_energy_pj"])}
    return out


# -- DFQ's hardware cost table (quantize --dfq --cost bitfusion|eyeriss|fpga) -------------------------------------

COST_MODELS = ("macs", "bitfusion", "eyeriss", "fpga")
COST_METRICS = ("energy", "latency")


def block_option_costs(step: TrainingStep, hw: HwModel, options, weight_bits: float, metric: str = "energy"):
    """(table [n_blocks, K], fp32 [n_blocks]): per precision block and DFQ option (act bits, grad bits), the
    energy (pJ) or latency (s) per sample of the block's forward, error and weight-gradient GEMMs on `hw` with
    that option's bits (weights at `weight_bits`), and the same GEMMs at FP32. These are exactly the per-layer
    GEMM costs `estimate` reports for a step whose block l runs option k (divided by the step's batch); the skip
    option ([0, 0]) costs 0, as the controller's MAC table counts it. Memory-bound ops are not in it: they do not
    depend on the bits."""
    if metric not in COST_METRICS:
        raise FracgraphError(f"--cost-metric must be one of {', '.join(COST_METRICS)}, not {metric!r}")
    est = Estimator(step, hw)
    n, K = step.n_blocks, len(options)
    table, fp32 = np.zeros((n, K)), np.zeros(n)

    def value(c: Cost) -> float:
        return c.energy_total_pj if metric == "energy" else c.latency_s

    gemms = [op for op in step.ops if op.kind == "gemm" and op.block is not None]
    for k, (a, g) in enumerate(options):
        if int(a) == 0 and int(g) == 0:
            continue                       # skip: the release's table counts it as 0
        row = np.array([[a, weight_bits, g]], np.float64)
        for op in gemms:
            table[op.block, k] += value(est.op_cost(replace(op, block=0), row))
    for op in gemms:
        fp32[op.block] += value(est.op_cost(replace(op, block=0), np.zeros((1, 3))))
    return table / step.batch, fp32 / step.batch


def dfq_cost_table(model, op_dicts: list[dict], n_blocks: int, options, weight_bits: float, hw_name: str,
                   metric: str = "energy", batch: int = 128) -> dict:
    """The manifest's description of a hardware cost table for DFQ's controller (see `block_option_costs`)."""
    from ..hwmodels import get_model
    from .optable import GemmOp
    if hw_name not in COST_MODELS[1:]:
        raise FracgraphError(f"--cost must be one of {', '.join(COST_MODELS)}, not {hw_name!r}")
    if batch <= 0:
        raise FracgraphError(f"--cost-batch must be positive, not {batch}")
    gemms = [GemmOp.from_dict(d) for d in op_dicts]
    op_block = {d["name"]: (d["block"] if d["quantized"] else None) for d in op_dicts}
    step = training_step(model, batch, op_block=op_block, n_blocks=n_blocks, gemms=gemms)
    table, fp32 = block_option_costs(step, get_model(hw_name), options, weight_bits, metric)
    if not (fp32 > 0).all():
        raise FracgraphError(f"{hw_name}: a gated block has no GEMM cost; the cost table cannot weigh it")
    return {"cost": hw_name, "cost_metric": metric, "cost_batch": batch,
            "cost_unit": "pJ per sample" if metric == "energy" else "s per sample",
            "cost_table": table.tolist(), "cost_fp32": fp32.tolist()}
