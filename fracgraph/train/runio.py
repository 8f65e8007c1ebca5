"""Run-directory IO: atomic files, metrics.jsonl, summary.json, checkpoint directories.

A run must survive being killed at any instant: every file is written to a temporary name in the same directory,
fsynced, renamed over the old one (atomic on POSIX) and the directory fsynced, so a reader sees either the old or
the new file, never half of one. A full disk becomes a FracgraphError that names the file, and the old file stays.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import FracgraphError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest.json"

_UMASK = os.umask(0)
os.umask(_UMASK)
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; some filesystems do not allow opening a directory, which is then harmless to skip."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _io_error(exc: OSError, path: Path, what: str, kept: str | None = None) -> FracgraphError:
    kept = kept or f"the previous {path.name} is unchanged"
    if exc.errno in _DISK_FULL:
        return FracgraphError(
            f"disk full while writing {what} {path}: free some space or choose another run directory ({kept})")
    if exc.errno == errno.EFBIG:
        return FracgraphError(f"cannot write {what} {path}: file too large for the filesystem or the process's "
                              f"file-size limit (ulimit -f) ({kept})")
    return FracgraphError(f"cannot write {what} {path}: {exc.strerror or exc} ({kept})")


def native_write_error(exc: Exception, path: Path, what: str, kept: str | None = None) -> FracgraphError:
    """onnxruntime reports a failed file write as RuntimeError('... error:<strerror> errno:<n>'): same message as
    an OSError would get."""
    m = re.search(r"errno:\s*(\d+)", str(exc))
    if m:
        code = int(m.group(1))
        return _io_error(OSError(code, os.strerror(code)), path, what, kept)
    first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return FracgraphError(f"cannot write {what} {path}: {first.split(' : ')[-1][:200]} "
                          f"({kept or f'the previous {path.name} is unchanged'})")


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Callable[[Any], None], what: str = "file") -> Path:
    """Write `data` (bytes, or a callable given the open binary file) to `path` atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make run files unreadable to others
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quiet(tmp)
        raise _io_error(exc, path, what) from None
    except BaseException:
        _unlink_quiet(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _unlink_quiet(p: str | os.PathLike) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def json_safe(obj: Any) -> Any:
    """Strict JSON has no NaN/Infinity: a diverged loss is written as null rather than as an unreadable line."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():  # numpy scalar
        return json_safe(obj.item())
    if hasattr(obj, "tolist"):  # numpy array
        return json_safe(obj.tolist())
    return obj


def dumps(obj: Any, **kw) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def atomic_write_json(path: str | os.PathLike, obj: Any, what: str = "file") -> Path:
    return atomic_write_bytes(path, (dumps(obj, indent=2, sort_keys=True) + "\n").encode(), what=what)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FracgraphError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FracgraphError(f"{what} {path} is not valid JSON ({exc}); it is damaged, delete it or restore it") from None


def write_summary(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    return atomic_write_json(Path(run_dir) / SUMMARY_FILE, summary, what="run summary")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read complete lines; a torn last line (killed mid-write) is ignored, as the writer will drop it on resume."""
    records = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            records.append(json.loads(line))
    return records


class MetricsWriter:
    """Appends one JSON object per line to RUN/metrics.jsonl, flushed per line.

    Each record carries "step" = iterations completed when it was written. On resume from a checkpoint taken at
    step S, lines with step > S (written after that checkpoint, before the crash) and a torn last line are dropped,
    so the file ends up byte-identical to the one an uninterrupted run writes. The loop must therefore write all
    records of step S before saving the checkpoint of step S, and call `sync()` before saving it.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None, filename: str = METRICS_FILE):
        self.path = Path(run_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            if self.path.exists() and self.path.stat().st_size:
                raise FracgraphError(
                    f"{self.path} already has metrics: resume the run, or use a new run directory")
        else:
            self._truncate_after(int(resume_step))
        try:
            self._f = open(self.path, "ab")
        except OSError as exc:
            raise _io_error(exc, self.path, "metrics file") from None

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = bytearray()
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break
                if int(rec.get("step", 0)) > step:
                    break
                keep += line
        if len(keep) != self.path.stat().st_size:
            atomic_write_bytes(self.path, bytes(keep), what="metrics file")

    def write(self, record: Mapping[str, Any]) -> None:
        if "step" not in record:
            raise ValueError("a metrics record needs a 'step'")
        line = (dumps(record, sort_keys=True) + "\n").encode()
        pos = self._f.tell()
        try:
            self._f.write(line)
            self._f.flush()
        except OSError as exc:
            # Leave no torn line behind: cut back to the last complete record.
            try:
                self._f.truncate(pos)
            except OSError:
                pass
            raise _io_error(exc, self.path, "metrics file") from None

    def sync(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise _io_error(exc, self.path, "metrics file") from None

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


FileSpec = bytes | Callable[[Path], None] | os.PathLike


class CheckpointStore:
    """RUN/checkpoints/step-NNNNNNNN/ directories, each complete before it becomes visible, plus latest.json.

    `save` writes every file into a hidden temporary directory, fsyncs them, renames the directory into place and
    only then atomically rewrites latest.json, so a crash at any point leaves the previous checkpoint usable.
    Files are given as bytes, as a path to copy, or as a callable that writes the file at the path it is given
    (for ORT's `CheckpointState.save_checkpoint(state, path)`). The JSON `state` holds everything else the loop
    needs to continue exactly (data stream, schedules, step, best accuracy).
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise FracgraphError("checkpoint keep count must be at least 1")
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.keep = keep

    @staticmethod
    def dirname(step: int) -> str:
        return f"step-{int(step):08d}"

    def save(self, step: int, state: Mapping[str, Any], files: Mapping[str, FileSpec] | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / self.dirname(step)
        kept = "the previous checkpoint is unchanged and --resume continues from it"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.root))
        try:
            for name, spec in (files or {}).items():
                if "/" in name or name in ("", ".", "..", "state.json"):
                    raise ValueError(f"bad checkpoint file name {name!r}")
                target = tmp / name
                if isinstance(spec, (bytes, bytearray)):
                    target.write_bytes(spec)
                elif callable(spec):
                    try:
                        spec(target)
                    except (OSError, FracgraphError):
                        raise
                    except Exception as exc:  # native writers (ORT) raise RuntimeError on ENOSPC/EFBIG/EIO
                        raise native_write_error(exc, target, "checkpoint file", kept) from None
                else:
                    shutil.copyfile(spec, target)
                if not target.exists():
                    raise FracgraphError(f"checkpoint writer for {name} did not create {target}")
                _fsync_file(target)
            (tmp / "state.json").write_text(dumps({"step": int(step), "state": state}, sort_keys=True) + "\n")
            _fsync_file(tmp / "state.json")
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_json(self.root / LATEST_FILE, {"step": int(step), "dir": final.name}, what="checkpoint pointer")
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _io_error(exc, final, "checkpoint", kept) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(keep_name=final.name)
        return final

    def _prune(self, keep_name: str) -> None:
        dirs = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        old = [p for p in dirs if p.name != keep_name]
        for p in old[: max(0, len(dirs) - self.keep)]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".step-*.tmp"):  # left by a crash mid-save
            shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> tuple[int, dict, Path] | None:
        """(step, state, directory) of the last complete checkpoint, or None for a fresh run."""
        ptr = self.root / LATEST_FILE
        if not ptr.exists():
            return None
        info = read_json(ptr, what="checkpoint pointer")
        d = self.root / str(info.get("dir", ""))
        if not (d / "state.json").exists():
            raise FracgraphError(f"checkpoint {d} named by {ptr} is missing: restore it or start a new run directory")
        data = read_json(d / "state.json", what="checkpoint state")
        return int(data["step"]), data["state"], d


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())

