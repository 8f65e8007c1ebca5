"""The single-kernel measurements behind the speed passes (README "Speed"): each candidate rewrite timed against
the kernel it replaces, in one process, on resnet20's tensor shapes, and its values compared.

- nchwc: Conv vs ReorderInput + com.microsoft.nchwc.Conv (weight reordered in the graph) + ReorderOutput;
- relu-grad: ReluGrad vs Greater/Cast/Mul, Where, Sign/Ceil forms and fracgraph's fused ReluGrad;
- qdq: the six-op activation quantizer chain vs Sub/QuantizeLinear/DequantizeLinear/Add and fused FakeQuantize;
- noise: RandomUniformLike per element, against an Add of the same size;
- sr: the error quantizer (RandomUniformLike and its seven ops) vs fused SRQuantize, the same chain on a given
  noise tensor vs SRQuantizeNoise, and ReduceMin + ReduceMax vs fused MinMax;
- bn: BatchNormalizationGrad vs fracgraph's BatchNormGrad, BatchNormInternal (training) vs BatchNormTrain;
- dW: ConvGrad's weight gradient vs the same as a convolution of the transposed tensors (plain and NCHWc) and
  vs fracgraph's ConvGradW;
- dwshapes: the weight gradient on every shape of the model corpus (resnet18, efficientnet_b0, regnet_x_400mf at
  batch 32, 64x64; resnet20): ConvGrad vs ConvGradW vs ConvGradWCols + MatMul vs ConvGradWNhwc vs
  DepthwiseConvGradW (the forms passes/conv_grad_w.py chooses from);
- fwshapes: resnet18's forward 3x3 convs as Conv, NCHWc and im2col + MatMul; reorder: the NCHWc weight reorder
  as onnxruntime's Transpose vs fracgraph's NchwcWeight, and NchwcWeight on every layout of regnet_x_400mf's
  weights (and resnet18's largest) against an Add over the same tensor, interleaved (--cpu-time applies);
- forms: every forward and dX form of nchwc-conv (Conv/ConvTranspose, NCHWc, im2col-gemm on Im2Col/Col2Im) on
  resnet18, regnet and resnet20 shapes, with the pass's modelled costs and choice;
- executor (needs a training step): the resnet20 FW8/BW8 step with onnxruntime's sequential executor vs its
  parallel executor (2 inter-op threads with 1 or 2 intra-op threads);
- torch: PyTorch's resnet20 FP32 step by op (the convolution backward that ORT's ConvGrad is compared with);
- intconv: a quantized conv's forward on resnet20's shapes (8-bit fake-quantized operands): Conv and NCHWc in
  FP32 vs fracgraph's IntConv on each integer path this CPU has (amx, vnni, avx2, scalar) and onnxruntime's
  ConvInteger (u8 x u8, codes only: no correction terms, so a lower bound of its cost); --cpu-time and
  --int-paths apply;
- intdw: a quantized conv's weight gradient on resnet20's shapes (8-bit operands, the error stochastically
  rounded): the float form passes/conv_grad_w.py picks (and onnxruntime's ConvGrad) vs fracgraph's IntConvGradW
  on each integer path; --cpu-time, --match and --int-paths apply;
- intmatmul: a quantized linear layer's forward and weight-gradient GEMMs on vit_tiny's and the GPT's shapes (8
  bits): onnxruntime's float MatMul / MatMul_Grad Gemm vs fracgraph's IntMatMul / IntMatMulGradW per integer path
  (what passes/int_gemm.py writes), and the forward's older IntCodes + MatMulInteger + IntMatMulRescale form;
  --cpu-time, --match and --int-paths apply;
- gelu: the GELU gradient on convnext_atto's and the GPT's largest GELU tensors: onnxruntime's com.microsoft
  GeluGrad vs fracgraph's GeluGrad vs PyTorch's gelu backward (aten.gelu_backward, same thread count), the three
  timed in turn on each rep (rotating order), with each one's error against the float64 derivative;
- pool: googlenet's 13 max pools (and squeezenet's, resnet18's) with indices: onnxruntime's MaxPool (with and
  without indices) vs fracgraph's MaxPoolIdx, and MaxPoolGrad vs MaxPoolIdxGrad, in turn rep by rep, bitwise
  compared; --baseline DIR adds that checkout's MaxPoolIdx (today's kernel); --cpu-time applies;
- ifcost: an If's own cost per call (IF_CHAIN chained Adds, plain vs each in an If vs all in one If) on a scalar and
  on mobilevit-sized tensors; --cpu-time applies;
- transpose: the ViTs' Transposes (batch 32) as onnxruntime's Transpose vs fracgraph's Permute, interleaved,
  compared bitwise, with a numpy copy of the tensor as the floor; --cpu-time applies;
- bnconcat: bn-relu's pre-activation forms on densenet121's shapes: BatchNormGrad + Split vs BatchNormGradSplit,
  Sum of k gradients + MinMax vs SumRange, bitwise; --cpu-time applies.

    python bench/kernel_probes.py [--threads 2] [--reps 20] [--only nchwc,relu,qdq,noise,sr,bn,dw,dwshapes,fwshapes,forms,reorder,executor,torch,intconv,intdw,intmatmul,gelu,pool,ifcost,transpose,bnrelu,bnconcat,dwconvt]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h

SHAPES = [(128, 16, 32), (128, 32, 16), (128, 64, 8)]   # resnet20's stages: batch, channels, spatial
DW_MATCH: list[str] = []   # --match for the probes that filter their own shape lists (intdw)
INT_PATHS: list[str] = ["amx", "vnni", "avx2", "scalar"]   # --int-paths: IntConv / IntConvGradW's paths to time
FG = "ai.fracgraph"   # fracgraph's fused ops (fracgraph/kernels)
OPS = [h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1), h.make_opsetid("com.microsoft.nchwc", 1),
       h.make_opsetid(FG, 1)]


def _vi(name, t=T.FLOAT):
    return h.make_tensor_value_info(name, t, None)


def _model(nodes, inputs, outputs, inits=()):
    m = h.make_model(h.make_graph(nodes, "probe", [_vi(i) for i in inputs], [_vi(o) for o in outputs], list(inits)),
                     opset_imports=OPS)
    m.ir_version = 8
    return m


def _c(name, value, t=T.FLOAT):
    return h.make_tensor(name, t, [], [value])


class Runner:
    def __init__(self, threads: int, reps: int, cpu_time: bool = False):
        self.threads, self.reps = threads, reps
        # cpu_time: sessions without spinning threads, so that the process' CPU time per run is the work done; on a
        # shared machine it moves far less with the load than the wall time (preemption adds no CPU time)
        self.cpu_time = cpu_time

    def session(self, model):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        if self.cpu_time:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED   # no NCHWc rewrite of its own
        so.log_severity_level = 3
        if any(n.domain == FG for n in model.graph.node):
            from fracgraph import kernels

            kernels.register(so)
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def time(self, sess, feeds) -> tuple[float, list]:
        out = sess.run(None, feeds)
        ts = []
        clock = time.process_time if self.cpu_time else time.perf_counter
        for _ in range(self.reps):
            t = clock()
            sess.run(None, feeds)
            ts.append(clock() - t)
        return 1e3 * statistics.median(ts), out

    def compare(self, title, base, cands, feeds, ref=None, exact=False):
        """Time `base` and each candidate (name -> model) on `feeds`; print ms, ratio and agreement."""
        tb, ob = self.time(self.session(base[1]), feeds)
        ref = ob[0] if ref is None else ref
        print(f"  {title}: {base[0]} {tb:.2f} ms")
        for name, model, cfeeds in cands:
            tc, oc = self.time(self.session(model), cfeeds or feeds)
            diff = float(np.max(np.abs(oc[0].astype(np.float64) - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
            agree = ("bitwise equal" if np.array_equal(oc[0], ref) else f"max rel diff {diff:.1e}") if exact or diff else "bitwise equal"
            print(f"    {name:34s} {tc:7.2f} ms  x{tc / tb:5.2f}  {agree}")


def probe_nchwc(r: Runner, rng):
    print("nchwc: 3x3 conv, Conv vs NCHWc form (block from this CPU)")
    from fracgraph.runtime import nchwc_block_size

    B = nchwc_block_size()
    if B <= 1:
        print("  this CPU's onnxruntime has no NCHWc kernels")
        return
    for n, c, hw, stride in [(n, c, s, 1) for n, c, s in SHAPES] + [(128, 16, 32, 2)]:
        o = 2 * c if stride == 2 else c
        x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
        w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
        attrs = dict(pads=[1, 1, 1, 1], strides=[stride, stride])
        plain = _model([h.make_node("Conv", ["x", "w"], ["y"], **attrs)], ["x", "w"], ["y"])
        nodes = [h.make_node("ReorderInput", ["x"], ["xc"], domain="com.microsoft.nchwc"),
                 h.make_node("Reshape", ["w", "s6"], ["w6"]), h.make_node("Transpose", ["w6"], ["w6t"], perm=[0, 2, 4, 5, 3, 1]),
                 h.make_node("Reshape", ["w6t", "s4"], ["wb"]),
                 h.make_node("Conv", ["xc", "wb"], ["yc"], domain="com.microsoft.nchwc", kernel_shape=[3, 3], **attrs),
                 h.make_node("ReorderOutput", ["yc"], ["y"], domain="com.microsoft.nchwc", channels=o)]
        inits = [h.make_tensor("s6", T.INT64, [6], [o // B, B, c // B, B, 3, 3]), h.make_tensor("s4", T.INT64, [4], [o, c, 3, 3])]
        r.compare(f"{n}x{c}x{hw}x{hw} -> {o}, stride {stride}", ("Conv", plain),
                  [("NCHWc (reorders included)", _model(nodes, ["x", "w"], ["y"], inits), None)], {"x": x, "w": w})


def probe_relu(r: Runner, rng):
    print("relu-grad: dX = dY where Y > 0")
    y = np.maximum(rng.standard_normal((128, 16, 32, 32)).astype(np.float32), 0)
    y.flat[:3] = [1e-40, 3e38, -0.0]
    dy = rng.standard_normal(y.shape).astype(np.float32)
    z = [_c("z", 0.0)]
    cands = [
        ("Mul(dY, Cast(Greater(Y, 0)))", _model([h.make_node("Greater", ["y", "z"], ["m"]), h.make_node("Cast", ["m"], ["mf"], to=T.FLOAT),
                                                 h.make_node("Mul", ["dy", "mf"], ["dx"])], ["dy", "y"], ["dx"], z), None),
        ("Where(Greater(Y, 0), dY, 0)", _model([h.make_node("Greater", ["y", "z"], ["m"]), h.make_node("Where", ["m", "dy", "z"], ["dx"])],
                                              ["dy", "y"], ["dx"], z), None),
        ("dY * Sign(Y)", _model([h.make_node("Sign", ["y"], ["m"]), h.make_node("Mul", ["dy", "m"], ["dx"])], ["dy", "y"], ["dx"]), None),
        ("dY * Ceil(Min(Y, 1))", _model([h.make_node("Min", ["y", "o"], ["t"]), h.make_node("Ceil", ["t"], ["m"]),
                                         h.make_node("Mul", ["dy", "m"], ["dx"])], ["dy", "y"], ["dx"], [_c("o", 1.0)]), None),
        ("fracgraph ReluGrad", _model([h.make_node("ReluGrad", ["dy", "y"], ["dx"], domain=FG)], ["dy", "y"], ["dx"]), None),
    ]
    r.compare("128x16x32x32", ("ReluGrad", _model([h.make_node("ReluGrad", ["dy", "y"], ["dx"], domain="com.microsoft")], ["dy", "y"], ["dx"])),
              cands, {"dy": dy, "y": y}, ref=(dy * (y > 0)).astype(np.float32), exact=True)


def probe_qdq(r: Runner, rng):
    print("qdq: activation quantizer on the batch range, six ops vs QuantizeLinear/DequantizeLinear")
    x = rng.standard_normal((128, 16, 32, 32)).astype(np.float32)
    for bits in (8, 4, 3):
        mn = np.float32(x.min())
        L = np.float32(2 ** bits - 1)
        s = np.float32(max((np.float32(x.max()) - mn) / L, 1e-8))
        feeds = {"x": x, "mn": np.array(mn), "s": np.array(s)}
        chain = _model([h.make_node("Sub", ["x", "mn"], ["c"]), h.make_node("Div", ["c", "s"], ["u"]),
                        h.make_node("Clip", ["u", "lo", "hi"], ["uc"]), h.make_node("Round", ["uc"], ["rr"]),
                        h.make_node("Mul", ["rr", "s"], ["d"]), h.make_node("Add", ["d", "mn"], ["q"])],
                       ["x", "mn", "s"], ["q"], [_c("lo", -0.49), _c("hi", float(L) + 0.49)])
        qdq = _model([h.make_node("Sub", ["x", "mn"], ["c"]), h.make_node("QuantizeLinear", ["c", "s", "zp"], ["i"]),
                      h.make_node("DequantizeLinear", ["i", "s", "zp"], ["d"]), h.make_node("Add", ["d", "mn"], ["q"])],
                     ["x", "mn", "s"], ["q"], [h.make_tensor("zp", T.UINT8, [], [0])])
        fused = _model([h.make_node("FakeQuantize", ["x", "mn", "s", "hi"], ["q"], domain=FG, lo=-0.49)], ["x", "mn", "s"], ["q"],
                       [_c("hi", float(L) + 0.49)])
        r.compare(f"{bits} bits, 128x16x32x32", ("six ops", chain), [("Sub, QuantizeLinear, DequantizeLinear, Add", qdq, None),
                                                                    ("fracgraph FakeQuantize", fused, None)], feeds, exact=True)


def probe_noise(r: Runner, rng):
    print("noise: RandomUniformLike against an elementwise Add of the same size")
    x = rng.standard_normal((128, 16, 32, 32)).astype(np.float32)
    add = _model([h.make_node("Add", ["x", "o"], ["y"])], ["x"], ["y"], [_c("o", 1.0)])
    rnd = _model([h.make_node("RandomUniformLike", ["x"], ["y"], low=-0.5, high=0.5)], ["x"], ["y"])
    ta, _ = r.time(r.session(add), {"x": x})
    tr, _ = r.time(r.session(rnd), {"x": x})
    print(f"  {x.size} elements: Add {ta:.2f} ms, RandomUniformLike {tr:.2f} ms (x{tr / ta:.1f}, {1e6 * tr / x.size:.1f} ns/element)")


def probe_sr(r: Runner, rng):
    print("sr: the error quantizer (8 bits, clamp [0, 255]) and the per-tensor range")
    x = rng.standard_normal((128, 16, 32, 32)).astype(np.float32)
    mn, L = np.float32(x.min()), np.float32(255)
    s = np.float32(max((np.float32(x.max()) - mn) / L, 1e-8))
    noise = rng.uniform(-0.5, 0.5, x.shape).astype(np.float32)
    feeds = {"x": x, "mn": np.array(mn), "s": np.array(s), "hi": np.array(L)}
    tail = [h.make_node("Clip", ["un", "lo", "hi"], ["uc"]), h.make_node("Round", ["uc"], ["rr"]),
            h.make_node("Mul", ["rr", "s"], ["d"]), h.make_node("Add", ["d", "mn"], ["q"])]
    head = [h.make_node("Sub", ["x", "mn"], ["c"]), h.make_node("Div", ["c", "s"], ["u"]), h.make_node("Add", ["u", "nz"], ["un"])]
    drawn = _model([h.make_node("RandomUniformLike", ["x"], ["nz"], low=-0.5, high=0.5)] + head + tail,
                   ["x", "mn", "s", "hi"], ["q"], [_c("lo", 0.0)])
    own = _model([h.make_node("SRQuantize", ["x", "mn", "s", "hi"], ["q"], domain=FG, lo=0.0, salt=1)], ["x", "mn", "s", "hi"], ["q"])
    tc, _ = r.time(r.session(drawn), feeds)
    tf, _ = r.time(r.session(own), feeds)
    print(f"  128x16x32x32 with its noise: RandomUniformLike + 7 ops {tc:.2f} ms, fracgraph SRQuantize {tf:.2f} ms (x{tf / tc:.2f})")
    given = _model(head + tail, ["x", "mn", "s", "hi", "nz"], ["q"], [_c("lo", 0.0)])
    fused = _model([h.make_node("SRQuantizeNoise", ["x", "mn", "s", "hi", "nz"], ["q"], domain=FG, lo=0.0)],
                   ["x", "mn", "s", "hi", "nz"], ["q"])
    r.compare("128x16x32x32 on a given noise tensor", ("7 ops", given), [("fracgraph SRQuantizeNoise", fused, None)],
              {**feeds, "nz": noise}, exact=True)
    both = _model([h.make_node("ReduceMin", ["x"], ["a"], keepdims=0), h.make_node("ReduceMax", ["x"], ["b"], keepdims=0)],
                  ["x"], ["a", "b"])
    minmax = _model([h.make_node("MinMax", ["x"], ["a", "b"], domain=FG)], ["x"], ["a", "b"])
    r.compare("range of 128x16x32x32", ("ReduceMin + ReduceMax", both), [("fracgraph MinMax", minmax, None)], {"x": x},
              exact=True)


def probe_bn(r: Runner, rng):
    print("bn: batch-norm backward (training mode, saved mean and inverse std)")
    names = ["dy", "x", "scale", "mean", "inv_std"]
    ort_bn = _model([h.make_node("BatchNormalizationGrad", names, ["dx", "ds", "db"], domain="com.microsoft", epsilon=1e-5)],
                    names, ["dx", "ds", "db"])
    own = _model([h.make_node("BatchNormGrad", names, ["dx", "ds", "db"], domain=FG)], names, ["dx", "ds", "db"])
    for n, c, s in SHAPES:
        x = (rng.standard_normal((n, c, s, s)) * 2 + 0.5).astype(np.float32)
        feeds = {"dy": rng.standard_normal(x.shape).astype(np.float32), "x": x,
                 "scale": rng.standard_normal(c).astype(np.float32), "mean": x.mean((0, 2, 3)).astype(np.float32),
                 "inv_std": (1 / np.sqrt(x.var((0, 2, 3)) + 1e-5)).astype(np.float32)}
        r.compare(f"{n}x{c}x{s}x{s}", ("BatchNormalizationGrad", ort_bn), [("fracgraph BatchNormGrad", own, None)], feeds)
    print("bn: batch-norm forward, training mode (batch statistics; running statistics updated)")
    names, outs = ["x", "scale", "b", "rm", "rv"], ["y", "rm2", "rv2", "mean", "inv_std"]
    ort_fw = _model([h.make_node("BatchNormInternal", names, outs, domain="com.microsoft", epsilon=1e-5, momentum=0.9,
                                 training_mode=1)], names, outs)
    own_fw = _model([h.make_node("BatchNormTrain", names, outs, domain=FG, epsilon=1e-5, momentum=0.9)], names, outs)
    for n, c, s in SHAPES + [(32, 96, 32), (32, 576, 4)]:   # + mobilenet_v2's widest and deepest at 64x64
        x = (rng.standard_normal((n, c, s, s)) * 2 + 0.5).astype(np.float32)
        feeds = {"x": x, "scale": rng.standard_normal(c).astype(np.float32), "b": rng.standard_normal(c).astype(np.float32),
                 "rm": np.zeros(c, np.float32), "rv": np.ones(c, np.float32)}
        r.compare(f"{n}x{c}x{s}x{s}", ("BatchNormInternal", ort_fw), [("fracgraph BatchNormTrain", own_fw, None)], feeds)


def probe_bnrelu(r: Runner, rng):
    """passes/bn_relu.py's fused batch norms against the chains they replace (same values, bitwise)."""
    names, stats = ["x", "scale", "b", "rm", "rv"], ["rm2", "rv2", "mean", "inv_std"]
    bn = dict(epsilon=1e-5, momentum=0.9)
    fw = h.make_node("BatchNormTrain", names, ["y", *stats], domain=FG, **bn)
    shapes = SHAPES + [(32, 64, 16), (32, 128, 8)]   # + resnet18's and densenet121's at batch 32, 64x64
    for title, extra, chain, fused_in, relu in (
            ("bn-relu: forward BatchNormTrain -> Relu -> MinMax", [],
             [h.make_node("Relu", ["y"], ["out"])], "", 1),
            ("bn-relu: forward BatchNormTrain -> Add(residual) -> Relu -> MinMax", ["r"],
             [h.make_node("Add", ["y", "r"], ["s"]), h.make_node("Relu", ["s"], ["out"])], "r", 1)):
        print(title)
        base = _model([fw, *chain, h.make_node("MinMax", ["out"], ["lo", "hi"], domain=FG)], names + extra,
                      ["out", "lo", "hi"])
        own = _model([h.make_node("BatchNormTrainFused", names + [fused_in], ["out", *stats, "lo", "hi"], domain=FG,
                                  relu=relu, **bn)], names + extra, ["out", "lo", "hi"])
        for n, c, s in shapes:
            x = (rng.standard_normal((n, c, s, s)) * 2 + 0.5).astype(np.float32)
            feeds = {"x": x, "scale": rng.standard_normal(c).astype(np.float32), "b": rng.standard_normal(c).astype(np.float32),
                     "rm": np.zeros(c, np.float32), "rv": np.ones(c, np.float32)}
            if extra:
                feeds["r"] = rng.standard_normal(x.shape).astype(np.float32)
            r.compare(f"{n}x{c}x{s}x{s}", ("unfused", base), [("BatchNormTrainFused", own, None)], feeds, exact=True)
    print("bn-relu: backward ReluGrad -> BatchNormGrad -> MinMax (the forward's ReLU mask)")
    gin = ["dy", "x", "scale", "mean", "inv_std"]
    base = _model([h.make_node("ReluGrad", ["dy", "yr"], ["g"], domain=FG),
                   h.make_node("BatchNormGrad", ["g", "x", "scale", "mean", "inv_std"], ["dx", "ds", "db"], domain=FG),
                   h.make_node("MinMax", ["dx"], ["lo", "hi"], domain=FG)], gin + ["yr"], ["dx", "lo", "hi"])
    own = _model([h.make_node("BatchNormGradRange", gin + ["b"], ["dx", "ds", "db", "lo", "hi"], domain=FG, relu=1)],
                 gin + ["b"], ["dx", "lo", "hi"])
    for n, c, s in shapes:
        x = (rng.standard_normal((n, c, s, s)) * 2 + 0.5).astype(np.float32)
        scale, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
        mean = x.mean((0, 2, 3)).astype(np.float32)
        inv_std = (1 / np.sqrt(x.var((0, 2, 3)) + 1e-5)).astype(np.float32)
        ks = inv_std * scale   # the forward's own float operations (BatchNormTrain), so the masks agree bitwise
        y = x * ks.reshape(1, -1, 1, 1) + (b - mean * ks).reshape(1, -1, 1, 1)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        feeds = {"dy": dy, "x": x, "scale": scale, "mean": mean, "inv_std": inv_std}
        r.compare(f"{n}x{c}x{s}x{s}", ("unfused", base), [("BatchNormGradRange", own, {**feeds, "b": b})],
                  {**feeds, "yr": np.maximum(y, 0).astype(np.float32)}, exact=True)
    print("bn-relu: backward Sum(dY1, dY2) -> ReluGrad")
    base = _model([h.make_node("Sum", ["a", "c"], ["s"]), h.make_node("ReluGrad", ["s", "x"], ["dx"], domain=FG)],
                  ["a", "c", "x"], ["dx"])
    own = _model([h.make_node("ReluGradSum", ["a", "c", "x"], ["dx"], domain=FG)], ["a", "c", "x"], ["dx"])
    for n, c, s in shapes:
        feeds = {k: rng.standard_normal((n, c, s, s)).astype(np.float32) for k in ("a", "c", "x")}
        r.compare(f"{n}x{c}x{s}x{s}", ("Sum + ReluGrad", base), [("ReluGradSum", own, None)], feeds, exact=True)


def probe_bnconcat(r: Runner, rng):
    """bn-relu's pre-activation forms on densenet121's shapes (batch 32, 64x64: each block's first, middle and
    last concatenated input): BatchNormGrad + Split of dX into the Concat's pieces (the layer's input is the
    Concat of the block's input, 64-256 channels, and growth-32 feature maps) vs BatchNormGradSplit, and a feature
    map's gradient accumulation Sum of k gradients + MinMax vs SumRange; every output bitwise equal."""
    print("bn-relu: backward BatchNormGrad -> Split (a Concat's gradient)")
    gin = ["dy", "x", "scale", "mean", "inv_std"]
    for n, c0, c, s in [(32, 64, 128, 16), (32, 64, 256, 16), (32, 128, 320, 8), (32, 256, 640, 4), (32, 256, 1024, 4)]:
        lengths = [c0] + [32] * ((c - c0) // 32)
        pieces = [f"p{i}" for i in range(len(lengths))]
        init = [h.make_tensor("lengths", T.INT64, [len(lengths)], lengths)]
        base = _model([h.make_node("BatchNormGrad", gin, ["dx", "ds", "db"], domain=FG),
                       h.make_node("Split", ["dx", "lengths"], pieces, axis=1)], gin, pieces, init)
        own = _model([h.make_node("BatchNormGradSplit", gin + ["", "lengths"], ["ds", "db", *pieces], domain=FG,
                                  relu=0, pieces=len(lengths))], gin, pieces, init)
        x = (rng.standard_normal((n, c, s, s)) * 2 + 0.5).astype(np.float32)
        feeds = {"dy": rng.standard_normal(x.shape).astype(np.float32), "x": x,
                 "scale": rng.standard_normal(c).astype(np.float32), "mean": x.mean((0, 2, 3)).astype(np.float32),
                 "inv_std": (1 / np.sqrt(x.var((0, 2, 3)) + 1e-5)).astype(np.float32)}
        r.compare(f"{n}x{c}x{s}x{s} in {len(lengths)} pieces", ("BatchNormGrad + Split", base),
                  [("BatchNormGradSplit", own, None)], feeds, exact=True)
    print("bn-relu: backward Sum(k gradients) -> MinMax (a feature map read by k later layers)")
    for n, c, s, k in [(32, 32, 16, 2), (32, 32, 16, 6), (32, 32, 8, 12), (32, 32, 4, 24), (32, 64, 16, 7)]:
        names = [f"g{i}" for i in range(k)]
        base = _model([h.make_node("Sum", names, ["y"]), h.make_node("MinMax", ["y"], ["lo", "hi"], domain=FG)],
                      names, ["y", "lo", "hi"])
        own = _model([h.make_node("SumRange", names, ["y", "lo", "hi"], domain=FG, n=k)], names, ["y", "lo", "hi"])
        feeds = {g: rng.standard_normal((n, c, s, s)).astype(np.float32) for g in names}
        r.compare(f"{n}x{c}x{s}x{s}, {k} gradients", ("Sum + MinMax", base), [("SumRange", own, None)], feeds,
                  exact=True)


def probe_dw(r: Runner, rng):
    print("dW: ConvGrad's weight gradient vs a convolution of the transposed tensors")
    from fracgraph.runtime import nchwc_block_size

    B = nchwc_block_size()
    for n, c, s in SHAPES:
        x = rng.standard_normal((n, c, s, s)).astype(np.float32)
        w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
        dy = rng.standard_normal((n, c, s, s)).astype(np.float32)
        cg = _model([h.make_node("ConvGrad", ["dy", "x", "w"], ["", "dw"], domain="com.microsoft", pads=[1, 1, 1, 1],
                                 strides=[1, 1], kernel_shape=[3, 3], group=1, dilations=[1, 1])], ["dy", "x", "w"], ["dw"])
        tr = [h.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2, 3]), h.make_node("Transpose", ["dy"], ["dyt"], perm=[1, 0, 2, 3])]
        plain = _model(tr + [h.make_node("Conv", ["xt", "dyt"], ["y"], pads=[1, 1, 1, 1]),
                             h.make_node("Transpose", ["y"], ["dw"], perm=[1, 0, 2, 3])], ["dy", "x"], ["dw"])
        cands = [("Conv(X^T, dY^T)", plain, {"dy": dy, "x": x}),
                 ("fracgraph ConvGradW", _model([h.make_node("ConvGradW", ["dy", "x"], ["dw"], domain=FG, kh=3, kw=3, sh=1, sw=1,
                                                             ph=1, pw=1, dh=1, dw=1)], ["dy", "x"], ["dw"]), {"dy": dy, "x": x})]
        if B > 1:
            nc = _model(tr + [h.make_node("ReorderInput", ["xt"], ["xc"], domain="com.microsoft.nchwc"),
                              h.make_node("Reshape", ["dyt", "s6"], ["w6"]), h.make_node("Transpose", ["w6"], ["w6t"], perm=[0, 2, 4, 5, 3, 1]),
                              h.make_node("Reshape", ["w6t", "s4"], ["wb"]),
                              h.make_node("Conv", ["xc", "wb"], ["yc"], domain="com.microsoft.nchwc", pads=[1, 1, 1, 1], kernel_shape=[s, s]),
                              h.make_node("ReorderOutput", ["yc"], ["y"], domain="com.microsoft.nchwc", channels=c),
                              h.make_node("Transpose", ["y"], ["dw"], perm=[1, 0, 2, 3])], ["dy", "x"], ["dw"],
                        [h.make_tensor("s6", T.INT64, [6], [c // B, B, n // B, B, s, s]), h.make_tensor("s4", T.INT64, [4], [c, n, s, s])])
            cands.append(("NCHWc Conv(X^T, dY^T)", nc, {"dy": dy, "x": x}))
        r.compare(f"{n}x{c}x{s}x{s}", ("ConvGrad (dW only)", cg), cands, {"dy": dy, "x": x, "w": w})
    # resnet20's strided convs (3x3 and 1x1, stride 2, channels doubled): ConvGradW's im2col path
    for n, c, s, k in [(128, 16, 32, 3), (128, 32, 16, 3), (128, 16, 32, 1), (128, 32, 16, 1)]:
        p = k // 2
        x = rng.standard_normal((n, c, s, s)).astype(np.float32)
        w = rng.standard_normal((2 * c, c, k, k)).astype(np.float32)
        dy = rng.standard_normal((n, 2 * c, s // 2, s // 2)).astype(np.float32)
        cg = _model([h.make_node("ConvGrad", ["dy", "x", "w"], ["", "dw"], domain="com.microsoft", pads=[p] * 4,
                                 strides=[2, 2], kernel_shape=[k, k], group=1, dilations=[1, 1])], ["dy", "x", "w"], ["dw"])
        own = _model([h.make_node("ConvGradW", ["dy", "x"], ["dw"], domain=FG, kh=k, kw=k, sh=2, sw=2, ph=p, pw=p, dh=1, dw=1)],
                     ["dy", "x"], ["dw"])
        r.compare(f"{n}x{c}x{s}x{s} -> {2 * c}, {k}x{k} stride 2", ("ConvGrad (dW only)", cg),
                  [("fracgraph ConvGradW (im2col)", own, {"dy": dy, "x": x})], {"dy": dy, "x": x, "w": w})


# (label, N, Ci, H, Co, k, stride, group): the weight-gradient shapes of the model corpus at batch 32, 64x64 inputs
# (torchvision resnet18, efficientnet_b0, regnet_x_400mf) and resnet20's at batch 128
DW_SHAPES = [
    ("resnet18 conv1 7x7/2", 32, 3, 64, 64, 7, 2, 1), ("resnet18 layer1", 32, 64, 16, 64, 3, 1, 1),
    ("resnet18 layer2 3x3/2", 32, 64, 16, 128, 3, 2, 1), ("resnet18 layer2", 32, 128, 8, 128, 3, 1, 1),
    ("resnet18 layer2 down 1x1/2", 32, 64, 16, 128, 1, 2, 1), ("resnet18 layer3", 32, 256, 4, 256, 3, 1, 1),
    ("resnet18 layer4 3x3/2", 32, 256, 4, 512, 3, 2, 1), ("resnet18 layer4", 32, 512, 2, 512, 3, 1, 1),
    ("effnet stem 3x3/2", 32, 3, 64, 32, 3, 2, 1), ("effnet dw 3x3 96/2", 32, 96, 32, 96, 3, 2, 96),
    ("effnet dw 5x5 240", 32, 240, 8, 240, 5, 1, 240), ("effnet dw 5x5 1152", 32, 1152, 2, 1152, 5, 1, 1152),
    ("effnet 1x1 144->24", 32, 144, 16, 24, 1, 1, 1), ("effnet 1x1 1152->192", 32, 1152, 2, 192, 1, 1, 1),
    ("effnet 1x1 320->1280", 32, 320, 2, 1280, 1, 1, 1), ("effnet SE 1x1 480->20", 32, 480, 1, 20, 1, 1, 1),
    ("regnet g16 3x3 64", 32, 64, 8, 64, 3, 1, 4), ("regnet g16 3x3 160/2", 32, 160, 8, 160, 3, 2, 10),
    ("regnet g16 3x3 400", 32, 400, 2, 400, 3, 1, 25), ("regnet 1x1 160->400", 32, 160, 4, 400, 1, 1, 1),
    ("regnet g16 3x3 32 16x16", 32, 32, 16, 32, 3, 1, 2), ("regnet g16 3x3 160 4x4", 32, 160, 4, 160, 3, 1, 10),
    ("regnet g16 3x3 400/2", 32, 400, 4, 400, 3, 2, 25),
    ("resnet20 16", 128, 16, 32, 16, 3, 1, 1), ("resnet20 32", 128, 32, 16, 32, 3, 1, 1),
    ("resnet20 64", 128, 64, 8, 64, 3, 1, 1), ("resnet20 16->32 3x3/2", 128, 16, 32, 32, 3, 2, 1),
    # densenet121's 1x1 convs (dense layers' bottlenecks into 128 channels, transitions) and 3x3 growth convs (128 -> 32),
    # and convnext_atto's (timm,
    # conv_mlp: the MLP as 1x1 convs) and its 7x7 depthwise convs, batch 32, 64x64 inputs
    ("densenet 1x1 64->128 16x16", 32, 64, 16, 128, 1, 1, 1), ("densenet 1x1 224->128 16x16", 32, 224, 16, 128, 1, 1, 1),
    ("densenet 1x1 256->128 16x16", 32, 256, 16, 128, 1, 1, 1), ("densenet 1x1 128->128 8x8", 32, 128, 8, 128, 1, 1, 1),
    ("densenet 1x1 480->128 8x8", 32, 480, 8, 128, 1, 1, 1), ("densenet 1x1 512->256 8x8", 32, 512, 8, 256, 1, 1, 1),
    ("densenet 1x1 256->128 4x4", 32, 256, 4, 128, 1, 1, 1), ("densenet 1x1 992->128 4x4", 32, 992, 4, 128, 1, 1, 1),
    ("densenet 1x1 1024->512 4x4", 32, 1024, 4, 512, 1, 1, 1), ("densenet 1x1 512->128 2x2", 32, 512, 2, 128, 1, 1, 1),
    ("densenet 1x1 992->128 2x2", 32, 992, 2, 128, 1, 1, 1),
    ("densenet 3x3 128->32 16x16", 32, 128, 16, 32, 3, 1, 1), ("densenet 3x3 128->32 8x8", 32, 128, 8, 32, 3, 1, 1),
    ("densenet 3x3 128->32 4x4", 32, 128, 4, 32, 3, 1, 1), ("densenet 3x3 128->32 2x2", 32, 128, 2, 32, 3, 1, 1),
    ("convnext 1x1 40->160 16x16", 32, 40, 16, 160, 1, 1, 1), ("convnext 1x1 160->40 16x16", 32, 160, 16, 40, 1, 1, 1),
    ("convnext 1x1 80->320 8x8", 32, 80, 8, 320, 1, 1, 1), ("convnext 1x1 320->80 8x8", 32, 320, 8, 80, 1, 1, 1),
    ("convnext 1x1 160->640 4x4", 32, 160, 4, 640, 1, 1, 1), ("convnext 1x1 640->160 4x4", 32, 640, 4, 160, 1, 1, 1),
    ("convnext 1x1 320->1280 2x2", 32, 320, 2, 1280, 1, 1, 1), ("convnext 1x1 1280->320 2x2", 32, 1280, 2, 320, 1, 1, 1),
    ("convnext dw 7x7 40 16x16", 32, 40, 16, 40, 7, 1, 40), ("convnext dw 7x7 80 8x8", 32, 80, 8, 80, 7, 1, 80),
    ("convnext dw 7x7 160 4x4", 32, 160, 4, 160, 7, 1, 160), ("convnext dw 7x7 320 2x2", 32, 320, 2, 320, 7, 1, 320),
]


def dw_candidates(n, ci, hw, co, k, s, g):
    """The weight-gradient forms for one shape: (name, model), onnxruntime's ConvGrad first (inputs dy, x, w)."""
    p = k // 2
    conv = dict(kh=k, kw=k, sh=s, sw=s, ph=p, pw=p, dh=1, dw=1)
    cands = [("ConvGrad (dW only)", _model([h.make_node("ConvGrad", ["dy", "x", "w"], ["", "dw"], domain="com.microsoft",
                                                         pads=[p] * 4, strides=[s, s], kernel_shape=[k, k], group=g,
                                                         dilations=[1, 1])], ["dy", "x", "w"], ["dw"]))]
    if g == 1 and co % 16 == 0 and co <= 64:   # its AVX-512 tile; elsewhere 3-48x ConvGrad (README), not re-timed
        cands.append(("fracgraph ConvGradW", _model([h.make_node("ConvGradW", ["dy", "x"], ["dw"], domain=FG, **conv)],
                                                    ["dy", "x"], ["dw"])))
    cands.append(("ConvGradWCols + MatMul", _model(
        [h.make_node("ConvGradWCols", ["dy", "x"], ["dyt", "col"], domain=FG, group=g, **conv),
         h.make_node("FusedMatMul", ["dyt", "col"], ["dwg"], domain="com.microsoft", transB=1), h.make_node("Reshape", ["dwg", "ws"], ["dw"])],
        ["dy", "x"], ["dw"], [h.make_tensor("ws", T.INT64, [4], [co, ci // g, k, k])])))
    if g != ci or ci != co:   # the channel-tiled kernel (kernels/conv_grad_w.c): every non-depthwise shape
        cands.append(("fracgraph ConvGradWNhwc", _model([h.make_node("ConvGradWNhwc", ["dy", "x"], ["dw"], domain=FG, group=g,
                                                                     **conv)], ["dy", "x"], ["dw"])))
    if g == ci == co:
        cands.append(("fracgraph DepthwiseConvGradW", _model(
            [h.make_node("DepthwiseConvGradW", ["dy", "x"], ["dw"], domain=FG, **conv)], ["dy", "x"], ["dw"])))
    return cands


def probe_dwshapes(r: Runner, rng, shapes=None):
    """Every weight-gradient form on every corpus shape; returns {label: {form: ms}}."""
    print("dW by shape: onnxruntime's ConvGrad vs ConvGradW vs im2col + MatMul (MLAS) vs the depthwise kernel")
    table = {}
    for label, n, ci, hw, co, k, s, g in shapes or DW_SHAPES:
        ho = (hw + 2 * (k // 2) - k) // s + 1
        x = rng.standard_normal((n, ci, hw, hw)).astype(np.float32)
        dy = rng.standard_normal((n, co, ho, ho)).astype(np.float32)
        w = rng.standard_normal((co, ci // g, k, k)).astype(np.float32)
        cands = dw_candidates(n, ci, hw, co, k, s, g)
        from fracgraph.passes.conv_grad_w import ConvShape, _has_avx512, choose, dw_costs

        cs = ConvShape(ci=ci, h=hw, w=hw, co=co, kh=k, kw=k, sh=s, sw=s, ph=k // 2, pw=k // 2, ph_end=k // 2,
                       pw_end=k // 2, dh=1, dw=1, group=g, bias=False)
        model = {f: round(v) for f, v in dw_costs(cs, _has_avx512()).items() if v is not None}
        print(f"  {label}: N{n} Ci{ci} {hw}x{hw} -> Co{co} {k}x{k}/{s} group {g}; model {model} -> "
              f"{choose(cs, _has_avx512())[0]}")
        row, ref = {}, None
        # the candidates' runs interleaved (rep by rep), so that a change of the machine's load hits all of them
        runs = [(name, r.session(model), {"dy": dy, "x": x, "w": w} if name.startswith("ConvGrad (") else {"dy": dy, "x": x})
                for name, model in cands]
        outs = {name: sess.run(None, feeds)[0] for name, sess, feeds in runs}
        ts = {name: [] for name, _, _ in runs}
        clock = time.process_time if r.cpu_time else time.perf_counter
        for _ in range(r.reps):
            for name, sess, feeds in runs:
                t = clock()
                sess.run(None, feeds)
                ts[name].append(clock() - t)
        what = "CPU ms" if r.cpu_time else "ms"
        for name, _, _ in runs:
            ref = outs[name].astype(np.float64) if ref is None else ref
            diff = float(np.max(np.abs(outs[name] - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
            t, tmin = 1e3 * statistics.median(ts[name]), 1e3 * min(ts[name])
            row[name] = t
            base, bmin = row["ConvGrad (dW only)"], 1e3 * min(ts["ConvGrad (dW only)"])
            print(f"    {name:30s} {t:8.2f} {what}  x{t / base:5.2f}  (min {tmin:7.2f}  x{tmin / bmin:5.2f})  "
                  f"max rel diff {diff:.1e}")
        table[label] = row
    return table


def probe_fwshapes(r: Runner, rng):
    """The forward conv of resnet18's stride-1 3x3 shapes (batch 32, 64x64 inputs): plain Conv vs the NCHWc form
    the nchwc-conv pass writes (NchwcWeight reorder) vs im2col + one MatMul on MLAS (+ the transpose back to NCHW):
    the measurement behind README's note that only the 2x2 maps would gain from a GEMM forward."""
    print("forward conv by shape: Conv vs NCHWc (NchwcWeight) vs im2col + MatMul")
    from fracgraph.runtime import nchwc_block_size

    B = nchwc_block_size()
    for n, c, hw in [(32, 512, 2), (32, 256, 4), (32, 128, 8), (32, 64, 16)]:
        x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
        w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
        plain = _model([h.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)], ["x", "w"], ["y"])
        cands = [("im2col + MatMul", _model(
            [h.make_node("ConvGradWCols", ["d", "x"], ["dt", "col"], domain=FG, group=1, kh=3, kw=3, sh=1, sw=1, ph=1,
                         pw=1, dh=1, dw=1),
             h.make_node("Reshape", ["w", "s2"], ["w2"]), h.make_node("MatMul", ["w2", "col"], ["y3"]),
             h.make_node("Reshape", ["y3", "s3"], ["y3r"]), h.make_node("Transpose", ["y3r"], ["y4"], perm=[1, 0, 2]),
             h.make_node("Reshape", ["y4", "s4"], ["y"])], ["d", "x", "w"], ["y"],
            [h.make_tensor("s2", T.INT64, [2], [c, c * 9]), h.make_tensor("s3", T.INT64, [3], [c, n, hw * hw]),
             h.make_tensor("s4", T.INT64, [4], [n, c, hw, hw])]),
            {"d": np.zeros((n, 1, hw, hw), np.float32), "x": x, "w": w})]
        if B > 1:
            cands.append(("NCHWc (NchwcWeight)", _model(
                [h.make_node("NchwcWeight", ["w"], ["wb"], domain=FG, block=B, blocked_in=1, transpose=0, flip=0),
                 h.make_node("ReorderInput", ["x"], ["xc"], domain="com.microsoft.nchwc"),
                 h.make_node("Conv", ["xc", "wb"], ["yc"], domain="com.microsoft.nchwc", pads=[1] * 4, kernel_shape=[3, 3]),
                 h.make_node("ReorderOutput", ["yc"], ["y"], domain="com.microsoft.nchwc", channels=c)], ["x", "w"], ["y"]),
                None))
        r.compare(f"{n}x{c}x{hw}x{hw}, 3x3", ("Conv", plain), cands, {"x": x, "w": w})


def _same_pad_out(hw, k, st):
    """(pad, output size) of a k x k conv with padding k // 2 and stride st on an hw x hw map."""
    return k // 2, (hw + 2 * (k // 2) - k) // st + 1


def _gemm_geometry(ci, hw, k, st, g):
    """The im2col-gemm forms' sizes: output size, taps per group, the conv's and the 1x1 Im2Col/Col2Im attributes."""
    p, ho = _same_pad_out(hw, k, st)
    conv = dict(kh=k, kw=k, sh=st, sw=st, ph=p, pw=p, dh=1, dw=1, h=hw, w=hw, ho=ho, wo=ho)
    one = dict(kh=1, kw=1, sh=1, sw=1, ph=0, pw=0, dh=1, dw=1, h=ho, w=ho, ho=ho, wo=ho)
    return ho, ci // g * k * k, conv, one


def _gemm_forward(n, ci, hw, co, k, st, g):
    """nchwc-conv's im2col-gemm forward form, node for node (Im2Col, MatMul, 1x1 Col2Im)."""
    _, kg, conv, one = _gemm_geometry(ci, hw, k, st, g)
    return _model([h.make_node("Im2Col", ["x"], ["col"], domain=FG, **conv),
                   h.make_node("Reshape", ["col", "cs"], ["colg"]), h.make_node("Reshape", ["w", "ws"], ["wg"]),
                   h.make_node("MatMul", ["wg", "colg"], ["yc"]), h.make_node("Col2Im", ["yc"], ["y"], domain=FG, **one)],
                  ["x", "w"], ["y"], [h.make_tensor("cs", T.INT64, [3], [g, kg, -1]),
                                      h.make_tensor("ws", T.INT64, [3], [g, co // g, kg])])


def _gemm_dx(n, ci, hw, co, k, st, g):
    """nchwc-conv's im2col-gemm dX form: Im2Col1x1(dY) as dYt, FusedMatMul(W^T, dYt), Col2Im."""
    _, kg, conv, one = _gemm_geometry(ci, hw, k, st, g)
    return _model([h.make_node("Im2Col", ["dy"], ["dyt"], domain=FG, **one),
                   h.make_node("Reshape", ["dyt", "ds"], ["dytg"]), h.make_node("Reshape", ["w", "ws"], ["wg"]),
                   h.make_node("FusedMatMul", ["wg", "dytg"], ["cols"], domain="com.microsoft", transA=1),
                   h.make_node("Col2Im", ["cols"], ["dx"], domain=FG, **conv)],
                  ["dy", "w"], ["dx"], [h.make_tensor("ds", T.INT64, [3], [g, co // g, -1]),
                                        h.make_tensor("ws", T.INT64, [3], [g, co // g, kg])])


FORM_SHAPES = [   # label, batch, Ci, H=W, Co, k, stride, group
    ("resnet18 layer4 512 2x2", 32, 512, 2, 512, 3, 1, 1), ("resnet18 layer3 256 4x4", 32, 256, 4, 256, 3, 1, 1),
    ("resnet18 layer2 128 8x8", 32, 128, 8, 128, 3, 1, 1), ("resnet18 layer1 64 16x16", 32, 64, 16, 64, 3, 1, 1),
    ("resnet18 256->512 3x3/2", 32, 256, 4, 512, 3, 2, 1), ("resnet18 128->256 3x3/2", 32, 128, 8, 256, 3, 2, 1),
    ("resnet18 64->128 3x3/2", 32, 64, 16, 128, 3, 2, 1), ("resnet18 256->512 1x1/2", 32, 256, 4, 512, 1, 2, 1),
    ("densenet 128->32 2x2", 32, 128, 2, 32, 3, 1, 1), ("resnet20 16->32 3x3/2", 128, 16, 32, 32, 3, 2, 1),
    ("regnet 400 g25 2x2", 32, 400, 2, 400, 3, 1, 25), ("regnet 160 g10 4x4", 32, 160, 4, 160, 3, 1, 10),
    ("regnet 64 g4 8x8", 32, 64, 8, 64, 3, 1, 4), ("regnet 32 g2 16x16", 32, 32, 16, 32, 3, 1, 2),
    ("regnet 400 g25 3x3/2", 32, 400, 4, 400, 3, 2, 25),
]


def probe_forms(r: Runner, rng, shapes=None):
    """Every forward and dX form of nchwc-conv on every shape: onnxruntime's Conv (forward, stride-1 dX as a conv
    with the flipped weight) or ConvTranspose (strided dX), NCHWc where its rules take the shape, and im2col-gemm
    (Im2Col/Col2Im + MLAS); with the pass's modelled costs, so the model can be checked against the times."""
    from fracgraph.passes.conv_grad_w import ConvShape
    from fracgraph.passes.nchwc_conv import choose_form, conv_costs
    from fracgraph.runtime import nchwc_block_size

    B = nchwc_block_size()
    print("conv forms by shape: forward and dX, onnxruntime's op vs NCHWc vs im2col-gemm (the pass's model in brackets)")
    for label, n, ci, hw, co, k, st, g in shapes or FORM_SHAPES:
        p, ho = _same_pad_out(hw, k, st)
        s = ConvShape(ci=ci, h=hw, w=hw, co=co, kh=k, kw=k, sh=st, sw=st, ph=p, pw=p, ph_end=p, pw_end=p, dh=1, dw=1,
                      group=g, bias=False)
        x = rng.standard_normal((n, ci, hw, hw)).astype(np.float32)
        w = rng.standard_normal((co, ci // g, k, k)).astype(np.float32)
        dy = rng.standard_normal((n, co, ho, ho)).astype(np.float32)
        nchwc_ok = B > 1 and (co // g) % B == 0 and (ci // g) % B == 0   # nchwc-conv's rule (grouped: per group)
        print(f"  {label}: N{n} Ci{ci} {hw}x{hw} -> Co{co} {k}x{k}/{st} group {g}")
        # forward
        cands = [("im2col-gemm", _gemm_forward(n, ci, hw, co, k, st, g), None)]
        if nchwc_ok:
            cands.append(("NCHWc", _model(
                [h.make_node("NchwcWeight", ["w"], ["wb"], domain=FG, block=B, blocked_in=1, transpose=0, flip=0),
                 h.make_node("ReorderInput", ["x"], ["xc"], domain="com.microsoft.nchwc"),
                 h.make_node("Conv", ["xc", "wb"], ["yc"], domain="com.microsoft.nchwc", pads=[p] * 4, kernel_shape=[k, k],
                             strides=[st, st], group=g),
                 h.make_node("ReorderOutput", ["yc"], ["y"], domain="com.microsoft.nchwc", channels=co)], ["x", "w"], ["y"]),
                None))
        costs = conv_costs(s, "forward", nchwc_ok)
        print(f"   forward: model {({k_: round(v) for k_, v in costs.items() if v is not None})} -> "
              f"{choose_form(s, 'forward', nchwc_ok, True)[0]}")
        r.compare("forward", ("Conv", _model([h.make_node("Conv", ["x", "w"], ["y"], pads=[p] * 4, strides=[st, st],
                                                         group=g)], ["x", "w"], ["y"])), cands, {"x": x, "w": w})
        # dX
        role = "dX" if st == 1 else "dX-strided"
        costs = conv_costs(s, role, nchwc_ok and st == 1)
        print(f"   {role}: model {({k_: round(v) for k_, v in costs.items() if v is not None})} -> "
              f"{choose_form(s, role, nchwc_ok and st == 1, True)[0]}")
        gemm = [("im2col-gemm", _gemm_dx(n, ci, hw, co, k, st, g), {"dy": dy, "w": w})]
        if st == 1:
            wt = np.ascontiguousarray(w.reshape(g, co // g, ci // g, k, k).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
                                      .reshape(ci, co // g, k, k))
            pd = k - 1 - p
            if nchwc_ok:
                gemm.append(("NCHWc (flipped weight)", _model(
                    [h.make_node("NchwcWeight", ["w"], ["wb"], domain=FG, block=B, blocked_in=1, transpose=0, flip=0),
                     h.make_node("ReorderInput", ["dy"], ["dc"], domain="com.microsoft.nchwc"),
                     h.make_node("Conv", ["dc", "wb"], ["xc"], domain="com.microsoft.nchwc", pads=[pd] * 4,
                                 kernel_shape=[k, k], group=g),
                     h.make_node("ReorderOutput", ["xc"], ["dx"], domain="com.microsoft.nchwc", channels=ci)],
                    ["dy", "w"], ["dx"]), {"dy": dy, "w": wt}))
            base = ("Conv (flipped weight)", _model([h.make_node("Conv", ["dy", "w"], ["dx"], pads=[pd] * 4, group=g)],
                                                    ["dy", "w"], ["dx"]))
            r.compare("dX", base, gemm, {"dy": dy, "w": wt})
        else:
            out_pad = (hw + 2 * p - k) % st
            base = ("ConvTranspose", _model([h.make_node("ConvTranspose", ["dy", "w"], ["dx"], pads=[p] * 4, strides=[st, st],
                                                         group=g, output_padding=[out_pad] * 2)], ["dy", "w"], ["dx"]))
            r.compare("dX", base, gemm, {"dy": dy, "w": w})


# depthwise convs (label, batch, C, H=W, k, stride) of convnext_atto (7x7), efficientnet_b0 and mobilenet_v2 at 64x64
DWCONV_SHAPES = [
    ("convnext dw 7x7 40 16x16", 32, 40, 16, 7, 1), ("convnext dw 7x7 80 8x8", 32, 80, 8, 7, 1),
    ("convnext dw 7x7 160 4x4", 32, 160, 4, 7, 1), ("convnext dw 7x7 320 2x2", 32, 320, 2, 7, 1),
    ("effnet dw 3x3 32 32x32", 32, 32, 32, 3, 1), ("effnet dw 3x3 144 16x16", 32, 144, 16, 3, 1),
    ("effnet dw 5x5 240 8x8", 32, 240, 8, 5, 1), ("effnet dw 3x3 480 4x4", 32, 480, 4, 3, 1),
    ("effnet dw 5x5 1152 2x2", 32, 1152, 2, 5, 1), ("effnet dw 3x3 96/2 32x32", 32, 96, 32, 3, 2),
    ("effnet dw 5x5 144/2 16x16", 32, 144, 16, 5, 2), ("mobilenet dw 3x3 384 4x4", 32, 384, 4, 3, 1),
    ("mobilenet dw 3x3 960 2x2", 32, 960, 2, 3, 1),
]


def probe_dwconv(r: Runner, rng, shapes=None):
    """Depthwise convs, forward and stride-1 dX: onnxruntime's Conv (group = C), NCHWc where its rules take it, and
    fracgraph's DepthwiseConv (dX: flip of the forward weight, as conv-grad-split's flipped-weight conv)."""
    from fracgraph.runtime import nchwc_block_size

    B = nchwc_block_size()
    print("depthwise conv: onnxruntime's Conv vs NCHWc vs fracgraph DepthwiseConv")
    for label, n, c, hw, k, st in shapes or DWCONV_SHAPES:
        p = k // 2
        ho = (hw + 2 * p - k) // st + 1
        x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
        w = rng.standard_normal((c, 1, k, k)).astype(np.float32)
        dy = rng.standard_normal((n, c, ho, ho)).astype(np.float32)
        print(f"  {label}: N{n} C{c} {hw}x{hw} {k}x{k}/{st}")
        roles = [("forward", x, w, p, st, 0)]
        if st == 1:
            roles.append(("dX", dy, np.ascontiguousarray(w[:, :, ::-1, ::-1]), k - 1 - p, 1, 1))
        for role, inp, wk, pad, stride, flip in roles:
            conv = dict(kh=k, kw=k, sh=stride, sw=stride, ph=pad, pw=pad, dh=1, dw=1, ph_end=pad, pw_end=pad)
            cands = [("fracgraph DepthwiseConv", _model([h.make_node("DepthwiseConv", ["x", "w"], ["y"], domain=FG, flip=flip,
                                                                     **conv)], ["x", "w"], ["y"]),
                      {"x": inp, "w": w if flip else wk})]
            if B > 1 and c % B == 0:
                cands.append(("NCHWc", _model(
                    [h.make_node("NchwcWeight", ["w"], ["wb"], domain=FG, block=B, blocked_in=0, transpose=0, flip=0),
                     h.make_node("ReorderInput", ["x"], ["xc"], domain="com.microsoft.nchwc"),
                     h.make_node("Conv", ["xc", "wb"], ["yc"], domain="com.microsoft.nchwc", pads=[pad] * 4,
                                 kernel_shape=[k, k], strides=[stride] * 2, group=c),
                     h.make_node("ReorderOutput", ["yc"], ["y"], domain="com.microsoft.nchwc", channels=c)], ["x", "w"], ["y"]),
                    None))
            r.compare(role, ("Conv", _model([h.make_node("Conv", ["x", "w"], ["y"], pads=[pad] * 4, strides=[stride] * 2,
                                                         group=c)], ["x", "w"], ["y"])), cands, {"x": inp, "w": wk})


DWCONVT_SHAPES = [   # the corpus's strided depthwise convs (label, N, C, H = W of X, k, stride), batch 32, 64x64 input
    ("mobilenet_v2 dw 3x3 96/2 32x32", 32, 96, 32, 3, 2), ("mobilenet_v2 dw 3x3 144/2 16x16", 32, 144, 16, 3, 2),
    ("mobilenet_v2 dw 3x3 192/2 8x8", 32, 192, 8, 3, 2), ("mobilenet_v2 dw 3x3 576/2 4x4", 32, 576, 4, 3, 2),
    ("mobilenet_v3 dw 3x3 16/2 32x32", 32, 16, 32, 3, 2), ("effnet dw 5x5 144/2 16x16", 32, 144, 16, 5, 2),
    ("mobilenet_v3 dw 5x5 96/2 8x8", 32, 96, 8, 5, 2),
]


def probe_dwconvt(r: Runner, rng, shapes=None):
    """Strided depthwise dX (conv-grad-split's ConvTranspose with group = C): onnxruntime's ConvTranspose against
    fracgraph's DepthwiseConvT (nchwc-conv's depthwise-t form)."""
    print("strided depthwise dX: onnxruntime's ConvTranspose vs fracgraph DepthwiseConvT")
    for label, n, c, hw, k, st in shapes or DWCONVT_SHAPES:
        p = k // 2
        ho = (hw + 2 * p - k) // st + 1
        dy = rng.standard_normal((n, c, ho, ho)).astype(np.float32)
        w = rng.standard_normal((c, 1, k, k)).astype(np.float32)
        op = (hw + 2 * p - k) % st
        t = h.make_node("DepthwiseConvT", ["dy", "w"], ["y"], domain=FG, kh=k, kw=k, sh=st, sw=st, ph=p, pw=p, dh=1,
                        dw=1, oh=hw, ow=hw)
        r.compare(f"{label}: N{n}", ("ConvTranspose", _model([h.make_node(
            "ConvTranspose", ["dy", "w"], ["y"], kernel_shape=[k, k], pads=[p] * 4, strides=[st] * 2, group=c,
            output_padding=[op] * 2)], ["dy", "w"], ["y"])),
            [("fracgraph DepthwiseConvT", _model([t], ["dy", "w"], ["y"]), None)], {"dy": dy, "w": w})


def probe_reorder(r: Runner, rng):
    """The NCHWc weight reorder: Reshape + 6-D Transpose + Reshape (onnxruntime) vs NchwcWeight, and an Add over
    the same tensor (what one read and one write cost)."""
    print("NCHWc weight reorder (OIHWBiBo): onnxruntime's Transpose vs fracgraph's NchwcWeight")
    from fracgraph.runtime import nchwc_block_size

    B = nchwc_block_size()
    if B <= 1:
        print("  no NCHWc kernels here")
        return
    for c in (64, 256, 512):
        w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
        ort = _model([h.make_node("Reshape", ["w", "s6"], ["r"]), h.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 4, 5, 3, 1]),
                      h.make_node("Reshape", ["t", "s4"], ["y"])], ["w"], ["y"],
                     [h.make_tensor("s6", T.INT64, [6], [c // B, B, c // B, B, 3, 3]), h.make_tensor("s4", T.INT64, [4], [c, c, 3, 3])])
        own = _model([h.make_node("NchwcWeight", ["w"], ["y"], domain=FG, block=B, blocked_in=1, transpose=0, flip=0)],
                     ["w"], ["y"])
        add = _model([h.make_node("Add", ["w", "w"], ["y"])], ["w"], ["y"])
        r.compare(f"{c}x{c}x3x3", ("Reshape/Transpose/Reshape", ort),
                  [("fracgraph NchwcWeight", own, None), ("(Add of the same tensor)", add, None)], {"w": w})
    # session 11: every weight layout the nchwc-conv pass writes on regnet_x_400mf (forward: plain; the dX conv's:
    # transpose = the group count, flipped) and resnet18's largest, NchwcWeight against an Add over the same tensor
    # (one read and one write: the floor), rep by rep in turn; the layout checked against numpy's
    print("NchwcWeight by layout (regnet_x_400mf's weights, resnet18's largest), interleaved with an Add of the same tensor")
    for name, shape, blocked_in, transpose, flip in REORDER_SHAPES:
        w = rng.standard_normal(shape).astype(np.float32)
        own = _model([h.make_node("NchwcWeight", ["w"], ["y"], domain=FG, block=B, blocked_in=blocked_in,
                                  transpose=transpose, flip=flip)], ["w"], ["y"])
        add = _model([h.make_node("Add", ["w", "w"], ["y"])], ["w"], ["y"])
        (ta, tn), (_, out) = _interleaved(r, [("Add", None, add, {"w": w}), ("NchwcWeight", None, own, {"w": w})])
        ta, tn = 1e3 * statistics.median(ta), 1e3 * statistics.median(tn)
        same = np.array_equal(out, nchwc_weight_reference(w, B, blocked_in, transpose, flip))
        print(f"  {name:42s} Add {ta:6.3f} ms  NchwcWeight {tn:6.3f} ms  x{tn / ta:5.2f}  "
              f"{'layout bitwise equal' if same else 'LAYOUT DIFFERS'}")


REORDER_SHAPES = [   # (label, W's shape, blocked_in, transpose, flip), as the pass writes them for B = 16
    ("regnet stem 32x3x3x3 (OIHWBo)", (32, 3, 3, 3), 0, 0, 0),
    ("regnet 1x1 400x400", (400, 400, 1, 1), 1, 0, 0),
    ("regnet 1x1 400x400, dX (transposed)", (400, 400, 1, 1), 1, 1, 0),
    ("regnet 1x1 400x160", (400, 160, 1, 1), 1, 0, 0),
    ("regnet 1x1 400x160, dX", (400, 160, 1, 1), 1, 1, 0),
    ("regnet grouped 400x16x3x3 (25 groups)", (400, 16, 3, 3), 1, 0, 0),
    ("regnet grouped 400x16x3x3, dX (25 groups, flip)", (400, 16, 3, 3), 1, 25, 1),
    ("regnet grouped 160x16x3x3, dX (10 groups, flip)", (160, 16, 3, 3), 1, 10, 1),
    ("resnet18 512x512x3x3", (512, 512, 3, 3), 1, 0, 0),
    ("resnet18 512x512x3x3, dX (transposed, flip)", (512, 512, 3, 3), 1, 1, 1),
]


def nchwc_weight_reference(w, B, blocked_in, transpose, flip):
    """numpy's NchwcWeight: W' (W with its channel axes swapped within each of `transpose` groups, kernel reversed
    where `flip`) in the OIHWBiBo (blocked_in) or OIHWBo layout, W''s logical shape."""
    g = max(transpose, 1)
    wl = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(0, 2, 1, 3, 4).reshape(
        g * w.shape[1], w.shape[0] // g, *w.shape[2:]) if transpose else w
    wl = wl[:, :, ::-1, ::-1] if flip else wl
    o, c, kh, kw = wl.shape
    if blocked_in:
        return wl.reshape(o // B, B, c // B, B, kh, kw).transpose(0, 2, 4, 5, 3, 1).reshape(o, c, kh, kw)
    return wl.reshape(o // B, B, c, kh, kw).transpose(0, 2, 3, 4, 1).reshape(o, c, kh, kw)


def probe_executor(threads: int, reps: int):
    print("executor: resnet20 FW8/BW8 training step, sequential vs parallel executor")
    import onnxruntime as ort
    from onnxruntime.training import api  # noqa: F401

    import fracgraph.runtime as rt
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.zoo import export

    configs = {"sequential, 1 x %d threads" % threads: (ort.ExecutionMode.ORT_SEQUENTIAL, 1, threads),
               "parallel, 2 x 1 threads": (ort.ExecutionMode.ORT_PARALLEL, 2, 1),
               "parallel, 2 x %d threads" % threads: (ort.ExecutionMode.ORT_PARALLEL, 2, threads)}
    original = rt.session_options
    with tempfile.TemporaryDirectory() as d:
        art = Path(d) / "art"
        build_artifacts(export("resnet20", Path(d) / "r20.onnx"), art, BuildOptions())
        sessions = {}
        for name, (mode, inter, intra) in configs.items():
            def options(threads_=None, profile_prefix=None, tuning=None, mode=mode, inter=inter, intra=intra):
                so = original(intra, profile_prefix, tuning)
                so.execution_mode, so.inter_op_num_threads = mode, inter
                return so
            rt.session_options = options
            try:
                sessions[name] = rt.TrainSession(art, threads=intra, seed=0)
            finally:
                rt.session_options = original
        rng = np.random.default_rng(0)
        x = rng.standard_normal((128, 3, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, 128).astype(np.int64)
        bits = np.full((next(iter(sessions.values())).manifest.n_blocks, 3), 8, np.float32)
        times = {k: [] for k in sessions}
        for i in range(max(3, reps // 4) + 1):       # interleaved, the first round is warm-up
            for k, s in sessions.items():
                t = time.perf_counter()
                s.step(x, y, bits, 0.01)
                if i:
                    times[k].append(time.perf_counter() - t)
        base = statistics.median(next(iter(times.values())))
        for k, ts in times.items():
            print(f"  {k:30s} {1e3 * statistics.median(ts):7.1f} ms  x{statistics.median(ts) / base:.2f}")


def probe_torch(threads: int, reps: int):
    print("torch: where PyTorch's resnet20 FP32 training step spends its time (torch.profiler, ms per step)")
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from fracgraph.zoo import build

    torch.set_num_threads(threads)
    model = build("resnet20", seed=0).train()
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    steps = max(3, reps // 4)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t) / steps
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
    print(f"  step {1e3 * wall:.0f} ms (profiled)")
    for e in rows:
        print(f"  {e.key:40s} {e.self_cpu_time_total / 1e3 / steps:7.1f} ms")


def _interleaved(r: Runner, rows):
    """rows of (name, int path or None, model, feeds), run rep by rep in turn (each under its FRACGRAPH_INT_ISA):
    each row's times of r.reps runs after a first, untimed one, and that first run's output."""
    sessions = [r.session(m) for _, _, m, _ in rows]
    times, outs = [[] for _ in rows], []
    clock = time.process_time if r.cpu_time else time.perf_counter
    for rep in range(r.reps + 1):
        for i, ((_, path, _, f), sess) in enumerate(zip(rows, sessions)):
            if path:
                os.environ["FRACGRAPH_INT_ISA"] = path
            t0 = clock()
            out = sess.run(None, f)[0]
            if rep:
                times[i].append(clock() - t0)
            else:
                outs.append(out)
    return times, outs


def probe_intconv(r: Runner, rng):
    print("intconv: quantized conv forward, FP32 Conv vs NCHWc vs IntConv per path vs ConvInteger (8 bits)")
    import ctypes

    from fracgraph import kernels
    from fracgraph.runtime import nchwc_block_size

    lib = ctypes.CDLL(str(kernels.library_path()))
    paths = [p for p, i in (("amx", 3), ("vnni", 2), ("avx2", 1), ("scalar", 0)) if p in INT_PATHS and lib.fg_int_isa_available(i)]
    B = nchwc_block_size()
    saved = os.environ.get("FRACGRAPH_INT_ISA")
    for n, c, hw, o, k, stride in [(n, c, s, c, 3, 1) for n, c, s in SHAPES] + [(128, 16, 32, 32, 3, 2),
                                                                              (128, 32, 16, 64, 1, 2)] + [
            (128, 3, 32, 16, 3, 1), (32, 3, 64, 64, 7, 2), (32, 3, 64, 32, 3, 2)]:   # stems: resnet20, resnet18, effnet
        pad = k // 2
        x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
        w = (rng.standard_normal((o, c, k, k)) * 0.1).astype(np.float32)
        mx, sx = x.min(), np.float32((x.max() - x.min()) / 255)
        xq = (np.round((x - mx) / sx) * sx + mx).astype(np.float32)
        mw, Mw = w.min(axis=(1, 2, 3), keepdims=True), w.max(axis=(1, 2, 3), keepdims=True)
        sw = ((Mw - mw) / 255).astype(np.float32)
        wq = (np.round((w - mw) / sw) * sw + mw).astype(np.float32)
        feeds = {"x": xq, "w": wq}
        attrs = dict(pads=[pad] * 4, strides=[stride, stride])
        plain = _model([h.make_node("Conv", ["x", "w"], ["y"], **attrs)], ["x", "w"], ["y"])
        rows = [("Conv FP32", None, plain, feeds)]
        if B > 1 and (c % B == 0 or c < B) and o % B == 0:   # c < B: OIHWBo on the NCHW input (a stem)
            nodes = [h.make_node("ReorderInput", ["x"], ["xc"], domain="com.microsoft.nchwc")] if c >= B else [
                h.make_node("Identity", ["x"], ["xc"])]
            nodes += [h.make_node("NchwcWeight", ["w"], ["wb"], domain=FG, block=B, blocked_in=int(c >= B), transpose=0,
                                  flip=0),
                     h.make_node("Conv", ["xc", "wb"], ["yc"], domain="com.microsoft.nchwc", kernel_shape=[k, k], **attrs),
                     h.make_node("ReorderOutput", ["yc"], ["y"], domain="com.microsoft.nchwc", channels=o)]
            rows.append(("NCHWc FP32 (reorders included)", None, _model(nodes, ["x", "w"], ["y"]), feeds))
        ic = _model([h.make_node("IntConv", ["x", "mx", "sx", "w", "mw", "sw"], ["y"], domain=FG, kh=k, kw=k, sh=stride,
                                 sw=stride, ph=pad, pw=pad, dh=1, dw=1)], ["x", "mx", "sx", "w", "mw", "sw"], ["y"])
        ifeeds = {"x": xq, "mx": np.asarray(mx, np.float32), "sx": np.asarray(sx), "w": wq,
                  "mw": mw.astype(np.float32), "sw": sw}
        rows += [(f"IntConv {p}", p, ic, ifeeds) for p in paths]
        ci = h.make_model(h.make_graph([h.make_node("ConvInteger", ["x", "w"], ["y"], **attrs)], "probe",
                                       [h.make_tensor_value_info("x", T.UINT8, None), h.make_tensor_value_info("w", T.UINT8, None)],
                                       [h.make_tensor_value_info("y", T.INT32, None)]), opset_imports=OPS)
        ci.ir_version = 8
        codes = {"x": np.round((x - mx) / sx).astype(np.uint8), "w": np.round((w - mw) / sw).astype(np.uint8)}
        rows.append(("ConvInteger u8 (no corrections)", None, ci, codes))
        # interleaved: one run of each per round, so that a change in the machine's load hits all alike
        times, outs = _interleaved(r, rows)
        tb = 1e3 * statistics.median(times[0])
        what = "CPU ms" if r.cpu_time else "ms"
        print(f"  {n}x{c}x{hw}x{hw} -> {o}, {k}x{k} stride {stride}: Conv {tb:.2f} {what}")
        for (name, _, _, _), ts, out in zip(rows[1:], times[1:], outs[1:]):
            tc = 1e3 * statistics.median(ts)
            agree = ""
            if out.dtype == np.float32:
                diff = float(np.max(np.abs(out.astype(np.float64) - outs[0])) / max(float(np.max(np.abs(outs[0]))), 1e-30))
                agree = f"max rel diff {diff:.1e}"
            print(f"    {name:34s} {tc:7.2f} {what}  x{tc / tb:5.2f}  {agree}")
        if saved is None:
            os.environ.pop("FRACGRAPH_INT_ISA", None)
        else:
            os.environ["FRACGRAPH_INT_ISA"] = saved


# resnet20's weight-gradient shapes at batch 128: (label, N, Ci, H, Co, k, stride); the 3x3 stride-1 stages, the
# stride-2 entries of stages 2 and 3, their 1x1 stride-2 shortcuts and the 3-channel stem
INTDW_SHAPES = [("stem 3->16 3x3", 128, 3, 32, 16, 3, 1), ("16 3x3", 128, 16, 32, 16, 3, 1),
                ("32 3x3", 128, 32, 16, 32, 3, 1), ("64 3x3", 128, 64, 8, 64, 3, 1),
                ("16->32 3x3/2", 128, 16, 32, 32, 3, 2), ("32->64 3x3/2", 128, 32, 16, 64, 3, 2),
                ("16->32 1x1/2", 128, 16, 32, 32, 1, 2), ("32->64 1x1/2", 128, 32, 16, 64, 1, 2),
                # resnet18 at 64x64, batch 32: its 3x3 stages (16x16 .. 2x2 maps; int-gemm declines maps under 8x8)
                ("r18 64 3x3 16x16", 32, 64, 16, 64, 3, 1), ("r18 128 3x3 8x8", 32, 128, 8, 128, 3, 1),
                ("r18 256 3x3 4x4", 32, 256, 4, 256, 3, 1), ("r18 512 3x3 2x2", 32, 512, 2, 512, 3, 1)]


def probe_intdw(r: Runner, rng):
    """IntConvGradW per integer path against the float form passes/conv_grad_w.py picks for the shape (and
    onnxruntime's ConvGrad), on 8-bit fake-quantized operands (the error with stochastic rounding), runs
    interleaved rep by rep; each output's max difference from the float64 weight gradient, relative to its max."""
    print("intdw: conv weight gradient, the float form conv-grad-w picks vs IntConvGradW per path (8 bits)")
    from fracgraph import kernels
    from fracgraph.passes.conv_grad_w import ConvShape, _has_avx512, choose

    paths = [p for p in ("amx", "vnni", "avx2", "scalar") if p in INT_PATHS and kernels.int_path_available(p)]
    saved = os.environ.get("FRACGRAPH_INT_ISA")
    what = "CPU ms" if r.cpu_time else "ms"
    for label, n, ci, hw, co, k, s in INTDW_SHAPES:
        if DW_MATCH and not any(m in label for m in DW_MATCH):
            continue
        p = k // 2
        ho = (hw + 2 * p - k) // s + 1
        x = np.maximum(rng.standard_normal((n, ci, hw, hw)), 0).astype(np.float32)
        mx, sx = np.float32(0), np.float32(x.max() / 255)
        xq = (np.round(x / sx) * sx).astype(np.float32)
        g = (rng.standard_normal((n, co, ho, ho)) * 1e-3).astype(np.float32)
        mg, sg = np.float32(g.min()), np.float32((g.max() - g.min()) / 255)
        gq = (np.round(np.clip((g - mg) / sg + rng.random(g.shape, dtype=np.float32) - 0.5, 0, 255)) * sg + mg).astype(np.float32)
        cs = ConvShape(ci=ci, h=hw, w=hw, co=co, kh=k, kw=k, sh=s, sw=s, ph=p, pw=p, ph_end=p, pw_end=p, dh=1, dw=1,
                       group=1, bias=False)
        form = choose(cs, _has_avx512())[0]
        cands = dict(dw_candidates(n, ci, hw, co, k, s, 1))
        pick = {"ConvGradW": "fracgraph ConvGradW", "im2col-gemm": "ConvGradWCols + MatMul"}.get(form, "ConvGrad (dW only)")
        rows = [(f"{form} (conv-grad-w's pick)", None, cands[pick], {"dy": gq, "x": xq} if pick != "ConvGrad (dW only)"
                 else {"dy": gq, "x": xq, "w": np.zeros((co, ci, k, k), np.float32)})]
        if pick != "ConvGrad (dW only)":
            rows.append(("ConvGrad (dW only)", None, cands["ConvGrad (dW only)"],
                         {"dy": gq, "x": xq, "w": np.zeros((co, ci, k, k), np.float32)}))
        idw = _model([h.make_node("IntConvGradW", ["dy", "gm", "gs", "x", "xm", "xs"], ["dw"], domain=FG, kh=k, kw=k,
                                  sh=s, sw=s, ph=p, pw=p, dh=1, dw=1)], ["dy", "gm", "gs", "x", "xm", "xs"], ["dw"])
        ifeeds = {"dy": gq, "gm": np.asarray(mg), "gs": np.asarray(sg), "x": xq, "xm": np.asarray(mx), "xs": np.asarray(sx)}
        rows += [(f"IntConvGradW {q}", q, idw, ifeeds) for q in paths]
        import torch

        ref = torch.nn.grad.conv2d_weight(torch.from_numpy(xq).double(), (co, ci, k, k), torch.from_numpy(gq).double(),
                                          stride=s, padding=p).numpy()
        times, outs = _interleaved(r, rows)
        tb = 1e3 * statistics.median(times[0])
        print(f"  {label}: N{n} Ci{ci} {hw}x{hw} -> Co{co} {k}x{k}/{s}")
        for (name, _, _, _), ts, out in zip(rows, times, outs):
            tc = 1e3 * statistics.median(ts)
            diff = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
            print(f"    {name:34s} {tc:8.2f} {what}  x{tc / tb:5.2f}  max rel diff from float64 {diff:.1e}")
        if saved is None:
            os.environ.pop("FRACGRAPH_INT_ISA", None)
        else:
            os.environ["FRACGRAPH_INT_ISA"] = saved


# a linear layer's GEMM shapes (label, rows M, K in, N out): vit_tiny at batch 32 (17 tokens, width 192, MLP 768)
# and the zoo GPT at batch 32 (context 64, width 128, MLP 512)
INTMM_SHAPES = [("vit_tiny qkv", 544, 192, 576), ("vit_tiny proj", 544, 192, 192), ("vit_tiny fc1", 544, 192, 768),
                ("vit_tiny fc2", 544, 768, 192), ("gpt q/k/v/proj", 2048, 128, 128), ("gpt fc", 2048, 128, 512),
                ("gpt fc_proj", 2048, 512, 128)]


def probe_intmatmul(r: Runner, rng):
    """A quantized linear layer's forward (a @ w, w per column) and weight gradient (a^T @ dY, both per tensor, dY
    stochastically rounded) on 8-bit fake-quantized operands: onnxruntime's float MatMul / MatMul_Grad Gemm (MLAS)
    vs fracgraph's IntMatMul / IntMatMulGradW per integer path (and the forward's older form, IntCodes +
    MatMulInteger + IntMatMulRescale), and the same forward in Gemm form (Gemm(a, w^T, bias, transB=1), torchvision's
    export) vs IntGemm, interleaved rep by rep; each output's max difference from float64."""
    print("intmatmul: linear layers' forward and weight-gradient GEMMs, float MLAS vs IntMatMul/IntMatMulGradW (8 bits)")
    from fracgraph import kernels

    paths = [p for p in ("amx", "vnni", "avx2", "scalar") if p in INT_PATHS and kernels.int_path_available(p)]
    saved = os.environ.get("FRACGRAPH_INT_ISA")
    what = "CPU ms" if r.cpu_time else "ms"
    names = ["a", "am", "as", "b", "bm", "bs"]
    for label, m, k, n in INTMM_SHAPES:
        if DW_MATCH and not any(t in label for t in DW_MATCH):
            continue
        a = rng.standard_normal((m, k)).astype(np.float32)
        am, as_ = np.float32(a.min()), np.float32((a.max() - a.min()) / 255)
        aq = (np.round((a - am) / as_) * as_ + am).astype(np.float32)
        w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
        wm = w.min(axis=0).astype(np.float32)
        ws = ((w.max(axis=0) - wm) / 255).astype(np.float32)
        wq = (np.round((w - wm) / ws) * ws + wm).astype(np.float32)
        g = (rng.standard_normal((m, n)) * 1e-3).astype(np.float32)
        gm, gs = np.float32(g.min()), np.float32((g.max() - g.min()) / 255)
        gq = (np.round(np.clip((g - gm) / gs + rng.random(g.shape, dtype=np.float32) - 0.5, 0, 255)) * gs + gm).astype(np.float32)
        fw_feeds = dict(zip(names, [aq, np.asarray(am), np.asarray(as_), wq, wm, ws]))
        # the Gemm form of the same layer (torchvision's exports): w^T [N, K] per row, a bias of N values
        wt, bias = np.ascontiguousarray(wq.T), (rng.standard_normal(n) * 0.1).astype(np.float32)
        gnames = names + ["c"]
        gemm_feeds = dict(zip(gnames, [aq, np.asarray(am), np.asarray(as_), wt, wm, ws, bias]))
        dw_feeds = dict(zip(names, [aq, np.asarray(am), np.asarray(as_), gq, np.asarray(gm), np.asarray(gs)]))
        old = [h.make_node("IntCodesU8", ["a", "am", "as"], ["qa"], domain=FG),
               h.make_node("IntCodesS8", ["b", "bm", "bs"], ["qb"], domain=FG),
               h.make_node("MatMulInteger", ["qa", "qb"], ["acc"]),
               h.make_node("IntMatMulRescale", ["acc", "qa", "qb", "am", "as", "bm", "bs"], ["y"], domain=FG)]
        for kind, ref, rows in [
            ("forward", aq.astype(np.float64) @ wq.astype(np.float64),
             [("MatMul FP32 (MLAS)", None, _model([h.make_node("MatMul", ["a", "b"], ["y"])], ["a", "b"], ["y"]),
               {"a": aq, "b": wq})]
             + [(f"IntMatMul {q}", q, _model([h.make_node("IntMatMul", names, ["y"], domain=FG)], names, ["y"]), fw_feeds)
                for q in paths]
             + [("IntCodes + MatMulInteger + rescale", None, _model(old, names, ["y"]), fw_feeds)]),
            ("Gemm transB forward", aq.astype(np.float64) @ wq.astype(np.float64) + bias.astype(np.float64),
             [("Gemm transB + bias FP32 (MLAS)", None,
               _model([h.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1)], ["a", "b", "c"], ["y"]),
               {"a": aq, "b": wt, "c": bias})]
             + [(f"IntGemm {q}", q, _model([h.make_node("IntGemm", gnames, ["y"], domain=FG, trans_b=1)], gnames, ["y"]),
                 gemm_feeds) for q in paths]),
            ("weight grad", aq.astype(np.float64).T @ gq.astype(np.float64),
             [("Gemm transA FP32 (MLAS)", None,
               _model([h.make_node("Gemm", ["a", "b"], ["y"], transA=1)], ["a", "b"], ["y"]), {"a": aq, "b": gq})]
             + [(f"IntMatMulGradW {q}", q, _model([h.make_node("IntMatMulGradW", names, ["y"], domain=FG)], names, ["y"]),
                 dw_feeds) for q in paths])]:
            times, outs = _interleaved(r, rows)
            tb = 1e3 * statistics.median(times[0])
            print(f"  {label} {kind}: [{m}, {k}] x [{k}, {n}]" if kind == "forward" else
                  f"  {label} {kind}: [{m}, {k}] x [{n}, {k}]^T + bias" if kind.startswith("Gemm") else
                  f"  {label} {kind}: [{m}, {k}]^T x [{m}, {n}]")
            for (name, _, _, _), ts, out in zip(rows, times, outs):
                tc = 1e3 * statistics.median(ts)
                diff = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
                print(f"    {name:36s} {tc:8.3f} {what}  x{tc / tb:5.2f}  max rel diff from float64 {diff:.1e}")
    if saved is None:
        os.environ.pop("FRACGRAPH_INT_ISA", None)
    else:
        os.environ["FRACGRAPH_INT_ISA"] = saved


GELU_SHAPES = [("convnext_atto stage 1 MLP, batch 32, 64x64", (32, 160, 16, 16)),
               ("convnext_atto stage 3 MLP", (32, 1280, 2, 2)), ("GPT MLP, batch 12, T 64, width 128", (12, 64, 512))]


def probe_gelu(r: Runner, rng):
    """onnxruntime's GeluGrad, fracgraph's GeluGrad and PyTorch's gelu backward on the same tensors, interleaved."""
    import torch
    from scipy.special import erfc

    torch.set_num_threads(r.threads)
    print("gelu: dX = dY * (Phi(X) + X phi(X)); ms per call, median; error = max |dX - float64| / max |float64|")
    ops = {"onnxruntime GeluGrad": "com.microsoft", "fracgraph GeluGrad": FG}
    sessions = {k: r.session(_model([h.make_node("GeluGrad", ["dy", "x"], ["dx"], domain=d)], ["dy", "x"], ["dx"]))
                for k, d in ops.items()}
    for title, shape in GELU_SHAPES:
        x = (rng.standard_normal(shape) * 1.5).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
        feeds = {"dy": dy, "x": x}
        calls = {k: (lambda s=s: s.run(None, feeds)[0]) for k, s in sessions.items()}
        calls["PyTorch gelu_backward"] = lambda: torch.ops.aten.gelu_backward(tdy, tx).numpy()
        names = list(calls)
        outs = {k: f() for k, f in calls.items()}
        ts = {k: [] for k in names}
        for rep in range(r.reps):
            for k in names[rep % 3:] + names[: rep % 3]:
                t = time.perf_counter()
                calls[k]()
                ts[k].append(time.perf_counter() - t)
        xd = x.astype(np.float64)
        ref = dy * (0.5 * erfc(-xd / np.sqrt(2)) + xd * np.exp(-xd * xd / 2) / np.sqrt(2 * np.pi))
        base = statistics.median(ts[names[0]])
        print(f"  {title} {'x'.join(map(str, shape))}:")
        for k in names:
            err = float(np.max(np.abs(outs[k] - ref)) / np.max(np.abs(ref)))
            tk = statistics.median(ts[k])
            print(f"    {k:24s} {1e3 * tk:7.3f} ms  x{tk / base:5.2f}  error {err:.1e}")


# max pools with their indices (label, X shape, kernel, stride, pad, ceil_mode, count in the model): googlenet's
# 13 pools (torchvision, batch 32, 64x64 inputs: stem/stage pools 3x3/2 and 2x2/2 ceil, inception branch pools
# 3x3/1 pad 1 ceil; 4b-4d's three 512-channel ones as one row counted 3 times), squeezenet's and resnet18's
POOL_SHAPES = [("googlenet maxpool1 3x3/2 ceil", (32, 64, 32, 32), 3, 2, 0, 1, 1),
               ("googlenet maxpool2 3x3/2 ceil", (32, 192, 16, 16), 3, 2, 0, 1, 1),
               ("googlenet 3a pool 3x3/1 pad 1", (32, 192, 8, 8), 3, 1, 1, 1, 1),
               ("googlenet 3b pool 3x3/1 pad 1", (32, 256, 8, 8), 3, 1, 1, 1, 1),
               ("googlenet maxpool3 3x3/2 ceil", (32, 480, 8, 8), 3, 2, 0, 1, 1),
               ("googlenet 4a pool 3x3/1 pad 1", (32, 480, 4, 4), 3, 1, 1, 1, 1),
               ("googlenet 4b-4d pool 3x3/1 pad 1", (32, 512, 4, 4), 3, 1, 1, 1, 3),
               ("googlenet 4e pool 3x3/1 pad 1", (32, 528, 4, 4), 3, 1, 1, 1, 1),
               ("googlenet maxpool4 2x2/2 ceil", (32, 832, 4, 4), 2, 2, 0, 1, 1),
               ("googlenet 5a/5b pool 3x3/1 pad 1", (32, 832, 2, 2), 3, 1, 1, 1, 2),
               ("squeezenet 3x3/2 ceil", (32, 64, 31, 31), 3, 2, 0, 1, 1),
               ("resnet18 stem 3x3/2 pad 1", (32, 64, 32, 32), 3, 2, 1, 0, 1)]
POOL_BASELINE: list[str] = []   # --baseline: a checkout whose kernel library is timed as "today's" MaxPoolIdx


def _baseline_library(checkout: str) -> str:
    """The kernel library of another checkout (built by its own venv's fracgraph, in its cache): its path."""
    import subprocess

    py = Path(checkout) / ".venv" / "bin" / "python"
    r = subprocess.run([str(py), "-c", "from fracgraph import kernels; print(kernels.library_path())"],
                       capture_output=True, text=True, cwd=checkout)
    if r.returncode:
        raise SystemExit(f"--baseline {checkout}: cannot build its kernel library ({r.stderr.strip()[-200:]})")
    return r.stdout.strip().splitlines()[-1]


def probe_pool(r: Runner, rng):
    """MaxPool with its Indices output (the training graph's form): onnxruntime's 2-output MaxPool, its 1-output
    MaxPool (no indices: MLAS's pool, a floor), --baseline's MaxPoolIdx (today's) and this tree's, run in turn rep
    by rep; the gradient: onnxruntime's MaxPoolGrad vs --baseline's and this tree's MaxPoolIdxGrad on those indices.
    Values and indices compared bitwise with onnxruntime's; the per-model total weights each row by its count."""
    import onnxruntime as ort

    from fracgraph import kernels

    libs = [("MaxPoolIdx", str(kernels.library_path()))]
    if POOL_BASELINE:
        libs.insert(0, ("MaxPoolIdx (baseline)", _baseline_library(POOL_BASELINE[0])))

    def sess(model, lib=None):
        so = ort.SessionOptions()
        so.intra_op_num_threads = r.threads
        if r.cpu_time:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        if lib:
            so.register_custom_ops_library(lib)
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def interleave(rows, feeds):
        """rows of (name, session, feeds or None): r.reps timed runs each after an untimed one, in turn"""
        clock = time.process_time if r.cpu_time else time.perf_counter
        times, outs = [[] for _ in rows], []
        for rep in range(r.reps + 1):
            for i, (_, se, f) in enumerate(rows):
                t0 = clock()
                out = se.run(None, f or feeds)
                if rep:
                    times[i].append(clock() - t0)
                else:
                    outs.append(out)
        return [1e3 * statistics.median(t) for t in times], outs

    print(f"max pool with indices, and its gradient ({'CPU' if r.cpu_time else 'wall'} ms, median of {r.reps}, "
          f"interleaved): onnxruntime vs fracgraph")
    totals: dict[str, float] = {}
    for label, shape, k, st, p, ceil, count in POOL_SHAPES:
        x = rng.standard_normal(shape).astype(np.float32)
        attrs = dict(kernel_shape=[k, k], strides=[st, st], pads=[p] * 4, ceil_mode=ceil)
        ours = dict(kh=k, kw=k, sh=st, sw=st, ph=p, pw=p, dh=1, dw=1, ph_end=p, pw_end=p, ceil_mode=ceil)
        base = _model([h.make_node("MaxPool", ["x"], ["y", "i"], **attrs)], ["x"], ["y", "i"])
        base.graph.output[1].type.tensor_type.elem_type = T.INT64
        plain = _model([h.make_node("MaxPool", ["x"], ["y"], **attrs)], ["x"], ["y"])
        fg = _model([h.make_node("MaxPoolIdx", ["x"], ["y", "i"], domain=FG, **ours)], ["x"], ["y", "i"])
        fg.graph.output[1].type.tensor_type.elem_type = T.INT64
        rows = [("MaxPool (indices)", sess(base), None), ("MaxPool (no indices)", sess(plain), None)]
        rows += [(name, sess(fg, lib), None) for name, lib in libs]
        ts, outs = interleave(rows, {"x": x})
        y, idx = outs[0]
        print(f"  {label}: {shape}, x{count}")
        for (name, _, _), t, o in zip(rows, ts, outs):
            same = np.array_equal(o[0], y) and (len(o) < 2 or np.array_equal(o[1], idx))
            print(f"    forward  {name:24s} {t:7.3f} ms  x{t / ts[0]:5.2f}  {'bitwise equal' if same else 'DIFFERS'}")
            totals["forward " + name] = totals.get("forward " + name, 0.0) + count * t * (label.startswith("googlenet"))
        dy = rng.standard_normal(y.shape).astype(np.float32)
        grad = _model([h.make_node("MaxPoolGrad", ["dy", "i"], ["dx"], **attrs)], ["dy", "i"], ["dx"])
        grad.graph.input[1].type.tensor_type.elem_type = T.INT64
        grad.graph.value_info.append(h.make_tensor_value_info("dx", T.FLOAT, list(shape)))
        grad.graph.output[0].type.tensor_type.shape.CopyFrom(h.make_tensor_value_info("dx", T.FLOAT, list(shape)).type.tensor_type.shape)
        fgrad = _model([h.make_node("MaxPoolIdxGrad", ["dy", "i", "s"], ["dx"], domain=FG)], ["dy", "i", "s"], ["dx"])
        fgrad.graph.input[1].type.tensor_type.elem_type = T.INT64
        fgrad.graph.input[2].type.tensor_type.elem_type = T.INT64
        ffeeds = {"dy": dy, "i": idx, "s": np.asarray(shape, np.int64)}
        rows = [("MaxPoolGrad", sess(grad), None)] + [(name + "Grad", sess(fgrad, lib), ffeeds) for name, lib in libs]
        ts, outs = interleave(rows, {"dy": dy, "i": idx})
        for (name, _, _), t, o in zip(rows, ts, outs):
            same = np.array_equal(o[0], outs[0][0])
            print(f"    gradient {name:24s} {t:7.3f} ms  x{t / ts[0]:5.2f}  {'bitwise equal' if same else 'DIFFERS'}")
            totals["gradient " + name] = totals.get("gradient " + name, 0.0) + count * t * (label.startswith("googlenet"))
    print("  googlenet's 13 pools, each row times its count:")
    for name, t in totals.items():
        print(f"    {name:34s} {t:8.3f} ms")


# the ViTs' Transposes at batch 32 (label, X shape, perm): vit_tiny (timm: qkv split, K transposed, heads merged,
# and their gradients) and vit_tv (nn.MultiheadAttention's sequence-first layout and head reshapes), from their
# training graphs (bench/model_speed.py's exports)
TRANSPOSE_SHAPES = [("vit_tiny qkv split", (32, 17, 3, 3, 64), (2, 0, 3, 1, 4)),
                    ("vit_tiny qkv split grad", (3, 32, 3, 17, 64), (1, 3, 0, 2, 4)),
                    ("vit_tiny K^T", (32, 3, 17, 64), (0, 1, 3, 2)),
                    ("vit_tiny heads merge", (32, 3, 17, 64), (0, 2, 1, 3)),
                    ("vit_tv seq-first", (65, 32, 128), (1, 0, 2)),
                    ("vit_tv qkv", (1, 65, 32, 3, 128), (3, 1, 2, 0, 4)),
                    ("vit_tv heads", (65, 128, 32), (1, 0, 2)),
                    ("vit_tv heads merge", (32, 4, 65, 32), (2, 0, 1, 3)),
                    ("vit_tv K^T grad", (32, 4, 32, 65), (0, 1, 3, 2))]


def probe_transpose(r: Runner, rng):
    """onnxruntime's Transpose vs fracgraph's Permute (passes/permute.py) on the ViTs' shapes, timed in turn on
    each rep (rotating order), outputs compared bitwise; a numpy copy of the same tensor (one thread) as the floor."""
    from fracgraph.passes.permute import perm_code

    what = "CPU ms" if r.cpu_time else "ms"
    print(f"transpose: onnxruntime Transpose vs fracgraph Permute, {what} per call, median")
    for label, shape, perm in TRANSPOSE_SHAPES:
        x = rng.standard_normal(shape).astype(np.float32)
        sessions = {"onnxruntime Transpose": r.session(_model([h.make_node("Transpose", ["x"], ["y"], perm=list(perm))],
                                                              ["x"], ["y"])),
                    "fracgraph Permute": r.session(_model([h.make_node("Permute", ["x"], ["y"], domain=FG,
                                                                       perm_code=perm_code(perm), rank=len(perm))],
                                                          ["x"], ["y"]))}
        out = np.empty_like(x)
        calls = {k: (lambda s=s: s.run(None, {"x": x})[0]) for k, s in sessions.items()}
        calls["numpy copy (floor)"] = lambda: np.copyto(out, x)
        names = list(calls)
        outs = {k: calls[k]() for k in names[:2]}
        clock = time.process_time if r.cpu_time else time.perf_counter
        ts = {k: [] for k in names}
        for rep in range(r.reps):
            for k in names[rep % 3:] + names[: rep % 3]:
                t = clock()
                calls[k]()
                ts[k].append(clock() - t)
        same = outs[names[0]].tobytes() == outs[names[1]].tobytes() and outs[names[0]].shape == outs[names[1]].shape
        base = statistics.median(ts[names[0]])
        print(f"  {label} {'x'.join(map(str, shape))} perm {list(perm)}: {'bitwise equal' if same else 'DIFFERENT'}")
        for k in names:
            tk = statistics.median(ts[k])
            print(f"    {k:24s} {1e3 * tk:7.3f} {what}  x{tk / base:5.2f}")


# the per-node cost of an If against a plain node: (label, tensor shape) run through IF_CHAIN nodes
IF_SHAPES = [("scalar", (1,)), ("mobilevit-sized activation", (32, 64, 8, 8)), ("token activation", (32, 17, 192))]
IF_CHAIN = 100


def probe_ifcost(r: Runner, rng):
    """What an If costs onnxruntime per call beyond its branch: a chain of IF_CHAIN Adds against the same Adds each
    inside If(cond) (else: Sub), cond a bool input (true), and against IF_CHAIN Adds in one If; run in turn rep by
    rep. (mobilevit_xxs's training graph runs 289 Ifs per step: int-gemm's integer/float switches.)"""
    print(f"If overhead: {IF_CHAIN} chained Adds, plain vs each in its own If vs all in one If "
          f"({'CPU' if r.cpu_time else 'wall'} ms, median of {r.reps}, interleaved)")
    for label, shape in IF_SHAPES:
        x = rng.standard_normal(shape).astype(np.float32)
        c = h.make_tensor("c", T.FLOAT, [], [0.5])
        plain = _model([h.make_node("Add", [f"t{i}", "c"], [f"t{i + 1}"]) for i in range(IF_CHAIN)], ["t0"],
                       [f"t{IF_CHAIN}"], [c])
        nodes = []
        for i in range(IF_CHAIN):
            br = [h.make_graph([h.make_node(op, [f"t{i}", "c"], [f"b{i}{op}"])], f"g{i}{op}", [], [_vi(f"b{i}{op}")])
                  for op in ("Add", "Sub")]
            nodes.append(h.make_node("If", ["cond"], [f"t{i + 1}"], then_branch=br[0], else_branch=br[1]))
        each = _model(nodes, ["t0"], [f"t{IF_CHAIN}"], [c])
        each.graph.input.append(h.make_tensor_value_info("cond", T.BOOL, []))
        body = [h.make_node("Add", [f"t{i}", "c"], [f"t{i + 1}"]) for i in range(IF_CHAIN)]
        one = _model([h.make_node("If", ["cond"], [f"t{IF_CHAIN}"],
                                  then_branch=h.make_graph(body, "then", [], [_vi(f"t{IF_CHAIN}")]),
                                  else_branch=h.make_graph([h.make_node("Sub", ["t0", "c"], ["e"])], "else", [], [_vi("e")]))],
                     ["t0"], [f"t{IF_CHAIN}"], [c])
        one.graph.input.append(h.make_tensor_value_info("cond", T.BOOL, []))
        f = {"t0": x}
        fc = {"t0": x, "cond": np.array(True)}
        rows = [("plain Adds", None, plain, f), ("each Add in an If", None, each, fc), ("all Adds in one If", None, one, fc)]
        times, outs = _interleaved(r, rows)
        ts = [1e3 * statistics.median(t) for t in times]
        assert all(np.array_equal(o, outs[0]) for o in outs)
        print(f"  {label} {shape}: " + ", ".join(f"{n} {t:.3f} ms" for (n, *_), t in zip(rows, ts))
              + f"; per If {1e3 * (ts[1] - ts[0]) / IF_CHAIN:.1f} us, per plain Add {1e3 * ts[0] / IF_CHAIN:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", default="nchwc,relu,qdq,noise,sr,bn,dw,executor,torch")
    ap.add_argument("--cpu-time", action="store_true", help="time by the process' CPU time, threads not "
                                                              "spinning (a shared machine's load moves it far less)")
    ap.add_argument("--match", default="", help="dwshapes/forms: only the shapes whose label contains one of these "
                                                "comma-separated strings (e.g. 'densenet 1x1,convnext dw')")
    ap.add_argument("--baseline", default="", help="pool: a checkout (with its .venv) whose MaxPoolIdx is timed "
                                                    "in turn with this tree's (e.g. /work/wt/base11)")
    ap.add_argument("--int-paths", default="amx,vnni,avx2,scalar", help="intconv/intdw: the integer paths to time "
                                                                         "(those this CPU's build lacks are left out)")
    a = ap.parse_args()
    INT_PATHS[:] = [p for p in a.int_paths.split(",") if p]
    POOL_BASELINE[:] = [a.baseline] if a.baseline else []
    if a.match:
        keys = [m for m in a.match.split(",") if m]
        DW_MATCH[:] = keys
        DW_SHAPES[:] = [s for s in DW_SHAPES if any(m in s[0] for m in keys)]
        FORM_SHAPES[:] = [s for s in FORM_SHAPES if any(m in s[0] for m in keys)]
        DWCONV_SHAPES[:] = [s for s in DWCONV_SHAPES if any(m in s[0] for m in keys)]
    r = Runner(a.threads, a.reps, a.cpu_time)
    rng = np.random.default_rng(0)
    probes = {"nchwc": probe_nchwc, "relu": probe_relu, "qdq": probe_qdq, "noise": probe_noise, "sr": probe_sr,
              "bn": probe_bn, "dw": probe_dw, "dwshapes": probe_dwshapes,
              "fwshapes": probe_fwshapes, "reorder": probe_reorder, "dwconv": probe_dwconv, "forms": probe_forms,
              "intconv": probe_intconv, "intdw": probe_intdw, "intmatmul": probe_intmatmul, "gelu": probe_gelu,
              "pool": probe_pool, "ifcost": probe_ifcost, "transpose": probe_transpose, "bnrelu": probe_bnrelu,
              "bnconcat": probe_bnconcat,
              "dwconvt": probe_dwconvt}
    print(f"{a.threads} threads, median of {a.reps} runs per kernel")
    for name in a.only.split(","):
        if name == "executor":
            probe_executor(a.threads, a.reps)
        elif name == "torch":
            probe_torch(a.threads, a.reps)
        else:
            probes[name](r, rng)


if __name__ == "__main__":
    main()
