"""The `fracgraph` command: parse, call the library, render. No logic a test cannot reach without the CLI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


def _fail(message: str, code: int = 2):
    from rich.console import Console

    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
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
    name: str = typer.Argument(..., help="Model name: resnet20/38/74/110, resnet164, mobilenetv2."),
    output: str = typer.Option(..., "-o", "--output", help="Where to write the ONNX model."),
    classes: int = typer.Option(10, "--classes", help="Number of classes: 10 or 100."),
    seed: int = typer.Option(0, "--seed", help="Init seed; the same seed gives the same bytes."),
) -> None:
    """Export a reference CIFAR model (FracTrain's zoo) to ONNX."""
    from fracgraph.zoo import export

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
    policy: str = typer.Option(None, "--policy", help="Layer policy JSON: {first, last, fp32: [globs], quantize: [globs]}."),
    first: str = typer.Option(None, "--first", help="First GEMM: fp32 or quantize (default quantize)."),
    last: str = typer.Option(None, "--last", help="Last GEMM (classifier): fp32 or quantize (default fp32)."),
    keep_fp32: list[str] = typer.Option(None, "--keep-fp32", help="Node-name glob to keep FP32 (repeatable)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (momentum 0.9, FracTrain's) or adamw."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Rewrite MODEL into onnxruntime-training artifacts with FW/BW fake-quantization and runtime precisions."""
    import time

    from fracgraph.build import BuildOptions, build_artifacts

    t0 = time.perf_counter()
    opts = BuildOptions(fw=fw, bw=bw, policy=_policy(policy, first, last, keep_fp32), optimizer=optimizer,
                        weight_decay=weight_decay)
    m = build_artifacts(model, output, opts, force=force)
    n_q = sum(1 for d in m.decisions if d.quantized)
    typer.echo(f"{output}: {n_q}/{len(m.decisions)} GEMMs quantized in {m.n_blocks} blocks, "
               f"{len(m.quant_points)} FW + {n_q} BW quant points ({time.perf_counter() - t0:.1f} s)")


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
