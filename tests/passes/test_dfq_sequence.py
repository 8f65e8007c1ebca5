"""DFQ on a transformer: the gate reads the block input pooled over the sequence ([B, T, C] -> mean over T), and a
DFQ step of the GPT runs with the attention GEMMs in the gated blocks (issue 16 item 4)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.passes.dfq_gate import CP_OUTPUT, DfqOptions  # noqa: E402
from fracgraph.policy import LayerPolicy  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402
from fracgraph.zoo import export_gpt  # noqa: E402

C, T, V = 16, 8, 11


def test_gpt_gate_pools_over_the_sequence(tmp_path):
    import onnxruntime as ort

    export_gpt(tmp_path / "gpt.onnx", seed=0, layers=1, heads=2, width=C, context=T, vocab=V)
    m = build_artifacts(tmp_path / "gpt.onnx", tmp_path / "art",
                        BuildOptions(dfq=DfqOptions(), policy=LayerPolicy(first="quantize"), fused_kernels=False))
    assert m.n_blocks == 2 and m.task["kind"] == "language_model"
    assert all(d["quantized"] for d in m.ops if d["name"] != "/head/MatMul")   # QK^T and AV gated too
    sess = TrainSession(tmp_path / "art", seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (4, T)).astype(np.int64)
    labels = rng.integers(0, V, (4, T)).astype(np.int64)
    bits = np.zeros((2, 3), np.float32)
    bits[:, 1] = 4
    sess.step(ids, labels, bits, 1e-3, target=3.0, beta=1e-3)
    assert np.isfinite(float(sess.last_outputs[CP_OUTPUT])) and float(sess.last_outputs[CP_OUTPUT]) > 0

    # the gate's input of block 0: the embedding sum (its block input) averaged over the T positions, a [B, C] vector
    ev = onnx.load(str(tmp_path / "art" / m.files["eval"]))
    node = next(n for n in ev.graph.node if n.name == "dfq::b0/seq_mean")
    ev.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    inf = ort.InferenceSession(ev.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"ids": ids, "fracgraph_bits": bits, "fracgraph_dfq_target": np.array(3.0, np.float32),
             "fracgraph_dfq_beta": np.array(0.0, np.float32), "labels": labels}
    names = {i.name for i in inf.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    feeds.update({n: sess.parameter(n) for n in names - set(feeds)})
    pooled = inf.run([node.output[0]], feeds)[0]
    want = (sess.parameter("tok.weight")[ids] + sess.parameter("pos")).mean(1)
    assert pooled.shape == (4, C)
    np.testing.assert_allclose(pooled, want, rtol=1e-5, atol=1e-6)
