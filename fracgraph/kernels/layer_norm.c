/* fracgraph's LayerNorm over the last axes: onnxruntime 1.19's LayerNormalization (float X, float statistics) bit
 * for bit, faster.
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_layer_norm_register to add it to the domain "ai.fracgraph", written by passes/ln_forward.py:
 *
 *   LayerNorm(X, scale, bias) -> (Y, mean, inv_std)            attributes axis, epsilon
 *       rows of D = the size of X's axes from `axis` on (scale and bias D values each); per row, in float:
 *       s = sum_h X[h], q = sum_h X[h] * X[h] (both from h = 0 up, one add at a time), mean = s / D,
 *       sd = sqrt(q / D - mean * mean + epsilon), Y[h] = (X[h] - mean) / sd * scale[h] + bias[h],
 *       inv_std = 1 / sd; mean and inv_std of X's dims before `axis`, then 1s.
 *
 * That is onnxruntime's CPU ComputeJob statement for statement (its float build has no fused multiply-add, and
 * this library is built with -ffp-contract=off). What made it slow is the row sums: two chains of D dependent
 * float adds per row (~4 cycles an element). Here LNR_ROWS rows run their chains side by side, each chain still
 * in onnxruntime's order, so every value is the same (tests/passes/test_ln_forward.py: bitwise onnxruntime's op);
 * the elementwise second loop is vectorized. Tasks are blocks of LNR_TASK rows: the same result on any thread
 * count. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

static const OrtApi* g_api_lnr;
#define RAPI(name, type) ((type)g_api_lnr->slot[S_##name])

enum { LNR_ROWS = 8, LNR_TASK = 64 };

typedef struct {
  const float *x, *scale, *bias;
  float *y, *mean, *inv;
  size_t R, D;
  float eps;
} LnrJob;

/* The row sums of LNR_ROWS rows of D floats (row l at x + l * D), each in onnxruntime's order. */
static void lnr_sums(const float* restrict x, size_t D, float* restrict s, float* restrict q) {
  float a[LNR_ROWS] = {0}, b[LNR_ROWS] = {0};
  for (size_t h = 0; h < D; ++h)
    for (int l = 0; l < LNR_ROWS; ++l) {
      const float v = x[l * D + h];
      a[l] += v;
      b[l] += v * v;
    }
  for (int l = 0; l < LNR_ROWS; ++l) s[l] = a[l], q[l] = b[l];
}

/* One row from its sums: the statistics and Y, onnxruntime's statements. */
static inline void lnr_row(const float* restrict x, const float* restrict scale, const float* restrict bias,
                           float* restrict y, size_t D, float eps, float s, float q, float* mean_out, float* inv_out) {
  const float n = (float)(int64_t)D;
  const float mean = s / n;
  const float sd = sqrtf(q / n - mean * mean + eps);
  for (size_t h = 0; h < D; ++h) y[h] = (x[h] - mean) / sd * scale[h] + bias[h];
  *mean_out = mean;
  *inv_out = 1 / sd;
}

static void lnr_task(void* p, size_t t) {
  const LnrJob* j = (const LnrJob*)p;
  const size_t D = j->D, r0 = t * LNR_TASK, r1 = r0 + LNR_TASK < j->R ? r0 + LNR_TASK : j->R;
  float s[LNR_ROWS], q[LNR_ROWS];
  size_t r = r0;
  for (; r + LNR_ROWS <= r1; r += LNR_ROWS) {
    lnr_sums(j->x + r * D, D, s, q);
    for (int l = 0; l < LNR_ROWS; ++l)
      lnr_row(j->x + (r + l) * D, j->scale, j->bias, j->y + (r + l) * D, D, j->eps, s[l], q[l], &j->mean[r + l],
              &j->inv[r + l]);
  }
  for (; r < r1; ++r) {   /* the last rows one at a time, the same order */
    const float* x = j->x + r * D;
    float a = 0, b = 0;
    for (size_t h = 0; h < D; ++h) a += x[h], b += x[h] * x[h];
    lnr_row(x, j->scale, j->bias, j->y + r * D, D, j->eps, a, b, &j->mean[r], &j->inv[r]);
  }
}

typedef struct {
  int64_t axis;
  float eps;
} LnrKernel;

static OrtStatus* lnr_fail(const char* msg) { return RAPI(CreateStatus, CreateStatusFn)(ORT_FAIL, msg); }

static OrtStatus* lnr_create(const OrtCustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)op;
  LnrKernel* k = (LnrKernel*)calloc(1, sizeof *k);
  if (!k) return ((CreateStatusFn)api->slot[S_CreateStatus])(ORT_FAIL, "fracgraph LayerNorm: out of memory");
  OrtStatus* st;
  if ((st = ((AttrIntFn)api->slot[S_KernelInfoGetAttribute_int64])(info, "axis", &k->axis)) ||
      (st = ((AttrFloatFn)api->slot[S_KernelInfoGetAttribute_float])(info, "epsilon", &k->eps))) {
    free(k);
    return st;
  }
  *out = k;
  return NULL;
}

static OrtStatus* lnr_input(void* ctx, size_t index, const float** data, int64_t* dims, size_t* rank, size_t* count) {
  return fg_float_input(g_api_lnr, ctx, index, "fracgraph LayerNorm: tensors above rank 16 are not supported", data,
                        dims, rank, count);
}

static OrtStatus* lnr_compute(void* kernel, void* ctx) {
  const LnrKernel* k = (const LnrKernel*)kernel;
  LnrJob j;
  memset(&j, 0, sizeof j);
  int64_t dims[16], sdims[16], bdims[16], stat[16];
  size_t rank, srank, brank, n, sn, bn;
  OrtStatus* st;
  if ((st = lnr_input(ctx, 0, &j.x, dims, &rank, &n)) || (st = lnr_input(ctx, 1, &j.scale, sdims, &srank, &sn)) ||
      (st = lnr_input(ctx, 2, &j.bias, bdims, &brank, &bn)))
    return st;
  const int64_t axis = k->axis < 0 ? k->axis + (int64_t)rank : k->axis;
  if (axis < 0 || axis >= (int64_t)rank) return lnr_fail("fracgraph LayerNorm: axis out of X's range");
  size_t D = 1;
  for (size_t i = 0; i < rank; ++i) {
    stat[i] = (int64_t)i < axis ? dims[i] : 1;
    if ((int64_t)i >= axis) D *= (size_t)dims[i];
  }
  if (sn != D || bn != D)
    return lnr_fail("fracgraph LayerNorm: scale and bias need the size of X's axes from axis on");
  j.D = D, j.R = D ? n / D : 0, j.eps = k->eps;
  void *yv, *mv, *iv;
  if ((st = RAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, dims, rank, &yv)) ||
      (st = RAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 1, stat, rank, &mv)) ||
      (st = RAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 2, stat, rank, &iv)) ||
      (st = RAPI(GetTensorMutableData, GetDataFn)(yv, (void**)&j.y)) ||
      (st = RAPI(GetTensorMutableData, GetDataFn)(mv, (void**)&j.mean)) ||
      (st = RAPI(GetTensorMutableData, GetDataFn)(iv, (void**)&j.inv)))
    return st;
  const size_t tasks = (j.R + LNR_TASK - 1) / LNR_TASK;
  if (!tasks || !D) return NULL;
  if (tasks == 1) {
    lnr_task(&j, 0);
    return NULL;
  }
  return RAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, lnr_task, tasks, 0, &j);
}

static FgOp g_lnr_op;

OrtStatus* fg_layer_norm_register(void* domain, const void* api) {
  g_api_lnr = (const OrtApi*)api;
  return fg_op_add(g_api_lnr, domain, &g_lnr_op, "LayerNorm", 3, 3, 0, lnr_create, fg_op_free, lnr_compute);
}
