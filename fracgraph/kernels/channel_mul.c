/* fracgraph's gradient of a per-channel scale (ConvNeXt's layer scale, any Mul of an [N, C, S...] tensor by a
 * [1, C, 1...] parameter): onnxruntime's Mul_Grad of it is Mul(dY, g) for dA, and Mul(dY, A) then ReduceSum over
 * every axis but 1 for dg, three passes and a whole-tensor temporary. Here one pass.
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_channel_mul_register to add the op to the domain "ai.fracgraph", written by passes/channel_mul.py:
 *
 *   ChannelMulGrad(dY, A, g) -> (dA, dg)     dA = dY * g[c] (the same float multiply: bitwise onnxruntime's Mul),
 *                                            dg[c] = sum over n, s of dY * A, shape [1, C, 1...] (A's rank:
 *                                            the ReduceSum's keepdims shape); g: C values (any shape)
 *
 * Tasks are runs of whole (n, c) planes, fixed by the shape; a plane's products are summed in 16 float lanes, the
 * lanes in double, and the planes' sums over n in double in image order: the same dg on any thread count, within
 * the lanes' summation order of the float64 sum (tests/passes/test_channel_mul.py).
 *
 * Session 13 (issue #20): the lanes are one vector held in a register (GCC/Clang vector extension, split by the
 * compiler where the CPU's vectors are shorter) instead of an array the loop stored back every 16 elements, the
 * channel of a plane is counted instead of divided out, and a plane smaller than the 16 lanes (ConvNeXt's 2x2 and
 * 1x1 maps) adds its products straight in double, which is the lanes' sum without the zeros of the lanes it never
 * wrote. The sums are the same as session 12's, bitwise, on every path.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"
static const OrtApi* g_api_cmul;
#define MAPI(name, type) ((type)g_api_cmul->slot[S_##name])

enum { CM_LANES = 16, CM_TASK = 16384 };   /* elements per task, at least one plane */

typedef float CmVec __attribute__((vector_size(CM_LANES * sizeof(float))));   /* the 16 lanes, in registers */

typedef struct {
  const float *dy, *a, *g;
  float* da;
  double* plane;   /* [N * C] plane sums */
  size_t C, S, planes, per;
} CmJob;

static inline CmVec cm_load(const float* p) {
  CmVec v;
  memcpy(&v, p, sizeof v);
  return v;
}

/* One (n, c) plane of S >= CM_LANES elements: dA, and the plane's sum of dY A (lane w holds the products of
 * positions w mod 16, in position order; the 16 lanes are then added in double, in lane order). */
static double cm_plane_lanes(const float* dy, const float* a, float* da, float gc, size_t S) {
  CmVec acc = {0}, gv = {0};
  gv += gc;
  size_t s = 0;
  for (; s + CM_LANES <= S; s += CM_LANES) {
    const CmVec d = cm_load(dy + s);
    const CmVec p = d * gv;
    memcpy(da + s, &p, sizeof p);
    acc += d * cm_load(a + s);
  }
  float lane[CM_LANES];
  memcpy(lane, &acc, sizeof lane);
  for (size_t w = 0; s + w < S; ++w) {
    da[s + w] = dy[s + w] * gc;
    lane[w] += dy[s + w] * a[s + w];
  }
  double u = 0.0;
  for (size_t w = 0; w < CM_LANES; ++w) u += lane[w];
  return u;
}

static void cm_task(void* p, size_t t) {
  const CmJob* j = (const CmJob*)p;
  const size_t p0 = t * j->per, p1 = p0 + j->per < j->planes ? p0 + j->per : j->planes, S = j->S, C = j->C;
  size_t c = p0 % C;
  for (size_t q = p0; q < p1; ++q, c = c + 1 == C ? 0 : c + 1) {
    const float gc = j->g[c];
    const float *dy = j->dy + q * S, *a = j->a + q * S;
    float* da = j->da + q * S;
    if (S >= CM_LANES) {
      j->plane[q] = cm_plane_lanes(dy, a, da, gc, S);
      continue;
    }
    /* a plane smaller than the lanes: each lane would hold one product (the others zeros, adding nothing), so the
     * same sum is the products added in double in position order */
    double u = 0.0;
    for (size_t w = 0; w < S; ++w) {
      da[w] = dy[w] * gc;
      u += (double)(dy[w] * a[w]);
    }
    j->plane[q] = u;
  }
}

static OrtStatus* mfail(const char* msg) { return MAPI(CreateStatus, CreateStatusFn)(ORT_FAIL, msg); }

static OrtStatus* m_input(void* ctx, size_t index, const float** data, int64_t* dims, size_t* rank, size_t* count) {
  return fg_float_input(g_api_cmul, ctx, index, "fracgraph ChannelMulGrad: tensors above rank 16 are not supported",
                        data, dims, rank, count);
}

static OrtStatus* cm_compute(void* kernel, void* ctx) {
  (void)kernel;
  CmJob j;
  memset(&j, 0, sizeof j);
  int64_t dims[16], adims[16], gdims[16];
  size_t rank, arank, grank, n, an, gn;
  OrtStatus* st;
  if ((st = m_input(ctx, 0, &j.dy, dims, &rank, &n)) || (st = m_input(ctx, 1, &j.a, adims, &arank, &an)) ||
      (st = m_input(ctx, 2, &j.g, gdims, &grank, &gn)))
    return st;
  if (an != n || arank != rank || rank < 2) return mfail("fracgraph ChannelMulGrad: dY and A must be one shape of rank >= 2");
  if ((size_t)adims[1] != gn) return mfail("fracgraph ChannelMulGrad: g needs one value per channel (A's axis 1)");
  (void)grank, (void)gdims;
  for (size_t i = 0; i < rank; ++i) gdims[i] = i == 1 ? adims[1] : 1;
  void *dav, *dgv;
  float* dg;
  if ((st = MAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, adims, arank, &dav)) ||
      (st = MAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 1, gdims, rank, &dgv)) ||
      (st = MAPI(GetTensorMutableData, GetDataFn)(dav, (void**)&j.da)) ||
      (st = MAPI(GetTensorMutableData, GetDataFn)(dgv, (void**)&dg)))
    return st;
  j.C = gn;
  const size_t N = (size_t)adims[0];
  j.planes = N * j.C;
  j.S = j.planes ? n / j.planes : 0;
  if (!j.C) return NULL;
  j.per = j.S >= CM_TASK ? 1 : CM_TASK / (j.S ? j.S : 1);
  const size_t tasks = (j.planes + j.per - 1) / j.per;
  j.plane = (double*)malloc(sizeof(double) * (j.planes ? j.planes : 1));
  if (!j.plane) return mfail("fracgraph ChannelMulGrad: out of memory");
  if (tasks > 1) st = MAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, cm_task, tasks, 0, &j);
  else if (tasks == 1) cm_task(&j, 0);
  for (size_t c = 0; !st && c < j.C; ++c) {
    double u = 0.0;
    for (size_t i = 0; i < N; ++i) u += j.plane[i * j.C + c];
    dg[c] = (float)u;
  }
  free(j.plane);
  return st;
}

static FgOp g_cm_op;

OrtStatus* fg_channel_mul_register(void* domain, const void* api) {
  g_api_cmul = (const OrtApi*)api;
  return fg_op_add(g_api_cmul, domain, &g_cm_op, "ChannelMulGrad", 3, 2, 0, fg_op_stateless, fg_op_keep, cm_compute);
}
