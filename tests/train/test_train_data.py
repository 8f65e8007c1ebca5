"""Datasets: restricted CIFAR unpickling, binary batches, archive hardening, imagefolder + cache, npz, digits."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from fracgraph.errors import FracgraphError
from fracgraph.train import data as D

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"


# ------------------------------------------------------------------ CIFAR pickle


def _cifar_batch(n, seed, label_key=b"labels", ncls=10):
    r = np.random.default_rng(seed)
    x = r.integers(0, 256, (n, 3072), dtype=np.uint8)
    y = r.integers(0, ncls, n).tolist()
    return {b"batch_label": b"synthetic", label_key: y, b"data": x,
            b"filenames": [f"{i}.png".encode() for i in range(n)]}, x, y


def _write_cifar10_py(root: Path, n=20) -> tuple[np.ndarray, np.ndarray]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch, x, y = _cifar_batch(n, i)
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def test_cifar10_pickle_dir_and_targz(tmp_path):
    x, y = _write_cifar10_py(tmp_path)
    ds = D.load_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}")
    assert ds.x_train.shape == (100, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train.reshape(100, -1), x[:100])
    np.testing.assert_array_equal(ds.y_test, y[100:])
    assert ds.num_classes == 10 and ds.class_names[0] == "airplane" and ds.augment_default
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds2 = D.load_dataset(f"cifar10:{tgz}")
    np.testing.assert_array_equal(ds2.x_train, ds.x_train)
    np.testing.assert_array_equal(ds2.y_train, ds.y_train)


def test_cifar100_pickle_python3_protocols(tmp_path):
    # Python-3 pickles use other numpy globals (protocol 2: _codecs.encode; 5: _frombuffer): both must load
    for proto in (2, 4, 5):
        d = tmp_path / f"p{proto}" / "cifar-100-python"
        d.mkdir(parents=True)
        tr, xtr, ytr = _cifar_batch(30, 1, b"fine_labels", 100)
        te, _, _ = _cifar_batch(10, 2, b"fine_labels", 100)
        tr = {k.decode(): v for k, v in tr.items()}  # str keys, as a Python-3 writer would have them
        (d / "train").write_bytes(pickle.dumps(tr, protocol=proto))
        (d / "test").write_bytes(pickle.dumps(te, protocol=proto))
        (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, 2))
        ds = D.load_dataset(f"cifar100:{d}")
        assert ds.num_classes == 100 and ds.class_names[3] == "c3"
        np.testing.assert_array_equal(ds.y_train, ytr)
        np.testing.assert_array_equal(ds.x_train.reshape(30, -1), xtr)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "nested"])
def test_malicious_cifar_pickle_refused_and_not_run(tmp_path, where):
    marker = tmp_path / "PWNED"
    _write_cifar10_py(tmp_path)
    payload = _Evil(marker) if where == "top" else {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(marker)]}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(FracgraphError, match=r"data_batch_3.*(posix|os)\.system.*refused"):
        D.load_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}")
    assert not marker.exists()


def test_builtins_eval_refused(tmp_path):
    blob = b"cbuiltins\neval\n(S'1+1'\ntR."
    with pytest.raises(FracgraphError, match="builtins.eval"):
        D.safe_unpickle(blob, "x")
    with pytest.raises(FracgraphError, match="not a readable CIFAR pickle"):
        D.safe_unpickle(b"garbage", "x")


def test_cifar_wrong_content(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(pickle.dumps({b"data": [1, 2], b"labels": [0]}, protocol=2))
    with pytest.raises(FracgraphError, match="does not look like a CIFAR batch"):
        D.load_dataset(f"cifar10:{d}")
    with pytest.raises(FracgraphError, match="does not hold the cifar100 batches"):
        D.load_dataset(f"cifar100:{d}")


# ------------------------------------------------------------------ CIFAR binary


def test_cifar10_and_100_binary(tmp_path):
    r = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    recs = {}
    for name in [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]:
        rec = r.integers(0, 256, (7, 3073), dtype=np.uint8)
        rec[:, 0] %= 10
        recs[name] = rec
        (d / name).write_bytes(rec.tobytes())
    ds = D.load_dataset(f"cifar10:{d}")
    np.testing.assert_array_equal(ds.y_test, recs["test_batch.bin"][:, 0])
    np.testing.assert_array_equal(ds.x_train[7:14].reshape(7, -1), recs["data_batch_2.bin"][:, 1:])
    d100 = tmp_path / "cifar-100-binary"
    d100.mkdir()
    rec = r.integers(0, 256, (5, 3074), dtype=np.uint8)
    rec[:, :2] %= 20
    (d100 / "train.bin").write_bytes(rec.tobytes())
    (d100 / "test.bin").write_bytes(rec[:2].tobytes())
    ds = D.load_dataset(f"cifar100:{d100}")
    np.testing.assert_array_equal(ds.y_train, rec[:, 1])  # fine label is the second byte
    (d100 / "test.bin").write_bytes(rec[:2].tobytes()[:-1])
    with pytest.raises(FracgraphError, match="not a multiple of the 3074-byte"):
        D.load_dataset(f"cifar100:{d100}")


# ------------------------------------------------------------------ archives


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    bio = io.BytesIO()
    Image.fromarray(arr).save(bio, format="PNG")
    return bio.getvalue()


def _add(tf: tarfile.TarFile, name: str, payload: bytes = b"x", **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(ti, k, v)
    ti.size = len(payload) if ti.type == tarfile.REGTYPE else 0
    tf.addfile(ti, io.BytesIO(payload) if ti.type == tarfile.REGTYPE else None)


@pytest.mark.parametrize("bad", [
    dict(name="../evil.png"),
    dict(name="train/cat/../../../evil.png"),
    dict(name="/etc/evil.png"),
    dict(name="train/cat/link.png", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
    dict(name="train/cat/link.png", type=tarfile.SYMTYPE, linkname="../../../outside.png"),
    dict(name="train/cat/hard.png", type=tarfile.LNKTYPE, linkname="../x.png"),
    dict(name="train/cat/dev", type=tarfile.CHRTYPE),
])
@pytest.mark.parametrize("kind", ["imagefolder", "cifar10"])
def test_escaping_members_refused(tmp_path, bad, kind):
    arc = tmp_path / "bad.tar.gz"
    img = _png(np.zeros((4, 4, 3), np.uint8))
    with tarfile.open(arc, "w:gz") as tf:
        _add(tf, "train/cat/0.png", img)
        _add(tf, "test/cat/0.png", img)
        bad = dict(bad)
        _add(tf, bad.pop("name"), img, **bad)
    with pytest.raises(FracgraphError, match="refused: member"):
        D.load_dataset(f"{kind}:{arc}", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "cache").exists()


def test_inside_symlink_allowed(tmp_path):
    arc = tmp_path / "ok.tar"
    a = np.full((4, 4, 3), 7, np.uint8)
    with tarfile.open(arc, "w") as tf:
        _add(tf, "train/cat/0.png", _png(a))
        _add(tf, "train/cat/1.png", type=tarfile.SYMTYPE, linkname="0.png")
        _add(tf, "test/cat/0.png", _png(a))
    ds = D.load_dataset(f"imagefolder:{arc}", cache_dir=tmp_path / "c")
    assert len(ds.x_train) == 2 and (ds.x_train == 7).all()


# ------------------------------------------------------------------ imagefolder


def _tree(root: Path, classes=("b_dog", "a_cat"), n=(3, 2), size=(6, 5), fmt="png", mode="RGB"):
    from PIL import Image

    r = np.random.default_rng(0)
    truth = {}
    for split, k in zip(("train", "test"), n):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(k):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                a = r.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i:03d}.{fmt}")
                truth[(split, c, i)] = a
    (root / "train" / "a_cat" / ".DS_Store").write_bytes(b"junk")
    return truth


def test_imagefolder_dir_png_exact_and_tar_gz(tmp_path):
    truth = _tree(tmp_path / "tree")
    ds = D.load_imagefolder(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert ds.class_names == ("a_cat", "b_dog") and ds.num_classes == 2
    assert ds.x_train.shape == (6, 3, 5, 6) and ds.x_test.shape == (4, 3, 5, 6)
    np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.x_train[4].transpose(1, 2, 0), truth[("train", "b_dog", 1)])  # PNG: lossless
    arc = tmp_path / "tree.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(tmp_path / "tree", arcname="top")  # one top-level folder is accepted
    ds2 = D.load_dataset(f"imagefolder:{arc}", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(ds2.x_train, ds.x_train)
    np.testing.assert_array_equal(ds2.y_test, ds.y_test)


def test_imagefolder_jpeg_gray_and_cache(tmp_path, monkeypatch):
    _tree(tmp_path / "g", fmt="jpg", mode="L", size=(8, 8))
    cache = tmp_path / "cache"
    ds = D.load_imagefolder(tmp_path / "g", cache_dir=cache)
    assert ds.x_train.shape == (6, 1, 8, 8) and len(list(cache.glob("imagefolder-*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(D, "_decode_imagefolder", boom)
    ds2 = D.load_imagefolder(tmp_path / "g", cache_dir=cache)
    np.testing.assert_array_equal(ds2.x_train, ds.x_train)
    assert ds2.class_names == ds.class_names and ds2.mean == pytest.approx(ds.mean)
    monkeypatch.undo()
    # a changed source invalidates the key; a damaged cache is rebuilt, not trusted
    (tmp_path / "g" / "train" / "a_cat" / "000.jpg").touch()
    os.utime(tmp_path / "g" / "train" / "a_cat" / "000.jpg", ns=(1, 1))
    D.load_imagefolder(tmp_path / "g", cache_dir=cache)
    assert len(list(cache.glob("imagefolder-*.npz"))) == 2
    for f in cache.glob("imagefolder-*.npz"):
        f.write_bytes(b"corrupt")
    ds3 = D.load_imagefolder(tmp_path / "g", cache_dir=cache)
    np.testing.assert_array_equal(ds3.x_test, ds.x_test)


def test_imagefolder_errors(tmp_path):
    _tree(tmp_path / "t")
    from PIL import Image

    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "t" / "train" / "a_cat" / "zz.png")
    # images of several sizes load (tests/train/test_resize.py); the model's input size comes later
    assert isinstance(D.load_imagefolder(tmp_path / "t", use_cache=False).x_train, D.RaggedImages)
    (tmp_path / "t" / "train" / "a_cat" / "zz.png").write_bytes(b"not an image")
    with pytest.raises(FracgraphError, match="cannot decode"):
        D.load_imagefolder(tmp_path / "t", use_cache=False)
    (tmp_path / "empty" / "train" / "x").mkdir(parents=True)
    with pytest.raises(FracgraphError, match="needs train/<class>/<image> and test"):
        D.load_imagefolder(tmp_path / "empty", use_cache=False)


def test_too_large_fails_early_naming_size(tmp_path):
    _tree(tmp_path / "t")
    with pytest.raises(FracgraphError, match=r"needs 900 B in memory but only 100 B"):
        D.load_dataset(f"imagefolder:{tmp_path / 't'}", memory_limit=100, cache_dir=tmp_path / "c")
    # an npz whose header claims 4 x 8 TB is refused from the header, before any data is read
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 2)})
    import zipfile

    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as zf:
        for k in ("x_train", "y_train", "x_test", "y_test"):
            zf.writestr(f"{k}.npy", hdr.getvalue())  # header only: no data follows
    with pytest.raises(FracgraphError, match=r"huge.npz needs 29\.1 TiB in memory"):
        D.load_dataset(f"npz:{tmp_path / 'huge.npz'}")
    with pytest.raises(FracgraphError, match=r"cifar10 .*needs 17\d\.\d MiB in memory"):
        D.load_dataset(f"cifar10:{tmp_path}", memory_limit=1 << 20)


# ------------------------------------------------------------------ npz, digits, spec errors


def test_npz_layouts(tmp_path):
    r = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x_train=r.random((10, 8, 8, 3), dtype=np.float32),
             y_train=np.arange(10) % 4, x_test=r.random((4, 8, 8, 3), dtype=np.float32), y_test=np.arange(4))
    ds = D.load_dataset(f"npz:{tmp_path / 'a.npz'}")
    assert ds.x_train.shape == (10, 3, 8, 8) and ds.num_classes == 4 and ds.x_train.dtype == np.float32
    np.savez(tmp_path / "b.npz", x_train=np.zeros((3, 5, 5), np.uint8), y_train=[0, 1, 2],
             x_test=np.zeros((1, 5, 5), np.uint8), y_test=[7], num_classes=3)
    with pytest.raises(FracgraphError, match=r"y_test labels must lie in \[0, 3\)"):
        D.load_dataset(f"npz:{tmp_path / 'b.npz'}")
    np.savez(tmp_path / "c.npz", x_train=np.zeros((3, 5, 5)), y_train=[0, 1, 2])
    with pytest.raises(FracgraphError, match="lacks x_test, y_test"):
        D.load_dataset(f"npz:{tmp_path / 'c.npz'}")
    np.savez(tmp_path / "d.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=[0], x_test=[0], y_test=[0])
    with pytest.raises(FracgraphError, match="object arrays are refused"):
        D.load_dataset(f"npz:{tmp_path / 'd.npz'}")


def test_digits_default_and_spec_errors(tmp_path):
    ds = D.load_dataset(None)
    assert ds.name == "digits" and ds.image_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797 and not ds.augment_default
    again = D.load_dataset(None)
    np.testing.assert_array_equal(again.y_test, ds.y_test)  # deterministic split
    assert set(np.unique(ds.y_test)) == set(range(10))
    D.check_num_classes(ds, 10)
    with pytest.raises(FracgraphError, match="model outputs 100 classes but digits has 10"):
        D.check_num_classes(ds, 100)
    with pytest.raises(FracgraphError, match=r"expects inputs of shape \[3, 32, 32\]"):
        D.check_input_shape(ds, ("N", 3, 32, 32))
    for bad, msg in [("cifar10", "not KIND:PATH"), ("foo:/", "kind 'foo' is unknown"),
                     (f"npz:{tmp_path}/nope.npz", "does not exist")]:
        with pytest.raises(FracgraphError, match=msg):
            D.load_dataset(bad)


# ------------------------------------------------------------------ the real CIFAR-10 JPEG archive


@pytest.mark.skipif(not REAL.exists(), reason=f"shared dataset {REAL} is absent on this machine")
def test_real_cifar10_jpeg(request, tmp_path):
    # pytest's cache dir persists across sessions, so the ~10 s decode happens once per checkout
    cache = (request.config.cache.mkdir("fracgraph-data") if getattr(request.config, "cache", None)
             else tmp_path)
    ds = D.load_dataset(f"imagefolder:{REAL}", cache_dir=cache)
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert ds.class_names == D.CIFAR10_CLASSES and ds.mean == D.CIFAR_MEAN
    assert np.bincount(ds.y_train).tolist() == [5000] * 10 and np.bincount(ds.y_test).tolist() == [1000] * 10
    t = time.perf_counter()
    ds2 = D.load_dataset(f"imagefolder:{REAL}", cache_dir=cache)
    assert "cache" in ds2.source and time.perf_counter() - t < 5
    assert np.array_equal(ds2.y_train, ds.y_train)


def test_imagefolder_dir_follows_symlinked_class_folder(tmp_path):
    _tree(tmp_path / "real")
    (tmp_path / "view" / "train").mkdir(parents=True)
    for c in ("a_cat", "b_dog"):
        (tmp_path / "view" / "train" / c).symlink_to(tmp_path / "real" / "train" / c)
    (tmp_path / "view" / "test").symlink_to(tmp_path / "real" / "test")
    ds = D.load_imagefolder(tmp_path / "view", use_cache=False)
    ref = D.load_imagefolder(tmp_path / "real", use_cache=False)
    np.testing.assert_array_equal(ds.x_train, ref.x_train)
    np.testing.assert_array_equal(ds.y_test, ref.y_test)
