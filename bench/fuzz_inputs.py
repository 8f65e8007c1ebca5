"""Fuzz `fracgraph quantize`, `inspect` and `estimate` with seeded, mutated ONNX models.

Every input must either succeed (the mutation happened to leave a valid model; counted separately) or fail the
way bad input should: exit code 2 and exactly one line on stderr, no traceback, within the timeout (30 s of CPU,
or 300 s of wall time for a process that waits), and no file written anywhere but the command's output directory
(the case directory and a private TMPDIR are snapshotted around each run). Prints the counts per mutation kind and per command; exits 1 if any input broke a rule.

Speed: importing torch/onnxruntime costs seconds per process, so one parent imports the CLI once and forks a
child per (input, command). The child runs the same entry point as the installed `fracgraph` script
(`fracgraph.cli:app`), with fds 1/2 redirected to files, and exits with the code the real process would (an
uncaught exception prints its traceback and exits 1, as the interpreter does); tests/test_fuzz_inputs.py checks
that this agrees with the real console script on a sample.

    python bench/fuzz_inputs.py [--n 500] [--seed 0] [--jobs 2] [--timeout 30] [--keep DIR] [--only 17,42]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

COMMANDS = ("quantize", "inspect", "estimate")
MODEL_REL = "model/model.onnx"
OUTSIDE_REL = "outside/secret.bin"
OUT_REL = "work/out"


# --------------------------------------------------------------------------------------------- base models


def _init(rng, name, shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def base_mlp() -> onnx.ModelProto:
    """Flatten -> MatMul -> Add -> Relu -> MatMul -> Add on 1x8x8 inputs, 10 classes."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
        helper.make_node("Relu", ["h1b"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["logits"], name="fc2_bias"),
    ]
    inits = [_init(rng, "w1", (64, 32)), _init(rng, "b1", (32,)), _init(rng, "w2", (32, 10)), _init(rng, "b2", (10,))]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def base_resnet() -> onnx.ModelProto:
    """Conv-BN-Relu stem, one residual Conv-BN block, global pooling, Flatten, Gemm (the layer kinds of the zoo)."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["input", "c1.w"], ["c1"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1.s", "bn1.b", "bn1.m", "bn1.v"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "bn2.s", "bn2.b", "bn2.m", "bn2.v"], ["n2"], name="bn2"),
        helper.make_node("Add", ["n2", "r1"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    inits = [_init(rng, "c1.w", (8, 1, 3, 3)), _init(rng, "c2.w", (8, 8, 3, 3)), _init(rng, "fc.w", (10, 8)),
             _init(rng, "fc.b", (10,))]
    for bn in ("bn1", "bn2"):
        inits += [numpy_helper.from_array(np.ones(8, np.float32), f"{bn}.s"),
                  numpy_helper.from_array(np.zeros(8, np.float32), f"{bn}.b"),
                  numpy_helper.from_array(np.zeros(8, np.float32), f"{bn}.m"),
                  numpy_helper.from_array(np.ones(8, np.float32), f"{bn}.v")]
    g = helper.make_graph(nodes, "resnet", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


BASES = {"mlp": base_mlp, "resnet": base_resnet}


# --------------------------------------------------------------------------------------------- mutations


@dataclass
class Case:
    """One fuzz input: files to lay out under a fresh case directory (the model at MODEL_REL)."""

    id: int
    kind: str
    base: str
    variant: str
    model: onnx.ModelProto | bytes         # bytes for byte-level mutations; "@CASE@" in names -> the case dir
    files: dict[str, bytes] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)   # relative path -> target (absolute after layout)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _float_inits(m):
    return [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT]


def _set_dim(dim, value):
    dim.Clear()
    dim.dim_value = int(value)


def m_bitflip(rng, m):
    data = bytearray(m.SerializeToString())
    k = int(rng.integers(1, 9))
    for _ in range(k):
        i = int(rng.integers(len(data)))
        data[i] ^= 1 << int(rng.integers(8))
    return f"{k} bits", bytes(data)


def m_truncate(rng, m):
    data = m.SerializeToString()
    n = int(rng.integers(0, len(data)))
    return f"{n}/{len(data)} bytes", data[:n]


def m_wrong_tensor_type(rng, m):
    types = [TensorProto.INT64, TensorProto.STRING, TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.DOUBLE,
             TensorProto.UINT8, TensorProto.UNDEFINED, TensorProto.COMPLEX64, 999]
    t = _pick(rng, types)
    where = _pick(rng, ["input", "output", "initializer", "initializer_keep_float_data"])
    if where == "input":
        m.graph.input[0].type.tensor_type.elem_type = t
    elif where == "output":
        m.graph.output[0].type.tensor_type.elem_type = t
    else:
        init = _pick(rng, list(m.graph.initializer))
        if where == "initializer":
            init.data_type = t
        else:  # typed field instead of raw bytes, under a mismatching type
            arr = numpy_helper.to_array(init)
            init.ClearField("raw_data")
            init.data_type = t
            init.float_data.extend(arr.ravel().tolist())
    return f"{where} -> {t}", m


def m_huge_dim(rng, m):
    v = int(_pick(rng, [2**31, 2**40, 2**62, 10**15, 65536]))
    where = _pick(rng, ["input_c", "input_hw", "initializer", "output_classes", "all_input"])
    dims = m.graph.input[0].type.tensor_type.shape.dim
    if where == "input_c":
        _set_dim(dims[1], v)
    elif where == "input_hw":
        _set_dim(dims[2], v)
        _set_dim(dims[3], v)
    elif where == "all_input":
        for d in dims:
            _set_dim(d, v)
    elif where == "initializer":
        init = _pick(rng, _float_inits(m))
        init.dims[0] = v
    else:
        _set_dim(m.graph.output[0].type.tensor_type.shape.dim[1], v)
    return f"{where}={v}", m


def m_negative_dim(rng, m):
    v = -int(_pick(rng, [1, 3, 2**31]))
    where = _pick(rng, ["input", "initializer", "output", "zero_input"])
    if where == "input":
        _set_dim(m.graph.input[0].type.tensor_type.shape.dim[int(rng.integers(1, 4))], v)
    elif where == "zero_input":
        _set_dim(m.graph.input[0].type.tensor_type.shape.dim[int(rng.integers(1, 4))], 0)
    elif where == "initializer":
        _pick(rng, _float_inits(m)).dims[0] = v
    else:
        _set_dim(m.graph.output[0].type.tensor_type.shape.dim[1], v)
    return f"{where}={v}", m


def m_cycle(rng, m):
    nodes = m.graph.node
    j = int(rng.integers(1, len(nodes)))
    i = int(rng.integers(0, j + 1))          # i == j: a self-loop
    nodes[i].input[0] = nodes[j].output[0]
    return f"node {i} <- node {j}", m


def m_dangling_input(rng, m):
    what = _pick(rng, ["rename_input", "drop_initializer", "empty_name_required"])
    if what == "rename_input":
        n = _pick(rng, list(m.graph.node))
        n.input[int(rng.integers(len(n.input)))] = "does_not_exist"
    elif what == "drop_initializer":
        inits = list(m.graph.initializer)
        k = int(rng.integers(len(inits)))
        del m.graph.initializer[k]
    else:
        n = _pick(rng, list(m.graph.node))
        n.input[0] = ""
    return what, m


def m_duplicate_name(rng, m):
    what = _pick(rng, ["node_output", "initializer", "input_shadows_initializer", "graph_input", "node_name"])
    g = m.graph
    if what == "node_output":
        a, b = rng.choice(len(g.node), 2, replace=False)
        g.node[int(a)].output[0] = g.node[int(b)].output[0]
    elif what == "initializer":
        t = onnx.TensorProto()
        t.CopyFrom(_pick(rng, _float_inits(m)))
        arr = np.zeros(int(rng.integers(1, 5)), np.float32)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
        g.initializer.append(t)
    elif what == "input_shadows_initializer":
        t = _pick(rng, _float_inits(m))
        g.input.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, [3, 5]))
    elif what == "graph_input":
        g.input.append(g.input[0])
    else:
        for n in g.node:
            n.name = "same"
    return what, m


def _external(m, init, location, offset=None, length=None):
    raw = numpy_helper.to_array(init).tobytes()
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = TensorProto.EXTERNAL
    del init.external_data[:]
    for k, v in (("location", location), ("offset", offset), ("length", length)):
        if v is not None:
            e = init.external_data.add()
            e.key, e.value = k, str(v)
    return raw


def m_external_outside(rng, m, case_root_token="@CASE@"):
    init = _pick(rng, _float_inits(m))
    what = _pick(rng, ["dotdot", "absolute", "symlink", "deep_dotdot", "missing", "offset_past_end", "huge_length",
                       "inside_ok", "dir_location"])
    files, links = {}, {}
    if what == "dotdot":
        raw = _external(m, init, "../outside/secret.bin")
        files[OUTSIDE_REL] = raw
    elif what == "absolute":
        raw = _external(m, init, f"{case_root_token}/{OUTSIDE_REL}")
        files[OUTSIDE_REL] = raw
    elif what == "symlink":
        raw = _external(m, init, "link.bin")
        files[OUTSIDE_REL] = raw
        links["model/link.bin"] = OUTSIDE_REL
    elif what == "deep_dotdot":
        raw = _external(m, init, "sub/../../outside/secret.bin")
        files[OUTSIDE_REL] = raw
        files["model/sub/.keep"] = b""
    elif what == "missing":
        _external(m, init, "nothere.bin")
    elif what == "offset_past_end":
        raw = _external(m, init, "w.bin", offset=10**6)
        files["model/w.bin"] = raw
    elif what == "huge_length":
        raw = _external(m, init, "w.bin", length=2**40)
        files["model/w.bin"] = raw
    elif what == "dir_location":
        _external(m, init, "sub")
        files["model/sub/.keep"] = b""
    else:  # a valid external file beside the model
        raw = _external(m, init, "w.bin")
        files["model/w.bin"] = raw
    return what, m, files, links


def m_bad_opset(rng, m):
    what = _pick(rng, ["v0", "v1", "v5", "v22", "v99", "v1e9", "no_default", "unknown_domain", "duplicate"])
    imp = m.opset_import[0]
    if what.startswith("v"):
        imp.version = {"v0": 0, "v1": 1, "v5": 5, "v22": 22, "v99": 99, "v1e9": 10**9}[what]
    elif what == "no_default":
        imp.domain = "com.example"
    elif what == "unknown_domain":
        m.opset_import.append(helper.make_opsetid("com.example", 1))
        m.graph.node[int(rng.integers(len(m.graph.node)))].domain = "com.example"
    else:
        m.opset_import.append(helper.make_opsetid("", 11))
    return what, m


def m_missing_output(rng, m):
    what = _pick(rng, ["none", "unknown_name", "input_as_output", "two_outputs"])
    g = m.graph
    if what == "none":
        del g.output[:]
    elif what == "unknown_name":
        g.output[0].name = "nowhere"
    elif what == "input_as_output":
        g.output[0].name = "input"
    else:
        g.output.append(helper.make_tensor_value_info(g.node[2].output[0], TensorProto.FLOAT, None))
        g.output[0], g.output[1]  # order kept: logits first
    return what, m


def m_empty_graph(rng, m):
    what = _pick(rng, ["no_nodes", "nothing", "no_inputs", "only_constant"])
    g = m.graph
    if what == "no_nodes":
        del g.node[:]
    elif what == "nothing":
        del g.node[:]
        del g.input[:]
        del g.output[:]
        del g.initializer[:]
    elif what == "no_inputs":
        del g.input[:]
    else:
        del g.node[:]
        g.node.append(helper.make_node("Constant", [], ["logits"], value=numpy_helper.from_array(np.zeros((1, 10), np.float32))))
    return what, m


def m_nan_weights(rng, m):
    v = _pick(rng, [np.nan, np.inf, -np.inf, 3e38])
    init = _pick(rng, _float_inits(m))
    arr = numpy_helper.to_array(init).copy()
    if rng.random() < 0.5:
        arr[...] = v
    else:
        arr.flat[int(rng.integers(arr.size))] = v
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return f"{init.name}={v}", m


def m_wrong_output_rank(rng, m):
    what = _pick(rng, ["rank4", "rank1", "rank0", "no_shape", "classes_mismatch", "dynamic_classes", "drop_flatten"])
    out = m.graph.output[0]
    shp = out.type.tensor_type.shape
    if what == "rank4":
        shp.dim.add().dim_value = 1
        shp.dim.add().dim_value = 1
    elif what == "rank1":
        del shp.dim[1:]
    elif what == "rank0":
        del shp.dim[:]
    elif what == "no_shape":
        out.type.tensor_type.ClearField("shape")
    elif what == "classes_mismatch":
        _set_dim(shp.dim[1], 7)
    elif what == "dynamic_classes":
        shp.dim[1].Clear()
        shp.dim[1].dim_param = "k"
    else:  # the classifier sees a 4-D tensor
        flat = [n for n in m.graph.node if n.op_type == "Flatten"][0]
        for n in m.graph.node:
            for i, x in enumerate(n.input):
                if x == flat.output[0]:
                    n.input[i] = flat.input[0]
        m.graph.node.remove(flat)
    return what, m


def m_bad_attribute(rng, m):
    g = m.graph
    n = _pick(rng, [x for x in g.node if x.op_type in ("Conv", "Gemm", "MatMul", "BatchNormalization", "Flatten")])
    what = _pick(rng, ["zero_stride", "negative_pad", "bad_group", "wrong_kernel", "unknown_attr", "axis_out_of_range",
                       "attr_wrong_type"])
    if n.op_type == "Conv" and what in ("zero_stride", "negative_pad", "bad_group", "wrong_kernel"):
        val = {"zero_stride": ("strides", [0, 0]), "negative_pad": ("pads", [-5, -5, -5, -5]),
               "bad_group": ("group", int(_pick(rng, [0, 3, -1]))), "wrong_kernel": ("kernel_shape", [5, 1])}[what]
        kept = [a for a in n.attribute if a.name != val[0]]
        del n.attribute[:]
        n.attribute.extend(kept + [helper.make_attribute(*val)])
    elif what == "axis_out_of_range" or n.op_type == "Flatten":
        n.attribute.append(helper.make_attribute("axis", 17))
        what = "axis_out_of_range"
    elif what == "attr_wrong_type":
        n.attribute.append(helper.make_attribute("transB" if n.op_type == "Gemm" else "epsilon", "text"))
    else:
        n.attribute.append(helper.make_attribute("no_such_attribute", 1))
        what = "unknown_attr"
    return f"{n.op_type}:{what}", m


def m_unknown_op(rng, m):
    n = _pick(rng, list(m.graph.node))
    what = _pick(rng, ["unknown_type", "control_flow_if", "nondeterministic", "round"])
    if what == "unknown_type":
        n.op_type = "NoSuchOp"
    elif what == "control_flow_if":
        n.op_type = "If"
    elif what == "nondeterministic":
        n.op_type = "RandomNormalLike"
    else:
        relu = [x for x in m.graph.node if x.op_type == "Relu"][0]
        relu.op_type = "Round"
    return what, m


def m_ir_version(rng, m):
    v = int(_pick(rng, [0, 1, 3, 11, 99, 2**40]))
    m.ir_version = v
    return f"ir {v}", m


def m_shape_mismatch(rng, m):
    w = [t for t in _float_inits(m) if len(t.dims) >= 2]
    init = _pick(rng, w)
    arr = numpy_helper.to_array(init)
    what = _pick(rng, ["transpose", "grow", "flatten"])
    if what == "transpose":
        arr = np.ascontiguousarray(np.swapaxes(arr, 0, 1))
    elif what == "grow":
        arr = np.concatenate([arr, arr], axis=-1)
    else:
        arr = arr.reshape(-1)
    init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
    return f"{init.name}:{what}", m


def m_data_mismatch(rng, m):
    """Declared dims that disagree with the stored bytes (too few / too many)."""
    init = _pick(rng, _float_inits(m))
    what = _pick(rng, ["short_raw", "long_raw", "dims_x1000"])
    if what == "short_raw":
        init.raw_data = init.raw_data[: max(0, len(init.raw_data) - 4 * int(rng.integers(1, 4)))]
    elif what == "long_raw":
        init.raw_data = init.raw_data + b"\0" * 12
    else:
        init.dims[0] = init.dims[0] * 1000
    return f"{init.name}:{what}", m


def m_hostile_names(rng, m, case_root_token="@CASE@"):
    name = _pick(rng, ["../../escape", "/tmp/fracgraph-fuzz-abs", f"{case_root_token}/escape", "a/../../b",
                       "x" * 5000, "nul\0name", "::fq_w", "fracgraph_bits", "labels"])
    what = _pick(rng, ["node", "tensor", "graph_input"])
    g = m.graph
    if what == "node":
        _pick(rng, list(g.node)).name = name
    elif what == "tensor":
        n = g.node[int(rng.integers(len(g.node) - 1))]
        old = n.output[0]
        n.output[0] = name
        for x in g.node:
            for i, v in enumerate(x.input):
                if v == old:
                    x.input[i] = name
    else:
        old = g.input[0].name
        g.input[0].name = name
        for x in g.node:
            for i, v in enumerate(x.input):
                if v == old:
                    x.input[i] = name
    return f"{what}={name[:20]!r}", m


MUTATIONS = {
    "bitflip": m_bitflip, "truncate": m_truncate, "wrong_tensor_type": m_wrong_tensor_type, "huge_dim": m_huge_dim,
    "negative_dim": m_negative_dim, "cycle": m_cycle, "dangling_input": m_dangling_input,
    "duplicate_name": m_duplicate_name, "external_outside": m_external_outside, "bad_opset": m_bad_opset,
    "missing_output": m_missing_output, "empty_graph": m_empty_graph, "nan_weights": m_nan_weights,
    "wrong_output_rank": m_wrong_output_rank, "bad_attribute": m_bad_attribute, "unknown_op": m_unknown_op,
    "ir_version": m_ir_version, "shape_mismatch": m_shape_mismatch, "data_mismatch": m_data_mismatch,
    "hostile_names": m_hostile_names,
}


def make_case(seed: int, i: int, bases: dict[str, onnx.ModelProto]) -> Case:
    """Case i of a seeded campaign: kinds and bases round-robin, the variant drawn from rng(seed, i)."""
    kinds = list(MUTATIONS)
    kind = kinds[i % len(kinds)]
    base = sorted(bases)[(i // len(kinds)) % len(bases)]
    rng = np.random.default_rng([seed, i])
    m = onnx.ModelProto()
    m.CopyFrom(bases[base])
    res = MUTATIONS[kind](rng, m)
    files, links = {}, {}
    if len(res) == 4:
        variant, m, files, links = res
    else:
        variant, m = res
    return Case(i, kind, base, variant, m, files, links)


def make_cases(n: int, seed: int = 0) -> list[Case]:
    bases = {k: f() for k, f in BASES.items()}
    return [make_case(seed, i, bases) for i in range(n)]


# --------------------------------------------------------------------------------------------- running


def layout(case: Case, root: Path) -> Path:
    """Write the case under root/case-<id>/ and return that directory."""
    d = root / f"case-{case.id:04d}"
    if d.exists():
        shutil.rmtree(d)
    for sub in ("model", "work", "tmp", "outside"):
        (d / sub).mkdir(parents=True)
    for rel, data in {MODEL_REL: model_bytes(case, str(d.resolve())), **case.files}.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for rel, target in case.symlinks.items():
        os.symlink(d.resolve() / target, d / rel)
    return d


def model_bytes(case: Case, case_dir: str) -> bytes:
    """The model file, with the "@CASE@" token in names and external-data locations replaced by `case_dir`."""
    if isinstance(case.model, bytes):
        return case.model
    m = onnx.ModelProto()
    m.CopyFrom(case.model)
    sub = (lambda s: s.replace("@CASE@", case_dir))
    for t in m.graph.initializer:
        for e in t.external_data:
            e.value = sub(e.value)
    for n in m.graph.node:
        n.name = sub(n.name)
        n.input[:] = [sub(x) for x in n.input]
        n.output[:] = [sub(x) for x in n.output]
    for v in list(m.graph.input) + list(m.graph.output):
        v.name = sub(v.name)
    return m.SerializeToString()


def argv_for(command: str, case_dir: Path) -> list[str]:
    model = str(case_dir / MODEL_REL)
    if command == "quantize":
        return ["quantize", model, "-o", str(case_dir / OUT_REL)]
    if command == "inspect":
        return ["inspect", model]
    return ["estimate", model, "--hw", "all"]


def snapshot(d: Path) -> dict[str, tuple]:
    """Every path under d with its type, size and mtime (to detect writes outside the output directory)."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            # a directory's mtime moves when a temporary file comes and goes: only its existence counts
            out[os.path.relpath(p, d)] = (st.st_mode,) if os.path.isdir(p) and not os.path.islink(p) else (
                st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _child(argv: list[str], case_dir: Path, stdout: Path, stderr: Path, mem_limit: int | None) -> None:
    """In the forked child: run the CLI as the `fracgraph` script would and exit with its code."""
    code = 1
    try:
        os.chdir(case_dir / "work")
        os.environ["TMPDIR"] = str(case_dir / "tmp")
        tempfile.tempdir = None
        for fd, path in ((1, stdout), (2, stderr)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        if mem_limit:
            resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
        sys.argv = ["fracgraph", *argv]
        from fracgraph.cli import app

        try:
            app(args=argv, prog_name="fracgraph")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


@dataclass
class Result:
    case: Case
    command: str
    verdict: str            # "error" (exit 2, one line), "ok" (exit 0) or "FAIL: why"
    code: int | None
    stderr: str
    seconds: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def judge(code: int | None, out: str, err: str, timed_out: bool, leaked: list[str]) -> str:
    if timed_out:
        return "FAIL: hang (killed at the timeout)"
    if "Traceback" in out or "Traceback" in err:
        return "FAIL: traceback"
    if leaked:
        return f"FAIL: wrote outside the output directory: {leaked[:3]}"
    if code == 0:
        return "ok"
    if code != 2:
        return f"FAIL: exit code {code}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if len(lines) != 1:
        return f"FAIL: {len(lines)} lines on stderr"
    if not lines[0].startswith("error: "):
        return "FAIL: stderr is not an 'error:' line"
    return "error"


def _mem_limit(extra: int = 6 << 30) -> int | None:
    """Address-space cap for children: what the parent maps now plus `extra` (a guard against swapping the host)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024 + extra
    except OSError:
        pass
    return None


def preload() -> None:
    """Import what the commands import, once, before forking (children then start in milliseconds)."""
    import fracgraph.analysis.estimate  # noqa: F401
    import fracgraph.build  # noqa: F401
    import fracgraph.cli  # noqa: F401
    import fracgraph.inspect  # noqa: F401
    import onnx.reference  # noqa: F401
    import onnxruntime.training.artifacts  # noqa: F401
    import rich.console  # noqa: F401
    import rich.table  # noqa: F401


def run_cases(cases: list[Case], root: Path, commands=COMMANDS, jobs: int = 2, timeout: float = 30.0,
              progress=None) -> list[Result]:
    """Run every (case, command) in forked children, at most `jobs` at a time."""
    preload()
    mem = _mem_limit()
    todo = [(c, cmd) for c in cases for cmd in commands]
    running: dict[int, tuple] = {}
    results: list[Result] = []
    dirs: dict[int, Path] = {}
    # commands of one case run one after another (they share the case directory); cases run in parallel
    by_case: dict[int, list] = defaultdict(list)
    for c, cmd in todo:
        by_case[c.id].append((c, cmd))
    queue_ = [by_case[c.id] for c in cases]
    busy: set[int] = set()

    def start(c: Case, cmd: str) -> None:
        d = dirs.get(c.id) or layout(c, root)
        dirs[c.id] = d
        before = snapshot(d)
        so, se = root / f".{c.id}.{cmd}.out", root / f".{c.id}.{cmd}.err"
        pid = os.fork()
        if pid == 0:
            _child(argv_for(cmd, d), d, so, se, mem)
        running[pid] = (c, cmd, d, before, so, se, time.monotonic())
        busy.add(c.id)

    def finish(pid: int, status: int | None, timed_out: bool) -> None:
        c, cmd, d, before, so, se, t0 = running.pop(pid)
        busy.discard(c.id)
        code = None if status is None else (os.waitstatus_to_exitcode(status))
        out, err = so.read_text(errors="replace"), se.read_text(errors="replace")
        so.unlink()
        se.unlink()
        after = snapshot(d)
        allowed = "work/out"
        changed = [p for p, v in after.items() if before.get(p) != v
                   and not (p == allowed or p.startswith(allowed + os.sep))]
        changed += [f"deleted {p}" for p in before if p not in after and not p.startswith(allowed)]
        if os.path.lexists("/tmp/fracgraph-fuzz-abs"):
            changed.append("/tmp/fracgraph-fuzz-abs")
        r = Result(c, cmd, judge(code, out, err, timed_out, changed), code, err.strip()[-2000:],
                   time.monotonic() - t0)
        results.append(r)
        if progress:
            progress(r)
        if not any(c.id == q[0][0].id for q in queue_ if q):
            shutil.rmtree(d, ignore_errors=True)
            dirs.pop(c.id, None)

    while queue_ or running:
        # start work: the next command of any case that is not busy
        for q in list(queue_):
            if len(running) >= jobs:
                break
            if q and q[0][0].id not in busy:
                c, cmd = q.pop(0)
                if not q:
                    queue_.remove(q)
                start(c, cmd)
        now = time.monotonic()
        for pid, info in list(running.items()):
            # a hang is `timeout` seconds of CPU, or 10x that of wall time (a deadlock burns no CPU): on a busy
            # machine a healthy run can wait longer than `timeout` for a core
            if cpu_seconds(pid) > timeout or now - info[6] > 10 * timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                finish(pid, None, True)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid:
            finish(pid, status, False)
        else:
            time.sleep(0.01)
    return results


def report(results: list[Result]) -> str:
    kinds = list(dict.fromkeys(r.case.kind for r in results))
    lines = []
    by = defaultdict(Counter)
    for r in results:
        v = "fail" if r.verdict.startswith("FAIL") else r.verdict
        by[(r.case.kind, r.command)][v] += 1
        by[("*", r.command)][v] += 1
        by[(r.case.kind, "*")][v] += 1
        by[("*", "*")][v] += 1
    cmds = list(dict.fromkeys(r.command for r in results))
    head = f"{'mutation kind':<20}{'inputs':>7}" + "".join(f"{c + ' err/ok/FAIL':>26}" for c in cmds)
    lines += [head, "-" * len(head)]
    inputs = Counter(r.case.kind for r in results if r.command == cmds[0])
    for k in kinds + ["*"]:
        n = inputs[k] if k != "*" else sum(inputs.values())
        cells = "".join(f"{'%d/%d/%d' % (by[(k, c)]['error'], by[(k, c)]['ok'], by[(k, c)]['fail']):>26}" for c in cmds)
        lines.append(f"{'all' if k == '*' else k:<20}{n:>7}{cells}")
    t = by[("*", "*")]
    lines.append(f"\n{sum(inputs.values())} inputs x {len(cmds)} commands = {len(results)} runs: "
                 f"{t['error']} one-line errors (exit 2), {t['ok']} successes (valid after mutation), "
                 f"{t['fail']} failures")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="number of mutated inputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="CPU seconds per command (or 10x as many wall seconds) before it counts as a hang")
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--only", default=None, help="comma-separated case ids to run (reproduce a failure)")
    ap.add_argument("--keep", default=None, help="copy failing inputs' model files here")
    args = ap.parse_args(argv)
    cases = make_cases(args.n, args.seed)
    if args.only:
        ids = {int(x) for x in args.only.split(",")}
        cases = [c for c in cases if c.id in ids]
    commands = tuple(args.commands.split(","))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fracgraph-fuzz-") as tmp:
        def show(r: Result) -> None:
            if r.verdict.startswith("FAIL"):
                print(f"case {r.case.id} ({r.case.kind}/{r.case.base}: {r.case.variant}) {r.command}: {r.verdict}\n"
                      f"    {r.stderr.splitlines()[-1] if r.stderr else ''}", flush=True)
        results = run_cases(cases, Path(tmp), commands, args.jobs, args.timeout, show)
    print()
    print(report(results))
    slow = max(results, key=lambda r: r.seconds)
    print(f"slowest run {slow.seconds:.1f} s (case {slow.case.id} {slow.command}); wall {time.monotonic() - t0:.0f} s; "
          f"seed {args.seed}")
    failed = [r for r in results if r.verdict.startswith("FAIL")]
    if failed and args.keep:
        keep = Path(args.keep)
        for r in failed:
            for rel, data in {MODEL_REL: model_bytes(r.case, "@CASE@"), **r.case.files}.items():
                p = keep / f"case-{r.case.id:04d}" / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
