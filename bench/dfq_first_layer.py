"""What the DFQ layout of the first GEMM costs: the whole-network saving of DFQ against FW8/BW8 at a given gated cp.

FracTrain's cp counts the gated blocks only. The authors' DFQ ResNet (`ResNetRecurrentGateSP`) keeps its first conv
FP32 (`quantize --dfq --first fp32`), while their FW8/BW8 and PFQ ResNet quantize it at 8 bits: at FP32 that one
conv costs (a w + g w + a g)/1024 = 3 effective MACs per MAC against 3 x 64/1024 at FW8/BW8. This script counts, from
the op table of `plan` (no training, a few seconds), the effective MACs per sample of one training step (forward,
error and weight-gradient GEMMs) for: FW8/BW8 (first conv and every other conv at 8/8, classifier FP32), and DFQ
with the gated blocks at exactly the given gated cp and the first conv FP32 (`--first fp32`) or static FW8/BW8
(`--first static`, the `--dfq` default); classifier FP32 in all.

    python bench/dfq_first_layer.py                       # resnet20, gated cp 3 (issue 15's DFQ row)
    python bench/dfq_first_layer.py --model resnet38 --cp 1.5 2 2.5 3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def effective(model_path: Path, cps: list[float]) -> dict:
    from fracgraph.build import plan
    from fracgraph.model import load_model
    from fracgraph.policy import LayerPolicy

    ops, _, _, op_dicts = plan(load_model(model_path), LayerPolicy())
    first, total = op_dicts[0], sum(d["macs"] for d in op_dicts)
    fp32 = sum(d["macs"] for d in op_dicts if not d["quantized"])             # the classifier
    gated = sum(d["macs"] for d in op_dicts[1:] if d["quantized"])
    u8 = 3 * 8 * 8 / 1024                                                     # a w + g w + a g at 8/8/8
    base = u8 * (first["macs"] + gated) + 3 * fp32
    rows = []
    for cp in cps:
        g = 3 * gated * cp / 100
        rows.append({"gated_cp": cp,
                     "fp32_first": g + 3 * first["macs"] + 3 * fp32,
                     "static_first": g + u8 * first["macs"] + 3 * fp32})
    return {"first": first["name"], "first_macs": first["macs"], "total_macs": total, "classifier_macs": fp32,
            "fw8bw8": base, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--cp", type=float, nargs="+", default=[3.0])
    a = ap.parse_args()
    from fracgraph.zoo import export

    with tempfile.TemporaryDirectory() as d:
        r = effective(export(a.model, Path(d) / f"{a.model}.onnx"), a.cp)
    print(f"{a.model}: first GEMM {r['first']} {r['first_macs']:,} of {r['total_macs']:,} forward MACs per sample "
          f"({100 * r['first_macs'] / r['total_macs']:.1f}%); classifier {r['classifier_macs']:,} (FP32)")
    print(f"FW8/BW8 step: {r['fw8bw8'] / 1e6:.3f} M effective MACs per sample; the first conv at FP32 costs "
          f"{3 * r['first_macs'] / 1e6:.3f} M of it ({100 * 3 * r['first_macs'] / r['fw8bw8']:.1f}% of the FW8/BW8 step)")
    print("| gated cp % | first conv FP32: eff. MACs/sample (M) | saving vs FW8/BW8 | first conv static FW8/BW8 (M) "
          "| saving vs FW8/BW8 |")
    print("|---|---|---|---|---|")
    for row in r["rows"]:
        f, s = row["fp32_first"], row["static_first"]
        print(f"| {row['gated_cp']:g} | {f / 1e6:.3f} | {100 * (1 - f / r['fw8bw8']):.1f}% | {s / 1e6:.3f} | "
              f"{100 * (1 - s / r['fw8bw8']):.1f}% |")


if __name__ == "__main__":
    main()
