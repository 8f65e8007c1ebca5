"""Tied weights stay tied: a parameter read in two ways (a token table read by the embedding's Gather and, through a
Transpose, by the LM head, as GPT-2's) or the same way twice (one Linear applied twice, as ALBERT's shared layers)
trains as one parameter, as in PyTorch. Before, constant folding turned each Transpose of the weight into an
initializer of its own, which trained as a separate parameter."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import torch_sgd_losses  # noqa: E402
from fracgraph.build import BuildOptions, build_artifacts, classify_initializers  # noqa: E402
from fracgraph.model import load_model  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402

V, T, D = 13, 6, 8


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, D)
        self.shared = torch.nn.Linear(D, D)          # applied twice
        self.norm = torch.nn.LayerNorm(D)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + torch.relu(self.shared(h))
        h = h + torch.relu(self.shared(h))
        return torch.nn.functional.linear(self.norm(h), self.emb.weight)   # the head: the token table, transposed


def _export(path):
    net = TiedLM().eval()
    ids = torch.arange(2 * T).reshape(2, T) % V
    torch.onnx.export(net, (ids,), path, dynamo=False, training=torch.onnx.TrainingMode.EVAL,
                      do_constant_folding=False, input_names=["ids"], output_names=["logits"],
                      dynamic_axes={"ids": {0: "B"}, "logits": {0: "B"}}, opset_version=17)
    return net


def test_tied_weights_are_one_parameter_each(tmp_path):
    net = _export(tmp_path / "m.onnx")
    m = load_model(tmp_path / "m.onnx")
    trainable, _ = classify_initializers(m)
    sizes = {t.name: int(np.prod(t.dims)) for t in m.graph.initializer}
    assert sum(sizes[x] for x in trainable) == sum(p.numel() for p in net.parameters())
    assert len(trainable) == len(list(net.parameters()))


def test_tied_weights_train_as_in_pytorch(tmp_path):
    """Three FP32 SGD steps at a large learning rate: the losses are PyTorch's with the weights tied (the third
    step depends on the first two updates of every weight, the tied ones included)."""
    net = _export(tmp_path / "m.onnx")
    art = build_artifacts(tmp_path / "m.onnx", tmp_path / "art", BuildOptions(momentum=0.0, weight_decay=0.0))
    assert art.task["kind"] == "language_model"
    sess = TrainSession(tmp_path / "art", seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (4, T + 1))
    bits = np.zeros((art.n_blocks, 3), np.float32)
    lr = 0.5
    ours = [float(sess.step(ids[:, :-1], ids[:, 1:], bits, lr)[0]) for _ in range(3)]
    x, y = torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:])
    theirs = torch_sgd_losses(net, lambda n: torch.nn.functional.cross_entropy(n(x).reshape(-1, V), y.reshape(-1)),
                              3, lr)
    # float32 sums of a few terms: a few ulps of the loss; an untied head or shared layer moves step 3 by ~1e-2
    np.testing.assert_allclose(ours, theirs, rtol=2e-5)
