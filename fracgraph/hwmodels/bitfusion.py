"""Bit-Fusion (Sharma et al., ISCA 2018): a port of the released simulator's tiling search and cost model.

Port of hsharma35/bitfusion@04ec1c8 `optimizer.py:_optimize_for_order/get_stats_fast`,
`accelerator.py:get_compute_cycles/get_perf_factor` and `stats.py:get_energy` (spec hwmodels.md §1.3-1.4),
vectorized with numpy over all 120 loop orders x all power-of-two tilings at once, so one search is a few
milliseconds instead of the original's seconds; results are cached per unique (shape, bits).
Known quirks of the original are kept on purpose because they decide which tiling wins (for example
`max_read_size` being set from the *write* size). Operands above the 8-bit maximum are clamped and time
multiplexed: x ceil(bits/8) cycles per operand (DNNsim's x2 rule for 16 bits; FP32 = 4 passes per operand).
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import permutations

import numpy as np

from .base import LEVELS, ConvOp, Cost, MemOp, load_params, mem_cost_generic

PARAMS_FILE = "bitfusion.json"
OPRECISION = 32                       # psum/output bits in OBUF and DRAM (`optimizer.py` oprec = 32)

# Loops in the simulator's naming: B/b, OW/ow, OH/oh, IC/ic, OC/oc; which tensor each tiled loop indexes.
_LOOPS = ("B/b", "OW/ow", "OH/oh", "IC/ic", "OC/oc")
_DEPS = {  # optimizer.py tile_deps
    "act": np.array([True, True, True, True, False]),
    "wgt": np.array([False, False, False, True, True]),
    "out": np.array([True, True, True, False, True]),
}
_ORDERS = np.array(list(permutations(range(5))), dtype=np.int64)   # [120, 5], outermost first


def _log2(a: float) -> float:
    return math.log(a) / math.log(2)   # the simulator's own log2, kept so the tile counts match exactly


def _cdiv(a, b):
    return -(-a // b)


def perf_factor(iprec: int, wprec: int, pmax: int = 8, pmin: int = 2) -> int:
    """How many input channels one fusion unit consumes per cycle relative to pmax x pmax (Sec. 1.2)."""
    i = max(min(iprec, pmax), pmin)
    w = max(min(wprec, pmax), pmin)
    return (pmax // i) * (pmax // w)


def time_multiplex(iprec: int, wprec: int, pmax: int = 8) -> int:
    """Extra passes for operands wider than the array (DNNsim `time_multiplex *= 2` per operand above 8 bits)."""
    return _cdiv(iprec, pmax) * _cdiv(wprec, pmax)


@lru_cache(maxsize=65536)
def _search(N, M, pmax, pmin, sram_w, sram_a, sram_o, ifw, e_core, e_wr, e_ww, e_ir, e_iw, e_or, e_ow, e_dram,
            inner, kh, kw, OH, OW, S, IC, OC, B, iprec, wprec, im2col) -> dict:
    """Best tiling over every loop order and power-of-two tile (min cycles, then min energy)."""
    pf = perf_factor(iprec, wprec, pmax, pmin)
    tm = time_multiplex(iprec, wprec, pmax)
    NPF = N * pf
    O = max(OH, OW)
    n_o = int(math.ceil(_log2(O))) + 1
    n_ic = int(math.ceil(_log2(IC))) + 1
    n_oc = int(math.ceil(_log2(OC))) + 1 if im2col else int(math.ceil(_log2(math.ceil(float(OC) / M)))) + 1
    n_b = int(math.ceil(_log2(B))) + 1

    bs = np.minimum(1 << np.arange(n_b), B)
    os_ = 1 << np.arange(n_o)
    ics = np.minimum(1 << np.arange(n_ic), IC)
    ocs = np.minimum((1 << np.arange(n_oc)) * (1 if im2col else M), OC)
    b, o, ic, oc = (x.ravel().astype(np.int64) for x in np.meshgrid(bs, os_, ics, ocs, indexing="ij"))
    ow = np.minimum(o, OW)
    oh = np.minimum(o, OH)
    num = np.stack([_cdiv(B, b), _cdiv(OW, ow), _cdiv(OH, oh), _cdiv(IC, ic), _cdiv(OC, oc)])  # [5, T]

    def sizes(b, ow, oh, ic, oc):
        wgt = _cdiv(kh * kw * ic, NPF) * NPF * oc * wprec
        if im2col:
            act = ow * oh * kh * kw * ic * b * iprec
        else:
            act = (kw + (ow - 1) * S) * (kh + (oh - 1) * S) * ic * b * iprec
        return wgt, act, ow * oh * _cdiv(oc, M) * M * b * OPRECISION

    cap = {"wgt": sram_w * 8 // 2, "act": sram_a * 8 // 2, "out": sram_o * 8 // 2}
    wgt0, act0, out0 = sizes(b, ow, oh, ic, oc)
    valid = (wgt0 <= cap["wgt"]) & (act0 <= cap["act"]) & (out0 <= cap["out"])
    if not valid.any():
        raise ValueError("no tiling fits the buffers")
    # drop overflowing tilings up front (the simulator skips them); enumeration order is kept for tie-breaks
    b, ow, oh, ic, oc, num = b[valid], ow[valid], oh[valid], ic[valid], oc[valid], num[:, valid]
    wgt0, act0, out0 = wgt0[valid], act0[valid], out0[valid]

    # Outer-loop DRAM traffic, for all orders at once: [P, T]
    P, T = len(_ORDERS), len(b)
    writes = {k: np.broadcast_to(v, (P, T)).copy() for k, v in (("wgt", wgt0), ("act", act0), ("out", out0))}
    maxw = {k: v.copy() for k, v in writes.items()}
    promote = {k: np.ones((P, T), bool) for k in writes}
    for pos in range(4, -1, -1):
        loop = _ORDERS[:, pos]                       # [P]
        nt = num[loop]                               # [P, T]
        for ns in ("wgt", "act", "out"):
            dep = _DEPS[ns][loop][:, None]           # [P, 1]
            pr = promote[ns]
            new = writes[ns] * np.where(pr & ~dep, 1, nt)
            check = pr & dep
            over = check & (new > cap[ns])
            maxw[ns] = np.where(check & ~over, new, maxw[ns])
            promote[ns] = pr & ~over
            writes[ns] = new
    # reads of 'out' follow exactly the same promotion as its writes (same sizes, same rule)
    dram_rd = writes["wgt"] + writes["act"] + writes["out"]
    dram_wr = writes["out"]

    # Inner loop: SRAM access counts (energy only)
    is_loop = _cdiv(oc, M) * M
    os_loop = _cdiv(ic * kh * kw, NPF) * NPF if im2col else _cdiv(ic, NPF) * NPF * kh * kw
    ws_loop = b * oh * ow
    is_e = (os_loop * ws_loop) * (iprec + is_loop * (wprec + OPRECISION))
    os_e = (is_loop * ws_loop) * (OPRECISION + os_loop * (iprec + wprec))
    ws_e = (os_loop * is_loop) * (wprec + ws_loop * (iprec + OPRECISION))
    mn = np.minimum(np.minimum(is_e, ws_e), os_e)
    if inner == "auto":
        use_is, use_os = is_e == mn, (os_e == mn) & (is_e != mn)
    else:
        use_is = np.full(T, inner == "is")
        use_os = np.full(T, inner == "os")
    use_ws = ~use_is & ~use_os
    ntot = num.prod(axis=0)
    X = ntot * kw * kh * ic * oh * ow * b
    Y = ntot * oc * oh * ow * b
    Z = ntot * kw * kh * ic * oc
    act_rd = np.where(use_is, X * iprec, np.where(use_os, Y * kw * kh * ic * iprec, Z * b * ow * oh * iprec))
    out_rw = np.where(use_is, X * oc * OPRECISION, np.where(use_os, Y * OPRECISION, Z * b * ow * oh * OPRECISION))
    wgt_rd = np.where(use_is, X * oc * wprec, np.where(use_os, Y * kw * kh * ic * wprec, Z * wprec))
    sram_out_rd = writes["out"] + out_rw        # stats.reads['out'] = DRAM-side reads + inner reads
    sram_out_wr = writes["out"] + out_rw        # stats.writes['out'] likewise

    initial = maxw["wgt"] + maxw["act"] + maxw["out"]
    final = maxw["out"]
    latency = _cdiv(initial, ifw) + _cdiv(final, ifw)
    middle = dram_rd + dram_wr - initial - final
    if im2col:
        per_tile = b * oh * ow * _cdiv(oc, M) * _cdiv(kw * kh * ic, NPF)
    else:
        per_tile = b * _cdiv(oc, M) * ow * oh * kw * kh * _cdiv(ic, NPF)
    compute = np.broadcast_to(ntot * per_tile * tm, (P, T))
    mem = _cdiv(middle, ifw)
    stall = np.maximum(0, mem - compute) + latency
    total = compute + stall

    e_buf = (wgt_rd * e_wr + writes["wgt"] * e_ww + act_rd * e_ir + writes["act"] * e_iw
             + sram_out_rd * e_or + sram_out_wr * e_ow)
    e_comp = compute * e_core
    e_dr = (dram_rd + dram_wr) * e_dram
    energy = e_comp + e_buf + e_dr

    cyc = total.ravel()
    en = energy.ravel()
    best = int(np.lexsort((en, cyc))[0])
    p, t = divmod(best, T)
    return {
        "cycles": int(total[p, t]), "stall": int(stall[p, t]), "compute": int(compute[p, t]),
        "dram_rd": int(dram_rd[p, t]), "dram_wr": int(dram_wr[p, t]),
        "e_compute": float(e_comp[p, t]), "e_buffer": float(e_buf[p, t]), "e_dram": float(e_dr[p, t]),
        "wbuf_rd": int(wgt_rd[t]), "wbuf_wr": int(writes["wgt"][p, t]), "ibuf_rd": int(act_rd[t]),
        "ibuf_wr": int(writes["act"][p, t]), "obuf_rd": int(sram_out_rd[p, t]), "obuf_wr": int(sram_out_wr[p, t]),
        "order": tuple(_LOOPS[i] for i in _ORDERS[p]),
        "tiling": {"b": int(b[t]), "ow": int(ow[t]), "oh": int(oh[t]), "ic": int(ic[t]), "oc": int(oc[t])},
    }


class BitFusion:
    """Bit-Fusion cost model. `config` picks a preset of bitfusion.json (default: the Eyeriss-comparison chip)."""

    name = "bitfusion"

    def __init__(self, config: str | None = None, **overrides):
        p = load_params(PARAMS_FILE, config, overrides)
        self.p = p
        self.freq_hz = float(p["frequency_hz"])
        self.static_power_w = float(p["static_power_w"])
        self.inner = p["inner_dataflow"]
        if self.inner not in ("auto", "os", "is", "ws"):
            raise ValueError(f"inner_dataflow must be auto|os|is|ws, not {self.inner!r}")

    def conv_cost(self, op: ConvOp) -> Cost:
        p = self.p
        r = _search(p["rows_N"], p["cols_M"], p["pmax_bits"], p["pmin_bits"], p["wbuf_bytes"], p["ibuf_bytes"],
                    p["obuf_bytes"], p["dram_bits_per_cycle"], p["core_pj_per_cycle"],
                    p["wbuf_rd_pj_per_bit"], p["wbuf_wr_pj_per_bit"], p["ibuf_rd_pj_per_bit"],
                    p["ibuf_wr_pj_per_bit"], p["obuf_rd_pj_per_bit"], p["obuf_wr_pj_per_bit"],
                    p["dram_pj_per_bit"], self.inner, op.kh, op.kw, op.oh, op.ow, op.stride, op.ic, op.oc,
                    op.batch, int(op.a_bits), int(op.b_bits), bool(op.im2col))
        n = op.repeat
        lat = r["cycles"] / self.freq_hz
        e = {k: 0.0 for k in LEVELS}
        e["compute"], e["buffer"], e["dram"] = r["e_compute"], r["e_buffer"], r["e_dram"]
        e["static"] = self.static_power_w * lat * 1e12
        det = {k: r[k] for k in ("compute", "dram_rd", "dram_wr", "wbuf_rd", "wbuf_wr", "ibuf_rd", "ibuf_wr",
                                 "obuf_rd", "obuf_wr")}
        c = Cost(cycles=r["cycles"], stall_cycles=r["stall"], latency_s=lat, macs=op.macs / n, energy_pj=e,
                 detail=det)
        return c.scaled(n) if n != 1 else c

    def search(self, op: ConvOp) -> dict:
        """The raw result of the tiling search (tiling, loop order, access counts) for one call."""
        p = self.p
        return _search(p["rows_N"], p["cols_M"], p["pmax_bits"], p["pmin_bits"], p["wbuf_bytes"], p["ibuf_bytes"],
                       p["obuf_bytes"], p["dram_bits_per_cycle"], p["core_pj_per_cycle"],
                       p["wbuf_rd_pj_per_bit"], p["wbuf_wr_pj_per_bit"], p["ibuf_rd_pj_per_bit"],
                       p["ibuf_wr_pj_per_bit"], p["obuf_rd_pj_per_bit"], p["obuf_wr_pj_per_bit"],
                       p["dram_pj_per_bit"], self.inner, op.kh, op.kw, op.oh, op.ow, op.stride, op.ic, op.oc,
                       op.batch, int(op.a_bits), int(op.b_bits), bool(op.im2col))

    def mem_cost(self, op: MemOp) -> Cost:
        p = self.p
        return mem_cost_generic(op, freq_hz=self.freq_hz, dram_bits_per_cycle=p["dram_bits_per_cycle"],
                                dram_pj_per_bit=p["dram_pj_per_bit"], static_power_w=self.static_power_w)
