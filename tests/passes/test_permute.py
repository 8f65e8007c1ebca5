"""fracgraph's Permute (kernels/permute.c) against numpy's transpose and onnxruntime's Transpose, bitwise (a
permutation only moves values), on both tile paths and on 1 and 2 threads; and the permute pass: a tiny attention
block's step (timm-style head split/merge and nn.MultiheadAttention's sequence-first layout) bitwise the same with
the pass on and off, at 0 and at 8 bits (passes/permute.py)."""

from __future__ import annotations

import ctypes
import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from conftest import custom_op_session  # noqa: E402
from fracgraph import kernels  # noqa: E402
from fracgraph.passes.base import run_passes  # noqa: E402
from fracgraph.passes.permute import PermutePass, decode, perm_code  # noqa: E402
from test_speed_passes import _step, build_pair  # noqa: E402

I64 = ctypes.POINTER(ctypes.c_int64)


def permute(x: np.ndarray, perm, path: int) -> np.ndarray | None:
    """fg_permute on arrays: path 1 the AVX tiles (None where this build has none), 0 the scalar tiles."""
    lib = kernels._library()
    y = np.full(tuple(x.shape[p] for p in perm), np.nan, np.float32)
    dims, pp = (ctypes.c_int64 * len(perm))(*x.shape), (ctypes.c_int64 * len(perm))(*perm)
    r = lib.fg_permute(x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p), dims, pp, len(perm), path)
    if r == 1:
        return None
    assert r == 0
    return y


def form(shape, perm) -> tuple[int, bool]:
    """(reduced rank, whether it runs as 2-D tiles) of a permutation of a shape."""
    code = kernels._library().fg_permute_form((ctypes.c_int64 * len(perm))(*shape),
                                              (ctypes.c_int64 * len(perm))(*perm), len(perm))
    return code // 2, bool(code % 2)


# the ViTs' permutations (vit_tiny: timm's qkv split [B, N, 3, H, D] -> [3, B, H, N, D], K's transpose, the heads'
# merge and the gradients; vit_tv: nn.MultiheadAttention's [N, B, C] <-> [B, N, C] and its head reshapes), at
# batch 32, and edge cases: size-1 axes (which drop out), a zero-size axis, tiles cut by 8, one long axis, a copy
VIT = [((32, 17, 3, 3, 64), (2, 0, 3, 1, 4)), ((3, 32, 3, 17, 64), (1, 3, 0, 2, 4)), ((32, 3, 17, 64), (0, 1, 3, 2)),
       ((32, 3, 64, 17), (0, 1, 3, 2)), ((32, 3, 17, 64), (0, 2, 1, 3)), ((32, 192, 16), (0, 2, 1)),
       ((65, 32, 128), (1, 0, 2)), ((1, 65, 32, 3, 128), (3, 1, 2, 0, 4)), ((65, 128, 32), (1, 2, 0)),
       ((32, 4, 65, 32), (0, 1, 3, 2))]
EDGE = [((1, 1), (1, 0)), ((0, 3, 4), (2, 1, 0)), ((4, 1, 6, 1, 7), (4, 3, 2, 1, 0)), ((13, 11, 9), (2, 0, 1)),
        ((5,), (0,)), ((3, 40000), (1, 0)), ((40000, 3), (1, 0)), ((2, 1, 70000), (1, 0, 2)), ((9, 17), (1, 0))]


def test_kernel_is_numpy_transpose_on_every_permutation():
    rng = np.random.default_rng(0)
    cases = list(VIT) + EDGE
    for r in range(2, 6):   # every permutation of ranks 2-5, on random sizes 1-11
        cases += [(tuple(int(v) for v in rng.integers(1, 12, r)), p) for p in itertools.permutations(range(r))]
    for shape, perm in cases:
        x = rng.standard_normal(shape).astype(np.float32)
        ref = np.ascontiguousarray(x.transpose(perm))
        for path in (0, 1):
            y = permute(x, perm, path)
            if y is not None:
                assert y.tobytes() == ref.tobytes(), (shape, perm, path)


def test_reduction_picks_the_path():
    assert form((32, 17, 3, 64), (0, 2, 1, 3)) == (4, False)     # head split: rows of 64 floats
    assert form((65, 32, 128), (1, 0, 2)) == (3, False)
    assert form((1, 65, 32, 3, 128), (3, 1, 2, 0, 4)) == (3, False)   # size-1 axis out, [65, 32] merged
    assert form((32, 3, 17, 64), (0, 1, 3, 2)) == (3, True)      # K's transpose: [B*H, 17, 64], 2-D tiles
    assert form((4, 1, 6), (1, 0, 2)) == (1, False)              # only a size-1 axis moves: a copy
    assert form((2, 3, 4), (0, 1, 2)) == (1, False)


@pytest.mark.parametrize("shape,perm", VIT[:6] + [((3, 40000), (1, 0)), ((2, 1, 70000), (1, 0, 2))], ids=str)
def test_op_is_onnxruntime_transpose(shape, perm):
    """The op in a session, on 1 and 2 threads (these shapes are large enough to run as several tasks), bitwise
    onnxruntime's Transpose."""
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    g = helper.make_graph([helper.make_node("Transpose", ["x"], ["y"], perm=list(perm))], "t",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    (ref,) = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for threads in (1, 2):
        sess = custom_op_session("Permute", ["x"], ["y"], threads, perm_code=perm_code(perm), rank=len(perm))
        (y,) = sess.run(None, {"x": x})
        assert y.shape == ref.shape and y.tobytes() == ref.tobytes()


def test_op_refuses_a_bad_code_or_rank():
    with pytest.raises(Exception, match="not a permutation"):
        custom_op_session("Permute", ["x"], ["y"], 1, perm_code=perm_code([0, 0, 1]), rank=3)
    sess = custom_op_session("Permute", ["x"], ["y"], 1, perm_code=perm_code([1, 0]), rank=2)
    with pytest.raises(Exception, match="rank is not the permutation's"):
        sess.run(None, {"x": np.zeros((2, 3, 4), np.float32)})


def test_code_round_trip():
    for perm in ([0], [1, 0], [3, 1, 2, 0, 4], list(range(15))[::-1]):
        assert decode(perm_code(perm), len(perm)) == perm


def test_pass_declines_what_it_should():
    """int64 data, a scalar and a Transpose read only by a MatMul (onnxruntime may fold it) are kept; the default
    (reversing) perm and a Transpose read by a MatMul and another op are taken."""
    nodes = [helper.make_node("Transpose", ["i"], ["it"], name="ti", perm=[1, 0]),
             helper.make_node("Transpose", ["a"], ["at"], name="ta", perm=[1, 0]),
             helper.make_node("MatMul", ["at", "w"], ["mm"], name="mm"),
             helper.make_node("Transpose", ["a"], ["ar"], name="tr"),
             helper.make_node("Transpose", ["a"], ["am"], name="tm", perm=[1, 0]),   # also read by a Relu: runs anyway
             helper.make_node("MatMul", ["am", "w"], ["mm2"], name="mm2"), helper.make_node("Relu", ["am"], ["rl"]),
             helper.make_node("Transpose", ["s"], ["st"], name="ts")]   # a scalar (default perm: [])
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3]),
                                       helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
                                       helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 4]),
                                       helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                          [helper.make_tensor_value_info(n, t, None) for n, t in
                           (("it", TensorProto.INT64), ("mm", TensorProto.FLOAT), ("ar", TensorProto.FLOAT),
                            ("mm2", TensorProto.FLOAT), ("rl", TensorProto.FLOAT), ("st", TensorProto.FLOAT))])
    model, notes = run_passes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), [PermutePass()])
    ops = {n.name: (n.op_type, {a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in model.graph.node}
    assert ops["ti"][0] == ops["ta"][0] == ops["ts"][0] == "Transpose"
    assert ops["tr::permute"] == ("Permute", {"perm_code": perm_code([1, 0]), "rank": 2})
    assert ops["tm::permute"][0] == "Permute"
    assert "[permute] 2 Transpose on fracgraph's Permute" in notes
    assert any("1 Transpose kept on onnxruntime's kernel: read only by GEMMs" in n for n in notes)
    assert any("1 Transpose kept on onnxruntime's kernel: input not a float tensor" in n for n in notes)


class Attention(torch.nn.Module):
    """Tokens from a [N, 3, 4, 4] image, a timm-style attention (qkv reshape/permute, K transposed, heads merged)
    and an nn.MultiheadAttention on the sequence-first layout (vit_tv's), then a token mean and a head."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Linear(3, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mha = torch.nn.MultiheadAttention(dim, heads)
        self.head = torch.nn.Linear(dim, 4)

    def forward(self, x):
        t = self.embed(x.flatten(2).transpose(1, 2))                      # [N, 16, dim]
        n, s, c = t.shape
        qkv = self.qkv(t).reshape(n, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1)
        t = t + self.proj((a @ v).transpose(1, 2).reshape(n, s, c))
        u = t.transpose(0, 1)                                             # [16, N, dim]
        t = t + self.mha(u, u, u, need_weights=False)[0].transpose(0, 1)
        return self.head(t.mean(1))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return build_pair(Attention(), tmp_path_factory.mktemp("permute"), (2, 3, 4, 4),
                      off={"skip_passes": ("permute",)}, on={})


def test_pass_structure(builds):
    def count(key, op):
        return sum(n.op_type == op for n in onnx.load(str(builds[key][0] / "training_model.onnx")).graph.node)

    transposes = count(False, "Transpose")
    assert transposes >= 10 and count(False, "Permute") == 0
    assert count(True, "Permute") >= 8 and count(True, "Permute") + count(True, "Transpose") == transposes
    assert f"[permute] {count(True, 'Permute')} Transpose on fracgraph's Permute" in builds[True][1].extra["notes"]


@pytest.mark.parametrize("bits", [(0, 0, 0), (8, 8, 8)])
def test_pass_keeps_the_step_bitwise(builds, bits):
    loss0, grads0, noise0 = _step(builds[False][0], bits, shape=(5, 3, 4, 4), classes=4)
    loss1, grads1, noise1 = _step(builds[True][0], bits, shape=(5, 3, 4, 4), classes=4)
    assert loss0 == loss1 and grads0.keys() == grads1.keys() and len(grads0) >= 12
    assert all(np.array_equal(grads0[k], grads1[k]) for k in grads0)
    assert noise0.keys() == noise1.keys() and all(np.array_equal(noise0[k], noise1[k]) for k in noise0)
