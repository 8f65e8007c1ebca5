"""The main job on embedded defaults: zoo model -> quantize -> short PFQ training -> hardware estimate.

Uses only what ships with the package (the digitnet zoo model, scikit-learn's digits), so a fresh machine can
run the whole toolchain with one command.
"""

from __future__ import annotations

from pathlib import Path

from .build import BuildOptions, build_artifacts
from .errors import FracgraphError


def run_demo(out_dir: str, iters: int = 300, progress=None) -> dict:
    from .analysis.estimate import report
    from .train.loop import TrainConfig, train
    from .zoo import export

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FracgraphError(f"{out} is not empty; pass a new directory")
    model = export("digitnet", out / "digitnet.onnx")
    build_artifacts(model, out / "artifacts", BuildOptions())
    summary = train(TrainConfig(run_dir=str(out / "run"), artifacts=str(out / "artifacts"), schedule="pfq",
                                iters=iters, epoch_iters=max(iters // 20, 1), batch=64, lr=0.1, eps=0.05, alpha=0.3),
                    progress=progress)
    est = report(out / "artifacts", ["bitfusion", "eyeriss"], trace_dir=out / "run", batch=64)
    return {"train": summary, "estimate": est, "dir": str(out)}
