"""Data-pipeline throughput: BatchStream (augmented, batch 128) vs a plain numpy loop, and overlap with compute.

Usage: python bench/data_throughput.py [--data SPEC] [--batches 300] [--compute-ms 5]
With no --data, CIFAR-10 from ../shared/data/cifar10-jpeg.tar.gz when present (decoded once into the cache),
otherwise synthetic 50,000 x 3x32x32 uint8. Prints batches/s and images/s for:
  numpy-loop   : the same work (shuffle, pad-4 crop, flip, normalize) written as a straightforward per-image loop
  stream-sync  : BatchStream's vectorized batch construction on the calling thread
  stream       : BatchStream with its prefetch thread
and, with a stand-in compute step of --compute-ms (a GIL-releasing one-thread numpy matmul), the wall time per step of the
synchronous and the prefetching loop: the loop is data-bound when that exceeds the compute time alone.
"""

from __future__ import annotations

import argparse
import os
import time

# The stand-in compute is a one-thread matmul, as an ORT session with one intra-op thread per spare core would be;
# multi-threaded BLAS on a small machine would fight the prefetch thread and make the timing meaningless.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
from pathlib import Path

import numpy as np

from fracgraph.train import data as D

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"


def numpy_loop(ds: D.Dataset, batch: int, n_batches: int, seed: int = 0) -> float:
    """Reference loop: per-image pad, crop, flip, then normalize; returns batches/s."""
    rng = np.random.default_rng(seed)
    mean = np.array(ds.mean, np.float32)[:, None, None]
    std = np.array(ds.std, np.float32)[:, None, None]
    perm = rng.permutation(len(ds.x_train))
    t = time.perf_counter()
    for b in range(n_batches):
        idx = perm[(b * batch) % len(perm):][:batch]
        out = np.empty((len(idx),) + ds.image_shape, np.float32)
        for j, i in enumerate(idx):
            img = np.pad(ds.x_train[i], ((0, 0), (4, 4), (4, 4)))
            dy, dx = rng.integers(0, 9, 2)
            img = img[:, dy:dy + 32, dx:dx + 32]
            if rng.random() < 0.5:
                img = img[:, :, ::-1]
            out[j] = (img.astype(np.float32) / 255 - mean) / std
        _ = ds.y_train[idx]
    return n_batches / (time.perf_counter() - t)


def stream_rate(ds: D.Dataset, batch: int, n_batches: int, threaded: bool) -> float:
    s = D.BatchStream(ds, batch, seed=0, augment=True, threaded=threaded)
    next(s)  # start the thread / warm caches
    t = time.perf_counter()
    for _ in range(n_batches):
        next(s)
    rate = n_batches / (time.perf_counter() - t)
    s.close()
    return rate


def overlap(ds: D.Dataset, batch: int, n_batches: int, compute_ms: float) -> tuple[float, float, float]:
    """ms per step for compute alone, synchronous loading + compute, prefetching loading + compute."""
    n = 256
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    for _ in range(10):  # warm up BLAS threads before calibrating
        a @ a
    t = time.perf_counter()
    for _ in range(100):
        a @ a
    per = (time.perf_counter() - t) / 100
    reps = max(1, int(round(compute_ms / 1000 / per)))

    def compute():
        for _ in range(reps):
            a @ a

    t = time.perf_counter()
    for _ in range(n_batches):
        compute()
    alone = (time.perf_counter() - t) / n_batches * 1000
    out = [alone]
    for threaded in (False, True):
        s = D.BatchStream(ds, batch, seed=0, augment=True, threaded=threaded)
        next(s)
        t = time.perf_counter()
        for _ in range(n_batches):
            next(s)
            compute()
        out.append((time.perf_counter() - t) / n_batches * 1000)
        s.close()
    return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--compute-ms", type=float, default=5.0)
    args = ap.parse_args()
    spec = args.data or (f"imagefolder:{SHARED}" if SHARED.exists() else None)
    if spec:
        t = time.perf_counter()
        ds = D.load_dataset(spec)
        print(f"loaded {ds.describe()} in {time.perf_counter() - t:.2f} s ({ds.source})")
    else:
        r = np.random.default_rng(0)
        ds = D.Dataset("synthetic", r.integers(0, 256, (50000, 3, 32, 32), dtype=np.uint8), r.integers(0, 10, 50000),
                       np.zeros((10, 3, 32, 32), np.uint8), np.zeros(10, np.int64), 10, D.CIFAR_MEAN, D.CIFAR_STD,
                       augment_default=True)
        print("using synthetic 50000x3x32x32 uint8 (shared CIFAR-10 absent)")
    b = args.batch
    loop = numpy_loop(ds, b, max(20, args.batches // 5))
    sync = stream_rate(ds, b, args.batches, threaded=False)
    thr = stream_rate(ds, b, args.batches, threaded=True)
    print(f"batch {b}, augmentation on")
    print(f"  numpy-loop   {loop:8.1f} batches/s  {loop * b:10.0f} images/s")
    print(f"  stream-sync  {sync:8.1f} batches/s  {sync * b:10.0f} images/s  ({sync / loop:.1f}x the loop)")
    print(f"  stream       {thr:8.1f} batches/s  {thr * b:10.0f} images/s  ({thr / loop:.1f}x the loop)")
    alone, s_ms, t_ms = overlap(ds, b, min(args.batches, 200), args.compute_ms)
    print(f"with ~{args.compute_ms:g} ms compute per step: compute alone {alone:.2f} ms, sync load+compute "
          f"{s_ms:.2f} ms, prefetch load+compute {t_ms:.2f} ms (data overhead {t_ms - alone:+.2f} ms/step)")


if __name__ == "__main__":
    main()
