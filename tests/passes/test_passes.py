"""Structure each pass leaves behind, one test per pass (numbers are checked in test_step_reference.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fracgraph.build import PRECISION_INPUT, BuildOptions, build_artifacts, plan
from fracgraph.model import load_model
from fracgraph.passes.base import Pass, PassError, PassResult, all_nodes, run_passes
from fracgraph.passes.bw_marker import BwMarkerPass, gradient_node_name, marker_name
from fracgraph.passes.fw_quant import FwQuantPass, weight_channel_axes
from fracgraph.policy import LayerPolicy
from fracgraph.quantizers import float_input


@pytest.fixture(scope="module")
def planned(small_model):
    model = load_model(small_model[1])
    _, blocks, _, ops = plan(model, LayerPolicy())
    model.graph.input.append(float_input(PRECISION_INPUT, [len(blocks), 3]))
    return model, ops


@pytest.fixture(scope="module")
def art(small_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "art"
    build_artifacts(small_model[1], out, BuildOptions())
    return out


def test_fw_quant_rewires_both_operands_with_deterministic_names(planned):
    model, ops = planned
    model = onnx.ModelProto.FromString(model.SerializeToString())
    fw = FwQuantPass([(d, d["block"]) for d in ops if d["quantized"]], PRECISION_INPUT)
    model, notes = run_passes(model, [fw])
    conv = next(n for n in model.graph.node if n.name == "/conv2/Conv")
    assert list(conv.input[:2]) == ["/conv2/Conv::fq_a0/out", "/conv2/Conv::fq_w1/out"]
    inits = {t.name for t in model.graph.initializer}
    assert {"/conv2/Conv::fq_a0.run_min", "/conv2/Conv::fq_a0.run_range"} <= inits
    assert sum(1 for n in model.graph.node if n.op_type == "Round") == 7   # 4 weights + 3 activations
    assert len(notes) == 4


def test_weight_channel_axes():
    assert weight_channel_axes("Conv", 4, 0) == [1, 2, 3]
    assert weight_channel_axes("Gemm", 2, 1) == [1] and weight_channel_axes("Gemm", 2, 0) == [0]
    assert weight_channel_axes("MatMul", 2, 0) == [0]


def test_bw_marker_keeps_tensor_names(planned):
    model, ops = planned
    model = onnx.ModelProto.FromString(model.SerializeToString())
    names = [d["name"] for d in ops if d["quantized"]]
    before = {o for n in model.graph.node for o in n.output}
    model, _ = run_passes(model, [BwMarkerPass(names)])
    nodes = {n.name: n for n in model.graph.node}
    for g in names:
        assert nodes[marker_name(g)].op_type == "Identity"
    assert before <= {o for n in model.graph.node for o in n.output}


def test_training_graph_has_stochastic_bw_quantizers_and_ema(art):
    tm = onnx.load(str(art / "training_model.onnx"))
    names = {n.name for n in tm.graph.node}
    assert not any(gradient_node_name(g) in names for g in ("/stem/Conv", "/conv1/Conv"))
    # one noise source per error quantizer: onnxruntime's generator, or the fused kernel's own (passes/fused_ops.py,
    # passes/quant_bits.py)
    assert sum(1 for n in all_nodes(tm.graph) if n.op_type in ("RandomUniformLike", "SRQuantize", "SRQuantizeBits")) == 4
    assert sum(1 for n in tm.graph.node if n.op_type == "InPlaceAccumulatorV2" and "ema" in n.name) == 6
    assert "fracgraph::act_ranges_updated" in {o.name for o in tm.graph.output}


def test_eval_graph_reads_running_ranges_and_bn_has_one_output(art):
    em = onnx.load(str(art / "eval_model.onnx"))
    uses = [n for n in em.graph.node if "/conv2/Conv::fq_a0.run_range" in n.input]
    assert uses and uses[0].name.endswith("/scale_raw")
    assert not any(n.op_type == "RandomUniformLike" for n in em.graph.node)
    assert all(len(n.output) == 1 for n in em.graph.node if n.op_type.startswith("BatchNorm"))


def test_pass_contract_names_the_failing_pass():
    class Broken(Pass):
        name = "broken"

        def call(self, model):
            return PassResult(model, False)

        def ensures(self, model):
            raise AssertionError("nothing was done")

    with pytest.raises(PassError, match="broken: postcondition failed: nothing was done"):
        Broken()(onnx.ModelProto())
