"""The quantizer subgraphs against a numpy implementation of spec §1.1, run by onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from fracgraph.quantizers import Emitter, fake_quant


def np_fq(x, bits, axes=None):
    mn = x.min(axis=axes, keepdims=True) if axes else x.min()
    mx = x.max(axis=axes, keepdims=True) if axes else x.max()
    levels = 2.0 ** bits - 1
    s = np.maximum((mx - mn) / levels, 1e-8)
    return np.round(np.clip((x - mn) / s, 0, levels)) * s + mn


def run_fq(x, bits, axes=None, stochastic=False, opset=17):
    graph = helper.make_graph([], "fq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
                                         helper.make_tensor_value_info("b", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])
    em = Emitter(graph, opset)
    fake_quant(em, "x", "y", "q", "b", axes=axes, stochastic=stochastic, train_slack=not stochastic)
    em.flush()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "b": np.array(bits, np.float32)})[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("opset", [17, 18])
def test_per_tensor_matches_numpy_and_has_at_most_2b_levels(bits, opset):
    x = np.random.default_rng(bits).standard_normal((16, 4, 5, 5)).astype(np.float32)
    y = run_fq(x, bits, opset=opset)
    np.testing.assert_allclose(y, np_fq(x, bits), rtol=1e-6, atol=1e-6)
    assert len(np.unique(y)) <= 2 ** bits
    assert y.min() == pytest.approx(x.min()) and y.max() == pytest.approx(x.max(), rel=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_per_channel_weights(bits):
    w = np.random.default_rng(1).standard_normal((6, 3, 3, 3)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None, None, None]
    y = run_fq(w, bits, axes=[1, 2, 3])
    np.testing.assert_allclose(y, np_fq(w, bits, axes=(1, 2, 3)), rtol=1e-6, atol=1e-6)
    for k in range(6):
        assert len(np.unique(y[k])) <= 2 ** bits


def test_zero_bits_is_exact_passthrough():
    x = np.random.default_rng(2).standard_normal((4, 7)).astype(np.float32)
    assert np.array_equal(run_fq(x, 0), x)


def test_stochastic_rounding_is_unbiased_and_on_the_grid():
    x = np.full((200000,), 0.3, np.float32)
    x[0], x[1] = 0.0, 1.0                       # range [0, 1], 1 bit -> levels {0, 1}
    y = run_fq(x, 1, stochastic=True)
    assert set(np.unique(y).tolist()) <= {0.0, 1.0}
    assert abs(y[2:].mean() - 0.3) < 0.01        # E[SR(0.3)] = 0.3; nearest rounding would give 0
