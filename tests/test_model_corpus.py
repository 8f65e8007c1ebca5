"""The model corpus (fracgraph/zoo_external.py): what it covers, the legacy graphs against a PyTorch reference, and
a fast subset (32x32 inputs, batch 4) through quantize at the default settings and three training steps.
`bench/model_corpus.py` runs the whole corpus at 64x64."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fracgraph import zoo_external as zx
from fracgraph.build import BuildOptions, build_artifacts
from fracgraph.runtime import TrainSession


def _torchvision_or_skip():
    try:
        zx.import_torchvision()
        zx.import_timm()
    except zx.SourceMissing as exc:
        pytest.skip(str(exc))


def test_corpus_covers_the_issue():
    ext = [e for e in zx.CORPUS if e.source != "legacy"]
    assert len(ext) >= 15 and {e.source for e in ext} >= {"torchvision", "timm"}
    text = " ".join(e.covers for e in zx.ALL).lower()
    for feature in ("inception", "fire", "shuffle", "dense", "squeeze-excitation", "hardswish", "layernorm", "gelu",
                    "vit", "lrn", "variadic sum", "softmax", "4-d logits", "constantofshape"):
        assert feature in text, feature
    assert len({e.name for e in zx.ALL}) == len(zx.ALL)


@pytest.mark.parametrize("name", ["legacy_caffenet", "legacy_sumnet"])
def test_legacy_graphs_are_old_style_and_compute_what_they_say(name):
    """opset 9 / IR 3, the ops the issue lists, and onnxruntime's output equal to a PyTorch composition."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    m = zx.BY_NAME[name].build(10, 16)
    onnx.checker.check_model(m)
    assert m.ir_version == 3 and m.opset_import[0].version == 9
    ops = [n.op_type for n in m.graph.node]
    assert "LRN" in ops and "ConstantOfShape" in ops and ops[-1] == "Softmax"
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"data_0": x})[0]
    w = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in m.graph.initializer}
    t = torch.from_numpy(x)
    lrn = lambda v, size: F.local_response_norm(v, size, alpha=1e-4, beta=0.75, k=1.0)  # noqa: E731
    if name == "legacy_caffenet":
        v = F.max_pool2d(lrn(F.relu(F.conv2d(t, w["conv1_w_0"], torch.zeros(16), padding=2)), 5), 2)
        v = F.max_pool2d(lrn(F.relu(F.conv2d(v, w["conv2_w_0"], torch.full((32,), 0.1), padding=1)), 5), 2)
        v = F.relu(F.linear(v.flatten(1), w["fc6_w_0"], w["fc6_b_0"]))
        ref = F.softmax(F.linear(v, w["fc7_w_0"], w["fc7_b_0"]), 1)
    else:
        assert [len(n.input) for n in m.graph.node if n.op_type == "Sum"] == [3]
        s = F.relu(F.conv2d(t, w["stem_w_0"], stride=2, padding=1))
        v = F.conv2d(s, w["a_w_0"], padding=1) + F.conv2d(s, w["b_w_0"]) + F.conv2d(s, torch.full((16, 16, 1, 1), 1 / 16))
        v = lrn(F.relu(v), 3).mean((2, 3), keepdim=True)
        ref = F.softmax(F.conv2d(v, w["cls_w_0"], w["cls_b_0"]), 1)
        assert got.shape == (3, 10, 1, 1)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-6)


# Fire modules, channel split/shuffle, SE + hard activations, and both legacy graphs (LRN, variadic Sum, Softmax
# heads, 4-D logits, ConstantOfShape weights): each needed a mechanism fixed in issue 14 (lowering, heads, a tensor
# read by several quantized GEMMs, symbolic shapes).
# swin_micro: the maps padded to the window and cropped back, whose dims only onnxruntime's symbolic shape
# inference (auto_merge) gets; its merged symbols once made the memory planner share a buffer between an 8x8 crop
# and a 14x14 padded map (model._symbolic_shapes now takes its numbers only).
FAST = ["squeezenet1_1", "shufflenet_v2_x0_5", "mobilenet_v3_small", "legacy_caffenet", "legacy_sumnet", "swin_micro"]


@pytest.mark.parametrize("name", FAST)
def test_fast_subset_quantizes_and_trains(name, tmp_path):
    e = zx.entry(name)
    if e.source != "legacy":
        _torchvision_or_skip()
    path = zx.export_entry(e, tmp_path / f"{name}.onnx", classes=10, size=32)
    manifest = build_artifacts(path, tmp_path / "art", BuildOptions())
    quantized = sum(d.quantized for d in manifest.decisions)
    assert quantized >= len(manifest.decisions) - 2 and quantized > 0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 4).astype(np.int64)
    sess = TrainSession(tmp_path / "art", threads=2, seed=0)
    bits = np.full((manifest.n_blocks, 3), 8, np.float32)
    losses = [sess.step(x, y, bits, 0.01)[0] for _ in range(3)]
    assert np.all(np.isfinite(losses)) and losses[2] < losses[0], losses


# What trains is what PyTorch trains: every parameter, each once, and no buffer or traced constant. swin_micro:
# its relative-position bias table is gathered to [heads, N, N] by a constant index (folding that Gather trained
# 62,496 gathered copies apart from the table); vit_tv: the class token reaches the graph only through an Expand
# and a Concat (it was not trained at all).
@pytest.mark.parametrize("name", ["swin_micro", "vit_tv", "mobilenet_v3_small"])
def test_trainable_parameters_are_the_models(name, tmp_path):
    from fracgraph.build import classify_initializers
    from fracgraph.model import load_model

    _torchvision_or_skip()
    e = zx.entry(name)
    net = zx.torch_model(e, classes=10, size=32)
    m = load_model(zx.export_entry(e, tmp_path / f"{name}.onnx", classes=10, size=32))
    trainable, _ = classify_initializers(m)
    sizes = {t.name: int(np.prod(t.dims)) for t in m.graph.initializer}
    assert sum(sizes[x] for x in trainable) == sum(p.numel() for p in net.parameters())
    assert len(trainable) == len(list(net.parameters()))


def test_vit_exports_with_attention_composed(tmp_path):
    """Eval-mode nn.MultiheadAttention's fused fast path cannot be exported; export_entry turns it off (and back)."""
    torch = pytest.importorskip("torch")
    _torchvision_or_skip()
    before = torch.backends.mha.get_fastpath_enabled()
    m = onnx.load(zx.export_entry(zx.entry("vit_tv"), tmp_path / "vit.onnx", size=32))
    ops = {n.op_type for n in m.graph.node}
    assert {"MatMul", "Softmax", "LayerNormalization"} <= ops
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_any_torchvision_or_timm_model_by_name():
    """`tv:NAME` / `timm:NAME` reach architectures outside the corpus (ViT-like timm models get the input size);
    an unknown name is one FracgraphError naming the way to list them."""
    from fracgraph.errors import FracgraphError

    _torchvision_or_skip()
    assert zx.entry("resnet18") is zx.BY_NAME["resnet18"]
    assert type(zx.entry("tv:regnet_y_400mf").build(10, 32)).__name__ == "RegNet"
    vit = zx.entry("timm:deit_tiny_patch16_224").build(10, 32)     # img_size=32 taken: 4 patches of 16
    assert vit.patch_embed.num_patches == 4
    for bad in ("tv:no_such_net", "timm:no_such_net", "nope"):
        with pytest.raises(FracgraphError):
            zx.entry(bad)
