/* fracgraph's Clip gradient: onnxruntime's five-op Clip_Grad chain as one multithreaded, vectorized pass.
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_clip_grad_register to add this file's op to the domain "ai.fracgraph", written by passes/clip_grad.py:
 *
 *   ClipGrad(dY, X, lo, hi) -> dX      dX = dY * (float)(X >= lo && X <= hi)     (lo, hi: one-element tensors)
 *
 * onnxruntime 1.19.2's gradient builder writes Clip's gradient (ReLU6, Hardtanh, the clamps of lowered HardSwish
 * and HardSigmoid) as GreaterOrEqual(X, lo), LessOrEqual(X, hi), And, Cast to float and Mul with dY: five passes
 * over the tensor, three of them single-threaded, 13-15% of mobilenet_v2's profiled FW8/BW8 step. This kernel does
 * the same IEEE operations (two ordered comparisons, false for a NaN X, and the product of dY with exactly 1.0f or
 * 0.0f), so its values are bitwise the chain's, the sign of zero and NaN propagation included (an infinite or NaN
 * dY times 0 is NaN in both). A chain with one bound only passes -inf or +inf for the other (a comparison that is
 * true for every non-NaN X, and X >= lo or X <= hi is already false for a NaN X).
 */
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ort_abi.h"   /* the slot table, shared with fused_ops.c */
static const OrtApi* g_api_clip;
#define CAPI(name, type) ((type)g_api_clip->slot[S_##name])

static void clip_grad_plain(const float* dy, const float* x, float* dx, float lo, float hi, size_t a, size_t b) {
  for (size_t i = a; i < b; ++i) dx[i] = dy[i] * ((x[i] >= lo && x[i] <= hi) ? 1.0f : 0.0f);
}

#if defined(__AVX512F__)
static void clip_grad_avx512(const float* dy, const float* x, float* dx, float lo, float hi, size_t a, size_t b) {
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi), one = _mm512_set1_ps(1.0f);
  size_t i = a;
  for (; i + 16 <= b; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    const __mmask16 in = _mm512_cmp_ps_mask(xv, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(xv, vhi, _CMP_LE_OQ);
    _mm512_storeu_ps(dx + i, _mm512_mul_ps(_mm512_loadu_ps(dy + i), _mm512_maskz_mov_ps(in, one)));
  }
  if (i < b) {
    const __mmask16 m = (__mmask16)((1u << (b - i)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
    const __mmask16 in = _mm512_cmp_ps_mask(xv, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(xv, vhi, _CMP_LE_OQ);
    _mm512_mask_storeu_ps(dx + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + i), _mm512_maskz_mov_ps(in, one)));
  }
}
#endif

/* The kernel on plain arrays, for tests and probes: path 1 = AVX-512 (returns 1 where not compiled), 0 = plain C. */
int fg_clip_grad(const float* dy, const float* x, float* dx, size_t n, float lo, float hi, int path) {
  if (path == 1) {
#if defined(__AVX512F__)
    clip_grad_avx512(dy, x, dx, lo, hi, 0, n);
    return 0;
#else
    return 1;
#endif
  }
  clip_grad_plain(dy, x, dx, lo, hi, 0, n);
  return 0;
}

/* ---- the op -------------------------------------------------------------------------------------------------- */
#define CLIP_CHUNK 32768   /* elements per task: a multiple of 16, 128 KB of each tensor */

typedef struct {
  const float *dy, *x;
  float* dx;
  float lo, hi;
  size_t n;
} CJob;

static void clip_chunk(void* p, size_t c) {
  const CJob* j = (const CJob*)p;
  const size_t a = c * CLIP_CHUNK, b = a + CLIP_CHUNK < j->n ? a + CLIP_CHUNK : j->n;
#if defined(__AVX512F__)
  clip_grad_avx512(j->dy, j->x, j->dx, j->lo, j->hi, a, b);
#else
  clip_grad_plain(j->dy, j->x, j->dx, j->lo, j->hi, a, b);
#endif
}

static OrtStatus* cfail(const char* msg) { return CAPI(CreateStatus, CreateStatusFn)(1, msg); }

static OrtStatus* c_input(void* ctx, size_t index, const float** data, int64_t* dims, size_t* rank, size_t* count) {
  return fg_float_input(g_api_clip, ctx, index, "fracgraph ClipGrad: tensors above rank 16 are not supported", data,
                        dims, rank, count);
}

static OrtStatus* clip_compute(void* kernel, void* ctx) {
  (void)kernel;
  const float *lo, *hi;
  void* out;
  int64_t dims[16], xdims[16], sdims[16];
  size_t rank, xrank, srank, n, xn, lon, hin;
  OrtStatus* st;
  CJob j;
  if ((st = c_input(ctx, 0, &j.dy, dims, &rank, &n)) || (st = c_input(ctx, 1, &j.x, xdims, &xrank, &xn)) ||
      (st = c_input(ctx, 2, &lo, sdims, &srank, &lon)) || (st = c_input(ctx, 3, &hi, sdims, &srank, &hin)))
    return st;
  if (xn != n) return cfail("fracgraph ClipGrad: dY and X have different element counts");
  if (lon != 1 || hin != 1) return cfail("fracgraph ClipGrad: the bounds must be one-element tensors");
  if ((st = CAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, xdims, xrank, &out))) return st;
  if ((st = CAPI(GetTensorMutableData, GetDataFn)(out, (void**)&j.dx))) return st;
  j.lo = *lo, j.hi = *hi, j.n = n;
  const size_t tasks = (n + CLIP_CHUNK - 1) / CLIP_CHUNK;
  if (tasks <= 1) {
    if (n) clip_chunk(&j, 0);
    return NULL;
  }
  return CAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, clip_chunk, tasks, 0, &j);
}

/* ---- registration -------------------------------------------------------------------------------------------- */
static FgOp g_clip_op;

OrtStatus* fg_clip_grad_register(void* domain, const void* api) {
  g_api_clip = (const OrtApi*)api;
  return fg_op_add(g_api_clip, domain, &g_clip_op, "ClipGrad", 4, 1, 0, fg_op_stateless, fg_op_keep, clip_compute);
}
