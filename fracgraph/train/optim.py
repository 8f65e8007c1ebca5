"""SGD with momentum and weight decay, exactly torch.optim.SGD's update, on one flat float32 parameter vector.

ORT's built-in SGD optimizer graph (SGDOptimizerV2) has neither momentum nor weight decay, while the FracTrain
recipe (spec §5.6) is SGD momentum 0.9, weight decay 1e-4. The loop can apply this update to ORT's contiguous
parameter/gradient buffers: one vectorized pass over all parameters per step. The momentum buffer is optimizer state
a resumed run needs, so it saves to and loads from an .npz.
"""

from __future__ import annotations

import io
import os

import numpy as np

from ..errors import FracgraphError


class SGDMomentum:
    """p <- p - lr * buf, buf <- momentum * buf + (g + wd * p) (buf = g + wd * p on the first step), as in torch
    (dampening 0, not Nesterov). `decay_mask` (bool per element) limits weight decay; default: all, as the
    reference code passes model.parameters() whole."""

    def __init__(self, num_params: int, momentum: float = 0.9, weight_decay: float = 1e-4,
                 decay_mask: np.ndarray | None = None):
        if not 0 <= momentum < 1:
            raise FracgraphError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise FracgraphError(f"weight decay must be >= 0, got {weight_decay}")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.buf = np.zeros(int(num_params), np.float32)
        self.started = False
        self.decay = None if decay_mask is None else np.asarray(decay_mask, np.float32) * np.float32(weight_decay)

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float) -> np.ndarray:
        """Update `params` in place (float32, flat) and return it."""
        if params.shape != self.buf.shape or grads.shape != self.buf.shape:
            raise FracgraphError(f"optimizer holds {self.buf.size} parameters but got params {params.shape} and "
                                 f"gradients {grads.shape}; the checkpoint belongs to another model")
        d = grads.astype(np.float32, copy=True)
        if self.decay is not None:
            d += self.decay * params
        elif self.weight_decay:
            d += np.float32(self.weight_decay) * params
        if self.momentum:
            if self.started:
                self.buf *= np.float32(self.momentum)
                self.buf += d
            else:
                self.buf[...] = d
            d = self.buf
        self.started = True
        params -= np.float32(lr) * d
        return params

    def state_dict(self) -> dict:
        """Scalars only (JSON); the buffer goes through `save_buffer`."""
        return {"kind": "SGDMomentum", "momentum": self.momentum, "weight_decay": self.weight_decay,
                "num_params": int(self.buf.size), "started": self.started}

    def load_state_dict(self, s: dict) -> None:
        for k in ("momentum", "weight_decay", "num_params"):
            if s.get(k) != self.state_dict()[k]:
                raise FracgraphError(f"cannot resume the optimizer: checkpoint has {k}={s.get(k)!r} but this run "
                                     f"has {self.state_dict()[k]!r}")
        self.started = bool(s["started"])

    def buffer_bytes(self) -> bytes:
        bio = io.BytesIO()
        np.save(bio, self.buf, allow_pickle=False)
        return bio.getvalue()

    def load_buffer(self, path: str | os.PathLike) -> None:
        buf = np.load(path, allow_pickle=False)
        if buf.shape != self.buf.shape or buf.dtype != np.float32:
            raise FracgraphError(f"momentum buffer {path} is {buf.dtype}{list(buf.shape)}, expected float32"
                                 f"[{self.buf.size}]; the checkpoint belongs to another model")
        self.buf[...] = buf
