"""Eyeriss (Chen et al., ISCA'16/ISSCC'16) as nn_dataflow models it: row-stationary mapping + loop blocking.

Port of stanford-mast/nn_dataflow@198a527 (spec hwmodels.md §2.3) for one node without partitioning:
`MapStrategyEyeriss._repl_fold/_calc_unitpass/_gen_repl` (logical PE set R x P, folding, replication, unit
pass) and `LoopBlockingScheme` (three blocking levels over the IFM/OFM/BAT loops, two loop orders, buffer
capacity checks, the `_set_fetch` re-fetch rule with 2f-1 for partial sums, REGF = 1/1/2 accesses per MAC).
The exhaustive blocking search is vectorized with numpy and cached per unique layer shape. DRAM bandwidth and
the array bus are infinite as in nn_dataflow's tests, so time = unit time x loop count.

Precision: the datapath is 16-bit fixed point, so fewer bits give no gain. Wider operands (FP32) run as
bit-sliced multi-pass: cycles and MAC/RF energy x ceil(a/16)*ceil(b/16), each tensor's traffic x ceil(bits/16)
(spec §2.4 [assume]).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import permutations

import numpy as np

from .base import LEVELS, ConvOp, Cost, MemOp, load_params, mem_cost_generic

PARAMS_FILE = "eyeriss.json"

IFM_L, OFM_L, BAT_L = 0, 1, 2                 # loops
FIL, IFM, OFM = 0, 1, 2                       # data categories
DATA_LOOPS = {FIL: (IFM_L, OFM_L), IFM: (IFM_L, BAT_L), OFM: (OFM_L, BAT_L)}
_ORDERS = list(permutations(range(3)))        # bl_ord[loop] = position, smaller = inner


def _cdiv(a, b):
    return -(-a // b)


@lru_cache(maxsize=4096)
def _factorizations(n: int) -> np.ndarray:
    """All ordered triples (t0, t1, t2) with t0*t1*t2 == n."""
    divs = [d for d in range(1, n + 1) if n % d == 0] if n <= 4096 else _divisors(n)
    out = []
    for a in divs:
        m = n // a
        for b in divs:
            if b > m:
                break
            if m % b == 0:
                out.append((a, b, m // b))
    return np.array(out, dtype=np.int64)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def repl_fold(lpe_h: int, lpe_w: int, arr_h: int, arr_w: int):
    """`MapStrategyEyeriss._repl_fold`: fold a logical PE set that is too big, replicate one that is small."""
    fold_w = repl_w = fold_h = repl_h = 1
    if lpe_h > arr_h:
        fold_h = _cdiv(lpe_h, arr_h)
    else:
        repl_h = arr_h // lpe_h
    if lpe_w > arr_w:
        fold_w = _cdiv(lpe_w, arr_w)
    else:
        repl_w = arr_w // lpe_w
    f_w2h = min(repl_h, fold_w)
    fold_w = _cdiv(fold_w, f_w2h)
    repl_h = repl_h // f_w2h
    return (fold_h, fold_w), (repl_h, repl_w)


def _factor_pairs(n: int):
    return [(a, n // a) for a in range(1, n + 1) if n % a == 0]


@lru_cache(maxsize=16384)
def rs_layer(C, K, P, Q, R, S, stride, N, arr_h, arr_w, gbuf_words, regf_words, c_mac, c_dram, c_gbuf, c_itcn,
             c_regf) -> dict:
    """Best (min energy) row-stationary schedule of one conv layer; accesses in 16-bit words."""
    (fold_h, fold_w), (repl_h, repl_w) = repl_fold(R, P, arr_h, arr_w)
    util = (R * P * repl_h * repl_w) / (arr_h * arr_w * fold_h * fold_w)
    flpe = _cdiv(R, fold_h) * _cdiv(P, fold_w)
    hofm_acc = P / fold_w
    wifm = (Q - 1) * stride + S
    hifm_acc = (hofm_acc - 1) * stride + R
    ops_u = R * S * hofm_acc * Q
    time_u = fold_h * S * Q
    acc = {"dram": [R * S, hifm_acc * wifm, hofm_acc * Q]}
    acc["gbuf"] = [R * S, acc["dram"][1] * fold_h, acc["dram"][2] * fold_h]
    acc["itcn"] = [S * flpe * fold_h, wifm * flpe * fold_h, Q * flpe * fold_h]
    hofm_b = _cdiv(P, fold_w)
    sz_gbuf_u = [R * S, ((hofm_b - 1) * stride + R) * wifm, hofm_b * Q]
    sz_regf = np.array([S, S, 1], dtype=np.float64)

    best = None
    min_cnt = float("inf")
    for t0, t1 in _factor_pairs(repl_h):          # `_gen_repl`: repl.h split over ifmaps / ofmaps
        ifms = min(t0, C)
        ofms = min(t1 * repl_w, K)
        lcnt = (_cdiv(C, ifms), _cdiv(K, ofms), N * fold_w)
        cnt = lcnt[0] * lcnt[1] * lcnt[2]
        if cnt < min_cnt:
            min_cnt = cnt
        elif cnt > min_cnt:
            continue
        locc = (C / ifms / lcnt[0], K / ofms / lcnt[1], 1.0)
        rsz = ifms * ofms
        rcnt = [ifms * ofms, ifms, ofms]
        aocc = [locc[0] * locc[1], locc[0], locc[1]]
        uacc = {m: [acc[m][d] * rcnt[d] * aocc[d] for d in range(3)] for m in ("dram", "gbuf")}
        uacc["itcn"] = [acc["itcn"][d] * rsz * aocc[d] for d in range(3)]
        uops = ops_u * rsz * locc[0] * locc[1]
        usize_gbuf = np.array([sz_gbuf_u[d] * rcnt[d] for d in range(3)], dtype=np.float64)
        tot = {m: np.array([uacc[m][d] * np.prod([lcnt[l] for l in DATA_LOOPS[d]]) for d in range(3)])
               for m in uacc}
        r = _blocking(lcnt, usize_gbuf, sz_regf, gbuf_words, regf_words, tot["dram"] * c_dram,
                      tot["gbuf"] * c_gbuf + tot["itcn"] * c_itcn)
        if r is None:
            continue
        fg, fr = r
        dram = fg * tot["dram"]
        gbuf = fr * tot["gbuf"]
        itcn = fr * tot["itcn"]
        lc = lcnt[0] * lcnt[1] * lcnt[2]
        ops = uops * lc
        regf = np.array([uops * lc, uops * lc, 2 * uops * lc])
        energy = ops * c_mac + regf.sum() * c_regf + dram.sum() * c_dram + gbuf.sum() * c_gbuf + itcn.sum() * c_itcn
        if best is None or energy < best["energy"]:
            best = {"energy": float(energy), "cycles": int(time_u * lc), "ops": float(ops), "util": util,
                    "dram": dram.tolist(), "gbuf": gbuf.tolist(), "itcn": itcn.tolist(),
                    "regf": regf.tolist(), "lcnt": lcnt, "fold": (fold_h, fold_w), "repl": (repl_h, repl_w)}
    if best is None:
        raise ValueError("no loop blocking fits the buffers")
    return best


def _blocking(lcnt, usize_gbuf, usize_regf, gbuf_words, regf_words, w_dram, w_regf_fetch):
    """Min-energy blocking x loop orders; returns its fetch counts at the GBUF and REGF levels ([3] each).

    bl_ts[level][loop], levels 0 (outside GBUF), 1 (GBUF), 2 (REGF); fetch rule of `LoopBlockingScheme._set_fetch`.
    Energy of the data movement = sum_d fetch_gbuf[d] * w_dram[d] + fetch_regf[d] * w_regf_fetch[d].
    """
    F = [_factorizations(int(n)) for n in lcnt]
    # REGF capacity depends on level-2 factors only: prune per loop pair before the full product
    idx = np.stack(np.meshgrid(*[np.arange(len(f)) for f in F], indexing="ij"), -1).reshape(-1, 3)
    t2 = np.stack([F[l][idx[:, l], 2] for l in range(3)], axis=1)

    def data_cnt(b):
        return np.stack([b[:, IFM_L] * b[:, OFM_L], b[:, IFM_L] * b[:, BAT_L], b[:, OFM_L] * b[:, BAT_L]], 1)

    ok = (data_cnt(t2) * usize_regf).sum(1) <= regf_words
    idx = idx[ok]
    t = np.stack([F[l][idx[:, l]] for l in range(3)], axis=1)      # [M, loop, level]
    ok = (data_cnt(t[:, :, 1] * t[:, :, 2]) * usize_gbuf).sum(1) <= gbuf_words
    t = t[ok]
    if len(t) == 0:
        return None
    fgs = [_fetch_level(t, 0, o0) for o0 in _ORDERS]                # (fetch, trivial) per GBUF-level order
    frs = [_fetch_level(t, 1, o1) for o1 in _ORDERS]
    best = None
    for fg, _ in fgs:
        eg = fg @ w_dram
        for fr_raw, triv in frs:
            fr = np.where(triv, fg, fr_raw)
            e = eg + fr @ w_regf_fetch
            i = int(np.argmin(e))
            if best is None or e[i] < best[0]:
                best = (float(e[i]), fg[i], fr[i])
    return best[1], best[2]


def _fetch_level(t, bl, order):
    """Fetch counts at blocking level `bl` for every candidate `t` ([M, loop, level]) under loop `order`,
    and the mask of data whose dimension loops are all trivial at this level (they inherit the outer fetch)."""
    M = len(t)
    out = np.empty((M, 3))
    trivial = np.empty((M, 3), bool)
    above = np.prod(t[:, :, :bl], axis=2) if bl > 0 else np.ones((M, 3), np.int64)   # levels < bl
    incl = above * t[:, :, bl]                                                          # levels <= bl
    lvl = t[:, :, bl]
    for d, dims in DATA_LOOPS.items():
        (other,) = [l for l in range(3) if l not in dims]
        l_in, l_out = sorted(dims, key=lambda l: order[l])          # inner first
        has_in, has_out = lvl[:, l_in] > 1, lvl[:, l_out] > 1
        innt_pos = np.where(has_in, order[l_in], np.where(has_out, order[l_out], -1))
        f = np.where(order[other] > innt_pos, incl[:, other], above[:, other]).astype(np.float64)
        if d == OFM:
            f = 2 * f - 1
        trivial[:, d] = ~(has_in | has_out)
        out[:, d] = np.where(trivial[:, d], 1.0, f)
    return out, trivial


class Eyeriss:
    """Eyeriss cost model; `config` picks a preset of eyeriss.json (isca16 / isscc16 / bitfusion_isca18)."""

    name = "eyeriss"

    def __init__(self, config: str | None = None, **overrides):
        p = load_params(PARAMS_FILE, config, overrides)
        self.p = p
        self.freq_hz = float(p["frequency_hz"])
        self.static_power_w = float(p["static_power_w"])
        self.word = int(p["word_bits"])
        u = float(p["unit_pj"])
        self.costs = (p["mac_cost"] * u, p["dram_cost"] * u * p["dram_scale"], p["gbuf_cost"] * u,
                      p["itcn_cost"] * u, p["regf_cost"] * u)

    def layer(self, op: ConvOp) -> dict:
        """The raw row-stationary schedule (16-bit words, costs in pJ) of one call, before precision passes."""
        p = self.p
        c_mac, c_dram, c_gbuf, c_itcn, c_regf = self.costs
        return rs_layer(op.ic, op.oc, op.oh, op.ow, op.kh, op.kw, op.stride, op.batch, p["array_h"],
                        p["array_w"], p["gbuf_words"], p["regf_words"], c_mac, c_dram, c_gbuf, c_itcn, c_regf)

    def conv_cost(self, op: ConvOp) -> Cost:
        r = self.layer(op)
        w = self.word
        pa, pb = _cdiv(int(op.a_bits), w), _cdiv(int(op.b_bits), w)
        passes = pa * pb
        scale = np.array([pb, pa, max(pa, pb)], dtype=np.float64)   # FIL, IFM, OFM words per element
        c_mac, c_dram, c_gbuf, c_itcn, c_regf = self.costs
        cycles = r["cycles"] * passes
        lat = cycles / self.freq_hz
        dram = float(np.dot(r["dram"], scale))
        gbuf = float(np.dot(r["gbuf"], scale))
        itcn = float(np.dot(r["itcn"], scale))
        regf = float(sum(r["regf"])) * passes
        e = {k: 0.0 for k in LEVELS}
        e["compute"] = r["ops"] * passes * c_mac
        e["buffer"] = regf * c_regf + itcn * c_itcn + gbuf * c_gbuf
        e["dram"] = dram * c_dram
        e["static"] = self.static_power_w * lat * 1e12
        det = {"dram_words": dram, "gbuf_words": gbuf, "itcn_words": itcn, "regf_words": regf,
               "e_regf": regf * c_regf, "e_itcn": itcn * c_itcn, "e_gbuf": gbuf * c_gbuf}
        c = Cost(cycles=cycles, stall_cycles=0, latency_s=lat, macs=op.macs / op.repeat, energy_pj=e, detail=det)
        return c.scaled(op.repeat) if op.repeat != 1 else c

    def mem_cost(self, op: MemOp) -> Cost:
        p = self.p
        return mem_cost_generic(op, freq_hz=self.freq_hz, dram_bits_per_cycle=p["dram_bits_per_cycle"],
                                dram_pj_per_bit=self.costs[1] / self.word, static_power_w=self.static_power_w)
