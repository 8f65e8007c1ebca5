"""Load, validate and normalize any ONNX model into the form the passes expect.

Normal form: ai.onnx opset in [13, 21] and IR <= 10 (what onnxruntime-training 1.19.2 loads), every weight an
initializer (Constant nodes and constant-only subgraphs folded), every node uniquely named, shapes inferred.
What cannot be supported is refused with one line that names the node and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference, version_converter

from .analysis.optable import GEMM_OPS
from .errors import FracgraphError

MAX_OPSET = 21
MIN_OPSET = 13
TARGET_OLD_OPSET = 17      # models below MIN_OPSET are converted up to this
MAX_IR = 10
CONTROL_FLOW = ("If", "Loop", "Scan")
# Ops whose value does not depend on anything but their inputs, so constant-only instances can be folded.
_NONDETERMINISTIC = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial", "Bernoulli"}


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file (and its external data, which must stay inside the model's directory)."""
    p = Path(path)
    if not p.is_file():
        raise FracgraphError(f"{p}: no such file; pass the path of an .onnx model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises several types for garbage input
        raise FracgraphError(f"{p}: not a readable ONNX model ({type(e).__name__}); check the file is a complete .onnx export")
    if not model.graph.node:
        raise FracgraphError(f"{p}: the ONNX model has an empty graph")
    _load_external_data(model, p.parent.resolve())
    return model


def _load_external_data(model: onnx.ModelProto, base: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_tensor, uses_external_data

    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if os.path.isabs(loc) or base not in target.parents:
            raise FracgraphError(f"tensor {tensor.name}: external data path {loc!r} points outside the model's directory; refusing to read it")
        if not target.is_file():
            raise FracgraphError(f"tensor {tensor.name}: external data file {loc!r} is missing beside the model")
        try:
            load_external_data_for_tensor(tensor, str(base))
        except Exception as e:
            raise FracgraphError(f"tensor {tensor.name}: cannot read external data {loc!r} ({e})")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise FracgraphError("the model imports no ai.onnx opset; it is not a standard ONNX model")


def _convert_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    v = opset_of(model)
    target = MAX_OPSET if v > MAX_OPSET else TARGET_OLD_OPSET if v < MIN_OPSET else v
    if target == v:
        return model
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as e:
        raise FracgraphError(f"opset {v} cannot be converted to {target} (supported: {MIN_OPSET}..{MAX_OPSET}): {str(e).splitlines()[0][:200]}")
    return converted


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique, deterministic name (passes derive their own names from it)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _fold_constants(model: onnx.ModelProto) -> None:
    """Turn Constant nodes and constant-only deterministic subgraphs into initializers."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    const: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        const[init.name] = None  # known constant; value loaded lazily
    graph_inputs = {i.name for i in graph.input}
    new_inits: list[onnx.TensorProto] = []
    keep = []
    for node in graph.node:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NONDETERMINISTIC
            and node.op_type not in CONTROL_FLOW
            and all((not x) or (x in const and x not in graph_inputs) for x in node.input)
        )
        if not foldable:
            keep.append(node)
            continue
        if node.op_type == "Constant":
            values = [numpy_helper.to_array(onnx.helper.get_attribute_value(node.attribute[0]))
                      if node.attribute[0].name == "value" else np.array(onnx.helper.get_attribute_value(node.attribute[0]))]
        else:
            feeds = {}
            for x in node.input:
                if x:
                    if const[x] is None:
                        const[x] = numpy_helper.to_array(next(t for t in graph.initializer if t.name == x))
                    feeds[x] = const[x]
            try:
                sub = onnx.helper.make_model(
                    onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_tensor_value_info(o, 0, None) for o in node.output]),
                    opset_imports=model.opset_import,
                )
                values = ReferenceEvaluator(sub).run(None, feeds)
            except Exception:
                keep.append(node)
                continue
        for name, v in zip(node.output, values):
            arr = np.asarray(v)
            const[name] = arr
            new_inits.append(numpy_helper.from_array(arr, name))
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(new_inits)
        used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
        live = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(live)


def _check_control_flow(graph: onnx.GraphProto) -> None:
    for node in graph.node:
        if node.op_type in CONTROL_FLOW:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH and any(n.op_type in GEMM_OPS for n in a.g.node):
                    raise FracgraphError(f"node {node.name} ({node.op_type}): control flow around a Conv/Gemm/MatMul cannot be quantized; export the model without it")


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise FracgraphError(f"shape inference failed: {str(e).splitlines()[0][:300]}")


def _global_average_pools(model: onnx.ModelProto) -> None:
    """AveragePool over the whole (static) spatial extent -> GlobalAveragePool (same values).

    onnxruntime-training 1.19.2's AveragePoolGrad returns a gradient with batch 0 for such pools (seen with
    CIFAR ResNets' AvgPool(8)), which breaks the step; GlobalAveragePool's gradient is right.
    """
    from .analysis.optable import value_shapes

    shapes = value_shapes(model)
    for node in model.graph.node:
        if node.op_type != "AveragePool":
            continue
        attrs = {a.name: helper_value(a) for a in node.attribute}
        xs = shapes.get(node.input[0], ())
        if len(xs) < 3 or None in xs[2:] or list(attrs.get("kernel_shape", [])) != list(xs[2:]):
            continue
        if any(attrs.get("pads", [0]) ) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            continue
        node.op_type = "GlobalAveragePool"
        del node.attribute[:]


def helper_value(a: onnx.AttributeProto):
    return onnx.helper.get_attribute_value(a)


def load_model(path: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read (if a path) and normalize a model; see the module docstring for the normal form."""
    model = read_model(path) if not isinstance(path, onnx.ModelProto) else onnx.ModelProto.FromString(path.SerializeToString())
    model = _convert_opset(model)
    if model.ir_version > MAX_IR or model.ir_version < 7:
        model.ir_version = min(max(model.ir_version, 7), MAX_IR)
    _name_nodes(model.graph)
    _fold_constants(model)
    _check_control_flow(model.graph)
    # initializers must not also be graph inputs (old exporters list them), or ORT treats them as overridable
    inits = {t.name for t in model.graph.initializer}
    ins = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(ins)
    model = _infer_shapes(model)
    _global_average_pools(model)
    if not any(n.op_type in GEMM_OPS for n in model.graph.node):
        raise FracgraphError("the model has no Conv, Gemm or MatMul: there is nothing to quantize")
    return model


def data_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The single float graph input that carries the data."""
    floats = [i for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if len(floats) != 1:
        names = ", ".join(i.name for i in model.graph.input) or "none"
        raise FracgraphError(f"the model must have exactly one float input (the data); it has: {names}")
    return floats[0]
