"""Extra inputs of a token model (issue 16): a HuggingFace-style model reading `input_ids`, `attention_mask` and
`position_ids` trains with the mask filled as ones and the positions as 0..T-1 in-graph (task.py
`fill_extra_inputs`), samples and exports; inputs fracgraph cannot fill are refused in one line naming them."""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
nn = torch.nn

from fracgraph.cli import app  # noqa: E402
from fracgraph.errors import FracgraphError  # noqa: E402
from fracgraph.task import fill_extra_inputs  # noqa: E402

V, C, T, H = 12, 16, 8, 2
TEXT = "the cat sat on a mat. " * 60


class MaskedLM(nn.Module):
    """One HF-style attention layer: token + position embeddings read by `position_ids`, the additive padding mask
    (1 - mask) * -1e4 on top of the causal mask, a GELU MLP, a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(V, C), nn.Embedding(T, C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.head = nn.Linear(C, V, bias=False)
        self.register_buffer("future", ~torch.tril(torch.ones(T, T, dtype=torch.bool)))

    def forward(self, input_ids, attention_mask, position_ids):
        x = self.tok(input_ids) + self.pos(position_ids)
        q, k, v = (t.reshape(-1, T, H, C // H).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
        att = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(C // H)
        pad = (1.0 - attention_mask[:, None, None, :].to(att.dtype)) * -1e4
        att = torch.softmax(att.masked_fill(self.future, -1e9) + pad, dim=-1)
        x = x + self.proj(torch.matmul(att, v).transpose(1, 2).reshape(-1, T, C))
        return self.head(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def export_masked(path, mask_dtype=torch.int64):
    import warnings

    model = MaskedLM().eval()
    args = (torch.zeros(1, T, dtype=torch.long), torch.ones(1, T, dtype=mask_dtype), torch.arange(T)[None])
    names = ["input_ids", "attention_mask", "position_ids"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, training=torch.onnx.TrainingMode.EVAL,
                          do_constant_folding=False, opset_version=17, input_names=names, output_names=["logits"],
                          dynamic_axes={n: {0: "batch"} for n in names + ["logits"]})
    return model


@pytest.fixture(scope="module")
def masked_art(tmp_path_factory):
    from fracgraph.build import BuildOptions, build_artifacts

    d = tmp_path_factory.mktemp("masked")
    model = export_masked(d / "m.onnx")
    m = build_artifacts(d / "m.onnx", d / "art", BuildOptions(optimizer="adamw", weight_decay=0.0))
    (d / "text.txt").write_text(TEXT, encoding="utf-8")
    return d, model, m


def test_mask_and_positions_are_filled_in_graph(masked_art):
    """The manifest records both fills; the artifacts read only the ids; at FP32 bits the eval graph's logits are the
    PyTorch model's with mask ones and positions 0..T-1 (and differ from a half-padded mask's: the mask is used)."""
    from fracgraph.runtime import TrainSession

    d, model, m = masked_art
    task = m.task
    assert task["kind"] == "language_model" and task["input_name"] == "input_ids" and task["context"] == T
    assert [(e["name"], e["dtype"], e["fill"]) for e in task["extra_inputs"]] == \
        [("attention_mask", "int64", "ones"), ("position_ids", "int64", "positions")]
    ev = onnx.load(str(d / "art" / m.files["eval"]))
    assert {i.name for i in ev.graph.input} >= {"input_ids", "fracgraph_bits"}
    assert not {"attention_mask", "position_ids"} & {i.name for i in ev.graph.input}
    sess = TrainSession(d / "art", seed=0)
    ids = np.random.default_rng(0).integers(0, V, (3, T)).astype(np.int64)
    _, logits = sess.evaluate(ids, np.zeros((3, T), np.int64), np.zeros((m.n_blocks, 3), np.float32))
    with torch.no_grad():
        t = torch.from_numpy(ids)
        want = model(t, torch.ones(3, T, dtype=torch.long), torch.arange(T).expand(3, T)).numpy()
        padded = torch.ones(3, T, dtype=torch.long)
        padded[:, : T // 2] = 0
        other = model(t, padded, torch.arange(T).expand(3, T)).numpy()
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    assert np.abs(other - want).max() > 1e-2


def test_masked_model_trains_samples_and_exports(masked_art, tmp_path):
    from fracgraph.export import ExportOptions, evaluate_export, export_run
    from fracgraph.sample import sample
    from fracgraph.train.loop import TrainConfig, train

    d, _, _ = masked_art
    run = tmp_path / "run"
    s = train(TrainConfig(run_dir=str(run), artifacts=str(d / "art"), data=f"text:{d / 'text.txt'}",
                          schedule="static", fw=8, bw=8, iters=40, epoch_iters=20, batch=8, lr=1e-2,
                          lr_schedule="constant"))
    assert s["final_val_loss"] < math.log(11) - 0.3          # it learns (uniform over 11 characters: 2.40)
    text = sample(str(run), tokens=12, prompt="the ", temperature=0)
    assert len(text) == 12 and set(text) <= set(TEXT)
    res = export_run(str(run), str(tmp_path / "m.onnx"), ExportOptions(format="float"))
    assert any(n.startswith("input attention_mask") and "all ones" in n for n in res.notes)
    assert any(n.startswith("input position_ids") and f"positions 0..{T - 1}" in n for n in res.notes)
    e = evaluate_export(res.path, str(run))
    assert e["val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-4)


def _graph(inputs: list, T_: int = T) -> onnx.ModelProto:
    """ids [batch, T] -> Gather embedding -> MatMul -> logits, plus unused extra `inputs` (name, elem type, dims)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(V, C)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.normal(size=(C, V)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"], name="g"),
             helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")]
    ins = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", T_])]
    ins += [helper.make_tensor_value_info(n, t, dims) for n, t, dims in inputs]
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                          ["batch", T_, V])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("elem,np_type", [(TensorProto.FLOAT, np.float32), (TensorProto.BOOL, np.bool_),
                                          (TensorProto.INT32, np.int32)])
def test_fill_values_and_dtypes(elem, np_type):
    """The fill nodes alone, run in onnxruntime: ones of the mask's dtype, positions, zeros, each [batch, T]."""
    import onnxruntime as ort

    model = _graph([("attention_mask", elem, ["batch", T]), ("position_ids", TensorProto.INT32, ["batch", T]),
                    ("token_type_ids", TensorProto.INT64, ["batch", T])])
    model, filled = fill_extra_inputs(model)
    assert [e["fill"] for e in filled] == ["ones", "positions", "zeros"] and [i.name for i in model.graph.input] == ["ids"]
    for n, t in (("attention_mask", elem), ("position_ids", TensorProto.INT32), ("token_type_ids", TensorProto.INT64)):
        model.graph.output.append(helper.make_tensor_value_info(n, t, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mask, pos, types = sess.run(["attention_mask", "position_ids", "token_type_ids"],
                                {"ids": np.zeros((3, T), np.int64)})
    assert mask.dtype == np_type and mask.shape == (3, T) and (mask == 1).all()
    assert pos.dtype == np.int32 and (pos == np.arange(T)).all() and pos.shape == (3, T)
    assert types.dtype == np.int64 and types.shape == (3, T) and (types == 0).all()


@pytest.mark.parametrize("extra,msg", [
    ([("past_key_values.0.key", TensorProto.FLOAT, ["batch", H, 4, C // H])], "Cannot fill: past_key_values.0.key"),
    ([("attention_mask", TensorProto.INT64, ["batch", 1, T, T])], "input attention_mask has shape"),
    ([("attention_mask", TensorProto.INT64, ["batch", T + 4])], "input attention_mask has shape"),
    ([("position_ids", TensorProto.FLOAT, ["batch", T])], "input position_ids is float32"),
    ([("attention_mask", TensorProto.INT64, ["batch", T]), ("segment", TensorProto.INT64, ["batch", T])],
     "Cannot fill: ids (int64 [None, 8]), segment (int64"),
])
def test_unfillable_inputs_are_refused_in_one_line(tmp_path, extra, msg):
    path = tmp_path / "m.onnx"
    onnx.save(_graph(extra), str(path))
    with pytest.raises(FracgraphError, match=re.escape(msg)):
        fill_extra_inputs(onnx.load(str(path)))
    res = CliRunner().invoke(app, ["quantize", str(path), "-o", str(tmp_path / "art")])
    assert res.exit_code == 2 and "Traceback" not in res.output and msg in " ".join(res.output.split())
    assert not (tmp_path / "art").exists()


def test_masked_model_under_dfq(masked_art, tmp_path):
    """The filled mask is computed from the ids' shape only, so it is no data path around a block's input
    (analysis/blocks.py: no edge enters a Shape node): the blocks are the two residual sub-layers, and each DFQ gate
    reads a float block input, not the token ids."""
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.passes.dfq_gate import CP_OUTPUT, DfqOptions
    from fracgraph.runtime import TrainSession

    d, _, plain = masked_art
    assert [b.kind for b in plain.blocks] == ["residual", "residual"]
    m = build_artifacts(d / "m.onnx", tmp_path / "dfq", BuildOptions(dfq=DfqOptions(), optimizer="adamw"))
    assert m.dfq["gated"] == [0, 1]
    sess = TrainSession(tmp_path / "dfq", seed=0)
    ids = np.random.default_rng(0).integers(0, V, (4, T)).astype(np.int64)
    bits = np.zeros((2, 3), np.float32)
    bits[:, 1] = 4
    loss, _ = sess.step(ids, np.roll(ids, -1, 1), bits, 1e-3, target=3.0, beta=1e-3)
    assert np.isfinite(loss) and float(sess.last_outputs[CP_OUTPUT]) > 0
