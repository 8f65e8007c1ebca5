"""The GPT step's slow onnxruntime ops, each against what replaced it (issue 16 item 4), one thread, interleaved.

    python bench/lm_ops.py [--rounds 7] [--reps 30]

Shapes of the zoo GPT's bench step (batch 12, context 64, 4 heads, width 128, vocabulary 65):
- Softmax on causally masked scores [12, 4, 64, 64]: as it ran, and with denormals flushed on the calling thread
  (runtime.flushed_denormals, what the step now does); unmasked scores for comparison;
- the mask: Where(causal, -inf, scores) forward and Where(causal, 0, dY) backward, against the bias Add of
  lowering/mask.py (whose backward is no op);
- the token table's gradient: GatherGrad against ScatterND(reduction=add) (passes/gather_grad.py) and PyTorch's
  index_add_;
- GELU's gradient [12, 64, 512]: onnxruntime's GeluGrad against PyTorch's gelu_backward (not replaced: no faster
  ONNX formulation, see README "Language models").
Each line: median ms per call over the rounds and the ratio range against the first entry of its group, plus the
load average the machine ran at.
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


def session(nodes, inputs, inits=(), outputs=("y",), ms=False):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], list(inits))
    ops = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    m = helper.make_model(g, opset_imports=ops)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args(argv)

    import torch
    from onnx import TensorProto as TP
    from onnx import helper
    from onnx import numpy_helper as nh

    from fracgraph.runtime import flushed_denormals

    torch.set_num_threads(1)
    F = TP.FLOAT
    rng = np.random.default_rng(0)
    S = [12, 4, 64, 64]
    causal = np.triu(np.ones((64, 64), bool), 1)
    scores = rng.standard_normal(S).astype(np.float32)
    masked = np.where(causal, -np.inf, scores).astype(np.float32)
    softmax = session([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [("x", F, S)])
    where_fw = session([helper.make_node("Where", ["m", "ninf", "x"], ["y"])], [("x", F, S)],
                       [nh.from_array(causal, "m"), nh.from_array(np.array(-np.inf, np.float32), "ninf")])
    where_bw = session([helper.make_node("Where", ["m", "zero", "x"], ["y"])], [("x", F, S)],
                       [nh.from_array(causal, "m"), nh.from_array(np.array(0, np.float32), "zero")])
    bias_add = session([helper.make_node("Add", ["x", "b"], ["y"])], [("x", F, S)],
                       [nh.from_array(np.where(causal, -np.inf, 0).astype(np.float32), "b")])
    assert np.array_equal(where_fw.run(None, {"x": scores})[0], bias_add.run(None, {"x": scores})[0])

    V, C, N = 65, 128, 12 * 64
    ids = rng.integers(0, V, (12, 64))
    dy = rng.standard_normal((12, 64, C)).astype(np.float32)
    gg_in = [("shape", TP.INT64, [2]), ("ids", TP.INT64, [12, 64]), ("dy", F, [12, 64, C])]
    gather_grad = session([helper.make_node("GatherGrad", ["shape", "ids", "dy"], ["y"], domain="com.microsoft",
                                            axis=0)], gg_in, ms=True)
    scatter = session([helper.make_node("ConstantOfShape", ["shape"], ["z"], value=nh.from_array(np.zeros(1, np.float32))),
                       helper.make_node("Reshape", ["ids", "s1"], ["i"]), helper.make_node("Reshape", ["dy", "s2"], ["u"]),
                       helper.make_node("ScatterND", ["z", "i", "u"], ["y"], reduction="add")], gg_in,
                      [nh.from_array(np.array([-1, 1], np.int64), "s1"), nh.from_array(np.array([-1, C], np.int64), "s2")])
    gg_feed = {"shape": np.array([V, C]), "ids": ids, "dy": dy}
    assert np.array_equal(gather_grad.run(None, gg_feed)[0], scatter.run(None, gg_feed)[0])
    it, dt = torch.from_numpy(ids.reshape(-1)), torch.from_numpy(dy.reshape(N, C))

    G = [12, 64, 4 * C]
    gx, gdy = rng.standard_normal(G).astype(np.float32), rng.standard_normal(G).astype(np.float32)
    gelu_grad = session([helper.make_node("GeluGrad", ["dy", "x"], ["y"], domain="com.microsoft")],
                        [("dy", F, G), ("x", F, G)], ms=True)
    tx, tdy = torch.from_numpy(gx), torch.from_numpy(gdy)

    def flushed(fn):
        def run():
            with flushed_denormals():
                fn()
        return run

    groups = {
        "Softmax, masked scores [12,4,64,64]": [
            ("as it ran", lambda: softmax.run(None, {"x": masked})),
            ("denormals flushed", flushed(lambda: softmax.run(None, {"x": masked}))),
            ("unmasked scores", lambda: softmax.run(None, {"x": scores}))],
        "causal mask, forward + backward": [
            ("Where + Where", lambda: (where_fw.run(None, {"x": scores}), where_bw.run(None, {"x": scores}))),
            ("bias Add (no backward op)", lambda: bias_add.run(None, {"x": scores}))],
        "token table gradient (65x128, 768 ids)": [
            ("GatherGrad", lambda: gather_grad.run(None, gg_feed)),
            ("ScatterND add", lambda: scatter.run(None, gg_feed)),
            ("PyTorch index_add_", lambda: torch.zeros(V, C).index_add_(0, it, dt))],
        "GELU gradient [12,64,512]": [
            ("onnxruntime GeluGrad", lambda: gelu_grad.run(None, {"dy": gdy, "x": gx})),
            ("PyTorch gelu_backward", lambda: torch.ops.aten.gelu_backward(tdy, tx))],
    }
    times = {(g, n): [] for g, entries in groups.items() for n, _ in entries}
    for _ in range(a.rounds):
        for g, entries in groups.items():
            for n, fn in entries:
                fn()
                t = time.perf_counter()
                for _ in range(a.reps):
                    fn()
                times[(g, n)].append(1000 * (time.perf_counter() - t) / a.reps)
    print(f"one thread, {a.rounds} interleaved rounds of {a.reps} calls, load average {os.getloadavg()[0]:.1f}")
    for g, entries in groups.items():
        print(g)
        base = times[(g, entries[0][0])]
        for n, _ in entries:
            t = times[(g, n)]
            r = [x / b for x, b in zip(t, base)]
            print(f"  {n:28s} {statistics.median(t):8.3f} ms   x{min(r):.3f}-{max(r):.3f} of {entries[0][0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
