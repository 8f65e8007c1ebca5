"""Load, validate and normalize any ONNX model into the form the passes expect.

Normal form: ai.onnx opset in [13, 21] and IR <= 10 (what onnxruntime-training 1.19.2 loads), every weight an
initializer (Constant nodes and constant-only subgraphs folded), every node uniquely named, shapes inferred, ops
onnxruntime-training cannot differentiate lowered into ops it can (fracgraph/lowering).
What cannot be supported is refused with one line that names the node and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference, version_converter

from .analysis.optable import GEMM_OPS, LOWERED_PREFIX
from .errors import FracgraphError
from .memory import check_fits, fmt_bytes

MAX_OPSET = 21
MIN_OPSET = 13
TARGET_OLD_OPSET = 17      # models below MIN_OPSET are converted up to this
MAX_IR = 10
CONTROL_FLOW = ("If", "Loop", "Scan")
# Ops whose value does not depend on anything but their inputs, so constant-only instances can be folded.
_NONDETERMINISTIC = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial", "Bernoulli"}


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file (and its external data, which must stay inside the model's directory).

    Sizes are checked before anything large is read: the file against available memory, every initializer's
    declared shape against its stored bytes, and the sum of declared weight sizes against available memory.
    """
    p = Path(path)
    if not p.is_file():
        raise FracgraphError(f"{p}: no such file; pass the path of an .onnx model")
    # parsing holds the file's bytes and the decoded message at once
    check_fits(2 * p.stat().st_size, f"{p} ({fmt_bytes(p.stat().st_size)} on disk)",
               "use a smaller model or a machine with more memory")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises several types for garbage input
        raise FracgraphError(f"{p}: not a readable ONNX model ({type(e).__name__}); check the file is a complete .onnx export")
    if not model.graph.node:
        raise FracgraphError(f"{p}: the ONNX model has an empty graph")
    _check_declared_sizes(model, p)
    _load_external_data(model, p.parent.resolve())
    return model


def _declared_nbytes(t: onnx.TensorProto) -> int:
    """Bytes the tensor's dims and data type say it holds (a string tensor counts its stored strings)."""
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(x) for x in t.string_data)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        raise FracgraphError(f"tensor {t.name!r} has data type {t.data_type}, which ONNX does not define; the file is damaged")
    if t.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4):
        itemsize = 0.5
    n = 1
    for d in t.dims:
        if d < 0:
            raise FracgraphError(f"tensor {t.name!r} has a negative dimension in its shape {list(t.dims)}; the file is damaged")
        n *= d
    return int(n * itemsize + 0.5)


def _check_declared_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Declared initializer sizes must fit in memory (checked before external data is read) ."""
    from onnx.external_data_helper import uses_external_data

    total = 0
    for t in model.graph.initializer:
        n = _declared_nbytes(t)
        total += n
        if not uses_external_data(t) and t.HasField("raw_data") and len(t.raw_data) != n:
            raise FracgraphError(f"tensor {t.name!r}: its shape {list(t.dims)} needs {n} bytes but the file stores "
                                 f"{len(t.raw_data)}; the model is damaged, export it again")
    check_fits(total, f"{path}: the weights ({len(model.graph.initializer)} initializers, as declared)",
               "use a smaller model or a machine with more memory")


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
        # the loader reads `length` bytes, or the rest of the file: both must be exactly what the shape declares
        need = _declared_nbytes(tensor)
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else target.stat().st_size - offset
        except ValueError:
            raise FracgraphError(f"tensor {tensor.name}: external data offset/length are not integers")
        if offset < 0 or length != need or offset + length > target.stat().st_size:
            raise FracgraphError(f"tensor {tensor.name}: external data {loc!r} (offset {offset}, {length} bytes, file "
                                 f"{target.stat().st_size} bytes) does not hold the {need} bytes its shape "
                                 f"{list(tensor.dims)} needs; the model is damaged, export it again")
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


# Folding a node of a parameter makes its output the parameter that trains. That is the same training only where the
# node re-lays the parameter out one to one (W^T for a MatMul, a reshaped layer scale): a Gather of it (Swin's
# relative-position bias table, gathered to [heads, N, N] by a constant index) would train every gathered copy of an
# entry apart, a Mul by a constant would change its step size. Those stay nodes, and the gradient reaches the
# parameter through them, as in PyTorch.
_RELAYOUT = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}


def _is_float_cast(node: onnx.NodeProto) -> bool:   # Gemma's `weight.float()` of a float weight: the identity
    return node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)


def _node_key(node: onnx.NodeProto) -> tuple:
    return (node.domain, node.op_type, tuple(node.input),
            tuple(a.SerializeToString(deterministic=True) for a in sorted(node.attribute, key=lambda a: a.name)))


def _tied_weights(graph: onnx.GraphProto) -> tuple[set[str], dict[str, str]]:
    """A float initializer read by more than one node is a tied weight (GPT-2's token table, read by the embedding's
    Gather and, through a Transpose, by the LM head; ALBERT's shared layers, each weight read by one Transpose per
    use). Folding a node of it into an initializer would give the fold's readers a copy that trains as a parameter
    of its own, and the model would be untied. Returns (nodes that must stay in the graph, by name; aliases
    {duplicate's output: first's output} for identical nodes of the weight, which fold to one shared initializer).
    `Identity` readers do not tie: the TorchScript exporter writes an Identity for each parameter it deduplicated
    because its value equals another's (zero biases, unit LayerNorm scales at initialization), and those are
    separate parameters in the model. Nor do Shape and Size readers, which read no values."""
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for x in set(node.input):
            if x in floats:
                readers.setdefault(x, []).append(node)
    keep: set[str] = set()
    alias: dict[str, str] = {}
    for nodes in readers.values():
        tied = [n for n in nodes if n.op_type not in ("Identity", "Shape", "Size")]   # Shape/Size read no values
        if len(tied) < 2:
            continue
        groups: dict[tuple, list[onnx.NodeProto]] = {}
        for n in tied:
            groups.setdefault(_node_key(n), []).append(n)
        if len(groups) > 1:   # read in different ways (Gather and Transpose): every reader stays a node
            keep.update(n.name for n in tied)
        else:                 # the same node repeated (one Transpose per use): one fold, shared
            first, *rest = tied
            for n in rest:
                alias.update(zip(n.output, first.output))
    return keep, alias


def _fold_constants(model: onnx.ModelProto) -> None:
    """Turn Constant nodes and constant-only deterministic subgraphs into initializers, keeping tied weights tied
    (`_tied_weights`)."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    const: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        const[init.name] = None  # known constant; value loaded lazily
    graph_inputs = {i.name for i in graph.input}
    tied_keep, alias = _tied_weights(graph)
    # A PyTorch export writes every parameter as an initializer (export_params); its Constant nodes are traced Python
    # values and non-persistent buffers (RoPE's inv_freq), which PyTorch never trains: what is folded from them alone
    # is recorded (CONSTANTS) so that build.classify_initializers does not make it a parameter. Other producers
    # (old converters) may write weights as Constant/ConstantOfShape nodes, which stay trainable.
    from_torch = model.producer_name == "pytorch"
    param_derived = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    constants: list[str] = []
    new_inits: list[onnx.TensorProto] = []
    keep = []
    for node in graph.node:
        if node.output and all(o in alias for o in node.output if o):
            continue          # a repeat of a folded node of a tied weight: its readers read the first's initializer
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.name not in tied_keep
            and (node.op_type in _RELAYOUT or _is_float_cast(node) or not any(x in param_derived for x in node.input if x))
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
        derived = any(x in param_derived for x in node.input if x)
        for name, v in zip(node.output, values):
            arr = np.asarray(v)
            const[name] = arr
            new_inits.append(numpy_helper.from_array(arr, name))
            if derived:
                param_derived.add(name)
            elif from_torch and arr.dtype == np.float32:
                constants.append(name)
    if alias:
        for node in keep:
            for k, x in enumerate(node.input):
                if x in alias:
                    node.input[k] = alias[x]
        for o in graph.output:
            if o.name in alias:   # a repeat that is a graph output: an Identity of the shared initializer
                keep.append(onnx.helper.make_node("Identity", [alias[o.name]], [o.name], name=f"fg::tied/{o.name}"))
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(new_inits)
        used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
        live = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(live)
        constants = [c for c in constants if c in used]
    if constants:
        import json

        old = folded_constants(model)
        for k in reversed([k for k, p in enumerate(model.metadata_props) if p.key == CONSTANTS]):
            del model.metadata_props[k]
        model.metadata_props.add(key=CONSTANTS, value=json.dumps(sorted(set(old) | set(constants))))


CONSTANTS = "fracgraph.constants"


def folded_constants(model: onnx.ModelProto) -> list[str]:
    """Initializers folded from a PyTorch export's Constant nodes alone: constants of the model, never trained."""
    import json

    return next((json.loads(p.value) for p in model.metadata_props if p.key == CONSTANTS), [])


def _check_control_flow(graph: onnx.GraphProto) -> None:
    for node in graph.node:
        if node.op_type in CONTROL_FLOW:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH and any(n.op_type in GEMM_OPS for n in a.g.node):
                    raise FracgraphError(f"node {node.name} ({node.op_type}): control flow around a Conv/Gemm/MatMul cannot be quantized; export the model without it")


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        inferred = shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise FracgraphError(f"shape inference failed: {str(e).splitlines()[0][:300]}")
    return _probe_shapes(_symbolic_shapes(inferred))


def _gemm_shapes_partial(model: onnx.ModelProto) -> bool:
    """Does a GEMM read or write a tensor with more than one dim (the batch) not static? Both operands count: an
    activation right operand (attention's K^T and V) must have its dims too, as in multi-query attention, where
    Falcon's K^T is broadcast over the heads from a [batch, 1, d, T] whose 1 the exporter computes from shapes."""
    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    inits = {t.name for t in model.graph.initializer}

    def partial(name: str) -> bool:
        v = known.get(name)
        return name not in inits and (v is None or not v.type.tensor_type.HasField("shape")
                                      or _static_dims(v) < len(v.type.tensor_type.shape.dim) - 1)

    return any(n.op_type in GEMM_OPS and any(partial(x) for x in list(n.input[:2]) + list(n.output[:1]))
               for n in model.graph.node)


def _static_dims(vi: onnx.ValueInfoProto) -> int:
    t = vi.type.tensor_type
    return sum(d.HasField("dim_value") for d in t.shape.dim) if t.HasField("shape") else -1


def _run_symbolic_inference(engine, model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`SymbolicShapeInference.infer_shapes(model, auto_merge=True)` without its side effect: when inference is
    incomplete (an op it does not know, a dim it cannot prove), onnxruntime 1.19's `infer_shapes` saves the whole
    model as `sym_shape_infer_temp.onnx` plus a uuid-named external-data file of all its weights into the current
    directory before it raises, and fracgraph would leave those in the user's working directory (110 MB for a
    timm Swin). The same steps are run here and an incomplete result is None (ONNX's shapes are kept)."""
    from onnxruntime.tools.symbolic_shape_infer import get_opset

    opset = get_opset(model)
    if not opset or opset < 7:
        return None
    sym = engine(2**31 - 1, True, False, 0)   # int_max, auto_merge, guess_output_rank, verbose
    sym._preprocess(model)
    complete = False
    while sym.run_:
        complete = sym._infer_impl()
    if not complete:
        return None
    sym._update_output_from_vi()
    return sym.out_mp_


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX's data propagation stops at arithmetic on shapes (Div, ...), as in torch's export of `chunk`, `split`
    and channel shuffles (`x.view(b, g, c // g, h, w)` with a dynamic batch): the Slice/Reshape outputs, and every
    GEMM after them, lose their static dims and would be kept FP32. Where a GEMM reads or writes such a tensor,
    onnxruntime's symbolic shape inference (sympy) fills in the dims it can prove; any failure keeps ONNX's.

    Only its numbers are taken. Its symbols are not: to finish at all it needs `auto_merge`, which unifies
    symbolic dims it cannot prove different, and onnxruntime's memory planner reuses a buffer between tensors
    whose dims carry the same symbol. In Swin (pad to the window, attention, crop) it gave a crop's output the
    symbols of a padded map elsewhere, and the step failed ("Shape mismatch attempting to re-use buffer", 8 vs
    14). A dim it leaves symbolic keeps ONNX's (its own unique name, or the input's batch symbol)."""
    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    if not _gemm_shapes_partial(model):
        return model
    try:
        import logging

        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.ERROR)
        sym = _run_symbolic_inference(SymbolicShapeInference, model)
    except Exception:   # sympy missing, an op it does not know, a conflict it cannot merge
        return model
    if sym is None:
        return model
    better = {v.name: v for v in sym.graph.value_info
              if v.name in known and _static_dims(v) > _static_dims(known[v.name])
              and len(v.type.tensor_type.shape.dim) == len(known[v.name].type.tensor_type.shape.dim)}
    if not better:
        return model
    for v in model.graph.value_info:
        if v.name in better:
            for mine, theirs in zip(v.type.tensor_type.shape.dim, better[v.name].type.tensor_type.shape.dim):
                if theirs.HasField("dim_value") and not mine.HasField("dim_value"):
                    mine.dim_value = theirs.dim_value   # (clears the dim_param: a oneof)
    return model


# Ops whose output shape can depend on the input's values: a probe run proves nothing about their dims.
_DATA_DEPENDENT_SHAPE = {"NonZero", "Unique", "Compress", "TopK", "NonMaxSuppression", "Loop", "If", "Scan",
                         "StringSplit", "RegexFullMatch"}
_PROBE_MAX_ELEMENTS = 1 << 24   # per sample, over the graph inputs


def _probe_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The last resort for dims neither inference gets: run the model in onnxruntime at batch 1 and 2 and read
    every tensor's shape. A dim that is the same in both runs is the static dim; one that differs (the batch, or
    a product with it) stays as inference left it.

    Both inferences stop where a shape is computed from `Shape()` through ops they do not evaluate: timm's "same"
    padding (`F.pad` with pads from `x.shape`, the tf_* EfficientNets and MixNets: 49 of tf_efficientnet_b0's 82
    GEMMs were kept FP32 as "not static"), Swin's padding to the window and patch merging. Only run where a GEMM
    still has such a tensor, every graph input is static but for its first dim, and no op has a value-dependent
    output shape; any failure (an op onnxruntime cannot run, memory) keeps the inferred shapes."""
    g = model.graph
    if not _gemm_shapes_partial(model) or any(n.op_type in _DATA_DEPENDENT_SHAPE for n in g.node):
        return model
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    shapes = []
    for i in inputs:
        t = i.type.tensor_type
        dims = list(t.shape.dim) if t.HasField("shape") else None
        if dims is None or not dims or any(not d.HasField("dim_value") for d in dims[1:]):
            return model
        shapes.append([d.dim_value if d.HasField("dim_value") else None for d in dims])
    if sum(int(np.prod([d for d in s[1:]], dtype=np.int64)) for s in shapes) > _PROBE_MAX_ELEMENTS:
        return model
    known = {v.name: v for v in list(g.value_info) + list(g.output)}
    targets = [o for n in g.node for o in n.output if o and o in known and known[o].type.HasField("tensor_type")
               and (not known[o].type.tensor_type.HasField("shape")
                    or any(not d.HasField("dim_value") for d in known[o].type.tensor_type.shape.dim))]
    if not targets:
        return model
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    outs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, known[t].type.tensor_type.elem_type, None)
                              for t in targets if t not in outs)
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        rng = np.random.default_rng(0)
        runs = []
        for batch in (1, 2):
            feed = {}
            for i, s in zip(inputs, shapes):
                shape = [batch if s[0] is None else s[0]] + s[1:]
                dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                feed[i.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                                else np.zeros(shape, dtype))
            runs.append(dict(zip(names, (np.shape(v) for v in sess.run(names, feed)))))
    except Exception:   # an op onnxruntime cannot run, memory: keep what inference found
        return model
    batch_syms = {d.dim_param for i in inputs for d in i.type.tensor_type.shape.dim if d.HasField("dim_param")}
    for t in targets:
        s1, s2 = runs[0].get(t), runs[1].get(t)
        v = known[t]
        if s1 is None or s2 is None or len(s1) != len(s2):
            continue
        shape = v.type.tensor_type.shape
        if not v.type.tensor_type.HasField("shape") or len(shape.dim) != len(s1):
            v.type.tensor_type.ClearField("shape")
            shape = v.type.tensor_type.shape
            for _ in s1:
                shape.dim.add()
        for d, a, b in zip(shape.dim, s1, s2):
            if a == b and not d.HasField("dim_value") and d.dim_param not in batch_syms:
                d.dim_value = a
    return model


_KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


def _check_structure(model: onnx.ModelProto) -> None:
    """ONNX's own checker (op schemas, attributes, SSA names, topological order), plus what it lets through."""
    g = model.graph
    if not g.output:
        raise FracgraphError("the model declares no graph output; it needs one output, the logits [batch, classes]")
    if not any(imp.domain in ("", "ai.onnx") for imp in model.opset_import):
        raise FracgraphError("the model imports no ai.onnx opset; it is not a standard ONNX model")
    for node in g.node:
        if node.domain not in _KNOWN_DOMAINS:
            raise FracgraphError(f"node {node.name or node.op_type} uses op {node.domain}::{node.op_type}, which "
                                 f"onnxruntime does not implement; export the model with standard ONNX ops")
    _check_window_attributes(g)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise FracgraphError(f"the model is not valid ONNX: {first[:300]}")
    produced = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    for out in g.output:
        if out.name not in produced:
            raise FracgraphError(f"graph output {out.name!r} is produced by no node; the model is damaged")


def _check_window_attributes(graph: onnx.GraphProto) -> None:
    """Sliding-window attributes are checked before ONNX's shape inference, which divides by strides natively
    (a zero stride kills the process with SIGFPE rather than raising)."""
    for node in graph.node:
        for a in node.attribute:
            if a.name not in ("strides", "dilations", "kernel_shape", "pads", "group"):
                continue
            v = onnx.helper.get_attribute_value(a)
            vals = list(v) if isinstance(v, (list, tuple)) else [v]
            if not all(isinstance(x, int) for x in vals):
                raise FracgraphError(f"node {node.name or node.op_type} ({node.op_type}): attribute {a.name} must be integers")
            low = 0 if a.name == "pads" else 1
            if any(x < low for x in vals):
                raise FracgraphError(f"node {node.name or node.op_type} ({node.op_type}): {a.name}={vals} is invalid; "
                                     f"{'pads must be >= 0' if low == 0 else a.name + ' must be >= 1'}")


_PARAM_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")


def _check_weights(model: onnx.ModelProto) -> None:
    """Every initializer decodes to its declared shape; weights hold no NaN (and GEMM/BN parameters no Inf)."""
    params = {x for n in model.graph.node if n.op_type in _PARAM_OPS for x in n.input[1:]}
    for t in model.graph.initializer:
        try:
            arr = numpy_helper.to_array(t)
        except Exception as e:
            raise FracgraphError(f"tensor {t.name!r}: its stored data does not match its shape {list(t.dims)} "
                                 f"and type ({str(e).splitlines()[0][:120]}); the model is damaged")
        if arr.dtype.kind == "f" and arr.size:
            if np.isnan(arr).any():
                raise FracgraphError(f"weight {t.name!r} contains NaN; training from it cannot work: export the model again")
            if t.name in params and not np.isfinite(arr).all():
                raise FracgraphError(f"weight {t.name!r} contains Inf; training from it cannot work: export the model again")


def _check_inputs(model: onnx.ModelProto) -> None:
    """Static input dims must be positive, and one input tensor must fit in memory (the batch dim may be symbolic)."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is not None and d <= 0 for d in dims):
            raise FracgraphError(f"input {vi.name!r} declares shape {dims}: every dimension must be positive "
                                 f"(or symbolic, like the batch)")
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
        except (KeyError, ValueError, TypeError):
            raise FracgraphError(f"input {vi.name!r} has element type {tt.elem_type}, which ONNX does not define")
        n = itemsize
        for d in dims:
            n *= d or 1
        check_fits(n, f"input {vi.name!r} of shape {dims} (one batch row)",
                   "its declared dimensions are too large; export the model with the real input shape")


def _check_gemm_shapes(model: onnx.ModelProto) -> None:
    """Shape inference does not compare a Gemm/MatMul's reduction lengths or a Conv's channels; a mismatch would
    only surface as a runtime error in the first training step, so it is refused here, naming the node."""
    from .analysis.optable import value_shapes

    shapes = value_shapes(model)
    for node in model.graph.node:
        if node.op_type not in GEMM_OPS or len(node.input) < 2:
            continue
        a, b = shapes.get(node.input[0], ()), shapes.get(node.input[1], ())
        attrs = {x.name: helper_value(x) for x in node.attribute}
        if node.op_type == "Conv":
            if len(a) >= 2 and len(b) >= 2 and a[1] is not None and b[1] is not None:
                got, want = a[1], b[1] * int(attrs.get("group", 1))
            else:
                continue
        elif node.op_type == "Gemm":
            if len(a) != 2 or len(b) != 2:
                continue
            got, want = a[0 if attrs.get("transA", 0) else 1], b[1 if attrs.get("transB", 0) else 0]
        else:
            if len(a) < 1 or len(b) < 2:
                continue
            got, want = a[-1], b[-2]
        if got is not None and want is not None and got != want:
            raise FracgraphError(f"node {node.name} ({node.op_type}): its input has {got} features/channels but its "
                                 f"weight {node.input[1]!r} expects {want}; the model is inconsistent")


def _lower(model: onnx.ModelProto) -> onnx.ModelProto:
    """Ops without an onnxruntime-training gradient -> ops with one (fracgraph/lowering); shapes inferred again for
    the new tensors. What each lowering did or declined is kept in the model's metadata (`LOWERING_NOTES`)."""
    import json

    from .lowering import LowerPass

    result = LowerPass()(model)
    if result.notes:
        del_keys = [k for k, p in enumerate(model.metadata_props) if p.key == LOWERING_NOTES]
        for k in reversed(del_keys):
            del model.metadata_props[k]
        model.metadata_props.add(key=LOWERING_NOTES, value=json.dumps(result.notes))
    if not result.modified:
        return model
    from .passes.base import toposort

    toposort(result.model)
    del result.model.graph.value_info[:]
    return _infer_shapes(result.model)


LOWERING_NOTES = "fracgraph.lowering"


def lowering_notes(model: onnx.ModelProto) -> list[str]:
    import json

    return next((json.loads(p.value) for p in model.metadata_props if p.key == LOWERING_NOTES), [])


def helper_value(a: onnx.AttributeProto):
    return onnx.helper.get_attribute_value(a)


def load_model(path: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read (if a path) and normalize a model; see the module docstring for the normal form."""
    model = read_model(path) if not isinstance(path, onnx.ModelProto) else onnx.ModelProto.FromString(path.SerializeToString())
    if model.ir_version > MAX_IR or model.ir_version < 7:
        model.ir_version = min(max(model.ir_version, 7), MAX_IR)
    _check_structure(model)
    _check_weights(model)
    _check_inputs(model)
    model = _convert_opset(model)
    _name_nodes(model.graph)
    _fold_constants(model)
    _check_control_flow(model.graph)
    # initializers must not also be graph inputs (old exporters list them), or ORT treats them as overridable
    inits = {t.name for t in model.graph.initializer}
    ins = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(ins)
    model = _infer_shapes(model)
    _check_gemm_shapes(model)
    model = _lower(model)
    if not any(n.op_type in GEMM_OPS and not n.name.startswith(LOWERED_PREFIX) for n in model.graph.node):
        raise FracgraphError("the model has no Conv, Gemm or MatMul: there is nothing to quantize")
    return model


def data_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The single float graph input that carries the data."""
    floats = [i for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if len(floats) != 1:
        names = ", ".join(i.name for i in model.graph.input) or "none"
        raise FracgraphError(f"the model must have exactly one float input (the data); it has: {names}")
    return floats[0]
