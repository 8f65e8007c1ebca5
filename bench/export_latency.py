"""Inference latency of `fracgraph export` models in plain onnxruntime: FP32 vs float-grid vs QDQ, batch 1 and 64.

Usage: python bench/export_latency.py [--run RUN] [--bits 8] [--rounds 7] [--threads 1] [-o DIR]

Without --run: resnet20 (CIFAR, 3x32x32) trained 2 steps at static FW{bits}/BW8 on a small synthetic npz (latency
does not depend on what the weights learned), in DIR. Exports of the run's last model:
  fp32       `--bits 0 --force --format float`: the same network with no quantizer (the FP32 export)
  float      `--format float`: weights on their grid, activation quantizers as float ops
  qdq        `--format qdq` (default, exact): QuantizeLinear/DequantizeLinear
  qdq-round  `--format qdq --zero-point round`: canonical Q/DQ only (grids moved to an integer zero point)
  ort-int8   for context, not a fracgraph export: onnxruntime.quantization.quantize_static applied to the fp32
             export (QDQ, per-channel int8 weights, uint8 activations, its own MinMax calibration on 8 random
             batches, Q/DQ also on every conv output): what onnxruntime's integer kernels do with this network
Each model runs in one InferenceSession with onnxruntime's default (all) graph optimizations, which include its QDQ
fusions; the op types onnxruntime kept after optimizing are listed (integer kernels: QLinearConv, ConvInteger,
MatMulInteger, QGemm, ...). Timing: the models take turns within each round (order rotated every round), each timed
over --calls calls; the ratio to fp32 is formed within a round, and the table gives the median and the range over
rounds. The machine is shared, so only these ratios mean anything.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

INTEGER_KERNELS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat",
                   "QLinearAdd", "QLinearGlobalAveragePool", "DynamicQuantizeMatMul"}


def make_run(d: Path, bits: int) -> Path:
    from fracgraph.train.loop import TrainConfig, train
    from fracgraph.zoo import export

    run = d / "run"
    if (run / "summary.json").exists():
        return run
    rng = np.random.default_rng(0)
    data = d / "synthetic.npz"
    np.savez(data, x_train=rng.integers(0, 256, (64, 3, 32, 32), np.uint8), y_train=rng.integers(0, 10, 64),
             x_test=rng.integers(0, 256, (64, 3, 32, 32), np.uint8), y_test=rng.integers(0, 10, 64))
    model = export("resnet20", d / "resnet20.onnx")
    train(TrainConfig(run_dir=str(run), model=str(model), schedule="static", fw=bits, bw=8, data=f"npz:{data}",
                      iters=2, epoch_iters=2, batch=16, lr=0.01))
    return run


def optimized_ops(path: Path, threads: int) -> dict:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as t:
        so.optimized_model_filepath = str(Path(t) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        m = onnx.load(so.optimized_model_filepath)
    return dict(collections.Counter(n.op_type for n in m.graph.node).most_common())


def ort_static_int8(fp32: Path, out: Path, src) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    shape = [d.dim_value for d in src.graph.input[0].type.tensor_type.shape.dim][1:]
    rng = np.random.default_rng(1)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": rng.standard_normal([8] + shape).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.batches, None)

    path = out / "ort-int8.onnx"
    quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="an existing `fracgraph train` run directory (default: a resnet20 run made here)")
    ap.add_argument("--bits", type=int, default=8, help="static FW bits of the run made here")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=0, help="calls per model per round (default: 40 at batch 1, 4 at 64)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", default="bench-out/export_latency")
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort

    from fracgraph.export import ExportOptions, export_run

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.run) if args.run else make_run(out, args.bits)
    variants = {"fp32": ExportOptions(bits="0", force=True, format="float"), "float": ExportOptions(format="float"),
                "qdq": ExportOptions(format="qdq"), "qdq-round": ExportOptions(format="qdq", zero_point="round")}
    paths, info = {}, {}
    src = onnx.load(str(run / "last.onnx"))
    print(f"run {run}: last.onnx has {len(src.graph.node)} nodes, inputs "
          + ", ".join(f"{i.name} {[d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]}" for i in src.graph.input))
    for name, opts in variants.items():
        res = export_run(str(run), str(out / f"{name}.onnx"), opts)
        paths[name] = res.path
        ops = optimized_ops(res.path, args.threads)
        forms = collections.Counter(p.form for p in res.points)
        info[name] = {"nodes": res.nodes, "bytes": res.path.stat().st_size, "forms": dict(forms),
                      "integer_kernels": {k: v for k, v in ops.items() if k in INTEGER_KERNELS}, "optimized_ops": ops}
        print(f"{name:9s} {res.nodes:4d} nodes, {res.path.stat().st_size / 1024:8.1f} KiB, points {dict(forms)}; "
              f"after onnxruntime's optimizer: integer kernels {info[name]['integer_kernels'] or 'none'}; "
              f"ops {ops}")

    paths["ort-int8"] = ort_static_int8(paths["fp32"], out, src)
    ops = optimized_ops(paths["ort-int8"], args.threads)
    info["ort-int8"] = {"integer_kernels": {k: v for k, v in ops.items() if k in INTEGER_KERNELS}, "optimized_ops": ops}
    print(f"ort-int8  after onnxruntime's optimizer: integer kernels {info['ort-int8']['integer_kernels'] or 'none'}; ops {ops}")

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.log_severity_level = 3
    sessions = {n: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for n, p in paths.items()}
    shape = [d.dim_value for d in src.graph.input[0].type.tensor_type.shape.dim][1:]
    rng = np.random.default_rng(0)
    results = {}
    for batch in (int(b) for b in args.batches.split(",")):
        x = rng.standard_normal([batch] + shape).astype(np.float32)
        calls = args.calls or (40 if batch == 1 else 4)
        ref = sessions["float"].run(None, {"input": x})[0]
        agree = {n: float(np.abs(s.run(None, {"input": x})[0] - ref).max()) for n, s in sessions.items()}
        for s in sessions.values():          # warm-up
            s.run(None, {"input": x})
        times = {n: [] for n in sessions}
        names = list(sessions)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                t = time.perf_counter()
                for _ in range(calls):
                    sessions[n].run(None, {"input": x})
                times[n].append((time.perf_counter() - t) / calls * 1e3)
        rows = {}
        for n in names:
            ratios = [a / b for a, b in zip(times[n], times["fp32"])]
            rows[n] = {"ms_median": statistics.median(times[n]), "ratio_median": statistics.median(ratios),
                       "ratio_min": min(ratios), "ratio_max": max(ratios), "max_abs_logit_diff_vs_float": agree[n]}
        results[batch] = rows
        print(f"\nbatch {batch} ({calls} calls x {args.rounds} rounds, {args.threads} thread(s)):")
        print(f"  {'model':9s} {'ms/call':>9s} {'vs fp32 (median, range)':>26s} {'max|dlogit| vs float':>21s}")
        for n, v in rows.items():
            print(f"  {n:9s} {v['ms_median']:9.3f} {v['ratio_median']:10.2f}x [{v['ratio_min']:.2f}, {v['ratio_max']:.2f}]"
                  f" {v['max_abs_logit_diff_vs_float']:21.3g}")
    (out / "results.json").write_text(json.dumps({"run": str(run), "models": info, "latency": results,
                                                  "argv": sys.argv[1:], "threads": args.threads}, indent=1))
    print(f"\n{out / 'results.json'}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
