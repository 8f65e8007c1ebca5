"""Training-graph pass: the step's elementwise chains as fracgraph's fused custom ops (fracgraph/kernels).

What onnxruntime runs as several full passes over a tensor, this pass replaces by one op of domain `ai.fracgraph`
(fused_ops.c), each computing bitwise the values of the ops it replaces:

- error quantizer (bw-quant; quantizers.py, stochastic, clamp [0, L]):
  `Round(Clip((x - min) / s + noise, lo, hi)) * s + min`, seven passes plus onnxruntime's single-threaded
  RandomUniformLike (~4 ns per element, 18% of the resnet20 FW8/BW8 step) -> `SRQuantize(x, min, s, hi)`, which
  draws the noise from its own counter-based generator (another stream of the same U(-0.5, 0.5), on a 2^-24
  grid). Where the noise tensor is read elsewhere (exposed for exact replay, or one shared draw,
  passes/shared_noise.py) -> `SRQuantizeNoise(x, min, s, hi, noise)`, bitwise the chain's values;
- activation quantizer (per-tensor, deterministic): the six-op chain -> `FakeQuantize(x, min, s, hi)`; the
  weight quantizer (per output channel: min and s of shape [K, 1, 1, 1]) likewise, the kernel reading channel k's
  min and scale (resnet18's weight quantizer chains were ~12% of its profiled FW8/BW8 graph);
- per-tensor range: `ReduceMin(x)` and `ReduceMax(x)` over all axes -> one `MinMax(x)`, one read of x; the
  weights' per-channel range (over every axis but the first, kept) -> one `MinMaxRows(x)`, a MatMul weight's
  (every axis but the last) -> one `MinMaxCols(x)`;
- `ReluGrad(dY, X)` (onnxruntime's is single-threaded) -> `ReluGrad` of this domain;
- a 2-D `MaxPool` with its Indices output (the training graph's, read by MaxPoolGrad; onnxruntime runs that form
  on a generic per-element loop, 5% of resnet18's profiled step; floor or ceil mode) -> `MaxPoolIdx`, the same
  values and indices, and the MaxPoolGrad reading them (one thread in onnxruntime: with the pools, 20-24% of
  googlenet's and squeezenet's profiled steps) -> `MaxPoolIdxGrad`, planes as tasks, bitwise its dX.

(The conv weight gradient, the one fused op whose values are not bitwise onnxruntime's, is passes/conv_grad_w.py.)

Chains are matched by their node names and wiring (quantizers.py names every op `<prefix>/<step>`) and only when
no intermediate is read outside the chain; anything else is kept and the notes say why. The range statistics
and the bits > 0 switch are untouched; quant-branch moves a fused quantizer under its If like the chain, and
quant-bits (passes/quant_bits.py) then makes the If, the quantizer and its scalars one node. Runs after ste-grad
(which needs the FW chains) and before quant-branch.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from onnx import helper, numpy_helper

from ..kernels import DOMAIN
from .base import Pass, PassResult, assert_inputs_defined, replace_nodes

_SR_STEPS = (("centered", "Sub"), ("u", "Div"), ("u_noisy", "Add"), ("clamped", "Clip"), ("rounded", "Round"),
             ("descaled", "Mul"), ("q", "Add"))
_FQ_STEPS = tuple(s for s in _SR_STEPS if s[0] != "u_noisy")
_QUANT_TAGS = ("::bwq", "::fq_a", "::fq_w")   # error, activation (per-tensor) and weight (per-channel) quantizers


def import_domain(model) -> None:
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def salt(name: str) -> int:
    """A node's generator salt: a stable 63-bit hash of its name, so each error quantizer draws its own stream."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


class FusedOpsPass(Pass):
    name = "fused-ops"
    fused = 0   # ops written by the last call: the artifacts then need the kernels library

    def call(self, model):
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in graph.output}
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer   # scalars: the clip bounds
                       if not t.dims or list(t.dims) == [1]}
        pairs, notes = [], []
        self.centre_readers = defaultdict(set)   # a shared x - min -> ids of its fused readers' Divs
        for q in [n for n in graph.node if n.name.endswith("/q") and n.op_type == "Add"]:
            prefix = q.name[: -len("/q")]
            if any(tag in prefix for tag in _QUANT_TAGS):
                note = self._quantizer(prefix, q, pairs)
                if note:
                    notes.append(note)
        n_quant = len([p for p in pairs if p[1]])
        for centred, fused_divs in self.centre_readers.items():
            if len(fused_divs) == len(self.consumers[centred]):
                pairs.append((self.producer[centred], []))
        n_range = self._ranges(graph, pairs)
        n_relu = self._relu_grads(graph, pairs)
        n_pool = self._max_pools(graph, pairs)
        replace_nodes(graph, pairs)
        self.fused = n_quant + n_range + n_relu + n_pool
        if self.fused:
            import_domain(model)
        notes.insert(0, f"{n_quant} quantizers, {n_range} range statistics and {n_relu} ReluGrad on fracgraph's fused ops"
                        + (f"; {n_pool} MaxPool with indices on MaxPoolIdx" if n_pool else ""))
        return PassResult(model, bool(self.fused), notes)

    # -- quantizers ---------------------------------------------------------------------------------------------
    def _quantizer(self, prefix, q, pairs) -> str | None:
        stochastic = f"{prefix}/u_noisy" in self.producer
        chain, why = self._chain(prefix, q, _SR_STEPS if stochastic else _FQ_STEPS)
        shared_centre = False
        if chain is None and not stochastic:   # x - min shared with the tensor's quantizers at other bits?
            shared, _ = self._shared_centre_chain(prefix, q)
            if shared is not None:
                chain, shared_centre = shared, True
        if chain is None:
            return f"{prefix}: kept the chain ({why})"
        sub, div, *_, clip, _, mul, _ = chain
        x, mn, s = sub.input[0], sub.input[1], div.input[1]
        lo = self.consts.get(clip.input[1]) if len(clip.input) > 1 else None
        if lo is None or lo.size != 1 or len(clip.input) < 3 or mul.input[1] != s or q.input[1] != mn:
            return f"{prefix}: kept the chain (clip bounds or scale are not the quantizer's)"
        args = [x, mn, s, clip.input[2]]
        if not stochastic:
            fused = helper.make_node("FakeQuantize", args, list(q.output), name=q.name, domain=DOMAIN, lo=float(lo.item()))
        else:
            noise = chain[2].input[1]
            rng = self.producer.get(noise)
            if (rng is not None and rng.op_type == "RandomUniformLike" and noise not in self.outputs
                    and len(self.consumers[noise]) == 1):
                fused = helper.make_node("SRQuantize", args, list(q.output), name=q.name, domain=DOMAIN,
                                         lo=float(lo.item()), salt=salt(prefix))
                pairs.append((rng, []))
            else:
                fused = helper.make_node("SRQuantizeNoise", args + [noise], list(q.output), name=q.name, domain=DOMAIN,
                                         lo=float(lo.item()))
        if not shared_centre:
            pairs.extend((n, []) for n in chain[:-1])
        else:   # x - min shared with the tensor's other quantizers: removed once all of them are fused
            pairs.extend((n, []) for n in chain[1:-1])
            self.centre_readers[sub.output[0]].add(id(div))
        pairs.append((q, [fused]))
        return None

    def _shared_centre_chain(self, prefix, q):
        """The chain of an activation quantizer whose `x - min` is its tensor's shared one (a tensor read at several
        bits, passes/fw_quant.py): the Sub (named after the range's owner, read by each quantizer's Div) and this
        quantizer's own Div..Add, each feeding only the next."""
        div = self.producer.get(f"{prefix}/u")
        sub = self.producer.get(div.input[0]) if div is not None and div.op_type == "Div" else None
        if sub is None or sub.op_type != "Sub" or "::fq_a" not in sub.name or not sub.name.endswith("/centered"):
            return None, f"no Sub {prefix}/centered"
        readers = self.consumers[sub.output[0]]
        if sub.output[0] in self.outputs or not all(r.op_type == "Div" and r.name.endswith("/u") for r in readers):
            return None, f"{sub.name} is read outside the quantizers of its tensor"
        chain, why = self._chain(prefix, q, _FQ_STEPS[1:])
        return (None, why) if chain is None else ([sub] + chain, "")

    def _chain(self, prefix, q, steps):
        """The chain's nodes, last = q, when each is the named op and feeds only the next one."""
        chain = []
        for step, op in steps:
            n = q if step == "q" else self.producer.get(f"{prefix}/{step}")
            if n is None or n.op_type != op or n.name != f"{prefix}/{step}":
                return None, f"no {op} {prefix}/{step}"
            chain.append(n)
        for a, b in zip(chain, chain[1:]):
            out = a.output[0]
            if out not in b.input[:1] or out in self.outputs or len(self.consumers[out]) != 1:
                return None, f"{a.name} is read outside the chain"
        return chain, ""

    # -- range statistics and ReluGrad ---------------------------------------------------------------------------
    def _ranges(self, graph, pairs) -> int:
        """ReduceMin(x) + ReduceMax(x) over all axes, keepdims 0 -> MinMax(x) with both outputs."""
        def whole(n):
            keep = next((a.i for a in n.attribute if a.name == "keepdims"), 1)
            return len(n.input) == 1 and keep == 0 and not any(a.name == "axes" for a in n.attribute)

        order = {id(n): i for i, n in enumerate(graph.node)}
        mins = {n.input[0]: n for n in graph.node if n.op_type == "ReduceMin" and whole(n)}
        count = self._row_ranges(graph, pairs, order)
        for mx in [n for n in graph.node if n.op_type == "ReduceMax" and whole(n)]:
            mn = mins.pop(mx.input[0], None)
            if mn is None:
                continue
            first, second = (mn, mx) if order[id(mn)] < order[id(mx)] else (mx, mn)   # readers of both follow the first
            pairs.append((second, []))
            pairs.append((first, [helper.make_node("MinMax", [mx.input[0]], [mn.output[0], mx.output[0]],
                                                   name=f"{mn.name}::minmax", domain=DOMAIN)]))
            count += 1
        return count

    def _row_ranges(self, graph, pairs, order) -> int:
        """ReduceMin(x) + ReduceMax(x) over every axis but the first, keepdims 1 (a conv weight's per-channel
        ranges) -> MinMaxRows(x) with both outputs; over every axis but the last (a MatMul weight [in, out]'s
        per-output-channel ranges) -> MinMaxCols(x)."""
        ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in list(graph.input) + list(graph.value_info)
                 if i.type.tensor_type.HasField("shape")}
        ranks.update({t.name: len(t.dims) for t in graph.initializer})
        ints = {t.name: numpy_helper.to_array(t).tolist() for t in graph.initializer if t.data_type == 7}

        def kept(n) -> str | None:
            keep = next((a.i for a in n.attribute if a.name == "keepdims"), 1)
            axes = next((list(a.ints) for a in n.attribute if a.name == "axes"), None)
            if axes is None and len(n.input) > 1:
                axes = ints.get(n.input[1])
            r = ranks.get(n.input[0])
            if keep != 1 or r is None or r < 2 or axes is None:
                return None
            axes = sorted(a % r for a in axes)
            return "MinMaxRows" if axes == list(range(1, r)) else "MinMaxCols" if axes == list(range(r - 1)) else None

        def reduces(op):
            return [n for n in graph.node if n.op_type == op and n.domain in ("", "ai.onnx") and kept(n)]

        mins = {(n.input[0], kept(n)): n for n in reduces("ReduceMin")}
        count = 0
        for mx in reduces("ReduceMax"):
            mn = mins.pop((mx.input[0], kept(mx)), None)
            if mn is None:
                continue
            first, second = (mn, mx) if order[id(mn)] < order[id(mx)] else (mx, mn)
            pairs.append((second, []))
            pairs.append((first, [helper.make_node(kept(mx), [mx.input[0]], [mn.output[0], mx.output[0]],
                                                   name=f"{mn.name}::minmax", domain=DOMAIN)]))
            count += 1
        return count

    @staticmethod
    def _max_pools(graph, pairs) -> int:
        """MaxPool(X) -> (Y, Indices), 2-D, explicit pads, storage order 0 -> MaxPoolIdx (floor or ceil mode); the
        MaxPoolGrad(dY, Indices) that reads its indices -> MaxPoolIdxGrad(dY, Indices, Shape(X))."""
        count, fused = 0, {}
        for n in graph.node:
            if n.op_type != "MaxPool" or n.domain not in ("", "ai.onnx") or len(n.output) != 2 or not n.output[1]:
                continue
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            k = list(a.get("kernel_shape", []))
            if len(k) != 2 or a.get("storage_order", 0) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                continue
            pads, st, dil = list(a.get("pads", [0] * 4)), list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
            shape = f"{n.name or n.output[0]}::x_shape"
            pairs.append((n, [helper.make_node("Shape", [n.input[0]], [shape], name=shape),
                              helper.make_node("MaxPoolIdx", [n.input[0]], list(n.output), name=n.name, domain=DOMAIN,
                                               kh=k[0], kw=k[1], sh=st[0], sw=st[1], ph=pads[0], pw=pads[1],
                                               dh=dil[0], dw=dil[1], ph_end=pads[2], pw_end=pads[3],
                                               ceil_mode=int(a.get("ceil_mode", 0)))]))
            fused[n.output[1]] = shape
            count += 1
        for n in graph.node:
            if n.op_type == "MaxPoolGrad" and n.domain in ("", "ai.onnx", "com.microsoft") and len(n.input) == 2 \
                    and n.input[1] in fused:
                pairs.append((n, [helper.make_node("MaxPoolIdxGrad", [n.input[0], n.input[1], fused[n.input[1]]],
                                                   list(n.output), name=n.name, domain=DOMAIN)]))
        return count

    @staticmethod
    def _relu_grads(graph, pairs) -> int:
        count = 0
        for n in graph.node:
            if n.op_type == "ReluGrad" and n.domain == "com.microsoft":
                pairs.append((n, [helper.make_node("ReluGrad", list(n.input), list(n.output), name=n.name, domain=DOMAIN)]))
                count += 1
        return count

    def ensures(self, model):
        assert_inputs_defined(model)
