"""bench/reproduce.py's bad input: a missing --data is one line and exit 2 before anything is built or launched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "reproduce.py"


def test_missing_data_is_one_line_and_builds_nothing(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "-o", str(out), "--data", f"imagefolder:{tmp_path / 'no.tar.gz'}",
                        "--rows", "pfq"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no.tar.gz does not exist" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()
