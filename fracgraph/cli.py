"""The `fracgraph` command: parse, call the library, render. No logic a test cannot reach without the CLI."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def main() -> None:
    """FracTrain-style fractional quantized training for ONNX models."""
