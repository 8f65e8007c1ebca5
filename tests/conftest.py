"""Shared fixtures: a small CNN with every layer kind the passes must handle, exported the verified way."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn


class SmallResNet(nn.Module):
    """conv-BN-ReLU stem, one residual block with a downsample conv, global pooling, FC."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.down = nn.Conv2d(8, 12, 1, stride=2, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = torch.relu(y + self.bn3(self.down(x)))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def export(model, path, shape=(2, 3, 8, 8)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), torch.randn(*shape), str(path), dynamo=False, training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
        )
    return path


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallResNet()
    path = export(model, tmp_path_factory.mktemp("small") / "small.onnx")
    return model, path


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 8).astype(np.int64)


def seed_noise(art) -> None:
    """Give each RandomUniformLike of an artifact dir's training graph a seed from its name. Unseeded, onnxruntime
    seeds them by their place in the graph, so any rewrite elsewhere in the graph draws other noise; with the
    name's seed a step's noise is the same whatever the other passes did."""
    import zlib

    import onnx
    from onnx import helper

    path = str(art / "training_model.onnx")
    model = onnx.load(path)
    for n in model.graph.node:
        if n.op_type == "RandomUniformLike" and not any(a.name == "seed" for a in n.attribute):
            n.attribute.append(helper.make_attribute("seed", float(zlib.crc32(n.name.encode()) % 100003)))
    onnx.save(model, path)


def custom_op_session(op: str, inputs: list[str], outputs: list[str], threads: int = 2, **attrs):
    """An onnxruntime session running the single fracgraph custom op `op` (fracgraph/kernels) on float tensors."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from fracgraph import kernels

    graph = helper.make_graph([helper.make_node(op, inputs, outputs, domain=kernels.DOMAIN, **attrs)], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    kernels.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _mix(z):
    """SplitMix64's finalizer on uint64 arrays (wrapping multiplies)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sr_noise_ref(seed: int, node_salt: int, call: int, n: int) -> np.ndarray:
    """The fused error quantizer's noise (fracgraph/kernels/fused_ops.c's header, written from its formula):
    U(-0.5, 0.5) of the `call`-th run of a node with `node_salt` under process seed `seed`."""
    i = np.arange(n, dtype=np.uint64)
    j = (i // np.uint64(32)) * np.uint64(16) + i % np.uint64(16)   # element i's hash: two elements per hash
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed) ^ _mix(np.uint64(node_salt) ^ _mix(np.uint64(call))))
        z = _mix(key + (j + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
    bits = np.where(i % np.uint64(32) < np.uint64(16), z >> np.uint64(40), (z >> np.uint64(16)) & np.uint64(0xFFFFFF))
    return bits.astype(np.float32) * np.float32(2.0 ** -24) - np.float32(0.5)
