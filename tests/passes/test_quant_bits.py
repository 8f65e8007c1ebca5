"""The quant-bits pass (passes/quant_bits.py) and its kernels (FakeQuantizeBits, SRQuantizeBits,
SRQuantizeNoiseBits in kernels/fused_ops.c): each quantizer of quantizers.py, after fused-ops and quant-branch, run
by onnxruntime with its scalar ops and If (the reference: onnxruntime's own Pow, Sub, Max, Div, Add and If) and
as the one node the pass writes, compared bitwise at 8, 4, 2 and 0 bits (and 16 and a fractional width),
per tensor and per channel (rows and columns), forward and error quantizers (the SR ones on the same noise: the
generator's stream, call after call, or a noise tensor); then a conv net's and an attention block's training step
with the pass on and off: loss and every gradient (and, over several optimizer steps at changing bits, every
parameter) bitwise equal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from fracgraph import kernels  # noqa: E402
from fracgraph.build import BuildOptions, build_artifacts  # noqa: E402
from fracgraph.passes.base import all_nodes, run_passes  # noqa: E402
from fracgraph.passes.fused_ops import FusedOpsPass  # noqa: E402
from fracgraph.passes.quant_bits import QuantBitsPass  # noqa: E402
from fracgraph.passes.quant_branch import QuantBranchPass  # noqa: E402
from fracgraph.quantizers import Emitter, fake_quant  # noqa: E402
from fracgraph.runtime import TrainSession  # noqa: E402

from conftest import export, seed_noise  # noqa: E402
from test_permute import Attention  # noqa: E402
from test_speed_passes import ConvZoo, _step, build_pair  # noqa: E402

# (x's shape, quantizer tag, reduction axes, stochastic); 3*8*30*30 elements: across the kernels' 16384-element chunks
CASES = {
    "act": ((3, 8, 30, 30), "::fq_a", None, False),
    "weight_rows": ((16, 8, 3, 3), "::fq_w", [1, 2, 3], False),     # a conv weight: MinMaxRows, [K, 1, 1, 1] ranges
    "weight_cols": ((40, 24), "::fq_w", [0], False),                # a MatMul weight: MinMaxCols, [1, K] ranges
    "error": ((3, 8, 30, 30), "::bwq", None, True),                 # SRQuantize: the generator's noise
    "error_noise": ((3, 8, 30, 30), "::bwq", None, True),           # SRQuantizeNoise: noise from a tensor
}
BITS = [8.0, 4.0, 2.0, 0.0, 16.0, 3.5, 8.0, -1.0, 2.0]   # a run after another: SR counters advance only when on


def quantizer_model(case: str) -> onnx.ModelProto:
    """x -> the quantizer of quantizers.py at the scalar input bits -> y, after fused-ops and quant-branch."""
    shape, tag, axes, stochastic = CASES[case]
    graph = helper.make_graph([], case, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape)),
                                         helper.make_tensor_value_info("bits", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    em = Emitter(graph, 17)
    fake_quant(em, "x", "y", f"/layer{tag}", "bits", axes=axes, stochastic=stochastic, train_slack=not stochastic)
    em.flush()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if case == "error_noise":   # the noise a graph input: both graphs then quantize with the same tensor
        rng = next(n for n in model.graph.node if n.op_type == "RandomUniformLike")
        model.graph.node.remove(rng)
        model.graph.input.append(helper.make_tensor_value_info(rng.output[0], TensorProto.FLOAT, list(shape)))
    model, _ = run_passes(model, [FusedOpsPass(), QuantBranchPass()])
    return model


def session(model: onnx.ModelProto, threads: int = 2) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    kernels.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", list(CASES))
def test_one_node_is_the_chain_bitwise(case):
    before = quantizer_model(case)
    after = onnx.ModelProto()
    after.CopyFrom(before)
    after, notes = run_passes(after, [QuantBitsPass()])
    ops = [n.op_type for n in all_nodes(after.graph)]
    op = {"act": "FakeQuantizeBits", "weight_rows": "FakeQuantizeBits", "weight_cols": "FakeQuantizeBits",
          "error": "SRQuantizeBits", "error_noise": "SRQuantizeNoiseBits"}[case]
    ranges = {"weight_rows": "MinMaxRows", "weight_cols": "MinMaxCols"}.get(case, "MinMax")
    # the range statistic and the quantizer, reading the bits input: no If, no scalar op
    assert sorted(ops) == sorted([ranges, op]), ops
    assert "If" in [n.op_type for n in before.graph.node]
    assert any("1 quantizers as one node" in n for n in notes)
    shape = CASES[case][0]
    rng = np.random.default_rng(7)
    s0, s1 = session(before), session(after)
    for k, b in enumerate(BITS):
        x = (rng.standard_normal(shape) * (3.0 if k % 2 else 0.02) + k).astype(np.float32)
        feed = {"x": x, "bits": np.array(b, np.float32)}
        if case == "error_noise":
            feed["/layer::bwq/noise"] = rng.uniform(-0.5, 0.5, shape).astype(np.float32)
        y0, y1 = s0.run(None, feed)[0], s1.run(None, feed)[0]
        assert y1.shape == x.shape and np.array_equal(y0, y1), (case, b)
        if b <= 0:
            assert np.array_equal(y1, x)
        else:
            assert not np.array_equal(y1, x)


def test_one_thread_and_two_agree():
    model, _ = run_passes(quantizer_model("weight_rows"), [QuantBitsPass()])
    x = np.random.default_rng(3).standard_normal(CASES["weight_rows"][0]).astype(np.float32)
    feed = {"x": x, "bits": np.array(4.0, np.float32)}
    assert np.array_equal(session(model, 1).run(None, feed)[0], session(model, 2).run(None, feed)[0])


def test_declines_what_it_cannot_prove():
    """A levels chain that is not Max(Pow(2, b) - 1, 1) (here 3^b) stays as it is, with the reason."""
    model = quantizer_model("act")
    pow2 = next(n for n in model.graph.node if n.op_type == "Pow")
    three = "test::three"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(3.0, np.float32), three))
    pow2.input[0] = three
    before = [n.op_type for n in model.graph.node]
    model, notes = run_passes(model, [QuantBitsPass()])
    assert [n.op_type for n in model.graph.node] == before
    assert any("kept (bits::levels is not Max(Pow(2, bits) - 1, 1))" in n for n in notes), notes


def test_bad_bits_shape_is_one_clear_error():
    model, _ = run_passes(quantizer_model("act"), [QuantBitsPass()])
    model.graph.input[1].type.tensor_type.shape.dim.add().dim_value = 2
    with pytest.raises(Exception, match="bits must be a scalar"):
        session(model).run(None, {"x": np.ones(CASES["act"][0], np.float32), "bits": np.ones(2, np.float32)})


# -- whole training steps ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conv_pair(tmp_path_factory):
    """ConvZoo (a conv net: act, per-channel weight and error quantizers; int-gemm's IntConvs read min and scale)
    with quant-bits off and on; noise exposed (SRQuantizeNoiseBits)."""
    return build_pair(ConvZoo(), tmp_path_factory.mktemp("qbits"), (2, 3, 9, 9),
                      off={"skip_passes": ("quant-bits",)}, on={})


@pytest.mark.parametrize("bits", [(8, 8, 8), (4, 4, 6), (2, 2, 2), (0, 0, 0), (8, 0, 4)])
def test_conv_step_bitwise(conv_pair, bits):
    loss0, grads0, noise0 = _step(conv_pair[False][0], bits)
    loss1, grads1, noise1 = _step(conv_pair[True][0], bits)
    assert noise0.keys() == noise1.keys() and all(np.array_equal(noise0[k], noise1[k]) for k in noise0)
    assert loss0 == loss1 and grads0.keys() == grads1.keys() and len(grads0) >= 11
    for name, g in grads0.items():
        assert np.array_equal(grads1[name], g), name


def test_conv_structure(conv_pair):
    def graph(key):
        return onnx.load(str(conv_pair[key][0] / "training_model.onnx")).graph

    off, on = graph(False), graph(True)
    ops = [n.op_type for n in on.node]
    assert ops.count("FakeQuantizeBits") == 16 and ops.count("SRQuantizeNoiseBits") == 8
    assert "FakeQuantize" not in [n.op_type for n in all_nodes(on)] and ops.count("Pow") < 16
    # the Ifs left are int-gemm's integer/float switches, none a quantizer's
    assert all("::int" in n.name for n in on.node if n.op_type == "If")
    assert sum(n.op_type == "If" for n in off.node) - sum(n.op_type == "If" for n in on.node) == 24
    note = next(n for n in conv_pair[True][1].extra["notes"] if n.startswith("[quant-bits]"))
    removed = int(note.split(" and ")[-1].split()[0])   # each If became one node; the scalars went
    assert note.startswith("[quant-bits] 24 quantizers as one node") and len(off.node) - len(on.node) == removed > 100
    # what another node reads stays: the activation ranges' EMA (min, range) and the IntConvs' min and scale; the
    # stop-gradient Clips of min and max are gone, their readers read the MinMax outputs
    names = {o for n in on.node for o in n.output}
    assert "/c0/Conv::fq_a0/range" in names and "/c0/Conv::fq_a0/min" not in names
    assert not any(n.op_type == "Clip" and "::fq_" in n.name for n in on.node)
    assert [n.input for n in on.node if n.name == "/c0/Conv::fq_a0/ema_min/diff"] == [["/c0/Conv::fq_a0/min_raw",
                                                                                       "/c0/Conv::fq_a0.run_min"]]
    int_reads = {i for n in on.node if "::int" in n.name for i in n.input}   # ::int/, ::int_dw/
    scales = [n.output[0] for n in on.node if n.output[0].endswith("/scale")]
    assert scales and all(s in int_reads for s in scales)   # a scale no IntConv reads is gone


@pytest.fixture(scope="module")
def attention_pair(tmp_path_factory):
    """A transformer block (tests/passes/test_permute.py's Attention: MatMul weights per column, GELU-free) with the
    noise drawn by the fused generator (SRQuantizeBits), quant-bits off and on."""
    d = tmp_path_factory.mktemp("qbits_attn")
    torch.manual_seed(0)
    path = export(Attention(), d / "model.onnx", shape=(2, 3, 4, 4))
    out = {}
    for key, skip in ((False, ("quant-bits",)), (True, ())):
        art = d / f"art_{key}"
        build_artifacts(path, art, BuildOptions(skip_passes=skip))
        seed_noise(art)
        out[key] = art
    return out


def test_attention_steps_bitwise(attention_pair):
    """Several optimizer steps at changing bits (0 bits between: the SR generators must skip alike): every loss and,
    at the end, every parameter bitwise equal; the one-node build holds no quantizer If."""
    rng = np.random.default_rng(2)
    batches = [(rng.standard_normal((5, 3, 4, 4)).astype(np.float32), rng.integers(0, 4, 5).astype(np.int64))
               for _ in range(4)]
    results = {}
    for key, art in attention_pair.items():
        sess = TrainSession(art, seed=3, threads=2)
        losses = []
        for (x, y), b in zip(batches, [(8, 8, 8), (4, 4, 0), (0, 0, 0), (2, 2, 6)]):
            bits = np.tile(np.asarray(b, np.float32), (sess.manifest.n_blocks, 1))
            losses.append(sess.step(x, y, bits, lr=0.05)[0])
        results[key] = (losses, {k: np.array(sess.state.parameters[k].data, copy=True) for k in sess.trainable})
    (l0, p0), (l1, p1) = results[False], results[True]
    assert l0 == l1 and p0.keys() == p1.keys() and len(p0) >= 12
    assert all(np.array_equal(p0[k], p1[k]) for k in p0)
    on = onnx.load(str(attention_pair[True] / "training_model.onnx")).graph
    ops = [n.op_type for n in on.node]
    assert ops.count("SRQuantizeBits") >= 6 and ops.count("FakeQuantizeBits") >= 12
    assert not any(n.op_type == "If" and "::int" not in n.name for n in on.node)
