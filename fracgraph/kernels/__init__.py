"""fracgraph's onnxruntime custom-op library (fused_ops.c; int_gemm.c, the integer GEMMs; gelu.c, the GELU
gradient; conv_grad_w.c, the channel-tiled conv weight gradient; permute.c, Transpose): built here, on first use,
with the C compiler.

The training step's elementwise chains (the quantizers' centre, scale, noise, clamp, round, rescale; the range
statistics; ReluGrad) are ops of domain `ai.fracgraph`, one multithreaded pass each (passes/fused_ops.py). The
library is compiled for this CPU (-march=native) into a cache directory keyed by the source, the flags, the
compiler and the CPU's flags, so a source change, another compiler or another CPU builds a new one; the build
writes a temporary file and renames it, so concurrent first uses never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import FracgraphError

DOMAIN = "ai.fracgraph"
SOURCE = Path(__file__).with_name("fused_ops.c")
SOURCES = [SOURCE, Path(__file__).with_name("int_gemm.c"),   # int_gemm.c: IntConv (passes/int_gemm.py)
           Path(__file__).with_name("gelu.c"),                # gelu.c: GeluGrad (passes/gelu_grad.py)
           Path(__file__).with_name("conv_grad_w.c"),         # conv_grad_w.c: ConvGradWNhwc (passes/conv_grad_w.py)
           Path(__file__).with_name("permute.c"),             # permute.c: Permute (passes/permute.py)
           Path(__file__).with_name("clip_grad.c"),           # clip_grad.c: ClipGrad (passes/clip_grad.py)
           Path(__file__).with_name("dw_convt.c"),            # dw_convt.c: DepthwiseConvT (passes/nchwc_conv.py)
           Path(__file__).with_name("sgd.c"),                 # sgd.c: fg_sgd_step (runtime.SGDMomentum, via ctypes)
           Path(__file__).with_name("hard_act.c"),            # hard_act.c: HardAct(Grad) (passes/hard_act.py)
           Path(__file__).with_name("bias_grad.c"),           # bias_grad.c: ColSum, MinMaxColSum (passes/bias_grad.py)
           Path(__file__).with_name("ln_channels.c"),         # ln_channels.c: LayerNormChannels(Grad) (passes/ln_channels.py)
           Path(__file__).with_name("channel_mul.c"),         # channel_mul.c: ChannelMulGrad (passes/channel_mul.py)
           Path(__file__).with_name("layer_norm.c")]          # layer_norm.c: LayerNorm (passes/ln_forward.py)
HEADERS = [Path(__file__).with_name("ort_abi.h")]   # included by the sources: part of the cache key
# -ffp-contract=off: no fused multiply-add, so every step of the chain rounds like onnxruntime's separate ops
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-pthread"]
_loaded: ctypes.CDLL | None = None


def cache_dir() -> Path:
    root = os.environ.get("FRACGRAPH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fracgraph")
    return Path(root)


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


_built: dict[tuple[str, str], Path] = {}   # (compiler, cache dir) -> library, so a process asks the compiler once


def library_path() -> Path:
    """The compiled library for this machine, building it if needed; one-line FracgraphError if it cannot be."""
    cc = _compiler()
    if cc is None:
        raise FracgraphError("fracgraph's fused kernels need a C compiler (cc, or set $CC); install one "
                             "(e.g. apt-get install gcc) or re-run `fracgraph quantize` with --no-fused-kernels")
    slot = (cc, str(cache_dir()))
    if slot not in _built:
        _built[slot] = _build(cc)
    return _built[slot]


def cache_key(cc: str) -> str:
    """What the compiled library depends on: every source and header's text, the flags, the compiler, the CPU."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    texts = [s.read_text() for s in (*SOURCES, *HEADERS)]
    return hashlib.sha256("\n".join([*texts, " ".join(FLAGS), *version, _cpu_flags()]).encode()).hexdigest()[:16]


def _build(cc: str) -> Path:
    out = cache_dir() / f"fused_ops-{cache_key(cc)}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fused_ops-", suffix=".so", dir=out.parent)
    except OSError as e:
        raise FracgraphError(f"cannot write fracgraph's kernel cache {out.parent} ({e.strerror}); set "
                             f"FRACGRAPH_CACHE_DIR to a writable directory") from None
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True)
        if r.returncode != 0:
            first = (r.stderr.strip().splitlines() or ["no message"])[0][:200]
            raise FracgraphError(f"building fracgraph's kernels failed ({first}); fix the compiler or re-run "
                                 f"`fracgraph quantize` with --no-fused-kernels")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _library() -> ctypes.CDLL:
    global _loaded
    if _loaded is None:
        lib = ctypes.CDLL(str(library_path()))
        lib.fg_set_seed.argtypes, lib.fg_set_seed.restype = [ctypes.c_uint64], None
        _loaded = lib
    return _loaded


def register(session_options) -> None:
    """Make the `ai.fracgraph` ops known to a session about to be created with these options."""
    session_options.register_custom_ops_library(str(library_path()))


def set_seed(seed: int) -> None:
    """The process seed of every SRQuantize node's generator (nodes created before or after share it)."""
    _library().fg_set_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)



# int_gemm.c's paths, best first (auto takes the first available): its ISA number, the CPU flag it needs
INT_PATHS = {"amx": (3, "amx_int8"), "vnni": (2, "avx512_vnni"), "avx2": (1, "avx2"), "scalar": (0, None)}


def int_path_available(path: str) -> bool:
    """Whether this machine's build of the library has IntConv's `path` (amx, vnni, avx2 or scalar); amx also needs
    the Linux kernel's permission for the tile state, asked once per process (refused: not available)."""
    return bool(_library().fg_int_isa_available(INT_PATHS[path][0]))


def int_path() -> str:
    """The integer path IntConv takes here: FRACGRAPH_INT_ISA when set (auto = the best compiled one)."""
    want = os.environ.get("FRACGRAPH_INT_ISA", "auto") or "auto"
    if want != "auto":
        if want not in INT_PATHS:
            raise FracgraphError(f"FRACGRAPH_INT_ISA={want} is not a path; use auto, amx, vnni, avx2 or scalar")
        return want
    return next(p for p in INT_PATHS if int_path_available(p))
