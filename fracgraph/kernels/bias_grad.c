/* fracgraph's bias gradient: the column sums of dY [..., N] over every leading axis, alone or in the same pass as
 * the per-tensor range that the error quantizer of the same dY needs.
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_bias_grad_register to add this file's ops to the domain "ai.fracgraph", written by passes/bias_grad.py:
 *
 *   ColSum(dY) -> s                    s[c] = sum over the rows r of dY viewed as [R, N] of dY[r][c]   (s: [N])
 *   MinMaxColSum(dY) -> (min, max, s)  the same s, and the smallest and largest element of dY (scalars)
 *
 * onnxruntime's gradient of a linear layer's bias (the Add after a MatMul, and Gemm's C) is a ReduceSum of dY over
 * every axis but the last, keepdims 0; with FW/BW quantization the same dY is also read by the error quantizer's
 * MinMax. onnxruntime 1.19.2's ReduceSum (its "RK" fast path) copies row 0 and adds rows 1, 2, ... in float, each
 * column in row order, and these kernels do exactly that (each column's sum starts from row 0 and adds the rows in
 * order, in float), so s is bitwise onnxruntime's (tests/passes/test_bias_grad.py, -0.0 columns included). The work
 * is cut into blocks of COLS columns, each a task on the session's threads running down every row: the row order of
 * each column is kept whatever the thread count. MinMaxColSum's extremes are MinMax's (fused_ops.c): the same
 * ordered comparisons, so for a tensor without NaN the same numbers (exact: a min or max is one of the elements;
 * where both +0.0 and -0.0 are the extreme, which of the two is returned may differ). One read of dY instead of two.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"   /* the slot table, shared with fused_ops.c */
static const OrtApi* g_api_bias;
#define BAPI(name, type) ((type)g_api_bias->slot[S_##name])

enum { COLS = 32 };                  /* columns per task: a multiple of 16 (two AVX-512 vectors per row) */
enum { SMALL = 16384 };              /* below this many elements the op runs on the calling thread */

/* Columns [c0, c0 + m) (m <= COLS) of x [R, N] (R >= 1): sums into s, and when lo/hi are not NULL the block's min
 * and max. Row 0 is the start value of every sum, as in onnxruntime's ReduceSum. */
static void col_block(const float* x, size_t R, size_t N, size_t c0, size_t m, float* s, float* lo, float* hi) {
  float acc[COLS], mn[COLS], mx[COLS];
  const float* row = x + c0;
  if (m == COLS) {
    for (int l = 0; l < COLS; ++l) acc[l] = mn[l] = mx[l] = row[l];
    if (lo) {
      for (size_t r = 1; r < R; ++r) {
        row += N;
        for (int l = 0; l < COLS; ++l) {
          const float v = row[l];
          acc[l] += v;
          mn[l] = v < mn[l] ? v : mn[l];
          mx[l] = v > mx[l] ? v : mx[l];
        }
      }
    } else {
      for (size_t r = 1; r < R; ++r) {
        row += N;
        for (int l = 0; l < COLS; ++l) acc[l] += row[l];
      }
    }
  } else {
    for (size_t l = 0; l < m; ++l) acc[l] = mn[l] = mx[l] = row[l];
    for (size_t r = 1; r < R; ++r) {
      row += N;
      for (size_t l = 0; l < m; ++l) {
        const float v = row[l];
        acc[l] += v;
        mn[l] = v < mn[l] ? v : mn[l];
        mx[l] = v > mx[l] ? v : mx[l];
      }
    }
  }
  memcpy(s + c0, acc, m * sizeof(float));
  if (lo) {
    float a = mn[0], b = mx[0];
    for (size_t l = 1; l < m; ++l) {
      a = mn[l] < a ? mn[l] : a;
      b = mx[l] > b ? mx[l] : b;
    }
    *lo = a, *hi = b;
  }
}

typedef struct {
  const float* x;
  float* s;
  float *lo, *hi;   /* per task (NULL: ColSum) */
  size_t R, N;
} BJob;

static void bias_task(void* p, size_t t) {
  const BJob* j = (const BJob*)p;
  const size_t c0 = t * COLS, m = j->N - c0 < COLS ? j->N - c0 : COLS;
  col_block(j->x, j->R, j->N, c0, m, j->s, j->lo ? j->lo + t : NULL, j->hi ? j->hi + t : NULL);
}

/* The kernel on plain arrays, for tests: x [R, N] -> s [N], and with lo/hi not NULL the range. 0, or 1 when R or N
 * is 0 or memory runs out. */
int fg_col_sum(const float* x, size_t R, size_t N, float* s, float* lo, float* hi) {
  if (!R || !N) return 1;
  const size_t tasks = (N + COLS - 1) / COLS;
  float* part = lo ? (float*)malloc(2 * tasks * sizeof(float)) : NULL;
  if (lo && !part) return 1;
  BJob j = {x, s, part, part ? part + tasks : NULL, R, N};
  for (size_t t = 0; t < tasks; ++t) bias_task(&j, t);
  if (lo) {
    float a = part[0], b = part[tasks];
    for (size_t t = 1; t < tasks; ++t) {
      a = part[t] < a ? part[t] : a;
      b = part[tasks + t] > b ? part[tasks + t] : b;
    }
    *lo = a, *hi = b;
    free(part);
  }
  return 0;
}

/* ---- the ops --------------------------------------------------------------------------------------------------- */
static OrtStatus* bfail(const char* msg) { return BAPI(CreateStatus, CreateStatusFn)(ORT_FAIL, msg); }

static OrtStatus* bias_compute(void* kernel, void* ctx) {
  const FgOp* op = (const FgOp*)kernel;   /* fg_op_stateless: the kernel handle is the op */
  const int range = op->tag == 1;
  int64_t dims[16];
  size_t rank, n;
  OrtStatus* st;
  BJob j;
  memset(&j, 0, sizeof j);
  if ((st = fg_float_input(g_api_bias, ctx, 0, "fracgraph ColSum: tensors above rank 16 are not supported", &j.x,
                           dims, &rank, &n)))
    return st;
  if (rank < 1) return bfail("fracgraph ColSum: dY must have at least one axis");
  j.N = (size_t)dims[rank - 1];
  j.R = j.N ? n / j.N : 0;
  void *sv, *lov = NULL, *hiv = NULL;
  const int64_t out_dims[1] = {dims[rank - 1]};
  if ((st = BAPI(KernelContext_GetOutput, GetOutputFn)(ctx, range ? 2 : 0, out_dims, 1, &sv))) return st;
  if ((st = BAPI(GetTensorMutableData, GetDataFn)(sv, (void**)&j.s))) return st;
  float *lo = NULL, *hi = NULL;
  if (range) {
    if (!n) return bfail("fracgraph MinMaxColSum: the tensor is empty");
    if ((st = BAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, NULL, 0, &lov)) ||
        (st = BAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 1, NULL, 0, &hiv)) ||
        (st = BAPI(GetTensorMutableData, GetDataFn)(lov, (void**)&lo)) ||
        (st = BAPI(GetTensorMutableData, GetDataFn)(hiv, (void**)&hi)))
      return st;
  }
  if (!j.R) {   /* no rows: onnxruntime's ReduceSum of an empty axis gives zeros */
    if (j.N) memset(j.s, 0, j.N * sizeof(float));
    return NULL;
  }
  const size_t tasks = (j.N + COLS - 1) / COLS;
  float* part = NULL;
  if (range) {
    part = (float*)malloc(2 * tasks * sizeof(float));
    if (!part) return bfail("fracgraph MinMaxColSum: out of memory");
    j.lo = part, j.hi = part + tasks;
  }
  if (tasks > 1 && n >= SMALL) {
    st = BAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, bias_task, tasks, 0, &j);
  } else {
    for (size_t t = 0; t < tasks; ++t) bias_task(&j, t);
  }
  if (range && !st) {
    float a = part[0], b = part[tasks];
    for (size_t t = 1; t < tasks; ++t) {
      a = part[t] < a ? part[t] : a;
      b = part[tasks + t] > b ? part[tasks + t] : b;
    }
    *lo = a, *hi = b;
  }
  free(part);
  return st;
}

/* ---- registration -------------------------------------------------------------------------------------------- */
static FgOp g_col_sum_op, g_min_max_col_sum_op;

OrtStatus* fg_bias_grad_register(void* domain, const void* api) {
  OrtStatus* st;
  g_api_bias = (const OrtApi*)api;
  if ((st = fg_op_add(g_api_bias, domain, &g_col_sum_op, "ColSum", 1, 1, 0, fg_op_stateless, fg_op_keep,
                      bias_compute)))
    return st;
  return fg_op_add(g_api_bias, domain, &g_min_max_col_sum_op, "MinMaxColSum", 1, 3, 1, fg_op_stateless, fg_op_keep,
                   bias_compute);
}
