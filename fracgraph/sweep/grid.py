"""Grid specs (`--grid eps=0.01,0.05 --grid alpha=0.3,0.5`) -> typed TrainConfig overrides, one per point.

Values are typed by the TrainConfig field they set, so a typo or a wrong type fails before any task starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

from ..errors import FracgraphError
from ..train.loop import TrainConfig

# set by the sweep itself, never by a grid
RESERVED = {"run_dir", "artifacts", "model", "threads"}


def _fields() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def _convert(key: str, text: str, type_name: str):
    optional = "None" in type_name
    base = type_name.replace("| None", "").replace("None |", "").strip()
    if optional and text.lower() == "none":
        return None
    try:
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
        if base == "str":
            return text
        if base == "list[int]":
            return [int(v) for v in text.split(":")]
        if base == "list[float]":
            return [float(v) for v in text.split(":")]
    except ValueError:
        hint = " (list items are separated by ':', e.g. 3:4:6:8)" if base.startswith("list") else ""
        raise FracgraphError(f"--grid {key}: {text!r} is not a valid {base}{hint}") from None
    raise FracgraphError(f"--grid {key}: parameters of type {type_name} cannot be swept")


def parse_grid(specs: list[str]) -> dict[str, list]:
    """['eps=0.01,0.05', 'alpha=0.3'] -> {'eps': [0.01, 0.05], 'alpha': [0.3]}, typed by TrainConfig."""
    fields = _fields()
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values.strip():
            raise FracgraphError(f"--grid {spec!r}: expected NAME=V1,V2,..., e.g. eps=0.01,0.05,0.1")
        if key in RESERVED:
            raise FracgraphError(f"--grid {key}: set by the sweep itself (each point gets its own run directory; "
                                 "use --threads for threads)")
        if key not in fields:
            raise FracgraphError(f"--grid {key}: not a training parameter; choose from "
                                 + ", ".join(sorted(set(fields) - RESERVED)))
        if key in grid:
            raise FracgraphError(f"--grid {key} is given twice; put all its values in one --grid {key}=V1,V2")
        vals = [_convert(key, v.strip(), fields[key]) for v in values.split(",") if v.strip()]
        if len({repr(v) for v in vals}) != len(vals):
            raise FracgraphError(f"--grid {key}: a value is repeated in {values!r}")
        grid[key] = vals
    if not grid:
        raise FracgraphError("give at least one --grid NAME=V1,V2,...")
    return grid


def _fmt(v) -> str:
    if isinstance(v, list):
        return ":".join(_fmt(x) for x in v)
    return repr(v) if isinstance(v, float) else str(v)


def points(grid: dict[str, list]) -> list[tuple[str, dict]]:
    """Every combination as (directory-safe name, overrides), in the order the grid was given."""
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = "_".join(f"{k}={_fmt(v)}" for k, v in zip(keys, combo))
        out.append((re.sub(r"[^A-Za-z0-9.=:_+-]", "-", name), dict(zip(keys, combo))))
    return out
