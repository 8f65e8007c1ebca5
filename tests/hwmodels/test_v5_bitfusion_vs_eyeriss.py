"""V5: Bit-Fusion against Eyeriss on the paper's eight benchmarks, both sides computed by our models."""

import math

import pytest

from fracgraph.hwmodels.base import ConvOp
from fracgraph.hwmodels.bitfusion import BitFusion
from fracgraph.hwmodels.eyeriss import Eyeriss

from .isca18_benchmarks import BF, BF_CSV_CYCLES, EY, NOTEBOOK_MS


@pytest.fixture(scope="module")
def ratios():
    bf, ey = BitFusion("isca18"), Eyeriss("bitfusion_isca18")
    out = {}
    for bench in BF:
        bcyc = ben = 0.0
        per_layer = {}
        for name, k, o, s, ic, oc, ip, wp, im in BF[bench]:
            c = bf.conv_cost(ConvOp(ic=ic, oc=oc, batch=16, kh=k, kw=k, oh=o, ow=o, stride=s, a_bits=ip, b_bits=wp,
                                    im2col=im))
            per_layer[name] = c.cycles
            bcyc += c.cycles
            ben += c.energy_total_pj
        ecyc = een = 0.0
        for name, c_, k_, p, r, s in EY[bench]:
            c = ey.conv_cost(ConvOp(ic=c_, oc=k_, batch=16, kh=r, kw=r, oh=p, ow=p, stride=s, a_bits=16, b_bits=16))
            ecyc += c.cycles
            een += c.energy_total_pj
        out[bench] = (per_layer, ecyc / bcyc, een / ben, bcyc, ecyc)
    return out


def test_every_bitfusion_layer_matches_the_sweep_csv(ratios):
    for bench, (per_layer, *_rest) in ratios.items():
        assert per_layer == BF_CSV_CYCLES[bench], bench


def test_per_benchmark_speedups_match_notebook(ratios):
    for bench, (_, speed, _e, bcyc, ecyc) in ratios.items():
        ey_ms, bf_ms = NOTEBOOK_MS[bench]
        assert bcyc / 500e3 / 16 == pytest.approx(bf_ms, rel=1e-9)
        assert speed == pytest.approx(ey_ms / bf_ms, rel=0.10), bench


def test_v5_geomeans(ratios):
    gm = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs))  # noqa: E731
    speed = gm([r[1] for r in ratios.values()])
    energy = gm([r[2] for r in ratios.values()])
    assert speed == pytest.approx(3.93, rel=0.10)
    assert energy == pytest.approx(5.12, rel=0.10)
