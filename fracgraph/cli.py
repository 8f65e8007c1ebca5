"""The `fracgraph` command: parse, call the library, render. No logic a test cannot reach without the CLI."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def main() -> None:
    """FracTrain-style fractional quantized training for ONNX models."""


@app.command()
def zoo(
    name: str = typer.Argument(..., help="Model name: resnet20/38/74/110, resnet164, mobilenetv2."),
    output: str = typer.Option(..., "-o", "--output", help="Where to write the ONNX model."),
    classes: int = typer.Option(10, "--classes", help="Number of classes: 10 or 100."),
    seed: int = typer.Option(0, "--seed", help="Init seed; the same seed gives the same bytes."),
) -> None:
    """Export a reference CIFAR model (FracTrain's zoo) to ONNX."""
    from rich.console import Console

    from fracgraph.errors import FracgraphError
    from fracgraph.zoo import export

    try:
        path = export(name, output, classes=classes, seed=seed)
    except FracgraphError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code)
    typer.echo(str(path))
