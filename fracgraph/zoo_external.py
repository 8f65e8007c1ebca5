"""Models fracgraph did not write: the model corpus of `bench/model_corpus.py` and its fast test subset.

Three sources:

- **torchvision** (0.28.0, the release for torch 2.13; 0.29.1 works the same) model definitions with random
  weights. The registry's wheels are CUDA builds: with the CPU torch their compiled ops (`torchvision::nms`, `roi_align`, ...) do not load, and `import torchvision` then fails in
  `torchvision/_meta_registrations.py`, which registers fake kernels for those missing ops. The model definitions
  (`torchvision/models/*.py`) are pure Python and never call the compiled ops, so `import_torchvision()` puts an
  empty package module named `torchvision` (with the installed package's directory as its `__path__`) into
  `sys.modules` before importing `torchvision.models`: the submodules load from the wheel, the package
  `__init__` (and with it the fake registrations) never runs. Install it with `pip install -e '.[corpus]'`.
- **timm** (pure Python; it imports `torchvision.transforms`, so it is imported after the same shim).
- **hand-built legacy graphs** (`onnx.helper`, opset 9, IR 3): LRN, variadic Sum, a Softmax head, 4-D logits
  [N, C, 1, 1], weights produced by ConstantOfShape, the way old Caffe/Caffe2 conversions look.

torch models are exported like the zoo's (`zoo.export_model`: TorchScript exporter, `TrainingMode.EVAL`, no
constant folding, opset 17, dynamic batch) at a fixed square input size.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import FracgraphError

class SourceMissing(Exception):
    """A corpus source (torchvision, timm) is not installed; the message says how to install it."""


def import_torchvision():
    """`torchvision.models` without running the package `__init__` (see the module docstring)."""
    mod = sys.modules.get("torchvision")
    if mod is None:
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.origin:
            raise SourceMissing("torchvision is not installed: pip install -e '.[corpus]' (torchvision 0.28, timm 1.0)")
        mod = types.ModuleType("torchvision")
        mod.__path__ = [os.path.dirname(spec.origin)]
        mod.__file__ = spec.origin
        mod.__spec__ = spec
        sys.modules["torchvision"] = mod
    import torchvision.models as tvm

    return tvm


def import_timm():
    import_torchvision()  # timm imports torchvision.transforms
    try:
        import timm
    except ImportError as exc:
        raise SourceMissing(f"timm is not importable ({exc}): pip install timm (or pip install -e '.[corpus]')") from None
    return timm


# --------------------------------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    name: str
    source: str                  # "torchvision" | "timm" | "legacy"
    covers: str                  # the architectural feature this model brings into the corpus
    build: Callable              # (classes, size) -> torch.nn.Module, or (classes, size) -> onnx.ModelProto (legacy)
    min_size: int = 32           # smallest square input its architecture accepts


def _tv(name: str, **kw):
    def build(classes: int, size: int):
        return getattr(import_torchvision(), name)(weights=None, num_classes=classes, **kw)
    return build


def _tv_vit(classes: int, size: int):
    import_torchvision()
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=size, patch_size=8, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=256,
                             num_classes=classes)


def _tv_swin(classes: int, size: int):
    """A small Swin (torchvision's class, swin_t's layout at a tenth of its width): shifted windows (roll and an
    attention mask), maps padded up to the 7x7 window and cropped back, patch merging."""
    import_torchvision()
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8],
                           window_size=[7, 7], num_classes=classes)


def _timm(name: str, img_size: bool = False, **kw):
    def build(classes: int, size: int):
        extra = dict(img_size=size) if img_size else {}
        return import_timm().create_model(name, pretrained=False, num_classes=classes, **extra, **kw)
    return build


CORPUS: tuple[Entry, ...] = (
    Entry("resnet18", "torchvision", "residual BasicBlocks, strided 1x1 shortcuts, max pool", _tv("resnet18")),
    Entry("googlenet", "torchvision", "Inception concat branches", _tv("googlenet", aux_logits=False,
                                                                        init_weights=True)),
    Entry("squeezenet1_1", "torchvision", "fire modules (concat), conv classifier, dropout", _tv("squeezenet1_1")),
    Entry("shufflenet_v2_x0_5", "torchvision", "channel split (Split/Slice), channel shuffle (Reshape/Transpose)",
          _tv("shufflenet_v2_x0_5")),
    Entry("densenet121", "torchvision", "dense blocks (growing concat), transition avg pools", _tv("densenet121")),
    Entry("mobilenet_v2", "torchvision", "inverted residuals, depthwise convs, ReLU6 (Clip)", _tv("mobilenet_v2")),
    Entry("mobilenet_v3_small", "torchvision", "squeeze-excitation, hardswish/hardsigmoid", _tv("mobilenet_v3_small")),
    Entry("efficientnet_b0", "torchvision", "MBConv, SiLU, SE, stochastic depth (eval)", _tv("efficientnet_b0")),
    Entry("regnet_x_400mf", "torchvision", "grouped convs", _tv("regnet_x_400mf")),
    Entry("mnasnet0_5", "torchvision", "NAS cells, 5x5 depthwise", _tv("mnasnet0_5")),
    Entry("vit_tv", "torchvision", "ViT: patch conv, class token, MultiheadAttention, LayerNorm, GELU", _tv_vit),
    Entry("convnext_atto", "timm", "ConvNeXt: 7x7 depthwise, LayerNorm (channels last), GELU, layer scale",
          _timm("convnext_atto")),
    Entry("vit_tiny", "timm", "ViT-Tiny/16: fused-attention blocks, LayerNorm, GELU", _timm("vit_tiny_patch16_224",
                                                                                          img_size=True)),
    Entry("lcnet_050", "timm", "PP-LCNet: hardswish, SE, depthwise", _timm("lcnet_050")),
    Entry("ghostnet_050", "timm", "Ghost modules (cheap-op concat, Slice), SE", _timm("ghostnet_050")),
    Entry("mobilevit_xxs", "timm", "MobileViT: unfold/fold attention between convs, SiLU", _timm("mobilevit_xxs"),
          min_size=64),
    Entry("tf_efficientnet_b0", "timm", "TensorFlow 'same' padding: Pad with pads computed from Shape() at run time",
          _timm("tf_efficientnet_b0")),
    Entry("swin_micro", "torchvision", "Swin: shifted windows (roll, attention mask), window pad and crop, patch "
          "merging", _tv_swin),
)


def torch_model(entry: Entry, classes: int = 10, size: int = 64, seed: int = 0):
    """A freshly (seeded) initialised torch module of a torchvision/timm entry, in eval mode, with `input_shape`
    set for `zoo.export_model`."""
    import torch

    if entry.source == "legacy":
        raise ValueError(f"{entry.name} is a hand-built ONNX graph, not a torch model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.build(classes, size)
    if entry.source != "huggingface":   # a HF language model: classes = vocabulary, size = context
        model.input_shape = (3, size, size)
    return model.eval()


def export_entry(entry: Entry, path: str | os.PathLike, classes: int = 10, size: int = 64, seed: int = 0) -> Path:
    """Write the entry as ONNX at input [N, 3, size, size] (a HF language model: token ids [N, size], vocabulary
    `classes`)."""
    path = Path(path)
    if size < entry.min_size:
        raise FracgraphError(f"{entry.name} needs inputs of at least {entry.min_size}x{entry.min_size}, not {size}")
    if entry.source == "legacy":
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(entry.build(classes, size), path)
        return path
    import warnings

    from .zoo import export_model

    import torch

    model = torch_model(entry, classes, size, seed)
    if entry.source == "huggingface":
        return export_hf(model, path, context=size, vocab=classes)
    # eval-mode nn.MultiheadAttention takes a fused fast path (aten::_native_multi_head_attention) that the
    # TorchScript exporter cannot write; the composed path exports as MatMul/Softmax
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return export_model(model, path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


# --------------------------------------------------------------------------------------------------- legacy graphs


def _legacy_model(nodes, inits, classes: int, size: int, name: str, out_shape: list) -> onnx.ModelProto:
    """IR 3 lists every initializer among the graph inputs too (as the old converters wrote them)."""
    g = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, ["N", 3, size, size])]
        + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits],
        [helper.make_tensor_value_info("prob_1", TensorProto.FLOAT, out_shape)],
        initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)], producer_name="caffe2-style (fracgraph)")
    m.ir_version = 3
    return m


def _w(rng: np.random.Generator, name: str, shape: tuple, gain: float = 2.0) -> TensorProto:
    """Gaussian weights of variance gain / fan_in (He for gain 2)."""
    fan_in = int(np.prod(shape[1:]))
    return numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(gain / fan_in)).astype(np.float32), name)


def _const_of_shape(name: str, shape: list[int], value: float) -> list:
    """`name` = ConstantOfShape(Constant(shape)) filled with `value`: weights a converter wrote as a fill op."""
    shp = numpy_helper.from_array(np.asarray(shape, np.int64), f"{name}_shape_value")
    return [
        helper.make_node("Constant", [], [f"{name}_shape"], name=f"{name}_shape", value=shp),
        helper.make_node("ConstantOfShape", [f"{name}_shape"], [name], name=f"{name}_fill",
                         value=numpy_helper.from_array(np.asarray([value], np.float32), "value")),
    ]


def legacy_caffenet(classes: int = 10, size: int = 32, seed: int = 0) -> onnx.ModelProto:
    """AlexNet/CaffeNet-like: Conv-Relu-LRN-MaxPool twice, Flatten, Gemm, Relu, Dropout, Gemm, Softmax: the
    output is the probability [N, classes]; the conv biases are ConstantOfShape fills (zeros, 0.1)."""
    rng = np.random.default_rng(seed)
    c1, c2, hid = 16, 32, 64
    s = size // 4  # two 2x2/2 pools
    inits = [_w(rng, "conv1_w_0", (c1, 3, 5, 5)), _w(rng, "conv2_w_0", (c2, c1, 3, 3)),
             _w(rng, "fc6_w_0", (hid, c2 * s * s), 1.0), numpy_helper.from_array(np.zeros(hid, np.float32), "fc6_b_0"),
             _w(rng, "fc7_w_0", (classes, hid), 0.1), numpy_helper.from_array(np.zeros(classes, np.float32), "fc7_b_0")]
    n = helper.make_node
    nodes = [
        *_const_of_shape("conv1_b_0", [c1], 0.0),
        *_const_of_shape("conv2_b_0", [c2], 0.1),
        n("Conv", ["data_0", "conv1_w_0", "conv1_b_0"], ["conv1_1"], name="conv1", kernel_shape=[5, 5], pads=[2] * 4),
        n("Relu", ["conv1_1"], ["conv1_2"], name="relu1"),
        n("LRN", ["conv1_2"], ["norm1_1"], name="norm1", size=5, alpha=1e-4, beta=0.75, bias=1.0),
        n("MaxPool", ["norm1_1"], ["pool1_1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["pool1_1", "conv2_w_0", "conv2_b_0"], ["conv2_1"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
        n("Relu", ["conv2_1"], ["conv2_2"], name="relu2"),
        n("LRN", ["conv2_2"], ["norm2_1"], name="norm2", size=5, alpha=1e-4, beta=0.75, bias=1.0),
        n("MaxPool", ["norm2_1"], ["pool2_1"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        n("Flatten", ["pool2_1"], ["flat_1"], name="flatten", axis=1),
        n("Gemm", ["flat_1", "fc6_w_0", "fc6_b_0"], ["fc6_1"], name="fc6", transB=1),
        n("Relu", ["fc6_1"], ["fc6_2"], name="relu6"),
        n("Dropout", ["fc6_2"], ["fc6_3"], name="drop6", ratio=0.5),
        n("Gemm", ["fc6_3", "fc7_w_0", "fc7_b_0"], ["fc7_1"], name="fc7", transB=1),
        n("Softmax", ["fc7_1"], ["prob_1"], name="prob"),
    ]
    return _legacy_model(nodes, inits, classes, size, "legacy_caffenet", ["N", classes])


def legacy_sumnet(classes: int = 10, size: int = 32, seed: int = 0) -> onnx.ModelProto:
    """Three parallel conv branches joined by one variadic Sum, LRN, global average pool, a 1x1 conv classifier
    giving 4-D logits [N, classes, 1, 1], Softmax over axis 1 (opset-9 semantics: coerced to [N, classes]).
    One branch's weight is a ConstantOfShape fill."""
    rng = np.random.default_rng(seed)
    c = 16
    inits = [_w(rng, "stem_w_0", (c, 3, 3, 3)), _w(rng, "a_w_0", (c, c, 3, 3)), _w(rng, "b_w_0", (c, c, 1, 1)),
             _w(rng, "cls_w_0", (classes, c, 1, 1), 0.1),
             numpy_helper.from_array(np.zeros(classes, np.float32), "cls_b_0")]
    n = helper.make_node
    nodes = [
        *_const_of_shape("c_w_0", [c, c, 1, 1], 1.0 / c),
        n("Conv", ["data_0", "stem_w_0"], ["stem_1"], name="stem", kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]),
        n("Relu", ["stem_1"], ["stem_2"], name="stem_relu"),
        n("Conv", ["stem_2", "a_w_0"], ["a_1"], name="branch_a", kernel_shape=[3, 3], pads=[1] * 4),
        n("Conv", ["stem_2", "b_w_0"], ["b_1"], name="branch_b", kernel_shape=[1, 1]),
        n("Conv", ["stem_2", "c_w_0"], ["c_1"], name="branch_c", kernel_shape=[1, 1]),
        n("Sum", ["a_1", "b_1", "c_1"], ["sum_1"], name="sum"),
        n("Relu", ["sum_1"], ["sum_2"], name="sum_relu"),
        n("LRN", ["sum_2"], ["norm_1"], name="norm", size=3, alpha=1e-4, beta=0.75, bias=1.0),
        n("GlobalAveragePool", ["norm_1"], ["pool_1"], name="pool"),
        n("Conv", ["pool_1", "cls_w_0", "cls_b_0"], ["cls_1"], name="classifier", kernel_shape=[1, 1]),
        n("Softmax", ["cls_1"], ["prob_1"], name="prob"),
    ]
    return _legacy_model(nodes, inits, classes, size, "legacy_sumnet", ["N", classes, 1, 1])


LEGACY: tuple[Entry, ...] = (
    Entry("legacy_caffenet", "legacy", "opset 9 / IR 3 (initializers as graph inputs): LRN, Dropout, "
          "Flatten+Gemm, Softmax head, ConstantOfShape biases", lambda classes, size: legacy_caffenet(classes, size)),
    Entry("legacy_sumnet", "legacy", "opset 9 / IR 3: variadic Sum, LRN, 4-D logits [N,C,1,1], Softmax, "
          "ConstantOfShape weight", lambda classes, size: legacy_sumnet(classes, size)),
)

ALL: tuple[Entry, ...] = CORPUS + LEGACY
BY_NAME = {e.name: e for e in ALL}


def _timm_any(name: str):
    """A timm model by name; ViT-like ones take the input size (`img_size`), convnets refuse the keyword."""
    def build(classes: int, size: int):
        timm = import_timm()
        try:
            return timm.create_model(name, pretrained=False, num_classes=classes, img_size=size)
        except TypeError:
            return timm.create_model(name, pretrained=False, num_classes=classes)
    return build


def entry(name: str) -> Entry:
    """A corpus entry, or any torchvision / timm architecture by name: `tv:regnet_y_400mf`, `timm:deit_tiny_patch16_224`
    (random weights, as the corpus; for trying a model outside it with bench/model_corpus.py or step_time.py)."""
    if name in BY_NAME:
        return BY_NAME[name]
    source, _, arch = name.partition(":")
    if arch and source == "hf":
        if arch not in HF_ARCHS and arch not in import_transformers().CONFIG_MAPPING:
            raise FracgraphError(f"no hf: architecture {arch!r}: name a transformers model type (as in a config's "
                                 f"`model_type`, e.g. {', '.join(HF_ARCHS[:6])}, ...)")
        return Entry(name, "huggingface", "transformers LM (random weights, 2 layers, width 64)"
                     + ("" if arch in HF_ARCHS else ", generic small config"), _hf(arch), min_size=8)
    if arch and source in ("tv", "timm"):
        if source == "tv":
            if not callable(getattr(import_torchvision(), arch, None)):
                raise FracgraphError(f"torchvision.models has no model {arch!r}")
            return Entry(name, "torchvision", "outside the corpus", _tv(arch))
        if arch not in import_timm().list_models():
            raise FracgraphError(f"timm has no model {arch!r} (timm.list_models() lists them)")
        return Entry(name, "timm", "outside the corpus", _timm_any(arch))
    raise FracgraphError(f"no corpus model {name!r}; choose from {', '.join(BY_NAME)}, or name any torchvision or "
                         f"timm model as tv:NAME or timm:NAME, or a transformers language model as hf:ARCH "
                         f"({', '.join(HF_ARCHS)})")


# --------------------------------------------------------------------------------------------------- HuggingFace

def import_transformers():
    """`transformers` (pip install -e '.[hf]'). Its model modules import `torchvision.transforms` when torchvision is
    installed (image utils), which fails with the registry's CUDA torchvision wheels and the CPU torch: the same
    shim as the corpus (`import_torchvision`) goes first."""
    if importlib.util.find_spec("transformers") is None:
        raise SourceMissing("transformers is not installed: pip install -e '.[hf]' (transformers 5.x)")
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()
    import transformers

    return transformers


# The small shapes every hf: entry is built at: 2 layers, width 64 (4 heads), context `size` (the bench's --size,
# default 64), vocabulary `classes` (the bench uses 96 for LMs: tinyshakespeare's 65 characters fit).
# `hf_entry(arch, width)` scales the width (4 heads of width/4, MLP 2 x width) for steps that GEMMs dominate.
_HF_SMALL = dict(layers=2, width=64, heads=4, ffn=128)


def hf_entry(arch: str, width: int = _HF_SMALL["width"]) -> Entry:
    """The entry `hf:ARCH` (width 64), or one of the 19 hand-made configs (HF_ARCHS) at another width (a multiple
    of 16); any other transformers model type at width 64 only (its generic config, `_hf_generic`)."""
    if width == _HF_SMALL["width"]:
        return entry(f"hf:{arch}")
    if arch not in HF_ARCHS:
        raise FracgraphError(f"hf: width {width} is for the hand-made configs only ({', '.join(HF_ARCHS)}), not {arch!r}")
    if width < 16 or width % 16:
        raise FracgraphError(f"hf: width must be a multiple of 16 (4 heads with an even head size), not {width}")
    return Entry(f"hf:{arch}", "huggingface", f"transformers LM (random weights, 2 layers, width {width})",
                 _hf(arch, width), min_size=8)


def _hf_config(arch: str, vocab: int, context: int, width: int = _HF_SMALL["width"]):
    """(model class name, config) of a small random-weight `arch`; one entry per architecture family."""
    tr = import_transformers()
    L, H = _HF_SMALL["layers"], _HF_SMALL["heads"]
    W, F = width, width * _HF_SMALL["ffn"] // _HF_SMALL["width"]
    llama_like = dict(vocab_size=vocab, hidden_size=W, intermediate_size=F, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=H // 2, max_position_embeddings=context)
    bert_like = dict(vocab_size=vocab, hidden_size=W, num_hidden_layers=L, num_attention_heads=H,
                     intermediate_size=F, max_position_embeddings=context)
    table = {
        "gpt2": ("GPT2LMHeadModel", lambda: tr.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=W, n_layer=L,
                                                          n_head=H)),
        "gpt_neo": ("GPTNeoForCausalLM", lambda: tr.GPTNeoConfig(
            vocab_size=vocab, max_position_embeddings=context, hidden_size=W, num_layers=L, num_heads=H,
            attention_types=[[["global", "local"], L // 2]], window_size=context // 4, intermediate_size=F)),
        "gpt_neox": ("GPTNeoXForCausalLM", lambda: tr.GPTNeoXConfig(
            vocab_size=vocab, hidden_size=W, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F,
            max_position_embeddings=context, rotary_pct=0.25)),
        "opt": ("OPTForCausalLM", lambda: tr.OPTConfig(
            vocab_size=vocab, hidden_size=W, num_hidden_layers=L, ffn_dim=F, num_attention_heads=H,
            word_embed_proj_dim=W, max_position_embeddings=context)),
        "llama": ("LlamaForCausalLM", lambda: tr.LlamaConfig(**llama_like)),
        "mistral": ("MistralForCausalLM", lambda: tr.MistralConfig(**llama_like, sliding_window=context // 2)),
        "qwen2": ("Qwen2ForCausalLM", lambda: tr.Qwen2Config(**llama_like)),
        "qwen3": ("Qwen3ForCausalLM", lambda: tr.Qwen3Config(**llama_like, head_dim=W // H)),
        "gemma": ("GemmaForCausalLM", lambda: tr.GemmaConfig(**llama_like, head_dim=W // H)),
        "phi": ("PhiForCausalLM", lambda: tr.PhiConfig(
            vocab_size=vocab, hidden_size=W, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
            max_position_embeddings=context, partial_rotary_factor=0.5)),
        "phi3": ("Phi3ForCausalLM", lambda: tr.Phi3Config(**llama_like)),
        "bloom": ("BloomForCausalLM", lambda: tr.BloomConfig(vocab_size=vocab, hidden_size=W, n_layer=L, n_head=H)),
        "falcon": ("FalconForCausalLM", lambda: tr.FalconConfig(
            vocab_size=vocab, hidden_size=W, num_hidden_layers=L, num_attention_heads=H, max_position_embeddings=context)),
        "gptj": ("GPTJForCausalLM", lambda: tr.GPTJConfig(vocab_size=vocab, n_positions=context, n_embd=W, n_layer=L,
                                                          n_head=H, rotary_dim=W // H // 2)),
        "bert": ("BertForMaskedLM", lambda: tr.BertConfig(**bert_like)),
        "roberta": ("RobertaForMaskedLM", lambda: tr.RobertaConfig(**{**bert_like,
                                                                        "max_position_embeddings": context + 2})),
        "distilbert": ("DistilBertForMaskedLM", lambda: tr.DistilBertConfig(
            vocab_size=vocab, dim=W, n_layers=L, n_heads=H, hidden_dim=F, max_position_embeddings=context)),
        "albert": ("AlbertForMaskedLM", lambda: tr.AlbertConfig(**bert_like, embedding_size=32)),
        "electra": ("ElectraForMaskedLM", lambda: tr.ElectraConfig(**bert_like, embedding_size=32)),
    }
    if arch not in table:
        return _hf_generic(tr, arch, vocab, context)
    cls, cfg = table[arch]
    return getattr(tr, cls), cfg()


# the common config names of a transformers architecture's sizes (a config's `attribute_map` maps its own names,
# GPT-2's n_embd etc., onto these); MoE sizes for the mixture-of-experts families
_HF_GENERIC = dict(hidden_size=_HF_SMALL["width"], num_hidden_layers=_HF_SMALL["layers"],
                   num_attention_heads=_HF_SMALL["heads"], num_key_value_heads=_HF_SMALL["heads"] // 2,
                   head_dim=_HF_SMALL["width"] // _HF_SMALL["heads"], intermediate_size=_HF_SMALL["ffn"],
                   ffn_dim=_HF_SMALL["ffn"], n_inner=_HF_SMALL["ffn"], d_ff=_HF_SMALL["ffn"], embedding_size=_HF_SMALL["width"],
                   num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=_HF_SMALL["ffn"] // 2,
                   shared_expert_intermediate_size=_HF_SMALL["ffn"] // 2)


def _hf_generic(tr, arch: str, vocab: int, context: int):
    """Any other transformers model type (`hf:starcoder2`, `hf:deberta-v2`, ...): its default config with the sizes
    it has under the common names set small, its causal-LM class (else its masked-LM class). Best effort: an
    architecture whose sizes go by other names, or that ties them (rotary dims, ...), can fail in its own
    constructor or export, which the benches report in one line."""
    cfg = tr.AutoConfig.for_model(arch)
    sizes = dict(_HF_GENERIC, vocab_size=vocab, max_position_embeddings=context + 2, n_positions=context + 2)
    for k, v in sizes.items():
        if hasattr(cfg, k) or k in getattr(cfg, "attribute_map", {}):
            setattr(cfg, k, v)
    for mapping in (tr.MODEL_FOR_CAUSAL_LM_MAPPING, tr.MODEL_FOR_MASKED_LM_MAPPING):
        if type(cfg) in mapping:
            return mapping[type(cfg)], cfg
    raise FracgraphError(f"hf:{arch} has no causal or masked language-model class in transformers")


HF_ARCHS = ("gpt2", "gpt_neo", "gpt_neox", "opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "phi3",
            "bloom", "falcon", "gptj", "bert", "roberta", "distilbert", "albert", "electra")


def _hf(arch: str, width: int = _HF_SMALL["width"]):
    def build(vocab: int, context: int):
        cls, cfg = _hf_config(arch, vocab, context, width)
        cfg.use_cache = False
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):   # GPT-2's 50256 etc. outside a small vocabulary
            v = getattr(cfg, k, None)
            if isinstance(v, int) and v >= vocab:
                setattr(cfg, k, None)
        model = cls(cfg)
        model.hf_context = context
        return model
    return build


HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def hf_input_names(model) -> list[str]:
    """The inputs of HF_INPUTS that `export_hf` gives the model: those its forward takes, token types only where the
    model has a token-type table (BERT-like encoders; GPT-2's forward takes them too but reads them through its word
    embeddings, and exporters of decoders leave them out)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    types = getattr(model.config, "type_vocab_size", 0) or 0
    return [n for n in HF_INPUTS if n in params and (n != "token_type_ids" or types > 0)]


def export_hf(model, path: str | os.PathLike, context: int, vocab: int) -> Path:
    """Write a transformers LM as ONNX the way an exporter of HF models does: TorchScript exporter, EVAL mode, no
    constant folding, opset 17, `use_cache=False`, `return_dict=False`; inputs the token ids [batch, context] and
    whichever of `attention_mask`, `token_type_ids` (models with a token-type table) the model's forward takes (int64, [batch, context]); output
    `logits` [batch, context, vocab]; the batch dynamic."""
    import inspect
    import tempfile
    import warnings

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = inspect.signature(model.forward).parameters
    names = hf_input_names(model)
    ids = (torch.arange(2 * context).reshape(2, context) * 7 + 3) % vocab
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    class Wrap(torch.nn.Module):   # positional inputs -> keywords; the logits only
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *xs):
            return self.m(**dict(zip(names, xs)), use_cache=False, return_dict=False)[0] \
                if "use_cache" in params else self.m(**dict(zip(names, xs)), return_dict=False)[0]

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(Wrap(model.eval()), tuple(feeds[n] for n in names), tmp, dynamo=False,
                              export_params=True, training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False,
                              opset_version=17, input_names=names, output_names=["logits"],
                              dynamic_axes={**{n: {0: "batch"} for n in names}, "logits": {0: "batch"}})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
