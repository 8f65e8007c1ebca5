"""Training-step time of resnet20 (batch 128) in one process: fracgraph FW8/BW8 and 0-bit steps, the plain
(unquantized) ORT step, PyTorch eager FP32 and a PyTorch FracTrain-style quantized step; plus `quantize` time on
resnet164. Prints ratios against baselines measured in the same run (these machines are noisy).

    python bench/step_time.py [--steps 5] [--batch 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def torch_steps(model, x, y, quantized: bool):
    import torch
    import torch.nn.functional as F

    from fracgraph.zoo import BasicBlock  # noqa: F401  (architecture reference)

    def fq(t, bits, per_channel=False, noise=False):
        with torch.no_grad():
            if per_channel:
                mn = t.flatten(1).min(1).values.view(-1, 1, 1, 1)
                mx = t.flatten(1).max(1).values.view(-1, 1, 1, 1)
            else:
                mn, mx = t.min(), t.max()
            s = torch.clamp((mx - mn) / (2**bits - 1), min=1e-8)
            u = (t - mn) / s
            if noise:
                u = u + torch.empty_like(u).uniform_(-0.5, 0.5)
            return torch.round(torch.clamp(u, 0, 2**bits - 1)) * s + mn

    class STE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, bits, pc):
            return fq(t, bits, pc)

        @staticmethod
        def backward(ctx, g):
            return g, None, None

    class GradQ(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, bits):
            ctx.bits = bits
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return fq(g, ctx.bits, noise=True), None

    def qconv_forward(conv):
        def forward(inp):
            out = F.conv2d(STE.apply(inp, 8, False), STE.apply(conv.weight, 8, True), None, conv.stride, conv.padding)
            return GradQ.apply(out, 8)
        return forward

    if quantized:
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.forward = qconv_forward(m)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xt), yt).backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()

    import torch
    from onnxruntime.training import api
    from onnxruntime.training import artifacts as ort_artifacts

    from fracgraph.build import BuildOptions, build_artifacts, classify_initializers
    from fracgraph.model import load_model
    from fracgraph.runtime import TrainSession, session_options
    from fracgraph.zoo import build, export

    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, a.batch).astype(np.int64)
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = export("resnet20", d / "r20.onnx")
        build_artifacts(model, d / "art", BuildOptions())
        sess = TrainSession(d / "art", threads=a.threads, seed=0)
        n = sess.manifest.n_blocks
        b8 = np.full((n, 3), 8, np.float32)
        b0 = np.zeros((n, 3), np.float32)
        rows["fracgraph FW8/BW8"] = timed(lambda: sess.step(x, y, b8, 0.01), a.steps)
        rows["fracgraph 0-bit"] = timed(lambda: sess.step(x, y, b0, 0.01), a.steps)

        plain = load_model(model)
        tr, fr = classify_initializers(plain)
        (d / "plain").mkdir()
        ort_artifacts.generate_artifacts(plain, requires_grad=tr, frozen_params=fr, loss=ort_artifacts.LossType.CrossEntropyLoss,
                                         optimizer=ort_artifacts.OptimType.SGD, artifact_directory=str(d / "plain"))
        st = api.CheckpointState.load_checkpoint(str(d / "plain" / "checkpoint"))
        mod = api.Module(str(d / "plain" / "training_model.onnx"), st, session_options=session_options(a.threads))
        opt = api.Optimizer(str(d / "plain" / "optimizer_model.onnx"), mod)
        mod.train()

        def plain_step():
            mod(x, y)
            opt.step()
            mod.lazy_reset_grad()

        rows["ORT plain FP32 (no quant nodes)"] = timed(plain_step, a.steps)
        rows["PyTorch eager FP32"] = timed(torch_steps(build("resnet20", seed=0), x, y, False), a.steps)
        rows["PyTorch FracTrain-style FW8/BW8"] = timed(torch_steps(build("resnet20", seed=0), x, y, True), a.steps)

        export("resnet164", d / "r164.onnx")
        t = time.perf_counter()
        build_artifacts(d / "r164.onnx", d / "art164", BuildOptions())
        q164 = time.perf_counter() - t

    print(f"resnet20, batch {a.batch}, {a.threads} threads, median of {a.steps} steps")
    for k, v in rows.items():
        print(f"  {k:36s} {1000 * v:8.1f} ms")
    r = rows
    print("ratios:")
    print(f"  fracgraph FW8/BW8 / fracgraph 0-bit        {r['fracgraph FW8/BW8'] / r['fracgraph 0-bit']:.2f}  (target <= 1.25)")
    print(f"  fracgraph FW8/BW8 / ORT plain FP32         {r['fracgraph FW8/BW8'] / r['ORT plain FP32 (no quant nodes)']:.2f}")
    print(f"  fracgraph FW8/BW8 / PyTorch quantized      {r['fracgraph FW8/BW8'] / r['PyTorch FracTrain-style FW8/BW8']:.2f}")
    print(f"  fracgraph FW8/BW8 / PyTorch FP32           {r['fracgraph FW8/BW8'] / r['PyTorch eager FP32']:.2f}")
    print(f"  PyTorch quantized / PyTorch FP32           {r['PyTorch FracTrain-style FW8/BW8'] / r['PyTorch eager FP32']:.2f}")
    print(f"quantize resnet164: {q164:.2f} s (target < 5 s)")


if __name__ == "__main__":
    main()
