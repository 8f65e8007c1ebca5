"""embedding-padding: an nn.Embedding's padding_idx row gets no gradient from its lookups, as in PyTorch (ONNX's
Gather does not carry padding_idx). The reference is PyTorch's own SGD steps on the same module."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import torch_sgd_losses  # noqa: E402
from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.passes.embedding_padding import padding_row  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402

V, T, D, PAD = 11, 6, 8, 1


class PaddedLM(torch.nn.Module):
    """Token and position tables with padding_idx (as HF's BERT/MPNet/RoBERTa), positions of pad tokens at the
    padding row, a LayerNorm with HF's eps 1e-12 (a pad token's embedding is a zero vector there), a tied head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok = torch.nn.Embedding(V, D, padding_idx=PAD)
        self.pos = torch.nn.Embedding(T + 2, D, padding_idx=PAD)
        self.norm = torch.nn.LayerNorm(D, eps=1e-12)
        self.fc = torch.nn.Linear(D, D)

    def forward(self, ids):
        mask = ids.ne(PAD).long()
        positions = torch.cumsum(mask, 1) * mask + PAD
        h = self.norm(self.tok(ids) + self.pos(positions))
        return torch.nn.functional.linear(torch.relu(self.fc(h)) + h, self.tok.weight)


def test_padding_row_is_the_single_zero_row():
    t = np.ones((5, 3), np.float32)
    assert padding_row(t) is None
    t[2] = 0
    assert padding_row(t) == 2
    t[4] = 0
    assert padding_row(t) is None                     # two zero rows: not a padding_idx
    assert padding_row(np.zeros((5, 3), np.float32)) is None   # a zero-initialized table trains every row


@pytest.mark.parametrize("momentum,embeddings", [(0.0, "fp32"), (0.9, "fp32"), (0.0, "quantize")])
def test_padded_lookups_train_as_in_pytorch(tmp_path, momentum, embeddings):
    """At 0 bits, so with the embedding quantizers in the graph ("quantize") their straight-through identity."""
    from fracgraph.policy import LayerPolicy

    net = PaddedLM().eval()
    ids = torch.arange(2 * T).reshape(2, T) % V
    torch.onnx.export(net, (ids,), tmp_path / "m.onnx", dynamo=False, training=torch.onnx.TrainingMode.EVAL,
                      do_constant_folding=False, input_names=["ids"], output_names=["logits"],
                      dynamic_axes={"ids": {0: "B"}, "logits": {0: "B"}}, opset_version=17)
    m = build_artifacts(tmp_path / "m.onnx", tmp_path / "art", BuildOptions(momentum=momentum, weight_decay=0.0,
                                                                             policy=LayerPolicy(embeddings=embeddings)))
    assert sum("row 1 of the table is all zeros" in n for n in m.extra["notes"]) == 2          # both tables
    sess = TrainSession(tmp_path / "art", seed=0)
    rng = np.random.default_rng(0)
    seq = rng.integers(0, V, (4, T + 1))
    seq[:, :3][seq[:, :3] % 3 == 0] = PAD             # pad tokens, at the padding position too
    bits = np.zeros((m.n_blocks, 3), np.float32)
    lr = 0.05
    ours = [float(sess.step(seq[:, :-1], seq[:, 1:], bits, lr)[0]) for _ in range(4)]
    x, y = torch.from_numpy(seq[:, :-1]), torch.from_numpy(seq[:, 1:])
    theirs = torch_sgd_losses(net, lambda n: torch.nn.functional.cross_entropy(n(x).reshape(-1, V), y.reshape(-1)),
                              4, lr, momentum)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    # without the mask the padding rows take the 1/sqrt(1e-12)-scaled LayerNorm gradient and step 2 explodes
    off = build_artifacts(tmp_path / "m.onnx", tmp_path / "off", BuildOptions(momentum=momentum, weight_decay=0.0,
                                                                               policy=LayerPolicy(embeddings=embeddings),
                                                                               skip_passes=("embedding-padding",)))
    sess = TrainSession(tmp_path / "off", seed=0)
    unmasked = [float(sess.step(seq[:, :-1], seq[:, 1:], bits, lr)[0]) for _ in range(2)]
    assert unmasked[0] == pytest.approx(theirs[0], rel=1e-5) and unmasked[1] > 10 * theirs[1]
