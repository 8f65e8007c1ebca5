"""Language models from the wild: real `transformers` exports (zoo_external `hf:ARCH`, random weights from a small
config) quantize, train on text, and export; the FP32 eval graph reproduces PyTorch's logits.

Skipped, saying why, where transformers is not installed (`pip install -e '.[hf]'`)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed: pip install -e '.[hf]'", allow_module_level=True)

from fracgraph import zoo_external as zx  # noqa: E402

V, T = 70, 16          # vocabulary >= the text's characters; a short context keeps the test fast
TEXT = "the cat sat on the mat; a dog ran to the log.\n" * 40


# falcon: multi-query attention, K^T [batch, 1, d, T] broadcast over the query heads, its 1 lost by ONNX's inference
# in the rotary arithmetic (model._gemm_shapes_partial now checks a GEMM's right operand too)
@pytest.fixture(scope="module", params=["gpt2", "llama", "falcon"])
def hf_art(request, tmp_path_factory):
    from fracgraph.build import BuildOptions, build_artifacts

    d = tmp_path_factory.mktemp(request.param)
    e = zx.entry(f"hf:{request.param}")
    model = zx.torch_model(e, classes=V, size=T, seed=0)
    zx.export_entry(e, d / "m.onnx", classes=V, size=T, seed=0)
    m = build_artifacts(d / "m.onnx", d / "art", BuildOptions(optimizer="adamw", weight_decay=0.0))
    return request.param, d, model, m


def test_hf_export_quantizes_and_matches_pytorch(hf_art):
    """Every GEMM but the head quantized (attention's activation x activation MatMuls included), the mask filled
    in-graph, and at FP32 bits the eval graph's logits are the transformers model's (mask all ones)."""
    from fracgraph.runtime import TrainSession

    arch, d, model, m = hf_art
    assert m.task["kind"] == "language_model" and m.task["context"] == T and m.task["num_classes"] == V
    assert [(e["name"], e["fill"]) for e in m.task["extra_inputs"]] == [("attention_mask", "ones")]
    quantized = [x for x in m.decisions if x.quantized]
    per_layer = {"gpt2": 6, "llama": 9, "falcon": 6}[arch]   # q/k/v (fused in GPT-2, Falcon), o, QK^T, AV, MLP
    assert len(quantized) == 2 * per_layer and len(m.decisions) == 2 * per_layer + 1
    # what trains is the model's parameters, each once: GPT-2's tied head not a copy, RoPE's inv_freq (a buffer the
    # exporter writes as a Constant) not at all
    from fracgraph.build import classify_initializers
    from fracgraph.model import load_model

    loaded = load_model(d / "m.onnx")
    trainable, _ = classify_initializers(loaded)
    sizes = {t.name: int(np.prod(t.dims)) for t in loaded.graph.initializer}
    assert sum(sizes[x] for x in trainable) == sum(p.numel() for p in model.parameters())
    assert len(trainable) == len(list(model.parameters()))
    sess = TrainSession(d / "art", seed=0)
    ids = np.random.default_rng(0).integers(0, V, (3, T)).astype(np.int64)
    _, logits = sess.evaluate(ids, np.zeros((3, T), np.int64), np.zeros((m.n_blocks, 3), np.float32))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(3, T, dtype=torch.long),
                     use_cache=False, return_dict=False)[0].numpy()
    assert logits.shape == want.shape == (3, T, V)
    # float32 sums of <= 128 terms over 2 layers: a few ulps of the logits' scale, not a bitwise match
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_hf_model_trains_on_a_fixed_batch(hf_art):
    from fracgraph.runtime import TrainSession

    _, d, _, m = hf_art
    sess = TrainSession(d / "art", seed=0)
    ids = np.random.default_rng(1).integers(0, V, (4, T + 1))
    bits = np.full((m.n_blocks, 3), 8, np.float32)
    losses = [sess.step(ids[:, :-1], ids[:, 1:], bits, 1e-2)[0] for _ in range(3)]
    assert np.all(np.isfinite(losses)) and losses[2] < losses[0]
    assert abs(losses[0] - math.log(V)) < 1.0           # a random init starts near uniform


def test_hf_model_trains_on_text_and_exports(hf_art, tmp_path):
    """`train --data text:` (vocabulary from the text, 12 characters < V) then `export`: the exported model, fed
    only the ids, reproduces the run's validation loss."""
    from fracgraph.export import ExportOptions, evaluate_export, export_run
    from fracgraph.train.loop import TrainConfig, train

    arch, d, _, _ = hf_art
    if arch != "llama":
        pytest.skip("one architecture is enough for the text/export path")
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    run = tmp_path / "run"
    s = train(TrainConfig(run_dir=str(run), artifacts=str(d / "art"), data=f"text:{tmp_path / 't.txt'}",
                          schedule="static", fw=8, bw=8, iters=6, epoch_iters=6, batch=4, lr=1e-2,
                          lr_schedule="constant"))
    assert np.isfinite(s["final_val_loss"])
    res = export_run(str(run), str(tmp_path / "m.onnx"), ExportOptions(format="float"))
    assert any(n.startswith("input attention_mask") and "all ones" in n for n in res.notes)
    assert [i.name for i in onnx.load(res.path).graph.input] == ["input_ids"]
    e = evaluate_export(res.path, str(run))
    assert e["val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-4)


def test_unknown_hf_architecture_is_one_line():
    from fracgraph.errors import FracgraphError

    with pytest.raises(FracgraphError, match="no hf: architecture 'nope': name a transformers model type"):
        zx.entry("hf:nope")


@pytest.mark.parametrize("arch", ["starcoder2", "deberta-v2"])
def test_any_transformers_model_type_by_name(arch, tmp_path):
    """A model type outside the 19 hand-made configs (`hf:MODEL_TYPE`) gets transformers' default config with the
    common size names set small, its causal-LM (Starcoder2) or masked-LM (DeBERTa-v2) class; it exports, every GEMM
    but the head quantizes, and the FP32 eval graph gives the model's logits."""
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.runtime import TrainSession

    e = zx.entry(f"hf:{arch}")
    model = zx.torch_model(e, classes=V, size=T, seed=0)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    zx.export_entry(e, tmp_path / "m.onnx", classes=V, size=T, seed=0)
    m = build_artifacts(tmp_path / "m.onnx", tmp_path / "art", BuildOptions(optimizer="adamw", weight_decay=0.0))
    assert [x.op for x in m.decisions if not x.quantized] == [m.decisions[-1].op]     # the head only
    sess = TrainSession(tmp_path / "art", seed=0)
    ids = np.random.default_rng(0).integers(0, V, (2, T)).astype(np.int64)
    _, logits = sess.evaluate(ids, np.zeros((2, T), np.int64), np.zeros((m.n_blocks, 3), np.float32))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(2, T, dtype=torch.long),
                     return_dict=False)[0].numpy()
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
