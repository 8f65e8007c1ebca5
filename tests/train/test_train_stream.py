"""BatchStream: augmentation against a per-image reference, determinism, exact resume, prefetch equivalence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fracgraph.errors import FracgraphError
from fracgraph.train import data as D


def _toy(n=50, c=3, hw=32, seed=0) -> D.Dataset:
    r = np.random.default_rng(seed)
    return D.Dataset("toy", r.integers(0, 256, (n, c, hw, hw), dtype=np.uint8), r.integers(0, 10, n),
                     r.integers(0, 256, (7, c, hw, hw), dtype=np.uint8), r.integers(0, 10, 7), 10,
                     D.CIFAR_MEAN[:c], D.CIFAR_STD[:c], augment_default=True)


def _naive_crop_flip(img, dy, dx, flip, pad=4):
    c, h, w = img.shape
    p = np.zeros((c, h + 2 * pad, w + 2 * pad), img.dtype)
    p[:, pad:pad + h, pad:pad + w] = img
    out = p[:, dy:dy + h, dx:dx + w]
    return out[:, :, ::-1] if flip else out


def test_crop_flip_matches_per_image_reference():
    x = _toy(20).x_train
    r = np.random.default_rng(1)
    dy, dx, flip = r.integers(0, 9, 20), r.integers(0, 9, 20), r.random(20) < 0.5
    dy[:2], dx[:2], flip[:2] = [0, 8], [8, 0], [True, False]  # the extreme offsets
    got = D.random_crop_flip(x, dy, dx, flip)
    want = np.stack([_naive_crop_flip(x[i], dy[i], dx[i], flip[i]) for i in range(20)])
    np.testing.assert_array_equal(got, want)
    # offset (4, 4) without flip is the identity
    same = D.random_crop_flip(x, np.full(20, 4), np.full(20, 4), np.zeros(20, bool))
    np.testing.assert_array_equal(same, x)


def test_batches_normalized_and_epoch_is_a_permutation():
    ds = _toy(50)
    with D.BatchStream(ds, 16, seed=3, augment=False) as s:
        assert s.batches_per_epoch == 4
        xs, ys = zip(*[next(s) for _ in range(4)])
    assert [len(y) for y in ys] == [16, 16, 16, 2]
    x = np.concatenate(xs)
    assert x.dtype == np.float32 and ys[0].dtype == np.int64
    # unaugmented: every training image appears once, normalized as (x/255 - mean)/std
    raw = (x * np.array(D.CIFAR_STD, np.float32)[:, None, None] + np.array(D.CIFAR_MEAN, np.float32)[:, None, None])
    raw = np.rint(raw * 255).astype(np.uint8)
    order = [int(np.flatnonzero((ds.x_train == r).all(axis=(1, 2, 3)))[0]) for r in raw]
    assert sorted(order) == list(range(50))
    np.testing.assert_array_equal(np.concatenate(ys), ds.y_train[order])


def test_augmented_batch_equals_reference_from_its_draws():
    ds = _toy(40)
    s = D.BatchStream(ds, 8, seed=5, augment=True, threaded=False)
    x, y = s.make_batch(2, 3)
    idx = D._rng(5, 2, 0).permutation(40)[24:32]
    r = D._rng(5, 2, 4)
    dy, dx, flip = r.integers(0, 9, 8), r.integers(0, 9, 8), r.random(8) < 0.5
    ref = np.stack([_naive_crop_flip(ds.x_train[i], a, b, f) for i, a, b, f in zip(idx, dy, dx, flip)])
    np.testing.assert_allclose(x, ds.normalize(ref), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(y, ds.y_train[idx])
    assert flip.any() and not flip.all()


def _take(stream, k):
    return [next(stream) for _ in range(k)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_seeded_determinism_and_threaded_equals_sync(drop_last):
    ds = _toy(45)
    a = _take(D.BatchStream(ds, 10, seed=7, augment=True, drop_last=drop_last), 13)
    b = _take(D.BatchStream(ds, 10, seed=7, augment=True, drop_last=drop_last, threaded=False), 13)
    c = _take(D.BatchStream(ds, 10, seed=8, augment=True, drop_last=drop_last), 13)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not all(np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    # epochs reshuffle
    per = 4 if drop_last else 5
    assert not np.array_equal(a[0][1], a[per][1])


@pytest.mark.parametrize("cut", [0, 3, 4, 5, 11])
def test_resume_mid_epoch_gives_identical_sequence(cut):
    ds = _toy(45)
    ref = _take(D.BatchStream(ds, 10, seed=11, augment=True), 16)
    s = D.BatchStream(ds, 10, seed=11, augment=True, prefetch=3)
    _take(s, cut)
    state = json.loads(json.dumps(s.state_dict()))  # must survive JSON
    s.close()
    r = D.BatchStream(ds, 10, seed=11, augment=True)
    r.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(ref[cut:], _take(r, 16 - cut)):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # reloading a state into a running stream also rewinds it exactly
    r.load_state_dict(state)
    np.testing.assert_array_equal(next(r)[0], ref[cut][0])
    r.close()


def test_resume_refuses_mismatched_config_and_bad_args():
    ds = _toy(20)
    st = D.BatchStream(ds, 5, seed=1).state_dict()
    with pytest.raises(FracgraphError, match="checkpoint has seed=1 but this run has 2"):
        D.BatchStream(ds, 5, seed=2).load_state_dict(st)
    with pytest.raises(FracgraphError, match="batch size 64 exceeds"):
        D.BatchStream(ds, 64, seed=1, drop_last=True)
    with pytest.raises(FracgraphError, match="seed must be a non-negative integer"):
        D.BatchStream(ds, 4, seed=-1)


def test_worker_error_surfaces():
    ds = _toy(20)
    s = D.BatchStream(ds, 5, seed=1)
    s.ds = None  # make the worker fail
    with pytest.raises(AttributeError):
        next(s)


def test_eval_batches_fixed_order():
    ds = _toy(20)
    xs, ys = zip(*D.eval_batches(ds, 3))
    assert [len(y) for y in ys] == [3, 3, 1]
    np.testing.assert_allclose(np.concatenate(xs), ds.normalize(ds.x_test))
    np.testing.assert_array_equal(np.concatenate(ys), ds.y_test)


def test_digits_stream_no_augmentation_by_default():
    ds = D.load_digits()
    s = D.BatchStream(ds, 32, seed=0, threaded=False)
    assert not s.augment
    x, y = next(s)
    idx = D._rng(0, 0, 0).permutation(len(ds.x_train))[:32]
    np.testing.assert_allclose(x, ds.normalize(ds.x_train[idx]), atol=1e-6)
