"""qdq-act computes the activation quantizers with QuantizeLinear/DequantizeLinear: the step's loss and every
gradient are bitwise those of the six-op chain (the error quantizers are off here, so no noise is drawn), for bits
on the fused path (<= 8, including non-power-of-two levels) and above it (the kept chain)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402

from conftest import export  # noqa: E402
from test_speed_passes import ConvZoo, _step  # noqa: E402


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("qdq")
    path = export(ConvZoo(), d / "zoo.onnx", shape=(2, 3, 9, 9))
    return {on: build_artifacts(path, d / f"art_{on}", BuildOptions(fused_kernels=False,   # qdq-act is the --no-fused-kernels path
                                                                            skip_passes=() if on else ("qdq-act",))) and d / f"art_{on}"
            for on in (False, True)}


def test_activation_quantizers_are_fused(builds):
    graph = onnx.load(str(builds[True] / "training_model.onnx")).graph
    fused = [n for n in graph.node if n.op_type == "If" and "::fq_a" in n.name]
    inner = [m for n in fused for a in n.attribute if a.name == "then_branch" for m in a.g.node if m.op_type == "If"]
    assert len(fused) == len(inner) == 8       # every act quantizer, each with its bits <= 8 select
    ops = {m.op_type for n in inner for a in n.attribute if a.name == "then_branch" for m in a.g.node}
    assert ops == {"QuantizeLinear", "DequantizeLinear", "Add"}
    before = onnx.load(str(builds[False] / "training_model.onnx")).graph
    assert not any(n.op_type == "LessOrEqual" for n in before.node)


@pytest.mark.parametrize("bits", [(8, 8, 0), (3, 4, 0), (5.5, 8, 0), (12, 8, 0)])
def test_fused_step_is_bitwise_the_chain(builds, bits):
    loss0, grads0, _ = _step(builds[False], bits)
    loss1, grads1, _ = _step(builds[True], bits)
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys()
    for name, g in grads0.items():
        assert np.array_equal(grads1[name], g), name
