/* fracgraph's LayerNorm over the channel axis of an NCHW (channels-first) tensor, forward and gradient, in place of
 * the Transpose -> LayerNormalization(axis -1) -> Transpose chains of ConvNeXt-style nets (timm's LayerNorm2d, the
 * stems' and downsamples' norms) and of their gradients' Transpose -> LayerNormalizationGrad -> Transpose.
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_ln_channels_register to add the two ops to the domain "ai.fracgraph", written by passes/ln_channels.py:
 *
 *   LayerNormChannels(X, scale, bias) -> (Y, mean, inv_std)            attribute epsilon
 *       X [N, C, S...]; for each (n, s): mean = sum_c X / C, var = sum_c X^2 / C - mean^2,
 *       inv_std = 1 / sqrt(var + epsilon), Y[n, c, s] = (X - mean) * inv_std * scale[c] + bias[c];
 *       mean and inv_std [N, 1, S...] (the values of onnxruntime's [N, S..., 1] statistics, in the same order)
 *   LayerNormChannelsGrad(dY, X, scale, mean, inv_std) -> (dX, dscale, dbias)
 *       a = dY scale[c], b = (X - mean) inv_std: dX = inv_std (a - mean_c(a) - b mean_c(a b)),
 *       dscale[c] = sum over n, s of dY b, dbias[c] = sum of dY        (onnxruntime's LayerNormalizationGrad)
 *
 * The channel sums of one position are strided by S in memory; they run over 16 positions at a time (contiguous
 * lanes, one vector), each position's sum over c in double, in channel order. Tasks are (image, chunk of
 * LNC_CHUNK positions), fixed by the shape; dscale and dbias are float sums in 16 lanes within a task, each task's
 * lanes added in double, the tasks' partial sums added in task order in double: the same result on any thread
 * count. The statistics (double sums, var from the two sums) are at least as exact as onnxruntime's float ones, so
 * the op is onnxruntime's chain up to rounding (tests/passes/test_ln_channels.py bounds it against float64).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"
static const OrtApi* g_api_lnc;
#define LAPI(name, type) ((type)g_api_lnc->slot[S_##name])

enum { LNC_LANES = 16, LNC_CHUNK = 64 };   /* positions per vector, per task (a multiple of LNC_LANES) */

typedef struct {
  const float *x, *dy, *scale, *bias, *mean, *inv_std;
  float *y, *dx, *mean_out, *inv_out;
  double* part;   /* gradient: [tasks][2][C] partial dscale, dbias */
  size_t N, C, S, chunks;
  float eps;
  int oom;
} LncJob;

/* The forward of positions [s0, s0 + W) of image n, W <= LNC_LANES. */
static void lnc_fwd_block(const LncJob* j, size_t n, size_t s0, size_t W) {
  const size_t C = j->C, S = j->S;
  const float* x = j->x + n * C * S + s0;
  float* y = j->y + n * C * S + s0;
  double sum[LNC_LANES] = {0}, sq[LNC_LANES] = {0};
  float mu[LNC_LANES], is[LNC_LANES];
  if (W == LNC_LANES) {
    for (size_t c = 0; c < C; ++c)
      for (size_t w = 0; w < LNC_LANES; ++w) {
        const double v = x[c * S + w];
        sum[w] += v, sq[w] += v * v;
      }
  } else {
    for (size_t c = 0; c < C; ++c)
      for (size_t w = 0; w < W; ++w) {
        const double v = x[c * S + w];
        sum[w] += v, sq[w] += v * v;
      }
  }
  for (size_t w = 0; w < W; ++w) {
    const double m = sum[w] / (double)C;
    double var = sq[w] / (double)C - m * m;
    if (var < 0) var = 0;
    mu[w] = (float)m;
    is[w] = (float)(1.0 / sqrt(var + (double)j->eps));
    j->mean_out[n * S + s0 + w] = mu[w];
    j->inv_out[n * S + s0 + w] = is[w];
  }
  for (size_t c = 0; c < C; ++c) {
    const float sc = j->scale[c], bi = j->bias ? j->bias[c] : 0.0f;
    for (size_t w = 0; w < W; ++w) y[c * S + w] = (x[c * S + w] - mu[w]) * is[w] * sc + bi;
  }
}

static void lnc_fwd_task(void* p, size_t t) {
  const LncJob* j = (const LncJob*)p;
  const size_t n = t / j->chunks, a = (t % j->chunks) * LNC_CHUNK, b = a + LNC_CHUNK < j->S ? a + LNC_CHUNK : j->S;
  for (size_t s = a; s < b; s += LNC_LANES) lnc_fwd_block(j, n, s, b - s < LNC_LANES ? b - s : LNC_LANES);
}

/* The gradient of positions [s0, s0 + W) of image n; ps, pb: the task's [C][LNC_LANES] lane sums. */
static void lnc_grad_block(const LncJob* j, size_t n, size_t s0, size_t W, float* ps, float* pb) {
  const size_t C = j->C, S = j->S;
  const size_t off = n * C * S + s0;
  const float *x = j->x + off, *dy = j->dy + off;
  float* dx = j->dx + off;
  double sa[LNC_LANES] = {0}, sab[LNC_LANES] = {0};
  float mu[LNC_LANES] = {0}, is[LNC_LANES] = {0}, fa[LNC_LANES] = {0}, fab[LNC_LANES] = {0};
  for (size_t w = 0; w < W; ++w) mu[w] = j->mean[n * S + s0 + w], is[w] = j->inv_std[n * S + s0 + w];
  for (size_t c = 0; c < C; ++c) {
    const float sc = j->scale[c];
    for (size_t w = 0; w < W; ++w) {
      const float av = dy[c * S + w] * sc, bv = (x[c * S + w] - mu[w]) * is[w];
      sa[w] += av;
      sab[w] += av * bv;
    }
  }
  for (size_t w = 0; w < W; ++w) fa[w] = (float)(sa[w] / (double)C), fab[w] = (float)(sab[w] / (double)C);
  for (size_t c = 0; c < C; ++c) {
    const float sc = j->scale[c];
    float *psc = ps + c * LNC_LANES, *pbc = pb + c * LNC_LANES;
    for (size_t w = 0; w < W; ++w) {
      const float d = dy[c * S + w], bv = (x[c * S + w] - mu[w]) * is[w];
      dx[c * S + w] = is[w] * (d * sc - fa[w] - bv * fab[w]);
      psc[w] += d * bv;
      pbc[w] += d;
    }
  }
}

static void lnc_grad_task(void* p, size_t t) {
  LncJob* j = (LncJob*)p;
  const size_t C = j->C, n = t / j->chunks, a = (t % j->chunks) * LNC_CHUNK;
  const size_t b = a + LNC_CHUNK < j->S ? a + LNC_CHUNK : j->S;
  float* lanes = (float*)calloc(2 * C * LNC_LANES, sizeof(float));
  if (!lanes) {
    j->oom = 1;
    return;
  }
  float *ps = lanes, *pb = lanes + C * LNC_LANES;
  for (size_t s = a; s < b; s += LNC_LANES) lnc_grad_block(j, n, s, b - s < LNC_LANES ? b - s : LNC_LANES, ps, pb);
  double* part = j->part + t * 2 * C;
  for (size_t c = 0; c < C; ++c) {
    double u = 0.0, v = 0.0;
    for (size_t w = 0; w < LNC_LANES; ++w) u += ps[c * LNC_LANES + w], v += pb[c * LNC_LANES + w];
    part[c] = u, part[C + c] = v;
  }
  free(lanes);
}

/* ---- the ops -------------------------------------------------------------------------------------------------- */
static OrtStatus* lfail(const char* msg) { return LAPI(CreateStatus, CreateStatusFn)(ORT_FAIL, msg); }

static OrtStatus* l_input(void* ctx, size_t index, const float** data, int64_t* dims, size_t* rank, size_t* count) {
  return fg_float_input(g_api_lnc, ctx, index, "fracgraph LayerNormChannels: tensors above rank 16 are not supported",
                        data, dims, rank, count);
}

/* X's geometry [N, C, S...] from its dims, checked against scale's element count. */
static OrtStatus* lnc_geometry(LncJob* j, const int64_t* dims, size_t rank, size_t count, size_t scale_count) {
  if (rank < 2) return lfail("fracgraph LayerNormChannels: X needs rank 2 or more ([N, C, ...])");
  if ((size_t)dims[1] != scale_count) return lfail("fracgraph LayerNormChannels: scale needs one value per channel (X's axis 1)");
  j->N = (size_t)dims[0], j->C = (size_t)dims[1];
  j->S = j->N && j->C ? count / (j->N * j->C) : 0;
  j->chunks = (j->S + LNC_CHUNK - 1) / LNC_CHUNK;
  return NULL;
}

typedef struct {
  float eps;
} LncKernel;

static OrtStatus* lnc_create(const OrtCustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)op;
  LncKernel* k = (LncKernel*)calloc(1, sizeof *k);
  if (!k) return ((CreateStatusFn)api->slot[S_CreateStatus])(ORT_FAIL, "fracgraph LayerNormChannels: out of memory");
  float eps = 1e-5f;
  OrtStatus* st = ((AttrFloatFn)api->slot[S_KernelInfoGetAttribute_float])(info, "epsilon", &eps);
  if (st) ((ReleaseFn)api->slot[S_ReleaseStatus])(st);   /* absent: ONNX's default 1e-5 */
  k->eps = eps;
  *out = k;
  return NULL;
}

static OrtStatus* lnc_forward(void* kernel, void* ctx) {
  LncJob j;
  memset(&j, 0, sizeof j);
  int64_t dims[16], sdims[16], bdims[16];
  size_t rank, srank, brank, n, sn, bn;
  OrtStatus* st;
  if ((st = l_input(ctx, 0, &j.x, dims, &rank, &n)) || (st = l_input(ctx, 1, &j.scale, sdims, &srank, &sn)) ||
      (st = l_input(ctx, 2, &j.bias, bdims, &brank, &bn)))
    return st;
  if (bn != sn) return lfail("fracgraph LayerNormChannels: bias needs one value per channel (X's axis 1)");
  if ((st = lnc_geometry(&j, dims, rank, n, sn))) return st;
  j.eps = ((LncKernel*)kernel)->eps;
  int64_t sdim[16];
  memcpy(sdim, dims, sizeof(int64_t) * rank);
  sdim[1] = 1;
  void *yv, *mv, *iv;
  if ((st = LAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, dims, rank, &yv)) ||
      (st = LAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 1, sdim, rank, &mv)) ||
      (st = LAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 2, sdim, rank, &iv)) ||
      (st = LAPI(GetTensorMutableData, GetDataFn)(yv, (void**)&j.y)) ||
      (st = LAPI(GetTensorMutableData, GetDataFn)(mv, (void**)&j.mean_out)) ||
      (st = LAPI(GetTensorMutableData, GetDataFn)(iv, (void**)&j.inv_out)))
    return st;
  const size_t tasks = j.N * j.chunks;
  if (!tasks || !j.C) return NULL;
  if (tasks == 1) {
    lnc_fwd_task(&j, 0);
    return NULL;
  }
  return LAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, lnc_fwd_task, tasks, 0, &j);
}

static OrtStatus* lnc_backward(void* kernel, void* ctx) {
  (void)kernel;
  LncJob j;
  memset(&j, 0, sizeof j);
  int64_t dims[16], xdims[16], sdims[16], odims[16];
  size_t rank, xrank, srank, orank, n, xn, sn, on;
  OrtStatus* st;
  if ((st = l_input(ctx, 0, &j.dy, dims, &rank, &n)) || (st = l_input(ctx, 1, &j.x, xdims, &xrank, &xn)) ||
      (st = l_input(ctx, 2, &j.scale, sdims, &srank, &sn)))
    return st;
  if (xn != n || xrank != rank) return lfail("fracgraph LayerNormChannelsGrad: dY and X must be one shape");
  if ((st = lnc_geometry(&j, xdims, xrank, xn, sn))) return st;
  if ((st = l_input(ctx, 3, &j.mean, odims, &orank, &on))) return st;
  if (on != j.N * j.S) return lfail("fracgraph LayerNormChannelsGrad: mean and inv_std need one value per position");
  if ((st = l_input(ctx, 4, &j.inv_std, odims, &orank, &on))) return st;
  if (on != j.N * j.S) return lfail("fracgraph LayerNormChannelsGrad: mean and inv_std need one value per position");
  void *dxv, *dsv, *dbv;
  float *dscale, *dbias;
  if ((st = LAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, xdims, xrank, &dxv)) ||
      (st = LAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 1, sdims, srank, &dsv)) ||
      (st = LAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 2, sdims, srank, &dbv)) ||
      (st = LAPI(GetTensorMutableData, GetDataFn)(dxv, (void**)&j.dx)) ||
      (st = LAPI(GetTensorMutableData, GetDataFn)(dsv, (void**)&dscale)) ||
      (st = LAPI(GetTensorMutableData, GetDataFn)(dbv, (void**)&dbias)))
    return st;
  const size_t tasks = j.N * j.chunks;
  if (!j.C) return NULL;
  j.part = (double*)malloc(sizeof(double) * 2 * j.C * (tasks ? tasks : 1));
  if (!j.part) return lfail("fracgraph LayerNormChannelsGrad: out of memory");
  if (tasks > 1) st = LAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, lnc_grad_task, tasks, 0, &j);
  else if (tasks == 1) lnc_grad_task(&j, 0);
  if (!st && j.oom) st = lfail("fracgraph LayerNormChannelsGrad: out of memory");
  for (size_t c = 0; !st && c < j.C; ++c) {
    double u = 0.0, v = 0.0;
    for (size_t t = 0; t < tasks; ++t) u += j.part[t * 2 * j.C + c], v += j.part[t * 2 * j.C + j.C + c];
    dscale[c] = (float)u, dbias[c] = (float)v;
  }
  free(j.part);
  return st;
}

/* ---- registration -------------------------------------------------------------------------------------------- */
static FgOp g_lnc_ops[2];

OrtStatus* fg_ln_channels_register(void* domain, const void* api) {
  g_api_lnc = (const OrtApi*)api;
  OrtStatus* st = fg_op_add(g_api_lnc, domain, &g_lnc_ops[0], "LayerNormChannels", 3, 3, 0, lnc_create, fg_op_free,
                            lnc_forward);
  if (st) return st;
  return fg_op_add(g_api_lnc, domain, &g_lnc_ops[1], "LayerNormChannelsGrad", 5, 3, 1, fg_op_stateless, fg_op_keep,
                   lnc_backward);
}
