/* fracgraph's channel-tiled conv weight gradient: one kernel for the convs with many channels on tiny maps,
 * grouped or not (passes/conv_grad_w.py, form `nhwc-tiles`).
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_conv_grad_w_register to add this file's op to the domain "ai.fracgraph":
 *
 *   ConvGradWNhwc(dY, X) -> dW [Co, Ci/G, kh, kw]     attributes kh, kw, sh, sw, ph, pw, dh, dw (kernel, strides,
 *                                                      leading pads, dilations) and group
 *
 *   dW[o][c][a][b] = sum_{n, ho, wo} dY[n][o][ho][wo] * X[n][g*Cig + c][ho*sh - ph + a*dh][wo*sw - pw + b*dw]
 *                    (o in group g; positions outside X are zero padding and contribute nothing)
 *
 * onnxruntime's ConvGrad runs one im2col and one GEMM per image (and group), so on tiny maps each image's GEMM is
 * a rank-P update that reads and writes all of dW (P = 4 on a 2x2 map); the im2col-gemm form writes the whole
 * batch's im2col (kh*kw times X, zeros of the padding included) and multiplies those zeros too. Here:
 *
 * - X and dY are copied once per call into channel-blocked layouts (Xb: a group's input channels in blocks of bw =
 *   32, or 16 where the group has <= 16, per position; Db: 16 output channels per position), by 16 x 16 register
 *   transposes, so that the input of one tap at one position is one or two contiguous vectors and a register
 *   block's dY values are one cache line (broadcast one by one);
 * - a task is a tile of dW: a block of one group's input channels (one or two vectors, the last block masked) x
 *   one tap (a, b) x a range of the group's output channels (chunk), walked in register blocks of R output channels
 *   (R x V accumulators, R * V <= 16: 8 x 32 or 16 x 16 channels); each register block reduces over every position
 *   of the batch, in image slices of about SLICE positions (the slice stays in L1 while every register block of
 *   the chunk runs over it; the accumulators wait in memory between slices), so dW is written once and nothing the
 *   size of the batch's im2col exists;
 * - the padding costs nothing: each tap runs over its valid output range only (ho in [ho0, ho1), wo in [wo0, wo1):
 *   the positions whose input lies inside X), no branch per position and no multiply-add with a padded zero;
 * - 1x1 stride-1 unpadded convs are walked as one row of H*W positions per image.
 *
 * Sums run over the positions in the order (n, ho, wo), one fused multiply-add per product into one float
 * accumulator per dW element. The plain-C path (CPUs without AVX-512) does the same fused multiply-adds (fmaf) in
 * the same order, so both give bitwise the same dW (tests/passes/test_conv_grad_w.py checks that, and both
 * against PyTorch's float64 weight gradient, bounded by the reduction length N*P).
 */
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"   /* the slot table, shared with fused_ops.c */
static const OrtApi* g_api_cw;
#define CAPI(name, type) ((type)g_api_cw->slot[S_##name])

typedef struct {
  const float* dy;   /* [N, Co, Ho, Wo], in place */
  const float* x;    /* [N, Ci, H, W] */
  float* xt;         /* Xb [N, G, cblocks, H, W, bw]: X channels-blocked (bw channels of a group per position) */
  float* dt;         /* Db [N, G, units, Ho, Wo, 16]: dY channels-blocked (16 output channels per position) */
  float* dw;         /* [Co, Cig, kh, kw] */
  int64_t N, Ci, H, W, Co, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw_, G;
  int64_t cig, cog, bw, cblocks, units, chunk, chunks;   /* per group: input channels, output channels, input
                     block width (16 or 32) and blocks, output units of 16; output channels per task, chunks */
  size_t tasks;
  int plain;          /* 1: the plain-C path even where AVX-512 is compiled (tests) */
} CJob;

#define CBLOCK 32     /* input channels per tile: two vectors */
#define RMAX 16       /* accumulator registers per tile: R output channels x V vectors, R * V <= RMAX */
#define CHUNK_MAX 128 /* output channels per task at most (its accumulators between image slices: 16 KB) */
#define TASKS 32      /* output channels split into chunks until there are this many tasks */
#define SLICE 256     /* positions per image slice (32 input channels each: 32 KB of Xt) */

#if defined(__AVX512F__)
/* the 16 x 16 block r[i][k] -> r[k][i] in registers (unpacks within 128-bit lanes, then lane shuffles) */
static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {   /* r[4g + j], lane L: rows 4g..4g+3 of column 4L + j */
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
    const __m512 v0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44), v1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_f32x4(u0, v0, 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(u0, v0, 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(u1, v1, 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(u1, v1, 0xDD);
  }
  for (int k = 0; k < 16; ++k) r[k] = t[k];
}
#endif

/* src [nc, P] (nc <= 32 channels of one image, rows P apart) -> dst [P, bw] (a block of the channels-blocked
 * layout), in 16 x 16 register blocks; pure data movement, so the AVX-512 and plain paths give the same values */
static void to_block(const float* src, int64_t P, int64_t nc, float* dst, int64_t bw) {
  enum { B = 16 };
  for (int64_t c0 = 0; c0 < nc; c0 += B) {
    const int64_t cn = nc - c0 < B ? nc - c0 : B;
    for (int64_t p0 = 0; p0 < P; p0 += B) {
      const int64_t np = P - p0 < B ? P - p0 : B;
#if defined(__AVX512F__)
      __m512 r[16];
      const __mmask16 mp = (__mmask16)((1u << np) - 1), mc = (__mmask16)((1u << cn) - 1);
      for (int i = 0; i < 16; ++i) r[i] = i < cn ? _mm512_maskz_loadu_ps(mp, src + (c0 + i) * P + p0) : _mm512_setzero_ps();
      transpose16(r);
      for (int k = 0; k < np; ++k) _mm512_mask_storeu_ps(dst + (p0 + k) * bw + c0, mc, r[k]);
#else
      for (int64_t k = 0; k < np; ++k)
        for (int64_t i = 0; i < cn; ++i) dst[(p0 + k) * bw + c0 + i] = src[(c0 + i) * P + p0 + k];
#endif
    }
  }
}

/* task n < N: image n of X into Xb; n >= N: image n - N of dY into Db */
static void transpose_task(void* p, size_t t) {
  const CJob* j = (const CJob*)p;
  const int64_t HW = j->H * j->W, P = j->Ho * j->Wo;
  if ((int64_t)t < j->N) {
    const int64_t n = (int64_t)t;
    for (int64_t g = 0; g < j->G; ++g)
      for (int64_t cb = 0; cb < j->cblocks; ++cb) {
        const int64_t c0 = cb * j->bw, nc = j->cig - c0 < j->bw ? j->cig - c0 : j->bw;
        to_block(j->x + (n * j->Ci + g * j->cig + c0) * HW, HW, nc,
                 j->xt + ((n * j->G + g) * j->cblocks + cb) * HW * j->bw, j->bw);
      }
  } else {
    const int64_t n = (int64_t)t - j->N;
    for (int64_t g = 0; g < j->G; ++g)
      for (int64_t u = 0; u < j->units; ++u) {
        const int64_t nc = j->cog - 16 * u < 16 ? j->cog - 16 * u : 16;
        to_block(j->dy + (n * j->Co + g * j->cog + 16 * u) * P, P, nc,
                 j->dt + ((n * j->G + g) * j->units + u) * P * 16, 16);
      }
  }
}

/* the output range [o0, o1) whose input index o*s - pad + t lies in [0, size) */
static void valid_range(int64_t size, int64_t out, int64_t s, int64_t pad, int64_t t, int64_t* o0, int64_t* o1) {
  const int64_t lo = pad - t, hi = size - 1 + pad - t;   /* o*s in [lo, hi] */
  int64_t a = lo <= 0 ? 0 : (lo + s - 1) / s, b = hi < 0 ? 0 : hi / s + 1;
  b = b < out ? b : out;
  *o0 = a < b ? a : b;
  *o1 = b;
}

typedef struct {
  int64_t ho0, ho1, wo0, wo1;   /* the tap's valid output range */
  const float* x;               /* Xb at (n = 0, ho = 0, wo = 0) for this tap and block (may point before it) */
  const float* d;               /* Db at (n = 0, p = 0) for the register block's first output channel */
  int64_t xn, xrow, xcol;       /* Xb steps per image, output row and output column */
  int64_t dn, Wo;               /* Db steps per image (a position is 16 floats) and the output row length */
} Tap;

/* acc[r * 32 + l] += sum over the tap's positions of images [n0, n1) of dY[n][o0 + r][p] * X[n][c0 + l][pos],
 * plain C, lanes l < min(cnt, 16 V); acc is read first unless `first` (then the sums start from zero) */
static void tile_plain(const Tap* t, int R, int V, int64_t cnt, int64_t n0, int64_t n1, int first, float* out) {
  float acc[RMAX][CBLOCK];
  const int64_t L = 16 * V < cnt ? 16 * V : cnt;
  for (int r = 0; r < R; ++r)
    for (int64_t l = 0; l < L; ++l) acc[r][l] = first ? 0.0f : out[r * CBLOCK + l];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t ho = t->ho0; ho < t->ho1; ++ho) {
      const float* xr = t->x + n * t->xn + ho * t->xrow + t->wo0 * t->xcol;
      const float* dr = t->d + n * t->dn + (ho * t->Wo + t->wo0) * 16;
      for (int64_t wo = t->wo0; wo < t->wo1; ++wo, xr += t->xcol, dr += 16)
        for (int r = 0; r < R; ++r)
          for (int64_t l = 0; l < L; ++l) acc[r][l] = fmaf(dr[r], xr[l], acc[r][l]);
    }
  for (int r = 0; r < R; ++r) memcpy(out + r * CBLOCK, acc[r], (size_t)L * sizeof(float));
}

#if defined(__AVX512F__)
/* the same sums, R x V accumulator registers (R, V constants after inlining); lanes past cnt are masked to zero */
static inline __attribute__((always_inline)) void tile_avx512(const Tap* t, const int R, const int V, int64_t cnt,
                                                              int64_t n0, int64_t n1, int first, float* out) {
  __m512 acc[RMAX][2];
  const __mmask16 m0 = cnt >= 16 ? 0xFFFF : (__mmask16)((1u << cnt) - 1);
  const __mmask16 m1 = cnt >= 32 ? 0xFFFF : cnt <= 16 ? 0 : (__mmask16)((1u << (cnt - 16)) - 1);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + r * CBLOCK + 16 * v);
  const int64_t xcol = t->xcol;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t ho = t->ho0; ho < t->ho1; ++ho) {
      const float* xr = t->x + n * t->xn + ho * t->xrow + t->wo0 * xcol;
      const float* dr = t->d + n * t->dn + (ho * t->Wo + t->wo0) * 16;
      for (int64_t wo = t->wo0; wo < t->wo1; ++wo, xr += xcol, dr += 16) {
        const __m512 x0 = _mm512_maskz_loadu_ps(m0, xr);
        const __m512 x1 = V > 1 ? _mm512_maskz_loadu_ps(m1, xr + 16) : x0;
        for (int r = 0; r < R; ++r) {
          const __m512 d = _mm512_set1_ps(dr[r]);
          acc[r][0] = _mm512_fmadd_ps(d, x0, acc[r][0]);
          if (V > 1) acc[r][1] = _mm512_fmadd_ps(d, x1, acc[r][1]);
        }
      }
    }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + r * CBLOCK + 16 * v, acc[r][v]);
}

#define CASE1(r) case r: tile_avx512(t, r, 1, cnt, n0, n1, first, out); return;
#define CASE2(r) case r: tile_avx512(t, r, 2, cnt, n0, n1, first, out); return;
static void tile_vec(const Tap* t, int R, int V, int64_t cnt, int64_t n0, int64_t n1, int first, float* out) {
  if (V == 1) switch (R) { CASE1(1) CASE1(2) CASE1(3) CASE1(4) CASE1(5) CASE1(6) CASE1(7) CASE1(8) CASE1(9) CASE1(10)
                           CASE1(11) CASE1(12) CASE1(13) CASE1(14) CASE1(15) CASE1(16) }
  else switch (R) { CASE2(1) CASE2(2) CASE2(3) CASE2(4) CASE2(5) CASE2(6) CASE2(7) CASE2(8) }
}
#endif

/* task t: group g, input-channel block cb, tap (a, b), output-channel chunk (chunk innermost, so that consecutive
 * tasks read the same block of Xb) */
static void tile_task(void* p, size_t t) {
  const CJob* j = (const CJob*)p;
  const int64_t taps = j->kh * j->kw, HW = j->H * j->W, P = j->Ho * j->Wo;
  int64_t rest = (int64_t)t;
  const int64_t chunk = rest % j->chunks; rest /= j->chunks;
  const int64_t tap = rest % taps; rest /= taps;
  const int64_t cb = rest % j->cblocks, g = rest / j->cblocks;
  const int64_t a = tap / j->kw, b = tap % j->kw;
  const int64_t c0 = cb * j->bw, cnt = j->cig - c0 < j->bw ? j->cig - c0 : j->bw;
  const int V = cnt > 16 ? 2 : 1, RB = RMAX / V;
  Tap tp;
  valid_range(j->H, j->Ho, j->sh, j->ph, a * j->dh, &tp.ho0, &tp.ho1);
  valid_range(j->W, j->Wo, j->sw, j->pw, b * j->dw_, &tp.wo0, &tp.wo1);
  tp.xn = j->G * j->cblocks * HW * j->bw;
  tp.xrow = j->sh * j->W * j->bw;
  tp.xcol = j->sw * j->bw;
  tp.x = j->xt + (g * j->cblocks + cb) * HW * j->bw + ((a * j->dh - j->ph) * j->W + (b * j->dw_ - j->pw)) * j->bw;
  tp.dn = j->G * j->units * P * 16;
  tp.Wo = j->Wo;
  const int64_t o_lo = chunk * j->chunk, o_hi = o_lo + j->chunk < j->cog ? o_lo + j->chunk : j->cog;   /* in the group */
  /* images in slices of about SLICE positions: the slice's block of Xb stays in L1 while every register block of
   * the chunk runs over it; the accumulators go to `acc` between slices (the same fmas in the same order) */
  float acc[CHUNK_MAX * CBLOCK];
  const int64_t valid = (tp.ho1 - tp.ho0) * (tp.wo1 - tp.wo0);
  const int64_t nb = valid >= SLICE ? 1 : SLICE / (valid > 0 ? valid : 1);
  for (int64_t n0 = 0; n0 < j->N || n0 == 0; n0 += nb) {
    const int64_t n1 = n0 + nb < j->N ? n0 + nb : j->N;
    for (int64_t o0 = o_lo; o0 < o_hi; o0 += RB) {
      const int R = (int)(o_hi - o0 < RB ? o_hi - o0 : RB);
      float* out = acc + (o0 - o_lo) * CBLOCK;
      tp.d = j->dt + ((g * j->units + o0 / 16) * P) * 16 + o0 % 16;
#if defined(__AVX512F__)
      if (!j->plain) tile_vec(&tp, R, V, cnt, n0, n1, n0 == 0, out);
      else
#endif
        tile_plain(&tp, R, V, cnt, n0, n1, n0 == 0, out);
    }
  }
  for (int64_t o = o_lo; o < o_hi; ++o) {
    float* dst = j->dw + ((g * j->cog + o) * j->cig + c0) * taps + tap;
    for (int64_t l = 0; l < cnt; ++l) dst[l * taps] = acc[(o - o_lo) * CBLOCK + l];
  }
}

/* Fills the job's geometry from the shapes; 0, or a message. */
static const char* setup(CJob* j, const int64_t* xd, const int64_t* dd, const int64_t* conv) {
  j->N = xd[0], j->Ci = xd[1], j->H = xd[2], j->W = xd[3], j->Co = dd[1], j->Ho = dd[2], j->Wo = dd[3];
  j->kh = conv[0], j->kw = conv[1], j->sh = conv[2], j->sw = conv[3];
  j->ph = conv[4], j->pw = conv[5], j->dh = conv[6], j->dw_ = conv[7], j->G = conv[8];
  if (j->sh < 1 || j->sw < 1 || j->dh < 1 || j->dw_ < 1 || j->kh < 1 || j->kw < 1 || j->N < 0 || j->Ho < 1 || j->Wo < 1)
    return "fracgraph ConvGradWNhwc: kernel, strides and dilations must be >= 1 and dY's map non-empty";
  if (j->G < 1 || j->Ci % j->G || j->Co % j->G)
    return "fracgraph ConvGradWNhwc: group must divide both channel counts";
  j->cig = j->Ci / j->G, j->cog = j->Co / j->G;
  if (j->kh == 1 && j->kw == 1 && j->sh == 1 && j->sw == 1 && j->ph == 0 && j->pw == 0 && j->Ho == j->H && j->Wo == j->W) {
    j->W = j->Wo = j->H * j->W;   /* 1x1 stride 1 unpadded: one row of H*W positions per image */
    j->H = j->Ho = 1;
  }
  j->bw = j->cig <= 16 ? 16 : CBLOCK;
  j->cblocks = (j->cig + j->bw - 1) / j->bw;
  j->units = (j->cog + 15) / 16;
  /* split each group's output channels into chunks (multiples of 16, at most CHUNK_MAX) until there are >= TASKS */
  const int64_t base = j->G * j->cblocks * j->kh * j->kw;
  int64_t want = (TASKS + base - 1) / base;
  want = want < j->units ? want : j->units;
  int64_t per = (j->units + want - 1) / want;
  per = per < CHUNK_MAX / 16 ? per : CHUNK_MAX / 16;
  j->chunk = 16 * per;
  j->chunks = (j->units + per - 1) / per;
  j->tasks = (size_t)(base * j->chunks);
  return 0;
}

static size_t scratch_floats(const CJob* j) {
  return (size_t)(j->N * j->G * (j->cblocks * j->bw * j->H * j->W + j->units * 16 * j->Ho * j->Wo));
}

/* the kernel on plain arrays, one thread, for tests: path 0 plain C, 1 AVX-512 (returns 1 where not compiled);
 * conv = kh, kw, sh, sw, ph, pw, dh, dw, group; returns 2 on bad shapes or memory */
int fg_conv_grad_w_nhwc(const float* dy, const float* x, float* dw, const int64_t* xd, const int64_t* dd,
                        const int64_t* conv, int path) {
  CJob j;
  memset(&j, 0, sizeof j);
#if !defined(__AVX512F__)
  if (path == 1) return 1;
#endif
  if (setup(&j, xd, dd, conv)) return 2;
  j.dy = dy, j.x = x, j.dw = dw, j.plain = path == 0;
  j.xt = (float*)malloc(scratch_floats(&j) * sizeof(float) + 64);
  if (!j.xt) return 2;
  j.dt = j.xt + j.N * j.G * j.cblocks * j.bw * j.H * j.W;
  for (size_t n = 0; n < (size_t)(2 * j.N); ++n) transpose_task(&j, n);
  for (size_t t = 0; t < j.tasks; ++t) tile_task(&j, t);
  free(j.xt);
  return 0;
}

/* ---- the op -------------------------------------------------------------------------------------------------- */
typedef struct {
  int64_t conv[9];
} CwKernel;

static OrtStatus* cfail(const char* msg) { return CAPI(CreateStatus, CreateStatusFn)(ORT_FAIL, msg); }

static OrtStatus* c_shape(void* ctx, size_t index, const void** v, int64_t* dims, size_t* rank) {
  void* info;
  OrtStatus* st;
  if ((st = CAPI(KernelContext_GetInput, GetInputFn)(ctx, index, v))) return st;
  if ((st = CAPI(GetTensorTypeAndShape, TypeShapeFn)(*v, &info))) return st;
  if (!(st = CAPI(GetDimensionsCount, DimCountFn)(info, rank))) {
    if (*rank != 4) st = cfail("fracgraph ConvGradWNhwc: dY and X must be NCHW tensors of one batch");
    else st = CAPI(GetDimensions, DimsFn)(info, dims, 4);
  }
  CAPI(ReleaseTensorTypeAndShapeInfo, ReleaseFn)(info);
  return st;
}

static OrtStatus* cw_compute(void* kernel, void* ctx) {
  const CwKernel* k = (const CwKernel*)kernel;
  const void *dyv, *xv;
  void* out;
  int64_t dd[4], xd[4];
  size_t dr, xr;
  OrtStatus* st;
  CJob j;
  const char* why;
  memset(&j, 0, sizeof j);
  if ((st = c_shape(ctx, 0, &dyv, dd, &dr)) || (st = c_shape(ctx, 1, &xv, xd, &xr))) return st;
  if (dd[0] != xd[0]) return cfail("fracgraph ConvGradWNhwc: dY and X must be NCHW tensors of one batch");
  if ((why = setup(&j, xd, dd, k->conv))) return cfail(why);
  int64_t wd[4] = {j.Co, j.cig, j.kh, j.kw};
  if ((st = CAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, wd, 4, &out))) return st;
  if ((st = CAPI(GetTensorMutableData, GetDataFn)(out, (void**)&j.dw))) return st;
  if ((st = CAPI(GetTensorMutableData, GetDataFn)((void*)dyv, (void**)&j.dy)) ||
      (st = CAPI(GetTensorMutableData, GetDataFn)((void*)xv, (void**)&j.x)))
    return st;
  if (j.N == 0) {
    memset(j.dw, 0, (size_t)(j.Co * j.cig * j.kh * j.kw) * sizeof(float));
    return NULL;
  }
  j.xt = (float*)malloc(scratch_floats(&j) * sizeof(float) + 64);
  if (!j.xt) return cfail("fracgraph ConvGradWNhwc: out of memory");
  j.dt = j.xt + j.N * j.G * j.cblocks * j.bw * j.H * j.W;
  st = CAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, transpose_task, (size_t)(2 * j.N), 0, &j);
  if (!st) st = j.tasks > 1 ? CAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, tile_task, j.tasks, 0, &j)
                            : (tile_task(&j, 0), NULL);
  free(j.xt);
  return st;
}

/* ---- registration -------------------------------------------------------------------------------------------- */
static const char* const CW_ATTRS[9] = {"kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "group"};
static FgOp g_cw_op;

static OrtStatus* cw_create(const OrtCustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)op, (void)api;
  CwKernel* k = (CwKernel*)calloc(1, sizeof(CwKernel));
  OrtStatus* st;
  if (!k) return cfail("fracgraph ConvGradWNhwc: out of memory");
  for (int a = 0; a < 9; ++a)
    if ((st = CAPI(KernelInfoGetAttribute_int64, AttrIntFn)(info, CW_ATTRS[a], &k->conv[a]))) { free(k); return st; }
  *out = k;
  return NULL;
}
OrtStatus* fg_conv_grad_w_register(void* domain, const void* api) {
  g_api_cw = (const OrtApi*)api;
  return fg_op_add(g_api_cw, domain, &g_cw_op, "ConvGradWNhwc", 2, 1, 0, cw_create, fg_op_free, cw_compute);
}
