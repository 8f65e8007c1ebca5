"""The bn-relu pass (fracgraph/passes/bn_relu.py) and its kernels: BatchNormTrainFused, BatchNormGradRange and
ReluGradSum against the unfused chains they replace (onnxruntime's Add, Relu and Sum with fracgraph's
BatchNormTrain, BatchNormGrad, ReluGrad and MinMax), bitwise; and a residual net's training step with the pass on
and off, bitwise (the same float operations in the same order), at quantized bits and at FP32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
from onnx import TensorProto, helper  # noqa: E402
from torch import nn  # noqa: E402

from fracgraph import kernels  # noqa: E402

from test_speed_passes import _step, build_pair  # noqa: E402

D = kernels.DOMAIN


def _session(nodes, inputs, outputs, threads, initializers=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(D, 1)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    kernels.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _same(a, b):
    """Bitwise up to the sign of zero (the fused ReLU writes +0 where onnxruntime's may pass -0)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a, b), f"max difference {np.abs(a.astype(np.float64) - b).max():.3e}"


def _bn_inputs(shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    return dict(x=x, scale=(np.abs(rng.standard_normal(c)) + 0.1).astype(np.float32), b=rng.standard_normal(c).astype(np.float32),
                rm=rng.standard_normal(c).astype(np.float32), rv=(rng.random(c) + 0.5).astype(np.float32),
                r=rng.standard_normal(shape).astype(np.float32), dy=rng.standard_normal(shape).astype(np.float32),
                dy2=rng.standard_normal(shape).astype(np.float32))


SHAPES = [(7, 5), (3, 4, 37), (9, 16, 6, 7), (2, 1, 5, 5), (4, 3, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [0, 1])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_is_the_unfused_chain(shape, relu, residual, threads):
    v = _bn_inputs(shape, 1)
    bn = dict(epsilon=1e-5, momentum=0.9)
    stats = ["rm2", "rv2", "mean", "inv_std"]
    chain = [helper.make_node("BatchNormTrain", ["x", "scale", "b", "rm", "rv"], ["y0", *stats], domain=D, **bn)]
    last = "y0"
    if residual:
        chain.append(helper.make_node("Add", [last, "r"], ["y1"]))
        last = "y1"
    if relu:
        chain.append(helper.make_node("Relu", [last], ["y2"]))
        last = "y2"
    chain.append(helper.make_node("MinMax", [last], ["lo", "hi"], domain=D))
    ins = ["x", "scale", "b", "rm", "rv"] + (["r"] if residual else [])
    ref_s = _session(chain, ins, [last, *stats, "lo", "hi"], threads)
    fused = helper.make_node("BatchNormTrainFused", ["x", "scale", "b", "rm", "rv", "r" if residual else ""],
                             ["y", *stats, "lo", "hi"], domain=D, relu=relu, **bn)
    got_s = _session([fused], ins, ["y", *stats, "lo", "hi"], threads)
    feed = lambda: {k: v[k].copy() for k in ins}   # noqa: E731  (the running statistics are updated in place)
    ref, got = ref_s.run(None, feed()), got_s.run(None, feed())
    for a, b in zip(got, ref):
        _same(np.asarray(a), np.asarray(b))
    if relu:
        assert np.asarray(got[-2]) == 0.0 and (got[0] > 0).any()


def test_forward_updates_the_running_statistics_in_place():
    v = _bn_inputs((4, 3, 5, 5), 2)
    s = _session([helper.make_node("BatchNormTrainFused", ["x", "scale", "b", "rm", "rv", ""],
                                   ["y", "rm2", "rv2", "mean", "inv_std", "lo", "hi"], domain=D, relu=1,
                                   epsilon=1e-5, momentum=0.9)], ["x", "scale", "b", "rm", "rv"], ["rm2", "rv2"], 1)
    rm, rv = v["rm"].copy(), v["rv"].copy()
    rm2, rv2 = s.run(None, dict(x=v["x"], scale=v["scale"], b=v["b"], rm=rm, rv=rv))
    # onnxruntime's own op updates the buffers through aliases; the fused kernel writes its inputs as well
    assert np.array_equal(rm, rm2) and np.array_equal(rv, rv2) and not np.array_equal(rm, v["rm"])


def test_forward_refuses_a_residual_of_another_shape():
    v = _bn_inputs((4, 3, 5, 5), 3)
    s = _session([helper.make_node("BatchNormTrainFused", ["x", "scale", "b", "rm", "rv", "r"],
                                   ["y", "rm2", "rv2", "mean", "inv_std", "lo", "hi"], domain=D, relu=1,
                                   epsilon=1e-5, momentum=0.9)], ["x", "scale", "b", "rm", "rv", "r"], ["y"], 1)
    with pytest.raises(Exception, match="residual must have X's shape"):
        s.run(None, dict(x=v["x"], scale=v["scale"], b=v["b"], rm=v["rm"], rv=v["rv"], r=v["r"][:, :, :4]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [0, 1])
@pytest.mark.parametrize("threads", [1, 2])
def test_backward_is_the_unfused_chain(shape, relu, threads):
    """The forward (BatchNormTrain, Relu) gives mean, inv_std and the ReLU output; then ReluGrad + BatchNormGrad +
    MinMax against BatchNormGradRange, which recomputes the ReLU's mask from X."""
    v = _bn_inputs(shape, 4)
    fwd = [helper.make_node("BatchNormTrain", ["x", "scale", "b", "rm", "rv"], ["y", "rm2", "rv2", "mean", "inv_std"],
                            domain=D, epsilon=1e-5, momentum=0.9),
           helper.make_node("Relu", ["y"], ["yr"])]
    g = "dyr" if relu else "dy"
    ref_nodes = fwd + ([helper.make_node("ReluGrad", ["dy", "yr"], ["dyr"], domain=D)] if relu else []) + [
        helper.make_node("BatchNormGrad", [g, "x", "scale", "mean", "inv_std"], ["dx", "ds", "db"], domain=D),
        helper.make_node("MinMax", ["dx"], ["lo", "hi"], domain=D)]
    got_nodes = fwd + [helper.make_node("BatchNormGradRange", ["dy", "x", "scale", "mean", "inv_std", "b" if relu else ""],
                                        ["dx", "ds", "db", "lo", "hi"], domain=D, relu=relu)]
    ins, outs = ["x", "scale", "b", "rm", "rv", "dy"], ["dx", "ds", "db", "lo", "hi"]
    feed = lambda: {k: v[k].copy() for k in ins}   # noqa: E731
    ref = _session(ref_nodes, ins, outs, threads).run(None, feed())
    got = _session(got_nodes, ins, outs, threads).run(None, feed())
    for a, b in zip(got, ref):
        _same(np.asarray(a), np.asarray(b))
    if relu:   # the mask did something: some of dY was dropped
        plain = _session(fwd + [helper.make_node("BatchNormGrad", ["dy", "x", "scale", "mean", "inv_std"],
                                                 ["dx", "ds", "db"], domain=D)], ins, ["db"], threads).run(None, feed())[0]
        assert not np.array_equal(plain, got[2])


@pytest.mark.parametrize("threads", [1, 2])
def test_relu_grad_sum_is_sum_then_relu_grad(threads):
    v = _bn_inputs((5, 6, 33, 41), 5)   # > one 16384-element chunk: several tasks
    ins = ["dy", "dy2", "x"]
    ref = _session([helper.make_node("Sum", ["dy", "dy2"], ["s"]),
                    helper.make_node("ReluGrad", ["s", "x"], ["dx"], domain=D)], ins, ["dx"], threads)
    got = _session([helper.make_node("ReluGradSum", ins, ["dx"], domain=D)], ins, ["dx"], threads)
    feed = {k: v[k] for k in ins}
    _same(got.run(None, feed)[0], ref.run(None, feed)[0])
    with pytest.raises(Exception, match="one shape"):
        got.run(None, dict(dy=v["dy"], dy2=v["dy2"][:, :, :1], x=v["x"]))


class ResNet(nn.Module):
    """The shapes bn-relu fuses: a stem conv-BN-ReLU, basic blocks (conv-BN-ReLU, conv-BN + shortcut, ReLU), a
    downsampling block whose shortcut is a strided 1x1 conv and BN (two BNs added), a BN without ReLU."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c4, self.b4 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.cs, self.bs = nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)
        self.c5, self.b5 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)
        x = torch.relu(self.b4(self.c4(torch.relu(self.b3(self.c3(x))))) + self.bs(self.cs(x)))
        x = self.b5(self.c5(x))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Off, and on with the ReLU-mask fusion (BuildOptions.bn_relu_mask); the default (on, no mask) is `default`."""
    return build_pair(ResNet(), tmp_path_factory.mktemp("bnrelu"), (2, 3, 9, 9),
                      off={"skip_passes": ("bn-relu",)}, on={"bn_relu_mask": True})


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    return build_pair(ResNet(), tmp_path_factory.mktemp("bnrelu_default"), (2, 3, 9, 9),
                      off={"skip_passes": ("bn-relu",)}, on={})[True]


def test_default_keeps_the_relu_gradients(builds, default):
    on = onnx.load(str(default[0] / "training_model.onnx")).graph
    off = onnx.load(str(builds[False][0] / "training_model.onnx")).graph
    count = lambda g, op: sum(n.op_type == op for n in g.node)   # noqa: E731
    assert count(on, "BatchNormTrainFused") == 5 and count(on, "BatchNormGradRange") == 7
    assert count(on, "ReluGrad") + count(on, "ReluGradSum") == count(off, "ReluGrad")
    assert all(a.i == 0 for n in on.node if n.op_type == "BatchNormGradRange" for a in n.attribute if a.name == "relu")
    for bits in ((8, 8, 8), (0, 0, 0)):
        loss0, grads0, _ = _step(builds[False][0], bits)
        loss1, grads1, _ = _step(default[0], bits)
        assert loss0 == loss1 and all(np.array_equal(grads1[k], g) for k, g in grads0.items())


def test_pass_structure(builds):
    on = onnx.load(str(builds[True][0] / "training_model.onnx")).graph
    off = onnx.load(str(builds[False][0] / "training_model.onnx")).graph
    count = lambda g, op: sum(n.op_type == op for n in g.node)   # noqa: E731
    # b0, b1, b3 with their ReLU; b2 with the shortcut Add and ReLU; bs with b4's Add (the first BN to claim it) and
    # the ReLU; b4 (its Add taken) and b5 (read by the pool: no range to fuse) stay
    assert count(on, "BatchNormTrainFused") == 5 and count(on, "BatchNormTrain") == 2
    assert count(on, "BatchNormGradRange") == 7 and count(on, "BatchNormGrad") == 0   # every dX has an error range
    assert count(on, "Relu") == 0 and count(off, "Relu") == 5
    # the block output that feeds c3 and cs has its two gradients summed: ReluGradSum
    assert count(on, "ReluGradSum") == 1
    # the ReLU's gradient is folded into the batch norm's where the ReLU follows the BN directly (b0, b1, b3)
    assert count(off, "ReluGrad") - count(on, "ReluGrad") - count(on, "ReluGradSum") == 3
    assert count(on, "MinMax") == count(off, "MinMax") - 12   # 7 error ranges, 5 activation ranges
    note = next(n for n in builds[True][1].extra["notes"] if n.startswith("[bn-relu]"))
    assert "5 BatchNormTrain fused forward (2 with the residual Add, 5 with the ReLU" in note
    assert "7 BatchNormGrad with dX's range (3 with the ReLU's gradient); 1 ReluGrad with the gradient Sum" in note


@pytest.mark.parametrize("bits", [(8, 8, 8), (4, 4, 6), (0, 0, 0)])
def test_step_is_bitwise_the_unfused_step(builds, bits):
    loss0, grads0, noise0 = _step(builds[False][0], bits)
    loss1, grads1, noise1 = _step(builds[True][0], bits)
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys() and len(grads0) >= 15
    for name, g in grads0.items():
        assert np.array_equal(grads1[name], g), name
    assert noise0.keys() == noise1.keys()


def test_running_statistics_match(builds):
    from fracgraph.runtime import TrainSession

    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 3, 9, 9)).astype(np.float32)
    y = rng.integers(0, 4, 6).astype(np.int64)
    stats = {}
    for key in (False, True):
        sess = TrainSession(builds[key][0], seed=0, threads=2)
        bits = np.full((sess.manifest.n_blocks, 3), 8, np.float32)
        for _ in range(2):
            sess.step(x, y, bits, lr=0.05)
        stats[key] = {n: sess.parameter(n) for n, _ in sess.state.parameters}
    assert stats[True].keys() == stats[False].keys()
    for n, v in stats[False].items():
        assert np.array_equal(stats[True][n], v), n
