"""How much memory this process can still use, so inputs that cannot fit are refused before they are read.

A model or dataset declares its size up front (file size, tensor shapes, .npy headers); comparing that with what
is available turns a minutes-later OOM kill into one line naming both sizes.
"""

from __future__ import annotations

import os
from pathlib import Path


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit when one is set."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 62
    for lim, cur in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                     ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(lim).read_text().strip()
            if raw != "max" and int(raw) < (1 << 60):
                avail = min(avail, int(raw) - int(Path(cur).read_text().strip()))
        except (OSError, ValueError):
            continue
    return max(int(avail), 0)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_fits(nbytes: int, what: str, fix: str, limit: int | None = None) -> None:
    """Refuse `what` (needing `nbytes`) when it exceeds the memory limit: detected, or FRACGRAPH_MEMORY_LIMIT bytes."""
    if limit is None:
        limit = available_memory()
        env = os.environ.get("FRACGRAPH_MEMORY_LIMIT")
        if env:
            limit = min(limit, int(env))
    if nbytes > limit:
        from .errors import FracgraphError

        raise FracgraphError(f"{what} needs {fmt_bytes(nbytes)} in memory but only {fmt_bytes(limit)} is available: "
                             f"{fix}")
