"""ConvNeXt's channels-first LayerNorm and layer-scale gradient, before and after ln-channels and channel-mul, on
convnext_atto's shapes (batch 32, 64x64 input: 40x16x16, 80x8x8, 160x4x4, 320x2x2).

"before" is what the default artifacts ran at session 12's branch point: Permute -> LayerNormalization -> Permute
forward and Permute -> LayerNormGrad -> Permute backward (fracgraph's Permute and LayerNormGrad, onnxruntime's
LayerNormalization); Mul(dY, g), Mul(dY, A), ReduceSum over (0, 2, 3) for the layer scale. "after" is
LayerNormChannels + LayerNormChannelsGrad and ChannelMulGrad. Each is one onnxruntime session over the same
inputs; the two alternate rep by rep and the script prints the median and the 10th-90th percentiles of after/before per
shape, in CPU time of this process (--cpu-time, the default: robust to a loaded machine at --threads 1) or wall.

    python bench/cnx_probes.py [--reps 20] [--threads 1] [--wall] [--only ln|scale] [--shapes 32x320x2x2,...]
                               [--library OTHER_BUILD.so] [--against OTHER_BUILD.so]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# convnext_atto's four stages at 64x64 input, then maps the kernels' tiny-map paths take at other sizes: 7x7 (the
# last stage of a 224-px ConvNeXt), 3x3 (a 96-px input) and 1x1 (a 32-px input)
SHAPES = [(32, 40, 16, 16), (32, 80, 8, 8), (32, 160, 4, 4), (32, 320, 2, 2), (32, 320, 7, 7), (32, 320, 3, 3),
          (32, 320, 1, 1)]


LIBRARY = None   # --library: another build of the kernels (e.g. main's, from the kernel cache) in place of this one
AGAINST = None   # --against: "before" is the same rewrite on this other build of the kernels


def session(nodes, inputs, outputs, threads, library=None):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from fracgraph import kernels

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    m.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if library or LIBRARY:
        so.register_custom_ops_library(library or LIBRARY)
    else:
        kernels.register(so)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ln_pair(shape, threads):
    from onnx import helper

    from fracgraph.kernels import DOMAIN
    from fracgraph.passes.permute import perm_code

    last, first = perm_code([0, 2, 3, 1]), perm_code([0, 3, 1, 2])
    before = [helper.make_node("Permute", ["x"], ["xt"], domain=DOMAIN, perm_code=last, rank=4),
              helper.make_node("LayerNormalization", ["xt", "s", "b"], ["yt", "m", "i"], axis=-1, epsilon=1e-6),
              helper.make_node("Permute", ["yt"], ["y"], domain=DOMAIN, perm_code=first, rank=4),
              helper.make_node("Permute", ["dy"], ["dyt"], domain=DOMAIN, perm_code=last, rank=4),
              helper.make_node("LayerNormGrad", ["dyt", "xt", "s", "m", "i"], ["dxt", "ds", "db"], domain=DOMAIN),
              helper.make_node("Permute", ["dxt"], ["dx"], domain=DOMAIN, perm_code=first, rank=4)]
    after = [helper.make_node("LayerNormChannels", ["x", "s", "b"], ["y", "m", "i"], domain=DOMAIN, epsilon=1e-6),
             helper.make_node("LayerNormChannelsGrad", ["dy", "x", "s", "m", "i"], ["dx", "ds", "db"], domain=DOMAIN)]
    rng = np.random.default_rng(0)
    feeds = dict(x=rng.standard_normal(shape, np.float32), dy=rng.standard_normal(shape, np.float32),
                 s=np.ones(shape[1], np.float32), b=np.zeros(shape[1], np.float32))
    outs = ["y", "dx", "ds", "db"]
    if AGAINST:
        return session(after, list(feeds), outs, threads, AGAINST), session(after, list(feeds), outs, threads), feeds
    return session(before, list(feeds), outs, threads), session(after, list(feeds), outs, threads), feeds


def scale_pair(shape, threads):
    from onnx import helper, numpy_helper

    from fracgraph.kernels import DOMAIN

    axes = helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([0, 2, 3], np.int64)))
    before = [axes, helper.make_node("Mul", ["dy", "g"], ["da"]), helper.make_node("Mul", ["dy", "a"], ["p"]),
              helper.make_node("ReduceSum", ["p", "axes"], ["dg"], keepdims=1)]
    after = [helper.make_node("ChannelMulGrad", ["dy", "a", "g"], ["da", "dg"], domain=DOMAIN)]
    rng = np.random.default_rng(0)
    feeds = dict(dy=rng.standard_normal(shape, np.float32), a=rng.standard_normal(shape, np.float32),
                 g=rng.standard_normal((1, shape[1], 1, 1), np.float32))
    if AGAINST:
        before, against = after, AGAINST
    else:
        against = None
    return (session(before, list(feeds), ["da", "dg"], threads, against), session(after, list(feeds), ["da", "dg"], threads),
            feeds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wall", action="store_true", help="wall time instead of this process's CPU time")
    ap.add_argument("--only", choices=("ln", "scale"), help="one of the two rewrites")
    ap.add_argument("--shapes", help="comma-separated NxCxHxW shapes instead of the default list")
    ap.add_argument("--library", help="a kernel library (.so) to run instead of this checkout's build, e.g. "
                    "another checkout's from the kernel cache: the same probe before and after a kernel change")
    ap.add_argument("--against", help="a kernel library (.so): 'before' is then the same rewrite run on it (each in its "
                    "own session, alternated rep by rep in this process): this build's kernels against another's")
    a = ap.parse_args()
    global LIBRARY, AGAINST
    LIBRARY, AGAINST = a.library, a.against
    shapes = [tuple(map(int, x.split("x"))) for x in a.shapes.split(",")] if a.shapes else SHAPES
    pairs = [(k, label, make) for k, label, make in (("ln", "LayerNorm2d fwd+bwd", ln_pair),
                                                       ("scale", "layer-scale grad", scale_pair))
             if a.only in (None, k)]
    clock = time.perf_counter if a.wall else time.process_time
    print(f"{'wall' if a.wall else 'CPU'} time, {a.threads} threads, {a.reps} alternated reps, "
          f"load average {os.getloadavg()[0]:.1f}" + (f", kernels {a.library}" if a.library else "")
          + (f", before = the same rewrite on {a.against}" if a.against else ""))
    print("| op | shape | before ms | after ms | after / before (median, 10th-90th percentile) |\n|---|---|---|---|---|")
    for _, label, make in pairs:
        for shape in shapes:
            before, after, feeds = make(shape, a.threads)
            tb, ta = [], []
            for r in range(a.reps + 2):
                for sess, ts in ((before, tb), (after, ta)) if r % 2 == 0 else ((after, ta), (before, tb)):
                    t = clock()
                    sess.run(None, feeds)
                    if r >= 2:
                        ts.append(clock() - t)
            ratios = sorted(x / y for x, y in zip(ta, tb))
            print(f"| {label} | {'x'.join(map(str, shape))} | {1000 * statistics.median(tb):.2f} | "
                  f"{1000 * statistics.median(ta):.2f} | {statistics.median(ratios):.2f} "
                  f"({ratios[len(ratios) // 10]:.2f}-{ratios[-1 - len(ratios) // 10]:.2f}) |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
