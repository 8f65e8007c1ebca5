"""bn-relu's pre-activation forms (fracgraph/passes/bn_relu.py): BatchNormGradSplit (a batch norm reading a Concat:
its dX written straight into the pieces of the Concat's gradient) against BatchNormGrad [+ ReluGrad] + Split, and
SumRange (onnxruntime's gradient accumulation of many consumers, with the error quantizer's range) against
onnxruntime's Sum + MinMax, bitwise on several shapes and 1 and 2 threads; and a small DenseNet-style net's
training step (pre-activation layers, each BN reading a Concat of every earlier feature map) with the pass on and
off, bitwise, with and without the ReLU mask."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
from onnx import TensorProto, helper  # noqa: E402
from torch import nn  # noqa: E402

from fracgraph import kernels  # noqa: E402
from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402

from conftest import seed_noise  # noqa: E402
from test_bn_relu import _bn_inputs, _same, _session  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402

D = kernels.DOMAIN


def _split_session(nodes, inputs, outputs, threads, lengths):
    """_session with an int64 initializer `lengths` (the Split's sizes)."""
    return _session(nodes, inputs, outputs, threads,
                    [helper.make_tensor("lengths", TensorProto.INT64, [len(lengths)], lengths)])


# (shape, lengths of the channel pieces): odd sizes, one piece, single-channel pieces, a 1x1 map
SPLITS = [((3, 7, 5, 5), [3, 4]), ((9, 16, 6, 7), [2, 5, 1, 8]), ((2, 5, 37), [5]), ((4, 3, 1, 1), [1, 1, 1]),
          ((32, 40, 8, 8), [8, 16, 16])]


@pytest.mark.parametrize("shape,lengths", SPLITS)
@pytest.mark.parametrize("relu", [0, 1])
@pytest.mark.parametrize("threads", [1, 2])
def test_grad_split_is_grad_then_split(shape, lengths, relu, threads):
    v = _bn_inputs(shape, 6)
    fwd = [helper.make_node("BatchNormTrain", ["x", "scale", "b", "rm", "rv"], ["y", "rm2", "rv2", "mean", "inv_std"],
                            domain=D, epsilon=1e-5, momentum=0.9),
           helper.make_node("Relu", ["y"], ["yr"])]
    pieces = [f"p{i}" for i in range(len(lengths))]
    g = "dyr" if relu else "dy"
    ref_nodes = fwd + ([helper.make_node("ReluGrad", ["dy", "yr"], ["dyr"], domain=D)] if relu else []) + [
        helper.make_node("BatchNormGrad", [g, "x", "scale", "mean", "inv_std"], ["dx", "ds", "db"], domain=D),
        helper.make_node("Split", ["dx", "lengths"], pieces, axis=1)]
    got_nodes = fwd + [helper.make_node("BatchNormGradSplit", ["dy", "x", "scale", "mean", "inv_std",
                                                               "b" if relu else "", "lengths"],
                                        ["ds", "db", *pieces], domain=D, relu=relu, pieces=len(lengths))]
    ins, outs = ["x", "scale", "b", "rm", "rv", "dy"], ["ds", "db", *pieces]
    feed = lambda: {k: v[k].copy() for k in ins}   # noqa: E731
    ref = _split_session(ref_nodes, ins, outs, threads, lengths).run(None, feed())
    got = _split_session(got_nodes, ins, outs, threads, lengths).run(None, feed())
    for a, b in zip(got, ref):
        _same(np.asarray(a), np.asarray(b))
    assert [p.shape[1] for p in got[2:]] == lengths


def test_grad_split_refuses_lengths_that_do_not_cover_the_channels():
    v = _bn_inputs((2, 6, 3, 3), 7)
    node = helper.make_node("BatchNormGradSplit", ["dy", "x", "scale", "mean", "inv_std", "", "lengths"],
                            ["ds", "db", "p0", "p1"], domain=D, relu=0, pieces=2)
    s = _split_session([node], ["dy", "x", "scale", "mean", "inv_std"], ["p0", "p1"], 1, [2, 3])
    feed = dict(dy=v["dy"], x=v["x"], scale=v["scale"], mean=v["b"], inv_std=v["scale"])
    with pytest.raises(Exception, match="add up to X's channels"):
        s.run(None, feed)


# (shape, number of gradients): one chunk, several chunks with a partial last one, many inputs (a DenseNet feature
# map read by every later layer)
SUMS = [((3, 5, 7), 2), ((5, 6, 33, 41), 3), ((2, 8, 16, 16), 7), ((4, 3, 9, 9), 25), ((1,), 2)]


@pytest.mark.parametrize("shape,k", SUMS)
@pytest.mark.parametrize("threads", [1, 2])
def test_sum_range_is_sum_then_min_max(shape, k, threads):
    rng = np.random.default_rng(8)
    ins = [f"g{i}" for i in range(k)]
    feed = {n: (rng.standard_normal(shape) * (i + 1)).astype(np.float32) for i, n in enumerate(ins)}
    ref = _session([helper.make_node("Sum", ins, ["s"]), helper.make_node("MinMax", ["s"], ["lo", "hi"], domain=D)],
                   ins, ["s", "lo", "hi"], threads).run(None, feed)
    got = _session([helper.make_node("SumRange", ins, ["s", "lo", "hi"], domain=D, n=k)], ins, ["s", "lo", "hi"],
                   threads).run(None, feed)
    for a, b in zip(got, ref):
        _same(np.asarray(a), np.asarray(b))
    # the order is onnxruntime's ((g0 + g1) + g2) + ...: a float64 sum rounded once differs somewhere for k >= 3
    exact = np.sum([feed[n].astype(np.float64) for n in ins], axis=0)
    assert np.abs(np.asarray(got[0]) - exact).max() <= k * np.abs(exact).max() * 2.0 ** -23


def test_sum_range_refuses_broadcasting():
    rng = np.random.default_rng(9)
    s = _session([helper.make_node("SumRange", ["a", "b"], ["s", "lo", "hi"], domain=D, n=2)], ["a", "b"], ["s"], 1)
    with pytest.raises(Exception, match="no broadcasting"):
        s.run(None, dict(a=rng.standard_normal((2, 3)).astype(np.float32), b=rng.standard_normal((1, 3)).astype(np.float32)))


class DenseNet(nn.Module):
    """torchvision's DenseNet in small: a stem, a dense block of three pre-activation layers (each `Concat(earlier
    features) -> BN -> ReLU -> conv1x1 -> BN -> ReLU -> conv3x3`), a transition (BN -> ReLU -> conv1x1 -> avg pool),
    a second block of two layers, then BN -> ReLU -> pool -> fc."""

    def __init__(self, growth=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)

        def layer(c):
            return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 2 * growth, 1, bias=False),
                                 nn.BatchNorm2d(2 * growth), nn.ReLU(), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False))

        self.block1 = nn.ModuleList(layer(8 + i * growth) for i in range(3))
        c = 8 + 3 * growth
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 8, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = nn.ModuleList(layer(8 + i * growth) for i in range(2))
        self.norm = nn.BatchNorm2d(8 + 2 * growth)
        self.fc = nn.Linear(8 + 2 * growth, 4)

    @staticmethod
    def _block(layers, x):
        feats = [x]
        for f in layers:
            feats.append(f(torch.cat(feats, 1)))
        return torch.cat(feats, 1)

    def forward(self, x):
        x = self._block(self.block1, self.stem(x))
        x = self._block(self.block2, self.trans(x))
        return self.fc(torch.relu(self.norm(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Off; on (the default); on with the ReLU mask."""
    d = tmp_path_factory.mktemp("bnconcat")
    out = build_pair(DenseNet(), d, (2, 3, 10, 10), off={"skip_passes": ("bn-relu",)}, on={})
    art = d / "art_mask"   # build_pair's export (the same weights), built once more with the mask
    out["mask"] = (art, build_artifacts(d / "model.onnx", art, BuildOptions(expose_noise=True, expose_errors=True,
                                                                           bn_relu_mask=True)))
    seed_noise(art)
    return out


def test_dense_structure(dense):
    count = lambda g, op: sum(n.op_type == op for n in g.node)   # noqa: E731
    graphs = {k: onnx.load(str(dense[k][0] / "training_model.onnx")).graph for k in (False, True, "mask")}
    off, on, mask = graphs[False], graphs[True], graphs["mask"]
    # every BN that reads a Concat (3 + 1 + 2 layers' first BN, the transition's, the final norm's) has its dX cut
    # by the Concat's gradient Split; all but the last (read by the final mean, no Concat beyond it) are fused
    n_split = count(off, "SplitTraining")
    assert n_split >= 6 and count(on, "BatchNormGradSplit") == n_split and count(on, "SplitTraining") == 0
    assert count(mask, "BatchNormGradSplit") == n_split
    assert count(mask, "ReluGrad") == count(on, "ReluGrad") - n_split - 5   # and the 1x1 convs' BNs (BatchNormGradRange)
    sums = [n for n in off.node if n.op_type == "Sum" and n.name.startswith("AccumulateGrad_")]
    assert count(on, "SumRange") >= 3 and count(on, "Sum") == count(off, "Sum") - count(on, "SumRange")
    assert max(len(n.input) for n in sums) >= 3   # the stem's output: read by every layer of block 1 and the transition
    note = next(n for n in dense[True][1].extra["notes"] if n.startswith("[bn-relu]"))
    assert f"{n_split} BatchNormGrad writing a Concat's gradient pieces (0 with the ReLU's gradient)" in note


@pytest.mark.parametrize("bits", [(8, 8, 8), (4, 4, 6), (0, 0, 0)])
@pytest.mark.parametrize("variant", [True, "mask"])
def test_dense_step_is_bitwise_the_unfused_step(dense, bits, variant):
    shape = (6, 3, 10, 10)
    loss0, grads0, noise0 = _step(dense[False][0], bits, shape)
    loss1, grads1, noise1 = _step(dense[variant][0], bits, shape)
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys() and len(grads0) >= 20
    for name, g in grads0.items():
        assert np.array_equal(grads1[name], g), name
    assert noise0.keys() == noise1.keys()
