"""DFQ: a precision gate per block and the cost output (spec fractrain.md §3.1-§3.4, granularity §5.5).

For block l with input x_l (the tensor at the block's fork point; a single layer's GEMM input):

    e_l = W2·relu(W1·GAP(x_l) + b1) + b2            1x1 convs on the pooled input, written as MatMul (FP32)
    (h_l, c_l) = LSTMCell(e_l, (h_{l-1}, c_{l-1}))   one cell shared by all blocks, state zero at block 0
    p_l = softmax(W_o·h_l + b_o)                     over the K (act, grad) options; weights at static bits

Granularity "batch" (default, the rebuttal's hardware-friendly mode): one choice per block per mini-batch,
c_l = argmax of the batch-mean probability pbar_l = mean_n p_l[n]. The argmax of the mean (rather than a
majority vote of per-sample one-hots) is the argmax of the very quantity the straight-through mask
m = onehot + (pbar - stopgrad(pbar)) differentiates, and it cannot tie the way votes of a small batch do. Only
the chosen precision is computed: the block's quantizers read act/grad bits sum_k onehot_k * bits_k computed
in-graph from the hard one-hot, which carries no gradient.

Granularity "sample" (the released CIFAR code decides per sample): the same gate, one choice per sample; each
quantizer reads a bits value per sample (broadcast over the sample's elements) against the whole batch's
range, which is what mixing per sample the K candidates quantized over the full batch computes in the forward
pass (the imnet variant, spec §3.3), with one GEMM per layer instead of K.

Granularity "candidates" (the released CIFAR code's K computed candidates per block, spec §3.3): the block's nodes
are cloned K times at constant bits and mixed per sample with the same per-sample mask; see dfq_candidates.py.

What reaches the gate from the task loss (`task_grad`; batch and sample): the reference mixes K computed candidates,
x = sum_k m_k out_k, so dL/dm_k = <dL/dx, out_k>; the part common to all k cancels in the softmax, and what
is left is the difference between the options' outputs. With only the chosen output computed:
- "none" (default): treat the unchosen outputs as equal to the chosen one (they differ only by quantization
  noise); then every dL/dm_k is the same and cancels exactly in the softmax, so the gate learns from the cost
  term (and its input features) only. Measured on digitnet, the controller then holds cp at the target
  (tests/train/test_dfq_train.py).
- "chosen": scale the block output by the chosen mask entry (exactly 1 forward; dL/dm_c = <dL/dy, y>). This is
  the mixing gradient with the unchosen outputs taken as zero, i.e. as if the alternative were skipping the
  block: a signal about the block's output scale, not its precision. In a 300-step digitnet run with the
  settings of tests/train/test_dfq_train.py (`fracgraph quantize digitnet.onnx --dfq --task-grad chosen`, then
  `fracgraph train --schedule dfq --target-cp 3 --iters 300 --epoch-iters 30 --batch 64 --lr 0.05`) it kept
  both gates on 6/8 after the first epoch, cp 3.39 against the target 3 (2.93 with "none").

Cost (spec §3.4): cost_k = (a_k w + g_k w + a_k g_k) / 1024 per MAC of a weight GEMM; an activation x activation
GEMM (a transformer's QK^T and attention x V: both operands are activations at the act bits) costs
(a_k a_k + g_k a_k + a_k g_k) / 1024 per MAC (forward a x a, the two error GEMMs g x a and a x g), as the run's
`cp`/`cum_gmacs` (train/loop.py CostMeter) and `estimate` count it. A block's cost_k is the MAC-weighted mean over its
GEMMs (`DfqOptions.block_unit_costs`, `act_frac` = the block's share of activation x activation MACs; 0 in a CNN,
where it is the release's formula exactly); C = sum_{l,n,k} m[l,n,k] cost_k F_l (in batch
mode m[l,n,k] = m_l[k], so C = B sum_{l,k} m_l[k] cost_k F_l); cp = 100 C / (3 B sum_l F_l); the graph output
`COST_TERM` = reg * beta * C / mean(F) with the sign controller reg = -1 if cp < target else +1 computed in-graph
from this very batch's cp, as the reference does; target (cp %) and beta are runtime inputs (beta 0: no cost term).
F_l = the block's forward MACs ("macs", default: cp is then the gated blocks' real effective-MAC fraction) or 1
("uniform", the ResNet CIFAR code). A hardware cost (`--cost bitfusion|eyeriss|fpga`, `block_costs`) replaces
cost_k F_l / mean(F) by 3 n T[l, k] / sum_l T32[l], T the energy (or latency) of block l's three GEMMs per sample
under option k on that hardware and T32 at FP32 (analysis/estimate.py `dfq_cost_table`): cp is then that hardware's
cost of the gated blocks as % of their FP32 cost, and the target is read in that unit.

Skip option (`skip` in the options, stored as bits [0, 0] like the release's `ResNetRecurrentGateSP`, where a bits-0
candidate is `prev`, the block's shortcut): in a residual block y = m_run * block + m_skip * shortcut, two
products so that the one-hot forward is exactly one of them; m_run = 1 - m_skip ("none") or the chosen precision's
entry ("chosen"), and dL/dm_skip = <dL/dy, shortcut> (minus <dL/dy, block> with "none"), the mixing gradient with
the shortcut computed. A skipped block's bits are 0, so its quantizers pass through: the simulation computes the
unused branch and the downsample FP32 (per sample: activations and errors; the weights are one tensor at
`weight_bits`). Blocks without a shortcut get the skip logit masked (MASKED_LOGIT), so p_skip = 0 there. The cost
table counts a skip as 0, as the release and DFS do.

Static (ungated) blocks: `static_first` (default) leaves the block of the model's first GEMM, when the layer policy
quantizes it and it is a block of its own (a ResNet's stem conv; not a transformer's first projection, which sits
in a residual block), without a gate, and `static` (fnmatch globs on GEMM names) adds every block holding a matching GEMM.
A static block is quantized as in the plain artifacts: its act, weight and grad bits are read from the precision
input, which the training loop fills with the run's static --fw/--bw. It is outside the controller: no gate, no
LSTM step (the LSTM runs over the gated blocks in order), no share of the cost term or of `CP_OUTPUT` (the gated
cp, as the authors count it); the loop's whole-network cost counts it at its static bits (train/dfq.py). The
authors' `ResNetRecurrentGateSP` keeps its first conv FP32 (`--first fp32`); at FP32 that one conv costs 17% of a
FW8/BW8 resnet20 step, which caps the whole-network saving of cp 3 at 35% (README, DFQ section, "Static blocks";
bench/dfq_first_layer.py).

Stop-gradient: ONNX has none; `ReduceMax` over an added axis of size 1 is the identity with no gradient,
because the build registers an empty gradient for ReduceMax (the quantizer ranges rely on the same).
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

import networkx as nx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..analysis.blocks import _SOURCE, dataflow_graph
from ..errors import FracgraphError
from ..quantizers import PER_SAMPLE_NODE, PER_SAMPLE_OFF_NODE, Emitter
from .dfq_candidates import block_region, candidate_name, clone_region
from .base import Pass, PassResult, opset, upstream_nodes

PREFIX = "dfq::"
TARGET_INPUT = "fracgraph_dfq_target"     # runtime scalar: the cp target (%)
BETA_INPUT = "fracgraph_dfq_beta"         # runtime scalar: the cost weight beta (0 = no cost term)
COST_TERM = "fracgraph::dfq_cost_term"    # reg * beta * C / mean(F), added to the CE loss
CP_OUTPUT = "fracgraph::dfq_cp"           # cp of this mini-batch (%), over the gated blocks
BITS_OUTPUT = "fracgraph::dfq_bits"       # [n_gated, 3] act, weight, grad bits of the gated blocks (batch)
COUNTS_OUTPUT = "fracgraph::dfq_counts"   # [n_gated, K] samples per option, gated blocks in order
CIFAR_OPTIONS = ((3, 6), (4, 6), (4, 8), (6, 8), (6, 12))
GRANULARITIES = ("batch", "sample", "candidates")
WEIGHTINGS = ("macs", "uniform")
TASK_GRADS = ("none", "chosen")
COSTS = ("macs", "bitfusion", "eyeriss", "fpga")
COST_METRICS = ("energy", "latency")
SKIP = [0, 0]          # the skip option's (act, grad) bits: the block's output is its shortcut
MASKED_LOGIT = -1e9    # added to the skip logit of a block without a shortcut: p_skip = 0 exactly


@dataclass
class DfqOptions:
    options: list = field(default_factory=lambda: [list(o) for o in CIFAR_OPTIONS])   # (act bits, grad bits)
    weight_bits: int = 4
    granularity: str = "batch"
    cost_weighting: str = "macs"
    task_grad: str = "none"          # "none" | "chosen": see the module docstring
    cost: str = "macs"               # the cost table: effective MACs, or a hardware model's GEMM cost
    cost_metric: str = "energy"      # hardware cost tables: energy or latency
    cost_batch: int = 128            # hardware cost tables: the batch the step is costed at
    gate_dim: int = 32
    embed_dim: int = 16
    hidden: int = 16
    seed: int = 0
    static_first: bool = True        # the first GEMM's block (when quantized) has no gate: static --fw/--bw bits
    static: list = field(default_factory=list)   # GEMM-name globs: their blocks have no gate either

    def __post_init__(self):
        self.static = [str(g) for g in self.static]
        self.options = [[int(a), int(g)] for a, g in self.options]
        if len(self.options) < 2:
            raise FracgraphError(f"DFQ needs at least 2 precision options, got {self.options}")
        for a, g in self.options:
            if [a, g] != SKIP and not (1 <= a <= 32 and 1 <= g <= 32):
                raise FracgraphError(f"DFQ option {a}/{g}: FW and BW bits must be in 1..32 (0 bits is not an "
                                     f"option; write `skip` for the skip option)")
        if self.options.count(SKIP) > 1:
            raise FracgraphError("DFQ options list `skip` more than once")
        if not 1 <= int(self.weight_bits) <= 32:
            raise FracgraphError(f"--weight-bits must be in 1..32, got {self.weight_bits}")
        if self.granularity not in GRANULARITIES:
            raise FracgraphError(f"DFQ granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.task_grad not in TASK_GRADS:
            raise FracgraphError(f"DFQ task gradient must be one of {', '.join(TASK_GRADS)}, got {self.task_grad!r}")
        if self.granularity == "candidates" and self.task_grad != "none":
            raise FracgraphError("--task-grad applies to --granularity batch or sample; candidates mix the K computed "
                                 "outputs, so the gate gets the full mixing gradient")
        if self.granularity == "candidates" and SKIP in self.options:
            raise FracgraphError("the skip option is not available with --granularity candidates; use batch or sample")
        if self.cost not in COSTS:
            raise FracgraphError(f"--cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        if self.cost_metric not in COST_METRICS:
            raise FracgraphError(f"--cost-metric must be one of {', '.join(COST_METRICS)}, got {self.cost_metric!r}")
        if self.cost != "macs" and self.cost_weighting != "macs":
            raise FracgraphError("--cost-weighting uniform weighs blocks equally, a hardware --cost weighs them by their "
                                 "cost on that hardware; use one of them")
        if int(self.cost_batch) <= 0:
            raise FracgraphError(f"--cost-batch must be positive, got {self.cost_batch}")
        if self.cost_weighting not in WEIGHTINGS:
            raise FracgraphError(f"DFQ cost weighting must be one of {', '.join(WEIGHTINGS)}, got {self.cost_weighting!r}")

    @property
    def skip_index(self) -> int | None:
        """The option index of `skip` (stored as [0, 0], the release's bits 0), or None."""
        return self.options.index(SKIP) if SKIP in self.options else None

    def unit_costs(self) -> np.ndarray:
        """[K, 3] fraction of an FP32 MAC of the forward, error and weight-gradient GEMM of each option (skip: 0,
        as the release and DFS count it)."""
        w = float(self.weight_bits)
        return np.array([[a * w, g * w, a * g] for a, g in self.options], np.float64) / 1024.0

    def act_unit_costs(self) -> np.ndarray:
        """[K, 3] the same for an activation x activation GEMM (attention's QK^T, attention x V): both operands at the
        act bits, so forward a x a, and its two backward GEMMs are error GEMMs, g x a and a x g (skip: 0)."""
        return np.array([[a * a, g * a, a * g] for a, g in self.options], np.float64) / 1024.0

    def block_unit_costs(self, act_frac) -> np.ndarray:
        """[n, K] cost per MAC of each block under each option, `act_frac[l]` the share of block l's MACs in
        activation x activation GEMMs: the MAC-weighted mean of the two unit costs (exactly `unit_costs` where the
        share is 0)."""
        uw, ua = self.unit_costs().sum(1), self.act_unit_costs().sum(1)
        f = np.asarray(act_frac, np.float64).reshape(-1, 1)
        return uw[None, :] + f * (ua - uw)[None, :]

    def to_dict(self) -> dict:
        return asdict(self)


def static_blocks(blocks, op_dicts: list[dict], options: DfqOptions) -> dict[int, str]:
    """block index -> why it has no gate: the first GEMM's block (static_first, when the policy quantizes that
    GEMM and it is a block of its own, like a ResNet's stem conv; a first GEMM inside a residual block, like a
    transformer's first projection, leaves that block gated) and the blocks of GEMMs matching a `static` glob. The
    rest are gated."""
    out = {}
    first = op_dicts[0] if op_dicts else {}
    if options.static_first and first.get("quantized") and first.get("block") is not None \
            and list(blocks[first["block"]].ops) == [first["name"]]:
        out[first["block"]] = f"first GEMM {first['name']}"
    for pat in options.static:
        hits = [d for d in op_dicts if d.get("quantized") and d.get("block") is not None
                and fnmatch.fnmatchcase(d["name"], pat)]
        if not hits:
            raise FracgraphError(f"--keep-static {pat!r} matches no quantized GEMM; the quantized GEMMs are "
                                 f"{', '.join(d['name'] for d in op_dicts if d.get('quantized'))[:300]}")
        for d in hits:
            out.setdefault(d["block"], f"GEMM {d['name']} matches --keep-static {pat!r}")
    if len(out) == len(blocks):
        raise FracgraphError("every quantized block is static (--first static / --keep-static), so DFQ has no gate "
                             "to train; quantize without --dfq, or narrow --keep-static")
    return dict(sorted(out.items()))


def parse_options(text: str) -> list[list[int]]:
    """'3/6,4/6,4/8,skip' -> [[3, 6], [4, 6], [4, 8], [0, 0]] (skip is stored as bits 0, as the release does)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.lower() == "skip":
            out.append(list(SKIP))
            continue
        try:
            a, g = item.split("/")
            out.append([int(a), int(g)])
        except ValueError:
            raise FracgraphError(f"--options item {item!r} is not FW/BW bits like 4/8 or `skip`; write e.g. "
                                 f"3/6,4/6,4/8,6/8,6/12 or 3/6,4/6,4/8,6/8,skip")
        if 0 in out[-1]:
            raise FracgraphError(f"--options item {item!r}: 0 bits is not an option; write `skip` to let the gate "
                                 f"skip a block")
    return out


def option_label(option) -> str:
    """'4/8', or 'skip' for the skip option."""
    a, g = (int(v) for v in option)
    return "skip" if [a, g] == SKIP else f"{a}/{g}"


def block_ports(model: onnx.ModelProto, blocks, gemm_inputs: dict[str, str]) -> list[tuple[str, str]]:
    """(input tensor, output tensor) of every block: a residual block's fork output and its Add's output;
    a single layer's GEMM input and output."""
    g = dataflow_graph(model)
    idom = nx.immediate_dominators(g, _SOURCE)
    nodes = {n.name: n for n in model.graph.node}
    data_in = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    ports = []
    for b in blocks:
        if b.kind == "residual":
            add = nodes[b.name.split("@", 1)[1]]
            fork = idom[add.name]
            if fork == _SOURCE:
                x = data_in
            else:
                inside = nx.descendants(g, fork)
                outs = [o for o in nodes[fork].output if any(o in nodes[c].input for c in g.successors(fork) if c in inside)]
                x = outs[0]
            ports.append((x, add.output[0]))
        else:
            gemm = nodes[b.ops[0]]
            ports.append((gemm_inputs[gemm.name], gemm.output[0]))
    return ports


def block_shortcuts(model: onnx.ModelProto, blocks, ports) -> list[tuple[str | None, list[str]]]:
    """(shortcut tensor, the block GEMMs that compute it) of every block; (None, []) for a single layer.

    The shortcut is the input of the block's residual Add with fewer of the block's GEMMs upstream of it (back to
    the block's input): none for an identity shortcut, the 1x1 downsample conv for option B. A block whose two
    Add inputs hold as many GEMMs cannot tell its shortcut and cannot be skipped (one clear error)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    out = []
    for b, (x, _) in zip(blocks, ports):
        if b.kind != "residual":
            out.append((None, []))
            continue
        add = nodes[b.name.split("@", 1)[1]]
        members = set(b.ops)
        found = []
        for t0 in add.input:
            gemms = {n.name for n in upstream_nodes(producer, t0, x) if n.name in members}
            found.append((len(gemms), t0, sorted(gemms)))
        found.sort(key=lambda f: f[0])
        if len(found) != 2 or found[0][0] == found[1][0]:
            raise FracgraphError(f"block {b.name}: cannot tell its shortcut (both inputs of {add.name} hold "
                                 f"{found[0][0]} of the block's GEMMs), so it cannot be skipped; drop `skip` from "
                                 f"--options")
        out.append((found[0][1], found[0][2]))
    return out


class DfqGatePass(Pass):
    """Insert the gates, the shared LSTM, the per-block bits and the cost outputs (forward graph)."""

    name = "dfq-gate"

    def __init__(self, blocks, op_dicts: list[dict], options: DfqOptions, precision_input: str,
                 cost_table: dict | None = None):
        self.blocks = blocks
        self.cost_table = cost_table       # hardware cost (analysis.estimate.dfq_cost_table); None = MACs
        if (options.cost != "macs") != (cost_table is not None):
            raise ValueError(f"--cost {options.cost}: the cost table must be given exactly for a hardware cost")
        self.op_dicts = op_dicts
        self.opts = options
        self.precision_input = precision_input
        self.params: list[str] = []           # trainable gate parameters (FP32)
        self.block_macs = np.zeros(len(blocks))
        self.act_act_macs = np.zeros(len(blocks))      # of which activation x activation GEMMs (attention)
        self.candidates: dict[str, list[tuple[str, str]]] = {}   # GEMM -> (its candidate clones, their bits key)
        self.grad_bits_const: dict[str, float] = {}              # candidates: bits key -> the clone's grad bits
        self.frozen: list[str] = []                                # candidates: their act bits (checkpoint buffers)
        for d in op_dicts:
            if d.get("quantized") and d.get("block") is not None:
                self.block_macs[d["block"]] += d["macs"]
                if not d.get("weight_is_param", True):
                    self.act_act_macs[d["block"]] += d["macs"]
        self.static = static_blocks(blocks, op_dicts, options)    # block index -> why it has no gate
        self.gated = [l for l in range(len(blocks)) if l not in self.static]
        if cost_table is not None and len(cost_table["cost_fp32"]) == len(blocks):   # the gated blocks' rows
            self.cost_table = {**cost_table, "cost_table": [cost_table["cost_table"][l] for l in self.gated],
                               "cost_fp32": [cost_table["cost_fp32"][l] for l in self.gated]}

    def requires(self, model):
        names = {i.name for i in model.graph.input}
        assert self.precision_input in names, f"precision input {self.precision_input} missing"
        assert self.blocks, "no blocks to gate"

    # -- parameters ---------------------------------------------------------------------------------
    def _param(self, model, name: str, value: np.ndarray) -> str:
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        self.params.append(name)
        return name

    def call(self, model):
        o = self.opts
        K = len(o.options)
        rng = np.random.default_rng(o.seed)
        shapes = _channel_counts(model)
        em = Emitter(model.graph, opset(model))
        P = PREFIX
        gemm_inputs = {n.name: n.input[0] for n in model.graph.node}
        gated_blocks = [self.blocks[l] for l in self.gated]
        ports = block_ports(model, gated_blocks, gemm_inputs)
        skip = o.skip_index
        shortcuts = block_shortcuts(model, gated_blocks, ports) if skip is not None else [(None, [])] * len(ports)
        can_skip = [skip is not None and sc is not None for sc, _ in shortcuts]
        if skip is not None and not any(can_skip):
            raise FracgraphError("`skip` in --options needs residual blocks, and none of the gated blocks has a "
                                 "shortcut; drop `skip`")
        nodes_by_output = {out: n for n in model.graph.node for out in n.output}

        H, E, G = o.hidden, o.embed_dim, o.gate_dim
        bound = 1.0 / np.sqrt(H)          # PyTorch's LSTM default init
        w_ih = self._param(model, f"{P}lstm/w_ih", rng.uniform(-bound, bound, (E, 4 * H)))
        w_hh_init = rng.uniform(-bound, bound, (H, 4 * H))   # drawn even when unused: same init for any depth
        b_ih = self._param(model, f"{P}lstm/b_ih", rng.uniform(-bound, bound, (4 * H,)))
        b_hh = self._param(model, f"{P}lstm/b_hh", rng.uniform(-bound, bound, (4 * H,)))
        lstm_bias = em.node("Add", [b_ih, b_hh], f"{P}lstm/bias")
        w_o = self._param(model, f"{P}proj/w", rng.normal(0, np.sqrt(2.0 / (H * K)), (H, K)))
        b_o = self._param(model, f"{P}proj/b", np.zeros(K))

        acts = em.const(np.array([[a] for a, _ in o.options], np.float32))     # [K, 1]
        grads = em.const(np.array([[g] for _, g in o.options], np.float32))
        macs = self.block_macs[self.gated]
        act_frac = np.divide(self.act_act_macs[self.gated], macs, out=np.zeros(len(self.gated)), where=macs > 0)
        unit = o.block_unit_costs(act_frac)             # [n, K] cost_fw + cost_eb + cost_gc per MAC of each block
        F = macs if o.cost_weighting == "macs" else np.ones(len(self.gated))
        block_unit, block_ratio = block_costs(unit, F, self.cost_table)       # gated blocks, in gate order
        batch = em.node("Shape", [ports[0][0]], f"{P}batch/shape", start=0, end=1) if em.opset >= 15 else \
            em.node("Slice", [em.node("Shape", [ports[0][0]], f"{P}batch/shape_all"), em.const([0], np.int64),
                              em.const([1], np.int64)], f"{P}batch/shape")
        batch_f = em.node("Cast", [batch], f"{P}batch/f", to=TensorProto.FLOAT)
        batch_s = em.node("Reshape", [batch_f, em.const([], np.int64)], f"{P}batch/n")
        h = c = None
        cost_terms, bits_rows, counts_rows = [], [], []
        notes = [f"{self.blocks[l].name}: no gate, static --fw/--bw bits ({why})" for l, why in self.static.items()]
        for j, (l, b, (x, y)) in enumerate(zip(self.gated, gated_blocks, ports)):
            q = f"{P}b{l}"
            C_in = shapes.get(x)
            if C_in is None:
                raise ValueError(f"channel count of block {l} input {x} unknown (shape inference)")
            w1 = self._param(model, f"{q}/w1", rng.normal(0, np.sqrt(2.0 / G), (C_in, G)))
            b1 = self._param(model, f"{q}/b1", np.zeros(G))
            w2 = self._param(model, f"{q}/w2", rng.normal(0, np.sqrt(2.0 / E), (G, E)))
            b2 = self._param(model, f"{q}/b2", np.zeros(E))
            rank = shapes.get(("rank", x))
            # pooled over space ([B, C, H, W]) or over the sequence ([B, T, C], channels last: a transformer's)
            pooled = em.node("GlobalAveragePool", [x], f"{q}/gap") if rank and rank > 3 else \
                _reduce_mean(em, x, f"{q}/seq_mean", [1]) if rank == 3 else x
            flat = em.node("Flatten", [pooled], f"{q}/flat", axis=1)
            z1 = em.node("Add", [em.node("MatMul", [flat, w1], f"{q}/mm1"), b1], f"{q}/z1")
            r1 = em.node("Relu", [z1], f"{q}/r1")
            emb = em.node("Add", [em.node("MatMul", [r1, w2], f"{q}/mm2"), b2], f"{q}/emb")
            # LSTM cell, PyTorch gate order i, f, g, o
            gx = em.node("MatMul", [emb, w_ih], f"{q}/lstm/mx")
            if h is not None:
                w_hh = f"{P}lstm/w_hh"
                if w_hh not in self.params:
                    self._param(model, w_hh, w_hh_init)
                gx = em.node("Add", [gx, em.node("MatMul", [h, w_hh], f"{q}/lstm/mh")], f"{q}/lstm/mxh")
            # zero state at block 0: W_hh h = 0; one bias sum for all blocks (a parameter used by several
            # broadcasting Adds gets gradients whose shapes ORT's accumulation cannot reconcile)
            gates = em.node("Add", [gx, lstm_bias], f"{q}/lstm/gates")
            parts = [em.node("Slice", [gates, em.const([j * H], np.int64), em.const([(j + 1) * H], np.int64),
                                       em.const([1], np.int64)], f"{q}/lstm/{s}_pre") for j, s in enumerate("ifgo")]
            i_g = em.node("Sigmoid", [parts[0]], f"{q}/lstm/i")
            g_g = em.node("Tanh", [parts[2]], f"{q}/lstm/g")
            o_g = em.node("Sigmoid", [parts[3]], f"{q}/lstm/o")
            ig = em.node("Mul", [i_g, g_g], f"{q}/lstm/ig")
            # f * c with c = 0 at block 0 (written out: ORT fuses the Slices into a Split, whose gradient drops
            # the slot of an unused output)
            f_g = em.node("Sigmoid", [parts[1]], f"{q}/lstm/f")
            c = em.node("Add", [em.node("Mul", [f_g, c if c is not None else em.const(0.0)], f"{q}/lstm/fc"), ig],
                        f"{q}/lstm/c")
            h = em.node("Mul", [o_g, em.node("Tanh", [c], f"{q}/lstm/tc")], f"{q}/lstm/h")
            logits = em.node("Add", [em.node("MatMul", [h, w_o], f"{q}/proj/mm"), b_o], f"{q}/logits")
            if skip is not None and not can_skip[j]:   # no shortcut: the skip option is masked out of the softmax
                logits = em.node("Add", [logits, em.const(np.where(np.arange(K) == skip, MASKED_LOGIT, 0.0))],
                                 f"{q}/logits_noskip")
            p = em.node("Softmax", [logits], f"{q}/p", axis=-1)
            # a trailing axis of size 1 throughout, so the stop-gradient is ReduceMax over it on the very tensor
            # (a ReduceMax input must have another consumer that carries its gradient)
            p3 = em.node("Unsqueeze", [p, em.const([-1], np.int64)], f"{q}/p3")           # [B, K, 1]
            batch_mode = o.granularity == "batch"
            cand_mode = o.granularity == "candidates"
            if batch_mode:
                soft = _reduce_mean(em, p3, f"{q}/pbar", [0])                             # [K, 1]
                opt_axis, all_axes, keep_axes = 0, [0, 1], [0, 1]
            else:
                soft = p3
                opt_axis, all_axes, keep_axes = 1, [0, 1, 2], [1, 2]
            idx = em.node("ArgMax", [soft], f"{q}/choice", axis=opt_axis, keepdims=0)     # [1] or [B, 1]
            hard = em.node("OneHot", [idx, em.const(K, np.int64), em.const([0.0, 1.0])], f"{q}/hard",
                           axis=opt_axis)                                                 # like soft
            sg = em.reduce("ReduceMax", soft, f"{q}/soft_sg", [-1], 1)
            mask = em.node("Add", [hard, em.node("Sub", [soft, sg], f"{q}/st")], f"{q}/mask")   # = hard forward
            # task_grad "chosen": the chosen entry of the mask (1 forward) scales the block output
            # (with skip: the chosen entry among the precision options, 0 when skip is chosen)
            sel = hard if not can_skip[j] else em.node(
                "Mul", [hard, em.const(np.where(np.arange(K) == skip, 0.0, 1.0).reshape(K, 1))], f"{q}/hard_q")
            m_c = None if o.task_grad == "none" else em.node("ReduceSum", [em.node("Mul", [mask, sel], f"{q}/mask_sel"), em.const(keep_axes, np.int64)],
                          f"{q}/m_chosen", keepdims=0)                                    # [] or [B]
            m_s = None
            if can_skip[j]:   # the skip entry of the mask (exactly 0 or 1 forward)
                m_s = em.node("Reshape", [em.node("Gather", [mask, em.const(skip, np.int64)], f"{q}/m_skip_k", axis=opt_axis),
                                          em.const([] if batch_mode else [-1], np.int64)], f"{q}/m_skip")
            # bits per block (or per sample), from the hard one-hot only: no gradient
            a_bits = em.node("ReduceSum", [em.node("Mul", [hard, acts], f"{q}/a_k"), em.const(keep_axes, np.int64)],
                             f"{q}/a_bits", keepdims=0)
            g_bits = em.node("ReduceSum", [em.node("Mul", [hard, grads], f"{q}/g_k"), em.const(keep_axes, np.int64)],
                             f"{q}/g_bits", keepdims=0)
            bits_name = f"{self.precision_input}::b{l}"
            if batch_mode:
                em.node("Identity", [a_bits], f"{bits_name}.act")
                em.node("Identity", [g_bits], f"{bits_name}.grad")
                if can_skip[j]:   # a skipped block runs FP32 throughout (weights too: the release's FP `prev`)
                    flat = f"{self.precision_input}::flat"
                    if not em.has(flat):
                        em.node("Reshape", [self.precision_input, em.const([-1], np.int64)], flat)
                    w_in = em.node("Gather", [flat, em.const(l * 3 + 1, np.int64)], f"{q}/w_bits_in", axis=0)
                    runs = em.node("Sub", [em.const(1.0), em.node("Reshape", [em.node(
                        "Gather", [hard, em.const(skip, np.int64)], f"{q}/skip_k", axis=0), em.const([], np.int64)],
                        f"{q}/skip_hard")], f"{q}/runs")
                    em.node("Mul", [w_in, runs], f"{bits_name}.weight")
                a_row, g_row = a_bits, g_bits
                counts = em.node("Reshape", [em.node("Mul", [hard, batch_s], f"{q}/counts_k1"), em.const([K], np.int64)],
                                 f"{q}/counts")
            elif cand_mode:   # candidate k at constant bits (a_k, w, g_k); the mix of the K outputs below
                for k, (a_k, g_k) in enumerate(o.options):
                    # act bits: a frozen scalar per candidate, so that no common-subexpression elimination merges
                    # two candidates with equal act bits (their forwards agree, their error quantizers do not)
                    model.graph.initializer.append(numpy_helper.from_array(np.array(a_k, np.float32), f"{bits_name}k{k}.act"))
                    self.frozen.append(f"{bits_name}k{k}.act")
                    self.grad_bits_const[f"{l}k{k}"] = float(g_k)   # used only in backward: the BW pass emits it
                a_row, g_row = _reduce_mean(em, a_bits, f"{q}/a_mean", [0], 0), _reduce_mean(em, g_bits, f"{q}/g_mean", [0], 0)
                counts = em.node("ReduceSum", [hard, em.const([0, 2], np.int64)], f"{q}/counts", keepdims=0)
                self._candidates(model, em, l, b, x, y, mask, K, shapes, q)
            else:   # per-sample values broadcast over each sample's elements
                in_rank, out_rank = shapes.get(("rank", x)) or 4, shapes.get(("rank", y)) or 4
                for col, v, rank in (("act", a_bits, in_rank), ("grad", g_bits, out_rank)):
                    em.node("Identity", [v], f"{bits_name}.{col}/v")   # reserve the name
                    # a skipped sample's bits are 0: its quantizers pass it through (FP32)
                    marker = PER_SAMPLE_OFF_NODE if can_skip[j] else PER_SAMPLE_NODE
                    em.nodes.append(helper.make_node("Reshape", [v, em.const([-1] + [1] * (rank - 1), np.int64)],
                                                     [f"{bits_name}.{col}"], name=f"{q}/{col}{marker}"))
                if m_c is not None:
                    m_c = em.node("Reshape", [m_c, em.const([-1] + [1] * (out_rank - 1), np.int64)], f"{q}/m_chosen_b")
                if m_s is not None:
                    m_s = em.node("Reshape", [m_s, em.const([-1] + [1] * (out_rank - 1), np.int64)], f"{q}/m_skip_b")
                a_row, g_row = _reduce_mean(em, a_bits, f"{q}/a_mean", [0], 0), _reduce_mean(em, g_bits, f"{q}/g_mean", [0], 0)
                counts = em.node("ReduceSum", [hard, em.const([0, 2], np.int64)], f"{q}/counts", keepdims=0)
            if m_c is not None or m_s is not None:   # rewire: the producer of y writes y::dfq_pre
                prod = nodes_by_output[y]
                pre = f"{y}::dfq_pre"
                prod.output[list(prod.output).index(y)] = pre
                if m_s is None:   # y = y::dfq_pre * m_c (y keeps its name)
                    em.nodes.append(helper.make_node("Mul", [pre, m_c], [y], name=f"{q}/scale_output"))
                else:             # y = m_run * y::dfq_pre + m_skip * shortcut, two products: exact one-hot forward
                    m_run = m_c if m_c is not None else em.node("Sub", [em.const(1.0), m_s], f"{q}/m_run")
                    em.nodes.append(helper.make_node("Add", [em.node("Mul", [pre, m_run], f"{q}/run_part"),
                                                             em.node("Mul", [shortcuts[j][0], m_s], f"{q}/skip_part")],
                                                     [y], name=f"{q}/mix_skip"))
            # cost: sum over samples and options of mask * unit cost, times F_l / mean(F) (hardware table: x 1)
            unit_c = em.const(block_unit[j].reshape(K, 1).astype(np.float32))
            per = em.node("ReduceSum", [em.node("Mul", [mask, unit_c], f"{q}/cost_k"), em.const(all_axes, np.int64)],
                          f"{q}/cost_unit", keepdims=0)
            if batch_mode:
                per = em.node("Mul", [per, batch_s], f"{q}/cost_batch")
            cost_terms.append(em.node("Mul", [per, em.const(np.float32(block_ratio[j]))], f"{q}/cost"))
            counts_rows.append(em.node("Unsqueeze", [counts, em.const([0], np.int64)], f"{q}/counts_row"))
            row = em.node("Concat", [em.node("Reshape", [v, em.const([1], np.int64)], f"{q}/row{j}")
                                     for j, v in enumerate((a_row, em.const([float(o.weight_bits)]), g_row))],
                          f"{q}/bits_row", axis=0)
            bits_rows.append(em.node("Unsqueeze", [row, em.const([0], np.int64)], f"{q}/bits_row2"))
            notes.append(f"{b.name}: gate on {x} ({o.granularity})"
                         + (f"; skip option: output {y} mixed with the shortcut {shortcuts[j][0]}" if can_skip[j] else
                            "; skip option masked out (no shortcut)" if skip is not None else "")
                         + (f"; output scaled by the chosen mask entry" if m_c is not None else ""))

        total = cost_terms[0]
        for l, term in enumerate(cost_terms[1:], 1):    # Add chain: ORT has no gradient for Sum
            total = em.node("Add", [total, term], f"{P}C_norm/{l}")
        total = em.node("Identity", [total], f"{P}C_norm")
        # C_norm = C / mean(F); cp = 100 C / (3 B sum F) = 100 C_norm mean(F) / (3 B sum F) = 100 C_norm / (3 B n)
        cp = em.node("Div", [total, em.node("Mul", [batch_s, em.const(np.float32(3.0 * len(self.gated) / 100.0))],
                                            f"{P}cp_den")], CP_OUTPUT)
        below = em.node("Less", [cp, TARGET_INPUT], f"{P}below_target")
        reg = em.node("Where", [below, em.const(-1.0), em.const(1.0)], f"{P}reg")
        em.node("Mul", [em.node("Mul", [total, reg], f"{P}reg_C"), BETA_INPUT], COST_TERM)
        em.node("Concat", bits_rows, BITS_OUTPUT, axis=0)
        em.node("Concat", counts_rows, COUNTS_OUTPUT, axis=0)
        # the per-sample grad bits have no forward consumer; an output keeps them in the training graph
        keep = []
        if o.granularity == "sample":
            keep = [em.node("Concat", [em.node("Reshape", [f"{self.precision_input}::b{l}.grad", em.const([-1], np.int64)],
                                               f"{P}b{l}/g_flat") for l in self.gated], f"{P}grad_bits", axis=0)]

        em.flush()
        model.graph.input.extend([helper.make_tensor_value_info(TARGET_INPUT, TensorProto.FLOAT, []),
                                  helper.make_tensor_value_info(BETA_INPUT, TensorProto.FLOAT, [])])
        n = len(self.gated)
        model.graph.output.extend([
            helper.make_tensor_value_info(COST_TERM, TensorProto.FLOAT, []),
            helper.make_tensor_value_info(CP_OUTPUT, TensorProto.FLOAT, []),
            helper.make_tensor_value_info(BITS_OUTPUT, TensorProto.FLOAT, [n, 3]),
            helper.make_tensor_value_info(COUNTS_OUTPUT, TensorProto.FLOAT, [n, K]),
        ] + [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["grad_bits"]) for k in keep])
        self.extra_outputs = [CP_OUTPUT, BITS_OUTPUT, COUNTS_OUTPUT] + keep
        self.cost_scale = {"gated": list(self.gated), "static_blocks": sorted(self.static), "F": F.tolist(),
                           "mean_F": float(F.mean()), "unit_costs": o.unit_costs().tolist(),
                           "act_unit_costs": o.act_unit_costs().tolist(), "act_frac": act_frac.tolist(),
                           **(self.cost_table or {}),
                           "skip_index": skip, "skippable": can_skip,
                           "shortcut_ops": [ops for _, ops in shortcuts]}
        return PassResult(model, True, notes)

    def ensures(self, model):
        outs = {n for node in model.graph.node for n in node.output} | {t.name for t in model.graph.initializer}
        K = len(self.opts.options)
        keys = [f"{l}k{k}" for l in self.gated for k in range(K)] if self.candidates else self.gated
        for key in keys:
            for col in ("act",) if self.candidates else ("act", "grad"):
                assert f"{self.precision_input}::b{key}.{col}" in outs, f"block {key} {col} bits not produced"
        for name in self.candidates:
            assert name not in {n.name for n in model.graph.node}, f"{name} still computed outside its candidates"
        assert COST_TERM in outs and CP_OUTPUT in outs

    def _candidates(self, model, em: Emitter, l: int, block, x: str, y: str, mask: str, K: int, shapes, q: str):
        """Replace block l's nodes by K clones and mix their outputs per sample with the straight-through mask."""
        region, end = block_region(model, x, y)
        for n in region:
            model.graph.node.remove(n)
        outs = []
        for k in range(K):
            model.graph.node.extend(clone_region(region, k))
            m_k = em.node("Reshape", [em.node("Gather", [mask, em.const(k, np.int64)], f"{q}/m{k}", axis=1),
                                      em.const([-1] + [1] * ((shapes.get(("rank", y)) or 4) - 1), np.int64)], f"{q}/m{k}_b")
            outs.append(em.node("Mul", [candidate_name(end, k), m_k], f"{q}/cand{k}_part"))
        total = outs[0]
        for k, part in enumerate(outs[1:-1], 1):
            total = em.node("Add", [total, part], f"{q}/cand_sum{k}")
        em.nodes.append(helper.make_node("Add", [total, outs[-1]], [end], name=f"{q}/mix_candidates"))
        for g in block.ops:
            self.candidates[g] = [(candidate_name(g, k), f"{l}k{k}") for k in range(K)]

    def expand_plan(self, plan: list[tuple[dict, int]]) -> list[tuple[dict, int]]:
        """The quantizer plan with every candidate GEMM in place of its block's GEMM (bits read under `bits_key`)."""
        out = []
        for d, block in plan:
            for name, key in self.candidates.get(d["name"], [(d["name"], None)]):
                out.append((d if key is None else dict(d, name=name, bits_key=key), block))
        return out


def block_costs(unit: np.ndarray, F: np.ndarray, table: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(per block [n, K] cost per sample of each option, per block factor) of the cost term, normalized so that
    C_norm = B sum_l unit_l[k_l] ratio_l and cp = 100 C_norm / (3 B n) (n blocks).

    `unit`: [K] per MAC of every block, or [n, K] per block (`DfqOptions.block_unit_costs`).
    MACs: unit_l = unit (a w + g w + a g)/1024 (a weight GEMM; attention's a x a GEMMs: `block_unit_costs`),
    ratio_l = F_l / mean(F), exactly the release's C / mean(F).
    A hardware table T[l, k] with FP32 cost T32[l] (any unit, per sample): unit_l = 3 n T[l] / sum(T32), ratio 1;
    then cp = 100 sum_l T[l, k_l] / sum_l T32[l] (the block set's cost as % of its FP32 cost on that hardware), and
    for a table proportional to the MAC table (T = F unit, T32 = 3F) both give the same cost term."""
    n = len(F)
    unit = np.asarray(unit, np.float64)
    K = unit.shape[-1]
    if table is None:
        return np.broadcast_to(unit, (n, K)).copy(), F / F.mean()
    T = np.asarray(table["cost_table"], np.float64)
    T32 = np.asarray(table["cost_fp32"], np.float64)
    if T.shape != (n, K) or T32.shape != (n,):
        raise ValueError(f"cost table shape {T.shape}/{T32.shape} does not fit {n} blocks x {K} options")
    return 3 * n * T / T32.sum(), np.ones(n)


def _reduce_mean(em: Emitter, x: str, output: str, axes: list[int], keepdims: int = 0) -> str:
    if em.opset >= 18:
        return em.node("ReduceMean", [x, em.const(axes, np.int64)], output, keepdims=keepdims)
    return em.node("ReduceMean", [x], output, axes=axes, keepdims=keepdims)


def _channel_counts(model: onnx.ModelProto) -> dict:
    """tensor -> channel count (dim 1; the last dim of a rank-3 sequence [B, T, C]) and ("rank", tensor) -> rank,
    from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        ch = dims[-1] if len(dims) == 3 else dims[1] if len(dims) >= 2 else None
        if ch is not None and ch.HasField("dim_value"):
            out[vi.name] = ch.dim_value
        if vi.type.tensor_type.HasField("shape"):
            out[("rank", vi.name)] = len(dims)
    return out


def loss_block(cost_term: str = COST_TERM):
    """An onnxblock loss: mean cross-entropy of the logits plus the graph's cost term (both rank 0)."""
    from onnxruntime.training import onnxblock

    class CrossEntropyPlusCost(onnxblock.Block):
        def __init__(self):
            super().__init__()
            self.ce = onnxblock.loss.CrossEntropyLoss()

        def build(self, logits_name: str, cost_name: str):
            ce = self.ce(logits_name)
            out = "fracgraph::ce_plus_cost"
            self.base.graph.node.append(helper.make_node("Add", [ce, cost_name], [out], name=out))
            return out

    return CrossEntropyPlusCost()
