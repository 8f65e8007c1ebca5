"""FracTrain's quantizer math as ONNX subgraphs (spec fractrain.md §1.1), in one place.

    scale = max((max - min) / (2^b - 1), 1e-8);  y = (x - min) / scale  [+ U(-0.5, 0.5) if stochastic]
    out = round(clamp(y, 0, 2^b - 1)) * scale + min;   b == 0 -> out = x (FP32 passthrough)

Gradients (forward quantizers only): straight-through. `Round` gets an Identity gradient and the range statistics
are detached (see `register_gradients`), so dL/dx = dL/dout exactly up to float rounding of s/s. The forward clamp
uses bounds widened by 0.49, which rounds to the same values as [0, 2^b-1] but keeps the clip mask at 1 for every
element of a tensor quantized against its own range (the max element may land a hair above 2^b-1).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EPS = 1e-8
CLAMP_SLACK = 0.49
BITS_COLUMNS = {"act": 0, "weight": 1, "grad": 2}


class Emitter:
    """Appends nodes and initializers to a graph under deterministic names, sharing constants by value."""

    def __init__(self, graph: onnx.GraphProto, opset: int):
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self._consts: dict[tuple, str] = {}
        self._existing = {t.name for t in graph.initializer} | {i.name for i in graph.input}
        self._names = {o for n in graph.node for o in n.output} | self._existing

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"fg::const/{arr.dtype.name}{list(arr.shape)}={arr.ravel()[:4].tolist()}#{len(self._consts)}"
            self.graph.initializer.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", outputs: list[str] | None = None, **attrs) -> str:
        outs = outputs or [output]
        for o in outs:
            if o in self._names:
                raise ValueError(f"name collision: {o}")
            self._names.add(o)
        self.nodes.append(helper.make_node(op, inputs, outs, name=outs[0], domain=domain, **attrs))
        return outs[0]

    def has(self, name: str) -> bool:
        return name in self._names

    def reduce(self, op: str, x: str, output: str, axes: list[int] | None, keepdims: int) -> str:
        """ReduceMin/ReduceMax over `axes` (all when None), in the form the graph's opset wants."""
        if axes is None:
            return self.node(op, [x], output, keepdims=keepdims)
        if self.opset >= 18:
            return self.node(op, [x, self.const(axes, np.int64)], output, keepdims=keepdims)
        return self.node(op, [x], output, axes=axes, keepdims=keepdims)

    def flush(self, before: onnx.NodeProto | None = None) -> None:
        """Insert the emitted nodes into the graph (at the end, or right before `before`); ORT sorts topologically."""
        if before is None:
            self.graph.node.extend(self.nodes)
        else:
            idx = list(self.graph.node).index(before)
            for k, n in enumerate(self.nodes):
                self.graph.node.insert(idx + k, n)
        self.nodes = []


def bits_scalar(em: Emitter, precision_input: str, block: int | str, column: str) -> str:
    """The scalar bits of (block, column) read from the [n_blocks, 3] precision input (emitted once per graph).
    A string key names bits another pass already produced (DFQ candidates: `<block>k<option>`)."""
    name = f"{precision_input}::b{block}.{column}"
    if not em.has(name):
        flat = f"{precision_input}::flat"
        if not em.has(flat):
            em.node("Reshape", [precision_input, em.const([-1], np.int64)], flat)
        em.node("Gather", [flat, em.const(block * 3 + BITS_COLUMNS[column], np.int64)], name, axis=0)
    return name


def levels(em: Emitter, bits: str) -> str:
    """2^b - 1 as float, at least 1 so that 0 bits never divides by zero (the passthrough ignores it anyway)."""
    name = f"{bits}::levels"
    if not em.has(name):
        p = em.node("Pow", [em.const(2.0), bits], f"{bits}::pow2")
        lv = em.node("Sub", [p, em.const(1.0)], f"{bits}::levels_raw")
        em.node("Max", [lv, em.const(1.0)], name)
        em.node("Greater", [bits, em.const(0.0)], f"{bits}::on")
    return name


PER_SAMPLE_NODE = "/per_sample_bits"
PER_SAMPLE_OFF_NODE = "/per_sample_bits_or_off"   # per-sample bits that may be 0 (a skipped sample: FP32)


def _producer(em: Emitter, bits: str) -> str:
    producers = getattr(em, "_producers", None)
    if producers is None:
        producers = em._producers = {o: n.name for n in em.graph.node for o in n.output}
    return producers.get(bits, "")


def per_sample_bits(em: Emitter, bits: str) -> bool:
    """True when `bits` holds one value per sample (DFQ per-sample gates name their producer `...PER_SAMPLE_NODE`
    or `...PER_SAMPLE_OFF_NODE`)."""
    return _producer(em, bits).endswith((PER_SAMPLE_NODE, PER_SAMPLE_OFF_NODE))


def per_sample_may_be_off(em: Emitter, bits: str) -> bool:
    """True when per-sample `bits` can be 0 for some samples (DFQ skip option), which then pass through FP32."""
    return _producer(em, bits).endswith(PER_SAMPLE_OFF_NODE)


def detach_scalar(em: Emitter, x: str, output: str) -> str:
    """Stop-gradient for a scalar: Clip's bounds are stop-gradient edges in ORT's gradient builder."""
    return em.node("Clip", [em.const(0.0), x, x], output)


def fake_quant(
    em: Emitter,
    x: str,
    out: str,
    prefix: str,
    bits: str,
    *,
    axes: list[int] | None = None,
    stochastic: bool = False,
    train_slack: bool = True,
) -> dict[str, str]:
    """Emit `out = FQ_b(x)` and return the names of its range tensors ({"min", "range"}).

    axes=None: per-tensor range (a scalar, detached through Clip); axes given: range per remaining axis (the
    weights' per-output-channel range, kept as [K,1,...] for broadcasting; detached by the registered empty
    ReduceMin/ReduceMax gradients). stochastic adds U(-0.5, 0.5) noise before rounding (errors in backward).
    """
    keep = 0 if axes is None else 1
    mn_raw = em.reduce("ReduceMin", x, f"{prefix}/min_raw", axes, keep)
    mx_raw = em.reduce("ReduceMax", x, f"{prefix}/max_raw", axes, keep)
    if axes is None:
        mn = detach_scalar(em, mn_raw, f"{prefix}/min")
        mx = detach_scalar(em, mx_raw, f"{prefix}/max")
    else:
        mn, mx = mn_raw, mx_raw
    rg = em.node("Sub", [mx, mn], f"{prefix}/range")
    return _quantize_with_range(em, x, out, prefix, bits, mn, rg, stochastic=stochastic, train_slack=train_slack)


def quantize_with_range(em: Emitter, x: str, out: str, prefix: str, bits: str, mn: str, rg: str,
                        centered: str) -> dict[str, str]:
    """`out = FQ_b(x)` against the range and the centred tensor `x - min` another quantizer of the same x
    computed (a tensor read by GEMMs of several blocks, or DFQ candidates: one batch range and one running range
    per tensor, each reader at its own bits). Reusing `centered` keeps onnxruntime's common-subexpression
    elimination from merging it with the owner's and renaming one of them."""
    return _quantize_with_range(em, x, out, prefix, bits, mn, rg, stochastic=False, train_slack=True, centered=centered)


def _quantize_with_range(em, x, out, prefix, bits, mn, rg, *, stochastic, train_slack, centered=None) -> dict[str, str]:
    lv = levels(em, bits)
    s_raw = em.node("Div", [rg, lv], f"{prefix}/scale_raw")
    s = em.node("Max", [s_raw, em.const(EPS)], f"{prefix}/scale")
    c = centered or em.node("Sub", [x, mn], f"{prefix}/centered")
    u = em.node("Div", [c, s], f"{prefix}/u")
    if stochastic:
        noise = em.node("RandomUniformLike", [x], f"{prefix}/noise", low=-0.5, high=0.5)
        u = em.node("Add", [u, noise], f"{prefix}/u_noisy")
    if train_slack:
        lo = em.const(-CLAMP_SLACK)
        hi = em.node("Add", [lv, em.const(CLAMP_SLACK)], f"{prefix}/hi")
    else:
        lo, hi = em.const(0.0), lv
    if per_sample_bits(em, bits):   # Clip takes scalar bounds only; per-sample levels clamp with Max/Min
        uc = em.node("Min", [em.node("Max", [u, lo], f"{prefix}/clamped_lo"), hi], f"{prefix}/clamped")
    else:
        uc = em.node("Clip", [u, lo, hi], f"{prefix}/clamped")
    r = em.node("Round", [uc], f"{prefix}/rounded")
    d = em.node("Mul", [r, s], f"{prefix}/descaled")
    q = em.node("Add", [d, mn], f"{prefix}/q")
    if per_sample_may_be_off(em, bits):   # per-sample select (not named ::on: quant-branch wants a scalar switch)
        em.node("Where", [em.node("Greater", [bits, em.const(0.0)], f"{bits}::on_each"), q, x], out) \
            if not em.has(f"{bits}::on_each") else em.node("Where", [f"{bits}::on_each", q, x], out)
    elif per_sample_bits(em, bits):   # DFQ precision options are >= 1 bit: no FP32 passthrough to select
        em.node("Identity", [q], out)
    else:
        em.node("Where", [f"{bits}::on", q, x], out)
    return {"min": mn, "range": rg, "centered": c}


def ema_update(em: Emitter, state: str, value: str, momentum: float, prefix: str) -> str:
    """In-place `state = m*state + (1-m)*value` (ORT's InPlaceAccumulatorV2 writes the state buffer); returns its flag."""
    diff = em.node("Sub", [value, state], f"{prefix}/diff")
    delta = em.node("Mul", [diff, em.const(1.0 - momentum)], f"{prefix}/delta")
    flag = f"{prefix}/updated"
    em.node("InPlaceAccumulatorV2", [state, delta], flag, domain="com.microsoft", outputs=[flag, f"{prefix}/state_out"])
    return flag


def float_input(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
