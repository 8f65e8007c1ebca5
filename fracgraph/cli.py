"""The `fracgraph` command: parse, call the library, render. No logic a test cannot reach without the CLI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


def _fail(message: str, code: int = 2):
    from rich.console import Console
    from rich.markup import escape

    # escaped: a message may hold brackets (paths, "fracgraph[ray]") that rich would read as markup
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def cli_errors(fn):
    """Turn a FracgraphError into one red line on stderr and exit code 2; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from fracgraph.errors import FracgraphError

        try:
            return fn(*args, **kwargs)
        except FracgraphError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper


@app.callback()
def main() -> None:
    """FracTrain-style fractional quantized training for ONNX models."""


@app.command()
@cli_errors
def zoo(
    name: str = typer.Argument(..., help="Model name: resnet20/38/74/110, resnet164, mobilenetv2, digitnet (1x8x8, for the default digits data), gpt (character-level transformer)."),
    output: str = typer.Option(..., "-o", "--output", help="Where to write the ONNX model."),
    classes: int = typer.Option(10, "--classes", help="Number of classes: 10 or 100."),
    seed: int = typer.Option(0, "--seed", help="Init seed; the same seed gives the same bytes."),
    layers: int = typer.Option(None, "--layers", help="gpt: transformer layers (default 4)."),
    heads: int = typer.Option(None, "--heads", help="gpt: attention heads (default 4)."),
    width: int = typer.Option(None, "--width", help="gpt: embedding width (default 128)."),
    context: int = typer.Option(None, "--context", help="gpt: sequence length T of the input ids (default 64)."),
    vocab: int = typer.Option(None, "--vocab", help="gpt: vocabulary size (default 65, tinyshakespeare's characters)."),
) -> None:
    """Export a reference model (FracTrain's CIFAR zoo, or a nanoGPT-style character GPT) to ONNX."""
    from fracgraph.errors import FracgraphError
    from fracgraph.zoo import export, export_gpt

    sizes = {k: v for k, v in (("layers", layers), ("heads", heads), ("width", width), ("context", context),
                               ("vocab", vocab)) if v is not None}
    if name == "gpt":
        typer.echo(str(export_gpt(output, seed=seed, **sizes)))
        return
    if sizes:
        raise FracgraphError(f"--{', --'.join(sizes)} apply to the gpt model only, not {name!r}")
    typer.echo(str(export(name, output, classes=classes, seed=seed)))


def _policy(policy_file: str | None, first: str | None, last: str | None, fp32: list[str] | None):
    from fracgraph.policy import LayerPolicy

    pol = LayerPolicy.from_file(policy_file) if policy_file else LayerPolicy()
    if first:
        pol.first = first
    if last:
        pol.last = last
    pol.fp32 = list(pol.fp32) + list(fp32 or [])
    pol.__post_init__()
    return pol


@app.command()
@cli_errors
def quantize(
    model: str = typer.Argument(..., help="The ONNX model to rewrite."),
    output: str = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
    fw: float = typer.Option(8, "--fw", help="Default forward bits (activations and weights) recorded in the manifest."),
    bw: float = typer.Option(8, "--bw", help="Default backward (error) bits recorded in the manifest."),
    policy: str = typer.Option(None, "--policy", help="Layer policy JSON: {first, last, fp32: [globs], quantize: [globs], embeddings: fp32|quantize}."),
    first: str = typer.Option(None, "--first", help="First GEMM: fp32 or quantize (default quantize). With --dfq: static (default: quantized without a gate at the run's --fw/--bw), fp32 (the authors' DFQ ResNet) or quantize (gated like the rest)."),
    last: str = typer.Option(None, "--last", help="Last GEMM (classifier): fp32 or quantize (default fp32)."),
    keep_fp32: list[str] = typer.Option(None, "--keep-fp32", help="Node-name glob to keep FP32 (repeatable)."),
    keep_static: list[str] = typer.Option(None, "--keep-static", help="With --dfq: GEMM-name glob whose block gets no gate and trains at the run's static --fw/--bw (repeatable)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (momentum 0.9, FracTrain's) or adamw."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    dfq: bool = typer.Option(False, "--dfq", help="Add DFQ precision gates and the cost term (train with --schedule dfq or fractrain); the first GEMM defaults to static (quantized, ungated; see --first)."),
    options: str = typer.Option("3/6,4/6,4/8,6/8,6/12", "--options", help="DFQ options as FW/BW bits pairs (CIFAR defaults); add `skip` to let a gate skip a residual block (e.g. 3/6,4/6,4/8,6/8,skip)."),
    weight_bits: int = typer.Option(4, "--weight-bits", help="DFQ static weight bits."),
    granularity: str = typer.Option("batch", "--granularity", help="DFQ choice per mini-batch (batch), per sample with one GEMM per layer (sample), or per sample over K computed candidates per block (candidates: the released CIFAR code, K-fold compute; see passes/dfq_candidates.py)."),
    cost_weighting: str = typer.Option("macs", "--cost-weighting", help="DFQ cost per block: macs (block MACs) or uniform (ResNet CIFAR code)."),
    task_grad: str = typer.Option("none", "--task-grad", help="DFQ task-loss path into the gate: none or chosen (see passes/dfq_gate.py)."),
    cost: str = typer.Option("macs", "--cost", help="DFQ controller's cost table: macs (effective MACs) or a hardware model (bitfusion, eyeriss, fpga: each block's fw/error/w-grad GEMM cost per option; the cp target is then a % of the gated blocks' FP32 cost on it)."),
    cost_metric: str = typer.Option("energy", "--cost-metric", help="With a hardware --cost: energy or latency."),
    cost_batch: int = typer.Option(128, "--cost-batch", help="With a hardware --cost: the batch the step is costed at."),
    nchwc: bool = typer.Option(True, "--nchwc/--no-nchwc", help="Run convs on this CPU's NCHWc kernels (faster; the artifacts then need a CPU with the same block size)."),
    sr_noise: str = typer.Option("independent", "--sr-noise", help="Stochastic-rounding noise of the error quantizers: independent (a draw per layer) or shared (one draw per step read at random offsets; see passes/shared_noise.py)."),
    logits: str = typer.Option(None, "--logits", help="The graph output that holds the logits, for a model with several outputs (the others are dropped from the artifacts)."),
    fused_kernels: bool = typer.Option(True, "--fused-kernels/--no-fused-kernels", help="Run the quantizers, range statistics, ReluGrad, conv weight gradients (per shape), NCHWc weight reorders and batch-norm backward on fracgraph's own custom ops (built here with the C compiler; faster). --no-fused-kernels keeps onnxruntime's own ops, for a machine without a compiler."),
    int_kernels: bool = typer.Option(True, "--int-kernels/--no-int-kernels", help="Run each quantized forward conv on integer codes (fracgraph's IntConv: 8-bit multiplies, int32 sums; AVX-512 VNNI, AVX2 or plain loops) in steps where its activation and weight bits are both 1-8, and its weight gradient (IntConvGradW) where its activation and error bits are, the float ops otherwise (decided each step from the precision input). Needs the fused kernels. --no-int-kernels keeps the float convs."),
    int_matmul: bool = typer.Option(True, "--int-matmul/--no-int-matmul", help="With --int-kernels, also the linear layers' MatMuls with a weight matrix: forward on IntMatMul, weight gradient on IntMatMulGradW (fused integer GEMMs, README, Integer GEMMs). --no-int-matmul keeps them float."),
) -> None:
    """Rewrite MODEL into onnxruntime-training artifacts with FW/BW fake-quantization and runtime precisions."""
    import time

    from fracgraph.build import BuildOptions, build_artifacts

    t0 = time.perf_counter()
    from fracgraph.errors import FracgraphError

    gates = None
    if not dfq and (first == "static" or keep_static):
        raise FracgraphError("--first static and --keep-static choose which blocks of DFQ artifacts have no gate; "
                             "add --dfq (without it every quantized GEMM is static: use --first quantize)")
    if dfq:
        from fracgraph.passes.dfq_gate import DfqOptions, parse_options

        if first not in (None, "static", "fp32", "quantize"):
            raise FracgraphError(f"--first must be static, fp32 or quantize with --dfq, got {first!r}")
        gates = DfqOptions(options=parse_options(options), weight_bits=weight_bits, granularity=granularity,
                           cost_weighting=cost_weighting, task_grad=task_grad, cost=cost, cost_metric=cost_metric,
                           cost_batch=cost_batch, static_first=first in (None, "static"), static=list(keep_static or []))
        first = None if first == "static" else first
    opts = BuildOptions(fw=fw, bw=bw, policy=_policy(policy, first, last, keep_fp32),
                        optimizer=optimizer, weight_decay=weight_decay, dfq=gates, nchwc=nchwc, sr_noise=sr_noise,
                        fused_kernels=fused_kernels, int_kernels=int_kernels, int_matmul=int_matmul, output=logits)
    m = build_artifacts(model, output, opts, force=force)
    n_q = sum(1 for d in m.decisions if d.quantized)
    typer.echo(f"{output}: {n_q}/{len(m.decisions)} GEMMs quantized in {m.n_blocks} blocks, "
               f"{len(m.quant_points)} FW + {n_q} BW quant points ({time.perf_counter() - t0:.1f} s)")
    if m.dfq:
        from fracgraph.passes.dfq_gate import option_label

        n_static = m.n_blocks - len(m.dfq.get("gated", range(m.n_blocks)))
        typer.echo(f"DFQ: {m.n_blocks - n_static} gates"
                   + (f" ({n_static} static block{'s' if n_static > 1 else ''} at the run's --fw/--bw)" if n_static else "")
                   + f", options (FW/BW) {', '.join(option_label(o) for o in m.dfq['options'])}, "
                   f"weights {m.dfq['weight_bits']} bits, choice per "
                   + (f"sample over {len(m.dfq['options'])} computed candidates per block (the simulation computes "
                      f"each gated block {len(m.dfq['options'])} times)" if m.dfq['granularity'] == "candidates"
                      else m.dfq['granularity']))
        if m.dfq.get("cost", "macs") != "macs":
            typer.echo(f"DFQ cost: {m.dfq['cost']} {m.dfq['cost_metric']} of each block's GEMMs per option "
                       f"(batch {m.dfq['cost_batch']}); cp targets are % of the gated blocks' FP32 "
                       f"{m.dfq['cost_metric']} on {m.dfq['cost']}")


@app.command()
@cli_errors
def inspect(
    target: str = typer.Argument(..., help="An artifact directory or an ONNX model."),
    fmt: str = typer.Option("table", "--format", help="table or json."),
    policy: str = typer.Option(None, "--policy", help="Layer policy JSON (for a model)."),
) -> None:
    """Show blocks, layer decisions with their reasons, quant points and MACs."""
    from fracgraph.inspect import summarize

    if fmt not in ("table", "json"):
        _fail("--format must be table or json")
    summary = summarize(target, _policy(policy, None, None, None))
    if fmt == "json":
        typer.echo(json.dumps(summary, indent=1))
        return
    from fracgraph.inspect import render

    render(summary)


def _float_list(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"{what} must be comma-separated numbers, e.g. 1.5,2,2.5,3")


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"{what} must be comma-separated integers, e.g. 3,4,6,8")


# options that train and sweep share: one definition, the same flags, defaults and help in both
_STATIC_FW = typer.Option(8, "--fw", help="Static FW bits (0 = FP32).")
_STATIC_BW = typer.Option(8, "--bw", help="Static BW bits (0 = FP32).")
_FW_SCHEDULE = typer.Option("3,4,6,8", "--fw-schedule", help="PFQ FW bits per stage.")
_BW_SCHEDULE = typer.Option("6,6,8,8", "--bw-schedule", help="PFQ BW bits per stage.")
_EPS = typer.Option(0.05, "--eps", help="PFQ epsilon.")
_ALPHA = typer.Option(0.3, "--alpha", help="PFQ alpha.")
_EPOCH_ITERS = typer.Option(50, "--epoch-iters", help="Iterations per 'epoch' (PFQ indicator, eval, checkpoint).")
_TRAIN_BATCH = typer.Option(128, "--batch")
_LR = typer.Option(0.1, "--lr")
_TRAIN_SEED = typer.Option(0, "--seed")
_EVAL_BATCHES = typer.Option(None, "--eval-batches", help="Limit test batches per evaluation.")


@app.command()
@cli_errors
def train(
    target: str = typer.Argument(..., help="An artifact directory, or an ONNX model (quantized into RUN/artifacts)."),
    output: str = typer.Option(..., "-o", "--output", help="Run directory."),
    schedule: str = typer.Option("static", "--schedule", help="static, pfq, dfq (DFQ artifacts, one cp target) or fractrain (PFQ indicator advances the cp target)."),
    fw: int = _STATIC_FW,
    bw: int = _STATIC_BW,
    fw_schedule: str = _FW_SCHEDULE,
    bw_schedule: str = _BW_SCHEDULE,
    eps: float = _EPS,
    alpha: float = _ALPHA,
    pfq_noise_floor: float = typer.Option(0.0, "--pfq-noise-floor", help="PFQ/FracTrain indicator: a threshold is never below this many standard errors of the epoch's mean loss (relative to the loss scale); 0 = the authors' thresholds. See README 'Reproduction'."),
    data: str = typer.Option(None, "--data", help="cifar10:PATH, cifar100:PATH, imagefolder:PATH, npz:PATH, text:PATH (UTF-8, for a language model); default: scikit-learn digits."),
    iters: int = typer.Option(200, "--iters", help="Training iterations."),
    epoch_iters: int = _EPOCH_ITERS,
    batch: int = _TRAIN_BATCH,
    lr: float = _LR,
    lr_schedule: str = typer.Option("step", "--lr-schedule", help="step (x0.1 at 50%/75%), cosine or constant."),
    seed: int = _TRAIN_SEED,
    eval_batches: int = _EVAL_BATCHES,
    holdout: int = typer.Option(0, "--holdout", help="Evaluate on N training images held out of training (a fixed subset) instead of the test set, to choose settings without looking at the test images; summary.json says eval_split."),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints (default: an epoch)."),
    momentum: float = typer.Option(None, "--momentum", help="SGD momentum (default: the artifacts', 0.9)."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="SGD weight decay (default: the artifacts', 1e-4)."),
    threads: int = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default: all cores)."),
    target_cp: float = typer.Option(3.0, "--target-cp", help="DFQ: cp target (% of FP32 compute of the gated blocks)."),
    target_cp_schedule: str = typer.Option("1.5,2,2.5,3", "--target-cp-schedule", help="FracTrain: cp target per stage."),
    beta: float = typer.Option(1e-3, "--beta", help="DFQ: weight of the cost term."),
    beta_schedule: str = typer.Option("constant", "--beta-schedule", help="DFQ: constant (the authors') or lr (beta x lr0/lr, capped at 100: the gates keep the first LR stage's speed after the LR decays)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in -o from its last checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train quantized artifacts under a static, PFQ, DFQ or FracTrain precision schedule."""
    from pathlib import Path as _P

    from fracgraph.train.loop import TrainConfig
    from fracgraph.train.loop import train as run_train

    is_art = (_P(target) / "manifest.json").exists()
    cfg = TrainConfig(
        run_dir=output, artifacts=target if is_art else None, model=None if is_art else target, schedule=schedule,
        fw=fw, bw=bw, fw_schedule=_int_list(fw_schedule, "--fw-schedule"), bw_schedule=_int_list(bw_schedule, "--bw-schedule"),
        eps=eps, alpha=alpha, pfq_noise_floor=pfq_noise_floor, data=data, iters=iters, epoch_iters=epoch_iters, batch=batch, lr=lr,
        lr_schedule=lr_schedule, seed=seed, eval_batches=eval_batches, holdout=holdout, checkpoint_every=checkpoint_every,
        momentum=momentum, weight_decay=weight_decay, threads=threads, target_cp=target_cp,
        target_cp_schedule=_float_list(target_cp_schedule, "--target-cp-schedule"), beta=beta,
        beta_schedule=beta_schedule,
    )
    if as_json:
        summary = run_train(cfg, resume=resume)
        typer.echo(json.dumps(summary, indent=1, default=str))
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    con = Console()
    with Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=con, transient=True) as bar:
        task = bar.add_task("train", total=iters, info="")

        def on_step(rec: dict) -> None:
            acc = f" test {100 * rec['test_acc']:.2f}%" if "test_acc" in rec else \
                f" val loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""
            cp = f" cp {rec['cp']:.2f}% MACs" + (f", gated {rec['dfq_cp']:.2f}%" if "dfq_cp" in rec else "")
            bar.update(task, completed=rec["step"], info=f"loss {rec['loss']:.3f} FW{rec['fw']}/BW{rec['bw']}{cp}{acc}")
            if "target_clamp" in rec:
                con.print(f"step {rec['target_clamp']['step']}: warning: {rec['target_clamp']['message']}")
            if "transition" in rec:
                t = rec["transition"]
                if isinstance(t["old"], list):
                    con.print(f"step {t['step']}: FW/BW {t['old'][0]}/{t['old'][1]} -> {t['new'][0]}/{t['new'][1]} ({t['reason']})")
                else:
                    con.print(f"step {t['step']}: cp target {t['old']} -> {t['new']} ({t['reason']})")

        summary = run_train(cfg, resume=resume, progress=on_step)
    t = Table(title=f"run {output}")
    t.add_column("metric")
    t.add_column("value")
    metrics = ("final_val_loss", "best_val_loss", "final_val_ppl") if summary.get("task") == "language_model" \
        else ("final_test_acc", "best_test_acc")
    for k in ("steps", *metrics, "cum_eff_gmacs", "fp32_gmacs", "mean_cp", "wall_s"):
        v = summary[k]
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    if summary.get("dfq") and summary["dfq"].get("mean_gated_cp") is not None:
        t.add_row(f"mean gated cp ({summary['dfq']['cp_unit']})", f"{summary['dfq']['mean_gated_cp']:.4f}")
    con.print(t)


@app.command()
@cli_errors
def export(
    run: str = typer.Argument(..., help="A run directory written by `fracgraph train`."),
    output: str = typer.Option(..., "-o", "--output", help="Inference model to write."),
    bits: str = typer.Option("final", "--bits", help="final (the precision the run ended at; DFQ: each block's "
                             "most-chosen option), best (the precision at the best evaluation), or FW[/W], e.g. 4 or 4/8."),
    fmt: str = typer.Option("qdq", "--format", help="qdq (QuantizeLinear/DequantizeLinear, integer weights) or "
                            "float (float weights already on their grid)."),
    which: str = typer.Option(None, "--which", help="Weights: best or last (default: best for --bits best, else last)."),
    dfq_gates: str = typer.Option("bake", "--dfq-gates", help="DFQ runs: bake (each block's option fixed) or keep "
                                  "(the gates choose per batch/sample; --format float only)."),
    zero_point: str = typer.Option("exact", "--zero-point", help="qdq grids whose -min/scale is not an integer: "
                                   "exact (min subtracted around Q/DQ) or round (canonical Q/DQ, the grid moves)."),
    force: bool = typer.Option(False, "--force", help="Allow --bits the run never trained at."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Also report the written model's test accuracy "
                                  "(plain onnxruntime, the run's data and batch size)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was exported as JSON."),
) -> None:
    """A deployable model: the data is its only input, the precisions baked in (no `fracgraph_bits`)."""
    from fracgraph.export import ExportOptions, evaluate_export, export_run

    res = export_run(run, output, ExportOptions(bits=bits, format=fmt, which=which, dfq_gates=dfq_gates,
                                                force=force, zero_point=zero_point))
    out = res.as_dict()
    if evaluate:
        out["evaluation"] = evaluate_export(res.path, run)
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    forms = {}
    for p in res.points:
        forms[p.form] = forms.get(p.form, 0) + 1
    typer.echo(f"{res.path}: {res.nodes} nodes from {res.model_file}, quant points "
               + ", ".join(f"{v} {k}" for k, v in sorted(forms.items())))
    for n in res.notes:
        typer.echo(f"  {n}")
    e = out.get("evaluation")
    if e and "val_loss" in e:
        typer.echo(f"  validation loss {e['val_loss']:.6f} ({e['windows']} windows, batch {e['batch']}); "
                   f"the run's final evaluation {e['run_final_val_loss']:.6f}")
    elif e:
        typer.echo(f"  test accuracy {e['test_acc']:.4f} ({e['correct']}/{e['total']}, batch {e['batch']}); "
                   f"the run's final evaluation {e['run_final_test_acc']:.4f}")


@app.command()
@cli_errors
def sample(
    run: str = typer.Argument(..., help="A run directory of a language model trained with --data text:PATH."),
    tokens: int = typer.Option(300, "--tokens", help="Characters to generate."),
    prompt: str = typer.Option("\n", "--prompt", help="Text to continue (characters of the run's vocabulary)."),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 = greedy."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    which: str = typer.Option("last", "--which", help="last or best (lowest validation loss) model."),
) -> None:
    """Print text generated by a trained character language model (plain onnxruntime inference)."""
    from fracgraph.sample import sample as run_sample

    typer.echo(prompt + run_sample(run, tokens, prompt, temperature, seed, which))


@app.command()
@cli_errors
def estimate(
    target: str = typer.Argument(..., help="An artifact directory or a plain ONNX model."),
    hw: str = typer.Option("all", "--hw", help="bitfusion, eyeriss, fpga or all."),
    trace: str = typer.Option(None, "--trace", help="A run directory: integrate over its precision trace."),
    fw: float = typer.Option(None, "--fw", help="Forward bits (activations and weights) for every block."),
    bw: float = typer.Option(None, "--bw", help="Backward (error) bits for every block."),
    batch: int = typer.Option(128, "--batch", help="Mini-batch size of a step."),
    steps: int = typer.Option(None, "--steps", help="Steps of the run without a trace (default 64000)."),
    baseline: str = typer.Option("fw8bw8", "--baseline", help="Static baseline, e.g. fw8bw8."),
    fmt: str = typer.Option("table", "--format", help="table, json or csv."),
    overlap: bool = typer.Option(False, "--overlap", help="Overlap independent ops (default: sequential)."),
    strided: str = typer.Option("ideal", "--strided-error", help="Strided error conv: ideal (s^2 sub-convs) or naive."),
    mem_bits: int = typer.Option(32, "--eltwise-bits", help="Data width of BN/ReLU/pool/elementwise ops."),
    scope: str = typer.Option("step", "--scope", help="What a step counts: step (every op) or gemm (only the forward, error and weight-gradient GEMMs, the paper's accounting)."),
) -> None:
    """Cost a training step and a training run on hardware models (Bit-Fusion, Eyeriss, ZC706 FPGA)."""
    from fracgraph.analysis.estimate import report
    from fracgraph.hwmodels import MODEL_NAMES

    if fmt not in ("table", "json", "csv"):
        _fail("--format must be table, json or csv")
    names = list(MODEL_NAMES) if hw == "all" else [h.strip() for h in hw.split(",")]
    bad = [h for h in names if h not in MODEL_NAMES]
    if bad:
        _fail(f"--hw {bad[0]!r}: choose bitfusion, eyeriss, fpga or all")
    rep = report(target, names, trace_dir=trace, fw=fw, bw=bw, batch=batch, steps=steps, baseline=baseline,
                 overlap=overlap, strided_bw=strided, mem_bits=mem_bits, scope=scope)
    if fmt == "json":
        typer.echo(json.dumps(rep, indent=1))
    elif fmt == "csv":
        from fracgraph.analysis.render import to_csv

        typer.echo(to_csv(rep), nl=False)
    else:
        from fracgraph.analysis.render import render_table

        render_table(rep)


@app.command()
@cli_errors
def profile(
    art: str = typer.Argument(..., help="An artifact directory written by `fracgraph quantize`."),
    batch: int = typer.Option(128, "--batch", help="Mini-batch size of the profiled steps."),
    steps: int = typer.Option(5, "--steps", help="Profiled steps (after 2 warm-up steps)."),
    fw: float = typer.Option(8, "--fw", help="Forward bits (activations and weights) for every block; 0 = FP32."),
    bw: float = typer.Option(8, "--bw", help="Backward (error) bits for every block; 0 = FP32."),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads (default: FRACGRAPH_THREADS or all cores)."),
    top: int = typer.Option(10, "--top", help="How many of the slowest nodes to list."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
) -> None:
    """Time a training step with onnxruntime's profiler: time per op type, % of the step, slowest nodes."""
    from fracgraph.profile import profile_step, render

    prof = profile_step(art, batch=batch, steps=steps, bits=(fw, fw, bw), threads=threads, top=top)
    typer.echo(json.dumps(prof.to_dict(), indent=1) if as_json else render(prof))


@app.command()
@cli_errors
def demo(
    output: str = typer.Option("fracgraph-demo", "-o", "--output", help="Directory for the model, artifacts and run."),
    iters: int = typer.Option(300, "--iters"),
) -> None:
    """Run the whole toolchain on embedded defaults: zoo digitnet, quantize, PFQ training on digits, estimate."""
    from rich.console import Console

    from fracgraph.analysis.render import render_table
    from fracgraph.demo import run_demo

    con = Console()
    con.print(f"[bold]fracgraph demo[/bold] -> {output}: digitnet on scikit-learn digits, PFQ FW(3,4,6,8)/BW(6,6,8,8)")

    def on_step(rec: dict) -> None:
        if "test_acc" in rec:
            con.print(f"step {rec['step']:4d}  loss {rec['loss']:.3f}  FW{rec['fw']}/BW{rec['bw']}  "
                      f"test {100 * rec['test_acc']:.2f}%  cum {rec['cum_gmacs']:.2f} eff. GMACs")

    res = run_demo(output, iters, progress=on_step)
    s = res["train"]
    con.print(f"trained {s['steps']} steps: best test accuracy {100 * s['best_test_acc']:.2f}%, "
              f"{s['cum_eff_gmacs']:.2f} effective GMACs = {s['mean_cp']:.2f}% of FP32 ({s['fp32_gmacs']:.1f} GMACs)")
    render_table(res["estimate"])


@app.command()
@cli_errors
def report(
    runs: list[str] = typer.Argument(..., help="Run directories written by `fracgraph train` (one or more)."),
    output: str = typer.Option(..., "-o", "--output", help="Report directory: index.html plus the PNG figures."),
    baseline: str = typer.Option(None, "--baseline", help="The run (name or directory) savings are measured against; default the first."),
    hw: str = typer.Option("all", "--hw", help="Hardware models for the energy/latency bars: bitfusion, eyeriss, fpga (comma-separated) or all."),
) -> None:
    """One self-contained HTML page (no network fetches) comparing runs: accuracy vs cost, precision, choices, energy."""
    from fracgraph.hwmodels import MODEL_NAMES
    from fracgraph.report import write_report

    names = list(MODEL_NAMES) if hw == "all" else [h.strip() for h in hw.split(",")]
    bad = [h for h in names if h not in MODEL_NAMES]
    if bad:
        _fail(f"--hw {bad[0]!r}: choose bitfusion, eyeriss, fpga or all")
    typer.echo(str(write_report(runs, output, baseline=baseline, hw_names=names)))


@app.command()
@cli_errors
def sweep(
    target: str = typer.Argument(..., help="An artifact directory, or an ONNX model (quantized once into SWEEP/artifacts)."),
    output: str = typer.Option(..., "-o", "--output", help="Sweep directory: points/NAME/ runs, results.json/.csv, pareto.png, report/."),
    grid: list[str] = typer.Option(..., "--grid", help="NAME=V1,V2,... over a training parameter (repeatable; list values as 3:4:6:8)."),
    address: str = typer.Option(None, "--address", help="Ray cluster to use: auto or HOST:PORT (default: a local Ray instance)."),
    workers: int = typer.Option(None, "--workers", help="Points trained at once (default: CPUs / --threads)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads per point (default: CPUs / --workers)."),
    baseline: str = typer.Option(None, "--baseline", help="Point the report measures savings against (default: the first)."),
    schedule: str = typer.Option("static", "--schedule", help="static, pfq, dfq or fractrain (set DFQ parameters with --grid, e.g. target_cp=3)."),
    fw: int = _STATIC_FW,
    bw: int = _STATIC_BW,
    fw_schedule: str = _FW_SCHEDULE,
    bw_schedule: str = _BW_SCHEDULE,
    eps: float = _EPS,
    alpha: float = _ALPHA,
    data: str = typer.Option(None, "--data", help="As for train; default: scikit-learn digits."),
    iters: int = typer.Option(200, "--iters", help="Training iterations per point."),
    epoch_iters: int = _EPOCH_ITERS,
    batch: int = _TRAIN_BATCH,
    lr: float = _LR,
    lr_schedule: str = typer.Option("step", "--lr-schedule", help="step, cosine or constant."),
    seed: int = _TRAIN_SEED,
    eval_batches: int = _EVAL_BATCHES,
) -> None:
    """Train a grid of configurations as Ray tasks; results table, accuracy-vs-cost Pareto plot and HTML report."""
    from rich.console import Console
    from rich.table import Table

    from rich.markup import escape

    from fracgraph.sweep import run_sweep

    base = dict(schedule=schedule, fw=fw, bw=bw, fw_schedule=_int_list(fw_schedule, "--fw-schedule"),
                bw_schedule=_int_list(bw_schedule, "--bw-schedule"), eps=eps, alpha=alpha, data=data, iters=iters,
                epoch_iters=epoch_iters, batch=batch, lr=lr, lr_schedule=lr_schedule, seed=seed,
                eval_batches=eval_batches)
    con = Console()

    def on_point(p) -> None:
        if p.status == "failed":
            con.print(f"[red]failed[/red] {escape(p.name)}: {escape(p.error or '')}", highlight=False, soft_wrap=True)
        else:
            s = p.summary
            quality = f"final val loss {s['final_val_loss']:.4f}" if s.get("final_val_loss") is not None else \
                f"final test {100 * (s.get('final_test_acc') or 0):.2f}%"
            con.print(f"{'skipped (finished)' if p.status == 'skipped' else 'done'} {p.name}: {quality} at "
                      f"{s['cum_eff_gmacs']:.4g} eff. GMACs ({s['wall_s']:.1f} s)", highlight=False, soft_wrap=True)

    res = run_sweep(target, output, base, grid, address=address, workers=workers, threads=threads,
                    baseline=baseline, on_point=on_point)
    t = Table(title=f"sweep {output}")
    lm = any("final_val_loss" in r for r in res["table"])
    for col in ("point", "status", "final val loss" if lm else "final acc", "eff. GMACs", "mean cp", "Pareto"):
        t.add_column(col)
    for r in res["table"]:
        q = r.get("final_val_loss" if lm else "final_test_acc")
        t.add_row(r["point"], r["status"], "-" if q is None else f"{q:.4f}" if lm else f"{100 * q:.2f}%",
                  "-" if r["cum_eff_gmacs"] is None else f"{r['cum_eff_gmacs']:.4g}",
                  "-" if r["mean_cp"] is None else f"{r['mean_cp']:.2f}%", "*" if r["pareto"] else "")
    con.print(t)
    for k in ("results_csv", "pareto", "report"):
        if res[k]:
            con.print(f"{k}: {res[k]}", highlight=False)
    if res["failed"]:
        _fail(f"{res['failed']} of {len(res['points'])} point(s) failed (see above); the others are in the results", 1)
