"""Deployable export (issue 19): a trained run -> an inference model whose only input is the data.

    fracgraph export RUN/ -o M.onnx [--bits final|best|FW[/W]] [--format qdq|float] [--dfq-gates bake|keep]

Mechanism (no network is re-derived): take the run's eval model (`last.onnx`/`best.onnx`: the eval graph with the
trained weights and the EMA ranges as initializers), make the precisions constants (the `fracgraph_bits` input
becomes an initializer; for DFQ, each gate's hard one-hot and mask become the chosen option's one-hot, so the
gates are dead code), then *probe* every FW quantizer's constant tensors (scale, min, bits switch, the weight's
rounded grid index and its quantized value) by running that very graph once in onnxruntime, and rewrite each
quantizer subgraph from the probed constants. Probing with onnxruntime instead of re-computing in numpy makes
the constants bit-identical to what the run's evaluation used.

Quantizer (quantizers.py), at eval: s = max(range / L, 1e-8), L = 2^b - 1, r = Round(Clip((x - min) / s, -0.49,
L + 0.49)), out = r * s + min (b = 0: out = x). Per point:

- `float`: weights become one initializer, already on their grid (the probed `out`); activations keep the six
  float ops with constant min, s, L: the exported graph computes what the eval graph computed, bit for bit.
- `qdq` (b <= 8): QuantizeLinear/DequantizeLinear with uint8 storage. ONNX's QuantizeLinear computes
  saturate(Round(x / s) + zp) with Round half to even, as fracgraph's `Round`, and DequantizeLinear (q - zp) * s.
  fracgraph's grid is {min + k s, k = 0..L}; QDQ's is {(q - zp) s}, the same grid exactly when -min / s is an
  integer (every activation after a ReLU: its EMA min is exactly 0). Otherwise the zero point must be an integer:
  zp = round(-min / s), which shifts the grid by (zp + min / s) s, at most s / 2 (the report lists each such point
  and its shift in steps); this is the reason a `qdq` export can differ from the run's evaluation. uint8's range
  is [0, 255]; for b < 8 the top of the grid (k = L) is enforced by a Clip at (L - zp) s in front of the
  QuantizeLinear (x / s of anything above rounds to L - zp, as the quantizer's clamp). Weights: per output
  channel (`axis`), the stored integers are the grid indices k (exact), zp per channel as above. Points at b > 8
  keep the float form (uint8 cannot hold their grid), and say so.

Names created here are prefixed `<point>::export/`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import FracgraphError
from .manifest import Manifest
from .train.dfq import gated_blocks, static_blocks

FORMATS = ("qdq", "float")
GATE_MODES = ("bake", "keep")
PRECISION_INPUT = "fracgraph_bits"
MAX_OPSET = 21          # onnxruntime 1.19 loads opset <= 21, IR <= 10
MAX_IR = 10


@dataclass
class ExportOptions:
    bits: str = "final"          # final | best | FW[/W]
    format: str = "qdq"          # qdq | float
    which: str | None = None     # weights: best | last (default: best for --bits best, else last)
    dfq_gates: str = "bake"      # DFQ runs: bake each block's option | keep the gates (float only)
    force: bool = False          # allow a precision the run never trained at
    zero_point: str = "exact"    # qdq, grids whose -min/s is not an integer: exact (x - min around Q/DQ, DQ + min
                                 # for weights) | round (canonical Q/DQ, zero point rounded: the grid moves)


@dataclass
class PointExport:
    name: str
    kind: str                    # act | weight
    bits: int
    form: str                    # qdq | float | fp32 (b = 0)
    zero_point_shift: float = 0.0   # max |zp - (-min/s)| in quantizer steps (0 = the QDQ grid is exactly the run's)
    note: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "bits": self.bits, "form": self.form,
                "zero_point_shift": round(self.zero_point_shift, 6), "note": self.note}


@dataclass
class ExportResult:
    path: Path
    model_file: str
    bits: np.ndarray             # [n_blocks, 3] baked (act, weight, grad); DFQ keep: act column NaN (None in JSON)
    dfq_options: list | None
    points: list[PointExport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nodes: int = 0

    def as_dict(self) -> dict:
        bits = [[None if np.isnan(v) else float(v) for v in row] for row in self.bits]
        return {"path": str(self.path), "model_file": self.model_file, "bits": bits,
                "dfq_options": self.dfq_options, "nodes": self.nodes, "notes": self.notes,
                "points": [p.as_dict() for p in self.points]}


# ---------------------------------------------------------------------------------------------- run and bits


def _read_run(run: Path) -> tuple[dict, Manifest]:
    if not run.is_dir():
        raise FracgraphError(f"{run} is not a directory: give a run directory written by `fracgraph train`")
    if not (run / "summary.json").exists():
        raise FracgraphError(f"{run} has no summary.json: it is not a finished `fracgraph train` run (finish it "
                             f"with `fracgraph train ... -o {run} --resume`)")
    summary = json.loads((run / "summary.json").read_text())
    given = Path(summary.get("artifacts") or "artifacts")
    # RUN/artifacts (built by `train M.onnx`), else the path train was given: as recorded (relative to where train
    # ran), or relative to the run directory's parent
    for art in (run / "artifacts", given, run.parent / given):
        if (art / "manifest.json").exists():
            break
    else:
        raise FracgraphError(f"the artifacts of {run} ({given}) are gone: export needs their manifest.json")
    return summary, Manifest.read(art)


def _trained_rows(run: Path) -> np.ndarray:
    from .trace import Trace

    if not (run / "trace.npz").exists():
        raise FracgraphError(f"{run} has no trace.npz: it is not a finished `fracgraph train` run")
    return Trace.read(run).bits


def _best_bits(run: Path, n_blocks: int) -> np.ndarray:
    best, bits = -1.0, None
    path = run / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "test_acc" in rec and rec["test_acc"] > best:   # the loop writes best.onnx on a strict improvement
                best, bits = rec["test_acc"], rec["bits"]
    if bits is None:
        raise FracgraphError(f"{run}/metrics.jsonl has no evaluation: no best model to take bits from; use "
                             f"--bits final")
    return np.asarray(bits, np.float32).reshape(n_blocks, 3)


def parse_bits(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:/\s*(\d+)\s*)?", text)
    if not m:
        raise FracgraphError(f"--bits {text!r}: give final, best, FW (activations and weights) or FW/W, e.g. 4 or 4/8")
    fw = int(m.group(1))
    w = int(m.group(2)) if m.group(2) is not None else fw
    if fw > 32 or w > 32:
        raise FracgraphError(f"--bits {text!r}: at most 32 bits")
    return fw, w


def _resolve_plain(run: Path, summary: dict, manifest: Manifest, opts: ExportOptions) -> np.ndarray:
    n = manifest.n_blocks
    rows = _trained_rows(run)
    if opts.bits == "final":
        return np.asarray(rows[-1], np.float32)
    if opts.bits == "best":
        return _best_bits(run, n)
    fw, w = parse_bits(opts.bits)
    bits = np.tile(np.array([fw, w, 8], np.float32), (n, 1))
    trained = {(float(a), float(b)) for seg in rows for a, b, _ in seg}
    if (float(fw), float(w)) not in trained and not opts.force:
        seen = ", ".join(f"{int(a)}/{int(b)}" for a, b in sorted(trained))
        raise FracgraphError(f"--bits {opts.bits}: the run never trained at FW {fw}/W {w} (it trained at {seen}); "
                             f"pass --force to export it anyway")
    return bits


def _resolve_dfq(summary: dict, manifest: Manifest, opts: ExportOptions) -> tuple[np.ndarray, list[int]]:
    """(bits [n, 3], chosen option index per gated block, in gate order) for a DFQ run. A static (ungated) block's
    row is what the run fed it, [fw, fw, bw] of its config (train/dfq.py `bits_input`); with --bits FW/W, FW/W."""
    dfq = manifest.dfq
    options = [tuple(o) for o in dfq["options"]]
    labels = [("skip" if tuple(o) == (0, 0) else f"{o[0]}/{o[1]}") for o in options]
    wb = float(dfq["weight_bits"])
    gated, static = gated_blocks(manifest), static_blocks(manifest)
    n = len(gated)
    cfg = summary.get("config") or {}
    sfw, sbw = float(cfg.get("fw", 8)), float(cfg.get("bw", 8))
    if opts.bits in ("final", "best"):
        hist = (summary.get("dfq") or {}).get("choice_histogram")
        if not hist:
            raise FracgraphError("summary.json has no DFQ choice histogram: this DFQ run did not finish; resume it")
        chosen = []
        for row in hist:
            counts = [row["counts"].get(lbl, 0) for lbl in labels]
            chosen.append(int(np.argmax(counts)))          # ties: the first option (cheapest in the CIFAR list)
    else:
        fw, w = parse_bits(opts.bits)
        match = [k for k, o in enumerate(options) if o[0] == fw]
        if (not match or w != wb) and not opts.force:
            raise FracgraphError(f"--bits {opts.bits}: the run's DFQ options have act bits "
                                 f"{sorted({o[0] for o in options if o != (0, 0)})} and weights at {int(wb)}; "
                                 f"pass --force to export FW {fw}/W {w} anyway")
        if w != wb:
            raise FracgraphError(f"--bits {opts.bits}: DFQ weights are quantized at --weight-bits {int(wb)} in "
                                 f"the graph; export them at {int(wb)}")
        # the option with these act bits; with --force and none, the first precision option with its act bits
        # replaced (the gates' one-hot must still be a constant for the skip mix and the cost nodes)
        chosen = [match[0] if match else next(k for k, o in enumerate(options) if o != (0, 0))] * n
        bits = np.zeros((manifest.n_blocks, 3), np.float32)
        bits[gated] = [[fw, wb, options[k][1]] for k in chosen]
        bits[static] = [fw, w, sbw]
        return bits, chosen
    bits = np.zeros((manifest.n_blocks, 3), np.float32)
    bits[gated] = [[options[k][0], 0.0 if options[k] == (0, 0) else wb, options[k][1]] for k in chosen]
    bits[static] = [sfw, sfw, sbw]
    return bits, chosen


# ---------------------------------------------------------------------------------------------- graph helpers


def _prune(model: onnx.ModelProto) -> None:
    """Dead-code elimination from the graph outputs; unused initializers and inputs go too."""
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    need = {o.name for o in g.output}
    keep, stack = set(), list(need)
    while stack:
        t = stack.pop()
        i = producer.get(t)
        if i is None or i in keep:
            continue
        keep.add(i)
        stack.extend(x for x in g.node[i].input if x)
        need.update(g.node[i].input)
    nodes = [n for i, n in enumerate(g.node) if i in keep]
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in g.initializer if t.name in need]
    del g.initializer[:]
    g.initializer.extend(inits)
    ins = [i for i in g.input if i.name in need]
    del g.input[:]
    g.input.extend(ins)
    vis = [v for v in g.value_info if v.name in need]
    del g.value_info[:]
    g.value_info.extend(vis)


def _make_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """`name` becomes an initializer: its producing node loses that output (and goes if it has no other)."""
    g = model.graph
    for i, n in enumerate(list(g.node)):
        if name in n.output:
            if len(n.output) == 1:
                g.node.remove(n)
            else:
                n.output[list(n.output).index(name)] = ""
            break
    for i, inp in enumerate(g.input):
        if inp.name == name:
            del g.input[i]
            break
    for t in list(g.initializer):
        if t.name == name:
            g.initializer.remove(t)
    g.initializer.append(numpy_helper.from_array(np.asarray(value), name))


def _probe(model: onnx.ModelProto, names: list[str], input_name: str, input_shape: list) -> dict[str, np.ndarray]:
    """The values of `names` in `model` (constants: the data input is fed zeros) computed by onnxruntime."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]          # shapes recorded for per-sample bits no longer hold once the bits are scalars
    have = {o.name for o in m.graph.output}
    for nm in dict.fromkeys(names):
        if nm not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=nm))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # values, not a faster graph
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    spec = next(i for i in sess.get_inputs() if i.name == input_name)
    dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}.get(spec.type, np.float32)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape] if spec.shape else [1] + list(input_shape)
    x = np.zeros(shape, dtype)       # zeros: valid for images and token ids; the probed tensors do not depend on it
    outs = sess.run(list(dict.fromkeys(names)), {input_name: x})
    return dict(zip(dict.fromkeys(names), outs))


# ---------------------------------------------------------------------------------------------- quantizer rewrite


@dataclass
class _Point:
    name: str
    kind: str
    x: str                       # the tensor it quantizes
    min_t: str                   # the min it centres on (weights: per-channel min; acts: the EMA run_min)
    on: str | None               # bool switch (Where condition); None: always on
    hi: str                      # L + 0.49 (the clamp's upper bound)
    axis: int = 0                # weights: the output-channel axis


def _find_points(model: onnx.ModelProto, manifest: Manifest) -> list[_Point]:
    producer = {o: n for n in model.graph.node for o in n.output}
    points = []
    for p in manifest.quant_points:
        if p.kind not in ("act", "weight"):
            continue
        out = producer.get(f"{p.name}/out")
        if out is None:
            if any(x.startswith(p.name) for n in model.graph.node for x in n.input):
                raise FracgraphError(f"quant point {p.name} has no `/out` tensor in the run's model: these "
                                     f"artifacts are from an older fracgraph; re-quantize and re-train")
            continue                                            # pruned (e.g. a candidate clone): nothing to do
        cen = producer.get(f"{p.name}/centered")
        clamp = producer.get(f"{p.name}/clamped")
        if cen is None or clamp is None:
            raise FracgraphError(f"quant point {p.name}: its subgraph is not the quantizer of quantizers.py "
                                 f"(no /centered or /clamped): cannot export it")
        hi = clamp.input[2] if clamp.op_type == "Clip" else clamp.input[1]
        on = out.input[0] if out.op_type == "Where" else None
        axis = 0
        if p.kind == "weight":
            from .passes.fw_quant import weight_channel_axes

            gemm = next(n for n in model.graph.node if n.name == p.op)
            inits = {t.name: t for t in model.graph.initializer}
            rank = len(inits[cen.input[0]].dims) if cen.input[0] in inits else 4
            trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
            reduced = weight_channel_axes(gemm.op_type, rank, trans_b)
            axis = next(a for a in range(rank) if a not in reduced)
        points.append(_Point(p.name, p.kind, cen.input[0], cen.input[1], on, hi, axis))
    return points


def _rewrite(model: onnx.ModelProto, points: list[_Point], values: dict, fmt: str, rewrite_acts: bool,
             zero_point: str = "exact") -> list[PointExport]:
    g = model.graph
    done: list[PointExport] = []
    new_nodes: list[onnx.NodeProto] = []
    for p in points:
        if p.kind == "act" and not rewrite_acts:
            continue
        on = bool(np.all(values[p.on])) if p.on else True
        L = int(round(float(np.asarray(values[p.hi]).reshape(-1)[0]) - 0.49))
        b = int(round(np.log2(L + 1))) if on else 0
        pre = f"{p.name}::export"
        out = f"{p.name}/out"
        # drop the quantizer's own nodes (all named `<point>/...`); its output is re-made below
        for n in [n for n in g.node if any(o.startswith(p.name + "/") for o in n.output)]:
            g.node.remove(n)
        if p.kind == "weight":
            w = values[out]
            if not on:
                done.append(PointExport(p.name, "weight", 0, "fp32"))
                g.initializer.append(numpy_helper.from_array(w.astype(np.float32), out))
                continue
            k = values[f"{p.name}/rounded"]
            s = values[f"{p.name}/scale"]
            mn = values[p.min_t]
            if fmt == "qdq" and b <= 8:
                s_c, mn_c = s.reshape(-1).astype(np.float32), mn.reshape(-1).astype(np.float32)
                shape = [-1 if a == p.axis else 1 for a in range(w.ndim)]
                zf = -mn_c.astype(np.float64) / s_c.astype(np.float64)
                zp = np.clip(np.round(zf), 0, 255)
                canon = ((k.astype(np.int32) - zp.reshape(shape).astype(np.int32)).astype(np.float32)
                         * s_c.reshape(shape)) == w
                g.initializer.extend([numpy_helper.from_array(k.astype(np.uint8), f"{pre}/q"),
                                      numpy_helper.from_array(s_c, f"{pre}/scale")])
                if canon.all() or zero_point == "round":
                    g.initializer.append(numpy_helper.from_array(zp.astype(np.uint8), f"{pre}/zero_point"))
                    new_nodes.append(helper.make_node("DequantizeLinear", [f"{pre}/q", f"{pre}/scale", f"{pre}/zero_point"],
                                                      [out], name=f"{pre}/dq", axis=p.axis))
                    done.append(PointExport(p.name, "weight", b, "qdq", 0.0 if canon.all() else float(np.abs(zf - zp).max())))
                else:   # w = DQ(k, s, 0) + min per channel: the quantizer's own Mul then Add, bit for bit
                    g.initializer.extend([numpy_helper.from_array(np.zeros_like(s_c, np.uint8), f"{pre}/zero_point"),
                                          numpy_helper.from_array(mn_c.reshape(shape), f"{pre}/min")])
                    new_nodes.append(helper.make_node("DequantizeLinear", [f"{pre}/q", f"{pre}/scale", f"{pre}/zero_point"],
                                                      [f"{pre}/k_s"], name=f"{pre}/dq", axis=p.axis))
                    new_nodes.append(helper.make_node("Add", [f"{pre}/k_s", f"{pre}/min"], [out], name=f"{pre}/add_min"))
                    done.append(PointExport(p.name, "weight", b, "qdq+min"))
                continue
            g.initializer.append(numpy_helper.from_array(w.astype(np.float32), out))
            done.append(PointExport(p.name, "weight", b, "float", note="" if fmt == "float" else
                                    "above 8 bits: uint8 cannot hold the grid"))
            continue
        # activation
        if not on:
            new_nodes.append(helper.make_node("Identity", [p.x], [out], name=f"{pre}/fp32"))
            done.append(PointExport(p.name, "act", 0, "fp32"))
            continue
        s = np.float32(np.asarray(values[f"{p.name}/scale"]).reshape(-1)[0])
        mn = np.float32(np.asarray(values[p.min_t]).reshape(-1)[0])
        if fmt == "qdq" and b <= 8:
            zf = -float(mn) / float(s)
            offset = mn != 0 and zero_point == "exact"      # Q(x - min, s, 0), DQ, + min: the exact grid
            zp = 0 if mn == 0 or offset else int(np.clip(np.round(zf), 0, L))
            consts = {"scale": np.array(s, np.float32), "zero_point": np.array(zp, np.uint8)}
            src = p.x
            if offset:
                consts["min"] = np.array(mn, np.float32)
                src = f"{pre}/centered"
                new_nodes.append(helper.make_node("Sub", [p.x, f"{pre}/min"], [src], name=src))
            if L < 255:     # the grid's top (k = L) in front of the uint8 Q, whose own saturation is at 255
                consts["hi"] = np.array(np.float32(L - zp) * s, np.float32)
                new_nodes.append(helper.make_node("Clip", [src, "", f"{pre}/hi"], [f"{pre}/clip"], name=f"{pre}/clip"))
                src = f"{pre}/clip"
            for nm, v in consts.items():
                g.initializer.append(numpy_helper.from_array(v, f"{pre}/{nm}"))
            new_nodes.append(helper.make_node("QuantizeLinear", [src, f"{pre}/scale", f"{pre}/zero_point"], [f"{pre}/q"],
                                              name=f"{pre}/q"))
            dq_out = f"{pre}/dq" if offset else out
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{pre}/q", f"{pre}/scale", f"{pre}/zero_point"],
                                              [dq_out], name=f"{pre}/dq"))
            if offset:
                new_nodes.append(helper.make_node("Add", [dq_out, f"{pre}/min"], [out], name=f"{pre}/add_min"))
            done.append(PointExport(p.name, "act", b, "qdq+min" if offset else "qdq",
                                    0.0 if mn == 0 or offset else abs(zf - zp)))
            continue
        # float: the quantizer's own ops with its constants (bit for bit what the eval graph computed)
        for nm, v in (("min", mn), ("scale", s), ("lo", np.float32(-0.49)), ("hi", values[p.hi])):
            g.initializer.append(numpy_helper.from_array(np.asarray(v, np.float32).reshape(()), f"{pre}/{nm}"))
        chain = [("Sub", [p.x, f"{pre}/min"], "centered"), ("Div", [f"{pre}/centered", f"{pre}/scale"], "u"),
                 ("Clip", [f"{pre}/u", f"{pre}/lo", f"{pre}/hi"], "clamped"), ("Round", [f"{pre}/clamped"], "rounded"),
                 ("Mul", [f"{pre}/rounded", f"{pre}/scale"], "descaled")]
        for op, ins, nm in chain:
            new_nodes.append(helper.make_node(op, ins, [f"{pre}/{nm}"], name=f"{pre}/{nm}"))
        new_nodes.append(helper.make_node("Add", [f"{pre}/descaled", f"{pre}/min"], [out], name=f"{pre}/q"))
        done.append(PointExport(p.name, "act", b, "float", note="" if fmt == "float" else
                                "above 8 bits: uint8 cannot hold the grid"))
    g.node.extend(new_nodes)
    return done


def _toposort(model: onnx.ModelProto) -> None:
    g = model.graph
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, order = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(x in ready for x in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = sorted({x for n in rest for x in n.input if x not in ready})[:3]
            raise FracgraphError(f"internal: the exported graph reads undefined tensors {missing}")
        pending = rest
    del g.node[:]
    g.node.extend(order)


# ---------------------------------------------------------------------------------------------- entry point


def export_run(run_dir: str, output: str, opts: ExportOptions | None = None) -> ExportResult:
    """Write the run's deployable inference model to `output` (nothing is written on any error)."""
    from .train import runio

    opts = opts or ExportOptions()
    if opts.format not in FORMATS:
        raise FracgraphError(f"--format {opts.format!r}: use qdq or float")
    if opts.zero_point not in ("exact", "round"):
        raise FracgraphError(f"--zero-point {opts.zero_point!r}: use exact or round")
    if opts.dfq_gates not in GATE_MODES:
        raise FracgraphError(f"--dfq-gates {opts.dfq_gates!r}: use bake or keep")
    if opts.which not in (None, "best", "last"):
        raise FracgraphError(f"--which {opts.which!r}: use best or last")
    run = Path(run_dir)
    summary, manifest = _read_run(run)
    which = opts.which or ("best" if opts.bits == "best" else "last")
    src = run / f"{which}.onnx"
    if not src.exists():
        raise FracgraphError(f"{src} does not exist: {run} has no {which} model (no checkpoint was evaluated); "
                             f"train it further or use --which {'last' if which == 'best' else 'best'}")
    if Path(output).resolve() in {(run / f).resolve() for f in ("best.onnx", "last.onnx")}:
        raise FracgraphError(f"-o {output} would overwrite the run's own model; write the export elsewhere")
    dfq = manifest.dfq
    keep = bool(dfq) and opts.dfq_gates == "keep"
    if keep and opts.format == "qdq":
        raise FracgraphError("--dfq-gates keep leaves the activation bits to the gates (per batch or sample), "
                             "which QuantizeLinear's constant scale cannot take: use --format float with it, or "
                             "bake the gates (--dfq-gates bake)")
    if dfq and not keep and dfq.get("granularity") == "candidates":
        raise FracgraphError("a `--granularity candidates` DFQ run computes every option per block; baking one "
                             "option is not supported: export it with --dfq-gates keep --format float")
    try:
        model = onnx.load(str(src))
    except Exception as e:  # a truncated or foreign file: protobuf's DecodeError and friends
        raise FracgraphError(f"{src} is not a readable ONNX model ({type(e).__name__}); re-export it from the run's "
                             f"checkpoint with `fracgraph train ... --resume`") from None
    names = {i.name for i in model.graph.input}
    if manifest.precision_input not in names:
        raise FracgraphError(f"{src} has no {manifest.precision_input} input: it is not a fracgraph run's model")

    chosen = None
    if dfq:
        bits, chosen = _resolve_dfq(summary, manifest, opts)
    else:
        bits = _resolve_plain(run, summary, manifest, opts)
    fed = bits.copy()
    _make_constant(model, manifest.precision_input, fed.astype(np.float32))
    notes = [f"input {e['name']} of the source model ({e['dtype']}) is not an input: it is computed in-graph as "
             f"{e['value']}, shaped like {e['like']}, as in training" for e in (manifest.task or {}).get("extra_inputs") or []]
    if dfq and not keep:
        K = len(dfq["options"])
        batch_mode = dfq["granularity"] == "batch"
        for l, k in zip(gated_blocks(manifest), chosen):
            q = f"dfq::b{l}"
            hot = (np.arange(K) == k).astype(np.float32).reshape((K, 1) if batch_mode else (1, K, 1))
            for t in (f"{q}/hard", f"{q}/mask"):
                _make_constant(model, t, hot)
            _make_constant(model, f"{manifest.precision_input}::b{l}.act", np.array(bits[l, 0], np.float32))
            lbl = "skip" if tuple(dfq["options"][k]) == (0, 0) else f"{int(bits[l, 0])}/{int(bits[l, 2])}"
            notes.append(f"block {l} ({manifest.blocks[l].name}): DFQ gate baked to option {lbl}")
    elif keep:
        bits[:, 0] = np.nan
        notes.append("DFQ gates kept: activation bits are chosen per " + dfq["granularity"])
    _prune(model)
    points = _find_points(model, manifest)
    probe = []
    for p in points:
        if p.kind == "act" and keep:
            continue
        probe += [p.hi, p.min_t, f"{p.name}/scale"] + ([p.on] if p.on else [])
        if p.kind == "weight":
            probe += [f"{p.name}/out", f"{p.name}/rounded"]
    values = _probe(model, probe, manifest.input_name, manifest.input_shape) if probe else {}
    done = _rewrite(model, points, values, opts.format, rewrite_acts=not keep, zero_point=opts.zero_point)
    _prune(model)
    _toposort(model)
    _finish(model)
    leftover = [i.name for i in model.graph.input if i.name != manifest.input_name]
    if leftover:
        raise FracgraphError(f"the exported graph still reads {leftover}: this model's DFQ/training inputs "
                             f"cannot be made constant; export with --dfq-gates keep --format float")
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise FracgraphError(f"internal: the exported model fails onnx.checker ({str(e).splitlines()[0]})") from None
    data = model.SerializeToString()
    path = runio.atomic_write_bytes(output, data, what="exported model")
    nudged = [p for p in done if p.zero_point_shift > 0]
    if opts.format == "qdq" and nudged:
        notes.append(f"{len(nudged)} of {len(done)} quant points have a non-integer zero point (-min/s); rounded, "
                     f"their grid moves by at most {max(p.zero_point_shift for p in nudged):.3f} step")
    return ExportResult(path, src.name, bits, [list(o) for o in dfq["options"]] if dfq else None, done, notes,
                        len(model.graph.node))


def _finish(model: onnx.ModelProto) -> None:
    """Only the default domain's ops remain: opset imports trimmed to it, within what onnxruntime 1.19 loads."""
    foreign = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        ops = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
        raise FracgraphError(f"the run's model has ops outside standard ONNX ({', '.join(ops[:3])}): no plain "
                             f"inference engine runs them; export cannot express them in --format qdq or float")
    version = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)
    if version > MAX_OPSET:
        raise FracgraphError(f"the model's opset {version} is above what onnxruntime 1.19 loads ({MAX_OPSET})")
    if version < 13 and any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise FracgraphError(f"the run's model is opset {version}; per-channel DequantizeLinear needs opset 13: "
                             f"export it with --format float (or re-quantize the model at opset >= 13)")
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", version))
    model.ir_version = min(model.ir_version, MAX_IR)
    del model.graph.value_info[:]
    for o in model.graph.output:
        o.type.tensor_type.elem_type = o.type.tensor_type.elem_type or TensorProto.FLOAT


def evaluate_export(path: str | Path, run_dir: str, batch: int | None = None, optimize: bool = True) -> dict:
    """The exported model in a plain onnxruntime InferenceSession on the run's own data, as the run's final
    evaluation measured it: test accuracy (classification; same normalization, order and batch size), or the mean
    validation cross-entropy per token (a language-model run, `--data text:`; the same validation windows).
    optimize=False runs it without onnxruntime's graph optimizations, as they can fuse differently in the exported
    graph (its weights are constants: Conv+BatchNorm fold) than in the run's eval graph, moving logits in the last
    bits."""
    import onnxruntime as ort

    from .train.data import eval_batches, load_dataset

    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    cfg = summary.get("config", {})
    batch = batch or int(cfg.get("batch", 128))
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    spec = sess.get_inputs()[0]
    if str(cfg.get("data") or "").startswith("text:"):
        return _evaluate_lm(sess, spec, cfg, batch, summary)
    ds = load_dataset(cfg.get("data"))
    correct = total = 0
    for x, y in eval_batches(ds, batch):
        logits = sess.run(None, {spec.name: x})[0]
        correct += int((np.argmax(logits, 1) == y).sum())
        total += len(y)
    return {"test_acc": correct / max(total, 1), "correct": correct, "total": total, "batch": batch,
            "run_final_test_acc": summary.get("final_test_acc")}


def _evaluate_lm(sess, spec, cfg: dict, batch: int, summary: dict) -> dict:
    from .train.text import load_text, validation_windows

    ds = load_text(str(cfg["data"])[len("text:"):])
    context = spec.shape[1] if len(spec.shape) > 1 and isinstance(spec.shape[1], int) else None
    if context is None:
        raise FracgraphError(f"the exported model's input {spec.name} has no fixed sequence length")
    dtype = {"tensor(int32)": np.int32}.get(spec.type, np.int64)
    starts = validation_windows(ds, context, batch)
    offsets = np.arange(context + 1)
    total = 0.0
    for i in range(0, len(starts), batch):
        w = ds.val[starts[i:i + batch, None] + offsets]
        logits = sess.run(None, {spec.name: w[:, :-1].astype(dtype)})[0].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        nll = lse - np.take_along_axis(logits, w[:, 1:, None].astype(np.int64), -1)[..., 0]
        total += float(nll.mean()) * len(w)
    return {"val_loss": total / max(len(starts), 1), "windows": int(len(starts)), "batch": batch,
            "run_final_val_loss": summary.get("final_val_loss")}
