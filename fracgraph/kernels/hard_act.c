/* fracgraph's HardSwish and HardSigmoid, forward and backward, each one multithreaded pass (passes/hard_act.py).
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_hard_act_register to add this file's two ops to the domain "ai.fracgraph":
 *
 *   HardAct(X) -> Y                 t = X * alpha + beta;  c = min(max(t, 0), 1);  Y = swish ? X * c : c
 *   HardActGrad(dY, X) -> dX        m = (t >= 0 && t <= 1) ? 1 : 0
 *                                   swish:  dX = dY * c + ((dY * X) * m) * alpha;   else  dX = (dY * m) * alpha
 *   attributes alpha, beta (floats), swish (0 or 1)
 *
 * onnxruntime 1.19.2 has no gradient for HardSwish or HardSigmoid, so fracgraph's lowering writes them as Mul, Add,
 * Clip (and Mul) and onnxruntime's gradient builder adds Mul, ClipGrad, Mul (and Mul, Sum) behind them: 4 + 5 full
 * passes for a HardSwish, each reading and writing the whole tensor (Mul alone was 10-13% of mobilenet_v3_small's
 * and lcnet's profiled FW8/BW8 steps). These kernels do the same float operations in the same order, every product
 * and sum rounded to float (the library is compiled with -ffp-contract=off), Clip as onnxruntime's max-then-min and
 * the mask as its ClipGrad's two ordered comparisons, so their values are bitwise the chains' (up to the sign of a
 * zero and NaN propagation in the clip). The backward recomputes t and c from X instead of reading the forward's
 * intermediate tensors, which are then no longer kept between the passes.
 */
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"   /* the slot table, shared with fused_ops.c */
static const OrtApi* g_api_hard;
#define HAPI(name, type) ((type)g_api_hard->slot[S_##name])

typedef struct {
  float alpha, beta;
  int64_t swish;
  int grad;   /* 0: HardAct, 1: HardActGrad */
} HardKernel;

typedef struct {
  const HardKernel* k;
  const float *x, *dy;
  float* out;
  size_t n;
} HardJob;

static inline float clip01(float t) {   /* onnxruntime's Clip: X.cwiseMax(0).cwiseMin(1) */
  const float m = t < 0.0f ? 0.0f : t;
  return 1.0f < m ? 1.0f : m;
}

static void hard_plain(const HardJob* j, size_t a, size_t b) {
  const float alpha = j->k->alpha, beta = j->k->beta;
  const int swish = j->k->swish != 0;
  for (size_t i = a; i < b; ++i) {
    const float x = j->x[i], t = x * alpha + beta, c = clip01(t);
    if (!j->k->grad) {
      j->out[i] = swish ? x * c : c;
    } else {
      const float m = (t >= 0.0f && t <= 1.0f) ? 1.0f : 0.0f, dy = j->dy[i];
      j->out[i] = swish ? dy * c + ((dy * x) * m) * alpha : (dy * m) * alpha;
    }
  }
}

#if defined(__AVX512F__)
static inline __m512 hard_vec(const HardJob* j, __m512 x, __m512 dy) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), alpha = _mm512_set1_ps(j->k->alpha);
  const __m512 t = _mm512_add_ps(_mm512_mul_ps(x, alpha), _mm512_set1_ps(j->k->beta));
  __m512 c = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(t, zero, _CMP_LT_OQ), t, zero);      /* t < 0 ? 0 : t */
  c = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(one, c, _CMP_LT_OQ), c, one);               /* 1 < c ? 1 : c */
  if (!j->k->grad) return j->k->swish ? _mm512_mul_ps(x, c) : c;
  const __mmask16 in = _mm512_cmp_ps_mask(t, zero, _CMP_GE_OQ) & _mm512_cmp_ps_mask(t, one, _CMP_LE_OQ);
  const __m512 m = _mm512_maskz_mov_ps(in, one);
  if (!j->k->swish) return _mm512_mul_ps(_mm512_mul_ps(dy, m), alpha);
  return _mm512_add_ps(_mm512_mul_ps(dy, c), _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(dy, x), m), alpha));
}

static void hard_avx512(const HardJob* j, size_t a, size_t b) {
  size_t i = a;
  for (; i + 16 <= b; i += 16)
    _mm512_storeu_ps(j->out + i, hard_vec(j, _mm512_loadu_ps(j->x + i), j->dy ? _mm512_loadu_ps(j->dy + i) : _mm512_setzero_ps()));
  if (i < b) {
    const __mmask16 m = (__mmask16)((1u << (b - i)) - 1u);
    _mm512_mask_storeu_ps(j->out + i, m, hard_vec(j, _mm512_maskz_loadu_ps(m, j->x + i),
                                                  j->dy ? _mm512_maskz_loadu_ps(m, j->dy + i) : _mm512_setzero_ps()));
  }
}
#endif

/* The kernels on plain arrays, for tests: grad 0/1, path 1 = AVX-512 (returns 1 where not compiled), 0 = plain C. */
int fg_hard_act(const float* dy, const float* x, float* out, size_t n, float alpha, float beta, int swish, int grad,
                int path) {
  const HardKernel k = {alpha, beta, swish, grad};
  const HardJob j = {&k, x, grad ? dy : NULL, out, n};
  if (path == 1) {
#if defined(__AVX512F__)
    hard_avx512(&j, 0, n);
    return 0;
#else
    return 1;
#endif
  }
  hard_plain(&j, 0, n);
  return 0;
}

/* ---- the ops ------------------------------------------------------------------------------------------------- */
#define HARD_CHUNK 32768   /* elements per task: a multiple of 16 */

static void hard_chunk(void* p, size_t c) {
  const HardJob* j = (const HardJob*)p;
  const size_t a = c * HARD_CHUNK, b = a + HARD_CHUNK < j->n ? a + HARD_CHUNK : j->n;
#if defined(__AVX512F__)
  hard_avx512(j, a, b);
#else
  hard_plain(j, a, b);
#endif
}

static OrtStatus* hfail(const char* msg) { return HAPI(CreateStatus, CreateStatusFn)(1, msg); }

static OrtStatus* h_input(void* ctx, size_t index, const float** data, int64_t* dims, size_t* rank, size_t* count) {
  return fg_float_input(g_api_hard, ctx, index, "fracgraph HardAct: tensors above rank 16 are not supported", data,
                        dims, rank, count);
}

static OrtStatus* hard_compute(void* kernel, void* ctx) {
  const HardKernel* k = (const HardKernel*)kernel;
  int64_t dims[16], xdims[16];
  size_t rank, xrank, n, xn;
  void* out;
  OrtStatus* st;
  HardJob j = {k, NULL, NULL, NULL, 0};
  const size_t xi = k->grad ? 1 : 0;
  if ((st = h_input(ctx, xi, &j.x, xdims, &xrank, &xn))) return st;
  if (k->grad) {
    if ((st = h_input(ctx, 0, &j.dy, dims, &rank, &n))) return st;
    if (n != xn) return hfail("fracgraph HardActGrad: dY and X have different element counts");
  }
  if ((st = HAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, xdims, xrank, &out))) return st;
  if ((st = HAPI(GetTensorMutableData, GetDataFn)(out, (void**)&j.out))) return st;
  j.n = xn;
  const size_t tasks = (xn + HARD_CHUNK - 1) / HARD_CHUNK;
  if (tasks <= 1) {
    if (xn) hard_chunk(&j, 0);
    return NULL;
  }
  return HAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, hard_chunk, tasks, 0, &j);
}

/* ---- registration -------------------------------------------------------------------------------------------- */
static FgOp g_hard_ops[2];   /* tag: 0 HardAct, 1 HardActGrad */

static OrtStatus* h_create(const OrtCustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)api;
  HardKernel* k = (HardKernel*)calloc(1, sizeof *k);
  OrtStatus* st;
  if (!k) return hfail("fracgraph HardAct: out of memory");
  k->grad = ((const FgOp*)op)->tag;
  if ((st = HAPI(KernelInfoGetAttribute_float, AttrFloatFn)(info, "alpha", &k->alpha)) ||
      (st = HAPI(KernelInfoGetAttribute_float, AttrFloatFn)(info, "beta", &k->beta)) ||
      (st = HAPI(KernelInfoGetAttribute_int64, AttrIntFn)(info, "swish", &k->swish))) {
    free(k);
    return st;
  }
  *out = k;
  return NULL;
}
OrtStatus* fg_hard_act_register(void* domain, const void* api) {
  g_api_hard = (const OrtApi*)api;
  OrtStatus* st = fg_op_add(g_api_hard, domain, &g_hard_ops[0], "HardAct", 1, 1, 0, h_create, fg_op_free, hard_compute);
  return st ? st : fg_op_add(g_api_hard, domain, &g_hard_ops[1], "HardActGrad", 2, 1, 1, h_create, fg_op_free,
                             hard_compute);
}
