/* fracgraph's GELU gradient: onnxruntime's com.microsoft GeluGrad as one multithreaded, vectorized pass.
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_gelu_register to add this file's op to the domain "ai.fracgraph", written by passes/gelu_grad.py:
 *
 *   GeluGrad(dY, X) -> dX        dX = dY * g(X),  g(x) = Phi(x) + x phi(x)   (the exact, erf GELU's derivative)
 *   FastGeluGrad(dY, X) -> dX    dX = dY * f(X),  the derivative of the tanh approximation (below)
 *
 * onnxruntime 1.19.2 runs its GeluGrad as one Eigen expression on one thread (about 4x PyTorch's gelu backward per
 * call, 12% of convnext_atto's step). Here the tensor is cut into chunks run on the session's threads, each chunk
 * 16 lanes at a time with AVX-512 where the library is compiled for it, plain C otherwise. The two paths do the
 * same IEEE operations in the same order (explicit fused multiply-adds, IEEE division, round-to-nearest), so they
 * give bitwise the same values (tests/passes/test_gelu_grad.py checks that, and both against float64).
 *
 * The math, for a = min(|x|, A_MAX):
 *
 *   E = exp(-a^2 / 2)              a^2 split exactly into p + pe (pe = fma(a, a, -p)), so the argument is exact to
 *                                  float rounding of the reduced argument: exp(-p/2) with -pe/2 added to it
 *   h = Phi(-a) = erfc(a / sqrt2) / 2 = t E exp(P(t)) / 2,   t = 1 / (1 + a / (2 sqrt2))
 *                                  P: the Chebyshev fit of erfc in Numerical Recipes (erfcc, fractional error
 *                                  below 1.2e-7 for every argument), so h keeps its relative accuracy in the tail
 *   Phi(x) = 1 - h for x > 0, h otherwise;  phi(x) = E / sqrt(2 pi);  g = Phi(x) + x phi(x)
 *
 * exp is the Cephes single-precision form: n = round(v log2 e), r = v - n ln2 (two-part ln2 by fma), a degree-7
 * polynomial for e^r on |r| <= ln2/2, times 2^n built in the exponent bits. For |x| > A_MAX (13) E and h are
 * taken as 0 (true values below 2e-37). The error bound derived in tests/passes/test_gelu_grad.py (EPS there):
 *
 *   |g_computed - g(x)| <= EPS (Phi(x) + |x| phi(x)) + 2e-36,   EPS = 2.5e-6
 *
 * relative where Phi and x phi do not cancel, and relative to the terms' size near g's root (x = -0.7518), where no
 * float evaluation can be relative. onnxruntime's Eigen expression is accurate to 2.4e-7 absolute only (its erf
 * and clamped exp: relative errors up to 1e4 for x < -3, and 1.35 for x = 3e38, where g is 1). Non-finite values
 * propagate as in onnxruntime: NaN in x or dY gives NaN, x = +-inf gives dY * (+-inf), an infinite dY gives +-inf
 * where g is not 0 (NaN where g is exactly 0, x < -13, where onnxruntime's clamped exp leaves g ~ -1e-38).
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
static const OrtApi* g_api_gelu;
#define GAPI(name, type) ((type)g_api_gelu->slot[S_##name])

/* ---- constants --------------------------------------------------------------------------------------------- */
#define A_MAX 13.0f                       /* beyond: E and h are 0 (exp(-84.5) = 2e-37) */
#define C_T 0.353553390593273762f         /* 1 / (2 sqrt 2): t = 2 / (2 + a / sqrt 2) = 1 / (1 + a C_T) */
#define INV_SQRT_2PI 0.398942280401432678f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693145751953125f         /* ln 2 = LN2_HI + LN2_LO; LN2_HI has 12 trailing zero bits */
#define LN2_LO 1.42860682030941723e-6f
/* Cephes expf: e^r = 1 + r + r^2 (E0 + E1 r + ... + E5 r^5) on |r| <= ln2/2 */
#define E5 1.9875691500e-4f
#define E4 1.3981999507e-3f
#define E3 8.3334519073e-3f
#define E2 4.1665795894e-2f
#define E1 1.6666665459e-1f
#define E0 5.0000001201e-1f
/* Numerical Recipes erfcc: erfc(z) = t exp(-z^2 + P(t)), t = 2 / (2 + z), P(t) = sum P_k t^k */
#define P0 -1.26551223f
#define P1 1.00002368f
#define P2 0.37409196f
#define P3 0.09678418f
#define P4 -0.18628806f
#define P5 0.27886807f
#define P6 -1.13520398f
#define P7 1.48851587f
#define P8 -0.82215223f
#define P9 0.17087277f

/* ---- the plain-C path ---------------------------------------------------------------------------------------- */
/* e^(v + c) for v in [-84.5, 0.5], |c| tiny (the exactly split part of the argument) */
static inline float exp_c(float v, float c) {
  const float n = nearbyintf(v * LOG2E);
  float r = fmaf(n, -LN2_HI, v);
  r = fmaf(n, -LN2_LO, r);
  r = r + c;
  float q = fmaf(E5, r, E4);
  q = fmaf(q, r, E3);
  q = fmaf(q, r, E2);
  q = fmaf(q, r, E1);
  q = fmaf(q, r, E0);
  float y = fmaf(q, r * r, r);
  y = y + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

static inline float gelu_grad_c(float dy, float x) {
  const float a = fabsf(x);
  const float ac = a < A_MAX ? a : A_MAX;        /* NaN -> A_MAX: the math below stays finite */
  const float p = ac * ac;
  const float pe = fmaf(ac, ac, -p);
  float e = exp_c(-0.5f * p, -0.5f * pe);
  const float t = 1.0f / fmaf(ac, C_T, 1.0f);
  float q = fmaf(P9, t, P8);
  q = fmaf(q, t, P7);
  q = fmaf(q, t, P6);
  q = fmaf(q, t, P5);
  q = fmaf(q, t, P4);
  q = fmaf(q, t, P3);
  q = fmaf(q, t, P2);
  q = fmaf(q, t, P1);
  q = fmaf(q, t, P0);
  float h = (0.5f * t * exp_c(q, 0.0f)) * e;
  if (a > A_MAX && a < INFINITY) e = 0.0f, h = 0.0f;   /* finite beyond A_MAX; +-inf keeps e > 0: g = +-inf */
  const float big = x > 0.0f ? 1.0f - h : h;    /* Phi(x) */
  const float g = big + x * (e * INV_SQRT_2PI);
  return dy * g;
}

static void gelu_grad_plain(const float* dy, const float* x, float* dx, size_t a, size_t b) {
  for (size_t i = a; i < b; ++i) dx[i] = gelu_grad_c(dy[i], x[i]);
}

/* ---- FastGeluGrad: the tanh GELU's derivative ------------------------------------------------------------------
 * GPT-2's gelu_new (also GPT-Neo, GPT-J, Phi, BLOOM), which onnxruntime fuses into com.microsoft FastGelu,
 * y = x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). Its gradient op FastGeluGrad runs on one thread in
 * onnxruntime 1.19.2 (31% of GPT-2's FW8/BW8 step at width 256, context 128). With E = exp(-2|u|) and
 * s = 1 / (1 + E): 1 + tanh(u) = 2s (u >= 0) or 2Es (u < 0), 1 - tanh(u)^2 = 4 E s^2, so
 *
 *   f(x) = (x > 0 ? s : E s) + 2 x E s^2 u'(x),   u'(x) = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
 *
 * with no cancellation inside a term (u's sign is x's): each term is accurate relative to itself. E's argument
 * carries u's rounding (5 U relative: x^2, the two constants, the fma and the product), i.e. 10 U |u| relative
 * in E. Beyond |u| = 42 (|x| > 9.2) E (< 3e-37) and the second term (< 5e-35) are taken as 0: f = 1 or 0; x = +-inf
 * gives dY or 0 (the limits), NaN gives NaN. tests/passes/test_gelu_grad.py derives the bound. */
#define FG_KA 0.797884560802865356f    /* sqrt(2/pi) */
#define FG_KAG 0.0356774081363001f     /* sqrt(2/pi) * 0.044715 */
#define FG_KB 0.107032224408900f       /* 3 * sqrt(2/pi) * 0.044715 */
#define FG_UMAX 42.0f                  /* beyond: E = exp(-2|u|) < 3e-37 taken as 0 (exp_c's range ends at -84.5) */

static inline float fast_gelu_grad_c(float dy, float x) {
  const float x2 = x * x;
  const float u = x * fmaf(FG_KAG, x2, FG_KA);
  const float a = fabsf(u);
  const float ac = a < FG_UMAX ? a : FG_UMAX;    /* NaN -> FG_UMAX: the math below stays finite */
  float e = exp_c(-2.0f * ac, 0.0f);
  const int beyond = a > FG_UMAX;                 /* +-inf included, NaN not */
  if (beyond) e = 0.0f;
  const float s = 1.0f / (1.0f + e);
  const float first = x > 0.0f ? s : e * s;
  float second = ((2.0f * x) * ((e * s) * s)) * fmaf(FG_KB, x2, FG_KA);
  if (beyond) second = 0.0f;
  return dy * (first + second);
}

static void fast_gelu_grad_plain(const float* dy, const float* x, float* dx, size_t a, size_t b) {
  for (size_t i = a; i < b; ++i) dx[i] = fast_gelu_grad_c(dy[i], x[i]);
}

/* ---- the AVX-512 path: the same operations, 16 lanes ---------------------------------------------------------- */
#if defined(__AVX512F__)
static inline __m512 exp_v(__m512 v, __m512 c) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), v);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
  r = _mm512_add_ps(r, c);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(E5), r, _mm512_set1_ps(E4));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(E3));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(E2));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(E1));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(E0));
  __m512 y = _mm512_fmadd_ps(q, _mm512_mul_ps(r, r), r);
  y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}

static inline __m512 gelu_grad_v(__m512 dy, __m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __mmask16 beyond = _mm512_cmp_ps_mask(a, _mm512_set1_ps(A_MAX), _CMP_GT_OQ) &
                          _mm512_cmp_ps_mask(a, _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
  /* min(a, A_MAX) with NaN -> A_MAX, as the C path's a < A_MAX ? a : A_MAX */
  const __m512 ac = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(A_MAX), _CMP_LT_OQ), _mm512_set1_ps(A_MAX), a);
  const __m512 p = _mm512_mul_ps(ac, ac);
  const __m512 pe = _mm512_fmsub_ps(ac, ac, p);
  const __m512 half = _mm512_set1_ps(0.5f), mhalf = _mm512_set1_ps(-0.5f);
  __m512 e = exp_v(_mm512_mul_ps(mhalf, p), _mm512_mul_ps(mhalf, pe));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(ac, _mm512_set1_ps(C_T), one));
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(P9), t, _mm512_set1_ps(P8));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(P7));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(P6));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(P5));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(P4));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(P3));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(P2));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(P1));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(P0));
  __m512 h = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(half, t), exp_v(q, _mm512_setzero_ps())), e);
  e = _mm512_mask_mov_ps(e, beyond, _mm512_setzero_ps());
  h = _mm512_mask_mov_ps(h, beyond, _mm512_setzero_ps());
  const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 big = _mm512_mask_blend_ps(pos, h, _mm512_sub_ps(one, h));
  const __m512 g = _mm512_add_ps(big, _mm512_mul_ps(x, _mm512_mul_ps(e, _mm512_set1_ps(INV_SQRT_2PI))));
  return _mm512_mul_ps(dy, g);
}

static inline __m512 fast_gelu_grad_v(__m512 dy, __m512 x) {
  const __m512 x2 = _mm512_mul_ps(x, x);
  const __m512 u = _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_set1_ps(FG_KAG), x2, _mm512_set1_ps(FG_KA)));
  const __m512 a = _mm512_abs_ps(u);
  const __m512 umax = _mm512_set1_ps(FG_UMAX);
  const __m512 ac = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, umax, _CMP_LT_OQ), umax, a);
  const __mmask16 beyond = _mm512_cmp_ps_mask(a, umax, _CMP_GT_OQ);
  __m512 e = exp_v(_mm512_mul_ps(_mm512_set1_ps(-2.0f), ac), _mm512_setzero_ps());
  e = _mm512_mask_mov_ps(e, beyond, _mm512_setzero_ps());
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, e));
  const __m512 es = _mm512_mul_ps(e, s);
  const __m512 first = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), es, s);
  __m512 second = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2.0f), x), _mm512_mul_ps(es, s)),
                                _mm512_fmadd_ps(_mm512_set1_ps(FG_KB), x2, _mm512_set1_ps(FG_KA)));
  second = _mm512_mask_mov_ps(second, beyond, _mm512_setzero_ps());
  return _mm512_mul_ps(dy, _mm512_add_ps(first, second));
}

static void fast_gelu_grad_avx512(const float* dy, const float* x, float* dx, size_t a, size_t b) {
  size_t i = a;
  for (; i + 16 <= b; i += 16)
    _mm512_storeu_ps(dx + i, fast_gelu_grad_v(_mm512_loadu_ps(dy + i), _mm512_loadu_ps(x + i)));
  if (i < b) {
    const __mmask16 m = (__mmask16)((1u << (b - i)) - 1u);
    _mm512_mask_storeu_ps(dx + i, m, fast_gelu_grad_v(_mm512_maskz_loadu_ps(m, dy + i), _mm512_maskz_loadu_ps(m, x + i)));
  }
}

static void gelu_grad_avx512(const float* dy, const float* x, float* dx, size_t a, size_t b) {
  size_t i = a;
  for (; i + 16 <= b; i += 16)
    _mm512_storeu_ps(dx + i, gelu_grad_v(_mm512_loadu_ps(dy + i), _mm512_loadu_ps(x + i)));
  if (i < b) {
    const __mmask16 m = (__mmask16)((1u << (b - i)) - 1u);
    _mm512_mask_storeu_ps(dx + i, m, gelu_grad_v(_mm512_maskz_loadu_ps(m, dy + i), _mm512_maskz_loadu_ps(m, x + i)));
  }
}
#endif

/* 1 when this build has the AVX-512 path (the library is compiled with -march=native for the machine running it) */
int fg_gelu_avx512(void) {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

/* The kernel on plain arrays, for tests and probes: path 1 = AVX-512 (returns 1 where not compiled), 0 = plain C. */
int fg_gelu_grad(const float* dy, const float* x, float* dx, size_t n, int path) {
  if (path == 1) {
#if defined(__AVX512F__)
    gelu_grad_avx512(dy, x, dx, 0, n);
    return 0;
#else
    return 1;
#endif
  }
  gelu_grad_plain(dy, x, dx, 0, n);
  return 0;
}

/* FastGeluGrad's kernel on plain arrays, as fg_gelu_grad. */
int fg_fast_gelu_grad(const float* dy, const float* x, float* dx, size_t n, int path) {
  if (path == 1) {
#if defined(__AVX512F__)
    fast_gelu_grad_avx512(dy, x, dx, 0, n);
    return 0;
#else
    return 1;
#endif
  }
  fast_gelu_grad_plain(dy, x, dx, 0, n);
  return 0;
}

/* ---- the op -------------------------------------------------------------------------------------------------- */
#define GELU_CHUNK 16384   /* elements per task: a multiple of 16, 64 KB of each tensor */

typedef struct {
  const float *dy, *x;
  float* dx;
  size_t n;
  int fast;   /* 1: FastGeluGrad */
} GJob;

static void gelu_chunk(void* p, size_t c) {
  const GJob* j = (const GJob*)p;
  const size_t a = c * GELU_CHUNK, b = a + GELU_CHUNK < j->n ? a + GELU_CHUNK : j->n;
#if defined(__AVX512F__)
  (j->fast ? fast_gelu_grad_avx512 : gelu_grad_avx512)(j->dy, j->x, j->dx, a, b);
#else
  (j->fast ? fast_gelu_grad_plain : gelu_grad_plain)(j->dy, j->x, j->dx, a, b);
#endif
}

static OrtStatus* gfail(const char* msg) { return GAPI(CreateStatus, CreateStatusFn)(1, msg); }


static OrtStatus* gelu_run(void* ctx, int fast) {
  void* out;
  int64_t dims[16], xdims[16];
  size_t rank, xrank, n, xn;
  OrtStatus* st;
  GJob j;
  j.fast = fast;
  const char* const too_high = fast ? "fracgraph FastGeluGrad: tensors above rank 16 are not supported"
                                    : "fracgraph GeluGrad: tensors above rank 16 are not supported";
  if ((st = fg_float_input(g_api_gelu, ctx, 0, too_high, &j.dy, dims, &rank, &n)) ||
      (st = fg_float_input(g_api_gelu, ctx, 1, too_high, &j.x, xdims, &xrank, &xn)))
    return st;
  if (xn != n)
    return gfail(fast ? "fracgraph FastGeluGrad: dY and X have different element counts"
                      : "fracgraph GeluGrad: dY and X have different element counts");
  if ((st = GAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, xdims, xrank, &out))) return st;
  if ((st = GAPI(GetTensorMutableData, GetDataFn)(out, (void**)&j.dx))) return st;
  j.n = n;
  const size_t tasks = (n + GELU_CHUNK - 1) / GELU_CHUNK;
  if (tasks <= 1) {
    if (n) gelu_chunk(&j, 0);
    return NULL;
  }
  return GAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, gelu_chunk, tasks, 0, &j);
}

static OrtStatus* gelu_compute(void* kernel, void* ctx) {
  (void)kernel;
  return gelu_run(ctx, 0);
}

static OrtStatus* fast_gelu_compute(void* kernel, void* ctx) {
  (void)kernel;
  return gelu_run(ctx, 1);
}

/* ---- registration -------------------------------------------------------------------------------------------- */
static FgOp g_gelu_op, g_fast_gelu_op;

OrtStatus* fg_gelu_register(void* domain, const void* api) {
  g_api_gelu = (const OrtApi*)api;
  OrtStatus* st = fg_op_add(g_api_gelu, domain, &g_gelu_op, "GeluGrad", 2, 1, 0, fg_op_stateless, fg_op_keep,
                            gelu_compute);
  if (st) return st;
  return fg_op_add(g_api_gelu, domain, &g_fast_gelu_op, "FastGeluGrad", 2, 1, 0, fg_op_stateless, fg_op_keep,
                   fast_gelu_compute);
}
