"""`fracgraph sample RUN/`: text from a trained character language model, with plain onnxruntime inference.

The run's exported model (`last.onnx` or `best.onnx`: the eval graph, activation quantizers on their running
ranges) is fed the precisions the run ended with (the last row of its trace) and a window of the model's fixed
context: the prompt and the text generated so far, its last T characters at positions 0..n-1 (the causal mask keeps
the zero-filled positions after them from reaching position n-1, whose logits give the next character). Greedy with
`--temperature 0`, else sampling from softmax(logits / temperature), seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import FracgraphError
from .train.text import read_vocab


def sample(run_dir: str, tokens: int = 300, prompt: str = "\n", temperature: float = 0.8, seed: int = 0,
           which: str = "last", threads: int | None = None) -> str:
    import onnxruntime as ort

    from .runtime import resolve_threads
    from .trace import Trace

    if tokens < 1:
        raise FracgraphError(f"--tokens must be at least 1, got {tokens}")
    if not temperature >= 0:
        raise FracgraphError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if which not in ("best", "last"):
        raise FracgraphError("--which must be best or last")
    run = Path(run_dir)
    chars = read_vocab(run)
    model = run / f"{which}.onnx"
    if not model.is_file():
        raise FracgraphError(f"{model} does not exist: is {run_dir} a finished `fracgraph train` run?")
    if not prompt:
        raise FracgraphError("--prompt must hold at least one character")
    index = {c: i for i, c in enumerate(chars)}
    unknown = sorted({c for c in prompt if c not in index})
    if unknown:
        raise FracgraphError(f"--prompt has characters the model's vocabulary lacks: {''.join(unknown)!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = resolve_threads(threads)
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise FracgraphError(f"{model}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})")
    ids_in = next((i for i in sess.get_inputs() if i.type in ("tensor(int64)", "tensor(int32)")), None)
    if ids_in is None or len(ids_in.shape) != 2 or not isinstance(ids_in.shape[1], int):
        raise FracgraphError(f"{model} has no token-id input [batch, T]; `sample` needs a language model")
    T = ids_in.shape[1]
    dtype = np.int64 if ids_in.type == "tensor(int64)" else np.int32
    feeds = {}
    bits_in = [i for i in sess.get_inputs() if i.name != ids_in.name]
    if bits_in:
        trace = Trace.read(run)
        feeds[bits_in[0].name] = trace.bits[-1].astype(np.float32)
    rng = np.random.default_rng(seed)
    ids = [index[c] for c in prompt]
    out = []
    x = np.zeros((1, T), dtype)
    for _ in range(tokens):
        window = ids[-T:]
        x[:] = 0
        x[0, :len(window)] = window
        logits = sess.run(None, {ids_in.name: x, **feeds})[0][0, len(window) - 1, :len(chars)].astype(np.float64)
        if temperature == 0:
            nxt = int(np.argmax(logits))
        else:
            z = logits / temperature
            p = np.exp(z - z.max())
            nxt = int(rng.choice(len(chars), p=p / p.sum()))
        ids.append(nxt)
        out.append(chars[nxt])
    return "".join(out)
