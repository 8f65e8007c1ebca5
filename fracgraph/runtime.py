"""The onnxruntime-training adapter: the only module that talks to ORT's training API.

A `TrainSession` holds the checkpoint state, the train/eval module and the optimizer, and runs one step at a
time with the precisions as a runtime input. SGD with momentum (FracTrain's optimizer, which ORT's built-in SGD
lacks) updates the parameters in place through their live numpy views: m = mu*m + g + wd*w; w -= lr*m
(PyTorch's SGD semantics). AdamW uses ORT's own optimizer model.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import numpy as np
import onnx

from . import kernels
from .errors import FracgraphError
from .manifest import Manifest
from .passes.dfq_gate import BETA_INPUT, TARGET_INPUT


# Session settings chosen by measurement (bench/step_time.py --settings; numbers in README "Speed"). Spinning
# worker threads are 0.78x the step time on idle cores but collapse when the cores are shared, so a machine
# running other jobs beside training sets FRACGRAPH_ORT_SPIN=0.
SESSION_TUNING = {"allow_spinning": os.environ.get("FRACGRAPH_ORT_SPIN", "1") != "0", "graph_optimization_level": "all",
                  "mem_pattern": True, "cpu_arena": True, "flush_denormals": True}
# flush_denormals: the step runs with denormal floats flushed to zero (FTZ/DAZ) on onnxruntime's threads. A masked
# softmax (the causal mask's -inf, or a -1e9 fill) and GELU's exp(-x^2/2) underflow into denormals, which x86 computes
# in microcode: onnxruntime's Softmax on a causally masked [12, 4, 64, 64] score tensor took 1.1-1.8 ms with them and
# 0.26 ms flushed (the same output values). Values below 1.2e-38 become 0, which no quantizer step or gradient of
# these models reaches (the quantizers' scales are clamped at 1e-8). README "Language models", "Step time".


@contextlib.contextmanager
def flushed_denormals(enabled: bool = True):
    """FTZ/DAZ on the calling thread for the duration (onnxruntime runs a step on the caller's thread too), restored
    after: the caller's own numpy/torch arithmetic keeps its denormals."""
    if not enabled or _flushing():
        yield
        return
    import torch   # onnxruntime.training imports it anyway; its switch sets both MXCSR bits

    if not torch.set_flush_denormal(True):   # a CPU without them: nothing to flush
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _flushing() -> bool:
    """Whether this thread flushes denormals now (a denormal product comes out 0)."""
    return float((np.array([1e-30], np.float32) * np.float32(1e-10))[0]) == 0.0


def session_options(threads: int | None = None, profile_prefix: str | None = None, tuning: dict | None = None,
                    custom_ops: bool = False):
    import onnxruntime as ort

    t = {**SESSION_TUNING, **(tuning or {})}
    so = ort.SessionOptions()
    so.intra_op_num_threads = resolve_threads(threads)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if t["allow_spinning"] else "0")
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[t["graph_optimization_level"]]
    so.enable_mem_pattern = t["mem_pattern"]
    so.enable_cpu_mem_arena = t["cpu_arena"]
    so.log_severity_level = 3
    if t["flush_denormals"]:   # onnxruntime's worker threads (the caller's thread: flushed_denormals)
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if custom_ops:
        kernels.register(so)
    return so


def nchwc_block_size() -> int:
    """Channels per NCHWc block of this CPU's onnxruntime kernels (16 AVX-512, 8 AVX2; 1 = none): ReorderInput
    pads 4 channels up to one block (without NCHWc kernels the block is 1 and 4 channels stay 4)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("ReorderInput", ["x"], ["y"], domain="com.microsoft.nchwc")], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft.nchwc", 1)])
    m.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        block = int(sess.run(None, {"x": np.zeros((1, 4, 1, 1), np.float32)})[0].shape[1])
    except Exception:
        return 1
    return block if block > 4 else 1


def resolve_threads(threads: int | None = None) -> int:
    return threads or int(os.environ.get("FRACGRAPH_THREADS", "0")) or (os.cpu_count() or 1)


class SGDMomentum:
    """PyTorch-equivalent SGD (momentum, weight decay, no dampening) over ORT's live parameter buffers."""

    def __init__(self, state, names: list[str], momentum: float, weight_decay: float, threads: int = 0):
        self.state = state
        self.names = names
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.buffers: dict[str, np.ndarray] = {}
        self.lr = 0.1
        self.threads = threads   # > 0: the fused multithreaded step (kernels/sgd.c) where the library builds

    def set_learning_rate(self, lr: float) -> None:
        self.lr = lr

    def step(self) -> None:
        if self.threads and self._fused_step():
            return
        mu, wd, lr = self.momentum, self.weight_decay, self.lr
        for name in self.names:
            p = self.state.parameters[name]
            w, g = p.data, p.grad
            d = g + wd * w if wd else g.copy()
            m = self.buffers.get(name)
            if m is None:
                self.buffers[name] = m = d
            else:
                m *= mu
                m += d
            w -= lr * m

    def _fused_step(self) -> bool:
        """The same update in one multithreaded pass per parameter (kernels/sgd.c), bitwise the numpy form above;
        False (nothing done) where the kernels library is not available here."""
        try:
            lib = kernels._library()
        except Exception:   # no compiler, or the build failed: the numpy form
            self.threads = 0
            return False
        params = [self.state.parameters[name] for name in self.names]
        ws, gs = [p.data for p in params], [p.grad for p in params]
        if any(g is None or not (w.flags.c_contiguous and g.flags.c_contiguous and w.dtype == g.dtype == np.float32)
               for w, g in zip(ws, gs)):
            return False
        first = np.array([name not in self.buffers for name in self.names], np.int32)
        for name, w in zip(self.names, ws):
            if name not in self.buffers:
                self.buffers[name] = np.empty_like(w)
        ms = [self.buffers[name] for name in self.names]
        n = len(ws)
        ptrs = lambda arrs: (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrs])   # noqa: E731
        sizes = np.array([w.size for w in ws], np.int64)
        wd = self.weight_decay if self.weight_decay else 0.0
        lib.fg_sgd_step(ctypes.c_int64(n), ptrs(ws), ptrs(gs), ptrs(ms), sizes.ctypes.data_as(ctypes.c_void_p),
                        first.ctypes.data_as(ctypes.c_void_p), ctypes.c_float(self.lr), ctypes.c_float(self.momentum),
                        ctypes.c_float(wd), ctypes.c_int(self.threads))
        return True

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"momentum/{k}": v for k, v in self.buffers.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.buffers = {k[len("momentum/"):]: np.array(v, np.float32) for k, v in arrays.items() if k.startswith("momentum/")}


def check_int_kernels(art, record: dict | None) -> None:
    """Artifacts with integer convs (passes/int_gemm.py) name the path they were built for and the CPU flag it needs;
    on a CPU without it they would run on a slower path than the one measured, so they are refused in one line,
    unless FRACGRAPH_INT_ISA picks a path explicitly."""
    if not record or os.environ.get("FRACGRAPH_INT_ISA", "auto") not in ("", "auto"):
        return
    path = record.get("path", "scalar")
    if path in kernels.INT_PATHS and not kernels.int_path_available(path):
        raise FracgraphError(f"{art}: the artifacts run their integer convs on the {path} path, which needs the CPU flag "
                             f"{record.get('cpu_flag')} that this CPU lacks; re-run `fracgraph quantize` on this machine, "
                             f"or with --no-int-kernels, or set FRACGRAPH_INT_ISA=vnni|avx2|scalar to run on a slower path")


class TrainSession:
    """One training run's ORT objects; `step` trains on a batch, `evaluate` predicts with running statistics."""

    def __init__(self, art_dir, checkpoint: str | os.PathLike | None = None, threads: int | None = None, seed: int | None = None,
                 profile_prefix: str | None = None, tuning: dict | None = None):
        import onnxruntime as ort
        from onnxruntime.training import api

        self.art = Path(art_dir)
        self.threads = resolve_threads(threads)
        # profiling loads no eval session: onnxruntime would name both sessions' traces alike and one would be lost
        self.manifest = Manifest.read(self.art)
        custom_ops = bool(self.manifest.extra.get("custom_ops"))
        if seed is not None:
            ort.set_seed(int(seed))   # seeds the stochastic-rounding noise kernels created below
        if custom_ops:   # the fused error quantizers' generator: the run's seed, or a fresh one like onnxruntime's
            kernels.set_seed(int(seed) if seed is not None else int.from_bytes(os.urandom(8), "little"))
        block = self.manifest.extra.get("nchwc_block")
        if block and block != nchwc_block_size():
            raise FracgraphError(f"{self.art}: the artifacts run convs on NCHWc blocks of {block} channels but this CPU's "
                                 f"onnxruntime uses {nchwc_block_size()}; re-run `fracgraph quantize` on this machine "
                                 f"(or with --no-nchwc for artifacts that move between machines)")
        check_int_kernels(self.art, self.manifest.extra.get("int_kernels"))
        ckpt = Path(checkpoint) if checkpoint else self.art / self.manifest.files["checkpoint"]
        self.flush = bool({**SESSION_TUNING, **(tuning or {})}["flush_denormals"])
        try:
            self.state = api.CheckpointState.load_checkpoint(str(ckpt))
            with flushed_denormals(self.flush):   # a process's first session sets the creating thread's mode for good
                self.module = api.Module(str(self.art / self.manifest.files["training"]), self.state,
                                         None if profile_prefix else str(self.art / self.manifest.files["eval"]),
                                         device="cpu",
                                         session_options=session_options(threads, profile_prefix, tuning, custom_ops))
        except FracgraphError:
            raise
        except Exception as e:
            raise FracgraphError(f"{self.art}: onnxruntime cannot load the artifacts ({str(e).splitlines()[0][:200]}); re-run `fracgraph quantize`")
        opt = self.manifest.optimizer
        trainable = self.manifest.extra["trainable"]
        if opt["type"] == "adamw":
            if profile_prefix:   # onnxruntime names a trace <prefix>_<time to the second>.json: the optimizer's
                import time      # session, created in the module's second, would write over the module's trace

                time.sleep(1.02 - time.time() % 1.0)
            with flushed_denormals(self.flush):
                self.optimizer = api.Optimizer(str(self.art / self.manifest.files["optimizer"]), self.module)
        else:
            self.optimizer = SGDMomentum(self.state, trainable, opt["momentum"], opt["weight_decay"], self.threads)
        self.trainable = trainable
        self._mode = None
        self._input_names: list[str] | None = None
        self.last_outputs: dict[str, np.ndarray] = {}

    # -- steps ---------------------------------------------------------------------------------------------
    def _set_mode(self, mode: str) -> None:
        if mode != self._mode:
            self.module.train() if mode == "train" else self.module.eval()
            self._mode = mode

    def _feed(self, x: np.ndarray, y: np.ndarray, bits: np.ndarray, target: float, beta: float) -> list:
        """Positional Module inputs: (x, bits, labels), plus the DFQ cp target and cost weight where present."""
        if self._input_names is None:
            self._input_names = self.module.input_names()
        by_name = {self.manifest.input_name: x, self.manifest.precision_input: np.ascontiguousarray(bits, np.float32),
                   self.manifest.label_name: y, TARGET_INPUT: np.array(target, np.float32),
                   BETA_INPUT: np.array(beta, np.float32)}
        return [by_name[n] for n in self._input_names]

    def forward_backward(self, x: np.ndarray, y: np.ndarray, bits: np.ndarray, target: float = 0.0, beta: float = 0.0):
        """Loss, logits (and any extra outputs); gradients are left in the parameters' .grad buffers.
        The outputs of the last call are also kept by name in `last_outputs` (DFQ: cp, bits, choice counts)."""
        self._set_mode("train")
        with flushed_denormals(self.flush):
            outs = self.module(*self._feed(x, y, bits, target, beta))
        self.last_outputs = dict(zip(self.module.output_names(), outs))
        return outs

    def step(self, x: np.ndarray, y: np.ndarray, bits: np.ndarray, lr: float, target: float = 0.0, beta: float = 0.0):
        outs = self.forward_backward(x, y, bits, target, beta)
        self.optimizer.set_learning_rate(lr)
        with flushed_denormals(self.flush):
            self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(outs[0]), outs[1]

    def evaluate(self, x: np.ndarray, y: np.ndarray, bits: np.ndarray):
        """Test loss and logits (DFQ: the loss without the cost term, beta 0)."""
        self._set_mode("eval")
        with flushed_denormals(self.flush):
            outs = self.module(*self._feed(x, y, bits, 0.0, 0.0))
        self.last_outputs = dict(zip(self.module.output_names(), outs))
        return float(outs[0]), outs[1]

    # -- state ---------------------------------------------------------------------------------------------
    def parameter(self, name: str) -> np.ndarray:
        return np.array(self.state.parameters[name].data, copy=True)

    def gradient(self, name: str) -> np.ndarray:
        return np.array(self.state.parameters[name].grad, copy=True)

    def parameter_names(self) -> list[str]:
        return [name for name, _ in self.state.parameters]

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        from onnxruntime.training import api

        api.CheckpointState.save_checkpoint(self.state, str(path), include_optimizer_state=True)

    def export_inference(self, path: str | os.PathLike) -> None:
        """The eval graph with trained weights as initializers: runs in a plain InferenceSession."""
        out_name = self.module.output_names()[1] if len(self.module.output_names()) > 1 else self.module.output_names()[0]
        self._set_mode("eval")
        self.module.export_model_for_inferencing(str(path), [out_name])
        head = (self.manifest.extra or {}).get("head") or {}
        if head.get("cut"):   # the loss took the logits; the deployed model gives what the original gave
            from .lowering.heads import restore_head

            model = onnx.load(str(path))
            restore_head(model, head)
            onnx.save(model, str(path))
