"""`fracgraph report`: numbers drawn from the run files, a self-contained page, one-line errors, a real browser."""

from __future__ import annotations

import base64
import collections
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fracgraph.cli import app
from fracgraph.errors import FracgraphError
from fracgraph.report import figures, load_run, write_report
from fracgraph.trace import TraceRecorder
from fracgraph.train.loop import TrainConfig, train

CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real short runs on digits (static FW8/BW8, PFQ) and a copy of the static one given a DFQ-like trace."""
    from fracgraph.build import build_artifacts
    from fracgraph.zoo import export

    d = tmp_path_factory.mktemp("report")
    build_artifacts(export("digitnet", d / "dn.onnx"), d / "art")
    common = dict(artifacts=str(d / "art"), iters=16, epoch_iters=8, batch=64, lr=0.1)
    train(TrainConfig(run_dir=str(d / "static8"), schedule="static", **common))
    train(TrainConfig(run_dir=str(d / "pfq"), schedule="pfq", eps=0.5, alpha=0.5, **common))
    # per-block choices that change every few steps, as a DFQ run records them
    shutil.copytree(d / "static8", d / "dfq")
    rng = np.random.default_rng(1)
    options = np.array([[3, 4, 6], [4, 4, 8], [6, 4, 8]], np.float32)
    per_step = [options[rng.integers(0, 3, 3)] for _ in range(16)]
    rec = TraceRecorder()
    for s, b in enumerate(per_step):
        rec.record(s, b)
    rec.trace().write(d / "dfq")
    summary = json.loads((d / "dfq" / "summary.json").read_text())
    summary["transitions"] = [{"step": 8, "epoch": 2, "old": [3, 6], "new": [4, 8], "reason": "test"}]
    (d / "dfq" / "summary.json").write_text(json.dumps(summary))
    return d, per_step


def test_trace_lookup_and_choice_histogram_match_a_per_step_count(runs):
    d, per_step = runs
    run = load_run(d / "dfq")
    assert np.array_equal(run.bits_at(np.arange(16)), np.stack(per_step))
    cc = run.choice_counts()
    assert cc.unit == "steps" and cc.source == "the precision trace" and len(cc.blocks) == 3
    expected = collections.Counter((b, tuple(float(v) for v in bits[b])) for bits in per_step for b in range(3))
    got = {(b, key): int(c[b]) for key, c in cc.counts.items() for b in range(3) if c[b]}
    assert got == dict(expected)
    assert sum(c.sum() for c in cc.counts.values()) == 16 * 3


def test_dfq_summary_histogram_is_preferred_to_the_trace(runs, tmp_path):
    d, _ = runs
    shutil.copytree(d / "dfq", tmp_path / "run")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    s["dfq"] = {"weight_bits": 4, "granularity": "batch", "options": [[3, 6], [4, 8], [6, 12]],
                "choice_histogram": [{"block": "b0", "counts": {"3/6": 640, "4/8": 0, "6/12": 384}},
                                     {"block": "b1", "counts": {"3/6": 0, "4/8": 1024, "6/12": 0}},
                                     {"block": "b2", "counts": {"3/6": 1, "4/8": 1, "6/12": 1022}}]}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(s))
    cc = load_run(tmp_path / "run").choice_counts()
    assert cc.blocks == ["b0", "b1", "b2"] and "summary.json" in cc.source
    assert {k: v.tolist() for k, v in cc.counts.items()} == {
        (3.0, 4.0, 6.0): [640, 0, 1], (4.0, 4.0, 8.0): [0, 1024, 1], (6.0, 4.0, 12.0): [384, 0, 1022]}
    s["dfq"]["choice_histogram"] = "unexpected layout"          # falls back to the trace, never fails
    (tmp_path / "run" / "summary.json").write_text(json.dumps(s))
    assert load_run(tmp_path / "run").choice_counts().source == "the precision trace"


def test_pareto_front_by_hand():
    # (cost, accuracy): the second is beaten by the first (cheaper, more accurate); the last ties the third's cost
    pts = [(1.0, 0.90), (2.0, 0.85), (3.0, 0.95), (3.0, 0.93), (0.5, 0.70)]
    assert figures.pareto_front(pts) == [4, 0, 2]


def _section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


@pytest.fixture(scope="module")
def report_page(runs):
    d, _ = runs
    return write_report([d / "static8", d / "pfq", d / "dfq"], d / "rep", baseline="static8",
                        hw_names=["bitfusion", "eyeriss"])


def test_report_page_is_self_contained_and_shows_the_run_numbers(runs, report_page):
    d, _ = runs
    page = report_page.read_text()
    rep_dir = report_page.parent
    for sid in ("summary", "trajectory", "precision", "choices", "hardware"):
        _section(page, sid)
    # nothing fetched: no scripts, no stylesheets, every image an embedded PNG identical to the file beside it
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r'(src|href)\s*=\s*"(?!data:|#)', page)
    srcs = re.findall(r'<img src="data:image/png;base64,([^"]+)"[^>]*title="([^"]+)"', page)
    assert len(srcs) == len(re.findall(r"<img ", page)) >= 6
    for b64, name in srcs:
        data = base64.b64decode(b64)
        assert data.startswith(PNG_MAGIC) and data == (rep_dir / name).read_bytes()
    from PIL import Image

    with Image.open(rep_dir / "trajectory.png") as im:
        assert im.size[0] > 500 and len(np.unique(np.asarray(im.convert("L")))) > 20

    # summary: the numbers of summary.json, and the saving computed against the chosen baseline
    base, pfq = (json.loads((d / n / "summary.json").read_text()) for n in ("static8", "pfq"))
    summary = _section(page, "summary")
    saving = 100 * (1 - pfq["cum_eff_gmacs"] / base["cum_eff_gmacs"])
    assert f"{saving:.1f}%" in summary and f"{pfq['cum_eff_gmacs']:.4g}" in summary
    assert f"{100 * pfq['final_test_acc']:.2f}%" in summary
    assert "step 8: FW3/BW6&rarr;FW4/BW8" in summary
    # choices: the DFQ-like run gets a histogram, the static run one line
    choices = _section(page, "choices")
    assert "choices-dfq.png" in choices and "choices-static8.png" not in choices
    assert "used FW8/BW8 for all 16 steps" in choices
    # hardware: the estimate over each run's trace
    from fracgraph.analysis.estimate import report

    est = report(d / "art", ["eyeriss"], trace_dir=d / "pfq", batch=64)
    e = est["hw"]["eyeriss"]["run"]["energy_total_pj"]
    unit, scale = figures.pick_unit([e], figures.ENERGY_UNITS)
    assert f"{e / scale:.3g} {unit}" in _section(page, "hardware")


def test_missing_artifacts_leave_a_note_not_a_failure(runs, tmp_path):
    d, _ = runs
    shutil.copytree(d / "pfq", tmp_path / "moved")
    s = json.loads((tmp_path / "moved" / "summary.json").read_text())
    s["artifacts"] = str(tmp_path / "gone")
    (tmp_path / "moved" / "summary.json").write_text(json.dumps(s))
    page = write_report([tmp_path / "moved"], tmp_path / "rep", hw_names=["eyeriss"]).read_text()
    assert "not found" in _section(page, "hardware") and "hardware.png" not in page


@pytest.mark.parametrize("damage, message", [
    ("nothing", "no such run directory"),
    ("summary_missing", "summary.json does not exist"),
    ("summary_corrupt", "not valid JSON"),
    ("metrics_corrupt", "line 2 is not JSON"),
    ("metrics_empty", "holds no steps"),
    ("trace_missing", "trace.npz does not exist"),
    ("trace_corrupt", "not a fracgraph trace"),
])
def test_bad_run_directory_is_one_line(runs, tmp_path, damage, message):
    d, _ = runs
    run = tmp_path / "run"
    if damage != "nothing":
        shutil.copytree(d / "static8", run)
    if damage == "summary_missing":
        (run / "summary.json").unlink()
    elif damage == "summary_corrupt":
        (run / "summary.json").write_text('{"steps": ')
    elif damage == "metrics_corrupt":
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        (run / "metrics.jsonl").write_text(lines[0] + "{oops\n" + "".join(lines[2:]))
    elif damage == "metrics_empty":
        (run / "metrics.jsonl").write_text("")
    elif damage == "trace_missing":
        (run / "trace.npz").unlink()
    elif damage == "trace_corrupt":
        (run / "trace.npz").write_bytes(b"not a zip")
    with pytest.raises(FracgraphError, match=re.escape(message)):
        write_report([run], tmp_path / "rep")
    r = CliRunner().invoke(app, ["report", str(run), "-o", str(tmp_path / "rep")])
    assert r.exit_code == 2 and "Traceback" not in r.output and message in r.output
    assert len(r.output.strip().splitlines()) <= 2      # one message (the console may wrap it once)


def test_unknown_baseline_and_hw_are_one_line(runs, tmp_path):
    d, _ = runs
    r = CliRunner().invoke(app, ["report", str(d / "pfq"), "-o", str(tmp_path / "r"), "--baseline", "nope"])
    assert r.exit_code == 2 and "none of the runs" in r.output
    r = CliRunner().invoke(app, ["report", str(d / "pfq"), "-o", str(tmp_path / "r"), "--hw", "tpu"])
    assert r.exit_code == 2 and "tpu" in r.output


# -- a real browser -----------------------------------------------------------------------------------------------

def _chromium(tmp_path: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", *extra, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, timeout=120)


def _page_requests(netlog: Path) -> list[str]:
    """URLs the page asked the network for; Chromium's own background requests carry no page origin."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for ev in log["events"]:
        p = ev.get("params") or {}
        if ev["type"] == start and "url" in p and p.get("initiator") != "not an origin":
            urls.append(p["url"])
    return [u for u in urls if not u.startswith(("data:", "file:", "chrome:"))]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium; "
                                                   ".ci/run installs it when it runs as root)")
def test_html_renders_in_headless_chromium_without_network(report_page, tmp_path):
    from PIL import Image

    page = report_page
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1400,2400",
                  f"--log-net-log={tmp_path / 'net.json'}")
    assert shot.exists(), r.stderr.decode(errors="replace")[-2000:]
    with Image.open(shot) as im:
        gray = np.asarray(im.convert("L"), dtype=np.float64)
    assert gray.shape == (2400, 1400)
    assert gray.std() > 20 and len(np.unique(gray)) > 50, "the screenshot is (nearly) blank"
    assert _page_requests(tmp_path / "net.json") == []
    dom = _chromium(tmp_path, page, "--dump-dom").stdout.decode()
    for sid in ("summary", "trajectory", "precision", "choices", "hardware"):
        assert f'<section id="{sid}">' in dom
    assert dom.count('<img src="data:image/png;base64,') >= 6

    # the detector itself: a page with a remote image and stylesheet is caught
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://example.invalid/a.png">'
                   '<link rel="stylesheet" href="https://cdn.example.invalid/x.css"></body></html>')
    _chromium(tmp_path, bad, "--dump-dom", f"--log-net-log={tmp_path / 'bad.json'}")
    assert sorted(_page_requests(tmp_path / "bad.json")) == ["http://example.invalid/a.png",
                                                             "https://cdn.example.invalid/x.css"]


def test_fractrain_cp_target_transitions_are_labelled(runs, tmp_path):
    # FracTrain's stages are cp targets (numbers), not (FW, BW) pairs; the page and figure must take both
    d, _ = runs
    shutil.copytree(d / "dfq", tmp_path / "ft")
    s = json.loads((tmp_path / "ft" / "summary.json").read_text())
    s["transitions"] = [{"step": 8, "epoch": 2, "old": 1.5, "new": 2.0, "reason": "PFQ turning point 1"}]
    (tmp_path / "ft" / "summary.json").write_text(json.dumps(s))
    r = CliRunner().invoke(app, ["report", str(tmp_path / "ft"), "-o", str(tmp_path / "rep"), "--hw", "bitfusion"])
    assert r.exit_code == 0, r.output
    assert "cp 1.5%&rarr;cp 2%" in (tmp_path / "rep" / "index.html").read_text()
