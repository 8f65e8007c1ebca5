"""Untrusted data files, beyond tests/train/test_train_data.py: code-executing pickles in archives and through
other globals, symlinks out of a CIFAR directory, more escaping archive names, oversized files refused unread."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fracgraph.errors import FracgraphError
from fracgraph.train import data as D

BATCHES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]


def _batch(n=4, seed=0) -> bytes:
    r = np.random.default_rng(seed)
    return pickle.dumps({b"data": r.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [0] * n}, protocol=2)


def _payload(module: str, name: str, arg: str) -> bytes:
    """A protocol-0 pickle that calls module.name(arg) when loaded (the classic code-execution gadget)."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


@pytest.mark.parametrize("module,name,code", [
    ("os", "system", "touch {m}"),
    ("posix", "system", "touch {m}"),
    ("subprocess", "getoutput", "touch {m}"),
    ("builtins", "exec", "open({m!r}, 'w').close()"),
    ("builtins", "eval", "open({m!r}, 'w').close()"),
    ("numpy", "load", "{m}"),                          # a numpy global outside the array-building ones
])
def test_code_executing_pickle_in_targz_is_refused_and_runs_nothing(tmp_path, module, name, code):
    marker = tmp_path / "PWNED"
    evil = _payload(module, name, code.format(m=str(marker)))
    assert b"PWNED" in evil
    arc = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        for i, n in enumerate(BATCHES):
            data = evil if n == "data_batch_2" else _batch(seed=i)
            ti = tarfile.TarInfo(f"cifar-10-batches-py/{n}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    with pytest.raises(FracgraphError) as err:
        D.load_dataset(f"cifar10:{arc}")
    msg = str(err.value)
    assert "\n" not in msg and f"{module}.{name}" in msg and "refused unexecuted" in msg and "data_batch_2" in msg
    assert not marker.exists()


def test_symlinked_batch_pointing_outside_a_cifar_directory_is_not_followed(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for i, n in enumerate(BATCHES):
        (outside / n).write_bytes(_batch(seed=i))       # a valid batch: following the link would succeed
        if n == "data_batch_4":
            (d / n).symlink_to(outside / n)
        else:
            (d / n).write_bytes(_batch(seed=i))
    with pytest.raises(FracgraphError, match="does not hold the cifar10 batches"):
        D.load_dataset(f"cifar10:{d}")


def _member(tf, name, payload=b"x", **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(ti, k, v)
    ti.size = len(payload) if ti.type == tarfile.REGTYPE else 0
    tf.addfile(ti, io.BytesIO(payload) if ti.type == tarfile.REGTYPE else None)


@pytest.mark.parametrize("bad", [
    dict(name="..\\evil.png"),
    dict(name="C:\\evil.png"),
    dict(name="./../evil.png"),
    dict(name="train/./../../evil.png"),
    dict(name="train/cat/l.png", type=tarfile.SYMTYPE, linkname="sub/../../../../x.png"),
    dict(name="train/cat/h.png", type=tarfile.LNKTYPE, linkname="/etc/passwd"),
    dict(name="train/cat/fifo", type=tarfile.FIFOTYPE),
])
def test_more_escaping_archive_members_are_refused(tmp_path, bad):
    arc = tmp_path / "bad.tar"
    with tarfile.open(arc, "w") as tf:
        _member(tf, "train/cat/0.png")
        _member(tf, "test/cat/0.png")
        bad = dict(bad)
        _member(tf, bad.pop("name"), **bad)
    with pytest.raises(FracgraphError, match="refused: member"):
        D.load_dataset(f"imagefolder:{arc}", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_oversized_batch_file_is_refused_by_its_size_before_reading(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i, n in enumerate(BATCHES):
        (d / n).write_bytes(_batch(seed=i))
    with open(d / "data_batch_3", "r+b") as f:
        f.truncate(1 << 40)                     # sparse: 1 TiB declared, nothing stored
    with pytest.raises(FracgraphError, match=r"data files in .* needs 1\.0 TiB in memory but only"):
        D.load_dataset(f"cifar10:{d}")
    # an archive: the members' header sizes are summed before any member is read
    arc = tmp_path / "big.tar"
    with tarfile.open(arc, "w") as tf:
        for i, n in enumerate(BATCHES):
            data = _batch(seed=i)
            ti = tarfile.TarInfo(f"cifar-10-batches-py/{n}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    with pytest.raises(FracgraphError, match=r"needs \d+(\.\d)? KiB in memory but only 1\.0 KiB"):
        D._collect_files(arc, set(BATCHES), memory_limit=1024)
    assert os.path.getsize(d / "data_batch_3") == 1 << 40
