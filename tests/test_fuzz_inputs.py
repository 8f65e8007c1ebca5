"""A fast subset of bench/fuzz_inputs.py: mutated models through quantize, inspect and estimate give one-line
errors (exit 2) or succeed, never a traceback, a hang or a stray file; and the forked harness judges what the
real `fracgraph` console script does."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fuzz_inputs.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_inputs"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_thirty_mutated_inputs_fail_cleanly(fuzz, tmp_path):
    # seed 1 (the bench defaults to 0): every mutation kind on both base models, 30 inputs
    cases = fuzz.make_cases(30, seed=1)
    assert {c.kind for c in cases} == set(fuzz.MUTATIONS)
    results = fuzz.run_cases(cases, tmp_path, jobs=2, timeout=30)
    assert len(results) == 90
    failures = [f"{r.case.id} {r.case.kind} ({r.case.variant}) {r.command}: {r.verdict}: {r.stderr[-300:]}"
                for r in results if r.verdict.startswith("FAIL")]
    assert not failures, "\n".join(failures)
    verdicts = {(r.case.kind, r.command): r.verdict for r in results}
    # the kinds that cannot be valid are refused by all three commands
    for kind in ("truncate", "cycle", "external_outside", "empty_graph", "negative_dim", "huge_dim"):
        assert all(verdicts[(kind, c)] == "error" for c in fuzz.COMMANDS), kind


def test_judge_flags_what_the_rules_forbid(fuzz):
    assert fuzz.judge(2, "", "error: bad model\n", False, []) == "error"
    assert fuzz.judge(0, "ok", "", False, []) == "ok"
    assert fuzz.judge(1, "", "Traceback (most recent call last):\n  ...\nValueError: x", False, []) == "FAIL: traceback"
    assert fuzz.judge(2, "", "error: a\nerror: b\n", False, []).startswith("FAIL: 2 lines")
    assert fuzz.judge(None, "", "", True, []).startswith("FAIL: hang")
    assert fuzz.judge(-8, "", "", False, []) == "FAIL: exit code -8"
    assert fuzz.judge(2, "", "error: x\n", False, ["outside/x"]).startswith("FAIL: wrote outside")


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("fracgraph")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from fracgraph.cli import app; app()"]


def test_forked_harness_agrees_with_the_real_console_script(fuzz, tmp_path):
    """The harness's verdict must be what a user sees: same exit code and stderr from the installed script."""
    cases = fuzz.make_cases(20, seed=0)
    picked = [next(c for c in cases if c.kind == "external_outside"), next(c for c in cases if c.kind == "nan_weights")]
    forked = {(r.case.id, r.command): r for r in fuzz.run_cases(picked, tmp_path / "forked", ("inspect",), jobs=2)}
    for case in picked:
        d = fuzz.layout(case, tmp_path / "real")
        p = subprocess.run([*_console_script(), *fuzz.argv_for("inspect", d)], capture_output=True, text=True,
                           cwd=d / "work", timeout=120)
        r = forked[(case.id, "inspect")]
        assert p.returncode == r.code, (case.kind, p.stderr)
        # paths differ (two case directories); the rest of the line is the same
        assert p.stderr.strip().replace(str(d.resolve()), "D").replace(str(d), "D") == \
            r.stderr.strip().replace(str((tmp_path / "forked" / d.name).resolve()), "D").replace(
                str(tmp_path / "forked" / d.name), "D")
    assert {r.verdict for r in forked.values()} <= {"error", "ok"}
