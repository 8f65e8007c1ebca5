"""Datasets for `fracgraph train --data`, and the seeded, resumable, prefetching batch stream that feeds the loop.

Specs: `cifar10:PATH`, `cifar100:PATH` (python-pickle or binary batches; a directory or the .tar.gz),
`imagefolder:PATH` (train/<class>/*, test/<class>/*; a directory or .tar/.tar.gz; decoded once, cached as .npz),
`npz:PATH` (x_train, y_train, x_test, y_test), and None: scikit-learn's bundled digits, so training runs offline.

Data files are untrusted: pickles go through an unpickler that can build numpy arrays and nothing else, archives
are read in place (never extracted) and refused whole if a member could escape an extraction directory, and the
size is checked against available memory before anything large is allocated.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import posixpath
import queue
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import FracgraphError
from ..memory import available_memory
from ..memory import fmt_bytes as _fmt_bytes

log = logging.getLogger("fracgraph.train")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # spec §5.6 (SkipNet/FracTrain normalization; used for CIFAR-100 too)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp")
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------------- Dataset


@dataclass
class RaggedImages:
    """uint8 images of different sizes in one buffer: image i is pixels[offsets[i]:offsets[i+1]] reshaped to
    sizes[i] = (H, W) x C (HWC, the decoder's layout)."""

    pixels: np.ndarray   # uint8 [total pixels, C]
    sizes: np.ndarray    # int64 [N, 2]: (H, W)
    offsets: np.ndarray  # int64 [N + 1]

    def __post_init__(self):
        n = len(self.sizes)
        ok = (self.pixels.ndim == 2 and self.pixels.dtype == np.uint8 and self.sizes.shape == (n, 2)
              and self.offsets.shape == (n + 1,) and n > 0 and self.offsets[0] == 0
              and self.offsets[-1] == len(self.pixels) and np.all(self.sizes > 0)
              and np.array_equal(np.diff(self.offsets), self.sizes[:, 0] * self.sizes[:, 1]))
        if not ok:
            raise FracgraphError(f"images of several sizes: pixels {self.pixels.dtype}{list(self.pixels.shape)}, "
                                 f"sizes {list(self.sizes.shape)} and offsets {list(self.offsets.shape)} do not agree")

    @classmethod
    def from_images(cls, images: list[np.ndarray]) -> "RaggedImages":
        c = images[0].shape[2] if images else 3
        sizes = np.array([im.shape[:2] for im in images], np.int64).reshape(-1, 2)
        offsets = np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1])]).astype(np.int64)
        pixels = np.empty((int(offsets[-1]), c), np.uint8)
        for i, im in enumerate(images):
            pixels[offsets[i]:offsets[i + 1]] = im.reshape(-1, c)
        return cls(pixels, sizes, offsets)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def dtype(self):
        return self.pixels.dtype

    def image(self, i: int) -> np.ndarray:
        h, w = (int(v) for v in self.sizes[i])
        return self.pixels[self.offsets[i]:self.offsets[i + 1]].reshape(h, w, self.channels)


def image_hwc(x, i: int) -> np.ndarray:
    """Image i of a split (NCHW array or RaggedImages) as HxWxC."""
    return x.image(i) if isinstance(x, RaggedImages) else x[i].transpose(1, 2, 0)


@dataclass
class Dataset:
    """Whole splits in memory as NCHW arrays (or, for images of different sizes, RaggedImages). uint8 pixels are
    scaled by 1/255 before (x - mean) / std; float32 pixels are used as they are, so `mean`/`std` are always in the
    [0, 1]-ish pixel scale the stream produces. `input_hw`: set by `fit_to_input` when the training images must be
    resized to the model's input (random resized crop + flip in the stream; the test split is then stored already
    resized and centre-cropped)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    augment_default: bool = False  # pad-crop + flip suits natural images, not digits
    source: str = ""
    input_hw: tuple[int, int] | None = None

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, RaggedImages) and x.ndim != 4:
                raise FracgraphError(f"{self.name}: x_{split} must be [N, C, H, W], got shape {x.shape}")
            if x.dtype not in (np.uint8, np.float32):
                raise FracgraphError(f"{self.name}: x_{split} must be uint8 or float32, got {x.dtype}")
            if y.shape != (len(x),):
                raise FracgraphError(
                    f"{self.name}: y_{split} has shape {y.shape} but x_{split} has {len(x)} samples")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise FracgraphError(
                    f"{self.name}: y_{split} labels must lie in [0, {self.num_classes}), found "
                    f"[{int(y.min())}, {int(y.max())}]")
        ragged = isinstance(self.x_train, RaggedImages) or isinstance(self.x_test, RaggedImages)
        if self.input_hw is None and not ragged and self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise FracgraphError(f"{self.name}: train images {self.x_train.shape[1:]} and test images "
                                 f"{self.x_test.shape[1:]} differ in shape")
        if len(self.x_train) == 0:
            raise FracgraphError(f"{self.name}: the training split is empty")
        c = _channels(self.x_train)
        if _channels(self.x_test) != c:
            raise FracgraphError(f"{self.name}: train images have {c} channels but test images "
                                 f"{_channels(self.x_test)}")
        if len(self.mean) != c or len(self.std) != c or min(self.std) <= 0:
            raise FracgraphError(f"{self.name}: mean/std need {c} values each and std > 0")

    @property
    def image_shape(self) -> tuple:
        """[C, H, W] of what the stream yields; H and W are None for images of different sizes not yet fitted."""
        if self.input_hw is not None:
            return (_channels(self.x_train), *self.input_hw)
        if isinstance(self.x_train, RaggedImages):
            return (self.x_train.channels, None, None)
        return tuple(int(v) for v in self.x_train.shape[1:])

    @property
    def pixel_scale(self) -> float:
        return 1.0 / 255.0 if self.x_train.dtype == np.uint8 else 1.0

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Raw pixels [B, C, H, W] -> float32 (x * scale - mean) / std, as one fused multiply-add per element."""
        a, b = self._affine()
        out = x.astype(np.float32)
        out *= a
        out += b
        return out

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return (np.float32(self.pixel_scale) / std).astype(np.float32), (-mean / std).astype(np.float32)

    def describe(self) -> str:
        c, h, w = self.image_shape
        shape = f"{c}x{h}x{w}" if h is not None else f"{c} channels, sizes vary"
        if self.input_hw is not None:
            shape += " (resized: random resized crop for training, resize + centre crop for test)"
        return f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test, {shape}, {self.num_classes} classes"


def _channels(x) -> int:
    return x.channels if isinstance(x, RaggedImages) else int(x.shape[1])


HOLDOUT_SEED = 0   # the held-out images depend on the data and their count only, never on --seed


def _take(x, idx: np.ndarray):
    if isinstance(x, RaggedImages):
        return RaggedImages.from_images([x.image(int(i)) for i in idx])
    return x[idx]


def hold_out(dataset: Dataset, n: int) -> Dataset:
    """The dataset with `n` training images moved into its evaluation split, which replaces the test split (never
    read then): the choice of settings on these images does not look at the test set. The images are a fixed
    random subset (seed HOLDOUT_SEED, not the run's --seed), so every run that holds out n images of the same data
    evaluates on the same ones and trains on the same rest; the normalization statistics stay those of the whole
    training split (pixels only, no labels)."""
    n_train = len(dataset.y_train)
    if not 0 < n < n_train:
        raise FracgraphError(f"--holdout {n}: hold out between 1 and {n_train - 1} of the {n_train} training images")
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(n_train)
    held, keep = np.sort(perm[:n]), np.sort(perm[n:])
    return replace(dataset, name=f"{dataset.name} (holdout {n})", x_train=_take(dataset.x_train, keep),
                   y_train=dataset.y_train[keep], x_test=_take(dataset.x_train, held), y_test=dataset.y_train[held])


def check_num_classes(dataset: Dataset, model_classes: int) -> None:
    """The model's logit count must equal the dataset's class count, or labels index past the logits."""
    if int(model_classes) != dataset.num_classes:
        raise FracgraphError(
            f"the model outputs {model_classes} classes but {dataset.name} has {dataset.num_classes}: export the "
            f"model with {dataset.num_classes} outputs, or pick the --data that matches it")


def check_input_shape(dataset: Dataset, model_input_shape: tuple) -> None:
    """Compare [C, H, W] (dynamic dims given as None/str are accepted)."""
    want = tuple(model_input_shape)[-3:]
    for got, exp in zip(dataset.image_shape, want):
        if isinstance(exp, int) and exp > 0 and exp != got:
            raise FracgraphError(
                f"the model expects inputs of shape {list(want)} but {dataset.name} images are "
                f"{list(dataset.image_shape)}: use matching data or re-export the model")


def fit_to_input(dataset: Dataset, model_input_shape: tuple) -> Dataset:
    """The dataset as the model of input [C, H, W] reads it. Images of the model's size (e.g. CIFAR for a 32x32
    model) are used as they are (pad-crop + flip augmentation, as before); uint8 images of another size, or of
    different sizes, are resized the torchvision way (`train/resize.py`): the test split once here (resize +
    centre crop), the training images per batch in the stream (random resized crop + flip)."""
    want = tuple(model_input_shape)[-3:]
    if len(want) != 3 or not all(isinstance(v, int) and v > 0 for v in want[1:]):
        check_input_shape(dataset, model_input_shape)
        return dataset
    c, h, w = want
    if isinstance(c, int) and c > 0 and c != _channels(dataset.x_train):
        raise FracgraphError(
            f"the model expects {c}-channel inputs of shape {list(want)} but {dataset.name} images have "
            f"{_channels(dataset.x_train)} channels: use matching data or re-export the model")
    if dataset.image_shape[1:] == (h, w):
        return dataset
    if dataset.x_train.dtype != np.uint8 or dataset.x_test.dtype != np.uint8:
        raise FracgraphError(
            f"the model expects inputs of shape {list(want)} but {dataset.name} images are "
            f"{list(dataset.image_shape)} float values, which fracgraph does not resize: use uint8 images "
            f"(imagefolder:, or npz with uint8 pixels) or data of the model's size")
    from .resize import resize_center_crop

    ch = _channels(dataset.x_test)
    test = np.empty((len(dataset.x_test), ch, h, w), np.uint8)
    for i in range(len(dataset.x_test)):
        test[i] = resize_center_crop(image_hwc(dataset.x_test, i), (h, w)).transpose(2, 0, 1)
    from dataclasses import replace

    return replace(dataset, x_test=test, input_hw=(h, w))


# --------------------------------------------------------------------------------------------------- memory


def check_fits_in_memory(nbytes: int, what: str, limit: int | None = None) -> None:
    """Fail before allocating: the dataset lives in memory whole, with ~25% headroom for batches and the model."""
    limit = available_memory() if limit is None else int(limit)
    env = os.environ.get("FRACGRAPH_DATA_MEMORY_LIMIT")
    if env:
        limit = min(limit, int(env))
    if nbytes * 1.25 > limit:
        raise FracgraphError(
            f"{what} needs {_fmt_bytes(nbytes)} in memory but only {_fmt_bytes(limit)} is available: use a smaller "
            f"dataset (or a subset saved as npz:PATH), or run on a machine with more memory")


# --------------------------------------------------------------------------------------------------- spec parsing


def load_dataset(spec: str | None, cache_dir: str | os.PathLike | None = None,
                 memory_limit: int | None = None) -> Dataset:
    """Parse a --data spec and load it. `memory_limit` (bytes) overrides the detected available memory."""
    if spec is None or spec == "" or spec == "digits":
        return load_digits()
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise FracgraphError(f"--data {spec!r} is not KIND:PATH; use cifar10:PATH, cifar100:PATH, "
                             f"imagefolder:PATH or npz:PATH (or omit --data for the bundled digits)")
    p = Path(path).expanduser()
    if not p.exists():
        raise FracgraphError(f"--data {spec}: {p} does not exist")
    kind = kind.lower()
    if kind in ("cifar10", "cifar100"):
        return load_cifar(p, variant=kind, memory_limit=memory_limit)
    if kind == "imagefolder":
        return load_imagefolder(p, cache_dir=cache_dir, memory_limit=memory_limit)
    if kind == "npz":
        return load_npz(p, memory_limit=memory_limit)
    if kind == "text":   # character-level text for language models (train/text.py)
        from .text import load_text

        return load_text(p)
    raise FracgraphError(f"--data kind {kind!r} is unknown; use cifar10, cifar100, imagefolder, npz or text")


# --------------------------------------------------------------------------------------------------- digits


def load_digits() -> Dataset:
    """scikit-learn's digits ship inside the package, so `fracgraph train` works with no download.

    A fixed stratified 80/20 split (seeded permutation per class), pixels 0..16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        test_idx.append(idx[: len(idx) // 5])
    test_mask = np.zeros(len(y), bool)
    test_mask[np.concatenate(test_idx)] = True
    xtr, ytr = x[~test_mask], y[~test_mask]
    mean, std = _channel_stats(xtr, 1.0)
    return Dataset("digits", np.ascontiguousarray(xtr), ytr, np.ascontiguousarray(x[test_mask]), y[test_mask], 10,
                   mean, std, tuple(str(i) for i in range(10)), augment_default=False, source="sklearn digits")


def _channel_stats(x: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std, computed in chunks in float64 so a large uint8 set is not copied to float whole."""
    c = x.shape[1]
    s = np.zeros(c)
    s2 = np.zeros(c)
    n = 0
    for i in range(0, len(x), 4096):
        chunk = x[i:i + 4096].astype(np.float64) * scale
        s += chunk.sum(axis=(0, 2, 3))
        s2 += (chunk * chunk).sum(axis=(0, 2, 3))
        n += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    std = np.where(std > 1e-8, std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _pixel_stats(pixels: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """_channel_stats of [pixels, C] rows (images of different sizes), in chunks."""
    s = np.zeros(pixels.shape[1])
    s2 = np.zeros(pixels.shape[1])
    for i in range(0, len(pixels), 1 << 20):
        chunk = pixels[i:i + (1 << 20)].astype(np.float64) * scale
        s += chunk.sum(axis=0)
        s2 += (chunk * chunk).sum(axis=0)
    mean = s / max(len(pixels), 1)
    std = np.sqrt(np.maximum(s2 / max(len(pixels), 1) - mean * mean, 0.0))
    std = np.where(std > 1e-8, std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# --------------------------------------------------------------------------------------------------- CIFAR

_NUMPY_GLOBALS: dict[tuple[str, str], Any] = {}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The exact globals a pickled ndarray needs, resolved from the running numpy (1.x or 2.x names)."""
    if not _NUMPY_GLOBALS:
        reconstruct = np.empty(0).__reduce__()[0]
        frombuffer = np.empty(1).__reduce_ex__(5)[0]
        import _codecs

        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            _NUMPY_GLOBALS[(mod, "_reconstruct")] = reconstruct
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            _NUMPY_GLOBALS[(mod, "_frombuffer")] = frombuffer
        _NUMPY_GLOBALS[("numpy", "ndarray")] = np.ndarray
        _NUMPY_GLOBALS[("numpy", "dtype")] = np.dtype
        # protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str, "latin1"): a pure string op
        _NUMPY_GLOBALS[("_codecs", "encode")] = _codecs.encode
    return _NUMPY_GLOBALS


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; any other global (os.system, eval, ...) is refused
    before it is called, so a data file can never execute code."""

    def __init__(self, f, source: str):
        super().__init__(f, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str):
        obj = _numpy_globals().get((module, name))
        if obj is None:
            raise FracgraphError(
                f"{self.source} is not a plain CIFAR batch: it references {module}.{name}, which a data file has no "
                f"reason to call, so it was refused unexecuted (possibly malicious). Download the dataset again "
                f"from https://www.cs.toronto.edu/~kriz/cifar.html")
        return obj

    def persistent_load(self, pid):
        raise FracgraphError(f"{self.source} is not a plain CIFAR batch (it uses persistent ids); refused")


def safe_unpickle(data: bytes, source: str) -> Any:
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(data), source).load()
    except FracgraphError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise FracgraphError(f"{source} is not a readable CIFAR pickle ({type(exc).__name__}: {exc}); "
                             f"download it again") from None


def _key(d: dict, name: str):
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    raise KeyError(name)


def _decode_pickle_batch(data: bytes, source: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(data, source)
    try:
        if not isinstance(d, dict):
            raise TypeError(f"top level is {type(d).__name__}, not dict")
        x = np.asarray(_key(d, "data"))
        y = np.asarray(_key(d, label_key), dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise TypeError(f"data is {x.dtype}{list(x.shape)} with {len(y)} labels")
    except (KeyError, TypeError, ValueError) as exc:
        raise FracgraphError(f"{source} does not look like a CIFAR batch ({exc}); download it again") from None
    return x.reshape(-1, 3, 32, 32), y


def _decode_binary_batch(data: bytes, source: str, variant: str) -> tuple[np.ndarray, np.ndarray]:
    lab = 1 if variant == "cifar10" else 2  # cifar-100 records: coarse label, fine label, then pixels
    rec = lab + 3072
    if len(data) == 0 or len(data) % rec:
        raise FracgraphError(f"{source} has {len(data)} bytes, not a multiple of the {rec}-byte {variant} record; "
                             f"is it the right dataset and complete?")
    arr = np.frombuffer(data, np.uint8).reshape(-1, rec)
    return arr[:, lab:].reshape(-1, 3, 32, 32).copy(), arr[:, lab - 1].astype(np.int64)


_CIFAR_FILES = {
    ("cifar10", "py"): (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
                        ["test_batch"]),
    ("cifar10", "bin"): (["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
                          "data_batch_5.bin"], ["test_batch.bin"]),
    ("cifar100", "py"): (["train"], ["test"]),
    ("cifar100", "bin"): (["train.bin"], ["test.bin"]),
}


def _collect_files(path: Path, wanted: set[str], memory_limit: int | None = None) -> dict[str, bytes]:
    """Regular files whose base name is wanted, from a directory (and its subdirectories) or a tar archive.
    Archives are read in place, never extracted, and must pass the same member checks as image folders.
    Their sizes (stat, or the tar headers) are checked against memory before any is read."""
    found: dict[str, bytes] = {}
    if path.is_dir():
        picked: dict[str, Path] = {}
        for root, _dirs, files in os.walk(path):
            for f in files:
                if f in wanted and f not in picked and not os.path.islink(os.path.join(root, f)):
                    picked[f] = Path(root, f)
        check_fits_in_memory(sum(p.stat().st_size for p in picked.values()), f"the data files in {path}",
                             memory_limit)
        return {f: p.read_bytes() for f, p in picked.items()}
    with _open_tar(path) as tf:
        members = tf.getmembers()
        check_archive_members(members, path)
        chosen: dict[str, tarfile.TarInfo] = {}
        for m in members:
            base = posixpath.basename(m.name)
            if m.isfile() and base in wanted and base not in chosen:
                chosen[base] = m
        check_fits_in_memory(sum(m.size for m in chosen.values()), f"the data files in {path}", memory_limit)
        for base, m in chosen.items():
            found[base] = tf.extractfile(m).read()
    return found


def load_cifar(path: str | os.PathLike, variant: str = "cifar10", memory_limit: int | None = None) -> Dataset:
    """CIFAR-10/100 from the python-pickle or binary release, as a directory or the downloaded .tar.gz."""
    path = Path(path)
    if variant not in ("cifar10", "cifar100"):
        raise FracgraphError(f"unknown CIFAR variant {variant!r}")
    check_fits_in_memory(60000 * 3072 + 120000 * 8, f"{variant} ({path})", memory_limit)
    names = {n for (v, _), (a, b) in _CIFAR_FILES.items() if v == variant for n in a + b}
    if variant == "cifar100":
        names |= {"meta", "fine_label_names.txt"}
    files = _collect_files(path, names, memory_limit)
    form = None
    for f in ("py", "bin"):
        tr, te = _CIFAR_FILES[(variant, f)]
        if all(n in files for n in tr + te):
            form = f
            break
    if form is None:
        tr_py, te_py = _CIFAR_FILES[(variant, "py")]
        raise FracgraphError(
            f"{path} does not hold the {variant} batches (looked for {', '.join(tr_py + te_py)} or the .bin "
            f"files): give the extracted cifar-*-batches-py / -bin directory or the downloaded .tar.gz")
    tr, te = _CIFAR_FILES[(variant, form)]
    label_key = "labels" if variant == "cifar10" else "fine_labels"

    def read(names):
        xs, ys = [], []
        for n in names:
            src = f"{path}:{n}"
            x, y = (_decode_pickle_batch(files[n], src, label_key) if form == "py"
                    else _decode_binary_batch(files[n], src, variant))
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = read(tr)
    xte, yte = read(te)
    ncls = 10 if variant == "cifar10" else 100
    classes = CIFAR10_CLASSES if variant == "cifar10" else _cifar100_names(files, form, path)
    if classes and len(classes) != ncls:
        classes = ()
    return Dataset(variant, np.ascontiguousarray(xtr), ytr, np.ascontiguousarray(xte), yte, ncls, CIFAR_MEAN,
                   CIFAR_STD, classes, augment_default=True, source=f"{path} ({form})")


def _cifar100_names(files: dict[str, bytes], form: str, path: Path) -> tuple[str, ...]:
    """Fine class names from `meta` (pickle) or fine_label_names.txt (binary); optional, so absent -> ()."""
    if form == "py" and "meta" in files:
        meta = safe_unpickle(files["meta"], f"{path}:meta")
        try:
            return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in _key(meta, "fine_label_names"))
        except (KeyError, TypeError, AttributeError):
            return ()
    if form == "bin" and "fine_label_names.txt" in files:
        return tuple(line.strip() for line in files["fine_label_names.txt"].decode().splitlines() if line.strip())
    return ()


# --------------------------------------------------------------------------------------------------- archives


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise FracgraphError(f"{path} is neither a directory nor a readable .tar/.tar.gz ({exc})") from None


def _strip_dot(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def check_archive_members(members: list[tarfile.TarInfo], archive: Path | str) -> None:
    """Refuse the whole archive if any member could land outside an extraction directory: absolute names, `..`
    components, links whose target leaves the root, device nodes. Such members only appear in crafted archives."""
    for m in members:
        name = m.name
        parts = name.replace("\\", "/").split("/")
        bad = None
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            bad = "has an absolute path"
        elif ".." in parts:
            bad = "contains '..'"
        elif m.issym() or m.islnk():
            target = m.linkname.replace("\\", "/")
            base = posixpath.dirname(name) if m.issym() else ""
            resolved = posixpath.normpath(posixpath.join(base, target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                bad = f"is a link to {m.linkname!r}, outside the archive"
        elif m.isdev() or m.isfifo():
            bad = "is a device or fifo"
        if bad:
            raise FracgraphError(f"archive {archive} refused: member {name!r} {bad}. It may be malicious; "
                                 f"rebuild the archive with plain relative paths")


# --------------------------------------------------------------------------------------------------- imagefolder


def default_cache_dir() -> Path:
    env = os.environ.get("FRACGRAPH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fracgraph"


def _split_layout(rel: list[str], source: str) -> tuple[dict[str, dict[str, list[str]]], str]:
    """Group relative file paths into {split: {class: [paths]}} with one common prefix (a top-level folder in an
    archive is allowed)."""
    layout: dict[str, dict[str, list[str]]] = {}
    prefixes = set()
    for r in rel:
        parts = r.split("/")
        if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_EXTS) or any(p.startswith(".") for p in parts):
            continue
        split, cls = parts[-3], parts[-2]
        if split not in ("train", "test", "val"):
            continue
        prefixes.add("/".join(parts[:-3]))
        layout.setdefault(split, {}).setdefault(cls, []).append(r)
    if len(prefixes) > 1:
        raise FracgraphError(f"{source} has train/test folders under several roots ({sorted(prefixes)[:3]}): "
                             f"keep one train/<class>/ and one test/<class>/ tree")
    if "test" not in layout and "val" in layout:
        layout["test"] = layout.pop("val")
    if "train" not in layout or "test" not in layout:
        raise FracgraphError(f"{source} needs train/<class>/<image> and test/<class>/<image> folders "
                             f"(found splits: {sorted(layout) or 'none'}; images: {', '.join(IMAGE_EXTS)})")
    extra = set(layout["test"]) - set(layout["train"])
    if extra:
        raise FracgraphError(f"{source}: test classes {sorted(extra)[:5]} have no training folder; "
                             f"the class lists of train/ and test/ must match")
    return layout, (prefixes.pop() if prefixes else "")


def _decoder():
    try:
        from PIL import Image
    except ImportError:
        raise FracgraphError("imagefolder data needs Pillow to decode images: pip install pillow") from None
    return Image


def _cache_key(path: Path) -> str:
    """Archive: its resolved path, size and mtime. Directory: every image's path, size and mtime."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{path.resolve()}".encode())
    if path.is_dir():
        for root, dirs, files in os.walk(path, followlinks=True):
            dirs.sort()
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                h.update(f"|{os.path.relpath(os.path.join(root, f), path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        st = path.stat()
        h.update(f"|{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load_imagefolder(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                     memory_limit: int | None = None, use_cache: bool = True) -> Dataset:
    """train/<class>/* and test/<class>/* images (one size), classes sorted by name (as torchvision does).

    Decoding tens of thousands of JPEGs takes seconds, so the decoded arrays are cached as an uncompressed .npz in
    `cache_dir` (default ~/.cache/fracgraph), keyed by the source's size and mtime; an unwritable cache only logs."""
    path = Path(path)
    key = _cache_key(path)
    cache_file = Path(cache_dir or default_cache_dir()) / f"imagefolder-{key}.npz"
    if use_cache and cache_file.exists():
        ds = _load_cached(cache_file, path, memory_limit)
        if ds is not None:
            return ds
    ds = _decode_imagefolder(path, memory_limit)
    if use_cache:
        try:
            from .runio import atomic_write_bytes

            arrays = {}
            for split in ("train", "test"):
                x = getattr(ds, f"x_{split}")
                if isinstance(x, RaggedImages):
                    arrays.update({f"pixels_{split}": x.pixels, f"sizes_{split}": x.sizes,
                                   f"offsets_{split}": x.offsets})
                else:
                    arrays[f"x_{split}"] = x
            atomic_write_bytes(cache_file, lambda f: np.savez(
                f, **arrays, y_train=ds.y_train, y_test=ds.y_test,
                classes=np.array(ds.class_names, dtype=str), mean=np.array(ds.mean), std=np.array(ds.std)),
                what="dataset cache")
        except (FracgraphError, OSError) as exc:
            log.warning("could not write the dataset cache %s (%s); the next run decodes again", cache_file, exc)
    return ds


def _load_cached(cache_file: Path, path: Path, memory_limit: int | None) -> Dataset | None:
    try:
        nbytes = _npz_nbytes(cache_file)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("dataset cache %s is unusable (%s); decoding again", cache_file, exc)
        return None
    check_fits_in_memory(nbytes, f"imagefolder {path}", memory_limit)
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            classes = tuple(str(c) for c in z["classes"])

            def split(name):
                if f"x_{name}" in z.files:
                    return z[f"x_{name}"]
                return RaggedImages(z[f"pixels_{name}"], z[f"sizes_{name}"], z[f"offsets_{name}"])

            return Dataset(f"imagefolder:{path.name}", split("train"), z["y_train"], split("test"), z["y_test"],
                           len(classes), tuple(z["mean"].tolist()), tuple(z["std"].tolist()), classes,
                           augment_default=True, source=f"{path} (cache {cache_file.name})")
    except (FracgraphError, OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("dataset cache %s is unusable (%s); decoding again", cache_file, exc)
    return None


def _decode_imagefolder(path: Path, memory_limit: int | None) -> Dataset:
    Image = _decoder()
    if path.is_dir():
        # a directory is the user's own filesystem: symlinked class folders are followed (archives are not trusted)
        rel = [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
               for root, _dirs, files in os.walk(path, followlinks=True) for f in files]
        layout, _ = _split_layout(rel, str(path))

        def opener(r: str) -> bytes:
            return (path / r).read_bytes()

        order = None
        tf = None
    else:
        tf = _open_tar(path)
        members = tf.getmembers()
        check_archive_members(members, path)
        by_name = {_strip_dot(m.name): m for m in members}
        files = [n for n, m in by_name.items() if m.isfile() or m.issym() or m.islnk()]
        layout, _ = _split_layout(files, str(path))
        # read in archive order: a compressed archive is then decompressed once, front to back
        order = {n: i for i, n in enumerate(by_name)}

        def opener(r: str) -> bytes:
            f = tf.extractfile(by_name[r])
            if f is None:
                raise FracgraphError(f"{path}: member {r} is not a readable file")
            return f.read()

    try:
        classes = tuple(sorted(layout["train"]))
        cidx = {c: i for i, c in enumerate(classes)}
        items = {s: sorted((p, cidx[c]) for c, ps in layout[s].items() for p in ps) for s in ("train", "test")}
        first = items["train"][0][0]
        with Image.open(io.BytesIO(opener(first))) as im0:
            w0, h0 = im0.size
            gray = im0.mode in ("1", "L", "I;16", "I", "F", "LA")
        c = 1 if gray else 3
        mode = "L" if gray else "RGB"
        n_all = len(items["train"]) + len(items["test"])
        limit = available_memory() if memory_limit is None else int(memory_limit)
        # first from the first image's size (exact when all have one size), then as images of other sizes come
        check_fits_in_memory(n_all * c * h0 * w0, f"imagefolder {path} ({n_all} images of {c}x{h0}x{w0})", limit)
        decoded: dict[str, list] = {s: [None] * len(items[s]) for s in ("train", "test")}
        pos = {p: (s, i) for s in ("train", "test") for i, (p, _) in enumerate(items[s])}
        seq = sorted(pos, key=(lambda p: order[p]) if order is not None else None)
        total = 0
        for p in seq:
            s, i = pos[p]
            try:
                with Image.open(io.BytesIO(opener(p))) as im:
                    w, h = im.size
                    total += h * w * c
                    if (h, w) != (h0, w0):
                        check_fits_in_memory(total, f"imagefolder {path} (images of several sizes)", limit)
                    im.draft(mode, (w, h))
                    decoded[s][i] = np.asarray(im.convert(mode)).reshape(h, w, c)
            except FracgraphError:
                raise
            except Exception as exc:
                raise FracgraphError(f"{path}: cannot decode {p} ({type(exc).__name__}: {exc}); remove or "
                                     f"replace it") from None
    finally:
        if tf is not None:
            tf.close()
    ytr = np.array([y for _, y in items["train"]], np.int64)
    yte = np.array([y for _, y in items["test"]], np.int64)
    shapes = {im.shape for s in ("train", "test") for im in decoded[s]}
    if len(shapes) == 1:   # one size: NCHW arrays, as always
        h, w, _ = shapes.pop()
        xtr = np.ascontiguousarray(np.stack(decoded["train"]).transpose(0, 3, 1, 2))
        xte = np.ascontiguousarray(np.stack(decoded["test"]).transpose(0, 3, 1, 2))
        del decoded
    else:                  # sizes differ: resized to the model's input when training (fit_to_input)
        h = w = None
        xtr = RaggedImages.from_images(decoded["train"])
        xte = RaggedImages.from_images(decoded["test"])
        del decoded
    if classes == CIFAR10_CLASSES and (c, h, w) == (3, 32, 32):
        mean, std = CIFAR_MEAN, CIFAR_STD
    elif isinstance(xtr, RaggedImages):
        mean, std = _pixel_stats(xtr.pixels, 1 / 255)
    else:
        mean, std = _channel_stats(xtr, 1 / 255)
    return Dataset(f"imagefolder:{path.name}", xtr, ytr, xte, yte, len(classes), mean, std, classes,
                   augment_default=True, source=str(path))


# --------------------------------------------------------------------------------------------------- npz


def _npz_nbytes(path: Path) -> int:
    """Sum of array sizes from the .npy headers alone, so an oversized file is refused before it is read."""
    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _fortran, dtype = read(f)
                total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    return total


def load_npz(path: str | os.PathLike, memory_limit: int | None = None) -> Dataset:
    """Arrays x_train, y_train, x_test, y_test (optional num_classes, mean, std, classes). Images are NCHW, or NHW
    (one channel added), or NHWC with 1 or 3 channels (transposed); pixels uint8 or float."""
    path = Path(path)
    try:
        nbytes = _npz_nbytes(path)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise FracgraphError(f"{path} is not a readable .npz ({exc}); save it with numpy.savez") from None
    check_fits_in_memory(nbytes, f"npz {path}", memory_limit)
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise FracgraphError(f"{path}: {exc} (object arrays are refused; save plain numeric arrays)") from None
    with z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise FracgraphError(f"{path} lacks {', '.join(missing)}; it needs x_train, y_train, x_test, y_test")
        try:
            xs = {s: _to_nchw(z[f"x_{s}"], f"{path}:x_{s}") for s in ("train", "test")}
            ys = {s: z[f"y_{s}"] for s in ("train", "test")}
        except ValueError as exc:
            raise FracgraphError(f"{path}: {exc} (object arrays are refused; save plain numeric arrays)") from None
        for s, y in ys.items():
            if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or
                                   (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))):
                raise FracgraphError(f"{path}: y_{s} must be a 1-D array of integer class labels, got "
                                     f"{y.dtype}{list(y.shape)}")
            ys[s] = y.astype(np.int64)
        ncls = int(z["num_classes"]) if "num_classes" in z.files else int(max(ys["train"].max(), ys["test"].max(
            initial=0)) + 1)
        classes = tuple(str(c) for c in z["classes"]) if "classes" in z.files else ()
        scale = 1 / 255 if xs["train"].dtype == np.uint8 else 1.0
        if "mean" in z.files and "std" in z.files:
            mean, std = tuple(float(v) for v in np.ravel(z["mean"])), tuple(float(v) for v in np.ravel(z["std"]))
        else:
            mean, std = _channel_stats(xs["train"], scale)
    c, h, w = xs["train"].shape[1:]
    return Dataset(f"npz:{path.name}", xs["train"], ys["train"], xs["test"], ys["test"], ncls, mean, std, classes,
                   augment_default=(c == 3), source=str(path))


def _to_nchw(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise FracgraphError(f"{what} must be [N, C, H, W] (or [N, H, W] / [N, H, W, C]), got shape {list(x.shape)}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
        return np.ascontiguousarray(x, dtype=np.float32)
    raise FracgraphError(f"{what} has dtype {x.dtype}; use uint8 pixels or float values")


# --------------------------------------------------------------------------------------------------- augmentation


def random_crop_flip(x: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray, pad: int = 4) -> np.ndarray:
    """Zero-pad by `pad`, crop HxW at offsets (dy, dx) in [0, 2*pad], mirror where `flip`: one gather for the
    whole batch (torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip, applied before normalization)."""
    b, c, h, w = x.shape
    padded = np.zeros((b, c, h + 2 * pad, w + 2 * pad), x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    rows = dy[:, None] + np.arange(h)                       # [B, H]
    cols = dx[:, None] + np.arange(w)                       # [B, W]
    cols = np.where(flip[:, None], cols[:, ::-1], cols)     # mirrored crop = crop of the mirror
    flat = padded.reshape(b, c, -1)
    idx = rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]  # [B, H, W] into the padded plane
    return np.take_along_axis(flat, idx.reshape(b, 1, h * w), axis=2).reshape(b, c, h, w)


# --------------------------------------------------------------------------------------------------- streams


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Counter-based randomness: batch (epoch, index) always draws the same numbers, whatever came before, so a
    stream's whole RNG state is (seed, epoch, position) and resuming needs no generator snapshot."""
    return np.random.default_rng([seed, epoch, index])


class BatchStream:
    """Endless training batches: per-epoch seeded shuffle, optional pad-4 crop + flip, normalized float32 NCHW.

    A background thread assembles batches into a bounded queue while the caller computes (numpy releases the GIL
    for the copies and arithmetic), so the loop does not wait on data. The sequence depends only on (seed, epoch,
    position), never on timing; `state_dict()` records where the consumer is and `load_state_dict()` continues
    with exactly the batches the original would have yielded next. The last batch of an epoch is partial unless
    `drop_last` (PyTorch DataLoader default, as in the FracTrain code: 50,000 / 128 -> 391 batches).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, augment: bool | None = None,
                 drop_last: bool = False, prefetch: int = 4, threaded: bool = True):
        if batch_size < 1:
            raise FracgraphError(f"batch size must be at least 1, got {batch_size}")
        if drop_last and batch_size > len(dataset.x_train):
            raise FracgraphError(f"batch size {batch_size} exceeds the {len(dataset.x_train)} training samples; "
                                 f"use a smaller batch")
        if not (isinstance(seed, (int, np.integer)) and seed >= 0):
            raise FracgraphError(f"seed must be a non-negative integer, got {seed!r}")
        self.ds = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.augment = dataset.augment_default if augment is None else bool(augment)
        self.drop_last = drop_last
        self.prefetch = max(1, int(prefetch))
        self.threaded = threaded
        self.n = len(dataset.x_train)
        self.batches_per_epoch = self.n // self.batch_size if drop_last else -(-self.n // self.batch_size)
        self._a, self._b = dataset._affine()
        self.epoch = 0  # consumer position: next batch is (epoch, index)
        self.index = 0
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None

    # -- deterministic batch construction (shared by the thread and the synchronous path)
    def _perm(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, _rng(self.seed, epoch, 0).permutation(self.n))
        return self._perm_cache[1]

    def make_batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `index` of `epoch`, computed from scratch (the reference the threaded path must equal)."""
        idx = self._perm(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        if self.ds.input_hw is not None:
            x = self._resized_batch(idx, _rng(self.seed, epoch, index + 1))
        else:
            x = self.ds.x_train[idx]
        if self.augment and self.ds.input_hw is None:
            r = _rng(self.seed, epoch, index + 1)
            b = len(idx)
            dy = r.integers(0, 9, b)
            dx = r.integers(0, 9, b)
            flip = r.random(b) < 0.5
            x = random_crop_flip(x, dy, dx, flip)
        out = x.astype(np.float32)
        out *= self._a
        out += self._b
        return out, self.ds.y_train[idx]

    def _resized_batch(self, idx: np.ndarray, r: np.random.Generator) -> np.ndarray:
        """Training images resized to the model's input: with augmentation, torchvision's RandomResizedCrop (scale
        0.08-1, ratio 3/4-4/3) + horizontal flip, drawn image by image from `r`; without, resize + centre crop."""
        from .resize import resize_center_crop, resized_crop, rrc_params

        h, w = self.ds.input_hw
        out = np.empty((len(idx), _channels(self.ds.x_train), h, w), np.uint8)
        for k, i in enumerate(idx):
            img = image_hwc(self.ds.x_train, int(i))
            if self.augment:
                top, left, ch, cw = rrc_params(r, img.shape[0], img.shape[1])
                flip = bool(r.random() < 0.5)
                out[k] = resized_crop(img, top, left, ch, cw, (h, w), flip).transpose(2, 0, 1)
            else:
                out[k] = resize_center_crop(img, (h, w)).transpose(2, 0, 1)
        return out

    @staticmethod
    def _advance(epoch: int, index: int, per_epoch: int) -> tuple[int, int]:
        index += 1
        return (epoch + 1, 0) if index >= per_epoch else (epoch, index)

    # -- iteration
    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.threaded:
            batch = self.make_batch(self.epoch, self.index)
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            pos, batch = item
            assert pos == (self.epoch, self.index), (pos, self.epoch, self.index)
        self.epoch, self.index = self._advance(self.epoch, self.index, self.batches_per_epoch)
        return batch

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        q, stop, start = self._queue, self._stop, (self.epoch, self.index)

        def work():
            e, i = start
            try:
                while not stop.is_set():
                    item = ((e, i), self.make_batch(e, i))
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    e, i = self._advance(e, i, self.batches_per_epoch)
            except BaseException as exc:  # surface the worker's failure in the consumer
                q.put(exc)

        self._thread = threading.Thread(target=work, name="fracgraph-batches", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the prefetch thread; the stream can still be iterated again (it restarts where it is)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- resume
    def state_dict(self) -> dict:
        state = {"kind": "BatchStream", "version": 1, "seed": self.seed, "epoch": self.epoch, "index": self.index,
                 "batch_size": self.batch_size, "augment": self.augment, "drop_last": self.drop_last, "n": self.n}
        if self.ds.input_hw is not None:
            state["input_hw"] = list(self.ds.input_hw)
        return state

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("seed", "batch_size", "augment", "drop_last", "n", "input_hw"):
            if state.get(k) != mine.get(k):
                raise FracgraphError(f"cannot resume the data stream: checkpoint has {k}={state.get(k)!r} but this "
                                     f"run has {mine[k]!r}; resume with the same --data, --batch-size and --seed")
        self.close()
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        if not 0 <= self.index < self.batches_per_epoch:
            raise FracgraphError(f"data stream checkpoint position {self.index} is outside an epoch of "
                                 f"{self.batches_per_epoch} batches; the checkpoint is damaged")


def eval_batches(dataset: Dataset, batch_size: int, split: str = "test") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fixed-order, unaugmented, normalized batches of a split; the last one is partial."""
    x = getattr(dataset, f"x_{split}")
    y = getattr(dataset, f"y_{split}")
    for i in range(0, len(x), batch_size):
        yield dataset.normalize(x[i:i + batch_size]), y[i:i + batch_size]
