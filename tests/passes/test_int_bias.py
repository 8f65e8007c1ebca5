"""IntMatMul's optional bias (fracgraph/kernels/int_gemm.c): bitwise IntMatMul's output plus b in float32 (the Add it
replaces), on every integer path this CPU has, 1 and 2 threads, a reduction past one int32 chunk; refused when b is
not one value per column; and the int-bias pass on a small linear net: every bias Add after a quantized MatMul taken
into the int/float switch, the step's loss and every gradient bitwise the same with the pass on and off at 0 bits
(float branch), 8/8/8 and 4/4/6 (integer branch), at batch sizes other than the export's (passes/int_bias.py)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from conftest import assert_steps_bitwise, custom_op_session, f32_bits  # noqa: E402
from fracgraph import kernels  # noqa: E402
from test_int_gemm import PATHS, available  # noqa: E402
from test_int_matmul import operands  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402

INS = ["a", "am", "as", "b", "bm", "bs"]




def run(feeds, threads, bias=None):
    names = INS + (["bias"] if bias is not None else [])
    sess = custom_op_session("IntMatMul", names, ["y"], threads=threads)
    return sess.run(None, dict(feeds, **({"bias": bias} if bias is not None else {})))[0]


@pytest.mark.parametrize("a_shape,w_shape", [((2, 17, 100), (100, 70)), ((37, 64), (64, 48)), ((1, 2), (2, 1)),
                                             ((3, 200), (70000, 3))], ids=str)
def test_bias_is_the_add_bit_for_bit(a_shape, w_shape):
    if w_shape[0] == 70000:   # a reduction past MM_CHUNK (65536): the int64 epilogue
        a_shape = (3, 70000)
    aq, am, as_, wq, wm, ws = operands(a_shape, w_shape, 8, 8, per_column=True, seed=a_shape[-1])
    feeds = dict(zip(INS, (aq, am, as_, wq, wm, ws)))
    b = (np.random.default_rng(1).standard_normal(w_shape[1]) * 3).astype(np.float32)
    for path in [p for p in PATHS if available(p)]:
        os.environ["FRACGRAPH_INT_ISA"] = path
        try:
            for threads in (1, 2):
                y = run(feeds, threads)
                assert np.array_equal(f32_bits(run(feeds, threads, b)), f32_bits(y + b)), path   # numpy: one float add
        finally:
            del os.environ["FRACGRAPH_INT_ISA"]


def test_bias_of_another_size_is_refused():
    aq, am, as_, wq, wm, ws = operands((4, 8), (8, 3), 8, 8, per_column=True, seed=0)
    with pytest.raises(Exception, match="one value per output column"):
        run(dict(zip(INS, (aq, am, as_, wq, wm, ws))), 1, np.zeros(4, np.float32))


class Mlp(torch.nn.Module):
    """Tokens through two biased Linears with a GELU (a ViT's MLP) and a head: three bias Adds after MatMuls."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = torch.nn.Linear(9, 20), torch.nn.Linear(20, 9), torch.nn.Linear(9, 4)

    def forward(self, x):   # x [N, 3, 3, 3]: 3 tokens of 9
        t = x.flatten(2)
        t = t + self.fc2(torch.nn.functional.gelu(self.fc1(t)))
        return self.head(t.mean(1))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(Mlp(), tmp_path_factory.mktemp("intb"), (2, 3, 3, 3), off={"skip_passes": ("int-bias",)}, on={})


def _ops(art):
    g = onnx.load(str(art / "training_model.onnx")).graph
    return g, [(n.domain, n.op_type) for n in g.node]


def test_pass_structure(builds):
    (g0, off), (g1, on) = _ops(builds[False][0]), _ops(builds[True][0])
    ints = [n for n in g1.node if n.op_type == "If" and any(x.op_type == "IntMatMul" for a in n.attribute for x in a.g.node)]
    taken = [n for n in ints if any(len(x.input) == 7 for a in n.attribute for x in a.g.node if x.op_type == "IntMatMul")]
    assert len(ints) == len(taken) == 2   # fc1, fc2 (the 3-D MatMuls; the head is a Gemm)
    assert on.count(("", "Add")) == off.count(("", "Add")) - 2
    assert "[int-bias] 2 bias Adds taken into their integer/float GEMM switch" in builds[True][1].extra["notes"]


@pytest.mark.parametrize("step_bits", [(0, 0, 0), (8, 8, 8), (4, 4, 6)])
@pytest.mark.parametrize("batch", [5, 3])
def test_pass_keeps_loss_and_every_gradient(builds, step_bits, batch):
    assert_steps_bitwise(_step(builds[False][0], step_bits, shape=(batch, 3, 3, 3), classes=4),
                         _step(builds[True][0], step_bits, shape=(batch, 3, 3, 3), classes=4), 6)
