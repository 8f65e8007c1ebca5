"""Which ai.onnx ops the installed onnxruntime-training can train: for each candidate op, a one-op graph
(x * w -> op -> y, MSE loss, w trainable) goes through `generate_artifacts`, and the training model is then loaded
(a gradient op without a kernel on this build fails there). Compares the result with
`fracgraph.lowering.gradients.GRADIENT_OPS` and with the ops `fracgraph.lowering.LOWERINGS` rewrites.

Usage: python bench/ort_gradient_probe.py
Prints one line per probe: OK, NO-GRADIENT (the builder has none), NO-KERNEL (built, but cannot run here) or
BUILD-ERROR (another builder failure), and whether fracgraph's table and registry agree; exits 1 on a disagreement
(an op in the table that does not train, or an op outside both that does).
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

SHAPE = [2, 4, 6, 6]


def _c(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.array(value, dtype), name)


# name -> (op, attrs, number of data inputs, constant inputs, number of outputs, opset)
PROBES = {
    "LRN": ("LRN", dict(size=3), 1, [], 1, 17), "Sum": ("Sum", {}, 3, [], 1, 17), "Mean": ("Mean", {}, 2, [], 1, 17),
    "Max(3 inputs)": ("Max", {}, 3, [], 1, 17), "Max": ("Max", {}, 2, [], 1, 17), "Min": ("Min", {}, 2, [], 1, 17),
    "HardSwish": ("HardSwish", {}, 1, [], 1, 17), "HardSigmoid": ("HardSigmoid", {}, 1, [], 1, 17),
    "LayerNormalization(1 output)": ("LayerNormalization", dict(axis=-1), 1, [_c("s", np.ones(6)), _c("b", np.zeros(6))], 1, 17),
    "LayerNormalization": ("LayerNormalization", dict(axis=-1), 1, [_c("s", np.ones(6)), _c("b", np.zeros(6))], 3, 17),
    "AveragePool": ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2]), 1, [], 1, 17),
    "GlobalAveragePool": ("GlobalAveragePool", {}, 1, [], 1, 17), "GlobalMaxPool": ("GlobalMaxPool", {}, 1, [], 1, 17),
    "MaxPool": ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2]), 1, [], 1, 17),
    **{op: (op, {}, 1, [], 1, 17) for op in (
        "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Softplus", "Relu", "Neg", "Exp", "Log", "Reciprocal", "Abs",
        "Sqrt", "Erf", "Identity", "Flatten", "Softmax", "LogSoftmax", "Softsign", "Cos", "Sin", "Sign", "Floor",
        "Shrink", "ThresholdedRelu", "Celu")},
    "Dropout(no mask output)": ("Dropout", {}, 1, [], 1, 17), "Dropout": ("Dropout", {}, 1, [], 2, 17),
    "Dropout(ratio input, no mask output)": ("Dropout", {}, 1, [_c("ratio", 0.2)], 1, 17),
    "Mish": ("Mish", {}, 1, [], 1, 18), "Gelu": ("Gelu", {}, 1, [], 1, 20),
    "PRelu": ("PRelu", {}, 1, [_c("sl", np.full([4, 1, 1], 0.1))], 1, 17),
    "Clip": ("Clip", {}, 1, [_c("lo", 0.0), _c("hi", 6.0)], 1, 17),
    "InstanceNormalization": ("InstanceNormalization", {}, 1, [_c("s", np.ones(4)), _c("b", np.zeros(4))], 1, 17),
    "Pad": ("Pad", {}, 1, [_c("p", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)], 1, 17),
    "Resize": ("Resize", dict(mode="nearest"), 1, [_c("roi", []), _c("sc", [1, 1, 2, 2])], 1, 17),
    "Tile": ("Tile", {}, 1, [_c("r", [1, 1, 2, 1], np.int64)], 1, 17),
    "ReduceMean": ("ReduceMean", dict(axes=[2, 3]), 1, [], 1, 17),
    "ReduceSum": ("ReduceSum", {}, 1, [_c("ax", [2, 3], np.int64)], 1, 17),
    "ReduceL2": ("ReduceL2", dict(axes=[2, 3]), 1, [], 1, 17),
    "ReduceLogSumExp": ("ReduceLogSumExp", dict(axes=[2, 3]), 1, [], 1, 17),
    "ConvTranspose": ("ConvTranspose", {}, 1, [_c("wt", np.ones([4, 2, 2, 2]))], 1, 17),
    "Einsum": ("Einsum", dict(equation="nchw->nchw"), 1, [], 1, 17),
    "DepthToSpace": ("DepthToSpace", dict(blocksize=2), 1, [], 1, 17),
    "SpaceToDepth": ("SpaceToDepth", dict(blocksize=2), 1, [], 1, 17),
    "Expand": ("Expand", {}, 1, [_c("s", SHAPE, np.int64)], 1, 17),
    "Div": ("Div", {}, 2, [], 1, 17), "Sub": ("Sub", {}, 2, [], 1, 17),
    "Pow": ("Pow", {}, 1, [_c("e", 2.0)], 1, 17),
    "Transpose(no perm)": ("Transpose", {}, 1, [], 1, 17), "Transpose": ("Transpose", dict(perm=[0, 1, 3, 2]), 1, [], 1, 17),
}


def probe(op, attrs, n_in, consts, n_out, opset) -> str:
    import onnxruntime as ort
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module

    ort.set_default_logger_severity(4)
    nodes = [h.make_node("Mul", ["x", "w"], ["xw"])]
    nodes.append(h.make_node(op, ["xw"] * n_in + [c.name for c in consts], ["y"] + [f"o{i}" for i in range(1, n_out)], **attrs))
    g = h.make_graph(nodes, "probe", [h.make_tensor_value_info("x", T.FLOAT, SHAPE)],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [_c("w", np.ones([1, 4, 1, 1]))] + consts)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=9)
    m = onnx.shape_inference.infer_shapes(m)
    vi = next((v for v in m.graph.value_info if v.name == "y"), None)
    if vi is not None:
        del m.graph.output[:]
        m.graph.output.append(vi)
    with tempfile.TemporaryDirectory() as d:
        try:
            artifacts.generate_artifacts(m, requires_grad=["w"], loss=artifacts.LossType.MSELoss, artifact_directory=d)
        except Exception as e:
            text = str(e)
            return "NO-GRADIENT" if "has not been registered" in text else "BUILD-ERROR " + text.strip().splitlines()[-1][-100:]
        try:
            Module(os.path.join(d, "training_model.onnx"), CheckpointState.load_checkpoint(os.path.join(d, "checkpoint")))
        except Exception as e:
            return "NO-KERNEL " + str(e).strip().splitlines()[-1][-90:]
    return "OK"


def main() -> int:
    from fracgraph.lowering import LOWERINGS
    from fracgraph.lowering.gradients import GRADIENT_OPS

    bad = 0
    for name, (op, attrs, n_in, consts, n_out, opset) in PROBES.items():
        got = probe(op, attrs, n_in, consts, n_out, opset)
        plain = name == op   # the probe of the op in its usual form (not a variant such as "Max(3 inputs)")
        table = op in GRADIENT_OPS
        verdict = ""
        if plain and table and got != "OK":
            verdict, bad = "DISAGREES: in GRADIENT_OPS but does not train", bad + 1
        elif plain and got == "OK" and not table:
            verdict, bad = "DISAGREES: trains but missing from GRADIENT_OPS", bad + 1
        elif got != "OK":
            verdict = "lowered by fracgraph" if op in LOWERINGS else "refused by fracgraph (one line)"
        print(f"{name:38s} {got[:110]:60s} {verdict}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
