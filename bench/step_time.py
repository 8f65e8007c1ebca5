"""Training-step time and peak memory of resnet20 (batch 128): fracgraph FW8/BW8 with its speed passes, fused
error-quantizer kernels and tuned session ("after"; also with `--sr-noise shared`, and with `--no-fused-kernels`,
onnxruntime's own ops only), the same artifacts built without the passes (nchwc included) on
onnxruntime's default session ("before"), the
0-bit step, the plain (unquantized) ORT step, PyTorch eager FP32 and a PyTorch FracTrain-style quantized step;
plus `quantize` time on resnet164.

Each configuration runs in its own worker process (so its peak RSS, VmHWM, is its own), and the workers take
turns one step at a time, the order rotating every round (A B C, B C A, C A B, ...): on a shared, noisy machine
every configuration sees the same background load and follows every other configuration equally often (a step
right after another process's step can lose time to that process's still-spinning threads), so the medians and
ratios stay comparable even when the absolute times do not. Each step also waits `--settle` seconds first, so
that the threads of the step before (PyTorch's OpenMP threads spin ~0.2 s by default) have gone idle.

    python bench/step_time.py [--steps 7] [--batch 128] [--threads 2] [--no-quantize-time]
    python bench/step_time.py --settings      # the session-settings sweep behind runtime.SESSION_TUNING
    python bench/step_time.py --noise-check 3 # identical workers: how far this machine's noise moves a ratio
    python bench/step_time.py --int [--steps 5] [--bits-sweep 8/8,4/6,...]
        # integer convs and weight gradients (issue 18): the default artifacts and --no-int-kernels ones per precision FW/BW, the 0-bit
        # step, PyTorch eager FP32, and the step's GEMMs at this CPU's measured FP32 and int8 GEMM rates
    python bench/step_time.py --corpus [--corpus-models a,b] [--corpus-rounds 2] [--corpus-size 64] [--corpus-batch 32]
        # the model corpus (fracgraph/zoo_external.py): FW8/BW8 step of the default artifacts against PyTorch
        # eager FP32 of the same torch module, batch 32, 64x64, plus resnet20 batch 128; peak RSS of each worker
    python bench/step_time.py --corpus --corpus-models hf:gpt2,hf:llama,... [--corpus-context 32] [--corpus-vocab 96]
                              [--corpus-width 64]
        # transformers language models (zoo_external hf:ARCH, random weights): the default artifacts' FW8/BW8
        # step against the transformers model's PyTorch eager FP32 step (the same weights, batch and token ids, the
        # mean next-token cross-entropy, SGD momentum 0.9 / weight decay 1e-4 as the artifacts' default optimizer)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ORT = {"allow_spinning": True}     # onnxruntime's own defaults (what the session used before tuning)
SETTINGS = {                               # --settings: one change at a time against the tuned session
    "tuned (SESSION_TUNING)": {},
    "allow_spinning flipped": {"allow_spinning": os.environ.get("FRACGRAPH_ORT_SPIN", "1") == "0"},
    "graph opt basic": {"graph_optimization_level": "basic"},
    "graph opt extended": {"graph_optimization_level": "extended"},
    "mem pattern off": {"mem_pattern": False},
    "cpu arena off": {"cpu_arena": False},
}


# -- PyTorch references -------------------------------------------------------------------------------------
def torch_step(model, x, y, quantized: bool):
    """A PyTorch training step of `model`; quantized = FracTrain's FW8/BW8 on every conv (fake-quant inputs and
    weights with STE, stochastic-rounding 8-bit errors), as fracgraph computes it."""
    import torch
    import torch.nn.functional as F

    def fq(t, bits, per_channel=False, noise=False):
        with torch.no_grad():
            if per_channel:
                mn = t.flatten(1).min(1).values.view(-1, 1, 1, 1)
                mx = t.flatten(1).max(1).values.view(-1, 1, 1, 1)
            else:
                mn, mx = t.min(), t.max()
            s = torch.clamp((mx - mn) / (2**bits - 1), min=1e-8)
            u = (t - mn) / s
            if noise:
                u = u + torch.empty_like(u).uniform_(-0.5, 0.5)
            return torch.round(torch.clamp(u, 0, 2**bits - 1)) * s + mn

    class STE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, bits, pc):
            return fq(t, bits, pc)

        @staticmethod
        def backward(ctx, g):
            return g, None, None

    class GradQ(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, bits):
            ctx.bits = bits
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return fq(g, ctx.bits, noise=True), None

    def qconv_forward(conv):
        def forward(inp):
            out = F.conv2d(STE.apply(inp, 8, False), STE.apply(conv.weight, 8, True), None, conv.stride, conv.padding)
            return GradQ.apply(out, 8)
        return forward

    if quantized:
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.forward = qconv_forward(m)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xt), yt).backward()
        opt.step()

    return step


def hf_torch_step(model, ids, labels, lr: float = 0.01):
    """The PyTorch eager FP32 training step of a transformers LM as fracgraph's default artifacts train it: the
    forward on the token ids (with the inputs the export takes: an all-ones attention mask, zero token types), the
    mean cross-entropy of the logits [B, T, V] against the labels [B, T], backward, and SGD with the artifacts'
    default momentum 0.9 and weight decay 1e-4 on every parameter. The model stays in eval mode, the mode it was
    exported in: the export holds no dropout (and HF LMs have no batch norm), so both sides compute the same
    function; gradients flow all the same. The attention is the model's default implementation (recorded as
    `pytorch_attn`: sdpa in transformers 5, PyTorch's fused scaled_dot_product_attention). The step returns the
    loss before the update."""
    import torch
    import torch.nn.functional as F

    from fracgraph import zoo_external

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    ids = torch.from_numpy(ids.astype(np.int64))
    labels = torch.from_numpy(labels.astype(np.int64))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    kw = {n: feeds[n] for n in zoo_external.hf_input_names(model)}
    if "use_cache" in __import__("inspect").signature(model.forward).parameters:
        kw["use_cache"] = False
    model.eval()

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(**kw, return_dict=False)[0]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def lm_batch(batch: int, context: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids [batch, context] and their next tokens [batch, context] (int64), seed 0: both sides'."""
    ids = np.random.default_rng(0).integers(0, vocab, (batch, context + 1))
    return ids[:, :-1].astype(np.int64), ids[:, 1:].astype(np.int64)


def corpus_entry(name: str, width: int):
    """The zoo_external entry; an hf: language model at --corpus-width."""
    from fracgraph import zoo_external

    if name.startswith("hf:"):
        return zoo_external.hf_entry(name[3:], width)
    return zoo_external.entry(name)


# -- workers ------------------------------------------------------------------------------------------------
def make_step(kind: str, directory: Path, batch: int, threads: int, tuning: dict, model: str | None = None,
              size: int = 32, vocab: int = 96, width: int = 64):
    rng = np.random.default_rng(0)
    lm = kind.startswith("corpus_") and model.startswith("hf:")   # size = the context, vocab the classes
    if lm:
        x, y = lm_batch(batch, size, vocab)
    else:
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        y = rng.integers(0, 10, batch).astype(np.int64)
    if kind == "corpus_fg":    # the default artifacts of a corpus model (prepare_corpus)
        from onnxruntime.training import api  # noqa: F401

        from fracgraph.runtime import TrainSession

        sess = TrainSession(directory / f"art_{model}", threads=threads, seed=0, tuning=tuning)
        bits = np.full((sess.manifest.n_blocks, 3), 8, np.float32)
        if lm:
            x = x.astype(sess.manifest.task_info().input_dtype)
        return lambda: sess.step(x, y, bits, 0.01)
    if kind == "corpus_torch":
        import torch

        from fracgraph import zoo_external

        torch.set_num_threads(threads)
        e = corpus_entry(model, width)
        if lm:
            net = zoo_external.torch_model(e, classes=vocab, size=size, seed=0)
            print(f"info attn {net.config._attn_implementation}", flush=True)
            return hf_torch_step(net, x, y)
        net = zoo_external.torch_model(e, classes=10, size=size, seed=0)
        return torch_step(net, x, y, quantized=False)
    if kind in ("after", "before", "zero", "shared", "ort_ops", "noint"):
        from onnxruntime.training import api  # noqa: F401  (import outside TrainSession, see fracgraph/profile.py)

        from fracgraph.runtime import TrainSession

        art = {"before": "art_before", "shared": "art_shared", "ort_ops": "art_ort_ops", "noint": "art_noint"}.get(kind, "art")
        sess = TrainSession(directory / art, threads=threads, seed=0, tuning=tuning)
        bits = np.full((sess.manifest.n_blocks, 3), 0 if kind == "zero" else 8, np.float32)
        if os.environ.get("FRACGRAPH_BENCH_BITS"):   # --int's precision sweep: "act,weight,grad" for every block
            bits[:] = [float(b) for b in os.environ["FRACGRAPH_BENCH_BITS"].split(",")]
        return lambda: sess.step(x, y, bits, 0.01)
    if kind == "plain":
        from onnxruntime.training import api

        from fracgraph.runtime import session_options

        st = api.CheckpointState.load_checkpoint(str(directory / "plain" / "checkpoint"))
        mod = api.Module(str(directory / "plain" / "training_model.onnx"), st,
                         session_options=session_options(threads, tuning=tuning))
        opt = api.Optimizer(str(directory / "plain" / "optimizer_model.onnx"), mod)
        mod.train()

        def plain_step():
            mod(x, y)
            opt.step()
            mod.lazy_reset_grad()
        return plain_step
    import torch

    from fracgraph.zoo import build

    torch.set_num_threads(threads)
    return torch_step(build("resnet20", seed=0), x, y, quantized=kind == "torch_q")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(a) -> None:
    """Set up one configuration, then run one timed step per line read from stdin (the first rounds are the
    warm-up, which the parent runs only once every worker is up)."""
    step = make_step(a.worker, Path(a.dir), a.batch, a.threads, json.loads(a.tuning), a.model, a.size, a.vocab,
                     a.width)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t, c = time.perf_counter(), time.process_time()
        step()
        # wall time, and the process's CPU time (all its threads): the latter is less moved by other processes
        print(json.dumps({"s": time.perf_counter() - t, "cpu": time.process_time() - c}), flush=True)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)


class Worker:
    def __init__(self, label: str, kind: str, directory: Path, a, tuning: dict, env: dict | None = None,
                 model: str | None = None, size: int = 32, batch: int | None = None):
        self.label, self.times, self.cpu, self.info = label, [], [], {}
        cmd = [sys.executable, __file__, "--worker", kind, "--dir", str(directory), "--batch", str(batch or a.batch),
               "--threads", str(a.threads), "--tuning", json.dumps(tuning), "--size", str(size),
               "--vocab", str(getattr(a, "corpus_vocab", 96)), "--width", str(getattr(a, "corpus_width", 64))]
        cmd += ["--model", model] if model else []
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._expect("ready")

    def _expect(self, what: str) -> str:
        line = self.proc.stdout.readline()
        while line.startswith("info "):   # "info KEY VALUE": what the worker set up (PyTorch's attention)
            _, k, v = line.split(maxsplit=2)
            self.info[k] = v.strip()
            line = self.proc.stdout.readline()
        if not line.startswith(what) and not line.startswith("{"):
            raise RuntimeError(f"{self.label}: worker said {line!r}")
        return line

    def step(self) -> None:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        r = json.loads(self._expect("{"))
        self.times.append(r["s"])
        self.cpu.append(r["cpu"])

    def finish(self) -> float:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        peak = json.loads(self._expect("{"))["peak_rss_mb"]
        self.proc.wait()
        return peak


def gemm_rates(threads: int, n: int = 1024, reps: int = 5) -> tuple[float, float]:
    """(FP32, int8) multiply-adds per second of onnxruntime's MatMul and MatMulInteger (u8 x s8) on an n x n x n
    GEMM at `threads` threads, median of `reps`: this CPU's practical GEMM rate, the step's arithmetic limit."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    sessions = []
    for op, at, bt in (("MatMul", T.FLOAT, T.FLOAT), ("MatMulInteger", T.UINT8, T.INT8)):
        g = h.make_graph([h.make_node(op, ["a", "b"], ["y"])], "gemm", [h.make_tensor_value_info("a", at, [n, n]),
                         h.make_tensor_value_info("b", bt, [n, n])], [h.make_tensor_value_info("y", T.FLOAT if at == T.FLOAT else T.INT32, None)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8).SerializeToString(),
                                    so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {"a": rng.integers(0, 255, (n, n)).astype(np.float32 if at == T.FLOAT else np.uint8),
                 "b": rng.integers(-127, 127, (n, n)).astype(np.float32 if at == T.FLOAT else np.int8)}
        sess.run(None, feeds)
        sessions.append((sess, feeds, []))
    for _ in range(reps):   # interleaved, so that both see the same load
        for sess, feeds, ts in sessions:
            t = time.perf_counter()
            sess.run(None, feeds)
            ts.append(time.perf_counter() - t)
    rates = [n ** 3 / statistics.median(ts) for _, _, ts in sessions]
    return rates[0], rates[1]


def run_int(d: Path, a) -> None:
    """--int: the step with integer convs per precision against --no-int-kernels, 0 bits and PyTorch eager FP32."""
    from fracgraph.build import BuildOptions, build_artifacts
    from fracgraph.manifest import Manifest

    build_artifacts(d / "r20.onnx", d / "art_noint", BuildOptions(int_kernels=False))
    sweep = [tuple(int(b) for b in p.split("/")) for p in a.bits_sweep.split(",")]
    configs = []
    for fw, bw in sweep:
        env = {"FRACGRAPH_BENCH_BITS": f"{fw},{fw},{bw}"}
        configs.append((f"fracgraph FW{fw}/BW{bw}", "after", {}, env))
        configs.append((f"fracgraph FW{fw}/BW{bw} --no-int-kernels", "noint", {}, env))
    configs += [("fracgraph 0-bit", "zero", {}), ("PyTorch eager FP32", "torch_fp32", {}),
                ("PyTorch eager FP32, OMP passive", "torch_fp32", {}, {"OMP_WAIT_POLICY": "PASSIVE"})]
    load0 = os.getloadavg()[0]
    rows = run_interleaved(configs, d, a)
    load1 = os.getloadavg()[0]
    fp_label = min(("PyTorch eager FP32", "PyTorch eager FP32, OMP passive"), key=lambda k: rows[k][0])
    torch_fp = rows[fp_label][0]
    m = Manifest.read(d / "art")
    rec = m.extra.get("int_kernels") or {}
    n_int = sum(c["int"] for c in rec.get("convs", []))
    # forward, dX and dW of every costed GEMM (the first conv's dX, never computed, included: an upper bound)
    step_macs = 3 * a.batch * sum(op["macs"] for op in m.ops)
    int_names = {c["name"] for c in rec.get("convs", []) if c["int"]}
    fwd_conv_macs = a.batch * sum(op["macs"] for op in m.ops if op["name"] in int_names)
    dw_names = {w["name"].split("_Grad/")[0] for w in rec.get("weight_grads", []) if w["int"]}
    dw_macs = a.batch * sum(op["macs"] for op in m.ops if op["name"] in dw_names)   # dW: the forward's MACs
    fp_rate, int_rate = gemm_rates(a.threads)
    from fracgraph import kernels

    print(f"integer convs: {n_int} forward convs on IntConv, {len(dw_names)} weight gradients on IntConvGradW, run on "
          f"the {kernels.int_path()} path (the artifacts need {rec.get('path')}); load average {load0:.1f} -> "
          f"{load1:.1f} over the run")
    print(f"  {'':44s} {'step':>9s} {'/PT FP32':>9s} {'/no-int':>8s} {'peak RSS':>9s}")
    for k, (t, mem) in rows.items():
        ref = rows.get(f"{k} --no-int-kernels")
        rel = f"{t / ref[0]:8.2f}" if ref else " " * 8
        print(f"  {k:44s} {1000 * t:7.1f}ms {t / torch_fp:9.2f} {rel} {mem:7.0f}MB")
    print(f"  PyTorch baseline: {fp_label!r}")
    print(f"  the step's GEMMs ({step_macs / 1e9:.1f} GMAC) at onnxruntime's FP32 GEMM rate ({fp_rate / 1e9:.0f} GMAC/s, "
          f"1024^3 MatMul): {1000 * step_macs / fp_rate:.0f} ms = FP32 arithmetic limit, x{step_macs / fp_rate / torch_fp:.2f} "
          f"PyTorch FP32")
    print(f"  the integer forward convs alone ({fwd_conv_macs / 1e9:.1f} GMAC): FP32 {1000 * fwd_conv_macs / fp_rate:.0f} ms, at the "
          f"int8 MatMulInteger rate ({int_rate / 1e9:.0f} GMAC/s) {1000 * fwd_conv_macs / int_rate:.0f} ms")
    print(f"  the integer weight gradients alone ({dw_macs / 1e9:.1f} GMAC): FP32 {1000 * dw_macs / fp_rate:.0f} ms, at the "
          f"int8 rate {1000 * dw_macs / int_rate:.0f} ms")


def prepare(directory: Path, default_only: bool = False) -> None:
    """resnet20 artifacts with and without the speed passes, and the plain ORT artifacts (`default_only`: the
    default artifacts alone, all --corpus needs)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    from onnxruntime.training import artifacts as ort_artifacts

    from fracgraph.build import BuildOptions, build_artifacts, classify_initializers
    from fracgraph.model import load_model
    from fracgraph.zoo import export

    model = export("resnet20", directory / "r20.onnx")
    build_artifacts(model, directory / "art", BuildOptions())
    if default_only:
        return
    build_artifacts(model, directory / "art_shared", BuildOptions(sr_noise="shared"))
    build_artifacts(model, directory / "art_ort_ops", BuildOptions(fused_kernels=False))
    build_artifacts(model, directory / "art_before", BuildOptions(fast_backward=False, nchwc=False))
    plain = load_model(model)
    tr, fr = classify_initializers(plain)
    (directory / "plain").mkdir()
    ort_artifacts.generate_artifacts(plain, requires_grad=tr, frozen_params=fr, loss=ort_artifacts.LossType.CrossEntropyLoss,
                                     optimizer=ort_artifacts.OptimType.SGD, artifact_directory=str(directory / "plain"))


def run_interleaved(configs: list[tuple], directory: Path, a, times: dict[str, list[float]] | None = None,
                    cpu: dict[str, list[float]] | None = None,
                    info: dict[str, dict] | None = None) -> dict[str, tuple[float, float]]:
    """configs: (label, kind, ORT session tuning[, extra environment[, corpus model, size, batch]]); returns
    label -> (median s, peak RSS MB); `times`, if given, receives each label's step times in step order, `cpu`
    their process CPU times, `info` what each worker reported about its set-up.
    A pilot worker starts first and is not reported: the first worker started ran ~5% slower than identical
    later ones even with the ballast (`--noise-check 4`: 352 ms against 333-337)."""
    workers = [Worker(*c[:2], directory, a, *c[2:]) for c in [("pilot", "zero", {})] + configs]
    try:
        for _ in range(2):   # warm-up, once all workers exist
            for w in workers:
                w.step()
        for w in workers:
            w.times.clear()
            w.cpu.clear()
        for i in range(a.steps):
            # rotate who goes first: a worker's step is slower right after some others (threads still spinning),
            # so every configuration takes every position equally often
            for w in workers[i % len(workers):] + workers[:i % len(workers)]:
                time.sleep(a.settle)   # the previous worker's spin-waiting threads (ORT's, OpenMP's) go idle
                w.step()
        rows = {w.label: (statistics.median(w.times), w.finish()) for w in workers}
        rows.pop("pilot")
        if times is not None:
            times.update({w.label: list(w.times) for w in workers if w.label != "pilot"})
        if cpu is not None:
            cpu.update({w.label: list(w.cpu) for w in workers if w.label != "pilot"})
        if info is not None:
            info.update({w.label: dict(w.info) for w in workers if w.label != "pilot"})
        return rows
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()


def prepare_corpus(directory: Path, names: list[str], size: int, a=None) -> dict[str, str]:
    """Export and quantize (default options) each corpus model; returns name -> error for those that fail. An hf:
    language model is exported at context --corpus-context, vocabulary --corpus-vocab, width --corpus-width."""
    from fracgraph import zoo_external
    from fracgraph.build import BuildOptions, build_artifacts

    failed = {}
    for n in names:
        try:
            if n.startswith("hf:"):
                e = corpus_entry(n, a.corpus_width)
                path = zoo_external.export_entry(e, directory / f"{n}.onnx", classes=a.corpus_vocab,
                                                 size=a.corpus_context)
            else:
                e = zoo_external.entry(n)
                path = zoo_external.export_entry(e, directory / f"{n}.onnx", classes=10, size=max(size, e.min_size))
            build_artifacts(path, directory / f"art_{n}", BuildOptions())
        except Exception as exc:   # a row, not a crash: the model corpus bench says why
            msg = (str(exc).strip().splitlines() or [""])[0]
            failed[n] = f"{type(exc).__name__}: {msg}"[:200]
    return failed


def run_corpus(d: Path, a) -> None:
    """Each corpus model's FW8/BW8 step against PyTorch eager FP32 of the same module, then resnet20 at --batch
    (left out when every model is an hf: language model).

    A model's comparison is --corpus-rounds separate interleaved runs (fresh worker processes each, the models
    taken in turn, so a slow stretch of the machine or a slow process lands on one round of a model, not on all
    of it), --steps alternated steps each. Within a run the two workers' steps alternate, so the k-th fracgraph
    step and the k-th PyTorch step saw nearly the same load: the ratio of each such pair is the unit of
    comparison. The table gives the medians of the step times, the median of all paired ratios and their range
    over the rounds (each round's median paired ratio): a model is under 1.0x when its whole range is. The same
    paired ratio of the steps' process CPU times is given too (less moved by other processes' load than wall time
    when the step runs at 1 thread; at more threads it also counts spin-waiting)."""
    from fracgraph import zoo_external

    names = a.corpus_models.split(",") if a.corpus_models else [e.name for e in zoo_external.CORPUS]
    legacy = [n for n in names if not n.startswith("hf:") and zoo_external.entry(n).source == "legacy"]
    names = [n for n in names if n not in legacy]
    lms = [n for n in names if n.startswith("hf:")]
    failed = prepare_corpus(d, names, a.corpus_size, a)
    with_r20 = len(lms) < len(names) or not names
    lm_note = (f"; language models: context {a.corpus_context}, vocabulary {a.corpus_vocab}, width "
               f"{a.corpus_width}, 2 layers, 4 heads" if lms else "")
    print(f"model corpus, batch {a.corpus_batch}, {a.corpus_size}x{a.corpus_size} inputs{lm_note}, {a.threads} threads, "
          f"{a.corpus_rounds} rounds of {a.steps} alternated steps per model"
          f"{f' (resnet20: batch {a.batch}, 32x32)' if with_r20 else ''}; "
          f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    models = [n for n in names if n not in failed] + (["resnet20"] if with_r20 else [])
    sizes = {n: a.corpus_size if n == "resnet20" else a.corpus_context if n in lms else
             max(a.corpus_size, zoo_external.entry(n).min_size) for n in names + ["resnet20"]}
    runs: dict[str, list[dict]] = {n: [] for n in models}
    cpus: dict[str, list[dict]] = {n: [] for n in models}
    attn: dict[str, str] = {}
    loads: list[float] = [os.getloadavg()[0]]
    mem: dict[str, tuple[float, float]] = {}
    errors: dict[str, str] = {}
    for r in range(a.corpus_rounds):
        for n in models:
            if n in errors:
                continue
            if n == "resnet20":
                configs = [("fg", "after", {}), ("pt", "torch_fp32", {})]
            else:
                configs = [("fg", "corpus_fg", {}, None, n, sizes[n], a.corpus_batch),
                           ("pt", "corpus_torch", {}, None, n, sizes[n], a.corpus_batch)]
            times: dict[str, list[float]] = {}
            cpu: dict[str, list[float]] = {}
            info: dict[str, dict] = {}
            try:
                rows = run_interleaved(configs, d, a, times, cpu, info)
            except Exception as exc:
                errors[n] = str(exc).splitlines()[0][:200]
                continue
            runs[n].append(times)
            cpus[n].append(cpu)
            if "attn" in info.get("pt", {}):
                attn[n] = info["pt"]["attn"]
            mem[n] = (max(rows["fg"][1], mem.get(n, (0, 0))[0]), max(rows["pt"][1], mem.get(n, (0, 0))[1]))
            loads.append(os.getloadavg()[0])
            print(f"  round {r + 1} {n}: fracgraph {1000 * rows['fg'][0]:.0f} ms, PyTorch {1000 * rows['pt'][0]:.0f} ms, "
                  f"load {loads[-1]:.1f}", flush=True)
    print(f"load average over the runs: {min(loads):.1f}-{max(loads):.1f}")
    print("| model | fracgraph FW8/BW8 ms | PyTorch eager FP32 ms | / PyTorch FP32 (paired) | per round | "
          "/ PyTorch, CPU time (paired) | per round | peak RSS MB fracgraph | peak RSS MB PyTorch |\n"
          "|---|---|---|---|---|---|---|---|---|")
    table = []
    for n in names + (["resnet20"] if with_r20 else []):
        label = n if n != "resnet20" else f"resnet20 (zoo, batch {a.batch}, 32x32)"
        if n not in lms and sizes[n] != a.corpus_size:
            label += f" ({sizes[n]}x{sizes[n]})"
        if n in attn:
            label += f" (PyTorch attention: {attn[n]})"
        if n in failed or (n in errors and not runs[n]):
            why = f"not built: {failed[n]}" if n in failed else f"step failed: {errors[n]}"
            print(f"| {label} | {why} | | | | | | | |", flush=True)
            table.append({"model": n, "error": why})
            continue
        fg = [t for run in runs[n] for t in run["fg"]]
        pt = [t for run in runs[n] for t in run["pt"]]
        paired = [f / p for run in runs[n] for f, p in zip(run["fg"], run["pt"])]
        per_round = [statistics.median(f / p for f, p in zip(run["fg"], run["pt"])) for run in runs[n]]
        paired_cpu = [f / p for run in cpus[n] for f, p in zip(run["fg"], run["pt"])]
        per_round_cpu = [statistics.median(f / p for f, p in zip(run["fg"], run["pt"])) for run in cpus[n]]
        row = {"model": n, "fracgraph_ms": 1000 * statistics.median(fg), "pytorch_ms": 1000 * statistics.median(pt),
               "ratio": statistics.median(paired), "ratio_rounds": per_round,
               "ratio_cpu": statistics.median(paired_cpu), "ratio_cpu_rounds": per_round_cpu,
               "peak_rss_mb_fracgraph": mem[n][0], "peak_rss_mb_pytorch": mem[n][1]}
        if n in attn:
            row["pytorch_attn"] = attn[n]
        if n in errors:   # a later round failed after an earlier one ran: the row holds the rounds that ran
            row["error"] = f"round {len(runs[n]) + 1} failed: {errors[n]}"
        table.append(row)
        rng_ = lambda xs: '-'.join(f'{x:.2f}' for x in sorted(xs))   # noqa: E731
        print(f"| {label} | {row['fracgraph_ms']:.0f} | {row['pytorch_ms']:.0f} | {row['ratio']:.2f} | "
              f"{rng_(per_round)}{' (' + row['error'] + ')' if 'error' in row else ''} | {row['ratio_cpu']:.2f} | "
              f"{rng_(per_round_cpu)} | {mem[n][0]:.0f} | {mem[n][1]:.0f} |", flush=True)
    if legacy:
        print(f"not timed (no PyTorch module to compare with): {', '.join(legacy)}")
    if a.json:
        out = {"rounds": a.corpus_rounds, "steps": a.steps, "threads": a.threads, "batch": a.corpus_batch,
               "size": a.corpus_size, "load": [min(loads), max(loads)], "rows": table}
        if lms:
            out.update(context=a.corpus_context, vocab=a.corpus_vocab, width=a.corpus_width)
        Path(a.json).write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--settings", action="store_true", help="sweep the session settings of the fracgraph step")
    ap.add_argument("--no-quantize-time", action="store_true")
    ap.add_argument("--ballast-gb", type=float, default=3.0, metavar="GB",
                    help="memory the parent holds while the workers run (see main)")
    ap.add_argument("--settle", type=float, default=0.3, metavar="S",
                    help="pause before each step, so no other worker's threads still spin (OpenMP spins ~0.2 s)")
    ap.add_argument("--noise-check", type=int, default=0, metavar="N",
                    help="only run N workers of the same FW8/BW8 configuration: the spread is this machine's noise")
    ap.add_argument("--corpus", action="store_true",
                    help="the model corpus against PyTorch eager FP32 (and resnet20 at --batch)")
    ap.add_argument("--corpus-models", help="comma-separated corpus names (default: every torchvision/timm model)")
    ap.add_argument("--corpus-size", type=int, default=64)
    ap.add_argument("--corpus-context", type=int, default=32,
                    help="hf: language models' context (default: model_corpus.py's, the README HF table's)")
    ap.add_argument("--corpus-vocab", type=int, default=96, help="hf: language models' vocabulary")
    ap.add_argument("--corpus-width", type=int, default=64,
                    help="hf: language models' width (64 = zoo_external's hf:ARCH; 4 heads, MLP 2 x width)")
    ap.add_argument("--corpus-batch", type=int, default=32)
    ap.add_argument("--corpus-rounds", type=int, default=2, metavar="R",
                    help="--corpus: separate interleaved runs per model (fresh processes each)")
    ap.add_argument("--json", metavar="PATH", help="--corpus: also write the table here")
    ap.add_argument("--int", action="store_true", help="integer convs (issue 18): per precision, against --no-int-kernels")
    ap.add_argument("--bits-sweep", default="8/8,8/6,6/8,6/6,4/8,4/6", metavar="FW/BW,...",
                    help="--int: the precisions (FW = activation and weight bits, BW = error bits)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=96, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--tuning", default="{}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        prepare(d, default_only=a.corpus or a.int)
        # On this VM the first workers started after prepare() ran slower for the whole run than the same
        # configuration started later (ad-hoc runs of identical workers); holding freshly touched memory in the
        # parent, so that the workers do not start on the pages prepare() just freed, reduced that (with the pilot
        # worker of run_interleaved, --noise-check 4 gives max/min 1.01-1.05).
        ballast = np.ones(int(a.ballast_gb * 2**30) // 8)  # noqa: F841  (held until the run ends)
        if a.corpus:
            return run_corpus(d, a)
        if a.int:
            return run_int(d, a)
        print(f"resnet20, batch {a.batch}, {a.threads} threads, median of {a.steps} interleaved steps per row")
        if a.noise_check:
            rows = run_interleaved([(f"fracgraph FW8/BW8 #{k + 1}", "after", {}) for k in range(a.noise_check)], d, a)
            times = [t for t, _ in rows.values()]
            for k, (t, _) in rows.items():
                print(f"  {k:28s} {1000 * t:8.1f} ms")
            print(f"  spread of identical workers: max/min {max(times) / min(times):.2f}")
            return
        if a.settings:
            rows = run_interleaved([(k, "after", v) for k, v in SETTINGS.items()], d, a)
            base = rows["tuned (SESSION_TUNING)"][0]
            for k, (t, mem) in rows.items():
                print(f"  {k:28s} {1000 * t:8.1f} ms  x{t / base:5.2f}  peak RSS {mem:7.0f} MB")
            return
        configs = [
            ("fracgraph FW8/BW8", "after", {}),
            ("fracgraph FW8/BW8, shared noise", "shared", {}),
            ("fracgraph FW8/BW8, ORT ops only", "ort_ops", {}),
            ("fracgraph FW8/BW8 before", "before", DEFAULT_ORT),
            ("fracgraph 0-bit", "zero", {}),
            ("ORT plain FP32", "plain", {}),
            ("PyTorch eager FP32", "torch_fp32", {}),
            ("PyTorch FracTrain-style FW8/BW8", "torch_q", {}),
            # PyTorch's OpenMP threads spin-wait by default, as ORT's did before tuning; on a loaded machine that
            # costs it as much as it cost ORT, so the comparison also runs it with passive waiting
            ("PyTorch eager FP32, OMP passive", "torch_fp32", {}, {"OMP_WAIT_POLICY": "PASSIVE"}),
            ("PyTorch FW8/BW8, OMP passive", "torch_q", {}, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ]
        rows = run_interleaved(configs, d, a)
        # the baselines: the faster of each PyTorch pair (default or passive waiting)
        q_label = min(("PyTorch FracTrain-style FW8/BW8", "PyTorch FW8/BW8, OMP passive"), key=lambda k: rows[k][0])
        fp_label = min(("PyTorch eager FP32", "PyTorch eager FP32, OMP passive"), key=lambda k: rows[k][0])
        torch_q, torch_fp, torch_mem = rows[q_label][0], rows[fp_label][0], rows[q_label][1]
        print(f"baselines: PT quant = {q_label!r}, PT FP32 = {fp_label!r}")
        print(f"  {'':34s} {'step':>9s} {'/PT quant':>9s} {'/PT FP32':>9s} {'peak RSS':>9s} {'/PT quant':>9s}")
        for k, (t, mem) in rows.items():
            print(f"  {k:34s} {1000 * t:7.1f}ms {t / torch_q:9.2f} {t / torch_fp:9.2f} {mem:7.0f}MB {mem / torch_mem:9.2f}")
        after, before = rows["fracgraph FW8/BW8"][0], rows["fracgraph FW8/BW8 before"][0]
        print("ratios:")
        print(f"  fracgraph FW8/BW8 after / before           {after / before:.2f}")
        print(f"  fracgraph FW8/BW8 / fracgraph 0-bit        {after / rows['fracgraph 0-bit'][0]:.2f}  (target <= 1.25)")
        print(f"  fracgraph FW8/BW8 / ORT plain FP32         {after / rows['ORT plain FP32'][0]:.2f}")
        print(f"  fracgraph FW8/BW8 / PyTorch quantized      {after / torch_q:.2f}  (goal <= 1.0)")
        print(f"  fracgraph FW8/BW8 / PyTorch FP32           {after / torch_fp:.2f}  (stretch <= 1.0)")
        shared = rows["fracgraph FW8/BW8, shared noise"][0]
        print(f"  fracgraph FW8/BW8 shared noise / PT quant  {shared / torch_q:.2f}  (--sr-noise shared)")
        ort_ops = rows["fracgraph FW8/BW8, ORT ops only"][0]
        print(f"  fracgraph FW8/BW8 ORT ops only / PT quant  {ort_ops / torch_q:.2f}  (--no-fused-kernels: graph passes only)")
        print(f"  PyTorch quantized / PyTorch FP32           {torch_q / torch_fp:.2f}")
        if not a.no_quantize_time:
            from fracgraph.build import BuildOptions, build_artifacts
            from fracgraph.zoo import export

            export("resnet164", d / "r164.onnx")
            t = time.perf_counter()
            build_artifacts(d / "r164.onnx", d / "art164", BuildOptions())
            print(f"quantize resnet164: {time.perf_counter() - t:.2f} s (target < 5 s)")


if __name__ == "__main__":
    main()
