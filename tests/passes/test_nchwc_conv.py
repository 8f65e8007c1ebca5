"""nchwc-conv keeps the training step's values: loss and every parameter gradient with the convs on NCHWc kernels
equal those with plain Conv (both builds with the other speed passes on), for every filter layout the pass
writes: NCHW input with fewer channels than a block (the stem), blocked 3x3, strided, dilated, biased, 1x1, grouped
(a block per group) and depthwise convs. Block-size-dependent: on a CPU without NCHWc kernels the pass writes nothing and the tests skip.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from fracgraph.errors import FracgraphError  # noqa: E402
from fracgraph.runtime import TrainSession, nchwc_block_size  # noqa: E402

from fracgraph.passes.base import all_nodes  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402

BLOCK = nchwc_block_size()
pytestmark = pytest.mark.skipif(BLOCK <= 1 or BLOCK > 16, reason=f"no NCHWc kernels usable here (block {BLOCK})")


class BlockedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)       # input channels < block: OIHWBo, NCHW input
        self.bn = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1, bias=True)           # OIHWBiBo, biased
        self.s2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.dil = nn.Conv2d(32, 32, 3, padding=2, dilation=2, bias=False)
        self.grp = nn.Conv2d(32, 32, 3, padding=1, groups=2, bias=False)   # grouped, 16 channels a group: OIHWBiBo
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)   # depthwise: OIHWBo, blocked input
        self.pw = nn.Conv2d(32, 16, 1, bias=False)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.c3(x) + x)
        x = torch.relu(self.s2(x))
        x = torch.relu(self.dil(x))
        x = torch.relu(self.grp(x))
        x = torch.relu(self.dw(x))
        x = self.pw(x)
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(BlockedNet(), tmp_path_factory.mktemp("nchwc"), (2, 3, 10, 10), "nchwc")


def test_every_conv_runs_on_nchwc_kernels(builds):
    graph = onnx.load(str(builds[True][0] / "training_model.onnx")).graph
    nchwc = [n for n in all_nodes(graph) if n.domain == "com.microsoft.nchwc" and n.op_type == "Conv"]   # int-gemm's
    plain = [n for n in all_nodes(graph) if n.op_type == "Conv" and n.domain == ""]                       # float branches too
    # 7 forward convs + the stride-1 dX convs of conv-grad-split (c3, dil, grp, dw, pw; the stem needs no dX and s2's
    # is a ConvTranspose)
    assert len(nchwc) == 12 and plain == []
    assert sorted(a.i for n in nchwc for a in n.attribute if a.name == "group" and a.i > 1) == [2, 2, 32, 32]
    assert builds[True][1].extra["nchwc_block"] == BLOCK
    assert builds[False][1].extra["nchwc_block"] is None
    assert not any(n.op_type == "ReluGrad" and n.domain == "com.microsoft" for n in graph.node)   # none of ORT's left


# FP32 and quantized forward: the convs sum in another order, so 1e-5. Quantized errors are left out: the pass
# touches only the convs, which FP32 errors exercise the same way, and with stochastic rounding a last-bit difference
# can move an error element across a rounding boundary and cascade (a direct on/off comparison there was flaky on
# some CPUs; the quantized step's values are checked against PyTorch in test_step_reference and test_branching).
@pytest.mark.parametrize("bits,tol", [((0, 0, 0), 1e-5), ((8, 8, 0), 1e-5), ((4, 4, 0), 1e-5)])
def test_nchwc_keeps_loss_and_every_gradient(builds, bits, tol):
    loss0, grads0, _ = _step(builds[False][0], bits, shape=(4, 3, 10, 10), classes=5)
    loss1, grads1, _ = _step(builds[True][0], bits, shape=(4, 3, 10, 10), classes=5)
    assert abs(loss0 - loss1) <= 1e-5 * abs(loss0)
    assert grads0.keys() == grads1.keys() and len(grads0) >= 9
    for name, g in grads0.items():
        err = np.linalg.norm(grads1[name] - g) / max(np.linalg.norm(g), 1e-12)
        assert err <= tol, f"{name}: relative gradient error {err:.2e}"


def test_other_block_size_is_refused(builds, tmp_path):
    """Artifacts reordered for one block size give wrong convs on another: the session refuses them in one line."""
    import shutil

    art = tmp_path / "moved"
    shutil.copytree(builds[True][0], art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["extra"]["nchwc_block"] = 8 if BLOCK == 16 else 16
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FracgraphError, match="NCHWc blocks of .* --no-nchwc"):
        TrainSession(art)


def test_weight_reorders_are_one_fracgraph_kernel(builds):
    graph = onnx.load(str(builds[True][0] / "training_model.onnx")).graph
    reorders = [n for n in all_nodes(graph) if n.op_type == "NchwcWeight"]
    assert len(reorders) == 12   # one per NCHWc conv
    # conv-grad-split's transposes and flips of the weights are folded into them and gone
    assert not any(n.output[0].endswith(("::split/w_flip", "::split/w_t")) for n in graph.node)
    assert sorted((a.name, a.i) for a in reorders[0].attribute)[0][0] == "block"


@pytest.mark.parametrize("shape,blocked_in,transpose,flip", [
    ((32, 48, 3, 3), 1, 0, 0), ((32, 3, 7, 7), 0, 0, 0), ((48, 32, 3, 3), 1, 1, 1), ((32, 1, 5, 5), 0, 0, 1),
    ((16, 32, 1, 1), 1, 1, 1), ((32, 16, 1, 3), 1, 0, 1), ((64, 32, 3, 3), 1, 2, 1), ((96, 16, 3, 3), 1, 3, 0),
    # regnet_x_400mf's: the grouped 3x3 (group width 16) and its dX weight, the 1x1s and theirs, the stem
    ((400, 16, 3, 3), 1, 0, 0), ((400, 16, 3, 3), 1, 25, 1), ((400, 400, 1, 1), 1, 0, 0), ((400, 400, 1, 1), 1, 1, 0),
    ((160, 64, 1, 1), 1, 1, 0), ((32, 3, 3, 3), 0, 0, 0),
    # groups narrower than the block: the group changes within an output-channel block of the transposed weight
    ((64, 8, 3, 3), 1, 2, 1), ((64, 8, 1, 1), 1, 2, 0)])
@pytest.mark.parametrize("threads", [1, 2])
def test_nchwc_weight_kernel_is_the_layout(shape, blocked_in, transpose, flip, threads):
    """NchwcWeight against numpy's reshape/transpose of the layout the pass writes without it (exact: a copy);
    transpose = G swaps the channel axes within each of G groups (a grouped conv's dX weight)."""
    from conftest import custom_op_session

    B = BLOCK
    shape = tuple(d * B // 16 if i < 2 and d >= 16 else d for i, d in enumerate(shape))   # multiples of this block
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    g = max(transpose, 1)
    wl = w.reshape(g, shape[0] // g, *shape[1:]).transpose(0, 2, 1, 3, 4).reshape(g * shape[1], shape[0] // g, *shape[2:]) \
        if transpose else w
    wl = wl[:, :, ::-1, ::-1] if flip else wl
    o, c, kh, kw = wl.shape
    if blocked_in:
        ref = wl.reshape(o // B, B, c // B, B, kh, kw).transpose(0, 2, 4, 5, 3, 1).reshape(o, c, kh, kw)
    else:
        ref = wl.reshape(o // B, B, c, kh, kw).transpose(0, 2, 3, 4, 1).reshape(o, c, kh, kw)
    sess = custom_op_session("NchwcWeight", ["w"], ["y"], threads, block=B, blocked_in=blocked_in, transpose=transpose,
                             flip=flip)
    np.testing.assert_array_equal(sess.run(None, {"w": w})[0], ref)


@pytest.fixture(scope="module")
def unfused(tmp_path_factory):
    off, on = {"nchwc": False, "fused_kernels": False}, {"nchwc": True, "fused_kernels": False}
    return build_pair(BlockedNet(), tmp_path_factory.mktemp("nchwc_unfused"), (2, 3, 10, 10), off=off, on=on)


def test_without_fracgraph_kernels_the_reorder_is_in_the_graph(unfused):
    graph = onnx.load(str(unfused[True][0] / "training_model.onnx")).graph
    assert not any(n.op_type == "NchwcWeight" for n in graph.node)
    assert sum(n.domain == "com.microsoft.nchwc" and n.op_type == "Conv" for n in graph.node) == 12
    loss0, grads0, _ = _step(unfused[False][0], (0, 0, 0), shape=(4, 3, 10, 10), classes=5)
    loss1, grads1, _ = _step(unfused[True][0], (0, 0, 0), shape=(4, 3, 10, 10), classes=5)
    assert abs(loss0 - loss1) <= 1e-5 * abs(loss0)
    for name, g in grads0.items():
        assert np.linalg.norm(grads1[name] - g) <= 1e-5 * max(np.linalg.norm(g), 1e-12), name
