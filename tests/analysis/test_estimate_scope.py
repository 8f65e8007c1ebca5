"""`estimate --scope gemm|step` and cp in hardware units (the run's energy/latency as % of FP32 on that hardware)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from fracgraph.analysis.estimate import Estimator, load_source, report
from fracgraph.analysis.optable import gemm_table
from fracgraph.cli import app
from fracgraph.hwmodels import get_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from fracgraph.zoo import export

    return export("digitnet", tmp_path_factory.mktemp("scope") / "dn.onnx")


def test_gemm_scope_counts_only_the_three_gemms(model):
    full = report(model, ["bitfusion"], fw=4, bw=6, batch=32, steps=10)
    gem = report(model, ["bitfusion"], fw=4, bw=6, batch=32, steps=10, scope="gemm")
    h, g = full["hw"]["bitfusion"], gem["hw"]["bitfusion"]
    assert gem["scope"] == "gemm" and g["memory_ops"]["energy_pj"] == 0 and h["memory_ops"]["energy_pj"] > 0
    # the GEMM-scope step is the sum of the forward, error and weight-gradient phases of every layer
    phases = sum(r["phases"][p]["energy_pj"] for r in h["layers"] for p in ("fw", "bw_data", "bw_weight")
                 if p in r["phases"])
    assert g["step"]["energy_total_pj"] == pytest.approx(phases, rel=1e-12)
    # the step scope's GEMM-only saving is the gemm scope's saving
    assert h["savings"]["gemm_energy"] == pytest.approx(g["savings"]["energy"], rel=1e-9)
    assert g["savings"]["energy"] > h["savings"]["energy"] > 0     # memory-bound ops do not shrink with bits


def test_cp_in_macs_and_hardware_units(model):
    rep = report(model, ["eyeriss", "bitfusion"], fw=4, bw=6, batch=32, steps=10, scope="gemm")
    # effective MACs: quantized GEMMs at (4x4, 6x4, 4x6)/1024 of their MACs, the classifier (policy: last FP32) at
    # 1; the first layer (reads the data input) has no error GEMM
    g = gemm_table(__import__("fracgraph.model", fromlist=["load_model"]).load_model(model))
    first, last = g[0].name, g[-1].name
    macs = {o.name: o.macs for o in g}

    def step_eff(fw, err, wg, fp32=(1, 1, 1)):
        return sum(m * (fp32 if n == last else (fw, err, wg))[0] + m * (fp32 if n == last else (fw, err, wg))[2]
                   + (0 if n == first else m * (fp32 if n == last else (fw, err, wg))[1]) for n, m in macs.items())

    eff = step_eff(16 / 1024, 24 / 1024, 24 / 1024)
    assert rep["hw"]["bitfusion"]["cp"]["macs"] == pytest.approx(100 * eff / step_eff(1, 1, 1), rel=1e-9)
    assert rep["hw"]["bitfusion"]["savings"]["macs"] == pytest.approx(1 - eff / step_eff(1 / 16, 1 / 16, 1 / 16),
                                                                      rel=1e-9)
    # hardware cp: this run over the same run at FP32 (bits 0 = FP32 in every column)
    src = load_source(model, 32)
    for hw in ("bitfusion", "eyeriss"):
        est = Estimator(src.step, get_model(hw), scope="gemm")
        e = est.step_cost(src.uniform_bits(4, 6)).total
        f = est.step_cost(np.zeros((1, 3))).total
        cp = rep["hw"][hw]["cp"]
        assert cp["energy"] == pytest.approx(100 * e.energy_total_pj / f.energy_total_pj, rel=1e-9)
        assert cp["latency"] == pytest.approx(100 * e.latency_s / f.latency_s, rel=1e-9)
    # Eyeriss's 16-bit datapath: 4/6 bits gain nothing over 8/8, while the effective-MAC cp halves and more
    r8 = report(model, ["eyeriss"], fw=8, bw=8, batch=32, steps=10, scope="gemm")["hw"]["eyeriss"]["cp"]
    assert r8["latency"] == pytest.approx(rep["hw"]["eyeriss"]["cp"]["latency"], rel=1e-12)
    assert r8["macs"] > 2 * rep["hw"]["eyeriss"]["cp"]["macs"]


def test_bad_scope_is_one_line(model):
    r = CliRunner().invoke(app, ["estimate", str(model), "--hw", "bitfusion", "--scope", "layers"])
    assert r.exit_code == 2 and "--scope must be one of step, gemm" in r.output and "Traceback" not in r.output
