/* fracgraph's integer convolution: a quantized conv's forward GEMM on 8-bit codes with int32 accumulation.
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_int_gemm_register to add this file's op to the domain "ai.fracgraph":
 *
 *   IntConv(x, x_min, x_scale, w, w_min, w_scale) -> y     attributes kh, kw, sh, sw, ph, pw, dh, dw (group 1)
 *   IntCodesU8(v, min, scale) -> q (uint8)                  codes of a per-tensor fake-quantized tensor
 *   IntCodesS8(v, min, scale) -> q (int8)                   codes - 128; min, scale a scalar or one per last-axis column
 *   IntMatMulRescale(acc, qa, qb, a_min, a_scale, b_min, b_scale) -> y
 *        acc = MatMulInteger(qa, qb) (onnxruntime's integer GEMM, which uses VNNI where the CPU has it); y = the
 *        float product of the fake-quantized operands (below)
 *   IntConvGradW(dy, dy_min, dy_scale, x, x_min, x_scale) -> dw    the weight gradient on the error and
 *        activation codes (both per tensor); attributes those of IntConv (see its section below)
 *   IntMatMul(a, a_min, a_scale, w, w_min, w_scale) -> y = a @ w, IntMatMulGradW(a, a_min, a_scale, g, g_min, g_scale)
 *        -> dw = a^T g: a linear layer's forward and weight-gradient GEMMs, one op each (see their section below;
 *        IntGemm(a, a_min, a_scale, w, w_min, w_scale, bias) -> y = a @ w^T + bias (attribute trans_b = 1; 0: a @ w
 *        + bias), the forward of a Gemm-form linear layer (torchvision's exports);
 *        IntCodes and IntMatMulRescale are the older form around onnxruntime's MatMulInteger, kept for the probe)
 *
 * x is an activation fake-quantized per tensor (x = s_x q_x + m_x, codes q_x in [0, 255]), w a weight
 * fake-quantized per output channel (w[k] = s_w[k] q_w + m_w[k]); both arrive as the float tensors the fake-quant
 * step computes (the backward reads them too), and the codes are recovered as round((v - m) / s), clamped to
 * [0, 255]. Over the taps inside the image (zero padding is a real 0, not a code):
 *
 *   y[n,k,p] = s_x s_w[k] A + s_x m_w[k] Sx[n,p] + m_x s_w[k] Sw[k,p] + m_x m_w[k] C T[p]
 *
 * with A = sum q_x q_w (exact, int32), Sx = the window sum of q_x, Sw = the sum of q_w over the taps that fall
 * inside the image at p, T = the number of such taps. The integer sum runs with the weights offset to signed
 * bytes (q_w - 128) and the codes unsigned (pads are code 0): acc = A - 128 Sx, A = acc + 128 Sx in int32
 * (exact; rescaling acc and 128 Sx separately would cancel large float terms at few bits), and
 *
 *   y = a_k A + b_k Sx + t[p,k],  a_k = s_x s_w[k],  b_k = s_x m_w[k],
 *       t[p,k] = m_x s_w[k] Sw[k,p] + m_x m_w[k] C T[p]   (per call; the rescale runs in double, rounded once)
 *
 * Four paths for the integer sum, picked at run time by FRACGRAPH_INT_ISA (auto | amx | vnni | avx2 | scalar; auto =
 * the best one compiled for this CPU, amx only where Linux grants the tile state; asking for one not compiled, or
 * amx where the permission is refused, fails in one line):
 *   amx    AMX-INT8 tdpbsud on 16 x 16 int32 tiles: 16 output channels x 16 positions x up to 64 input channels
 *          per instruction (the packed codes below are the B operand as they are; see tile_amx);
 *   vnni   AVX-512 VNNI vpdpbusd: 16 output positions x 4 input channels per instruction, a tile of 8 output
 *          channels x 2 segments of 16 positions (16 accumulators);
 *   avx2   vpmaddwd on the codes split into 16-bit pairs: 8 positions x 2 channels (vpmaddubsw would saturate);
 *   scalar plain int32 loops.
 * All four compute the same int32 sums and the same float rescale, so their outputs are bitwise equal. Images are
 * the parallel tasks; each packs its codes 4 channels to a word on the zero-padded image (see IJob). The codes are
 * recovered 16 floats at a time (codes16, AVX-512, masked at a row's end: resnet20's rows are 32, 16 and 8 wide,
 * which the compiler's vectorized loops left mostly to their scalar tails) on every path but scalar, which keeps
 * code_of's loops: the same arithmetic, so the same codes, and the tests compare the paths bitwise.
 */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"   /* the slot table, shared with fused_ops.c */
static const OrtApi* i_api;
#define IAPI(name, type) ((type)i_api->slot[S_##name])

static OrtStatus* ifail(const char* msg) { return IAPI(CreateStatus, CreateStatusFn)(1, msg); }

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_VNNI = 2, ISA_AMX = 3 };
/* the amx path runs a conv on fewer input channels than these on the vnni tiles (the same sums, bitwise): below
 * them the AMX tiles, whose rows (IntConvGradW) or reduction (IntConv, 64 channels) C only partly fills, were not
 * faster (bench/kernel_probes.py --only intdw,intconv --cpu-time --threads 1, resnet20's shapes, three runs on a
 * loaded machine, AMX tiles / vnni tiles: IntConv on 16 channels 1.07-1.17x, on 32 0.80-1.07x, on 64 0.57-0.86x;
 * the 3-channel stems 0.99-1.8x; IntConvGradW on 16-64 channels 0.79-1.09x). FRACGRAPH_AMX_MIN_CHANNELS
 * overrides both (the tests set 1, to run every shape on the tiles). */
#define AMX_MIN_CHANNELS_DW 16
#define AMX_MIN_CHANNELS_FW 32
static int64_t amx_min_channels(int64_t dflt) {
  const char* e = getenv("FRACGRAPH_AMX_MIN_CHANNELS");
  return e && *e ? atoll(e) : dflt;
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define FG_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
/* Linux hands out the AMX tile state only on request, once per process (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XFEATURE_XTILEDATA); a refusal (an old kernel, a VM that hides it) means "no AMX". The request is idempotent, so
 * two threads racing here both get the same answer; the result is stored atomically. */
static int amx_permission(void) {
  static int state = 0;   /* 0 not asked, 1 granted, -1 refused */
  int s = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
  if (!s) {
    s = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
    __atomic_store_n(&state, s, __ATOMIC_RELEASE);
  }
  return s > 0;
}
/* every tile 16 rows x 64 bytes (palette 1); each task loads it on its thread and releases the tiles at its end */
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileCfg;
static void amx_begin(void) {
  TileCfg c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 8; ++i) c.colsb[i] = 64, c.rows[i] = 16;
  _tile_loadconfig(&c);
}
#endif

/* which paths this build has (the library is compiled with -march=native for the machine that runs it); amx also
 * needs the kernel's permission */
int fg_int_isa_available(int isa) {
  if (isa == ISA_SCALAR) return 1;
#if defined(__AVX2__)
  if (isa == ISA_AVX2) return 1;
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (isa == ISA_VNNI) return 1;
#endif
#if defined(FG_AMX)
  if (isa == ISA_AMX) return amx_permission();
#endif
  return 0;
}

/* FRACGRAPH_INT_ISA -> path, or -1 when it names one this build lacks (or an unknown word) */
static int chosen_isa(void) {
  const char* e = getenv("FRACGRAPH_INT_ISA");
  if (!e || !*e || !strcmp(e, "auto"))
    return fg_int_isa_available(ISA_AMX) ? ISA_AMX : fg_int_isa_available(ISA_VNNI) ? ISA_VNNI
         : fg_int_isa_available(ISA_AVX2) ? ISA_AVX2 : ISA_SCALAR;
  int isa = !strcmp(e, "amx") ? ISA_AMX : !strcmp(e, "vnni") ? ISA_VNNI : !strcmp(e, "avx2") ? ISA_AVX2
          : !strcmp(e, "scalar") ? ISA_SCALAR : -1;
  return isa >= 0 && fg_int_isa_available(isa) ? isa : -1;
}

typedef struct {
  int64_t conv[8];   /* kh, kw, sh, sw, ph, pw, dh, dw */
  int64_t trans_b;   /* IntGemm: w is [N, K] (Gemm's transB = 1) */
  int kind;          /* which op (the registration's OP_ enum) */
} IKernel;

#define RB 8       /* output channels per register tile */
#define SLACK 64   /* int32 words past the end of the buffers that a vector may read (masked lanes only) */

/* Layout. Each image's codes are packed 4 channels to an int32 word (byte i = channel 4 c4 + i; channels past C
 * are code 0) on the zero-padded image split into sh x sw phases, phase (r, c) holding the padded pixels
 * (i sh + r, j sw + c) on a grid Hq x Wq: so every tap of a strided or dilated conv reads output positions
 * wo, wo + 1, ... from consecutive words. Output positions go in segments of up to `lanes` along a row; a tile
 * is RB output channels x two segments; vector lanes are positions, the weights are broadcast. */
typedef struct {
  int isa;
  const float* x;
  float* y;
  float mx, inv_sx;
  int64_t N, C, H, W, K, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t C4, Hp, Wp, Hq, Wq, plane, taps, Kb, P, lanes, nseg;
  const int32_t* wpack;    /* vnni, scalar: [Kb/RB][taps][C4][RB] words of 4 signed bytes q_w - 128;
                              avx2: [Kb/RB][taps][C4][2][RB] words of two int16 (channels 0, 2 and 1, 3) */
  const double* a;         /* [Kb]: s_x s_w[k] */
  const double* b;         /* [Kb]: s_x m_w[k] */
  const double* t;         /* [K][P] (+ SLACK): m_x s_w[k] Sw[k,p] + m_x m_w[k] C T[p] */
  const int64_t* toff;     /* [taps]: word offset of each tap in a c4 plane */
  const int64_t* tpix;     /* [taps]: pixel offset of each tap in the padded image */
  const int64_t* col_off;  /* [W]: word offset of input column w in its row of the phase grid */
  const int64_t* seg_in;   /* [nseg]: a segment's first position on the phase grid (ho Wq + wo0) */
  const int64_t* seg_out;  /* [nseg]: its first output position (ho Wo + wo0) */
  const int32_t* seg_n;    /* [nseg]: its length */
  const int32_t* wamx;     /* amx: [Kv/16][taps][nch][16][kc] words of 4 signed bytes q_w - 128 (0 past K and C) */
  int64_t kc, nch, C4r;    /* amx: words of a tile's reduction (min(C4, 16)), chunks of 16 words per tap, planes */
  int failed;              /* an image's scratch could not be allocated */
} IJob;

/* the code of a fake-quantized value v = s q + m: (v - m) / s is q up to a few ulps (far from the 0.5 that would
 * round elsewhere while |m| / s < 2^20), so multiplying by 1 / s is as good as dividing */
static inline int32_t code_of(float v, float m, float inv_s) {
  float u = nearbyintf((v - m) * inv_s);
  return (int32_t)(u < 0.0f ? 0.0f : u > 255.0f ? 255.0f : u);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* The codes of 16 floats at once (IntConv's and IntConvGradW's packing, session 11): code_of's arithmetic lane for
 * lane (v - m, times 1 / s, round to nearest even, clamp to [0, 255]; separate sub and mul as the scalar code under
 * -ffp-contract=off), so the same codes; lanes outside `k` are not read and come out 0. The scalar path
 * (FRACGRAPH_INT_ISA=scalar) keeps code_of's loops, so the tests' bitwise comparison of the paths covers both. */
#define FG_VPACK 1
static inline __mmask16 lanes_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }
static inline __m512i codes16(const float* v, __mmask16 k, __m512 mv, __m512 iv) {
  const __m512 u = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, v), mv), iv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_maskz_cvttps_epi32(k, _mm512_min_ps(_mm512_max_ps(u, _mm512_setzero_ps()), _mm512_set1_ps(255.0f)));
}
#endif

/* rescale one output channel's sums of one segment into y: A = acc + 128 Sx, y = a A + b Sx + t in double (the
 * terms can be far larger than y and cancel; in float that cost ~10x the error of a float conv), rounded once */
static inline void store_plain(const IJob* j, const int32_t* acc, const int32_t* sx, int64_t k, int64_t out, int32_t n, float* y) {
  const double a = j->a[k], b = j->b[k];
  const double* t = j->t + (size_t)k * j->P + out;
  float* yk = y + (size_t)k * j->P + out;
  for (int32_t l = 0; l < n; ++l) yk[l] = (float)(a * (double)(acc[l] + 128 * sx[out + l]) + b * (double)sx[out + l] + t[l]);
}

static void tile_scalar(const IJob* j, const int32_t* xq, const int32_t* sx, int64_t kb, int64_t s0, float* y) {
  int32_t acc[16];
  const int64_t n = j->seg_n[s0], in = j->seg_in[s0];
  for (int r = 0; r < RB; ++r) {
    const int64_t k = kb * RB + r;
    if (k >= j->K) break;
    for (int64_t l = 0; l < n; ++l) {
      int32_t s = 0;
      for (int64_t tap = 0; tap < j->taps; ++tap)
        for (int64_t c4 = 0; c4 < j->C4; ++c4) {
          const uint32_t xw = (uint32_t)xq[c4 * j->plane + j->toff[tap] + in + l];
          const uint32_t ww = (uint32_t)j->wpack[((kb * j->taps + tap) * j->C4 + c4) * RB + r];
          for (int i = 0; i < 4; ++i) s += (int32_t)((xw >> (8 * i)) & 0xFF) * (int32_t)(int8_t)((ww >> (8 * i)) & 0xFF);
        }
      acc[l] = s;
    }
    store_plain(j, acc, sx, k, j->seg_out[s0], (int32_t)n, y);
  }
}

#if defined(__AVX2__)
/* one segment of up to 8 positions x RB channels: x words split into 16-bit (c0, c2) and (c1, c3), vpmaddwd */
static void tile_avx2(const IJob* j, const int32_t* xq, const int32_t* sx, int64_t kb, int64_t s0, float* y) {
  __m256i acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_si256();
  const __m256i lo8 = _mm256_set1_epi32(0x00FF00FF);
  const int64_t in = j->seg_in[s0];
  for (int64_t tap = 0; tap < j->taps; ++tap) {
    const int32_t* xt = xq + j->toff[tap] + in;
    const int32_t* w = j->wpack + (kb * j->taps + tap) * j->C4 * 2 * RB;
    for (int64_t c4 = 0; c4 < j->C4; ++c4, w += 2 * RB) {
      const __m256i xv = _mm256_loadu_si256((const __m256i*)(xt + c4 * j->plane));
      const __m256i x02 = _mm256_and_si256(xv, lo8), x13 = _mm256_and_si256(_mm256_srli_epi32(xv, 8), lo8);
      for (int r = 0; r < RB; ++r)
        acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(_mm256_madd_epi16(x02, _mm256_set1_epi32(w[r])),
                                                           _mm256_madd_epi16(x13, _mm256_set1_epi32(w[RB + r]))));
    }
  }
  int32_t tmp[8];
  for (int r = 0; r < RB; ++r) {
    const int64_t k = kb * RB + r;
    if (k >= j->K) break;
    _mm256_storeu_si256((__m256i*)tmp, acc[r]);
    store_plain(j, tmp, sx, k, j->seg_out[s0], j->seg_n[s0], y);
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* one output channel k's row of up to 16 positions from `out` (mask m): A = acc + 128 Sx in int32, then
 * y = a_k A + b_k Sx + t in double, rounded once (store_plain's arithmetic, 16 lanes); the vnni and amx tiles */
static inline void store_row16(const IJob* j, __m512i acc, __m512i sx128, __m512d sx_lo, __m512d sx_hi, int64_t k,
                               int64_t out, __mmask16 m, float* y) {
  const __mmask8 m_lo = (__mmask8)(m & 0xFF), m_hi = (__mmask8)(m >> 8);
  const __m512i Ai = _mm512_add_epi32(acc, sx128);
  const __m512d av = _mm512_set1_pd(j->a[k]), bv = _mm512_set1_pd(j->b[k]);
  const double* t = j->t + (size_t)k * j->P + out;
  const __m512d lo = _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(av, _mm512_cvtepi32_pd(_mm512_castsi512_si256(Ai))),
                                                 _mm512_mul_pd(bv, sx_lo)), _mm512_maskz_loadu_pd(m_lo, t));
  const __m512d hi = _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(av, _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(Ai, 1))),
                                                 _mm512_mul_pd(bv, sx_hi)), _mm512_maskz_loadu_pd(m_hi, t + 8));
  const __m512 v = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
  _mm512_mask_storeu_ps(y + (size_t)k * j->P + out, m, v);
}

/* two segments of up to 16 positions x RB channels: 16 accumulators, one vpdpbusd per (channel, segment, c4, tap) */
static void tile_vnni(const IJob* j, const int32_t* xq, const int32_t* sx, int64_t kb, int64_t s0, int64_t s1, float* y) {
  __m512i a0[RB], a1[RB];
  for (int r = 0; r < RB; ++r) a0[r] = a1[r] = _mm512_setzero_si512();
  const int64_t in0 = j->seg_in[s0], in1 = j->seg_in[s1];
  for (int64_t tap = 0; tap < j->taps; ++tap) {
    const int32_t* x0 = xq + j->toff[tap] + in0;
    const int32_t* x1 = xq + j->toff[tap] + in1;
    const int32_t* w = j->wpack + (kb * j->taps + tap) * j->C4 * RB;
    for (int64_t c4 = 0; c4 < j->C4; ++c4, w += RB) {
      const __m512i v0 = _mm512_loadu_si512((const void*)(x0 + c4 * j->plane));
      const __m512i v1 = _mm512_loadu_si512((const void*)(x1 + c4 * j->plane));
      for (int r = 0; r < RB; ++r) {
        const __m512i wv = _mm512_set1_epi32(w[r]);
        a0[r] = _mm512_dpbusd_epi32(a0[r], v0, wv);
        a1[r] = _mm512_dpbusd_epi32(a1[r], v1, wv);
      }
    }
  }
  const int64_t segs[2] = {s0, s1};
  for (int h = 0; h < (s1 == s0 ? 1 : 2); ++h) {
    const int64_t out = j->seg_out[segs[h]];
    const __mmask16 m = (__mmask16)((1u << j->seg_n[segs[h]]) - 1u);
    const __m512i sxi = _mm512_maskz_loadu_epi32(m, sx + out);
    const __m512d sx_lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(sxi));
    const __m512d sx_hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(sxi, 1));
    const __m512i sx128 = _mm512_slli_epi32(sxi, 7);
    for (int r = 0; r < RB; ++r) {
      const int64_t k = kb * RB + r;
      if (k >= j->K) break;
      store_row16(j, h ? a1[r] : a0[r], sx128, sx_lo, sx_hi, k, out, m, y);
    }
  }
}
#endif

#if defined(FG_AMX)
/* AMX, transposed: C[k, p] += sum A[k, 4 c4 + i] B[c4, 4 p + i] on 16 x 16 int32 tiles (rows 16 output channels,
 * columns 16 positions of a segment), tdpbsud (signed weights, unsigned codes). A: the weights of one tap and
 * chunk, 16 channels x kc words (wamx); B: kc words c4 of the packed image from the tap's offset, 16 consecutive
 * positions each (the other paths' packing, rows a plane apart). Tiles: accumulators 0-3, A 4-5 (16 rows x 4 kc
 * bytes), B 6-7 (kc rows x 64 bytes): 2 channel blocks x 2 segments, or 1 x up to 4. The rescale is the vnni
 * path's, lane for lane, so the output is bitwise the other paths'. */
static void amx_begin_fw(int64_t kc) {
  TileCfg c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 4; ++i) c.colsb[i] = 64, c.rows[i] = 16;
  for (int i = 4; i < 6; ++i) c.colsb[i] = (uint16_t)(4 * kc), c.rows[i] = 16;
  for (int i = 6; i < 8; ++i) c.colsb[i] = 64, c.rows[i] = (uint8_t)kc;
  _tile_loadconfig(&c);
}

static void tile_amx(const IJob* j, const int32_t* xq, const int32_t* sx, int64_t kb0, int nk, const int64_t* segs,
                     int ns, float* y) {
  const int64_t kc = j->kc, nch = j->nch, blk = 16 * kc, kstride = j->taps * nch * blk;
  const size_t as = (size_t)kc * 4, bs = (size_t)j->plane * 4;
  int64_t in[4];
  for (int h = 0; h < ns; ++h) in[h] = j->seg_in[segs[h]];
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t tap = 0; tap < j->taps; ++tap)
    for (int64_t ch = 0; ch < nch; ++ch) {
      const int32_t* w0 = j->wamx + ((kb0 * j->taps + tap) * nch + ch) * blk;
      const int32_t* x = xq + ch * 16 * j->plane + j->toff[tap];
      _tile_loadd(4, w0, as);
      _tile_loadd(6, x + in[0], bs);
      _tile_dpbsud(0, 4, 6);
      if (nk == 2) {
        _tile_loadd(5, w0 + kstride, as);
        _tile_dpbsud(2, 5, 6);
        if (ns == 2) {
          _tile_loadd(7, x + in[1], bs);
          _tile_dpbsud(1, 4, 7);
          _tile_dpbsud(3, 5, 7);
        }
      } else {
        if (ns >= 2) { _tile_loadd(7, x + in[1], bs); _tile_dpbsud(1, 4, 7); }
        if (ns >= 3) { _tile_loadd(6, x + in[2], bs); _tile_dpbsud(2, 4, 6); }
        if (ns >= 4) { _tile_loadd(7, x + in[3], bs); _tile_dpbsud(3, 4, 7); }
      }
    }
  int32_t acc[4][256];
  _tile_stored(0, acc[0], 64); _tile_stored(1, acc[1], 64); _tile_stored(2, acc[2], 64); _tile_stored(3, acc[3], 64);
  for (int h = 0; h < ns; ++h) {   /* the vnni path's rescale */
    const int64_t out = j->seg_out[segs[h]];
    const __mmask16 m = (__mmask16)((1u << j->seg_n[segs[h]]) - 1u);
    const __m512i sxi = _mm512_maskz_loadu_epi32(m, sx + out);
    const __m512d sx_lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(sxi));
    const __m512d sx_hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(sxi, 1));
    const __m512i sx128 = _mm512_slli_epi32(sxi, 7);
    for (int kk = 0; kk < nk; ++kk)
      for (int r = 0; r < 16; ++r) {
        const int64_t k = (kb0 + kk) * 16 + r;
        if (k >= j->K) break;
        store_row16(j, _mm512_loadu_si512((const void*)(acc[nk == 2 ? 2 * kk + h : h] + 16 * r)), sx128, sx_lo, sx_hi,
                    k, out, m, y);
      }
  }
}

/* every tile of one image: channel blocks two at a time over segment pairs, an odd last block over up to 4 */
static void amx_image(const IJob* j, const int32_t* xq, const int32_t* sx, float* y) {
  const int64_t nkb = (j->K + 15) / 16, pairs = nkb / 2 * 2;
  int64_t segs[4];
  for (int64_t kb = 0; kb < pairs; kb += 2)
    for (int64_t s0 = 0; s0 < j->nseg; s0 += 2) {
      const int ns = s0 + 1 < j->nseg ? 2 : 1;
      for (int h = 0; h < ns; ++h) segs[h] = s0 + h;
      tile_amx(j, xq, sx, kb, 2, segs, ns, y);
    }
  if (pairs < nkb)
    for (int64_t s0 = 0; s0 < j->nseg; s0 += 4) {
      const int ns = (int)(j->nseg - s0 < 4 ? j->nseg - s0 : 4);
      for (int h = 0; h < ns; ++h) segs[h] = s0 + h;
      tile_amx(j, xq, sx, pairs, 1, segs, ns, y);
    }
}
#endif

/* one image: pack the codes, window sums, every tile, rescale into y[n] (NCHW) */
static void conv_image(void* p, size_t n) {
  const IJob* j = (const IJob*)p;
  const int64_t C = j->C, H = j->H, W = j->W, Hp = j->Hp, Wp = j->Wp, P = j->P;
  const size_t words = (size_t)((j->isa == ISA_AMX ? j->C4r : j->C4) * j->plane) + SLACK;   /* amx: zero planes to a chunk */
  char* buf = (char*)calloc(1, words * 4 + (size_t)(Hp * Wp) * 4 + (size_t)(P + SLACK) * 4 + (size_t)W * 5 * 4);
  if (!buf) { ((IJob*)p)->failed = 1; return; }
  int32_t* xq = (int32_t*)buf;
  int32_t* colsum = xq + words;
  int32_t* sx = colsum + Hp * Wp;
  int32_t* qrow = sx + P + SLACK;   /* a row of words, then (scalar path) 4 rows of codes */
  const float* x = j->x + (size_t)n * C * H * W;
  const float mx = j->mx, inv = j->inv_sx;
  for (int64_t c4 = 0; c4 < j->C4; ++c4)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hp = h + j->ph;
      int32_t* cs = colsum + hp * Wp + j->pw;
      int32_t* plane = xq + c4 * j->plane;
      /* stride 1: the words go straight onto the row; strided: into qrow, then to each column's phase */
      int32_t* dst = j->sh == 1 && j->sw == 1 ? plane + hp * j->Wq + j->pw : qrow;
#if defined(FG_VPACK)
      if (j->isa != ISA_SCALAR) {
        const __m512 mv = _mm512_set1_ps(mx), iv = _mm512_set1_ps(inv);
        for (int64_t w = 0; w < W; w += 16) {
          const __mmask16 k = lanes_mask(W - w);
          __m512i q[4];
          for (int i = 0; i < 4; ++i)
            q[i] = c4 * 4 + i < C ? codes16(x + ((c4 * 4 + i) * H + h) * W + w, k, mv, iv) : _mm512_setzero_si512();
          const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(q[0], q[1]), _mm512_add_epi32(q[2], q[3]));
          _mm512_mask_storeu_epi32(cs + w, k, _mm512_add_epi32(_mm512_maskz_loadu_epi32(k, cs + w), sum));
          const __m512i word = _mm512_or_si512(_mm512_or_si512(q[0], _mm512_slli_epi32(q[1], 8)),
                                               _mm512_or_si512(_mm512_slli_epi32(q[2], 16), _mm512_slli_epi32(q[3], 24)));
          _mm512_mask_storeu_epi32(dst + w, k, word);
        }
      } else
#endif
      {
        int32_t* qc = qrow + W;   /* 4 rows of codes after the row of words */
        for (int i = 0; i < 4; ++i) {
          const int64_t c = c4 * 4 + i;
          int32_t* q = qc + i * W;
          if (c < C) {
            const float* xr = x + (c * H + h) * W;
            for (int64_t w = 0; w < W; ++w) q[w] = code_of(xr[w], mx, inv);
          } else {
            memset(q, 0, (size_t)W * 4);
          }
        }
        for (int64_t w = 0; w < W; ++w) cs[w] += qc[w] + qc[W + w] + qc[2 * W + w] + qc[3 * W + w];
        for (int64_t w = 0; w < W; ++w)
          dst[w] = qc[w] | qc[W + w] << 8 | qc[2 * W + w] << 16 | qc[3 * W + w] << 24;
      }
      if (dst == qrow) {   /* strided: the row's phase and grid row, each column's phase and grid column */
        int32_t* row = plane + (hp % j->sh) * j->sw * j->Hq * j->Wq + (hp / j->sh) * j->Wq;
        for (int64_t w = 0; w < W; ++w) row[j->col_off[w]] = qrow[w];
      }
    }
  /* window sums of the codes (pads are 0), tap by tap over a row of outputs (integers: any order is exact) */
  for (int64_t ho = 0; ho < j->Ho; ++ho) {
    int32_t* s = sx + ho * j->Wo;
    memset(s, 0, (size_t)j->Wo * 4);
    for (int64_t tap = 0; tap < j->taps; ++tap) {
      const int32_t* cs = colsum + ho * j->sh * Wp + j->tpix[tap];
      if (j->sw == 1)
        for (int64_t wo = 0; wo < j->Wo; ++wo) s[wo] += cs[wo];
      else
        for (int64_t wo = 0; wo < j->Wo; ++wo) s[wo] += cs[wo * j->sw];
    }
  }
  float* y = j->y + (size_t)n * j->K * P;
#if defined(FG_AMX)
  if (j->isa == ISA_AMX) {
    amx_begin_fw(j->kc);
    amx_image(j, xq, sx, y);
    _tile_release();
    free(buf);
    return;
  }
#endif
  for (int64_t kb = 0; kb < j->Kb / RB; ++kb)
    for (int64_t s0 = 0; s0 < j->nseg; s0 += (j->isa == ISA_VNNI ? 2 : 1)) {
      switch (j->isa) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
        case ISA_VNNI: tile_vnni(j, xq, sx, kb, s0, s0 + 1 < j->nseg ? s0 + 1 : s0, y); break;
#endif
#if defined(__AVX2__)
        case ISA_AVX2: tile_avx2(j, xq, sx, kb, s0, y); break;
#endif
        default: tile_scalar(j, xq, sx, kb, s0, y); break;
      }
    }
  free(buf);
}

static OrtStatus* in_shape(void* ctx, size_t i, const float** data, int64_t* dims, size_t* rank, size_t* count) {
  const void* v;
  void* info;
  OrtStatus* st;
  if ((st = IAPI(KernelContext_GetInput, GetInputFn)(ctx, i, &v))) return st;
  if ((st = IAPI(GetTensorTypeAndShape, TypeShapeFn)(v, &info))) return st;
  if (!(st = IAPI(GetDimensionsCount, DimCountFn)(info, rank))) {
    if (*rank > 8) st = ifail("fracgraph IntConv: tensors above rank 8 are not supported");
    else if (!(st = IAPI(GetDimensions, DimsFn)(info, dims, *rank)))
      st = IAPI(GetTensorShapeElementCount, ElemCountFn)(info, count);
  }
  IAPI(ReleaseTensorTypeAndShapeInfo, ReleaseFn)(info);
  if (!st) st = IAPI(GetTensorMutableData, GetDataFn)((void*)v, (void**)data);
  return st;
}

static OrtStatus* compute_int_conv(void* kernel, void* ctx) {
  IKernel* kern = (IKernel*)kernel;
  int64_t xd[8], wd[8], d[8];
  size_t xr, wr, r, xn, wn, cnt;
  const float *x, *w, *mxp, *sxp, *mw, *sw;
  OrtStatus* st;
  IJob j;
  memset(&j, 0, sizeof j);
  if ((st = in_shape(ctx, 0, &x, xd, &xr, &xn)) || (st = in_shape(ctx, 3, &w, wd, &wr, &wn))) return st;
  if (xr != 4 || wr != 4 || xd[1] != wd[1]) return ifail("fracgraph IntConv: x must be [N, C, H, W] and w [K, C, kh, kw]");
  if ((st = in_shape(ctx, 1, &mxp, d, &r, &cnt))) return st;
  if (cnt != 1) return ifail("fracgraph IntConv: x_min must be a scalar");
  if ((st = in_shape(ctx, 2, &sxp, d, &r, &cnt))) return st;
  if (cnt != 1) return ifail("fracgraph IntConv: x_scale must be a scalar");
  if ((st = in_shape(ctx, 4, &mw, d, &r, &cnt))) return st;
  if ((int64_t)cnt != wd[0]) return ifail("fracgraph IntConv: w_min must hold one value per output channel");
  if ((st = in_shape(ctx, 5, &sw, d, &r, &cnt))) return st;
  if ((int64_t)cnt != wd[0]) return ifail("fracgraph IntConv: w_scale must hold one value per output channel");
  j.isa = chosen_isa();
  if (j.isa < 0) return ifail("fracgraph IntConv: FRACGRAPH_INT_ISA names a path this CPU's build lacks "
                              "(use auto, amx, vnni, avx2 or scalar; amx needs AMX-INT8 and the kernel's permission, vnni AVX-512 VNNI, avx2 AVX2)");
  j.N = xd[0], j.C = xd[1], j.H = xd[2], j.W = xd[3], j.K = wd[0];
  if (j.isa == ISA_AMX && j.C < amx_min_channels(AMX_MIN_CHANNELS_FW)) j.isa = ISA_VNNI;
  j.kh = kern->conv[0], j.kw = kern->conv[1], j.sh = kern->conv[2], j.sw = kern->conv[3];
  j.ph = kern->conv[4], j.pw = kern->conv[5], j.dh = kern->conv[6], j.dw = kern->conv[7];
  if (wd[2] != j.kh || wd[3] != j.kw || j.sh < 1 || j.sw < 1 || j.dh < 1 || j.dw < 1 || j.ph < 0 || j.pw < 0)
    return ifail("fracgraph IntConv: the weight's shape or the conv attributes do not match");
  j.Ho = (j.H + 2 * j.ph - (j.kh - 1) * j.dh - 1) / j.sh + 1;
  j.Wo = (j.W + 2 * j.pw - (j.kw - 1) * j.dw - 1) / j.sw + 1;
  if (j.Ho < 1 || j.Wo < 1) return ifail("fracgraph IntConv: the output would be empty");
  j.x = x, j.mx = *mxp, j.inv_sx = 1.0f / *sxp;
  j.lanes = j.isa == ISA_AVX2 ? 8 : 16;
  j.Kb = (j.K + RB - 1) / RB * RB;
  j.C4 = (j.C + 3) / 4;
  j.Hp = j.H + 2 * j.ph, j.Wp = j.W + 2 * j.pw;   /* symmetric pads (the pass sends only those) */
  j.Hq = (j.Hp + j.sh - 1) / j.sh, j.Wq = (j.Wp + j.sw - 1) / j.sw;
  j.plane = j.sh * j.sw * j.Hq * j.Wq;
  j.P = j.Ho * j.Wo;
  j.taps = j.kh * j.kw;
  j.nseg = j.Ho * ((j.Wo + j.lanes - 1) / j.lanes);
  j.kc = j.C4 < 16 ? j.C4 : 16;              /* amx: a tile's reduction, in words of 4 channels */
  j.nch = (j.C4 + 15) / 16, j.C4r = j.C4 <= 16 ? j.C4 : j.nch * 16;
  const int64_t nkb16 = (j.K + 15) / 16;
  const int64_t K = j.K, C = j.C, C4 = j.C4, taps = j.taps, P = j.P;
  int32_t* wsum = (int32_t*)calloc((size_t)(K * taps), sizeof(int32_t));
  double* a = (double*)calloc((size_t)j.Kb, sizeof(double));
  double* b = (double*)calloc((size_t)j.Kb, sizeof(double));
  double* t = (double*)calloc((size_t)(K * P + SLACK), sizeof(double));
  int64_t* toff = (int64_t*)malloc((size_t)taps * sizeof(int64_t));
  int64_t* tpix = (int64_t*)malloc((size_t)taps * sizeof(int64_t));
  int64_t* seg_in = (int64_t*)malloc((size_t)j.nseg * sizeof(int64_t));
  int64_t* seg_out = (int64_t*)malloc((size_t)j.nseg * sizeof(int64_t));
  int32_t* seg_n = (int32_t*)malloc((size_t)j.nseg * sizeof(int32_t));
  int32_t* wpack = (int32_t*)calloc((size_t)(j.Kb * taps * C4 * 2), sizeof(int32_t));
  int64_t* col_off = (int64_t*)malloc((size_t)j.W * sizeof(int64_t));
  int32_t* wamx = j.isa == ISA_AMX ? (int32_t*)calloc((size_t)(nkb16 * taps * j.nch * 16 * j.kc), sizeof(int32_t)) : NULL;
  void* yv;
  int64_t yd[4] = {j.N, K, j.Ho, j.Wo};
  st = NULL;
  if (!wsum || !a || !b || !t || !toff || !tpix || !seg_in || !seg_out || !seg_n || !wpack || !col_off ||
      (j.isa == ISA_AMX && !wamx)) {
    st = ifail("fracgraph IntConv: out of memory");
    goto done;
  }
  /* weight codes: packed, their per-(k, tap) sums, the per-channel coefficients */
  for (int64_t k = 0; k < K; ++k) {
    const float inv_w = 1.0f / sw[k];
    for (int64_t c = 0; c < C; ++c)
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int32_t q = code_of(w[(k * C + c) * taps + tap], mw[k], inv_w);
        wsum[k * taps + tap] += q;
        const int32_t sq = q - 128;
        const int64_t kb = k / RB, rr = k % RB, c4 = c / 4, i = c % 4;
        if (j.isa == ISA_AMX) {
          uint32_t* wd32 = (uint32_t*)&wamx[(((k / 16) * taps + tap) * j.nch + c4 / 16) * 16 * j.kc + (k % 16) * j.kc + c4 % 16];
          *wd32 |= ((uint32_t)(uint8_t)(int8_t)sq) << (8 * i);
        } else if (j.isa == ISA_AVX2) {   /* word h = i % 2 (channels 0, 2 | 1, 3), half = i / 2 */
          uint32_t* wd32 = (uint32_t*)&wpack[(((kb * taps + tap) * C4 + c4) * 2 + i % 2) * RB + rr];
          *wd32 |= ((uint32_t)(uint16_t)(int16_t)sq) << (16 * (i / 2));
        } else {
          uint32_t* wd32 = (uint32_t*)&wpack[((kb * taps + tap) * C4 + c4) * RB + rr];
          *wd32 |= ((uint32_t)(uint8_t)(int8_t)sq) << (8 * i);
        }
      }
    a[k] = (double)*sxp * sw[k];
    b[k] = (double)*sxp * mw[k];
  }
  for (int64_t ta = 0; ta < j.kh; ++ta)
    for (int64_t tb = 0; tb < j.kw; ++tb) {
      const int64_t rr = ta * j.dh, cc = tb * j.dw;
      toff[ta * j.kw + tb] = ((rr % j.sh) * j.sw + cc % j.sw) * j.Hq * j.Wq + (rr / j.sh) * j.Wq + cc / j.sw;
      tpix[ta * j.kw + tb] = rr * j.Wp + cc;
    }
  for (int64_t wi = 0; wi < j.W; ++wi)
    col_off[wi] = ((wi + j.pw) % j.sw) * j.Hq * j.Wq + (wi + j.pw) / j.sw;
  int64_t ns = 0;
  for (int64_t ho = 0; ho < j.Ho; ++ho)
    for (int64_t wo = 0; wo < j.Wo; wo += j.lanes, ++ns) {
      seg_in[ns] = ho * j.Wq + wo;
      seg_out[ns] = ho * j.Wo + wo;
      seg_n[ns] = (int32_t)(j.Wo - wo < j.lanes ? j.Wo - wo : j.lanes);
    }
  for (int64_t ho = 0; ho < j.Ho; ++ho)
    for (int64_t wo = 0; wo < j.Wo; ++wo) {
      const int64_t q = ho * j.Wo + wo;
      /* taps inside the image at this position: Sw[k, p] and C T[p] */
      int64_t inside = 0;
      for (int64_t ta = 0; ta < j.kh; ++ta)
        for (int64_t tb = 0; tb < j.kw; ++tb) {
          const int64_t hi = ho * j.sh - j.ph + ta * j.dh, wi = wo * j.sw - j.pw + tb * j.dw;
          if (hi < 0 || hi >= j.H || wi < 0 || wi >= j.W) continue;
          ++inside;
          for (int64_t k = 0; k < K; ++k) t[k * P + q] += (double)wsum[k * taps + ta * j.kw + tb];
        }
      for (int64_t k = 0; k < K; ++k)
        t[k * P + q] = (double)j.mx * sw[k] * t[k * P + q] + (double)j.mx * mw[k] * (double)(C * inside);
    }
  j.wpack = wpack, j.wamx = wamx, j.a = a, j.b = b, j.t = t, j.toff = toff, j.tpix = tpix;
  j.seg_in = seg_in, j.seg_out = seg_out, j.seg_n = seg_n, j.col_off = col_off;
  if ((st = IAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, yd, 4, &yv))) goto done;
  if ((st = IAPI(GetTensorMutableData, GetDataFn)(yv, (void**)&j.y))) goto done;
  if (j.N == 1) conv_image(&j, 0);
  else st = IAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, conv_image, (size_t)j.N, 0, &j);
  if (!st && j.failed) st = ifail("fracgraph IntConv: out of memory");
done:
  free(wsum); free(a); free(b); free(t); free(toff); free(tpix); free(seg_in); free(seg_out); free(seg_n); free(wpack); free(col_off); free(wamx);
  return st;
}

/* ---- MatMul: codes for onnxruntime's MatMulInteger, and its rescale ------------------------------------------
 * a[m,k] = s_a qa + m_a (per tensor), b[k,n] = s_b[n] qb + m_b[n] (per column, or per tensor), acc = sum_k qa (qb - 128):
 *   y[m,n] = s_a s_b[n] (acc + 128 Ra[m]) + s_a m_b[n] Ra[m] + m_a s_b[n] Cb[n] + K m_a m_b[n]
 * with Ra = the row sums of qa and Cb the column sums of qb (no borders: every product is inside). In double,
 * rounded once, as IntConv. */
typedef struct {
  const float* v;
  void* q;
  const float* mn;
  const float* sc;
  const float* inv;   /* 1 / scale, per column or one */
  size_t n, cols, nmin;
  int sign;
} CJob;

#define CROWS 64   /* rows (of `cols` elements) per parallel task */
static void codes_chunk(void* p, size_t c) {
  const CJob* j = (const CJob*)p;
  const size_t rows = j->n / j->cols, a = c * CROWS, e = a + CROWS < rows ? a + CROWS : rows, cols = j->cols;
  const float* inv = j->inv;
  for (size_t r = a; r < e; ++r) {
    const float* v = j->v + r * cols;
    if (j->nmin == 1) {
      const float m = j->mn[0], is = inv[0];
      if (j->sign) { int8_t* q = (int8_t*)j->q + r * cols; for (size_t i = 0; i < cols; ++i) q[i] = (int8_t)(code_of(v[i], m, is) - 128); }
      else { uint8_t* q = (uint8_t*)j->q + r * cols; for (size_t i = 0; i < cols; ++i) q[i] = (uint8_t)code_of(v[i], m, is); }
    } else {
      const float* m = j->mn;
      if (j->sign) { int8_t* q = (int8_t*)j->q + r * cols; for (size_t i = 0; i < cols; ++i) q[i] = (int8_t)(code_of(v[i], m[i], inv[i]) - 128); }
      else { uint8_t* q = (uint8_t*)j->q + r * cols; for (size_t i = 0; i < cols; ++i) q[i] = (uint8_t)code_of(v[i], m[i], inv[i]); }
    }
  }
}

static OrtStatus* any_input(void* ctx, size_t i, const void** data, int64_t* dims, size_t* rank, size_t* count) {
  return in_shape(ctx, i, (const float**)data, dims, rank, count);
}

static OrtStatus* compute_codes(void* ctx, int sign) {
  int64_t d[8], dm[8];
  size_t r, rm, n, nm, ns;
  CJob j;
  void* out;
  OrtStatus* st;
  memset(&j, 0, sizeof j);
  if ((st = in_shape(ctx, 0, &j.v, d, &r, &n)) || (st = in_shape(ctx, 1, &j.mn, dm, &rm, &nm)) ||
      (st = in_shape(ctx, 2, &j.sc, dm, &rm, &ns))) return st;
  j.cols = r ? (size_t)d[r - 1] : 1;
  if (nm != ns || (nm != 1 && nm != j.cols))
    return ifail("fracgraph IntCodes: min and scale must be scalars or hold one value per last-axis column");
  j.n = n, j.nmin = nm, j.sign = sign;
  if ((st = IAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, d, r, &out))) return st;
  if ((st = IAPI(GetTensorMutableData, GetDataFn)(out, &j.q))) return st;
  if (!n) return NULL;
  float* inv = (float*)malloc(nm * sizeof(float));
  if (!inv) return ifail("fracgraph IntCodes: out of memory");
  for (size_t i = 0; i < nm; ++i) inv[i] = 1.0f / j.sc[i];
  j.inv = inv;
  const size_t chunks = (n / j.cols + CROWS - 1) / CROWS;
  if (chunks <= 1) codes_chunk(&j, 0);
  else st = IAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, codes_chunk, chunks, 0, &j);
  free(inv);
  return st;
}

typedef struct {
  const int32_t* acc;
  const uint8_t* qa;
  const int8_t* qb;
  float* y;
  double ma, sa;
  const float* mb;
  const float* sb;
  int64_t M, K, N, batches, b_batched, nb;
  const double* c1;    /* [N]: s_a s_b[n] */
  const double* c2;    /* [N]: s_a m_b[n] */
  const double* c3;    /* [batches or 1][N]: m_a s_b[n] Cb[n] + K m_a m_b[n] */
} RJob;

static void rescale_row(const RJob* j, size_t row) {
  const int64_t bt = (int64_t)row / j->M, m = (int64_t)row % j->M;
  const uint8_t* qa = j->qa + ((size_t)bt * j->M + m) * j->K;
  int32_t ra = 0;
  for (int64_t k = 0; k < j->K; ++k) ra += qa[k];
  const int32_t* acc = j->acc + ((size_t)bt * j->M + m) * j->N;
  const double* c1 = j->c1;
  const double* c2 = j->c2;
  const double* c3 = j->c3 + (j->b_batched ? (size_t)bt * j->N : 0);
  float* y = j->y + ((size_t)bt * j->M + m) * j->N;
  const int32_t r128 = 128 * ra;
  const double rd = (double)ra;
  for (int64_t n = 0; n < j->N; ++n) y[n] = (float)(c1[n] * (double)(acc[n] + r128) + c2[n] * rd + c3[n]);
}

#define RROWS 64   /* rows per parallel task: a row alone is too little work for a task */
static void rescale_rows(void* p, size_t task) {
  const RJob* j = (const RJob*)p;
  const size_t rows = (size_t)(j->batches * j->M), a = task * RROWS, e = a + RROWS < rows ? a + RROWS : rows;
  for (size_t r = a; r < e; ++r) rescale_row(j, r);
}

static OrtStatus* compute_rescale(void* ctx) {
  int64_t da[8], dq[8], db[8], dd[8];
  size_t ra, rq, rb, r, na, nq, nb, cnt, nsb;
  const void *acc, *qa, *qb;
  const float *ma, *sa;
  RJob j;
  void* out;
  OrtStatus* st;
  memset(&j, 0, sizeof j);
  if ((st = any_input(ctx, 0, &acc, da, &ra, &na)) || (st = any_input(ctx, 1, &qa, dq, &rq, &nq)) ||
      (st = any_input(ctx, 2, &qb, db, &rb, &nb))) return st;
  if ((st = in_shape(ctx, 3, &ma, dd, &r, &cnt)) || cnt != 1) return st ? st : ifail("fracgraph IntMatMulRescale: a_min must be a scalar");
  if ((st = in_shape(ctx, 4, &sa, dd, &r, &cnt)) || cnt != 1) return st ? st : ifail("fracgraph IntMatMulRescale: a_scale must be a scalar");
  if ((st = in_shape(ctx, 5, &j.mb, dd, &r, &cnt))) return st;
  if ((st = in_shape(ctx, 6, &j.sb, dd, &r, &nsb))) return st;
  if (ra < 2 || rq != ra || rb < 2) return ifail("fracgraph IntMatMulRescale: operands must be matrices or batches of them");
  j.M = da[ra - 2], j.N = da[ra - 1], j.K = dq[rq - 1];
  if (dq[rq - 2] != j.M || db[rb - 2] != j.K || db[rb - 1] != j.N)
    return ifail("fracgraph IntMatMulRescale: acc, qa and qb shapes do not agree");
  j.batches = (int64_t)(na / (size_t)(j.M * j.N));
  j.b_batched = rb > 2 && (int64_t)(nb / (size_t)(j.K * j.N)) == j.batches && j.batches > 1;
  if (rb > 2 && !j.b_batched && nb != (size_t)(j.K * j.N))
    return ifail("fracgraph IntMatMulRescale: qb must be one matrix or one per batch of qa");
  if (cnt != nsb || (cnt != 1 && (int64_t)cnt != j.N))
    return ifail("fracgraph IntMatMulRescale: b_min and b_scale must be scalars or one value per column");
  j.nb = (int64_t)cnt;
  j.acc = (const int32_t*)acc, j.qa = (const uint8_t*)qa, j.qb = (const int8_t*)qb;
  j.ma = *ma, j.sa = *sa;
  const int64_t nbm = j.b_batched ? j.batches : 1;
  int32_t* cb = (int32_t*)calloc((size_t)(nbm * j.N), sizeof(int32_t));
  double* coef = (double*)malloc((size_t)((2 + nbm) * j.N) * sizeof(double));
  if (!cb || !coef) { free(cb); free(coef); return ifail("fracgraph IntMatMulRescale: out of memory"); }
  for (int64_t bt = 0; bt < nbm; ++bt)
    for (int64_t k = 0; k < j.K; ++k) {
      const int8_t* row = j.qb + ((size_t)bt * j.K + k) * j.N;
      for (int64_t n = 0; n < j.N; ++n) cb[bt * j.N + n] += (int32_t)row[n] + 128;
    }
  for (int64_t n = 0; n < j.N; ++n) {
    const double sb = j.sb[j.nb == 1 ? 0 : n], mb = j.mb[j.nb == 1 ? 0 : n];
    coef[n] = j.sa * sb;
    coef[j.N + n] = j.sa * mb;
    for (int64_t bt = 0; bt < nbm; ++bt)
      coef[(2 + bt) * j.N + n] = j.ma * sb * (double)cb[bt * j.N + n] + (double)j.K * j.ma * mb;
  }
  j.c1 = coef, j.c2 = coef + j.N, j.c3 = coef + 2 * j.N;
  st = IAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, da, ra, &out);
  if (!st) st = IAPI(GetTensorMutableData, GetDataFn)(out, (void**)&j.y);
  if (!st) {
    const size_t tasks = ((size_t)(j.batches * j.M) + RROWS - 1) / RROWS;
    if (tasks <= 1) rescale_rows(&j, 0);
    else st = IAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, rescale_rows, tasks, 0, &j);
  }
  free(cb);
  free(coef);
  return st;
}

/* ---- IntConvGradW: a quantized conv's weight gradient on codes -----------------------------------------------
 *
 *   IntConvGradW(dy, dy_min, dy_scale, x, x_min, x_scale) -> dw [K, C, kh, kw]
 *        attributes kh, kw, sh, sw, ph, pw (leading pads; the trailing ones follow from dy's shape), dh, dw
 *
 * dy is the error the BW quantizer (stochastic rounding) wrote, per tensor: dy = s_g g + m_g with codes g in
 * [0, 255]; x the activation the FW quantizer wrote, per tensor: x = s_x q + m_x. Both scales lie outside the
 * reduction (over images and positions), so, with zero padding a real 0 (not a code):
 *
 *   dw[k,c,t] = sum_{n,p: tap t of p inside the image} dy[n,k,p] x[n,c,p+t]
 *             = s_g s_x A + s_g m_x G[k,t] + m_g s_x Q[c,t] + m_g m_x T[t]
 *
 * with A = sum g q (exact), G = the sum of g over the positions whose tap t lies inside the image, Q the sum of q
 * over the same (pads are code 0), T their count (times the batch). The integer sum runs on unsigned x codes and
 * signed errors g - 128: acc = A - 128 Q, each image's sum below P 255 128 (int32), int32 over a task's images
 * (at most 2^31 / (P 255 128) of them) and int64 across tasks; the rescale runs in double and rounds once.
 *
 * Layout (no im2col): each image's x codes are bytes on the zero-padded image split into sh x sw phases (as
 * IntConv's words), so that tap t of output position (ho, wo) is byte toff[t] + v of the channel's planes, with v
 * = ho Wq + wo on a "virtual" grid Ho x Wq; the error codes are packed on the same grid, 4 consecutive v to a
 * word, one word per output channel: [V/4][Kv] words, 0 at the grid's columns wo >= Wo (so those positions add
 * nothing whatever x holds there). Vector lanes are 16 output channels (vnni: vpdpbusd with a broadcast word of 4
 * x codes; avx2: 8 channels, vpmaddwd on 16-bit pairs; scalar: loops); a tile is 8 (c, t) rows x 32 channels or
 * 16 rows x 16 channels, accumulated in registers over an image. amx: tdpbusd with A = 16 channels of one tap x 64
 * positions of their planes and B = 16 words of the packed error (its [V4][Kv] layout is tdpbusd's), 16 x 16 int32
 * tiles accumulated over a group of packed images (dw_amx_pass). */
typedef struct {
  int isa;
  const float *dy, *x;
  float mg, inv_sg, mx, inv_sx;
  int64_t N, C, H, W, K, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t Hp, Wp, Hq, Wq, cstride;   /* padded image, phase grid, bytes per channel (planes + slack) */
  int64_t V4, Kv, taps, CT, P;       /* words of the virtual grid, K rounded to 16, taps, C taps, Ho Wo */
  int64_t chunk, tasks;              /* images per task */
  const int64_t* toff;               /* [taps] byte offset of each tap in a channel's planes */
  const int64_t* xoff;               /* [H W] byte offset of each input pixel in a channel's planes */
  int32_t* part;                     /* [tasks][CT][Kv] integer sums */
  int32_t* gsum;                     /* [tasks][K][P] sums of g over the task's images */
  int32_t* xsum;                     /* [tasks][C][cstride] sums of q over the task's images */
  int failed;
} DJob;

#define DW_SLACK 64
/* tasks a call splits the batch into (each with its own integer sums, added at the end): enough to balance a few
 * threads, few enough that the sums' allocation and final addition stay small */
#define DW_TASKS 8

static void dw_tile_scalar(const DJob* j, const uint8_t* xb, const int32_t* gp, int32_t* part, int64_t ct0, int64_t kv0) {
  for (int64_t ct = ct0; ct < ct0 + 8 && ct < j->CT; ++ct) {
    const uint8_t* xr = xb + (ct / j->taps) * j->cstride + j->toff[ct % j->taps];
    for (int64_t k = kv0; k < kv0 + 32 && k < j->Kv; ++k) {
      int32_t s = 0;
      for (int64_t w4 = 0; w4 < j->V4; ++w4) {
        const uint32_t gw = (uint32_t)gp[w4 * j->Kv + k];
        for (int i = 0; i < 4; ++i) s += (int32_t)xr[4 * w4 + i] * (int32_t)(int8_t)((gw >> (8 * i)) & 0xFF);
      }
      part[ct * j->Kv + k] += s;
    }
  }
}

static inline int32_t load_word(const uint8_t* p) {
  int32_t w;
  memcpy(&w, p, 4);
  return w;
}

#if defined(__AVX2__)
/* 8 rows x 32 channels (4 vectors of 8) */
static void dw_tile_avx2(const DJob* j, const uint8_t* xb, const uint8_t* zero, const int32_t* gp, int32_t* part,
                         int64_t ct0, int64_t kv0) {
  enum { R = 8, NV = 4 };
  __m256i acc[R][NV];
  const uint8_t* xr[R];
  const int nv = (int)((j->Kv - kv0) / 8 < NV ? (j->Kv - kv0) / 8 : NV);
  for (int r = 0; r < R; ++r) {
    const int64_t ct = ct0 + r;
    xr[r] = ct < j->CT ? xb + (ct / j->taps) * j->cstride + j->toff[ct % j->taps] : zero;
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_si256();
  }
  const __m256i lo8 = _mm256_set1_epi32(0x00FF00FF);
  for (int64_t w4 = 0; w4 < j->V4; ++w4) {
    __m256i g02[NV], g13[NV];
    for (int v = 0; v < nv; ++v) {
      const __m256i g = _mm256_loadu_si256((const __m256i*)(gp + w4 * j->Kv + kv0 + 8 * v));
      g02[v] = _mm256_srai_epi16(_mm256_slli_epi16(g, 8), 8);
      g13[v] = _mm256_srai_epi16(g, 8);
    }
    for (int r = 0; r < R; ++r) {
      const __m256i xw = _mm256_set1_epi32(load_word(xr[r] + 4 * w4));
      const __m256i x02 = _mm256_and_si256(xw, lo8), x13 = _mm256_and_si256(_mm256_srli_epi32(xw, 8), lo8);
      for (int v = 0; v < nv; ++v)
        acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_add_epi32(_mm256_madd_epi16(x02, g02[v]), _mm256_madd_epi16(x13, g13[v])));
    }
  }
  for (int r = 0; r < R && ct0 + r < j->CT; ++r)
    for (int v = 0; v < nv; ++v) {
      int32_t* p = part + (ct0 + r) * j->Kv + kv0 + 8 * v;
      _mm256_storeu_si256((__m256i*)p, _mm256_add_epi32(_mm256_loadu_si256((const __m256i*)p), acc[r][v]));
    }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* R rows x NV vectors of 16 channels; one vpdpbusd per (row, vector, 4 positions) */
static inline __attribute__((always_inline)) void dw_tile_vnni_t(const DJob* j, const uint8_t* xb, const uint8_t* zero,
                                                                 const int32_t* gp, int32_t* part, int64_t ct0,
                                                                 int64_t kv0, const int R, const int NV) {
  __m512i acc[16][2];
  const uint8_t* xr[16];
  for (int r = 0; r < R; ++r) {
    const int64_t ct = ct0 + r;
    xr[r] = ct < j->CT ? xb + (ct / j->taps) * j->cstride + j->toff[ct % j->taps] : zero;
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
  }
  const int32_t* g = gp + kv0;
  /* 4 steps at a time (V4 is a multiple of 4): the row pointers, more than the free registers, advance once per 4 */
  for (int64_t w4 = 0; w4 < j->V4; w4 += 4, g += 4 * j->Kv) {
    for (int u = 0; u < 4; ++u) {
      __m512i gv[2];
      for (int v = 0; v < NV; ++v) gv[v] = _mm512_loadu_si512((const void*)(g + u * j->Kv + 16 * v));
      for (int r = 0; r < R; ++r) {
        const __m512i xw = _mm512_set1_epi32(load_word(xr[r] + 4 * w4 + 4 * u));
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], xw, gv[v]);
      }
    }
  }
  for (int r = 0; r < R && ct0 + r < j->CT; ++r)
    for (int v = 0; v < NV; ++v) {
      int32_t* p = part + (ct0 + r) * j->Kv + kv0 + 16 * v;
      _mm512_storeu_si512((void*)p, _mm512_add_epi32(_mm512_loadu_si512((const void*)p), acc[r][v]));
    }
}
static void dw_tile_vnni_8x2(const DJob* j, const uint8_t* xb, const uint8_t* z, const int32_t* gp, int32_t* part, int64_t ct0, int64_t kv0) {
  dw_tile_vnni_t(j, xb, z, gp, part, ct0, kv0, 8, 2);
}
static void dw_tile_vnni_16x1(const DJob* j, const uint8_t* xb, const uint8_t* z, const int32_t* gp, int32_t* part, int64_t ct0, int64_t kv0) {
  dw_tile_vnni_t(j, xb, z, gp, part, ct0, kv0, 16, 1);
}
#endif

#if defined(FG_AMX)
/* AMX: C[c, k] += sum_v A[c, v] B[v, k] on 16 x 16 int32 tiles. A (unsigned x codes): 16 channels c0.. of one tap,
 * each row the 64 consecutive bytes (positions) of its channel's planes from the tap's offset, rows cstride apart;
 * B (signed errors): 16 words w4 of the packed error [V4][Kv], each row 16 output channels x 4 positions, Kv words
 * apart (tdpbusd's layout). V4 is a multiple of 16 on this path (the error's extra words are 0). A pass takes up to
 * 2 row blocks x 2 channel blocks (accumulators 0-3, A in 4-5, B in 6-7), or up to 4 row blocks x 1 channel block,
 * the A registers reloaded; the integer sums are exact, so the result is bitwise the other paths'. */
typedef struct { int64_t c0, tap; } DwRows;

/* a group of ng packed images, slot bytes apart (x planes, then the error words at xbytes): the tiles accumulate
 * over all of them (the task's images keep its sums in int32) and are added into part once */
typedef struct { const char* base; size_t slot, xbytes; int64_t ng; } DwGroup;

static void dw_amx_pass(const DJob* j, const DwGroup* g, int32_t* part, const DwRows* rb, int nr, int64_t kv0, int nc) {
  int64_t aoff[4];
  const size_t as = (size_t)j->cstride, bs = (size_t)j->Kv * 4;
  for (int r = 0; r < nr; ++r) aoff[r] = rb[r].c0 * j->cstride + j->toff[rb[r].tap];
  const int64_t steps = j->V4 / 16;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t im = 0; im < g->ng; ++im) {
    const uint8_t* xb = (const uint8_t*)g->base + im * g->slot;
    const int32_t* b = (const int32_t*)(g->base + im * g->slot + g->xbytes) + kv0;
    const uint8_t* a0 = xb + aoff[0];
    const uint8_t* a1 = xb + aoff[nr > 1 ? 1 : 0];
    const uint8_t* a2 = xb + aoff[nr > 2 ? 2 : 0];
    const uint8_t* a3 = xb + aoff[nr > 3 ? 3 : 0];
    for (int64_t s = 0; s < steps; ++s, b += 16 * j->Kv) {
      const int64_t o = 64 * s;
      _tile_loadd(6, b, bs);
      if (nc == 2) {
        _tile_loadd(7, b + 16, bs);
        _tile_loadd(4, a0 + o, as);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        if (nr == 2) {
          _tile_loadd(5, a1 + o, as);
          _tile_dpbusd(2, 5, 6);
          _tile_dpbusd(3, 5, 7);
        }
      } else {
        _tile_loadd(4, a0 + o, as);
        _tile_dpbusd(0, 4, 6);
        if (nr >= 2) { _tile_loadd(5, a1 + o, as); _tile_dpbusd(1, 5, 6); }
        if (nr >= 3) { _tile_loadd(4, a2 + o, as); _tile_dpbusd(2, 4, 6); }
        if (nr >= 4) { _tile_loadd(5, a3 + o, as); _tile_dpbusd(3, 5, 6); }
      }
    }
  }
  int32_t acc[4][256];
  _tile_stored(0, acc[0], 64); _tile_stored(1, acc[1], 64); _tile_stored(2, acc[2], 64); _tile_stored(3, acc[3], 64);
  for (int r = 0; r < nr; ++r)
    for (int cb = 0; cb < nc; ++cb) {
      const int32_t* t = acc[nc == 2 ? 2 * r + cb : r];
      for (int i = 0; i < 16 && rb[r].c0 + i < j->C; ++i) {
        int32_t* p = part + ((rb[r].c0 + i) * j->taps + rb[r].tap) * j->Kv + kv0 + 16 * cb;
        _mm512_storeu_si512((void*)p, _mm512_add_epi32(_mm512_loadu_si512((const void*)p), _mm512_loadu_si512((const void*)(t + 16 * i))));
      }
    }
}

/* a group's sums on AMX: every (16 channels, tap) row block against every 16 output channels */
static void dw_amx_group(const DJob* j, const DwGroup* g, int32_t* part) {
  DwRows rb[4];
  const int64_t nkb = j->Kv / 16, ncb = (j->C + 15) / 16, nrows = ncb * j->taps;
  const int64_t kpairs = nkb / 2 * 2;   /* channel blocks taken two at a time; an odd last one alone */
  for (int64_t r0 = 0; r0 < nrows; r0 += 2) {
    const int nr = r0 + 1 < nrows ? 2 : 1;
    for (int r = 0; r < nr; ++r) rb[r].tap = (r0 + r) / ncb, rb[r].c0 = (r0 + r) % ncb * 16;
    for (int64_t kb = 0; kb < kpairs; kb += 2) dw_amx_pass(j, g, part, rb, nr, 16 * kb, 2);
  }
  if (kpairs < nkb)
    for (int64_t r0 = 0; r0 < nrows; r0 += 4) {
      const int nr = (int)(nrows - r0 < 4 ? nrows - r0 : 4);
      for (int r = 0; r < nr; ++r) rb[r].tap = (r0 + r) / ncb, rb[r].c0 = (r0 + r) % ncb * 16;
      dw_amx_pass(j, g, part, rb, nr, 16 * kpairs, 1);
    }
}
#endif

/* a row of x's codes: bytes into the channel's planes (consecutive when stride 1, else through xoff) and added to
 * the task's code sums; the loops are written for the compiler's vectorizer */
static void x_row_direct(const float* restrict v, int64_t n, float m, float inv, uint8_t* restrict dst,
                         int32_t* restrict sum, int vec) {
#if defined(FG_VPACK)
  if (vec) {
    const __m512 mv = _mm512_set1_ps(m), iv = _mm512_set1_ps(inv);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = lanes_mask(n - i);
      const __m512i q = codes16(v + i, k, mv, iv);
      _mm_mask_storeu_epi8(dst + i, k, _mm512_cvtepi32_epi8(q));
      _mm512_mask_storeu_epi32(sum + i, k, _mm512_add_epi32(_mm512_maskz_loadu_epi32(k, sum + i), q));
    }
    return;
  }
#endif
  (void)vec;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t q = code_of(v[i], m, inv);
    dst[i] = (uint8_t)q;
    sum[i] += q;
  }
}

static void codes_row(const float* restrict v, int64_t n, float m, float inv, int32_t* restrict q, int vec) {
#if defined(FG_VPACK)
  if (vec) {
    const __m512 mv = _mm512_set1_ps(m), iv = _mm512_set1_ps(inv);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = lanes_mask(n - i);
      _mm512_mask_storeu_epi32(q + i, k, codes16(v + i, k, mv, iv));
    }
    return;
  }
#endif
  (void)vec;
  for (int64_t i = 0; i < n; ++i) q[i] = code_of(v[i], m, inv);
}

/* a row of the error's codes: signed bytes g - 128 onto the channel's virtual-grid row, added to the code sums */
static void g_row(const float* restrict v, int64_t n, float m, float inv, int8_t* restrict dst, int32_t* restrict sum,
                  int vec) {
#if defined(FG_VPACK)
  if (vec) {
    const __m512 mv = _mm512_set1_ps(m), iv = _mm512_set1_ps(inv);
    const __m512i off = _mm512_set1_epi32(128);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = lanes_mask(n - i);
      const __m512i q = codes16(v + i, k, mv, iv);
      _mm_mask_storeu_epi8(dst + i, k, _mm512_cvtepi32_epi8(_mm512_sub_epi32(q, off)));
      _mm512_mask_storeu_epi32(sum + i, k, _mm512_add_epi32(_mm512_maskz_loadu_epi32(k, sum + i), q));
    }
    return;
  }
#endif
  (void)vec;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t q = code_of(v[i], m, inv);
    dst[i] = (int8_t)(q - 128);
    sum[i] += q;
  }
}

/* one image's codes: x bytes onto its planes (xb), the error words [V4][Kv] (gp, through the byte rows gk), both
 * added to the task's code sums */
static void dw_pack_image(const DJob* j, int64_t n, uint8_t* xb, int32_t* gp, int8_t* gk, int32_t* row, int32_t* xsum,
                          int32_t* gsum) {
  const int64_t C = j->C, H = j->H, W = j->W, K = j->K, Kv = j->Kv, P = j->P, V4 = j->V4;
  const int direct = j->sh == 1 && j->sw == 1, vec = j->isa != ISA_SCALAR;
  const float* x = j->x + (size_t)n * C * H * W;
  for (int64_t c = 0; c < C; ++c) {
    uint8_t* xc = xb + c * j->cstride;
    int32_t* xs = xsum + c * j->cstride;
    for (int64_t h = 0; h < H; ++h) {
      const float* xr = x + (c * H + h) * W;
      if (direct) {
        const int64_t o = (h + j->ph) * j->Wq + j->pw;
        x_row_direct(xr, W, j->mx, j->inv_sx, xc + o, xs + o, vec);
      } else {
        codes_row(xr, W, j->mx, j->inv_sx, row, vec);
        const int64_t* off = j->xoff + h * W;
        for (int64_t w = 0; w < W; ++w) { xc[off[w]] = (uint8_t)row[w]; xs[off[w]] += row[w]; }
      }
    }
  }
  const float* dy = j->dy + (size_t)n * K * P;
  for (int64_t k = 0; k < K; ++k)   /* the grid's columns wo >= Wo stay 0 */
    for (int64_t ho = 0; ho < j->Ho; ++ho)
      g_row(dy + k * P + ho * j->Wo, j->Wo, j->mg, j->inv_sg, gk + k * V4 * 4 + ho * j->Wq, gsum + k * P + ho * j->Wo, vec);
#if defined(FG_VPACK)
  if (vec && K * V4 < (1LL << 31)) {   /* [K][V] bytes -> [V/4][Kv] words, 16 channels' words a gather */
    const __m512i lane = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int32_t)V4));
    for (int64_t w4 = 0; w4 < V4; ++w4)
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = lanes_mask(K - k);
        const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)(k * V4 + w4)));
        _mm512_mask_storeu_epi32(gp + w4 * Kv + k, m, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, gk, 4));
      }
    return;
  }
#endif
  for (int64_t w4 = 0; w4 < V4; ++w4)   /* [K][V] bytes -> [V/4][Kv] words */
    for (int64_t k = 0; k < K; ++k) gp[w4 * Kv + k] = load_word((const uint8_t*)gk + (k * V4 + w4) * 4);
}

#if defined(FG_AMX)
/* packed images an amx group holds at most (at least one): the tiles run over all of them before their sums go
 * out, so small maps, whose image is a few tile steps, do not pay a store per image; 256 KiB stays in L2 */
#define DW_AMX_GROUP_BYTES (1 << 18)

static void dw_task_amx(DJob* j, size_t task, int64_t n0, int64_t n1) {
  const int64_t C = j->C, K = j->K, Kv = j->Kv, P = j->P, V4 = j->V4;
  /* A tiles read 16 channels at a time, so the planes cover C rounded up to 16 (the extra ones stay 0) */
  const size_t xbytes = (size_t)((C + 15) / 16 * 16 * j->cstride);
  const size_t slot = (xbytes + (size_t)(V4 * Kv) * 4 + 63) / 64 * 64;
  int64_t G = (int64_t)(DW_AMX_GROUP_BYTES / slot);
  if (G < 1) G = 1;
  if (G > n1 - n0) G = n1 - n0;
  char* buf = (char*)calloc(1, (size_t)G * slot + (size_t)(K * V4 * 4) + (size_t)(j->W * 4));
  if (!buf) { j->failed = 1; return; }
  int8_t* gk = (int8_t*)(buf + (size_t)G * slot);
  int32_t* row = (int32_t*)(gk + K * V4 * 4);
  int32_t* part = j->part + (size_t)task * j->CT * Kv;
  int32_t* gsum = j->gsum + (size_t)task * K * P;
  int32_t* xsum = j->xsum + (size_t)task * C * j->cstride;
  amx_begin();
  for (int64_t g0 = n0; g0 < n1; g0 += G) {
    const DwGroup g = {buf, slot, xbytes, g0 + G < n1 ? G : n1 - g0};
    for (int64_t i = 0; i < g.ng; ++i)
      dw_pack_image(j, g0 + i, (uint8_t*)buf + i * slot, (int32_t*)(buf + i * slot + xbytes), gk, row, xsum, gsum);
    dw_amx_group(j, &g, part);
  }
  _tile_release();
  free(buf);
}
#endif

/* one task: its images, one after another: pack, tiles, running sums of the codes */
static void dw_task(void* p, size_t task) {
  DJob* j = (DJob*)p;
  const int64_t n0 = (int64_t)task * j->chunk, n1 = n0 + j->chunk < j->N ? n0 + j->chunk : j->N;
#if defined(FG_AMX)
  if (j->isa == ISA_AMX) { dw_task_amx(j, task, n0, n1); return; }
#endif
  const int64_t C = j->C, K = j->K, Kv = j->Kv, P = j->P, V4 = j->V4;
  const size_t xbytes = (size_t)(C * j->cstride), gwords = (size_t)(V4 * Kv);
  /* x planes | a zero row | packed error words | the error codes by channel on the virtual grid | a row of codes */
  char* buf = (char*)calloc(1, xbytes + (size_t)(4 * V4 + DW_SLACK) + gwords * 4 + (size_t)(K * V4 * 4) + (size_t)(j->W * 4));
  if (!buf) { j->failed = 1; return; }
  uint8_t* xb = (uint8_t*)buf;
  uint8_t* zero = xb + xbytes;
  int32_t* gp = (int32_t*)(zero + 4 * V4 + DW_SLACK);
  int8_t* gk = (int8_t*)(gp + gwords);
  int32_t* row = (int32_t*)(gk + K * V4 * 4);
  int32_t* part = j->part + (size_t)task * j->CT * Kv;
  int32_t* gsum = j->gsum + (size_t)task * K * P;
  int32_t* xsum = j->xsum + (size_t)task * C * j->cstride;
  for (int64_t n = n0; n < n1; ++n) {
    dw_pack_image(j, n, xb, gp, gk, row, xsum, gsum);
    for (int64_t ct0 = 0; ct0 < j->CT; ct0 += (j->isa == ISA_VNNI && Kv == 16) ? 16 : 8)
      for (int64_t kv0 = 0; kv0 < Kv; kv0 += 32) {
        switch (j->isa) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
          case ISA_VNNI:
            if (Kv == 16) dw_tile_vnni_16x1(j, xb, zero, gp, part, ct0, kv0);
            else if (Kv - kv0 >= 32) dw_tile_vnni_8x2(j, xb, zero, gp, part, ct0, kv0);
            else dw_tile_vnni_t(j, xb, zero, gp, part, ct0, kv0, 8, 1);
            break;
#endif
#if defined(__AVX2__)
          case ISA_AVX2: dw_tile_avx2(j, xb, zero, gp, part, ct0, kv0); break;
#endif
          default: dw_tile_scalar(j, xb, gp, part, ct0, kv0); break;
        }
      }
  }
  free(buf);
}

static OrtStatus* compute_int_conv_grad_w(IKernel* kern, void* ctx) {
  int64_t gd[8], xd[8], d[8];
  size_t gr, xr, r, gn, xn, cnt;
  const float *dy, *x, *mgp, *sgp, *mxp, *sxp;
  OrtStatus* st;
  DJob j;
  memset(&j, 0, sizeof j);
  if ((st = in_shape(ctx, 0, &dy, gd, &gr, &gn)) || (st = in_shape(ctx, 3, &x, xd, &xr, &xn))) return st;
  if (gr != 4 || xr != 4 || gd[0] != xd[0])
    return ifail("fracgraph IntConvGradW: dy must be [N, K, Ho, Wo] and x [N, C, H, W] of one batch");
  const float** scal[4] = {&mgp, &sgp, &mxp, &sxp};
  const size_t at[4] = {1, 2, 4, 5};
  for (int i = 0; i < 4; ++i) {
    if ((st = in_shape(ctx, at[i], scal[i], d, &r, &cnt))) return st;
    if (cnt != 1) return ifail("fracgraph IntConvGradW: dy_min, dy_scale, x_min and x_scale must be scalars");
  }
  j.isa = chosen_isa();
  if (j.isa < 0) return ifail("fracgraph IntConvGradW: FRACGRAPH_INT_ISA names a path this CPU's build lacks "
                              "(use auto, amx, vnni, avx2 or scalar; amx needs AMX-INT8 and the kernel's permission, vnni AVX-512 VNNI, avx2 AVX2)");
  j.N = xd[0], j.C = xd[1], j.H = xd[2], j.W = xd[3], j.K = gd[1], j.Ho = gd[2], j.Wo = gd[3];
  if (j.isa == ISA_AMX && j.C < amx_min_channels(AMX_MIN_CHANNELS_DW)) j.isa = ISA_VNNI;
  j.kh = kern->conv[0], j.kw = kern->conv[1], j.sh = kern->conv[2], j.sw = kern->conv[3];
  j.ph = kern->conv[4], j.pw = kern->conv[5], j.dh = kern->conv[6], j.dw = kern->conv[7];
  if (j.kh < 1 || j.kw < 1 || j.sh < 1 || j.sw < 1 || j.dh < 1 || j.dw < 1 || j.ph < 0 || j.pw < 0)
    return ifail("fracgraph IntConvGradW: kernel, strides and dilations must be >= 1 and pads >= 0");
  int64_t wd[4] = {j.K, j.C, j.kh, j.kw};
  void* wv;
  float* dwo;
  if ((st = IAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, wd, 4, &wv))) return st;
  if ((st = IAPI(GetTensorMutableData, GetDataFn)(wv, (void**)&dwo))) return st;
  j.taps = j.kh * j.kw, j.CT = j.C * j.taps, j.P = j.Ho * j.Wo;
  if (j.N == 0 || j.P == 0 || j.CT == 0 || j.K == 0) {
    memset(dwo, 0, (size_t)(j.K * j.CT) * sizeof(float));
    return NULL;
  }
  j.dy = dy, j.x = x;
  j.mg = *mgp, j.inv_sg = 1.0f / *sgp, j.mx = *mxp, j.inv_sx = 1.0f / *sxp;
  /* the padded image covers every tap of every output position and the whole input */
  const int64_t reach_h = (j.Ho - 1) * j.sh + (j.kh - 1) * j.dh + 1, reach_w = (j.Wo - 1) * j.sw + (j.kw - 1) * j.dw + 1;
  j.Hp = reach_h > j.H + j.ph ? reach_h : j.H + j.ph;
  j.Wp = reach_w > j.W + j.pw ? reach_w : j.W + j.pw;
  j.Hq = (j.Hp + j.sh - 1) / j.sh, j.Wq = (j.Wp + j.sw - 1) / j.sw;
  /* words of 4 positions, a multiple of 4 (the vnni loop's unroll), of 16 on amx (a tile's 64 positions) */
  j.V4 = j.isa == ISA_AMX ? (j.Ho * j.Wq + 63) / 64 * 16 : (j.Ho * j.Wq + 15) / 16 * 4;
  /* a tap reads up to 4 V4 bytes past its offset, whose largest lies inside the last phase (amx: 48 more) */
  j.cstride = (j.sh * j.sw * j.Hq * j.Wq + j.Wq + DW_SLACK + (j.isa == ISA_AMX ? 64 : 0) + 63) / 64 * 64;
  j.Kv = (j.K + 15) / 16 * 16;
  /* images per task: int32-safe (P 255 128 per image), DW_TASKS tasks where the batch allows */
  const int64_t safe = (int64_t)(2147483647LL / (j.P * 255LL * 128LL));
  if (safe < 1) return ifail("fracgraph IntConvGradW: the output map is too large for int32 sums (over 65,000 positions)");
  j.chunk = (j.N + DW_TASKS - 1) / DW_TASKS;
  if (j.chunk > safe) j.chunk = safe;
  j.tasks = (j.N + j.chunk - 1) / j.chunk;
  int64_t* toff = (int64_t*)malloc((size_t)j.taps * sizeof(int64_t));
  int64_t* xoff = (int64_t*)malloc((size_t)(j.H * j.W) * sizeof(int64_t));
  j.part = (int32_t*)calloc((size_t)(j.tasks * j.CT * j.Kv), sizeof(int32_t));
  j.gsum = (int32_t*)calloc((size_t)(j.tasks * j.K * j.P), sizeof(int32_t));
  j.xsum = (int32_t*)calloc((size_t)(j.tasks * j.C * j.cstride), sizeof(int32_t));
  int64_t* Gt = (int64_t*)calloc((size_t)(j.K * j.taps), sizeof(int64_t));
  int64_t* Qt = (int64_t*)calloc((size_t)(j.C * j.taps), sizeof(int64_t));
  int64_t* Tt = (int64_t*)calloc((size_t)j.taps, sizeof(int64_t));
  int64_t* gtot = (int64_t*)calloc((size_t)(j.K * j.P), sizeof(int64_t));
  int64_t* xtot = (int64_t*)calloc((size_t)j.cstride, sizeof(int64_t));
  st = NULL;
  if (!toff || !xoff || !j.part || !j.gsum || !j.xsum || !Gt || !Qt || !Tt || !gtot || !xtot) {
    st = ifail("fracgraph IntConvGradW: out of memory");
    goto done;
  }
  for (int64_t ta = 0; ta < j.kh; ++ta)
    for (int64_t tb = 0; tb < j.kw; ++tb) {
      const int64_t rr = ta * j.dh, cc = tb * j.dw;
      toff[ta * j.kw + tb] = ((rr % j.sh) * j.sw + cc % j.sw) * j.Hq * j.Wq + (rr / j.sh) * j.Wq + cc / j.sw;
    }
  for (int64_t h = 0; h < j.H; ++h)
    for (int64_t w = 0; w < j.W; ++w) {
      const int64_t hp = h + j.ph, wp = w + j.pw;
      xoff[h * j.W + w] = ((hp % j.sh) * j.sw + wp % j.sw) * j.Hq * j.Wq + (hp / j.sh) * j.Wq + wp / j.sw;
    }
  j.toff = toff, j.xoff = xoff;
  if (j.tasks == 1) dw_task(&j, 0);
  else st = IAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, dw_task, (size_t)j.tasks, 0, &j);
  if (!st && j.failed) st = ifail("fracgraph IntConvGradW: out of memory");
  if (st) goto done;
  /* the task sums: G and T per (k, tap) and tap from the positions whose tap lies inside the image */
  for (int64_t t = 0; t < j.tasks; ++t)
    for (int64_t i = 0; i < j.K * j.P; ++i) gtot[i] += j.gsum[t * j.K * j.P + i];
  for (int64_t ta = 0; ta < j.kh; ++ta)
    for (int64_t tb = 0; tb < j.kw; ++tb)
      for (int64_t ho = 0; ho < j.Ho; ++ho) {
        const int64_t hi = ho * j.sh - j.ph + ta * j.dh;
        if (hi < 0 || hi >= j.H) continue;
        for (int64_t wo = 0; wo < j.Wo; ++wo) {
          const int64_t wi = wo * j.sw - j.pw + tb * j.dw;
          if (wi < 0 || wi >= j.W) continue;
          Tt[ta * j.kw + tb] += j.N;
          for (int64_t k = 0; k < j.K; ++k) Gt[k * j.taps + ta * j.kw + tb] += gtot[k * j.P + ho * j.Wo + wo];
        }
      }
  /* Q per (c, tap): the x code sums on the virtual grid's valid positions (pads are code 0) */
  for (int64_t c = 0; c < j.C; ++c) {
    memset(xtot, 0, (size_t)j.cstride * sizeof(int64_t));
    for (int64_t t = 0; t < j.tasks; ++t) {
      const int32_t* xs = j.xsum + (t * j.C + c) * j.cstride;
      for (int64_t i = 0; i < j.cstride; ++i) xtot[i] += xs[i];
    }
    for (int64_t tap = 0; tap < j.taps; ++tap) {
      int64_t s = 0;
      for (int64_t ho = 0; ho < j.Ho; ++ho)
        for (int64_t wo = 0; wo < j.Wo; ++wo) s += xtot[toff[tap] + ho * j.Wq + wo];
      Qt[c * j.taps + tap] = s;
    }
  }
  {
    const double sg = *sgp, mg = *mgp, sx = *sxp, mx = *mxp;
    const double a = sg * sx, b = sg * mx, cq = mg * sx, dt = mg * mx;
    const int64_t cells = j.CT * j.Kv;
    int64_t* At = (int64_t*)calloc((size_t)cells, sizeof(int64_t));   /* the tasks' sums, added in int64 */
    if (!At) { st = ifail("fracgraph IntConvGradW: out of memory"); goto done; }
    for (int64_t t = 0; t < j.tasks; ++t) {
      const int32_t* pt = j.part + t * cells;
      for (int64_t i = 0; i < cells; ++i) At[i] += pt[i];
    }
    for (int64_t ct = 0; ct < j.CT; ++ct) {
      const int64_t c = ct / j.taps, tap = ct % j.taps, q = Qt[c * j.taps + tap];
      for (int64_t k = 0; k < j.K; ++k)
        dwo[k * j.CT + ct] = (float)(a * (double)(At[ct * j.Kv + k] + 128 * q) + b * (double)Gt[k * j.taps + tap] +
                                     cq * (double)q + dt * (double)Tt[tap]);
    }
    free(At);
  }
done:
  free(toff); free(xoff); free(j.part); free(j.gsum); free(j.xsum); free(Gt); free(Qt); free(Tt); free(gtot); free(xtot);
  return st;
}

/* ---- IntMatMul, IntMatMulGradW: the quantized linear layers' GEMMs on codes, one op each ------------------------
 *
 *   IntMatMul(a, a_min, a_scale, w, w_min, w_scale, b?) -> y = a @ w (+ b)
 *        a [..., M, K] (the leading dims flattened into M) fake-quantized per tensor; w [K, N] fake-quantized per
 *        column (w_min, w_scale hold N values: the MatMul weight quantizer's MinMaxCols) or per tensor; b, optional,
 *        N values: added in float to y as rounded (onnxruntime's Add after the MatMul, bitwise; passes/int_bias.py)
 *   IntMatMulGradW(a, a_min, a_scale, g, g_min, g_scale) -> dw = a^T @ g     (onnxruntime's MatMul_Grad Gemm, transA)
 *   IntGemm(a, a_min, a_scale, w, w_min, w_scale, bias) -> y = a @ w^T + bias   (ONNX Gemm(a, w, bias, transB=1); with
 *        attribute trans_b = 0, a @ w + bias): a [M, K] per tensor; w [N, K] fake-quantized per row (the Gemm weight
 *        quantizer's ranges, one per output channel), or [K, N] per column; bias N values or one (a Gemm without C
 *        gets a 0), added in the double-precision epilogue, so y is rounded once
 *        a [..., K] the FW quantizer's activation, g [..., N] the BW quantizer's error (the same leading dims), both
 *        per tensor (g_min, g_scale may also hold N values); dw [K, N]
 *
 * Both are one product Y[i, n] = sum_r L[i, r] R[r, n] of fake-quantized operands read as the float tensors the
 * graph already has: L = a (forward) or a^T (weight gradient), per tensor, L = s_l ql + m_l; R = w or g,
 * R[., n] = s_r[n] qr + m_r[n]. The codes are recovered while packing (code_of: round((v - m) / s), exact for values
 * the quantizer wrote), and
 *
 *   Y[i, n] = s_l s_r[n] A + s_l m_r[n] RL[i] + m_l s_r[n] CR[n] + Rn m_l m_r[n]
 *
 * with A = sum_r ql qr (exact), RL the row sums of ql, CR the column sums of qr, Rn the reduction length. The integer
 * sum runs on unsigned ql x signed qr - 128: acc = A - 128 RL, |acc| <= Rn 255 128, int32 for reductions of up to
 * MM_CHUNK; longer ones run in chunks of MM_CHUNK whose sums add in int64. The epilogue (one function for every path,
 * so their outputs are bitwise equal) rescales in double, rounded once: A = acc + 128 RL exactly in double.
 *
 * Layout: R packed once per call as [Rpad/4][Npad][4] signed bytes (tdpbusd's B layout, and vpdpbusd's vector of 16
 * columns), 0 past Rn and N; L packed per task as [32][Rpad] unsigned bytes (0 past Rn). A task is 32 rows of Y;
 * its blocks are 32 x 32: amx 2 x 2 tiles (tdpbusd, 16 x 16 int32 each, 64 reduction bytes per instruction),
 * vnni 8 rows x 2 vectors of 16 columns at a time (vpdpbusd, a broadcast word of 4 L codes), avx2 4 rows x 4
 * vectors of 8 columns (vpmaddwd on 16-bit pairs), scalar loops. The error GEMM (dX = dY W^T) is not here: W's
 * per-column scales lie along its reduction, so its sum does not factor into one integer sum and one rescale. */
#define MM_ROWS 32
#define MM_COLS 32
#define MM_CHUNK 65536   /* 65536 255 128 < 2^31: a chunk's acc fits int32 */

typedef struct {
  int isa;
  const float* L;
  int64_t li, lr;          /* L[i, r] = L[i li + r lr] */
  const float* R;          /* R[r, n] = R[r N + n], or R[n Rn + r] when rt (IntGemm's trans_b: w is [N, K]) */
  int rt;
  float* y;                /* [I][N] */
  int64_t I, Rn, N, Rpad, Npad;
  float ml, inv_sl;
  const float* mr;         /* [Npad] per column (a per-tensor value repeated) */
  const float* inv_sr;     /* [Npad] */
  int8_t* rp;              /* [Rpad/4][Npad][4] */
  int32_t* cr;             /* [Npad] */
  const double *c1, *c2, *c3;   /* [N] s_l s_r, s_l m_r, m_l s_r CR + Rn m_l m_r */
  const float* badd;            /* IntMatMul's optional b [N]: y rounded to float, then + b (NULL: none) */
  int failed;
} MJob;

/* the codes of one contiguous row (the forward's L), as bytes; returns their sum */
static int32_t mm_codes_row(const float* restrict v, int64_t n, float m, float inv, uint8_t* restrict dst) {
  int32_t s = 0;
  int64_t c = 0;
#if defined(__AVX512F__)
  /* code_of 16 lanes at a time (the compiler does not vectorize the byte store next to the sum): the same
   * round-to-nearest-even and clamp, so the same codes */
  const __m512 mv = _mm512_set1_ps(m), iv = _mm512_set1_ps(inv), lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(255.0f);
  __m512i sv = _mm512_setzero_si512();
  for (; c + 16 <= n; c += 16) {
    __m512 u = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(v + c), mv), iv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i q = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(u, lo), hi));
    _mm_storeu_si128((__m128i*)(dst + c), _mm512_cvtepi32_epi8(q));
    sv = _mm512_add_epi32(sv, q);
  }
  s = _mm512_reduce_add_epi32(sv);
#endif
  for (; c < n; ++c) {
    const int32_t q = code_of(v[c], m, inv);
    dst[c] = (uint8_t)q;
    s += q;
  }
  return s;
}

/* 4 rows' codes at columns 0..n-1 as words of 4 bytes (byte t: row t's code, xor `flip`: 0x80 per byte makes it the
 * signed q - 128), each column's 4 codes added to sum */
static void mm_words4(const float* restrict v0, const float* restrict v1, const float* restrict v2,
                      const float* restrict v3, const float* restrict m, const float* restrict inv, int64_t n,
                      uint32_t flip, int32_t* restrict dst, int32_t* restrict sum) {
  for (int64_t c = 0; c < n; ++c) {
    const int32_t q0 = code_of(v0[c], m[c], inv[c]), q1 = code_of(v1[c], m[c], inv[c]);
    const int32_t q2 = code_of(v2[c], m[c], inv[c]), q3 = code_of(v3[c], m[c], inv[c]);
    dst[c] = (int32_t)(((uint32_t)q0 | (uint32_t)q1 << 8 | (uint32_t)q2 << 16 | (uint32_t)q3 << 24) ^ flip);
    sum[c] += q0 + q1 + q2 + q3;
  }
}

#define MM_PACK_COLS 64   /* columns of R a packing task converts */

/* R's codes of MM_PACK_COLS columns (task c): words of 4 rows' signed bytes qr - 128 in the [r/4][Npad] layout
 * (0 past Rn and N), and their column sums */
static void mm_pack_r(void* p, size_t c) {
  MJob* j = (MJob*)p;
  const int64_t n0 = (int64_t)c * MM_PACK_COLS, n1 = n0 + MM_PACK_COLS < j->N ? n0 + MM_PACK_COLS : j->N, N = j->N;
  const int64_t Np = j->Npad, full = j->Rn / 4;
  int32_t sum[MM_PACK_COLS] = {0};
  int32_t* rp = (int32_t*)j->rp;
  if (j->rt) {   /* R[r, n] = w[n, r]: column n's 4 rows of a word are 4 consecutive floats of w's row n */
    for (int64_t n = n0; n < n1; ++n) {
      const float* v = j->R + n * j->Rn;
      const float m = j->mr[n], inv = j->inv_sr[n];
      int32_t s = 0;
      for (int64_t r4 = 0; r4 < full; ++r4) {
        const int32_t q0 = code_of(v[4 * r4], m, inv), q1 = code_of(v[4 * r4 + 1], m, inv);
        const int32_t q2 = code_of(v[4 * r4 + 2], m, inv), q3 = code_of(v[4 * r4 + 3], m, inv);
        rp[r4 * Np + n] = (int32_t)(((uint32_t)q0 | (uint32_t)q1 << 8 | (uint32_t)q2 << 16 | (uint32_t)q3 << 24) ^ 0x80808080u);
        s += q0 + q1 + q2 + q3;
      }
      for (int64_t r = 4 * full; r < j->Rn; ++r) {   /* the last rows (fewer than 4): bytes, the rest of the word 0 */
        const int32_t q = code_of(v[r], m, inv);
        j->rp[((r >> 2) * Np + n) * 4 + (r & 3)] = (int8_t)(q - 128);
        s += q;
      }
      j->cr[n] = s;
    }
    return;
  }
  for (int64_t r4 = 0; r4 < full; ++r4) {
    const float* v = j->R + 4 * r4 * N + n0;
    mm_words4(v, v + N, v + 2 * N, v + 3 * N, j->mr + n0, j->inv_sr + n0, n1 - n0, 0x80808080u, rp + r4 * Np + n0, sum);
  }
  for (int64_t r = 4 * full; r < j->Rn; ++r) {   /* the last rows (fewer than 4): bytes, the rest of the word 0 */
    const float* v = j->R + r * N;
    int8_t* dst = j->rp + ((r >> 2) * Np) * 4 + (r & 3);
    for (int64_t n = n0; n < n1; ++n) {
      const int32_t q = code_of(v[n], j->mr[n], j->inv_sr[n]);
      dst[n * 4] = (int8_t)(q - 128);
      sum[n - n0] += q;
    }
  }
  for (int64_t n = n0; n < n1; ++n) j->cr[n] = sum[n - n0];
}

static void mm_block_scalar(const MJob* j, const uint8_t* lp, int64_t n0, int64_t r0, int64_t r1, int32_t* acc) {
  for (int i = 0; i < MM_ROWS; ++i)
    for (int c = 0; c < MM_COLS; ++c) {
      int32_t s = 0;
      for (int64_t r = r0; r < r1; ++r)
        s += (int32_t)lp[i * j->Rpad + r] * (int32_t)j->rp[((r >> 2) * j->Npad + n0 + c) * 4 + (r & 3)];
      acc[i * MM_COLS + c] = s;
    }
}

static inline int32_t lword(const uint8_t* p) { int32_t w; memcpy(&w, p, 4); return w; }

#if defined(__AVX2__)
static void mm_block_avx2(const MJob* j, const uint8_t* lp, int64_t n0, int64_t r0, int64_t r1, int32_t* acc) {
  for (int i0 = 0; i0 < MM_ROWS; i0 += 4) {
    __m256i a[4][4];
    for (int k = 0; k < 4; ++k) for (int v = 0; v < 4; ++v) a[k][v] = _mm256_setzero_si256();
    for (int64_t r4 = r0 >> 2; r4 < r1 >> 2; ++r4) {
      const int8_t* rrow = j->rp + (r4 * j->Npad + n0) * 4;
      __m256i r02[4], r13[4];
      for (int v = 0; v < 4; ++v) {
        const __m256i x = _mm256_loadu_si256((const __m256i*)(rrow + 32 * v));
        r02[v] = _mm256_srai_epi16(_mm256_slli_epi16(x, 8), 8);   /* bytes 0, 2 sign-extended */
        r13[v] = _mm256_srai_epi16(x, 8);                          /* bytes 1, 3 */
      }
      for (int k = 0; k < 4; ++k) {
        const int32_t w = lword(lp + (i0 + k) * j->Rpad + 4 * r4);
        const __m256i l02 = _mm256_set1_epi32(w & 0x00FF00FF), l13 = _mm256_set1_epi32((int32_t)((uint32_t)w >> 8) & 0x00FF00FF);
        for (int v = 0; v < 4; ++v)
          a[k][v] = _mm256_add_epi32(a[k][v], _mm256_add_epi32(_mm256_madd_epi16(l02, r02[v]), _mm256_madd_epi16(l13, r13[v])));
      }
    }
    for (int k = 0; k < 4; ++k)
      for (int v = 0; v < 4; ++v) _mm256_storeu_si256((__m256i*)(acc + (i0 + k) * MM_COLS + 8 * v), a[k][v]);
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
static void mm_block_vnni(const MJob* j, const uint8_t* lp, int64_t n0, int64_t r0, int64_t r1, int32_t* acc) {
  for (int i0 = 0; i0 < MM_ROWS; i0 += 8) {
    __m512i a0[8], a1[8];
    for (int k = 0; k < 8; ++k) a0[k] = a1[k] = _mm512_setzero_si512();
    for (int64_t r4 = r0 >> 2; r4 < r1 >> 2; ++r4) {
      const int8_t* rrow = j->rp + (r4 * j->Npad + n0) * 4;
      const __m512i v0 = _mm512_loadu_si512((const void*)rrow), v1 = _mm512_loadu_si512((const void*)(rrow + 64));
      for (int k = 0; k < 8; ++k) {
        const __m512i l = _mm512_set1_epi32(lword(lp + (i0 + k) * j->Rpad + 4 * r4));
        a0[k] = _mm512_dpbusd_epi32(a0[k], l, v0);
        a1[k] = _mm512_dpbusd_epi32(a1[k], l, v1);
      }
    }
    for (int k = 0; k < 8; ++k) {
      _mm512_storeu_si512((void*)(acc + (i0 + k) * MM_COLS), a0[k]);
      _mm512_storeu_si512((void*)(acc + (i0 + k) * MM_COLS + 16), a1[k]);
    }
  }
}
#endif

#if defined(FG_AMX)
/* tiles 0-3 accumulate the block's 2 x 2 16 x 16 quarters, 4-5 hold L's two 16-row halves (64 reduction bytes each),
 * 6-7 R's two 16-column halves (16 words of 4 reduction bytes each); the task loaded amx_begin's configuration */
static void mm_block_amx(const MJob* j, const uint8_t* lp, int64_t n0, int64_t r0, int64_t r1, int32_t* acc) {
  const size_t ls = (size_t)j->Rpad, rs = (size_t)j->Npad * 4;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t r = r0; r < r1; r += 64) {
    const int8_t* rrow = j->rp + ((r >> 2) * j->Npad + n0) * 4;
    _tile_loadd(4, lp + r, ls);
    _tile_loadd(5, lp + 16 * ls + r, ls);
    _tile_loadd(6, rrow, rs);
    _tile_loadd(7, rrow + 64, rs);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, acc, MM_COLS * 4);
  _tile_stored(1, acc + 16, MM_COLS * 4);
  _tile_stored(2, acc + 16 * MM_COLS, MM_COLS * 4);
  _tile_stored(3, acc + 16 * MM_COLS + 16, MM_COLS * 4);
}
#endif

static void mm_block(const MJob* j, const uint8_t* lp, int64_t n0, int64_t r0, int64_t r1, int32_t* acc) {
  switch (j->isa) {
#if defined(FG_AMX)
    case ISA_AMX: mm_block_amx(j, lp, n0, r0, r1, acc); return;
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    case ISA_VNNI: mm_block_vnni(j, lp, n0, r0, r1, acc); return;
#endif
#if defined(__AVX2__)
    case ISA_AVX2: mm_block_avx2(j, lp, n0, r0, r1, acc); return;
#endif
    default: mm_block_scalar(j, lp, n0, r0, r1, acc); return;
  }
}

/* one task: 32 rows of Y; pack their L codes, then every 32-column block: integer sums, the rescale */
static void mm_task(void* p, size_t t) {
  MJob* j = (MJob*)p;
  const int64_t i0 = (int64_t)t * MM_ROWS, ni = j->I - i0 < MM_ROWS ? j->I - i0 : MM_ROWS, Rp = j->Rpad;
  uint8_t* lp = (uint8_t*)calloc((size_t)(MM_ROWS * Rp), 1);
  int64_t* wide = j->Rpad > MM_CHUNK ? (int64_t*)malloc(MM_ROWS * MM_COLS * sizeof(int64_t)) : NULL;
  if (!lp || (j->Rpad > MM_CHUNK && !wide)) { free(lp); free(wide); j->failed = 1; return; }
  int32_t rl[MM_ROWS] = {0};
  if (j->lr == 1) {   /* rows of L are contiguous (the forward's a) */
    for (int64_t i = 0; i < ni; ++i) rl[i] = mm_codes_row(j->L + (i0 + i) * j->li, j->Rn, j->ml, j->inv_sl, lp + i * Rp);
  } else {            /* L = a^T (li == 1): 4 rows of a give each of the task's ni columns one word of 4 codes */
    float mloc[MM_ROWS], iloc[MM_ROWS];
    int32_t words[16][MM_ROWS];   /* 16 words (64 reduction bytes) of each row, written out as whole cache lines */
    for (int i = 0; i < MM_ROWS; ++i) mloc[i] = j->ml, iloc[i] = j->inv_sl;
    const int64_t full = j->Rn / 4, lr = j->lr;
    for (int64_t g0 = 0; g0 < full; g0 += 16) {
      const int64_t ng = full - g0 < 16 ? full - g0 : 16;
      for (int64_t q = 0; q < ng; ++q) {
        const float* v = j->L + 4 * (g0 + q) * lr + i0;
        mm_words4(v, v + lr, v + 2 * lr, v + 3 * lr, mloc, iloc, ni, 0, words[q], rl);
      }
      for (int64_t i = 0; i < ni; ++i) {
        int32_t row[16];
        for (int64_t q = 0; q < ng; ++q) row[q] = words[q][i];
        memcpy(lp + i * Rp + 4 * g0, row, (size_t)ng * 4);
      }
    }
    for (int64_t r = 4 * full; r < j->Rn; ++r) {
      const float* v = j->L + r * lr + i0;
      for (int64_t i = 0; i < ni; ++i) { const int32_t q = code_of(v[i], j->ml, j->inv_sl); lp[i * Rp + r] = (uint8_t)q; rl[i] += q; }
    }
  }
  int32_t acc[MM_ROWS * MM_COLS];
#if defined(FG_AMX)
  if (j->isa == ISA_AMX) amx_begin();
#endif
  for (int64_t n0 = 0; n0 < j->N; n0 += MM_COLS) {
    const int64_t nn = j->N - n0 < MM_COLS ? j->N - n0 : MM_COLS;
    if (!wide) mm_block(j, lp, n0, 0, Rp, acc);
    else {
      memset(wide, 0, MM_ROWS * MM_COLS * sizeof(int64_t));
      for (int64_t r0 = 0; r0 < Rp; r0 += MM_CHUNK) {
        mm_block(j, lp, n0, r0, r0 + MM_CHUNK < Rp ? r0 + MM_CHUNK : Rp, acc);
        for (int e = 0; e < MM_ROWS * MM_COLS; ++e) wide[e] += acc[e];
      }
    }
    for (int64_t i = 0; i < ni; ++i) {
      const double rd = (double)rl[i], r128 = 128.0 * rd;
      float* y = j->y + (i0 + i) * j->N + n0;
      const double *c1 = j->c1 + n0, *c2 = j->c2 + n0, *c3 = j->c3 + n0;
      if (!wide && j->badd) {   /* the rounded product, then onnxruntime's Add of the bias: two roundings */
        const int32_t* a = acc + i * MM_COLS;
        const float* bb = j->badd + n0;
        for (int64_t c = 0; c < nn; ++c) {
          const float v = (float)(c1[c] * ((double)a[c] + r128) + c2[c] * rd + c3[c]);
          y[c] = v + bb[c];
        }
      } else if (!wide) {
        const int32_t* a = acc + i * MM_COLS;
        for (int64_t c = 0; c < nn; ++c) y[c] = (float)(c1[c] * ((double)a[c] + r128) + c2[c] * rd + c3[c]);
      } else if (j->badd) {
        const int64_t* a = wide + i * MM_COLS;
        const float* bb = j->badd + n0;
        for (int64_t c = 0; c < nn; ++c) {
          const float v = (float)(c1[c] * ((double)a[c] + r128) + c2[c] * rd + c3[c]);
          y[c] = v + bb[c];
        }
      } else {
        const int64_t* a = wide + i * MM_COLS;
        for (int64_t c = 0; c < nn; ++c) y[c] = (float)(c1[c] * ((double)a[c] + r128) + c2[c] * rd + c3[c]);
      }
    }
  }
#if defined(FG_AMX)
  if (j->isa == ISA_AMX) _tile_release();
#endif
  free(lp);
  free(wide);
}

/* grad: IntMatMulGradW; gemm: IntGemm (trans_b: its w is [N, K]; input 6 the bias) */
static OrtStatus* compute_int_matmul(void* ctx, int grad, int gemm, int trans_b) {
  const char* who = grad ? "fracgraph IntMatMulGradW" : gemm ? "fracgraph IntGemm" : "fracgraph IntMatMul";
  char msg[256];
  int64_t ad[8], bd[8], d[8], od[8];
  size_t ar, br, r, an, bn, cnt[4];
  const float *a, *b, *sc[4];
  OrtStatus* st;
  MJob j;
  memset(&j, 0, sizeof j);
  if ((st = in_shape(ctx, 0, &a, ad, &ar, &an)) || (st = in_shape(ctx, 3, &b, bd, &br, &bn))) return st;
  const size_t at[4] = {1, 2, 4, 5};
  for (int i = 0; i < 4; ++i)
    if ((st = in_shape(ctx, at[i], &sc[i], d, &r, &cnt[i]))) return st;
  size_t orank;
  int64_t K, N, M;
  const float* bias = NULL;
  size_t nbias = 0;
  if (gemm) {
    if (ar != 2 || br != 2 || ad[1] != bd[trans_b ? 1 : 0]) {
      snprintf(msg, sizeof msg, "%s: a must be [M, K] and w %s with the same K", who, trans_b ? "[N, K]" : "[K, N]");
      return ifail(msg);
    }
    if ((st = in_shape(ctx, 6, &bias, d, &r, &nbias))) return st;
    K = ad[1], N = bd[trans_b ? 0 : 1], M = ad[0];
    if (nbias != 1 && (int64_t)nbias != N) {
      snprintf(msg, sizeof msg, "%s: the bias must hold one value per output column (%lld) or one in all", who, (long long)N);
      return ifail(msg);
    }
    orank = 2, od[0] = M, od[1] = N;
    j.L = a, j.li = K, j.lr = 1, j.I = M, j.Rn = K, j.rt = trans_b != 0;
  } else if (!grad) {
    if (ar < 1 || br != 2 || ad[ar - 1] != bd[0]) {
      snprintf(msg, sizeof msg, "%s: a must be [..., K] and w [K, N] with the same K", who);
      return ifail(msg);
    }
    K = bd[0], N = bd[1], M = 1;
    for (size_t i = 0; i + 1 < ar; ++i) M *= ad[i];
    const void* bv = NULL;   /* the optional bias b: N values, added after rounding */
    if ((st = IAPI(KernelContext_GetInput, GetInputFn)(ctx, 6, &bv))) return st;
    if (bv) {
      size_t nb;
      if ((st = in_shape(ctx, 6, &j.badd, d, &r, &nb))) return st;
      if ((int64_t)nb != N) {
        snprintf(msg, sizeof msg, "%s: the bias must hold one value per output column (%lld)", who, (long long)N);
        return ifail(msg);
      }
    }
    orank = ar;
    for (size_t i = 0; i + 1 < ar; ++i) od[i] = ad[i];
    od[ar - 1] = N;
    j.L = a, j.li = K, j.lr = 1, j.I = M, j.Rn = K;
  } else {
    if (ar < 1 || br < 1) return ifail("fracgraph IntMatMulGradW: a and g must have at least one axis");
    int64_t la = 1, lb = 1;
    for (size_t i = 0; i + 1 < ar; ++i) la *= ad[i];
    for (size_t i = 0; i + 1 < br; ++i) lb *= bd[i];
    if (la != lb) {
      snprintf(msg, sizeof msg, "%s: a [..., K] and g [..., N] must have the same leading dimensions", who);
      return ifail(msg);
    }
    K = ad[ar - 1], N = bd[br - 1], M = la;
    orank = 2, od[0] = K, od[1] = N;
    j.L = a, j.li = 1, j.lr = K, j.I = K, j.Rn = M;
  }
  if (cnt[0] != 1 || cnt[1] != 1) { snprintf(msg, sizeof msg, "%s: a_min and a_scale must be scalars", who); return ifail(msg); }
  if (cnt[2] != cnt[3] || (cnt[2] != 1 && (int64_t)cnt[2] != N)) {
    snprintf(msg, sizeof msg, "%s: the second operand's min and scale must be scalars or one value per column", who);
    return ifail(msg);
  }
  void* ov;
  if ((st = IAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, od, orank, &ov))) return st;
  if ((st = IAPI(GetTensorMutableData, GetDataFn)(ov, (void**)&j.y))) return st;
  if (j.I == 0 || N == 0) return NULL;
  if (j.Rn == 0) {
    for (int64_t i = 0; i < j.I; ++i)
      for (int64_t n = 0; n < N; ++n) j.y[i * N + n] = bias ? bias[nbias == 1 ? 0 : n] : j.badd ? 0.0f + j.badd[n] : 0.0f;
    return NULL;
  }
  j.isa = chosen_isa();
  if (j.isa < 0) {
    snprintf(msg, sizeof msg, "%s: FRACGRAPH_INT_ISA names a path this CPU's build lacks (use auto, amx, vnni, avx2 or "
             "scalar; amx needs AMX-INT8 and the kernel's permission, vnni AVX-512 VNNI, avx2 AVX2)", who);
    return ifail(msg);
  }
  j.R = b, j.N = N;
  j.Rpad = (j.Rn + 63) / 64 * 64, j.Npad = (N + MM_COLS - 1) / MM_COLS * MM_COLS;
  j.ml = *sc[0], j.inv_sl = 1.0f / *sc[1];
  const size_t np = (size_t)j.Npad;
  float* mr = (float*)malloc(np * sizeof(float));
  float* inv = (float*)malloc(np * sizeof(float));
  j.rp = (int8_t*)calloc((size_t)j.Rpad * np, 1);
  j.cr = (int32_t*)calloc(np, sizeof(int32_t));
  double* coef = (double*)malloc(3 * (size_t)N * sizeof(double));
  if (!mr || !inv || !j.rp || !j.cr || !coef) { st = ifail("fracgraph IntMatMul: out of memory"); goto done; }
  for (int64_t n = 0; n < j.Npad; ++n) {
    const int64_t c = cnt[2] == 1 ? 0 : n < N ? n : 0;
    mr[n] = sc[2][c], inv[n] = 1.0f / sc[3][c];
  }
  j.mr = mr, j.inv_sr = inv;
  {
    const size_t tasks = (size_t)((N + MM_PACK_COLS - 1) / MM_PACK_COLS);
    if (tasks == 1) mm_pack_r(&j, 0);
    else if ((st = IAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, mm_pack_r, tasks, 0, &j))) goto done;
  }
  {
    const double sl = *sc[1], ml = *sc[0];
    for (int64_t n = 0; n < N; ++n) {
      const int64_t c = cnt[2] == 1 ? 0 : n;
      const double sr = sc[3][c], mrn = sc[2][c];
      coef[n] = sl * sr, coef[N + n] = sl * mrn, coef[2 * N + n] = ml * sr * (double)j.cr[n] + (double)j.Rn * ml * mrn;
      if (bias) coef[2 * N + n] += (double)bias[nbias == 1 ? 0 : n];
    }
    j.c1 = coef, j.c2 = coef + N, j.c3 = coef + 2 * N;
  }
  {
    const size_t tasks = (size_t)((j.I + MM_ROWS - 1) / MM_ROWS);
    if (tasks == 1) mm_task(&j, 0);
    else st = IAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, mm_task, tasks, 0, &j);
    if (!st && j.failed) st = ifail("fracgraph IntMatMul: out of memory");
  }
done:
  free(mr); free(inv); free(j.rp); free(j.cr); free(coef);
  return st;
}

/* ---- registration ----------------------------------------------------------------------------------------- */
static const char* const I_ATTRS[8] = {"kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw"};
enum { OP_CONV, OP_CODES_U8, OP_CODES_S8, OP_RESCALE, OP_CONV_GRAD_W, OP_MATMUL, OP_MATMUL_GRAD_W, OP_GEMM, N_IOPS };
static const char* const I_NAMES[N_IOPS] = {"IntConv", "IntCodesU8", "IntCodesS8", "IntMatMulRescale", "IntConvGradW", "IntMatMul",
                                             "IntMatMulGradW", "IntGemm"};
static const size_t I_NIN[N_IOPS] = {6, 3, 3, 7, 6, 7, 6, 7};
enum { T_FLOAT = 1, T_UINT8 = 2, T_INT8 = 3, T_INT32 = 6 };

typedef struct {
  OrtCustomOp op;
  int kind;
} IOpDef;
static IOpDef g_iops[N_IOPS];
static int ikind(const OrtCustomOp* op) { return ((const IOpDef*)op)->kind; }

static OrtStatus* i_create(const OrtCustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)api;
  IKernel* k = (IKernel*)calloc(1, sizeof(IKernel));
  OrtStatus* st;
  if (!k) return ifail("fracgraph IntConv: out of memory");
  k->kind = ikind(op);
  if (k->kind == OP_CONV || k->kind == OP_CONV_GRAD_W)
    for (int a = 0; a < 8; ++a)
      if ((st = IAPI(KernelInfoGetAttribute_int64, AttrIntFn)(info, I_ATTRS[a], &k->conv[a]))) { free(k); return st; }
  if (k->kind == OP_GEMM) {
    if ((st = IAPI(KernelInfoGetAttribute_int64, AttrIntFn)(info, "trans_b", &k->trans_b))) { free(k); return st; }
    if (k->trans_b != 0 && k->trans_b != 1) { free(k); return ifail("fracgraph IntGemm: trans_b must be 0 or 1"); }
  }
  *out = k;
  return NULL;
}
static OrtStatus* i_compute(void* kernel, void* ctx) {
  IKernel* k = (IKernel*)kernel;
  switch (k->kind) {
    case OP_CONV: return compute_int_conv(kernel, ctx);
    case OP_CONV_GRAD_W: return compute_int_conv_grad_w(k, ctx);
    case OP_RESCALE: return compute_rescale(ctx);
    case OP_MATMUL: return compute_int_matmul(ctx, 0, 0, 0);
    case OP_MATMUL_GRAD_W: return compute_int_matmul(ctx, 1, 0, 0);
    case OP_GEMM: return compute_int_matmul(ctx, 0, 1, (int)k->trans_b);
    default: return compute_codes(ctx, k->kind == OP_CODES_S8);
  }
}
static void i_destroy(void* k) { free(k); }
static const char* i_name(const OrtCustomOp* op) { return I_NAMES[ikind(op)]; }
static const char* i_provider(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static int i_in_type(const OrtCustomOp* op, size_t i) {
  if (ikind(op) != OP_RESCALE) return T_FLOAT;
  return i == 0 ? T_INT32 : i == 1 ? T_UINT8 : i == 2 ? T_INT8 : T_FLOAT;
}
static int i_out_type(const OrtCustomOp* op, size_t i) {
  (void)i;
  return ikind(op) == OP_CODES_U8 ? T_UINT8 : ikind(op) == OP_CODES_S8 ? T_INT8 : T_FLOAT;
}
static size_t i_n_in(const OrtCustomOp* op) { return I_NIN[ikind(op)]; }
static size_t i_n_out(const OrtCustomOp* op) { (void)op; return 1; }
static int i_zero(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static int i_one(const OrtCustomOp* op) { (void)op; return 1; }
/* 0 required, 1 optional: IntMatMul's seventh input, the bias (passes/int_bias.py) */
static int i_optional(const OrtCustomOp* op, size_t i) { return ikind(op) == OP_MATMUL && i == 6; }

OrtStatus* fg_int_gemm_register(void* domain, const void* api) {
  OrtStatus* st;
  i_api = (const OrtApi*)api;
  for (int kind = 0; kind < N_IOPS; ++kind) {
    OrtCustomOp* op = &g_iops[kind].op;
    memset(&g_iops[kind], 0, sizeof g_iops[kind]);
    g_iops[kind].kind = kind;
    op->version = 16;
    op->GetName = i_name;
    op->GetExecutionProviderType = i_provider;
    op->GetInputType = i_in_type;
    op->GetInputTypeCount = i_n_in;
    op->GetOutputType = i_out_type;
    op->GetOutputTypeCount = i_n_out;
    op->KernelDestroy = i_destroy;
    op->GetInputCharacteristic = i_optional;
    op->GetOutputCharacteristic = i_zero;
    op->GetInputMemoryType = i_zero;
    op->GetVariadicInputMinArity = i_one;
    op->GetVariadicInputHomogeneity = i_one;
    op->GetVariadicOutputMinArity = i_one;
    op->GetVariadicOutputHomogeneity = i_one;
    op->CreateKernelV2 = i_create;
    op->KernelComputeV2 = i_compute;
    if ((st = IAPI(CustomOpDomain_Add, DomainAddFn)(domain, op))) return st;
  }
  return NULL;
}
