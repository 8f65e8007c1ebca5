/* fracgraph's strided depthwise input gradient: the dX of a depthwise conv with stride > 1 (conv-grad-split's
 * ConvTranspose with group = channels), written by passes/nchwc_conv.py's "depthwise-t" form.
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_dw_convt_register to add this file's op to the domain "ai.fracgraph":
 *
 *   DepthwiseConvT(dY [N, C, Ho, Wo], W [C, 1, kh, kw]) -> dX [N, C, oh, ow]
 *     attributes kh, kw, sh, sw, ph, pw (begin pads of the forward conv), dh, dw, oh, ow (X's spatial size)
 *     dX[n, c, y, x] = sum over taps (u, v) with y = sh i + dh u - ph, x = sw j + dw v - pw, 0 <= i < Ho, 0 <= j < Wo
 *                      of W[c, 0, u, v] dY[n, c, i, j]
 *
 * onnxruntime 1.19.2 runs a grouped ConvTranspose as one small GEMM and col2im per image and group: for a
 * depthwise conv that is one GEMM of a single input channel per image and channel, 12% of mobilenet_v2's profiled
 * FW8/BW8 step for its four strided depthwise convs. Here each task takes a run of (image, channel) planes; a dX row
 * y is built column phase by column phase (x = r + sw m): for a phase the contributing taps are fixed, each adding
 * W[u, v] times a contiguous run of dY's row i to a contiguous buffer (vectorized by the compiler), and the buffer
 * is then written to the row's columns r, r + sw, ... Every dX element sums its taps in (u, v) order, in float,
 * starting from 0; a tap that lands on no position adds nothing. The order differs from onnxruntime's GEMM, so the
 * values agree to float rounding (tests/passes/test_dw_convt.py: against float64, within a bound from the taps).
 */
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"   /* the slot table, shared with fused_ops.c */
static const OrtApi* g_api_dwt;
#define DAPI(name, type) ((type)g_api_dwt->slot[S_##name])

typedef struct {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
} DwtAttrs;

typedef struct {
  const float *dy, *w;
  float* dx;
  DwtAttrs a;
  int64_t n, c, ho, wo, planes_per_task;
  int vector;   /* 1: the AVX-512 stride-2 path (sw == 2, kw <= 32, the sizes in int32 lanes) */
} DwtJob;

static int vector_ok(const DwtAttrs* a, int64_t wo) {
#if defined(__AVX512F__)
  return a->sw == 2 && a->kw <= 32 && a->ow < (1 << 30) && wo < (1 << 30) && a->pw + a->dw * a->kw < (1 << 29);
#else
  (void)a, (void)wo;
  return 0;
#endif
}

/* floor division for a possibly negative numerator and a positive divisor */
static inline int64_t fdiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

/* one (image, channel) plane; buf holds at least ceil(ow / sw) floats */
static void dwt_plane(const DwtAttrs* a, const float* restrict dy, const float* restrict w, float* restrict dx,
                      int64_t ho, int64_t wo, float* restrict buf) {
  for (int64_t y = 0; y < a->oh; ++y) {
    float* restrict row = dx + y * a->ow;
    for (int64_t r = 0; r < a->sw && r < a->ow; ++r) {
      const int64_t mr = (a->ow - r + a->sw - 1) / a->sw;   /* columns r, r + sw, ... of the row */
      memset(buf, 0, (size_t)mr * sizeof *buf);
      for (int64_t u = 0; u < a->kh; ++u) {
        const int64_t ty = y + a->ph - a->dh * u;
        if (ty < 0 || ty % a->sh) continue;
        const int64_t i = ty / a->sh;
        if (i >= ho) continue;
        const float* restrict src = dy + i * wo;
        for (int64_t v = 0; v < a->kw; ++v) {
          const int64_t tx = r + a->pw - a->dw * v;   /* x + pw - dw v = sw j with x = r + sw m: j = m + tx / sw */
          if (((tx % a->sw) + a->sw) % a->sw) continue;
          const int64_t jo = fdiv(tx, a->sw);
          int64_t m0 = -jo > 0 ? -jo : 0, m1 = wo - jo < mr ? wo - jo : mr;   /* 0 <= m + jo < wo, m < mr */
          const float wv = w[u * a->kw + v];
          const float* restrict s = src + jo;
          for (int64_t m = m0; m < m1; ++m) buf[m] += wv * s[m];
        }
      }
      for (int64_t m = 0; m < mr; ++m) row[r + a->sw * m] = buf[m];
    }
  }
}

#if defined(__AVX512F__)
/* stride 2 along x (every strided depthwise conv of the corpus): a dX row's even and odd columns as two 16-lane
 * accumulators over m (x = 2 m + r), the taps in the plain path's (u, v) order with the same mul-then-add roundings
 * (bitwise the plain path's values), then interleaved into 32 consecutive columns. */
static void dwt_plane_sw2(const DwtAttrs* a, const float* restrict dy, const float* restrict w, float* restrict dx,
                          int64_t ho, int64_t wo) {
  int64_t jo[32];
  int cls[32];
  const int64_t kw = a->kw < 32 ? a->kw : 32;
  for (int64_t v = 0; v < kw; ++v) {   /* tap v adds to the phase r whose x + pw - dw v is even, at j = m + jo */
    const int64_t t0 = a->pw - a->dw * v;
    cls[v] = (int)(((t0 % 2) + 2) % 2);
    jo[v] = fdiv(t0 + cls[v], 2);
  }
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const int64_t mcount[2] = {(a->ow + 1) / 2, a->ow / 2};
  for (int64_t y = 0; y < a->oh; ++y) {
    float* restrict row = dx + y * a->ow;
    for (int64_t m0 = 0; m0 < mcount[0]; m0 += 16) {
      __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
      const __m512i m = _mm512_add_epi32(lane, _mm512_set1_epi32((int)m0));
      __mmask16 in_phase[2];
      for (int r = 0; r < 2; ++r) in_phase[r] = _mm512_cmp_epi32_mask(m, _mm512_set1_epi32((int)mcount[r]), _MM_CMPINT_LT);
      for (int64_t u = 0; u < a->kh; ++u) {
        const int64_t ty = y + a->ph - a->dh * u;
        if (ty < 0 || ty % a->sh) continue;
        const int64_t i = ty / a->sh;
        if (i >= ho) continue;
        const float* src = dy + i * wo;
        for (int64_t v = 0; v < kw; ++v) {
          const __m512i j = _mm512_add_epi32(m, _mm512_set1_epi32((int)jo[v]));
          const __mmask16 ok = in_phase[cls[v]] & _mm512_cmp_epi32_mask(j, _mm512_setzero_si512(), _MM_CMPINT_NLT) &
                               _mm512_cmp_epi32_mask(j, _mm512_set1_epi32((int)wo), _MM_CMPINT_LT);
          if (!ok) continue;
          const __m512 d = _mm512_maskz_loadu_ps(ok, src + m0 + jo[v]);
          acc[cls[v]] = _mm512_mask_add_ps(acc[cls[v]], ok, acc[cls[v]], _mm512_mul_ps(_mm512_set1_ps(w[u * a->kw + v]), d));
        }
      }
      const int64_t x0 = 2 * m0, left = a->ow - x0;
      const __mmask16 s0 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u);
      const __mmask16 s1 = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1u);
      _mm512_mask_storeu_ps(row + x0, s0, _mm512_permutex2var_ps(acc[0], lo_idx, acc[1]));
      if (s1) _mm512_mask_storeu_ps(row + x0 + 16, s1, _mm512_permutex2var_ps(acc[0], hi_idx, acc[1]));
    }
  }
}
#endif

static void dwt_task(void* p, size_t t) {
  const DwtJob* j = (const DwtJob*)p;
  const int64_t total = j->n * j->c, p0 = (int64_t)t * j->planes_per_task;
  const int64_t p1 = p0 + j->planes_per_task < total ? p0 + j->planes_per_task : total;
  float stack[1024];
  const int64_t need = (j->a.ow + j->a.sw - 1) / j->a.sw;
  float* buf = need <= 1024 ? stack : (float*)malloc((size_t)need * sizeof(float));
  if (!buf) return;   /* checked by the caller's allocation test below: cannot happen for need <= 1024 */
  for (int64_t q = p0; q < p1; ++q) {
    const int64_t c = q % j->c;
    const float *dy = j->dy + q * j->ho * j->wo, *w = j->w + c * j->a.kh * j->a.kw;
    float* dx = j->dx + q * j->a.oh * j->a.ow;
#if defined(__AVX512F__)
    if (j->vector) {
      dwt_plane_sw2(&j->a, dy, w, dx, j->ho, j->wo);
      continue;
    }
#endif
    dwt_plane(&j->a, dy, w, dx, j->ho, j->wo, buf);
  }
  if (buf != stack) free(buf);
}

/* The kernel on plain arrays, for tests and probes (one thread): path 1 = the AVX-512 stride-2 path (returns 2
 * where this build or the shape has none), 0 = plain C. */
int fg_dw_convt(const float* dy, const float* w, float* dx, int64_t n, int64_t c, int64_t ho, int64_t wo,
                const int64_t* attrs /* kh kw sh sw ph pw dh dw oh ow */, int path) {
  DwtJob j = {dy, w, dx, {attrs[0], attrs[1], attrs[2], attrs[3], attrs[4], attrs[5], attrs[6], attrs[7], attrs[8],
                          attrs[9]}, n, c, ho, wo, n * c, 0};
  if (j.a.sh < 1 || j.a.sw < 1 || j.a.dh < 1 || j.a.dw < 1) return 1;
  if (path == 1 && !(j.vector = vector_ok(&j.a, wo))) return 2;
  if (n && c) dwt_task(&j, 0);
  return 0;
}

/* ---- the op -------------------------------------------------------------------------------------------------- */
static const char* const DWT_ATTRS[10] = {"kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "oh", "ow"};

static OrtStatus* dfail(const char* msg) { return DAPI(CreateStatus, CreateStatusFn)(1, msg); }

typedef struct {
  DwtAttrs a;
} DwtKernel;

static OrtStatus* d_input(void* ctx, size_t index, const float** data, int64_t* dims, size_t* rank) {
  OrtStatus* st = fg_float_input(g_api_dwt, ctx, index, "fracgraph DepthwiseConvT: dY and W must be 4-D", data, dims,
                                 rank, NULL);
  return st ? st : *rank != 4 ? dfail("fracgraph DepthwiseConvT: dY and W must be 4-D") : NULL;
}

static OrtStatus* dwt_compute(void* kernel, void* ctx) {
  const DwtKernel* k = (const DwtKernel*)kernel;
  int64_t yd[16], wd[16];   /* fg_float_input writes up to rank 16 before the rank-4 check */
  size_t rank;
  void* out;
  OrtStatus* st;
  DwtJob j;
  if ((st = d_input(ctx, 0, &j.dy, yd, &rank)) || (st = d_input(ctx, 1, &j.w, wd, &rank))) return st;
  j.a = k->a;
  if (wd[0] != yd[1] || wd[1] != 1 || wd[2] != j.a.kh || wd[3] != j.a.kw)
    return dfail("fracgraph DepthwiseConvT: W must be [C, 1, kh, kw] with dY's C channels");
  j.n = yd[0], j.c = yd[1], j.ho = yd[2], j.wo = yd[3];
  j.vector = vector_ok(&j.a, j.wo);
  const int64_t odims[4] = {j.n, j.c, j.a.oh, j.a.ow};
  if ((st = DAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, odims, 4, &out))) return st;
  if ((st = DAPI(GetTensorMutableData, GetDataFn)(out, (void**)&j.dx))) return st;
  const int64_t plane = j.a.oh * j.a.ow > 0 ? j.a.oh * j.a.ow : 1, total = j.n * j.c;
  if (!total) return NULL;
  j.planes_per_task = 16384 / plane > 0 ? 16384 / plane : 1;
  const size_t tasks = (size_t)((total + j.planes_per_task - 1) / j.planes_per_task);
  if ((j.a.ow + j.a.sw - 1) / j.a.sw > 1024) {   /* the buffer is malloc'd per task: check it can be */
    void* probe = malloc((size_t)((j.a.ow + j.a.sw - 1) / j.a.sw) * sizeof(float));
    if (!probe) return dfail("fracgraph DepthwiseConvT: out of memory");
    free(probe);
  }
  if (tasks <= 1) {
    dwt_task(&j, 0);
    return NULL;
  }
  return DAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, dwt_task, tasks, 0, &j);
}

/* ---- registration -------------------------------------------------------------------------------------------- */
static FgOp g_dwt_op;
static OrtStatus* d_create(const OrtCustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)op, (void)api;
  DwtKernel* k = (DwtKernel*)calloc(1, sizeof *k);
  if (!k) return dfail("fracgraph DepthwiseConvT: out of memory");
  int64_t* dst = &k->a.kh;
  for (int i = 0; i < 10; ++i) {
    OrtStatus* st = DAPI(KernelInfoGetAttribute_int64, AttrIntFn)(info, DWT_ATTRS[i], &dst[i]);
    if (st) {
      free(k);
      return st;
    }
  }
  if (k->a.sh < 1 || k->a.sw < 1 || k->a.dh < 1 || k->a.dw < 1 || k->a.oh < 0 || k->a.ow < 0) {
    free(k);
    return dfail("fracgraph DepthwiseConvT: strides and dilations must be >= 1");
  }
  *out = k;
  return NULL;
}
OrtStatus* fg_dw_convt_register(void* domain, const void* api) {
  g_api_dwt = (const OrtApi*)api;
  return fg_op_add(g_api_dwt, domain, &g_dwt_op, "DepthwiseConvT", 2, 1, 0, d_create, fg_op_free, dwt_compute);
}
