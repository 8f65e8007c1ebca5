"""`fracgraph inspect`: what the passes did (or would do) to a model, with every decision's reason."""

from __future__ import annotations

from pathlib import Path

from .manifest import FILENAME, Manifest
from .policy import LayerPolicy


def _int_gemms(rec: dict | None) -> list[dict]:
    """The manifest's int_kernels record as rows: each forward GEMM and conv weight gradient, on integers or not."""
    if not rec:
        return []
    def row(e: dict, gemm: str, form: str) -> dict:
        return {"node": str(e.get("name", "?")), "gemm": gemm, "float_form": str(e.get(form, "-")),
                "int": bool(e.get("int")), "reason": str(e.get("reason", "-"))}

    return [row(c, "forward", "op_type") for c in rec.get("convs", []) if isinstance(c, dict)] + \
        [row(w, "weight gradient", "float_form") for w in rec.get("weight_grads", []) if isinstance(w, dict)]


def summarize(target: str, policy: LayerPolicy | None = None) -> dict:
    """A JSON-able summary of an artifact directory, or of the plan for a plain model."""
    p = Path(target)
    if p.is_dir() or (p / FILENAME).exists():
        m = Manifest.read(p)
        blocks, decisions, ops, points = m.blocks, m.decisions, m.ops, m.quant_points
        source, kind = m.source_model, "artifacts"
        blocks = [{"name": b.name, "kind": b.kind, "ops": b.ops} for b in blocks]
        decisions = [d.__dict__ for d in decisions]
        points = [q.__dict__ for q in points]
        precision = {"input": m.precision_input, "shape": [m.n_blocks, 3], "columns": ["act", "weight", "grad"],
                     "default_bits": m.default_bits}
        conv_dw = m.extra.get("conv_grad_w") or []
        conv_forms = m.extra.get("conv_forms") or []
        int_gemms = _int_gemms(m.extra.get("int_kernels"))
        task = m.task_info().to_dict()
        tables = m.extra.get("fp32_tables", []) + m.extra.get("quantized_tables", [])
        dfq = None if m.dfq is None else {k: m.dfq[k] for k in ("options", "weight_bits", "granularity",
                                                                "cost_weighting", "task_grad", "F", "gate_params",
                                                                "gate_dim", "embed_dim", "hidden")}
        if dfq is not None:   # the controller's cost table (quantize --dfq --cost; absent in older manifests: MACs)
            dfq.update({k: m.dfq[k] for k in ("cost", "cost_metric", "cost_batch", "cost_unit", "cost_table",
                                              "cost_fp32") if k in m.dfq})
            dfq["gated"] = list(m.dfq.get("gated", range(m.n_blocks)))
            dfq["static_blocks"] = [l for l in range(m.n_blocks) if l not in dfq["gated"]]
    else:
        from .build import embedding_tables, model_task, plan
        from .model import load_model

        model, task, _ = model_task(load_model(p))
        _, blist, dlist, ops = plan(model, policy or LayerPolicy())
        task, tables = task.to_dict(), embedding_tables(model, policy or LayerPolicy(), ops)
        blocks = [{"name": b.name, "kind": b.kind, "ops": b.ops} for b in blist]
        decisions = [d.__dict__ for d in dlist]
        points, source, kind, precision, dfq, conv_dw, conv_forms = [], str(p), "model (plan only)", None, None, [], []
        int_gemms = []
    total = sum(d["macs"] for d in ops)
    quant = sum(d["macs"] for d in ops if d["quantized"])
    return {
        "source": source, "kind": kind, "blocks": blocks, "decisions": decisions, "quant_points": points,
        "precision_input": precision, "dfq": dfq, "conv_weight_gradients": conv_dw, "conv_forms": conv_forms,
        "int_gemms": int_gemms,
        "task": task, "embedding_tables": tables, "fp32_tables": [t for t in tables if not t.get("quantized")],
        "ops": [{k: d[k] for k in ("name", "op_type", "macs", "block", "quantized")} for d in ops],
        "macs_per_sample": total, "quantized_macs_fraction": quant / total if total else 0.0,
    }


def render(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{summary['source']}[/bold] ({summary['kind']}): {len(summary['blocks'])} blocks, "
              f"{summary['macs_per_sample'] / 1e6:.2f} M forward MACs/sample, "
              f"{100 * summary['quantized_macs_fraction']:.1f}% of them quantized")
    task = summary.get("task")
    if task and task["kind"] == "language_model":
        from rich.markup import escape

        con.print(f"task: language model, input [cyan]{task['input_name']}[/cyan] {task['input_dtype']} token ids "
                  + escape(f"[batch, {task['context']}], logits [batch, {task['context']}, {task['num_classes']}]")
                  + ", loss cross-entropy over the vocabulary, mean over tokens")
        for e in task.get("extra_inputs") or []:
            con.print(escape(f"input {e['name']} ({e['dtype']} [batch, {task['context']}]): not fed; computed in-graph "
                             f"as {e['value']}, shaped like {e['like']} (packed text windows)"))
    for t in summary.get("embedding_tables", []):
        from rich.markup import escape

        con.print(escape(f"{t['node']} (Gather of {t['table']} {t['shape']}): ")
                  + f"[{'green' if t.get('quantized') else 'yellow'}]{escape(t['reason'])}[/]")
    kinds = {}
    for b in summary["blocks"]:
        kinds[b["kind"]] = kinds.get(b["kind"], 0) + 1
    con.print("blocks: " + ", ".join(f"{n} {k}" for k, n in kinds.items()) + " (a residual block is the region a "
              "residual Add closes, from its dominator; in a pre-LN transformer layer: the attention and the MLP)")
    for i, b in enumerate(summary["blocks"]):
        con.print(f"  block {i} {b['name']}: {len(b['ops'])} GEMMs")
    if summary["precision_input"]:
        pi = summary["precision_input"]
        con.print(f"precision input [cyan]{pi['input']}[/cyan] {pi['shape']} columns {pi['columns']}; "
                  f"{len(summary['quant_points'])} FW quant points + BW on every quantized GEMM output")
    if summary.get("dfq"):
        g = summary["dfq"]
        static = g.get("static_blocks") or []
        con.print(f"DFQ: one gate per block{f' except static block(s) {static} (act/weight/grad bits from the precision input: the run static --fw/--bw)' if static else ''} (GAP, 1x1 conv {g['gate_dim']}, ReLU, 1x1 conv {g['embed_dim']}, "
                  f"shared LSTM cell {g['hidden']}, linear, "
                  f"softmax; FP32, {len(g['gate_params'])} parameter tensors), choice per {g['granularity']}; "
                  f"options FW/BW {', '.join(f'{a}/{b}' for a, b in g['options'])}, weights {g['weight_bits']} bits; "
                  f"act/grad columns of the gated blocks' rows unused; cost weighting {g['cost_weighting']}, "
                  f"task gradient {g['task_grad']}; controller cost "
                  + (f"{g['cost']} {g['cost_metric']} (batch {g['cost_batch']})" if g.get("cost", "macs") != "macs"
                     else "effective MACs"))
    t = Table(title="layers")
    for col in ("layer", "op", "MACs/sample", "block", "decision"):
        t.add_column(col)
    macs = {d["name"]: d["macs"] for d in summary["ops"]}
    types = {d["name"]: d["op_type"] for d in summary["ops"]}
    for d in summary["decisions"]:
        mac = f"{macs[d['op']]:,}" if d["op"] in macs else "not costed"
        t.add_row(d["op"], types.get(d["op"], "-"), mac, "-" if d["block"] is None else str(d["block"]),
                  d["reason"], style=None if d["quantized"] else "yellow")
    con.print(t)
    if summary.get("conv_weight_gradients"):   # passes/conv_grad_w.py: the implementation of each conv's dW
        t = Table(title="conv weight gradients (conv-grad-w; costs: the pass's model, per image)")
        for col in ("ConvGrad node", "shape", "on", "why"):
            t.add_column(col)
        for c in summary["conv_weight_gradients"]:
            t.add_row(c["node"], c.get("shape", "-"), c["form"], c["reason"])
        con.print(t)
    if summary.get("int_gemms"):   # passes/int_gemm.py: which GEMMs run on integer codes at <= 8 bits
        t = Table(title="integer GEMMs (int-gemm; at act/weight or act/grad bits 1-8, else the float form)")
        for col in ("node", "GEMM", "float form", "on integers", "why"):
            t.add_column(col)
        for g in summary["int_gemms"]:
            t.add_row(g["node"], g["gemm"], g["float_form"], "yes" if g["int"] else "no", g["reason"],
                      style=None if g["int"] else "yellow")
        con.print(t)
    if summary.get("conv_forms"):   # passes/nchwc_conv.py: the implementation of each conv's forward and dX
        t = Table(title="conv forward and input-gradient forms (nchwc-conv; costs: the pass's model, per image)")
        for col in ("node", "role", "shape", "on", "why"):
            t.add_column(col)
        for c in summary["conv_forms"]:
            t.add_row(c["node"], c["role"], c.get("shape", "-"), c["form"], c["reason"])
        con.print(t)
