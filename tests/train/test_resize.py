"""Images of any size for a fixed-size model: torchvision's RandomResizedCrop + flip (training) and resize + centre
crop (test), against a numpy implementation of the same resampling and torchvision's own transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from fracgraph.errors import FracgraphError
from fracgraph.train import data as D
from fracgraph.train import resize as R


# ------------------------------------------------------------------ independent reference (numpy)


def _coeffs(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of a bilinear (triangle) resample with support scaled by the reduction factor when
    shrinking (antialias), sampled at pixel centres, normalized per output pixel: the resampling PIL defines."""
    scale = in_size / out_size
    fs = max(scale, 1.0)
    support = 1.0 * fs
    m = np.zeros((out_size, in_size))
    for o in range(out_size):
        centre = (o + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        x = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((x - centre + 0.5) / fs))
        m[o, lo:hi] = w / w.sum()
    return m


def _round8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(a + 0.5), 0, 255)


def ref_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """HxWxC uint8 -> out_h x out_w x C: horizontal pass, rounded to uint8, then vertical (PIL's order)."""
    h, w, _ = img.shape
    x = img.astype(np.float64)
    if w != out_w:
        x = _round8(np.einsum("ow,hwc->hoc", _coeffs(w, out_w), x))
    if h != out_h:
        x = _round8(np.einsum("oh,hwc->owc", _coeffs(h, out_h), x))
    return x


def ref_rrc(img, top, left, h, w, out_hw, flip):
    out = ref_resize(img[top:top + h, left:left + w], *out_hw)
    return out[:, ::-1] if flip else out


def ref_center(img, out_hw):
    ih, iw = img.shape[:2]
    short = int(max(out_hw) / 0.875)
    nh, nw = (int(short * ih / iw), short) if iw <= ih else (short, int(short * iw / ih))
    r = ref_resize(img, nh, nw)
    top, left = int(round((nh - out_hw[0]) / 2)), int(round((nw - out_hw[1]) / 2))
    return r[top:top + out_hw[0], left:left + out_hw[1]]


def _close(a, b):
    """PIL resamples uint8 images in fixed point (this Pillow's coefficients are coarse enough that a quarter of
    the pixels of a non-dyadic reduction land one level off the float reference) and rounds to uint8 between the
    two passes: at most one level per pass (two in all), unbiased. A wrong crop, size or flip is tens of levels."""
    assert a.shape == b.shape
    d = a.astype(np.int16) - b.astype(np.int16)
    assert np.abs(d).max() <= 2 and np.abs(d).mean() < 0.5 and abs(d.mean()) < 0.1


def _img(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


# ------------------------------------------------------------------ the transforms


def test_resized_crop_and_center_crop_match_numpy_reference():
    rng = np.random.default_rng(1)
    for (h, w), out in [((37, 53), (16, 16)), ((20, 9), (24, 24)), ((64, 64), (32, 32)), ((11, 30), (12, 20))]:
        for c in (1, 3):
            img = _img(rng, h, w, c)
            for _ in range(4):
                top, left, ch, cw = R.rrc_params(rng, h, w)
                flip = bool(rng.random() < 0.5)
                _close(R.resized_crop(img, top, left, ch, cw, out, flip), ref_rrc(img, top, left, ch, cw, out, flip))
            _close(R.resize_center_crop(img, out), ref_center(img, out))


def test_rrc_params_follow_the_scale_and_ratio_ranges():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        h, w = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        top, left, ch, cw = R.rrc_params(rng, h, w)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        areas.append(ch * cw / (h * w))
        ratios.append(cw / ch)
    areas, ratios = np.array(areas), np.array(ratios)
    # rounding of w and h moves area and ratio a little off their draws; the fallback is a centre crop
    assert areas.min() > 0.05 and areas.max() <= 1.0
    assert ratios.min() > 0.6 and ratios.max() < 1.6
    # on a square image: area ~ U(0.08, 1) less the large crops whose ratio does not fit (mean 0.54 without them)
    sq = np.array([R.rrc_params(rng, 224, 224) for _ in range(1000)])
    mean_area = np.mean(sq[:, 2] * sq[:, 3]) / 224**2
    assert 0.40 < mean_area < 0.54
    assert 0.4 < np.mean(sq[:, 3] < sq[:, 2]) < 0.6
    # 10 failed tries on an extreme aspect ratio: the central crop at the nearest allowed ratio
    top, left, ch, cw = R.rrc_params(np.random.default_rng(0), 2, 200)
    assert (ch, cw) == (2, round(2 * 4 / 3)) and left == (200 - cw) // 2 and top == 0
    top, left, ch, cw = R.rrc_params(np.random.default_rng(0), 200, 2)
    assert (ch, cw) == (round(2 / 0.75), 2) and top == (200 - ch) // 2


def test_transforms_equal_torchvision_on_pil_images():
    from fracgraph import zoo_external

    try:
        zoo_external.import_torchvision()
        import torchvision.transforms.functional as F
    except zoo_external.SourceMissing as exc:
        pytest.skip(str(exc))
    from PIL import Image

    rng = np.random.default_rng(2)
    for h, w in [(37, 53), (80, 41), (32, 32)]:
        img = _img(rng, h, w)
        pil = Image.fromarray(img)
        for _ in range(3):
            top, left, ch, cw = R.rrc_params(rng, h, w)
            ref = np.asarray(F.hflip(F.resized_crop(pil, top, left, ch, cw, [24, 24])))
            np.testing.assert_array_equal(R.resized_crop(img, top, left, ch, cw, (24, 24), flip=True), ref)
        ref = np.asarray(F.center_crop(F.resize(pil, int(24 / 0.875)), [24, 24]))
        np.testing.assert_array_equal(R.resize_center_crop(img, (24, 24)), ref)


# ------------------------------------------------------------------ datasets and the stream


def _mixed_tree(root, sizes_train, sizes_test, classes=("a", "b")):
    from PIL import Image

    rng = np.random.default_rng(0)
    truth = {}
    for split, sizes in (("train", sizes_train), ("test", sizes_test)):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                a = _img(rng, h, w)
                Image.fromarray(a).save(root / split / c / f"{i:03d}.png")
                truth[(split, c, i)] = a
    return truth


def test_imagefolder_of_any_size_feeds_a_fixed_size_model(tmp_path):
    truth = _mixed_tree(tmp_path / "t", [(20, 30), (41, 17), (16, 16)], [(33, 25), (12, 40)])
    ds = D.load_imagefolder(tmp_path / "t", cache_dir=tmp_path / "cache")
    assert isinstance(ds.x_train, D.RaggedImages) and ds.image_shape == (3, None, None)
    # classes sorted, images sorted by path: train = a/000 a/001 a/002 b/000 ...
    np.testing.assert_array_equal(ds.x_train.image(4), truth[("train", "b", 1)])
    cached = D.load_imagefolder(tmp_path / "t", cache_dir=tmp_path / "cache")   # the ragged cache reads back
    np.testing.assert_array_equal(cached.x_train.pixels, ds.x_train.pixels)
    np.testing.assert_array_equal(cached.x_test.sizes, ds.x_test.sizes)
    assert cached.mean == pytest.approx(ds.mean)
    allpix = np.concatenate([truth[("train", c, i)].reshape(-1, 3) for c in "ab" for i in range(3)]) / 255
    assert ds.mean == pytest.approx(tuple(allpix.mean(0)), abs=1e-9)
    assert ds.std == pytest.approx(tuple(allpix.std(0)), abs=1e-9)

    fit = D.fit_to_input(ds, (3, 16, 16))
    assert fit.input_hw == (16, 16) and fit.image_shape == (3, 16, 16) and fit.x_test.shape == (4, 3, 16, 16)
    _close(fit.x_test[3].transpose(1, 2, 0), ref_center(truth[("test", "b", 1)], (16, 16)))

    stream = D.BatchStream(fit, batch_size=4, seed=7, threaded=False)
    x, y = stream.make_batch(0, 1)
    # the same draws, in the same order, through the numpy reference
    perm = np.random.default_rng([7, 0, 0]).permutation(6)[4:8]
    r = np.random.default_rng([7, 0, 2])
    names = [("train", c, i) for c in "ab" for i in range(3)]
    for k, i in enumerate(perm):
        img = truth[names[i]]
        top, left, ch, cw = R.rrc_params(r, *img.shape[:2])
        flip = bool(r.random() < 0.5)
        want = (ref_rrc(img, top, left, ch, cw, (16, 16), flip) / 255 - np.array(fit.mean)) / np.array(fit.std)
        np.testing.assert_allclose(x[k].transpose(1, 2, 0), want, atol=2.01 / 255 / min(fit.std))
    assert x.shape == (2, 3, 16, 16) and list(y) == [names[i][1] == "b" for i in perm]

    # deterministic under the seed, threaded == synchronous, and resumable mid-epoch
    a = D.BatchStream(fit, batch_size=2, seed=3)
    first = [next(a) for _ in range(5)]
    state = a.state_dict()
    rest = [next(a) for _ in range(3)]
    a.close()
    assert state["input_hw"] == [16, 16]
    b = D.BatchStream(fit, batch_size=2, seed=3)
    b.load_state_dict(state)
    again = [next(b) for _ in range(3)]
    b.close()
    for (x1, y1), (x2, y2) in zip(rest, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    sync = D.BatchStream(fit, batch_size=2, seed=3, threaded=False)
    np.testing.assert_array_equal(sync.make_batch(1, 1)[0], first[4][0])
    other = D.BatchStream(fit, batch_size=2, seed=4, threaded=False)
    assert not np.array_equal(other.make_batch(1, 1)[0], first[4][0])


def test_model_sized_data_keeps_the_pad_crop_path(tmp_path):
    """32x32 images for a 32x32 model: unchanged (no resize, pad-4 crop + flip); for a 48x48 model: resized."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 2, 10)
    ds = D.Dataset("t", x, y, x[:4], y[:4], 2, (0.5,) * 3, (0.25,) * 3, augment_default=True)
    assert D.fit_to_input(ds, (3, 32, 32)) is ds
    s = D.BatchStream(ds, 4, seed=0, threaded=False)
    xb, _ = s.make_batch(0, 0)
    r = np.random.default_rng([0, 0, 1])
    idx = np.random.default_rng([0, 0, 0]).permutation(10)[:4]
    dy, dx, flip = r.integers(0, 9, 4), r.integers(0, 9, 4), r.random(4) < 0.5
    np.testing.assert_array_equal(xb, ds.normalize(D.random_crop_flip(x[idx], dy, dx, flip)))
    assert "input_hw" not in s.state_dict()
    big = D.fit_to_input(ds, (3, 48, 48))
    assert big.x_test.shape == (4, 3, 48, 48)
    _close(big.x_test[1].transpose(1, 2, 0), ref_center(x[1].transpose(1, 2, 0), (48, 48)))
    assert D.BatchStream(big, 4, seed=0, threaded=False).make_batch(0, 0)[0].shape == (4, 3, 48, 48)


def test_fit_errors_are_one_line():
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 8, 8)).astype(np.float32)
    ds = D.Dataset("f", x, np.zeros(4, np.int64), x, np.zeros(4, np.int64), 2, (0.5,), (0.2,))
    with pytest.raises(FracgraphError, match="expects 3-channel inputs"):
        D.fit_to_input(ds, (3, 8, 8))
    with pytest.raises(FracgraphError, match="float values, which fracgraph does not resize"):
        D.fit_to_input(ds, (1, 16, 16))
    assert D.fit_to_input(ds, (1, "h", "w")) is ds


def test_train_cli_on_mixed_sizes_and_classes_mismatch(tmp_path):
    """`fracgraph train` of a 3x12x12 model on an imagefolder of other sizes; a class-count mismatch is one line."""
    torch = pytest.importorskip("torch")
    from conftest import export

    from fracgraph.cli import app

    class Net(torch.nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    export(Net(2), tmp_path / "m2.onnx", shape=(2, 3, 12, 12))
    export(Net(3), tmp_path / "m3.onnx", shape=(2, 3, 12, 12))
    _mixed_tree(tmp_path / "imgs", [(20, 30), (9, 14), (12, 12)], [(15, 25)])
    runner = CliRunner()
    r = runner.invoke(app, ["train", str(tmp_path / "m2.onnx"), "-o", str(tmp_path / "run"), "--data",
                            f"imagefolder:{tmp_path / 'imgs'}", "--iters", "2", "--epoch-iters", "2", "--batch", "4",
                            "--schedule", "static"], env={"FRACGRAPH_CACHE": str(tmp_path / "cache")})
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "summary.json").exists()
    r = runner.invoke(app, ["train", str(tmp_path / "m3.onnx"), "-o", str(tmp_path / "run3"), "--data",
                            f"imagefolder:{tmp_path / 'imgs'}", "--iters", "2"],
                      env={"FRACGRAPH_CACHE": str(tmp_path / "cache")})
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "outputs 3 classes but imagefolder:imgs has 2" in r.output and len(r.output.strip().splitlines()) == 1
