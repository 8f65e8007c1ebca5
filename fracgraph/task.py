"""The task a model is trained for: what its data input is, what its logits are, what the loss and metrics are.

- `classification`: one float input (the data, e.g. [B, C, H, W]); logits [B, classes]; labels [B]; loss mean
  cross-entropy; metrics accuracy and loss.
- `language_model`: one integer input of token ids [B, T] (int64 or int32, T the model's fixed context);
  logits [B, T, V]; labels [B, T] (the next token at every position); loss cross-entropy over the last axis,
  mean over all B*T tokens (nats per token); metrics loss, validation loss and perplexity exp(loss).

`quantize` detects the task from the model's inputs and outputs and records it in the manifest (`task`); `train`,
`estimate` and `sample` read it from there.

Extra inputs of a token model (`fill_extra_inputs`, a registry keyed by input name, `EXTRA_INPUTS`): a model exported
from a HuggingFace-style transformer may read, besides the token ids [B, T], an `attention_mask` [B, T] (all ones for
the packed text windows fracgraph trains on), `position_ids` [B, T] (0..T-1) or `token_type_ids` [B, T] (zeros).
Each becomes an in-graph value of the ids' shape and the input's own dtype, under the input's own name (nodes
`extra_input::<name>/...`), so the training, eval and exported graphs, `train`, `sample` and `export` feed only
the ids; the manifest records each (`task.extra_inputs`: name, dtype, shape, fill, value, like). Any other input
(unknown names, past key values, a mask of another shape) is refused in one line that names it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .errors import FracgraphError

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language_model"
_INT_TYPES = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


@dataclass
class Task:
    kind: str                    # classification | language_model
    input_name: str
    input_dtype: str             # numpy dtype name of the data input: float32, int64, int32
    input_shape: list            # per-sample shape (batch left out), None for a symbolic dim
    num_classes: int             # classes, or the vocabulary size V
    context: int | None = None   # language model: the sequence length T
    extra_inputs: list = field(default_factory=list)   # inputs filled in-graph (fill_extra_inputs): name, dtype, shape, fill

    @property
    def is_lm(self) -> bool:
        return self.kind == LANGUAGE_MODEL

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None, manifest=None) -> "Task":
        """From the manifest's `task` entry; manifests written before it existed are classification."""
        if not d:
            return cls(CLASSIFICATION, manifest.input_name, "float32", list(manifest.input_shape), manifest.num_classes)
        if d.get("kind") not in (CLASSIFICATION, LANGUAGE_MODEL):
            raise FracgraphError(f"manifest task kind {d.get('kind')!r} is not {CLASSIFICATION} or {LANGUAGE_MODEL}; "
                                 f"re-run `fracgraph quantize`")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    # -- metrics ---------------------------------------------------------------------------------------------
    def train_metrics(self, logits: np.ndarray, labels: np.ndarray) -> dict:
        """Per-step metrics of the training batch (besides the loss)."""
        if self.is_lm:
            return {"train_token_acc": float((np.argmax(logits, -1) == labels).mean())}
        return {"train_acc": float((np.argmax(logits, 1) == labels).mean())}


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def detect(model: onnx.ModelProto, classifier_classes=None) -> Task:
    """The task of a normalized (shape-inferred) model, or one line saying why its inputs/outputs fit none.
    `classifier_classes(model)`: the class count of a classifier's logits (build.py's head check), if given."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    floats = [i for i in inputs if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    ints = [i for i in inputs if i.type.tensor_type.elem_type in _INT_TYPES]
    names = ", ".join(f"{i.name} ({_type_name(i)})" for i in inputs) or "none"
    if len(inputs) != 1 or not (floats or ints):
        raise FracgraphError(f"the model must have exactly one data input: float data, or int64/int32 token ids "
                             f"[batch, T]; it has: {names}. Export it with any other input (e.g. an attention mask) "
                             f"folded into the graph as a constant")
    x, out = inputs[0], model.graph.output[0]
    odims = _dims(out)
    if floats and classifier_classes is not None:
        return Task(CLASSIFICATION, x.name, "float32", _dims(x)[1:], int(classifier_classes(model)))
    if floats:
        if len(odims) != 2 or odims[1] is None:
            raise FracgraphError(f"output {out.name} must be logits [batch, classes] with a static class count "
                                 f"(got shape {odims})")
        return Task(CLASSIFICATION, x.name, "float32", _dims(x)[1:], int(odims[1]))
    xdims = _dims(x)
    if len(xdims) != 2 or xdims[1] is None:
        raise FracgraphError(f"token input {x.name} must be [batch, T] with a static sequence length T (got "
                             f"{xdims}); export the model with a fixed context")
    T = xdims[1]
    if len(odims) != 3 or odims[2] is None or odims[1] not in (T, None):
        raise FracgraphError(f"output {out.name} of a token model must be logits [batch, {T}, vocab] with a static "
                             f"vocabulary (got shape {odims})")
    return Task(LANGUAGE_MODEL, x.name, _INT_TYPES[x.type.tensor_type.elem_type], [T], int(odims[2]), T)


# input name -> (fill, dtypes it may have): what a packed window of T tokens feeds it
EXTRA_INPUTS = {
    "attention_mask": ("ones", ("int64", "int32", "float32", "float16", "float64", "bool")),
    "attn_mask": ("ones", ("int64", "int32", "float32", "float16", "float64", "bool")),
    "input_mask": ("ones", ("int64", "int32", "float32", "float16", "float64", "bool")),
    "position_ids": ("positions", ("int64", "int32")),
    "token_type_ids": ("zeros", ("int64", "int32")),
}
EXTRA_PREFIX = "extra_input::"
FILL_TEXT = {"ones": "all ones", "zeros": "all zeros", "positions": "positions 0..{last} in every row"}


def _fill_nodes(name: str, fill: str, dtype: np.dtype, T: int, shape: str) -> tuple[list, list]:
    """(nodes, initializers) computing the value of `name` from the ids' shape tensor `shape`."""
    from onnx import helper, numpy_helper

    q = f"{EXTRA_PREFIX}{name}"
    if fill in ("ones", "zeros"):
        value = numpy_helper.from_array(np.array([1 if fill == "ones" else 0], dtype))
        return [helper.make_node("ConstantOfShape", [shape], [name], name=f"{q}/{fill}", value=value)], []
    arange = numpy_helper.from_array(np.arange(T, dtype=dtype).reshape(1, T), f"{q}/arange")
    return [helper.make_node("Expand", [arange.name, shape], [name], name=f"{q}/positions")], [arange]


def fill_extra_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[dict]]:
    """The model with its known extra inputs (EXTRA_INPUTS) computed in-graph from the token ids' shape, and what
    was filled; one line naming every input that is neither the data nor a known extra input. A model with one
    input is returned as it is."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) <= 1:
        return model, []
    known = [i for i in inputs if i.name in EXTRA_INPUTS]
    unknown = [i for i in inputs if i.name not in EXTRA_INPUTS]
    tokens = [i for i in unknown if i.type.tensor_type.elem_type in _INT_TYPES and len(_dims(i)) == 2]
    data = unknown if len(unknown) <= 1 else tokens if len(tokens) == 1 else []
    fillable = ", ".join(f"{k} ({v[0]})" for k, v in EXTRA_INPUTS.items())
    rest = [i for i in unknown if i not in data]
    if len(data) != 1 or rest:
        what = f"besides the token ids {data[0].name}" if len(data) == 1 else \
            "and none or several of them can be the data (float data, or int64/int32 token ids [batch, T])"
        raise FracgraphError(f"the model reads inputs fracgraph cannot fill, {what}. Cannot fill: "
                             + ", ".join(f"{i.name} ({_type_name(i)} {_dims(i)})" for i in rest or unknown)
                             + f". fracgraph fills only {fillable}; export the model without the others (e.g. no "
                             f"past key values: use_cache=False) or with them folded into constants")
    x = data[0]
    xdims = _dims(x)
    if x.type.tensor_type.elem_type not in _INT_TYPES or len(xdims) != 2 or xdims[1] is None:
        raise FracgraphError(f"extra inputs ({', '.join(i.name for i in known)}) are filled for token models only, "
                             f"whose data input is int64/int32 ids [batch, T] with a static T; {x.name} is "
                             f"{_type_name(x)} {xdims}. Export the model with them folded into constants")
    T = xdims[1]
    nodes, new_inits, filled = [], [], []
    shape = f"{EXTRA_PREFIX}ids_shape"
    for i in known:
        fill, dtypes = EXTRA_INPUTS[i.name]
        dims, dtype = _dims(i), _type_name(i)
        if len(dims) != 2 or dims[1] not in (T, None) or dims[0] not in (None, 1) and dims[0] != xdims[0]:
            raise FracgraphError(f"input {i.name} has shape {dims}; fracgraph fills it ({fill}) only as [batch, {T}] "
                                 f"like the token ids {x.name}: export the model with that shape, or with "
                                 f"{i.name} folded into a constant")
        if dtype not in dtypes:
            raise FracgraphError(f"input {i.name} is {dtype}; fracgraph fills it ({fill}) as one of "
                                 f"{', '.join(dtypes)}: export the model with such an input")
        n, t = _fill_nodes(i.name, fill, np.dtype(dtype), T, shape)
        nodes += n
        new_inits += t
        filled.append({"name": i.name, "dtype": dtype, "shape": ["batch", T], "fill": fill,
                       "value": FILL_TEXT[fill].format(last=T - 1), "like": x.name})
    g = model.graph
    keep = [i for i in g.input if i.name not in EXTRA_INPUTS]
    del g.input[:]
    g.input.extend(keep)
    head = [helper.make_node("Shape", [x.name], [shape], name=shape)] + nodes
    rest = list(g.node)
    del g.node[:]
    g.node.extend(head + rest)
    g.initializer.extend(new_inits)
    return model, filled


def _type_name(vi: onnx.ValueInfoProto) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).name
    except Exception:
        return "non-tensor"


def lm_loss_block(cost_term: str | None = None):
    """An onnxblock loss for [B, T, V] logits and [B, T] int64 labels: SoftmaxCrossEntropyLoss (mean) on the logits
    transposed to [B, V, T] (ONNX's class axis is 1), i.e. the mean over every token; plus `cost_term` (DFQ)."""
    from onnx import helper
    from onnxruntime.training import onnxblock

    class SequenceCrossEntropy(onnxblock.Block):
        def build(self, logits_name: str, cost_name: str | None = None):
            g = self.base.graph
            labels = "labels"
            if not any(i.name == labels for i in g.input):
                g.input.append(helper.make_tensor_value_info(labels, onnx.TensorProto.INT64, ["batch", None]))
            bvt = "fracgraph::lm_logits_bvt"
            g.node.append(helper.make_node("Transpose", [logits_name], [bvt], name=bvt, perm=[0, 2, 1]))
            loss = "fracgraph::lm_loss"
            g.node.append(helper.make_node("SoftmaxCrossEntropyLoss", [bvt, labels], [loss, loss + "/log_prob"],
                                           name=loss, reduction="mean"))
            if cost_name is None:
                return loss
            out = "fracgraph::lm_loss_plus_cost"
            g.node.append(helper.make_node("Add", [loss, cost_name], [out], name=out))
            return out

    return SequenceCrossEntropy()
