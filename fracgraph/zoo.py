"""Reference model zoo: the CIFAR networks of FracTrain (spec §6), exported to ONNX for the rest of fracgraph.

The models mirror the authors' `cifar/models.py` so that MAC counts and layer treatment (spec §1.3) line up with
the paper. Export keeps the module's state-dict names and leaves BatchNormalization as its own node, because the
quantize passes find convs, BNs and their parameters by name and must see the unfolded training graph.

torch is imported only here: the rest of the package reads ONNX and must not need torch at import time.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
import torch.nn.functional as F
from onnx import numpy_helper

from fracgraph.errors import FracgraphError

CLASSES = (10, 100)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
INPUT_SHAPE = (3, 32, 32)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=False)


def _init_authors(model: nn.Module) -> None:
    """The authors' init: conv ~ N(0, sqrt(2 / (k*k*Cout))), BN weight 1 bias 0, Linear left at torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


# --- CIFAR ResNet-(6n+2), BasicBlock, option-B shortcut -----------------------------------------------------------

class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) then ReLU; the shortcut's BN is the block's `bn3` as in OFF."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = _conv1x1(cin, cout, stride)
            self.bn3 = nn.BatchNorm2d(cout)
        else:
            self.downsample = None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.bn3(self.downsample(x))
        return F.relu(out + residual)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: widths 16/32/64, AvgPool(8), FC(64 -> classes)."""

    def __init__(self, n: int, classes: int = 10):
        super().__init__()
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, classes)
        _init_authors(self)

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --- ResNet-164: pre-activation bottleneck (He et al. 2016, "Identity Mappings"), CIFAR version ------------------

class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3(stride), BN-ReLU-conv1x1(x4); a 1x1 projection of the pre-activated input
    when the shape changes (both branches share the pre-activation, as in fb.resnet.torch 'both_preact')."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv1x1(cin, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, cout)
        self.shortcut = _conv1x1(cin, cout, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + residual


class PreActResNet(nn.Module):
    """Pre-activation bottleneck ResNet-(9n+2): widths 16 -> 64/128/256, final BN-ReLU, AvgPool(8), FC."""

    def __init__(self, n: int, classes: int = 10):
        super().__init__()
        self.conv1 = _conv3x3(3, 16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(64, 32, n, 2)
        self.layer3 = self._stage(128, 64, n, 2)
        self.bn = nn.BatchNorm2d(256)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(256, classes)
        _init_authors(self)

    @staticmethod
    def _stage(cin: int, planes: int, n: int, stride: int) -> nn.Sequential:
        e = PreActBottleneck.expansion
        return nn.Sequential(*[PreActBottleneck(cin if i == 0 else planes * e, planes, stride if i == 0 else 1)
                               for i in range(n)])

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --- MobileNetV2 (CIFAR) -------------------------------------------------------------------------------------------

MBV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3, project 1x1 (BN after each, ReLU after the first two). At stride 1 the block adds
    its input, through a 1x1 conv + BN shortcut when in != out (the authors' variant); at stride 2 it does not."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * cin
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(_conv1x1(cin, cout), nn.BatchNorm2d(cout))
        else:
            self.shortcut = None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 1:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2: stride-1 stem 3->32, 17 inverted-residual blocks, 1x1 conv 320->1280, AvgPool(4), FC."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = _conv3x3(3, 32)
        self.bn1 = nn.BatchNorm2d(32)
        blocks, cin = [], 32
        for t, c, n, s in MBV2_CFG:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, t, s if i == 0 else 1))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.conv2 = _conv1x1(320, 1280)
        self.bn2 = nn.BatchNorm2d(1280)
        self.avgpool = nn.AvgPool2d(4)
        self.fc = nn.Linear(1280, classes)
        _init_authors(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --- registry and export -------------------------------------------------------------------------------------------

class DigitNet(nn.Module):
    """A small residual CNN for 1x8x8 inputs (scikit-learn's digits, the embedded default data): stem conv 1->16,
    two BasicBlocks (16 -> 16, 16 -> 32 stride 2), global pooling, FC. Same layer kinds as the CIFAR ResNets."""

    input_shape = (1, 8, 8)

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = _conv3x3(1, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2))
        self.fc = nn.Linear(32, classes)
        _init_authors(self)

    def forward(self, x):
        x = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


_BUILDERS = {
    "resnet20": lambda classes: CifarResNet(3, classes),
    "resnet38": lambda classes: CifarResNet(6, classes),
    "resnet74": lambda classes: CifarResNet(12, classes),
    "resnet110": lambda classes: CifarResNet(18, classes),
    "resnet164": lambda classes: PreActResNet(18, classes),
    "mobilenetv2": lambda classes: MobileNetV2(classes),
    "digitnet": lambda classes: DigitNet(classes),
}
MODELS: tuple[str, ...] = tuple(_BUILDERS)


def _check(name: str, classes: int) -> None:
    if name not in _BUILDERS:
        raise FracgraphError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}, gpt")
    if classes not in CLASSES:
        raise FracgraphError(f"--classes must be one of {', '.join(map(str, CLASSES))}, got {classes}")


def build(name: str, classes: int = 10, seed: int | None = None) -> nn.Module:
    """A freshly initialised zoo model in eval mode. With `seed`, init draws from a private RNG state so the
    caller's global torch RNG is left exactly as it was."""
    _check(name, classes)
    if seed is None:
        model = _BUILDERS[name](classes)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _BUILDERS[name](classes)
    return model.eval()


def _undo_dedup(proto: onnx.ModelProto, order: list[str]) -> None:
    """Give every parameter and buffer its own initializer again, in state-dict order.

    In eval mode the TorchScript exporter merges initializers with equal values (a fresh BN's bias, running_mean,
    and its twins in every other BN) into one tensor read through Identity nodes. A training graph must not share
    a trainable bias with a running statistic, and the passes look parameters up by name, so each Identity of an
    initializer becomes a copy of that initializer under the Identity's output name.
    """
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in inits:
            copy = numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]), node.output[0])
            inits[node.output[0]] = copy
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    rank = {n: i for i, n in enumerate(order)}
    ordered = sorted(inits.values(), key=lambda t: (rank.get(t.name, len(rank)), t.name))
    del g.initializer[:]
    g.initializer.extend(ordered)


def export_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Export an eval-mode CIFAR model to `path` atomically (temp file in the same folder, then os.replace).

    TrainingMode.EVAL writes inference BatchNorm; with constant folding off the exporter skips its eval peephole,
    which would fold BN into the preceding Conv and rename the weights. A dummy input of zeros keeps the bytes
    independent of the RNG.
    """
    path = Path(path)
    if model.training:
        raise FracgraphError("export_model needs a model in eval mode (call model.eval())")
    return _export(model, path, torch.zeros(1, *getattr(model, "input_shape", INPUT_SHAPE)), INPUT_NAME)


def _export(model: nn.Module, path: str | os.PathLike, x: torch.Tensor, input_name: str, fix=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice is not the user's concern
            torch.onnx.export(
                model, (x,), tmp, dynamo=False, export_params=True,
                training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False, opset_version=OPSET,
                input_names=[input_name], output_names=[OUTPUT_NAME],
                dynamic_axes={input_name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        proto = onnx.load(tmp)
        _undo_dedup(proto, list(model.state_dict()))
        if fix is not None:
            fix(proto)
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export(name: str, path: str | os.PathLike, classes: int = 10, seed: int = 0) -> Path:
    """Build zoo model `name` with init seed `seed` and write it to `path` as ONNX; same seed, same bytes."""
    return export_model(build(name, classes, seed=seed), path)


# --- GPT: a character-level decoder-only transformer (nanoGPT-style) ---------------------------------------------

GPT_DEFAULTS = {"layers": 4, "heads": 4, "width": 128, "context": 64, "vocab": 65}
TOKENS_NAME = "ids"


class PrimitiveLayerNorm(nn.Module):
    """LayerNorm over the last axis written with primitive ops (ReduceMean, Sub, Mul, Add, Sqrt, Div).

    onnxruntime-training 1.19.2 has no gradient for a LayerNormalization node exported without its optional
    mean/inv-std outputs, and the TorchScript exporter writes it that way; the primitives all have gradients.
    Same math as torch.nn.LayerNorm (biased variance, eps inside the square root).
    """

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x):
        d = x - x.mean(-1, keepdim=True)
        var = (d * d).mean(-1, keepdim=True)
        return d / torch.sqrt(var + self.eps) * self.weight + self.bias


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: q/k/v and output projections (MatMul + bias), softmax(QK^T/sqrt(d)) V.
    The causal mask is a constant boolean buffer (an initializer) applied with Where; the sequence length is
    the model's fixed context (the batch stays symbolic), so every Reshape has a constant shape."""

    def __init__(self, width: int, heads: int, context: int):
        super().__init__()
        if width % heads:
            raise FracgraphError(f"--width {width} must be a multiple of --heads {heads}")
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.heads, self.width, self.context = heads, width, context
        self.register_buffer("future", torch.triu(torch.ones(context, context, dtype=torch.bool), 1).view(1, 1, context, context))

    def forward(self, x):
        T, C, H = self.context, self.width, self.heads

        def split(t):
            return t.reshape(-1, T, H, C // H).transpose(1, 2)          # [B, H, T, d]

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(C // H))
        att = torch.softmax(att.masked_fill(self.future, float("-inf")), dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(-1, T, C)
        return self.proj(y)


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer layer: x + attn(ln1(x)), then + mlp(ln2(x)) with a 4x GELU MLP."""

    def __init__(self, width: int, heads: int, context: int):
        super().__init__()
        self.ln1 = PrimitiveLayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context)
        self.ln2 = PrimitiveLayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Character-level decoder-only transformer (nanoGPT-style): token embedding + learned position embedding,
    `layers` pre-LN blocks, final LayerNorm, linear head (no bias, untied). Input int64 ids [B, context], output
    logits [B, context, vocab]. The position embedding is one [context, width] parameter (nanoGPT's wpe read at
    positions 0..context-1, which is all this fixed-context model reads). nanoGPT's init: N(0, 0.02), biases 0,
    the residual projections N(0, 0.02/sqrt(2 layers))."""

    def __init__(self, layers: int = 4, heads: int = 4, width: int = 128, context: int = 64, vocab: int = 65):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList([GPTBlock(width, heads, context) for _ in range(layers)])
        self.ln_f = PrimitiveLayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.context, self.vocab = context, vocab
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.proj.weight", "fc_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids):
        x = self.tok(ids) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def build_gpt(layers: int = 4, heads: int = 4, width: int = 128, context: int = 64, vocab: int = 65,
              seed: int | None = 0) -> GPT:
    for k, v in (("layers", layers), ("heads", heads), ("width", width), ("context", context), ("vocab", vocab)):
        if not isinstance(v, int) or v < 1:
            raise FracgraphError(f"--{k} must be a positive integer, got {v!r}")
    if vocab < 2:
        raise FracgraphError(f"--vocab must be at least 2, got {vocab}")
    if seed is None:
        model = GPT(layers, heads, width, context, vocab)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GPT(layers, heads, width, context, vocab)
    return model.eval()


def export_gpt(path: str | os.PathLike, seed: int = 0, **sizes) -> Path:
    """Build the zoo GPT (`sizes`: layers, heads, width, context, vocab) and write it as ONNX: input `ids`
    int64 [batch, context], output `logits` [batch, context, vocab]; same seed, same bytes."""
    model = build_gpt(**{**GPT_DEFAULTS, **sizes}, seed=seed)
    return _export(model, path, torch.zeros(1, model.context, dtype=torch.long), TOKENS_NAME, _fold_weight_transposes)


def _fold_weight_transposes(proto: onnx.ModelProto) -> None:
    """A Linear on a 3-D input exports as MatMul(x, Transpose(W)); store W^T under W's own name instead, so the
    weight keeps its state-dict name (holding the [in, out] matrix) rather than a folded Transpose's output name."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for node in g.node:
        for x in node.input:
            readers[x] = readers.get(x, 0) + 1
    keep, renamed = [], {}
    for node in g.node:
        w = node.input[0] if node.input else None
        if node.op_type == "Transpose" and w in inits and readers[w] == 1 and len(inits[w].dims) == 2:
            arr = numpy_helper.to_array(inits[w]).T.copy()
            inits[w].CopyFrom(numpy_helper.from_array(arr, w))
            renamed[node.output[0]] = w
        else:
            keep.append(node)
    for node in keep:
        for i, x in enumerate(node.input):
            if x in renamed:
                node.input[i] = renamed[x]
    del g.node[:]
    g.node.extend(keep)
