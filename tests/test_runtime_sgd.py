"""The fused optimizer step (fracgraph/kernels/sgd.c, runtime.SGDMomentum with threads > 0): bitwise the numpy form
over several steps (the first step's buffer copy, momentum, weight decay on and off, learning-rate changes, a resume
from saved momentum buffers), on parameters whose sizes cross the threads' chunk boundaries; and both against
PyTorch's SGD."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fracgraph.runtime import SGDMomentum

SIZES = [1, 7, 40_000, 3, 65_537, 16, 130_001]   # > 65,536 elements in all: the multithreaded split


def _state(seed):
    r = np.random.default_rng(seed)
    return SimpleNamespace(parameters={f"p{i}": SimpleNamespace(data=r.standard_normal(n).astype(np.float32), grad=None)
                                       for i, n in enumerate(SIZES)})


def _run(threads, wd, steps=5, resume_at=2):
    state = _state(0)
    names = list(state.parameters)
    opt = SGDMomentum(state, names, 0.9, wd, threads)
    r = np.random.default_rng(1)
    for i, lr in enumerate([0.1, 0.1, 0.05, 0.01, 0.001][:steps]):
        for p in state.parameters.values():
            p.grad = (r.standard_normal(p.data.size) * 0.1).astype(np.float32)
        opt.set_learning_rate(lr)
        opt.step()
        if i == resume_at:
            arrays = {k: v.copy() for k, v in opt.state_arrays().items()}
            opt = SGDMomentum(state, names, 0.9, wd, threads)
            opt.load_state_arrays(arrays)
    return {k: p.data for k, p in state.parameters.items()}, opt


@pytest.mark.parametrize("wd", [0.0, 1e-4, 5e-4])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_step_is_bitwise_the_numpy_step(wd, threads):
    ref, _ = _run(0, wd)
    got, opt = _run(threads, wd)
    assert opt.threads == threads, "the kernels library did not load: the fused step was not tested"
    for k in ref:
        assert np.array_equal(got[k].view(np.uint32), ref[k].view(np.uint32)), k


def test_fused_step_matches_pytorch():
    torch = pytest.importorskip("torch")
    state = _state(3)
    names = list(state.parameters)
    tps = [torch.nn.Parameter(torch.tensor(p.data.copy())) for p in state.parameters.values()]
    topt = torch.optim.SGD(tps, lr=0.1, momentum=0.9, weight_decay=1e-4)
    mine = SGDMomentum(state, names, 0.9, 1e-4, 2)
    r = np.random.default_rng(4)
    for lr in (0.1, 0.05, 0.01):
        for tp, p in zip(tps, state.parameters.values()):
            p.grad = r.standard_normal(p.data.size).astype(np.float32)
            tp.grad = torch.tensor(p.grad)
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        mine.set_learning_rate(lr)
        mine.step()
    for tp, p in zip(tps, state.parameters.values()):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-6, atol=1e-7)
