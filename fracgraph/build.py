"""The quantize pipeline: model -> forward passes -> ORT artifacts -> training/eval-graph passes -> artifact dir.

The directory is assembled in a temporary sibling and renamed into place only when complete, so a failure
never leaves a half-written artifact directory (and `--force` replaces an old one only on success).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import kernels
from .analysis.blocks import find_blocks
from .analysis.optable import gemm_table, uncosted_gemms
from .errors import FracgraphError
from .manifest import Block, LayerDecision, Manifest
from .lowering.gradients import check_differentiable, explain_build_error
from .model import load_model, lowering_notes
from .passes.act_range_ema import ActRangeEmaPass
from .passes.base import all_nodes, run_passes
from .passes.bias_grad import BiasGradPass
from .passes.bn_grad import BnGradPass
from .passes.bn_relu import BnReluPass
from .passes.bw_marker import BwMarkerPass
from .passes.bw_quant import BwQuantPass
from .passes.channel_mul import ChannelMulPass
from .passes.clip_grad import ClipGradPass
from .passes.conv_grad_split import ConvGradSplitPass, forward_shapes
from .passes.conv_grad_w import ConvGradWPass
from .passes.dfq_candidates import BnChainPass
from .passes.dfq_gate import DfqGatePass, DfqOptions
from .passes.eval_graph import BnEvalFixPass, EvalRangesPass
from .passes.fused_ops import FusedOpsPass
from .passes.fw_quant import FwQuantPass
from .passes.embedding_padding import EmbeddingPaddingPass, padding_rows
from .passes.gather_grad import GatherGradPass
from .passes.gelu_grad import GeluGradPass
from .passes.hard_act import HardActPass
from .passes.ln_channels import LnChannelsPass
from .passes.ln_forward import LnForwardPass
from .passes.ln_grad import LnGradPass
from .passes.ln_grad_sum import LnGradSumPass
from .passes.permute import PermutePass
from .passes.int_gemm import MAX_BITS as MAX_INT_BITS
from .passes.int_gemm import IntGemmPass
from .passes.int_bias import IntBiasPass
from .passes.nchwc_conv import NCHWC_DOMAIN, NchwcConvPass
from .passes.qdq_act import QdqActPass
from .passes.quant_bits import QuantBitsPass
from .passes.quant_branch import QuantBranchPass
from .passes.relu_grad import ReluGradLoweringPass
from .passes.shared_noise import SharedNoisePass
from .passes.ste_grad import SteGradPass
from .policy import LayerPolicy
from .quantizers import float_input
from .runtime import nchwc_block_size
from .task import detect as detect_task
from .task import lm_loss_block

PRECISION_INPUT = "fracgraph_bits"
LABELS = "labels"
TRAINING, EVAL, OPTIMIZER, CHECKPOINT = "training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"
OPTIMIZERS = ("sgd", "adamw")
SR_NOISE = ("independent", "shared")
# Ops whose float initializers (by input index) are trainable parameters.
_PARAM_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2), "PRelu": (1,),
    "Add": (0, 1), "Mul": (0, 1), "Gather": (0,),   # Gather: an embedding table read by token ids
    # a parameter used as data: ViTs' class token (Expand, Concat), a table gathered or sliced, a learned mask or
    # offset; all differentiable in onnxruntime-training
    "Expand": (0,), "Concat": tuple(range(64)), "Tile": (0,), "Slice": (0,), "Sub": (0, 1), "Div": (0,),
    "Where": (1, 2), "Pad": (0,), "Reshape": (0,), "Transpose": (0,), "Squeeze": (0,), "Unsqueeze": (0,),
    "Flatten": (0,), "Identity": (0,), "Cast": (0,),
}
_FROZEN_INPUTS = {"BatchNormalization": (3, 4)}


@dataclass
class BuildOptions:
    fw: float = 8
    bw: float = 8
    policy: LayerPolicy = field(default_factory=LayerPolicy)
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    act_range_momentum: float = 0.9      # train_pfq's --momentum_act
    expose_noise: bool = False           # BW noise as graph outputs (exact replay in tests)
    expose_errors: bool = False          # each BW quantizer's input and output error as graph outputs (tests replay each)
    fast_backward: bool = True           # speed passes on the training graph (ste-grad, conv-grad-split, quant-branch, relu-grad)
    nchwc: bool = True                   # convs on NCHWc kernels (passes/nchwc_conv.py); ties the artifacts to the CPU's block size
    sr_noise: str = "independent"        # "shared": one noise draw per step for all error quantizers (passes/shared_noise.py)
    fused_kernels: bool = True           # fracgraph custom ops (passes/fused_ops.py, conv_grad_w.py, bn_grad.py); needs a C compiler
    int_kernels: bool = True             # forward convs on integer codes when both operands are <= 8 bits (passes/int_gemm.py)
    int_matmul: bool = True              # ... and the linear layers' MatMuls (forward and weight gradient: passes/int_gemm.py)
    bn_relu_mask: bool = False           # bn-relu also folds the ReLU's gradient into BN's (densenet121: +370 MB peak RSS
                                         # under onnxruntime's memory pattern, README)
    skip_passes: tuple = ()              # training-graph passes left out by name (tests and benches compare on/off)
    dfq: DfqOptions | None = None        # DFQ gates + cost term (passes/dfq_gate.py); None = runtime bits only
    output: str | None = None            # which graph output holds the logits (needed when there are several)


def _register_gradients() -> None:
    """STE for Round; ReduceMin/Max detached (no gradient through the range). Process-global, build time only."""
    from onnxruntime.capi import _pybind_state as C

    identity = C.GradientNodeDefinition()
    identity.op_type, identity.domain, identity.inputs, identity.outputs, identity.attributes = "Identity", "", ["GO(0)"], ["GI(0)"], []
    C.register_gradient_definition("::Round", [identity])
    C.register_gradient_definition("::ReduceMin", [])
    C.register_gradient_definition("::ReduceMax", [])


def classify_initializers(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(trainable, frozen) initializer names; everything else stays a graph constant."""
    from .model import folded_constants

    inits = {t.name: t for t in model.graph.initializer}
    constants = set(folded_constants(model))
    trainable, frozen = [], []
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            t = inits.get(x)
            if t is None or t.data_type != onnx.TensorProto.FLOAT or x.startswith("fg::") or x in constants:
                continue
            if i in _FROZEN_INPUTS.get(node.op_type, ()):
                if x not in frozen:
                    frozen.append(x)
            elif i in _PARAM_INPUTS.get(node.op_type, ()) and int(np.prod(t.dims)) > 1 and x not in trainable:
                trainable.append(x)
    trainable = [x for x in trainable if x not in frozen]
    return trainable, frozen


def _refuse_undifferentiable(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type in ("ReduceMin", "ReduceMax", "Round"):
            raise FracgraphError(f"node {node.name} ({node.op_type}): onnxruntime-training cannot differentiate it and fracgraph reserves it for its quantizers; remove it from the model")


def plan(model: onnx.ModelProto, policy: LayerPolicy):
    """Decisions, blocks and the op table for a normalized model (pure analysis; no rewriting)."""
    ops = gemm_table(model)
    decided = policy.decide(ops)
    member = {op.name for op, q, _ in decided if q}
    blocks = find_blocks(model, ops, member)
    block_of = {name: i for i, b in enumerate(blocks) for name in b.ops}
    decisions = [LayerDecision(op.name, q, reason, block_of.get(op.name)) for op, q, reason in decided]
    decisions += [LayerDecision(name, False, why, None) for name, _, why in uncosted_gemms(model)]
    op_dicts = [dict(op.to_dict(), block=block_of.get(op.name), quantized=op.name in member) for op in ops]
    return ops, blocks, decisions, op_dicts


def _output_classes(model: onnx.ModelProto, output: str | None = None) -> tuple[onnx.ModelProto, int, dict]:
    """The model with its one output the logits [batch, classes] (lowering/heads.py: --output choice, trailing
    Softmax/LogSoftmax cut for the loss, [N, C, 1, 1] flattened), the class count, and what was done."""
    from .lowering.heads import classifier_head
    from .model import _infer_shapes

    before = model.graph.output[0].name if len(model.graph.output) == 1 else None
    model, head = classifier_head(model, output)
    if head["logits"] != before or head["cut"]:
        model = _infer_shapes(model)
    return model, head["classes"], head


def _float_data_input(model: onnx.ModelProto) -> bool:
    """One non-initializer input, a float tensor: the data of a classifier (token models take integer ids)."""
    inits = {t.name for t in model.graph.initializer}
    data = [i for i in model.graph.input if i.name not in inits]
    return len(data) == 1 and data[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def model_task(model: onnx.ModelProto, output: str | None = None):
    """(model, task, head) of a loaded model: a classifier's logits picked and normalized by lowering/heads.py
    (`head` says what was done), a token model's own [B, T, V] logits (head None); task.py's one-line refusals."""
    from .model import _infer_shapes
    from .task import fill_extra_inputs

    head = None
    model, extras = fill_extra_inputs(model)     # attention_mask & co. of a token model: in-graph values
    if extras:
        model = _infer_shapes(model)
    if _float_data_input(model):
        model, classes, head = _output_classes(model, output)
    task = detect_task(model, None if head is None else (lambda m: classes))
    task.extra_inputs = extras
    return model, task, head


def embedding_tables(model: onnx.ModelProto, policy: LayerPolicy, op_dicts: list[dict]) -> list[dict]:
    """Embedding tables (a float initializer gathered by token ids) with the policy's decision and its reason (what
    `inspect` shows; policy.py `decide_tables`) and the block whose weight bits a quantized one reads: that of the
    first quantized GEMM (graph order) downstream of the lookup."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    order = {d["name"]: i for i, d in enumerate(op_dicts)}
    block_of = {d["name"]: d["block"] for d in op_dicts if d.get("quantized")}
    tables = []
    for n in model.graph.node:
        if not (n.op_type == "Gather" and n.input[0] in inits and n.input[1] not in inits
                and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT):
            continue
        seen, todo, hits = set(), list(n.output), []
        while todo:
            for c in consumers.get(todo.pop(), []):
                if c.name in seen:
                    continue
                seen.add(c.name)
                if c.name in block_of:
                    hits.append(c.name)      # the search stops at a GEMM: what follows reads its output
                else:
                    todo.extend(c.output)
        first = min(hits, key=order.__getitem__) if hits else None
        tables.append({"node": n.name, "table": n.input[0], "shape": list(inits[n.input[0]].dims),
                       "block": block_of.get(first)})
    return policy.decide_tables(tables)


def fp32_tables(model: onnx.ModelProto, policy: LayerPolicy | None = None, op_dicts: list[dict] | None = None) -> list[dict]:
    """The embedding tables the policy keeps FP32, with the reason `inspect` shows."""
    return [t for t in embedding_tables(model, policy or LayerPolicy(), op_dicts or []) if not t["quantized"]]


def build_artifacts(model_path, out_dir, options: BuildOptions | None = None, force: bool = False) -> Manifest:
    """Run the whole pipeline and write the artifact directory `out_dir`."""
    opts = options or BuildOptions()
    if opts.optimizer not in OPTIMIZERS:
        raise FracgraphError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    if opts.sr_noise not in SR_NOISE:
        raise FracgraphError(f"--sr-noise must be one of {', '.join(SR_NOISE)}, got {opts.sr_noise!r}")
    out = Path(out_dir)
    if out.exists() and not force:
        raise FracgraphError(f"{out} already exists; pass --force to replace it")
    model = load_model(model_path)
    _refuse_undifferentiable(model)
    model, task, head = model_task(model, opts.output)
    lower_notes = [f"[lower] {n}" for n in lowering_notes(model)]
    ops, blocks, decisions, op_dicts = plan(model, opts.policy)
    if not blocks:
        raise FracgraphError("the layer policy leaves no GEMM quantized; nothing to do")

    trainable, frozen = classify_initializers(model)   # before the passes hide weights behind quantizers
    check_differentiable(model, trainable, [model.graph.output[0].name])
    model.graph.input.append(float_input(PRECISION_INPUT, [len(blocks), 3]))
    gate = None
    if opts.dfq is not None:
        # before the quantizers: the gates read the blocks' unquantized inputs and provide the act/grad bits
        table = None
        if opts.dfq.cost != "macs":   # the controller's cost from a hardware model (analysis/estimate.py)
            from .analysis.estimate import dfq_cost_table
            table = dfq_cost_table(model, op_dicts, len(blocks), opts.dfq.options, opts.dfq.weight_bits,
                                   opts.dfq.cost, opts.dfq.cost_metric, opts.dfq.cost_batch)
        gate = DfqGatePass(blocks, op_dicts, opts.dfq, PRECISION_INPUT, table)
        model, gate_notes = run_passes(model, [gate])
        trainable += gate.params
        frozen += gate.frozen
    quant_plan = [(d, d["block"]) for d in op_dicts if d["quantized"]]
    if gate is not None:   # DFQ candidates: each block's GEMMs are cloned K times, each clone at its own bits
        quant_plan = gate.expand_plan(quant_plan)
    tables = embedding_tables(model, opts.policy, op_dicts)
    fw = FwQuantPass(quant_plan, PRECISION_INPUT, tables=[t for t in tables if t["quantized"]])
    quantized = [d["name"] for d, _ in quant_plan]
    model, notes = run_passes(model, [fw, BwMarkerPass(quantized)])
    if gate is not None:
        notes = gate_notes + notes
    frozen += [f"{p.name}.{buf}" for p in fw.points if p.kind == "act" for buf in ("run_min", "run_range")]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        nchwc_block = nchwc_block_size() if opts.nchwc else 1
        shapes = forward_shapes(model) if opts.fast_backward or nchwc_block > 1 or opts.sr_noise == "shared" else {}
        _generate(model, tmp, trainable, frozen, opts, gate, task.is_lm)
        train_model = onnx.load(str(tmp / TRAINING))
        fused, kernel_notes = _fused_ops_passes(opts, shapes)
        train_passes = [
            BwQuantPass([(d["name"], d.get("bits_key", b)) for d, b in quant_plan], PRECISION_INPUT, opts.expose_noise,
                        gate.grad_bits_const if gate is not None else None, opts.expose_errors),
            ActRangeEmaPass(fw.points, opts.act_range_momentum),
            EmbeddingPaddingPass(*padding_rows(model, trainable)),
        ] + ([SharedNoisePass(shapes)] if opts.sr_noise == "shared" else []) \
          + ([SteGradPass(fw.points, fw.readers, fw.range_owner), ConvGradSplitPass(shapes)] if opts.fast_backward else []) \
          + fused \
          + _int_gemm_passes(opts, fused, shapes, nchwc_block) \
          + ([QuantBranchPass(), QdqActPass(), ReluGradLoweringPass()] if opts.fast_backward else []) \
          + ([QuantBitsPass()] if fused else []) \
          + ([GatherGradPass()] if opts.fast_backward else []) \
          + ([NchwcConvPass(shapes, nchwc_block, fused=bool(fused))] if nchwc_block > 1 or fused else []) \
          + ([PermutePass()] if fused else []) \
          + ([IntBiasPass()] if fused and opts.int_kernels else []) \
          + ([BnChainPass()] if gate is not None and gate.candidates else [])
        train_model, n2 = run_passes(train_model, [p for p in train_passes if p.name not in opts.skip_passes])
        onnx.save(train_model, str(tmp / TRAINING))
        eval_model = onnx.load(str(tmp / EVAL))
        eval_model, n3 = run_passes(eval_model, [EvalRangesPass(fw.points), BnEvalFixPass()])
        onnx.save(eval_model, str(tmp / EVAL))
        manifest = Manifest(
            source_model=str(model_path if not isinstance(model_path, onnx.ModelProto) else "<in-memory>"),
            input_name=task.input_name, input_shape=task.input_shape, label_name=LABELS, num_classes=task.num_classes,
            precision_input=PRECISION_INPUT, default_bits=[float(opts.fw), float(opts.fw), float(opts.bw)],
            blocks=[Block(b.name, b.ops, b.kind) for b in blocks], ops=op_dicts, quant_points=fw.points,
            decisions=decisions,
            optimizer={"type": opts.optimizer, "momentum": opts.momentum, "weight_decay": opts.weight_decay},
            act_range_momentum=opts.act_range_momentum,
            grad_noise="exposed" if opts.expose_noise else "shared" if opts.sr_noise == "shared" else "random",
            files={"training": TRAINING, "eval": EVAL, "checkpoint": CHECKPOINT,
                   "optimizer": OPTIMIZER if opts.optimizer == "adamw" else None},
            extra={"trainable": trainable, "frozen": frozen, "head": head,
                   "notes": lower_notes + notes + kernel_notes + n2 + n3,
                   "custom_ops": kernels.DOMAIN if any(p.fused for p in fused)
                   or any(n.domain == kernels.DOMAIN for n in all_nodes(train_model.graph)) else None,
                   "conv_grad_w": next((p.choices for p in fused if isinstance(p, ConvGradWPass)
                                        and p.name not in opts.skip_passes), None),
                   "conv_forms": [c for p in train_passes if isinstance(p, NchwcConvPass)
                                  and p.name not in opts.skip_passes for c in p.choices] or None,
                   "nchwc_block": nchwc_block if any(n.domain == NCHWC_DOMAIN for n in all_nodes(train_model.graph)) else None,
                   "int_kernels": _int_kernels_record(train_passes, opts),
                   "fp32_tables": [t for t in tables if not t["quantized"]],
                   "quantized_tables": [t for t in tables if t["quantized"]]},
            dfq=None if gate is None else {**opts.dfq.to_dict(), **gate.cost_scale, "gate_params": gate.params},
            task=task.to_dict(),
        )
        manifest.write(tmp)
        _install(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _int_gemm_passes(opts: BuildOptions, fused: list, shapes: dict, nchwc_block: int) -> list:
    """int-gemm when asked for and the kernels library builds (IntConv lives in it)."""
    if not (opts.int_kernels and fused):
        return []
    return [IntGemmPass(shapes, nchwc_block, fused=True, matmul=opts.int_matmul)]


def _int_kernels_record(passes: list, opts: BuildOptions) -> dict | None:
    """The manifest's record of the integer convs: which convs, and the integer path (with the CPU flag it needs)
    the building machine runs them on; runtime.TrainSession refuses a CPU without that flag in one line."""
    p = next((p for p in passes if isinstance(p, IntGemmPass) and p.name not in opts.skip_passes), None)
    if p is None or not any(c["int"] for c in p.convs + p.weight_grads):
        return None
    built = kernels.int_path()
    # amx runs the same decisions as vnni (int-gemm's rules are the same on both; auto picks amx at run time where
    # the CPU has it), so artifacts built on an AMX machine need only VNNI
    path = "vnni" if built == "amx" else built
    return {"path": path, "cpu_flag": kernels.INT_PATHS[path][1], "built_on": built, "max_bits": MAX_INT_BITS,
            "convs": p.convs, "weight_grads": p.weight_grads}


def _fused_ops_passes(opts: BuildOptions, shapes: dict) -> tuple[list, list[str]]:
    """The passes onto fracgraph's kernels when asked for and the kernels build here; otherwise a note why not."""
    if not (opts.fused_kernels and opts.fast_backward):
        return [], []
    try:
        kernels.library_path()
    except FracgraphError as e:
        return [], [f"fused-ops: the step stays on onnxruntime's own ops ({e})"]
    # clip-grad and hard-act before bn-relu: a HardSwish's input gradient is the Sum of its two gradients, which
    # bn-relu's SumRange would otherwise take first (where a MinMax reads it) and hard-act then no longer finds
    return [FusedOpsPass(), ConvGradWPass(shapes), BnGradPass(), ClipGradPass(), HardActPass(),
            BnReluPass(shapes, opts.bn_relu_mask), LnChannelsPass(), LnForwardPass(), LnGradPass(),
            LnGradSumPass(), GeluGradPass(), ChannelMulPass(),
            BiasGradPass()], []


def _generate(model: onnx.ModelProto, directory: Path, trainable, frozen, opts: BuildOptions, gate=None,
              sequence: bool = False) -> None:
    import onnxruntime as ort
    from onnxruntime.training import artifacts

    ort.set_default_logger_severity(3)   # the builder logs every transformer at INFO
    _register_gradients()
    optimizer = artifacts.OptimType.AdamW if opts.optimizer == "adamw" else None
    loss, loss_inputs, extra_outputs = artifacts.LossType.CrossEntropyLoss, None, []
    if gate is not None:   # CE + the DFQ cost term; cp, bits and choice counts as extra outputs
        from .passes.dfq_gate import COST_TERM, loss_block

        loss, loss_inputs, extra_outputs = loss_block(), [model.graph.output[0].name, COST_TERM], gate.extra_outputs
        if sequence:
            loss = lm_loss_block(COST_TERM)
    elif sequence:   # [B, T, V] logits: cross-entropy over the last axis, mean over tokens (task.py)
        loss, loss_inputs = lm_loss_block(), [model.graph.output[0].name]
    try:
        with _quiet_native_output():
            artifacts.generate_artifacts(
                model, requires_grad=trainable, frozen_params=frozen, loss=loss,
                optimizer=optimizer, artifact_directory=str(directory), loss_input_names=loss_inputs,
                additional_output_names=[model.graph.output[0].name] + extra_outputs,
            )
    except Exception as e:
        raise FracgraphError(explain_build_error(e)) from None


@contextlib.contextmanager
def _quiet_native_output():
    """The gradient builder's C++ logger writes to fd 1/2 directly (expected warnings for detached ranges)."""
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _install(tmp: Path, out: Path) -> None:
    """Move the finished directory into place; an existing one is replaced only now, after success."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
