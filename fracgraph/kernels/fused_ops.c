/* fracgraph's onnxruntime custom ops: elementwise chains of the training step, each in one multithreaded pass.
 *
 * Domain "ai.fracgraph", loaded by fracgraph/kernels/__init__.py through SessionOptions.register_custom_ops_library,
 * written into the training graph by passes/fused_ops.py:
 *
 *   SRQuantize(x, min, scale, hi)              attributes lo (float), salt (int)   the error quantizer
 *   SRQuantizeNoise(x, min, scale, hi, noise)  attribute lo                        the same, noise from a tensor
 *   FakeQuantize(x, min, scale, hi)            attribute lo                        the activation quantizer; min
 *                                              and scale scalars or per channel along one axis of x (the
 *                                              weights' ranges: [K, 1, 1, 1] for a conv, [1, N] for a MatMul)
 *   MinMaxRows(x) -> (min, max)                 ranges per leading index ([K, 1, ...] each), one read of x
 *   MinMaxCols(x) -> (min, max)                 ranges per last index ([1, ..., K] each: a MatMul weight's
 *                                              output channels), one read of x
 *   MaxPoolIdx(X) -> (Y, Indices int64)         2-D max pool with onnxruntime's MaxPool indices (storage order 0,
 *                                              read by its MaxPoolGrad); attributes kh .. dw, ph_end, pw_end and
 *                                              (optional) ceil_mode
 *   LayerNormGrad(dY, X, scale, mean, inv_std, R?) -> (dX, dscale, dbias)   onnxruntime's LayerNormalizationGrad
 *                                              (+ R, X's shape, when given: the Sum of dX with the residual's gradient)
 *                                              (normalized over the last axes, scale's size), rows as tasks
 *   MaxPoolIdxGrad(dY, Indices, shape) -> dX    its gradient: dX (of X's shape, the int64 `shape`) zero but at each
 *                                              window's index, where dY adds up (onnxruntime's MaxPoolGrad)
 *   MinMax(x) -> (min, max)                    per-tensor range, one read of x
 *   ReluGrad(dY, X) -> dX                      dY where X > 0, else 0
 *   ConvGradW(dY, X) -> dW                     2-D conv weight gradient (group 1); attributes kh, kw, sh, sw,
 *                                              ph, pw, dh, dw (kernel, strides, leading pads, dilations)
 *   BatchNormTrain(X, scale, B, running_mean, running_var) -> (Y, running_mean', running_var', mean, inv_std)
 *                                              onnxruntime's training-mode BatchNormInternal, channels as tasks;
 *                                              attributes epsilon, momentum (running' also written in place)
 *   BatchNormGrad(dY, X, scale, mean, inv_std) -> (dX, dscale, dbias)   training-mode batch norm backward
 *   BatchNormTrainFused(X, scale, B, running_mean, running_var, residual?) -> (Y, running_mean', running_var', mean,
 *                                              inv_std, min, max)   BatchNormTrain, + residual, ReLU (attribute
 *                                              relu), and Y's range: passes/bn_relu.py
 *   BatchNormGradRange(dY, X, scale, mean, inv_std, B?) -> (dX, dscale, dbias, min, max)   BatchNormGrad and dX's
 *                                              range; relu = 1: dY is the gradient of the fused forward's ReLU
 *   ReluGradSum(dY1, dY2, X) -> dX              X > 0 ? dY1 + dY2 : 0 (ReluGrad of a Sum of two gradients)
 *   ConvGradWCols(dY, X) -> (dYt, col)          the operands of dW as one batched GEMM (a MatMul in the graph);
 *                                              attributes those of ConvGradW and group
 *   DepthwiseConvGradW(dY, X) -> dW            depthwise conv weight gradient; attributes those of ConvGradW
 *   NchwcWeight(W) -> Wb                       a conv weight in onnxruntime's NCHWc filter layout; attributes
 *                                              block, blocked_in, transpose, flip
 *   Im2Col(X) -> col [C*kh*kw, N*ho*wo]        the whole batch's im2col (a conv as one GEMM); attributes those of
 *                                              ConvGradW and h, w, ho, wo (X's and the output's spatial size)
 *   Col2Im(cols) -> Y [N, C, h, w]             its adjoint: sums cols' taps back onto the image; same attributes
 *   DepthwiseConv(X, W) -> Y                   depthwise conv (W [C, 1, kh, kw]); attributes kh .. dw, ph_end,
 *                                              pw_end, flip (W's taps reversed: a stride-1 dX conv)
 *   FakeQuantizeBits(x, min, max, bits)        FakeQuantize with its scalars and its bits > 0 switch (passes/
 *   SRQuantizeBits(x, min, max, bits)          quant_bits.py): attributes lo, eps, slack (optional), salt (SR);
 *   SRQuantizeNoiseBits(x, min, max, bits, noise)   levels = max(2^bits - 1, 1), scale = max((max - min) / levels,
 *                                              eps), hi = levels + slack (levels without slack), in the chain's
 *                                              order (quantizers.py); bits <= 0 (or NaN): y = x, and an SR node's
 *                                              generator call count does not advance (its If never ran it)
 *
 * The quantizers compute, per element and in this order (quantizers.py's chain, each operation IEEE-rounded;
 * the library is compiled with -ffp-contract=off so that no multiply-add is fused; noise = 0 for FakeQuantize):
 *
 *   q = Round(Clip((x - min) / scale + noise, lo, hi)) * scale + min        Round: half to even
 *
 * SRQuantize draws its noise from a counter-based generator: for the c-th call of a node with salt s under the
 * process seed G,
 *
 *   key = mix(G ^ mix(s ^ mix(c)));  z_j = mix(key + (j + 1) * PHI)
 *   noise_i = bits(z_j) * 2^-24 - 0.5,  j = 16 * (i / 32) + i % 16,  bits = z >> 40 if i % 32 < 16 else (z >> 16) & (2^24 - 1)
 *
 * (one hash for two elements) where mix is SplitMix64's finalizer: U(-0.5, 0.5) on a 2^-24 grid, independent of the thread count, and
 * reproducible from (G, s, c, i) alone (tests/conftest.py regenerates it in numpy). onnxruntime's
 * RandomUniformLike costs ~4 ns per element on one thread; this is a few instructions per element on all of the
 * session's threads.
 *
 * ConvGradW is onnxruntime's ConvGrad dW (which runs one im2col and one small GEMM per image, one image after
 * another) as tasks over slices of the batch: each task im2cols an image into a cache-resident buffer and
 * accumulates dW^T[k][co] += sum_p col[k][p] * dY^T[p][co] into its own partial sum (an AVX-512 register-tile
 * kernel where the CPU has it and Co is a multiple of 16, plain loops otherwise); the partials are then added.
 * Its values differ from ConvGrad's by float summation order only.
 *
 * The ABI: ort_abi.h (the C API's stable parts, through OrtApi's function-pointer slots).
 */
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

static const OrtApi* g_api;
#define API(name, type) ((type)g_api->slot[S_##name])

/* ---- the generator ------------------------------------------------------------------------------------- */
static uint64_t g_seed = 0x5EEDF4AC7A41ULL;
static const uint64_t PHI = 0x9E3779B97F4A7C15ULL;

static inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

/* Sets the process seed G (fracgraph's TrainSession calls it with the run's seed before any step). */
void fg_set_seed(uint64_t seed) { g_seed = seed; }

/* ---- the kernels --------------------------------------------------------------------------------------- */
enum Kind { SR_RNG, SR_NOISE, FAKE_QUANT, MIN_MAX, RELU_GRAD, CONV_GRAD_W, BN_GRAD, CONV_COLS, DW_GRAD_W, NCHWC_WEIGHT,
            IM2COL, COL2IM, MIN_MAX_ROWS, MAX_POOL, DW_CONV, MIN_MAX_COLS, MAX_POOL_GRAD, LN_GRAD, BN_TRAIN,
            BN_TRAIN_FUSED, BN_GRAD_RANGE, RELU_GRAD_SUM, FQ_BITS, SR_BITS, SR_NOISE_BITS, N_KINDS };

typedef struct {
  int kind;
  float lo;
  float eps, momentum;   /* BN_TRAIN, BN_TRAIN_FUSED; eps: the quantizers' scale floor (FQ_BITS .. SR_NOISE_BITS) */
  float slack;           /* FQ_BITS .. SR_NOISE_BITS: hi = levels + slack when has_slack, else levels */
  int has_slack;
  int64_t relu;          /* BN_TRAIN_FUSED, BN_GRAD_RANGE */
  uint64_t salt;
  uint64_t calls;
  int64_t conv[12];  /* CONV_GRAD_W, CONV_COLS, DW_GRAD_W: kh, kw, sh, sw, ph, pw, dh, dw; CONV_COLS: group;
                        DW_CONV: kh .. dw, ph_end, pw_end, flip;
                        IM2COL, COL2IM: kh .. dw, h, w, ho, wo; NCHWC_WEIGHT: block, blocked_in, transpose, flip */
} Kernel;

typedef struct {
  const float* x;
  const float* aux;    /* noise (SR_NOISE) or X (RELU_GRAD, RELU_GRAD_SUM) */
  const float* aux2;   /* RELU_GRAD_SUM: the second gradient */
  float* y;
  float mn, s, lo, hi;
  const float *mnv, *sv; /* FAKE_QUANT per channel: min and scale of each channel (else NULL) */
  size_t inner;          /* FAKE_QUANT per channel: elements per channel step (the axes after the channel axis);
                            MIN_MAX_ROWS: elements per leading index */
  size_t channels;       /* FAKE_QUANT per channel: the channel axis' size */
  uint64_t key;
  size_t n;
  float* part_min;     /* MIN_MAX: one slot per chunk */
  float* part_max;
  int kind;
} Job;

#define CHUNK 16384

/* min and max of x[0..m) (m >= 1): LANES independent running extremes, elementwise over arrays, which the
 * compiler vectorizes (a scalar min/max reduction it may not reorder without -ffast-math); MIN_MAX's chunks and
 * MinMaxRows' rows */
static inline void lane_min_max(const float* x, size_t m, float* mn, float* mx) {
  enum { LANES = 32 };
  float lo_l[LANES], hi_l[LANES];
  size_t i = 0;
  for (int l = 0; l < LANES; ++l) lo_l[l] = hi_l[l] = x[0];
  for (; i + LANES <= m; i += LANES)
    for (int l = 0; l < LANES; ++l) {
      lo_l[l] = x[i + l] < lo_l[l] ? x[i + l] : lo_l[l];
      hi_l[l] = x[i + l] > hi_l[l] ? x[i + l] : hi_l[l];
    }
  for (; i < m; ++i) {
    lo_l[0] = x[i] < lo_l[0] ? x[i] : lo_l[0];
    hi_l[0] = x[i] > hi_l[0] ? x[i] : hi_l[0];
  }
  for (int l = 1; l < LANES; ++l) {
    lo_l[0] = lo_l[l] < lo_l[0] ? lo_l[l] : lo_l[0];
    hi_l[0] = hi_l[l] > hi_l[0] ? hi_l[l] : hi_l[0];
  }
  *mn = lo_l[0];
  *mx = hi_l[0];
}


static void run_chunk(void* p, size_t c) {
  const Job* j = (const Job*)p;
  size_t a = c * CHUNK, b = a + CHUNK < j->n ? a + CHUNK : j->n;
  const float* x = j->x;
  float* y = j->y;
  const float mn = j->mn, s = j->s, lo = j->lo, hi = j->hi;
  switch (j->kind) {
    case SR_NOISE: {
      const float* nz = j->aux;
      for (size_t i = a; i < b; ++i) {
        float u = (x[i] - mn) / s + nz[i];
        u = u < lo ? lo : u;
        u = u > hi ? hi : u;
        y[i] = nearbyintf(u) * s + mn;
      }
      break;
    }
    case SR_RNG: {
      /* one hash per two elements: in each block of 32, element l < 16 takes bits 40..63 of hash 16*block + l,
       * element l + 16 bits 16..39 of the same hash (chunks start at multiples of 32) */
      const uint64_t key = j->key;
      float nz[32];
      for (size_t i0 = a; i0 < b; i0 += 32) {
        const uint64_t h0 = (uint64_t)(i0 / 32) * 16;
        for (int l = 0; l < 16; ++l) {
          const uint64_t z = mix(key + (h0 + (uint64_t)l + 1) * PHI);
          nz[l] = (float)(uint32_t)(z >> 40) * 0x1p-24f - 0.5f;
          nz[l + 16] = (float)(uint32_t)((z >> 16) & 0xFFFFFF) * 0x1p-24f - 0.5f;
        }
        const size_t m = b - i0 < 32 ? b - i0 : 32;
        for (size_t l = 0; l < m; ++l) {
          float u = (x[i0 + l] - mn) / s + nz[l];
          u = u < lo ? lo : u;
          u = u > hi ? hi : u;
          y[i0 + l] = nearbyintf(u) * s + mn;
        }
      }
      break;
    }
    case FAKE_QUANT:
      if (j->mnv && j->inner == 1) {   /* channels along the last axis (a MatMul weight [in, out]): runs of one row */
        for (size_t i = a; i < b;) {
          const size_t k0 = i % j->channels, m = j->channels - k0 < b - i ? j->channels - k0 : b - i;
          const float *mk = j->mnv + k0, *sk = j->sv + k0;
          const float* xi = x + i;
          float* yi = y + i;
          for (size_t t = 0; t < m; ++t) {   /* contiguous in x, y and the channels' min and scale: vectorized */
            float u = (xi[t] - mk[t]) / sk[t];
            u = u < lo ? lo : u;
            u = u > hi ? hi : u;
            yi[t] = nearbyintf(u) * sk[t] + mk[t];
          }
          i += m;
        }
        break;
      }
      if (j->mnv) {   /* per channel: the same chain with channel k's min and scale, k = (i / inner) % channels */
        for (size_t i = a; i < b;) {
          const size_t r = i / j->inner, k = r % j->channels, e = (r + 1) * j->inner < b ? (r + 1) * j->inner : b;
          const float mk = j->mnv[k], sk = j->sv[k];
          for (; i < e; ++i) {
            float u = (x[i] - mk) / sk;
            u = u < lo ? lo : u;
            u = u > hi ? hi : u;
            y[i] = nearbyintf(u) * sk + mk;
          }
        }
        break;
      }
      for (size_t i = a; i < b; ++i) {
        float u = (x[i] - mn) / s;
        u = u < lo ? lo : u;
        u = u > hi ? hi : u;
        y[i] = nearbyintf(u) * s + mn;
      }
      break;
    case MIN_MAX: {
      lane_min_max(x + a, b - a, &j->part_min[c], &j->part_max[c]);
      break;
    }
    case RELU_GRAD: {
      const float* xr = j->aux;
      for (size_t i = a; i < b; ++i) y[i] = xr[i] > 0.0f ? x[i] : 0.0f;
      break;
    }
    case RELU_GRAD_SUM: {   /* ReluGrad(Sum(dY1, dY2), X): the sum rounds as onnxruntime's Sum of two */
      const float *xr = j->aux, *x2 = j->aux2;
      for (size_t i = a; i < b; ++i) y[i] = xr[i] > 0.0f ? x[i] + x2[i] : 0.0f;
      break;
    }
  }
}

static OrtStatus* fail(const char* msg) { return API(CreateStatus, CreateStatusFn)(ORT_FAIL, msg); }

/* Shape of input `index`: rank, dims (up to 16) and element count. */
static OrtStatus* input_shape(void* ctx, size_t index, const void** v, int64_t* dims, size_t* rank, size_t* count) {
  void* info;
  OrtStatus* st;
  if ((st = API(KernelContext_GetInput, GetInputFn)(ctx, index, v))) return st;
  if ((st = API(GetTensorTypeAndShape, TypeShapeFn)(*v, &info))) return st;
  if (!(st = API(GetDimensionsCount, DimCountFn)(info, rank))) {
    if (*rank > 16) st = fail("fracgraph kernels: tensors above rank 16 are not supported");
    else if (!(st = API(GetDimensions, DimsFn)(info, dims, *rank)))
      st = API(GetTensorShapeElementCount, ElemCountFn)(info, count);
  }
  API(ReleaseTensorTypeAndShapeInfo, ReleaseFn)(info);
  return st;
}

static OrtStatus* scalar_input(void* ctx, size_t index, float* out) {
  const void* v;
  int64_t dims[16];
  size_t rank, count;
  float* data;
  OrtStatus* st;
  if ((st = input_shape(ctx, index, &v, dims, &rank, &count))) return st;
  if (count != 1) return fail("fracgraph quantizer kernels: min, scale and hi must be scalars");
  if ((st = API(GetTensorMutableData, GetDataFn)((void*)v, (void**)&data))) return st;
  *out = data[0];
  return NULL;
}

/* MinMaxCols' task: columns [c * COLS, ...) of x [outer, K] -> their min and max over the rows, elementwise over
 * the columns (vectorized); the same comparisons as lane_min_max, so the extremes are exact */
enum { COLS = 256 };
static void min_max_cols(void* p, size_t c) {
  const Job* j = (const Job*)p;
  const size_t K = j->channels, a = c * COLS, m = K - a < COLS ? K - a : COLS;
  float* lo = j->part_min + a;
  float* hi = j->part_max + a;
  for (size_t t = 0; t < m; ++t) lo[t] = hi[t] = j->x[a + t];
  for (size_t r = 1; r < j->inner; ++r) {
    const float* xr = j->x + r * K + a;
    for (size_t t = 0; t < m; ++t) {
      lo[t] = xr[t] < lo[t] ? xr[t] : lo[t];
      hi[t] = xr[t] > hi[t] ? xr[t] : hi[t];
    }
  }
}

static OrtStatus* compute_min_max_cols(void* ctx, Job* j, const int64_t* dims, size_t rank) {
  OrtStatus* st;
  void *lo_v, *hi_v;
  int64_t od[16];
  if (rank < 1 || dims[rank - 1] < 1 || !j->n) return fail("fracgraph MinMaxCols: the tensor is empty");
  j->channels = (size_t)dims[rank - 1];
  j->inner = j->n / j->channels;   /* rows */
  for (size_t r = 0; r < rank; ++r) od[r] = r + 1 < rank ? 1 : dims[r];
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, od, rank, &lo_v))) return st;
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 1, od, rank, &hi_v))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(lo_v, (void**)&j->part_min))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(hi_v, (void**)&j->part_max))) return st;
  const size_t tasks = (j->channels + COLS - 1) / COLS;
  if (tasks > 1) return API(KernelContext_ParallelFor, ParallelForFn)(ctx, min_max_cols, tasks, 0, j);
  min_max_cols(j, 0);
  return NULL;
}

/* MinMaxRows' task: row k of x [K, inner] -> part_min[k], part_max[k] */
static void min_max_row(void* p, size_t k) {
  const Job* j = (const Job*)p;
  lane_min_max(j->x + k * j->inner, j->inner, &j->part_min[k], &j->part_max[k]);
}

static OrtStatus* compute_min_max_rows(void* ctx, Job* j, const int64_t* dims, size_t rank) {
  OrtStatus* st;
  void *lo_v, *hi_v;
  int64_t od[16];
  if (rank < 1 || dims[0] < 1 || !j->n) return fail("fracgraph MinMaxRows: the tensor is empty");
  const size_t K = (size_t)dims[0];
  j->inner = j->n / K;
  for (size_t r = 0; r < rank; ++r) od[r] = r ? 1 : dims[0];
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, od, rank, &lo_v))) return st;
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 1, od, rank, &hi_v))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(lo_v, (void**)&j->part_min))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(hi_v, (void**)&j->part_max))) return st;
  if (K > 1) return API(KernelContext_ParallelFor, ParallelForFn)(ctx, min_max_row, K, 0, j);
  min_max_row(j, 0);
  return NULL;
}

static OrtStatus* parallel(void* ctx, Job* j) {
  size_t chunks = (j->n + CHUNK - 1) / CHUNK;
  if (chunks <= 1) {
    if (j->n) run_chunk(j, 0);
    return NULL;
  }
  return API(KernelContext_ParallelFor, ParallelForFn)(ctx, run_chunk, chunks, 0, j);
}

static OrtStatus* compute_min_max(void* ctx, Job* j) {
  OrtStatus* st;
  void *lo_v, *hi_v;
  float *lo, *hi;
  size_t chunks = (j->n + CHUNK - 1) / CHUNK;
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, NULL, 0, &lo_v))) return st;
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 1, NULL, 0, &hi_v))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(lo_v, (void**)&lo))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(hi_v, (void**)&hi))) return st;
  if (!j->n) return fail("fracgraph MinMax: the tensor is empty");
  j->part_min = (float*)malloc(2 * chunks * sizeof(float));
  if (!j->part_min) return fail("fracgraph MinMax: out of memory");
  j->part_max = j->part_min + chunks;
  st = parallel(ctx, j);
  if (!st) {
    float a = j->part_min[0], b = j->part_max[0];
    for (size_t c = 1; c < chunks; ++c) {
      a = j->part_min[c] < a ? j->part_min[c] : a;
      b = j->part_max[c] > b ? j->part_max[c] : b;
    }
    *lo = a;
    *hi = b;
  }
  free(j->part_min);
  return st;
}


/* ---- ConvGradW ------------------------------------------------------------------------------------------- */
/* dW[co][ci][a][b] = sum_{n,ho,wo} dY[n][co][ho][wo] * X[n][ci][ho*sh - ph + a*dh][wo*sw - pw + b*dw]
 *
 * As a GEMM per image, dW^T[k][co] += sum_p B[k][p] * dY^T[p][co] with k = (ci, a, b). Stride 1: B needs no
 * im2col: on X zero-padded to a grid of width Wg = Wo + (kw-1)*dw, the row of k is the padded image read from
 * offset a*dh*Wg + b*dw, and p runs over the output positions on that grid (dY^T is zero on its Wg - Wo extra
 * columns). Strided convs im2col B into a buffer. Either way the image's operands stay in cache. */
typedef struct {
  const float* dy;
  const float* x;
  float* parts;      /* tasks x Kp x Co: each task's dW^T */
  const float** rows; /* tasks x Kp: each task's B row pointers */
  float* scratch;    /* tasks x scratch_floats */
  int64_t N, Ci, H, W, Co, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
  size_t K, Kp, P, Wg, Hg, pad_floats, scratch_floats, tasks;
  int direct;        /* stride 1: rows into the padded image instead of im2col */
} WJob;

#define TILE_ROWS 8   /* B rows (k) per register tile: 8 x (Co / 16) accumulators, Co <= 64 */

static void im2col(const WJob* j, const float* x, float* col) {
  const int64_t H = j->H, W = j->W, Ho = j->Ho, Wo = j->Wo;
  for (int64_t ci = 0; ci < j->Ci; ++ci)
    for (int64_t a = 0; a < j->kh; ++a)
      for (int64_t b = 0; b < j->kw; ++b) {
        float* row = col + (size_t)((ci * j->kh + a) * j->kw + b) * j->P;
        const int64_t off = b * j->dw - j->pw, sw = j->sw;
        for (int64_t ho = 0; ho < Ho; ++ho) {
          const int64_t hi = ho * j->sh - j->ph + a * j->dh;
          float* out = row + ho * Wo;
          for (int64_t wo = 0; wo < Wo; ++wo) {
            const int64_t wi = wo * sw + off;
            out[wo] = (hi >= 0 && hi < H && wi >= 0 && wi < W) ? x[(ci * H + hi) * W + wi] : 0.0f;
          }
        }
      }
}

/* X zero-padded onto the Hg x Wg grid (ph rows and pw columns before), plus (kw-1)*dw zeros of slack after.
 * Writes the image's positions only: the caller zeroes the buffer once, and the padding stays zero. */
static void pad_image(const WJob* j, const float* x, float* xp) {
  const size_t Wg = j->Wg, Hg = j->Hg;
  for (int64_t ci = 0; ci < j->Ci; ++ci)
    for (int64_t h = 0; h < j->H; ++h) {
      const int64_t hg = h + j->ph;
      if (hg < 0 || hg >= (int64_t)Hg) continue;
      const int64_t w0 = j->pw < 0 ? -j->pw : 0;
      const int64_t w1 = j->W < (int64_t)Wg - j->pw ? j->W : (int64_t)Wg - j->pw;
      if (w1 > w0) memcpy(xp + (ci * Hg + hg) * Wg + w0 + j->pw, x + (ci * j->H + h) * j->W + w0, (size_t)(w1 - w0) * sizeof(float));
    }
}

/* dY^T of one image on a grid of row width `width` (>= Wo, extra columns zero): out[(ho*width + wo)*Co + co].
 * Blocks of 16 channels x 16 columns: 16 contiguous reads of dY, 16 contiguous writes of 16 channels. */
static void transpose_dy(const float* dy, float* out, size_t Co, size_t Ho, size_t Wo, size_t width) {
  enum { B = 16 };
  const size_t P = Ho * Wo;
  for (size_t ho = 0; ho < Ho; ++ho) {
    memset(out + (ho * width + Wo) * Co, 0, (width - Wo) * Co * sizeof(float));
    for (size_t w0 = 0; w0 < Wo; w0 += B) {
      const size_t w1 = w0 + B < Wo ? w0 + B : Wo;
      for (size_t c0 = 0; c0 < Co; c0 += B) {
        const size_t c1 = c0 + B < Co ? c0 + B : Co;
        for (size_t wo = w0; wo < w1; ++wo) {
          float* dst = out + (ho * width + wo) * Co;
          const float* src = dy + ho * Wo + wo;
          for (size_t co = c0; co < c1; ++co) dst[co] = src[co * P];
        }
      }
    }
  }
}

/* ct[k][co] += sum_{p < P} rows[k][p] * dyt[p][co] for k < Kp (Kp a multiple of TILE_ROWS). */
static void gemm_rows(const float* const* rows, const float* dyt, float* ct, size_t Kp, size_t P, size_t Co) {
#if defined(__AVX512F__)
  if (Co % 16 == 0 && Co <= 64) {
    const size_t V = Co / 16;
    for (size_t k0 = 0; k0 < Kp; k0 += TILE_ROWS) {
      __m512 acc[TILE_ROWS][4];
      const float* r_[TILE_ROWS];
      for (int r = 0; r < TILE_ROWS; ++r) {
        r_[r] = rows[k0 + r];
        for (size_t v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
      }
      if (V == 1) {
        for (size_t p = 0; p < P; ++p) {
          const __m512 b0 = _mm512_loadu_ps(dyt + p * Co);
          for (int r = 0; r < TILE_ROWS; ++r) acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(r_[r][p]), b0, acc[r][0]);
        }
      } else if (V == 2) {
        for (size_t p = 0; p < P; ++p) {
          const __m512 b0 = _mm512_loadu_ps(dyt + p * Co), b1 = _mm512_loadu_ps(dyt + p * Co + 16);
          for (int r = 0; r < TILE_ROWS; ++r) {
            const __m512 a = _mm512_set1_ps(r_[r][p]);
            acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
          }
        }
      } else {
        for (size_t p = 0; p < P; ++p) {
          __m512 b[4];
          for (size_t v = 0; v < 4; ++v) b[v] = v < V ? _mm512_loadu_ps(dyt + p * Co + 16 * v) : _mm512_setzero_ps();
          for (int r = 0; r < TILE_ROWS; ++r) {
            const __m512 a = _mm512_set1_ps(r_[r][p]);
            for (size_t v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
          }
        }
      }
      for (int r = 0; r < TILE_ROWS; ++r)
        for (size_t v = 0; v < V; ++v) {
          float* dst = ct + (k0 + r) * Co + 16 * v;
          _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), acc[r][v]));
        }
    }
    return;
  }
#endif
  for (size_t k = 0; k < Kp; ++k) {
    float* dst = ct + k * Co;
    for (size_t p = 0; p < P; ++p) {
      const float a = rows[k][p];
      const float* b = dyt + p * Co;
      for (size_t co = 0; co < Co; ++co) dst[co] += a * b[co];
    }
  }
}

static void conv_grad_task(void* p, size_t t) {
  const WJob* j = (const WJob*)p;
  const size_t Co = (size_t)j->Co, Kp = j->Kp;
  const size_t grid_p = j->direct ? (size_t)j->Ho * j->Wg : j->P;    /* GEMM length: positions on the grid */
  float* buf = j->scratch + t * j->scratch_floats;                   /* [image: pad or col][dY^T][zeros] */
  float* image = buf;
  float* dyt = image + (j->direct ? j->pad_floats : Kp * j->P);
  float* zeros = dyt + grid_p * Co;
  const float** rows = j->rows + t * Kp;
  float* ct = j->parts + t * Kp * Co;
  const int64_t n0 = (int64_t)(t * (size_t)j->N / j->tasks), n1 = (int64_t)((t + 1) * (size_t)j->N / j->tasks);
  const size_t width = j->direct ? j->Wg : (size_t)j->Wo;
  memset(ct, 0, Kp * Co * sizeof(float));
  memset(zeros, 0, grid_p * sizeof(float));
  if (j->direct) memset(image, 0, j->pad_floats * sizeof(float));
  for (size_t k = 0; k < Kp; ++k) {
    if (k >= j->K) { rows[k] = zeros; continue; }
    if (!j->direct) { rows[k] = image + k * j->P; continue; }
    const size_t ci = k / (size_t)(j->kh * j->kw), a = (k / (size_t)j->kw) % (size_t)j->kh, b = k % (size_t)j->kw;
    rows[k] = image + ci * j->Hg * j->Wg + a * (size_t)j->dh * j->Wg + b * (size_t)j->dw;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const float* x = j->x + (size_t)n * j->Ci * j->H * j->W;
    const float* dy = j->dy + (size_t)n * Co * j->P;
    if (j->direct) pad_image(j, x, image); else im2col(j, x, image);
    transpose_dy(dy, dyt, Co, (size_t)j->Ho, (size_t)j->Wo, width);
    gemm_rows(rows, dyt, ct, Kp, grid_p, Co);
  }
}

#define MAX_TASKS 8

static OrtStatus* compute_conv_grad_w(Kernel* k, void* ctx) {
  const void *dyv, *xv;
  void* wv;
  int64_t dd[16], xd[16];
  size_t dr, xr, dn, xn;
  OrtStatus* st;
  WJob j;
  memset(&j, 0, sizeof j);
  if ((st = input_shape(ctx, 0, &dyv, dd, &dr, &dn)) || (st = input_shape(ctx, 1, &xv, xd, &xr, &xn))) return st;
  if (dr != 4 || xr != 4 || dd[0] != xd[0]) return fail("fracgraph ConvGradW: dY and X must be NCHW tensors of one batch");
  j.N = xd[0], j.Ci = xd[1], j.H = xd[2], j.W = xd[3], j.Co = dd[1], j.Ho = dd[2], j.Wo = dd[3];
  j.kh = k->conv[0], j.kw = k->conv[1], j.sh = k->conv[2], j.sw = k->conv[3];
  j.ph = k->conv[4], j.pw = k->conv[5], j.dh = k->conv[6], j.dw = k->conv[7];
  j.P = (size_t)(j.Ho * j.Wo);
  j.K = (size_t)(j.Ci * j.kh * j.kw);
  j.Kp = (j.K + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
  j.direct = j.sh == 1 && j.sw == 1;
  j.Wg = (size_t)(j.Wo + (j.kw - 1) * j.dw);
  j.Hg = (size_t)(j.Ho + (j.kh - 1) * j.dh);
  j.pad_floats = (size_t)j.Ci * j.Hg * j.Wg + (size_t)((j.kw - 1) * j.dw);
  const size_t grid_p = j.direct ? (size_t)j.Ho * j.Wg : j.P;
  j.scratch_floats = (j.direct ? j.pad_floats : j.Kp * j.P) + grid_p * (size_t)j.Co + grid_p;
  int64_t wd[4] = {j.Co, j.Ci, j.kh, j.kw};
  float *dw, *mem;
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, wd, 4, &wv))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(wv, (void**)&dw))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)((void*)dyv, (void**)&j.dy))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)((void*)xv, (void**)&j.x))) return st;
  const size_t Co = (size_t)j.Co, K = j.K;
  j.tasks = j.N < MAX_TASKS ? (size_t)j.N : MAX_TASKS;
  if (j.tasks == 0 || j.P == 0) {
    memset(dw, 0, Co * K * sizeof(float));
    return NULL;
  }
  mem = (float*)malloc(j.tasks * (j.Kp * Co + j.scratch_floats) * sizeof(float));
  j.rows = (const float**)malloc(j.tasks * j.Kp * sizeof(float*));
  if (!mem || !j.rows) {
    free(mem);
    free(j.rows);
    return fail("fracgraph ConvGradW: out of memory");
  }
  j.parts = mem;
  j.scratch = mem + j.tasks * j.Kp * Co;
  st = j.tasks > 1 ? API(KernelContext_ParallelFor, ParallelForFn)(ctx, conv_grad_task, j.tasks, 0, &j)
                   : (conv_grad_task(&j, 0), NULL);
  if (!st)
    for (size_t co = 0; co < Co; ++co)
      for (size_t kk = 0; kk < K; ++kk) {
        float sum = 0.0f;
        for (size_t t = 0; t < j.tasks; ++t) sum += j.parts[(t * j.Kp + kk) * Co + co];
        dw[co * K + kk] = sum;
      }
  free(mem);
  free(j.rows);
  return st;
}


/* ---- ConvGradWCols: the operands of the weight gradient as one batched GEMM ------------------------------ */
/* dW[g] = dYt[g] @ col[g]^T with dYt [G, Co/G, N*P] (dY with the batch moved next to the positions) and col
 * [G, Kg, N*P] (im2col of X, row kg = (ci in group, a, b), column (n, p)), P = Ho*Wo, Kg = Ci/G * kh * kw. The
 * GEMM itself is a FusedMatMul (transB) in the graph (onnxruntime's MLAS, on the session's threads): its inner dimension is
 * the whole batch's N*P, where ConvGradW's per-image GEMMs have P (4 on a 2x2 map), so large channel counts on
 * small maps run at GEMM speed instead of re-reading a K x Co accumulator per image. Images as tasks. */
typedef struct {
  const float *dy, *x;
  float *dyt, *col;
  int64_t N, Ci, H, W, Co, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, G;
} ColJob;

/* im2col of image n into col [Ci*kh*kw, N*P]: row (ci, a, b), the image's positions at column n*P */
static void cols_of_image(const ColJob* j, int64_t n) {
  const int64_t P = j->Ho * j->Wo, NP = j->N * P, H = j->H, W = j->W, Ho = j->Ho, Wo = j->Wo;
  const float* xn = j->x + n * j->Ci * H * W;
  if (j->kh == 1 && j->kw == 1 && j->sh == 1 && j->sw == 1 && j->ph == 0 && j->pw == 0 && Ho == H && Wo == W) {
    for (int64_t ci = 0; ci < j->Ci; ++ci)   /* 1x1 stride 1 unpadded: each channel's plane is its row, as it is */
      memcpy(j->col + ci * NP + n * P, xn + ci * P, (size_t)P * sizeof(float));
    return;
  }
  for (int64_t ci = 0; ci < j->Ci; ++ci)
    for (int64_t a = 0; a < j->kh; ++a)
      for (int64_t b = 0; b < j->kw; ++b) {
        float* row = j->col + ((ci * j->kh + a) * j->kw + b) * NP + n * P;
        const int64_t off = b * j->dw - j->pw, sw = j->sw;
        /* the output columns whose input column lies inside the image: wo in [w0, w1) */
        int64_t w0 = off >= 0 ? 0 : (-off + sw - 1) / sw, w1 = W - off <= 0 ? 0 : (W - off + sw - 1) / sw;
        w1 = w1 < Wo ? w1 : Wo;
        w0 = w0 < w1 ? w0 : w1;
        for (int64_t ho = 0; ho < Ho; ++ho) {
          const int64_t hi = ho * j->sh - j->ph + a * j->dh;
          float* out = row + ho * Wo;
          if (hi < 0 || hi >= H) {
            memset(out, 0, (size_t)Wo * sizeof(float));
            continue;
          }
          const float* in = xn + (ci * H + hi) * W + off;
          for (int64_t wo = 0; wo < w0; ++wo) out[wo] = 0.0f;
          if (sw == 1) memcpy(out + w0, in + w0, (size_t)(w1 - w0) * sizeof(float));
          else for (int64_t wo = w0; wo < w1; ++wo) out[wo] = in[wo * sw];
          for (int64_t wo = w1; wo < Wo; ++wo) out[wo] = 0.0f;
        }
      }
}

static void cols_image(void* p, size_t n) {
  const ColJob* j = (const ColJob*)p;
  const int64_t P = j->Ho * j->Wo, NP = j->N * P;
  for (int64_t c = 0; c < j->Co; ++c)   /* row c of dYt [Co, N*P]: dY[n][c][:] at column n*P */
    memcpy(j->dyt + c * NP + (int64_t)n * P, j->dy + ((int64_t)n * j->Co + c) * P, (size_t)P * sizeof(float));
  cols_of_image(j, (int64_t)n);
}

/* Im2Col's task: one image. */
static void im2col_image(void* p, size_t n) { cols_of_image((const ColJob*)p, (int64_t)n); }

/* Col2Im's task: channel c of image n, t = n * Ci + c. Y[n][c] = sum over taps (a, b) in order of the tap's row
 * of cols added at the input positions it was read from (zero where none): the adjoint of cols_of_image. A 1x1
 * stride-1 unpadded Col2Im is the transpose [C, N*P] -> [N, C, P] (a GEMM's output back to NCHW). */
static void col2im_task(void* p, size_t t) {
  const ColJob* j = (const ColJob*)p;
  const int64_t P = j->Ho * j->Wo, NP = j->N * P, H = j->H, W = j->W, Ho = j->Ho, Wo = j->Wo;
  const int64_t n = (int64_t)t / j->Ci, ci = (int64_t)t % j->Ci;
  float* y = j->col + (n * j->Ci + ci) * H * W;   /* the output image channel */
  const float* cols = j->x;
  if (j->kh == 1 && j->kw == 1 && j->sh == 1 && j->sw == 1 && j->ph == 0 && j->pw == 0 && Ho == H && Wo == W) {
    memcpy(y, cols + ci * NP + n * P, (size_t)P * sizeof(float));
    return;
  }
  memset(y, 0, (size_t)(H * W) * sizeof(float));
  for (int64_t a = 0; a < j->kh; ++a)
    for (int64_t b = 0; b < j->kw; ++b) {
      const float* row = cols + ((ci * j->kh + a) * j->kw + b) * NP + n * P;
      const int64_t off = b * j->dw - j->pw, sw = j->sw;
      int64_t w0 = off >= 0 ? 0 : (-off + sw - 1) / sw, w1 = W - off <= 0 ? 0 : (W - off + sw - 1) / sw;
      w1 = w1 < Wo ? w1 : Wo;
      w0 = w0 < w1 ? w0 : w1;
      for (int64_t ho = 0; ho < Ho; ++ho) {
        const int64_t hi = ho * j->sh - j->ph + a * j->dh;
        if (hi < 0 || hi >= H) continue;
        float* out = y + hi * W + off;
        const float* in = row + ho * Wo;
        if (sw == 1) for (int64_t wo = w0; wo < w1; ++wo) out[wo] += in[wo];
        else for (int64_t wo = w0; wo < w1; ++wo) out[wo * sw] += in[wo];
      }
    }
}

/* Reads dY and X, checks they are one batch of a conv with these attributes; fills the shared fields. */
static OrtStatus* conv_io(Kernel* k, void* ctx, const char* op, const void** dyv, const void** xv, int64_t* f) {
  int64_t dd[16], xd[16];
  size_t dr, xr, dn, xn;
  OrtStatus* st;
  if ((st = input_shape(ctx, 0, dyv, dd, &dr, &dn)) || (st = input_shape(ctx, 1, xv, xd, &xr, &xn))) return st;
  if (dr != 4 || xr != 4 || dd[0] != xd[0]) return fail(op);
  for (int i = 0; i < 4; ++i) f[i] = xd[i];
  f[4] = dd[1], f[5] = dd[2], f[6] = dd[3];
  const int64_t kh = k->conv[0], kw = k->conv[1], sh = k->conv[2], sw = k->conv[3];
  const int64_t ph = k->conv[4], pw = k->conv[5], dh = k->conv[6], dw = k->conv[7];
  if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || kh < 1 || kw < 1) return fail(op);
  /* dY's spatial size is the conv's (the trailing pads follow from it) */
  if (f[5] < 1 || f[6] < 1 || (f[5] - 1) * sh - ph + (kh - 1) * dh < 0 || (f[6] - 1) * sw - pw + (kw - 1) * dw < 0) return fail(op);
  return NULL;
}

static OrtStatus* compute_conv_cols(Kernel* k, void* ctx) {
  const void *dyv, *xv;
  void *dytv, *colv;
  int64_t f[7];
  OrtStatus* st;
  ColJob j;
  memset(&j, 0, sizeof j);
  if ((st = conv_io(k, ctx, "fracgraph ConvGradWCols: dY and X must be NCHW tensors of one batch", &dyv, &xv, f))) return st;
  j.N = f[0], j.Ci = f[1], j.H = f[2], j.W = f[3], j.Co = f[4], j.Ho = f[5], j.Wo = f[6];
  j.kh = k->conv[0], j.kw = k->conv[1], j.sh = k->conv[2], j.sw = k->conv[3];
  j.ph = k->conv[4], j.pw = k->conv[5], j.dh = k->conv[6], j.dw = k->conv[7], j.G = k->conv[8];
  if (j.G < 1 || j.Ci % j.G || j.Co % j.G) return fail("fracgraph ConvGradWCols: group must divide both channel counts");
  const int64_t NP = j.N * j.Ho * j.Wo;
  int64_t d1[3] = {j.G, j.Co / j.G, NP}, d2[3] = {j.G, j.Ci / j.G * j.kh * j.kw, NP};
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, d1, 3, &dytv)) ||
      (st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 1, d2, 3, &colv)))
    return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(dytv, (void**)&j.dyt)) ||
      (st = API(GetTensorMutableData, GetDataFn)(colv, (void**)&j.col)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)dyv, (void**)&j.dy)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)xv, (void**)&j.x)))
    return st;
  if (j.N > 1) return API(KernelContext_ParallelFor, ParallelForFn)(ctx, cols_image, (size_t)j.N, 0, &j);
  if (j.N == 1) cols_image(&j, 0);
  return NULL;
}

/* Im2Col(X [N, C, h, w]) -> [C*kh*kw, N*ho*wo] and Col2Im(cols [.., N*ho*wo] with C*kh*kw rows) -> [N, C, h, w],
 * ho and wo the conv's output size (the trailing pads follow from them); the spatial sizes are attributes, checked
 * against the input, so that Col2Im knows its output's and both refuse a tensor of another shape. */
static OrtStatus* compute_cols(Kernel* k, void* ctx) {
  const void* xv;
  void* ov;
  int64_t d[16];
  size_t rank, count;
  OrtStatus* st;
  ColJob j;
  memset(&j, 0, sizeof j);
  const int im = k->kind == IM2COL;
  j.kh = k->conv[0], j.kw = k->conv[1], j.sh = k->conv[2], j.sw = k->conv[3];
  j.ph = k->conv[4], j.pw = k->conv[5], j.dh = k->conv[6], j.dw = k->conv[7];
  j.H = k->conv[8], j.W = k->conv[9], j.Ho = k->conv[10], j.Wo = k->conv[11];
  const int64_t taps = j.kh * j.kw, P = j.Ho * j.Wo;
  if (j.kh < 1 || j.kw < 1 || j.sh < 1 || j.sw < 1 || j.dh < 1 || j.dw < 1 || j.H < 1 || j.W < 1 || P < 1 ||
      (j.Ho - 1) * j.sh - j.ph + (j.kh - 1) * j.dh < 0 || (j.Wo - 1) * j.sw - j.pw + (j.kw - 1) * j.dw < 0)
    return fail("fracgraph Im2Col/Col2Im: invalid conv attributes");
  if ((st = input_shape(ctx, 0, &xv, d, &rank, &count))) return st;
  if (im) {
    if (rank != 4 || d[2] != j.H || d[3] != j.W) return fail("fracgraph Im2Col: X must be [N, C, h, w]");
    j.N = d[0], j.Ci = d[1];
    int64_t od[2] = {j.Ci * taps, j.N * P};
    if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, od, 2, &ov))) return st;
  } else {
    if (rank < 2 || d[rank - 1] % P || (int64_t)count % (taps * d[rank - 1]))
      return fail("fracgraph Col2Im: cols must be [C*kh*kw, N*ho*wo] (leading dims flattened)");
    j.N = d[rank - 1] / P, j.Ci = (int64_t)count / d[rank - 1] / taps;
    int64_t od[4] = {j.N, j.Ci, j.H, j.W};
    if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, od, 4, &ov))) return st;
  }
  if ((st = API(GetTensorMutableData, GetDataFn)(ov, (void**)&j.col)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)xv, (void**)&j.x)))
    return st;
  const size_t tasks = (size_t)(im ? j.N : j.N * j.Ci);
  void (*fn)(void*, size_t) = im ? im2col_image : col2im_task;
  if (tasks > 1) return API(KernelContext_ParallelFor, ParallelForFn)(ctx, fn, tasks, 0, &j);
  if (tasks == 1) fn(&j, 0);
  return NULL;
}

/* ---- MaxPoolIdx: max pool with the indices onnxruntime's MaxPoolGrad reads ---------------------------------- */
/* onnxruntime 1.19's MaxPool with an Indices output runs a generic per-element loop (5% of resnet18's profiled
 * step for one 3x3/2 pool). Each window keeps its first strict maximum over its taps in row-major order, starting
 * from the lowest float with index (h, w) = (-1, -1), and the index is plane * H * W + h * W + w over the whole
 * tensor (storage order 0): onnxruntime's MaxPool values and indices, bitwise (tests/passes/test_fused_ops.py
 * compares both).
 *
 * The AVX-512 path (session 11) takes the output as one flat array of N*C*Ho*Wo windows, 16 at a time, whatever the
 * plane size: googlenet's pools are 16x16 down to 2x2 planes, where a vector along one output row (the session-6
 * path) never filled and every window ran the scalar loop (12.5% of googlenet's profiled step). The 16 lanes' window
 * geometry repeats with period lcm(Ho*Wo, 16) outputs, so it is tabulated once per call: per lane, the window's
 * first tap (hs, ws) and its input offset from the period's first plane. Each tap is then one vector step: lanes
 * whose tap lies inside the image (two unsigned compares) load it (a plain masked load where the lanes' taps are
 * consecutive floats, as in a stride-1 "same" pool, else a masked gather), and a lane takes it where it is strictly
 * greater (the scalar loop's compare, in its tap order: the same values and indices, lane by lane). Tasks are
 * runs of 16-window chunks; without AVX-512, past 2^30 elements, or where the table would outgrow the output (an
 * odd plane size over fewer than 16 planes) runs of planes take the scalar loop. */
typedef struct {
  const float* x;
  float* y;
  int64_t* idx;
  int64_t H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t planes, per;       /* scalar path: planes per task */
  /* vector path */
  int64_t chunks, per_chunks, R, pp, total;   /* 16-window chunks, chunks per task, period in chunks and in planes */
  const int32_t *off, *hs, *ws;               /* [R][16] each */
  int contiguous;                             /* every chunk's lanes read consecutive floats */
} PoolJob;

/* one output row's windows [ow0, ow1) on the scalar path (the first strict maximum in row-major tap order) */
static void pool_row(const PoolJob* j, const float* x, int64_t oh, int64_t ow0, int64_t ow1, float* y, int64_t* id,
                     int64_t base) {
  const int64_t H = j->H, W = j->W;
  int64_t hs = oh * j->sh - j->ph;
  const int64_t he = hs + j->kh * j->dh < H ? hs + j->kh * j->dh : H;
  while (hs < 0) hs += j->dh;
  for (int64_t ow = ow0; ow < ow1; ++ow) {
    int64_t ws = ow * j->sw - j->pw;
    const int64_t we = ws + j->kw * j->dw < W ? ws + j->kw * j->dw : W;
    while (ws < 0) ws += j->dw;
    float m = -FLT_MAX;
    int64_t at = -W - 1;   /* (h, w) = (-1, -1): a window over padding only */
    for (int64_t h = hs; h < he; h += j->dh)
      for (int64_t w = ws; w < we; w += j->dw) {
        const float v = x[h * W + w];
        if (v > m) m = v, at = h * W + w;
      }
    y[oh * j->Wo + ow] = m;
    id[oh * j->Wo + ow] = base + at;
  }
}

/* the scalar path: planes [t * per, (t + 1) * per) */
static void pool_planes(void* p, size_t t) {
  const PoolJob* j = (const PoolJob*)p;
  const int64_t p0 = (int64_t)t * j->per, p1 = p0 + j->per < j->planes ? p0 + j->per : j->planes;
  for (int64_t q = p0; q < p1; ++q) {
    const float* x = j->x + q * j->H * j->W;
    float* y = j->y + q * j->Ho * j->Wo;
    int64_t* id = j->idx + q * j->Ho * j->Wo;
    for (int64_t oh = 0; oh < j->Ho; ++oh) pool_row(j, x, oh, 0, j->Wo, y, id, q * j->H * j->W);
  }
}

#if defined(__AVX512F__)
/* the vector path: chunks [t * per_chunks, ...) of 16 windows of the flat output */
static void pool_chunks(void* p, size_t t) {
  const PoolJob* j = (const PoolJob*)p;
  const int64_t c0 = (int64_t)t * j->per_chunks, c1 = c0 + j->per_chunks < j->chunks ? c0 + j->per_chunks : j->chunks;
  const __m512i Hv = _mm512_set1_epi32((int)j->H), Wv = _mm512_set1_epi32((int)j->W);
  const __m512i empty = _mm512_set1_epi32((int)(-j->W - 1));
  const int64_t plane = j->H * j->W;
  int64_t r = c0 % j->R, period = c0 / j->R;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t first = c * 16, left = j->total - first;
    const __mmask16 lanes = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    const int32_t pb = (int32_t)(period * j->pp * plane);   /* the period's first plane's offset */
    const __m512i off = _mm512_add_epi32(_mm512_loadu_si512((const void*)(j->off + r * 16)), _mm512_set1_epi32(pb));
    const __m512i hs = _mm512_loadu_si512((const void*)(j->hs + r * 16)), ws = _mm512_loadu_si512((const void*)(j->ws + r * 16));
    /* a window over padding only: its plane's offset + (h, w) = (-1, -1), i.e. off - hs * W - ws - W - 1 */
    __m512i at = _mm512_add_epi32(_mm512_sub_epi32(_mm512_sub_epi32(off, _mm512_mullo_epi32(hs, Wv)), ws), empty);
    __m512 m = _mm512_set1_ps(-FLT_MAX);
    const int32_t lane0 = j->off[r * 16] + pb;
    for (int64_t a = 0; a < j->kh; ++a) {
      const __mmask16 inh = _mm512_mask_cmplt_epu32_mask(lanes, _mm512_add_epi32(hs, _mm512_set1_epi32((int)(a * j->dh))), Hv);
      if (!inh) continue;
      for (int64_t b = 0; b < j->kw; ++b) {
        const int32_t tap = (int32_t)(a * j->dh * j->W + b * j->dw);
        const __mmask16 in = _mm512_mask_cmplt_epu32_mask(inh, _mm512_add_epi32(ws, _mm512_set1_epi32((int)(b * j->dw))), Wv);
        if (!in) continue;
        const __m512i pos = _mm512_add_epi32(off, _mm512_set1_epi32(tap));
        const __m512 v = j->contiguous ? _mm512_maskz_loadu_ps(in, j->x + lane0 + tap)
                                       : _mm512_mask_i32gather_ps(m, in, pos, j->x, 4);
        const __mmask16 gt = _mm512_mask_cmp_ps_mask(in, v, m, _CMP_GT_OQ);
        m = _mm512_mask_mov_ps(m, gt, v);
        at = _mm512_mask_mov_epi32(at, gt, pos);
      }
    }
    _mm512_mask_storeu_ps(j->y + first, lanes, m);
    _mm512_mask_storeu_epi64(j->idx + first, (__mmask8)lanes, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(at)));
    _mm512_mask_storeu_epi64(j->idx + first + 8, (__mmask8)(lanes >> 8), _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(at, 1)));
    if (++r == j->R) r = 0, ++period;
  }
}
#endif

/* tasks of about POOL_TASK windows (at least one plane or chunk each) */
enum { POOL_TASK = 4096 };

static int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    const int64_t t = a % b;
    a = b, b = t;
  }
  return a;
}

/* runs MaxPoolIdx's job j (x, y, idx and the geometry set) on the session's threads */
static OrtStatus* run_max_pool(PoolJob* j, void* ctx) {
  const int64_t P = j->Ho * j->Wo, plane = j->H * j->W;
  j->total = j->planes * P;
  OrtStatus* st = NULL;
#if defined(__AVX512F__)
  j->R = P / gcd64(P, 16);                 /* lcm(P, 16) / 16 chunks per period */
  j->pp = j->R * 16 / P;                   /* planes per period */
  /* int32 offsets: the tensor, a period's planes and the windows' reach must stay far from 2^31 */
  const int64_t reach = (j->kh * j->dh + j->ph + j->sh) * (j->W + 1) + j->kw * j->dw + j->pw + j->sw;
  /* and the table (16 R lanes) no larger than the output: odd plane sizes over few planes take the scalar loop */
  if (j->planes * plane < (1LL << 30) && (j->pp + 1) * plane < (1LL << 30) && reach < (1LL << 28) &&
      16 * j->R <= j->total) {
    int32_t* tab = (int32_t*)malloc(sizeof(int32_t) * 3 * 16 * (size_t)j->R);
    if (!tab) return fail("fracgraph MaxPoolIdx: out of memory");
    int32_t *off = tab, *hs = tab + 16 * j->R, *ws = tab + 32 * j->R;
    int contiguous = 1;
    for (int64_t g = 0; g < 16 * j->R; ++g) {
      const int64_t q = g / P, o = g % P, oh = o / j->Wo, ow = o % j->Wo;
      hs[g] = (int32_t)(oh * j->sh - j->ph), ws[g] = (int32_t)(ow * j->sw - j->pw);
      off[g] = (int32_t)(q * plane + (int64_t)hs[g] * j->W + ws[g]);
      if (g % 16 && off[g] != off[g - 1] + 1) contiguous = 0;
    }
    j->off = off, j->hs = hs, j->ws = ws, j->contiguous = contiguous;
    j->chunks = (j->total + 15) / 16;
    j->per_chunks = POOL_TASK / 16;
    const size_t tasks = (size_t)((j->chunks + j->per_chunks - 1) / j->per_chunks);
    if (tasks > 1) st = API(KernelContext_ParallelFor, ParallelForFn)(ctx, pool_chunks, tasks, 0, j);
    else if (tasks == 1) pool_chunks(j, 0);
    free(tab);
    return st;
  }
#endif
  j->per = P >= POOL_TASK ? 1 : POOL_TASK / P;
  const size_t tasks = (size_t)((j->planes + j->per - 1) / j->per);
  if (tasks > 1) return API(KernelContext_ParallelFor, ParallelForFn)(ctx, pool_planes, tasks, 0, j);
  if (tasks == 1) pool_planes(j, 0);
  return st;
}

static OrtStatus* compute_max_pool(Kernel* k, void* ctx) {
  const void* xv;
  void *yv, *iv;
  int64_t d[16];
  size_t rank, count;
  OrtStatus* st;
  PoolJob j;
  memset(&j, 0, sizeof j);
  if ((st = input_shape(ctx, 0, &xv, d, &rank, &count))) return st;
  j.kh = k->conv[0], j.kw = k->conv[1], j.sh = k->conv[2], j.sw = k->conv[3];
  j.ph = k->conv[4], j.pw = k->conv[5], j.dh = k->conv[6], j.dw = k->conv[7];
  if (rank != 4 || j.kh < 1 || j.kw < 1 || j.sh < 1 || j.sw < 1 || j.dh < 1 || j.dw < 1)
    return fail("fracgraph MaxPoolIdx: X must be [N, C, H, W] and the attributes positive");
  j.H = d[2], j.W = d[3];
  /* onnxruntime's output size: floor, or with ceil_mode the ceiling, of (padded extent - window) / stride, + 1 */
  const int64_t eh = j.H + j.ph + k->conv[8] - j.dh * (j.kh - 1) - 1, ew = j.W + j.pw + k->conv[9] - j.dw * (j.kw - 1) - 1;
  const int64_t ch = k->conv[10] ? j.sh - 1 : 0, cw = k->conv[10] ? j.sw - 1 : 0;
  j.Ho = (eh < 0 ? eh - j.sh + 1 : eh + ch) / j.sh + 1;
  j.Wo = (ew < 0 ? ew - j.sw + 1 : ew + cw) / j.sw + 1;
  if (j.Ho < 1 || j.Wo < 1) return fail("fracgraph MaxPoolIdx: the window is larger than the padded input");
  int64_t od[4] = {d[0], d[1], j.Ho, j.Wo};
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, od, 4, &yv)) ||
      (st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 1, od, 4, &iv)))
    return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(yv, (void**)&j.y)) ||
      (st = API(GetTensorMutableData, GetDataFn)(iv, (void**)&j.idx)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)xv, (void**)&j.x)))
    return st;
  j.planes = d[0] * d[1];
  return run_max_pool(&j, ctx);
}

/* ---- LayerNormGrad ---------------------------------------------------------------------------------------- */
/* onnxruntime's com.microsoft LayerNormalizationGrad (saved mean and inverse std per row from the forward) over
 * rows of D = the normalized size: with a = dY * scale and b = (X - mean) * inv_std, dX = inv_std * (a - mean(a)
 * - b mean(a b)), dscale = sum over rows of dY b, dbias = sum of dY. onnxruntime runs it on one thread (10.6% of
 * vit_tv's profiled step for 9 nodes); here blocks of LN_ROWS rows are tasks, each row's two sums in float lanes
 * added in double, and each block's dscale/dbias partial sums (float, in row order) are added across blocks in
 * block order in double: the same result on any thread count. */
enum { LN_ROWS = 32 };
typedef struct {
  const float *dy, *x, *scale, *mean, *inv_std;
  const float* res;   /* the optional sixth input R: dX + R is written (onnxruntime's Sum of the two), else NULL */
  float *dx, *part;   /* part: [blocks][2][D] partial dscale, dbias */
  size_t R, D;
} LnJob;

/* One row; restrict parameters: with the job struct's pointers (which may alias, to the compiler) the last loop
 * was not vectorized ("versioning for alias required"); each element's arithmetic is the same either way, so the
 * results are bitwise those of the scalar loop. */
static inline void ln_grad_row(const float* restrict dy, const float* restrict x, const float* restrict scale,
                               const float* restrict res, float* restrict dx, float* restrict ps, float* restrict pb,
                               size_t D, float mu, float is) {
  enum { LANES = 16 };
  float sa[LANES] = {0}, sab[LANES] = {0};
  size_t i = 0;
  for (; i + LANES <= D; i += LANES)
    for (int l = 0; l < LANES; ++l) {
      const float av = dy[i + l] * scale[i + l], bv = (x[i + l] - mu) * is;
      sa[l] += av;
      sab[l] += av * bv;
    }
  for (; i < D; ++i) {
    const float av = dy[i] * scale[i], bv = (x[i] - mu) * is;
    sa[0] += av;
    sab[0] += av * bv;
  }
  double ma = 0.0, mab = 0.0;
  for (int l = 0; l < LANES; ++l) ma += sa[l], mab += sab[l];
  const float fa = (float)(ma / (double)D), fab = (float)(mab / (double)D);
  for (size_t d = 0; d < D; ++d) {
    const float bv = (x[d] - mu) * is;
    dx[d] = is * (dy[d] * scale[d] - fa - bv * fab);
    ps[d] += dy[d] * bv;
    pb[d] += dy[d];
  }
  if (res)   /* dX rounded to float first, then the add: what the Sum of the stored dX and R computes */
    for (size_t d = 0; d < D; ++d) dx[d] = dx[d] + res[d];
}

static void ln_grad_block(void* p, size_t blk) {
  const LnJob* j = (const LnJob*)p;
  const size_t D = j->D, r0 = blk * LN_ROWS, r1 = r0 + LN_ROWS < j->R ? r0 + LN_ROWS : j->R;
  float* ps = j->part + blk * 2 * D;
  float* pb = ps + D;
  memset(ps, 0, sizeof(float) * 2 * D);
  for (size_t r = r0; r < r1; ++r)
    ln_grad_row(j->dy + r * D, j->x + r * D, j->scale, j->res ? j->res + r * D : NULL, j->dx + r * D, ps, pb, D,
                j->mean[r], j->inv_std[r]);
}

static OrtStatus* compute_ln_grad(void* ctx) {
  const void* in[5];
  void* out[3];
  int64_t dims[16], other[16], sdims[16];
  size_t rank, r2, srank, n, count;
  OrtStatus* st;
  LnJob j;
  memset(&j, 0, sizeof j);
  if ((st = input_shape(ctx, 0, &in[0], dims, &rank, &n)) || (st = input_shape(ctx, 1, &in[1], other, &r2, &count))) return st;
  if (count != n) return fail("fracgraph LayerNormGrad: dY and X must be one shape");
  if ((st = input_shape(ctx, 2, &in[2], sdims, &srank, &count))) return st;
  j.D = count;
  if (!j.D || n % j.D) return fail("fracgraph LayerNormGrad: X's size is not a multiple of scale's");
  j.R = n / j.D;
  for (size_t i = 3; i < 5; ++i) {
    if ((st = input_shape(ctx, i, &in[i], other, &r2, &count))) return st;
    if (count != j.R) return fail("fracgraph LayerNormGrad: mean and inv_std need one value per normalized row");
  }
  const void* rv = NULL;
  if ((st = API(KernelContext_GetInput, GetInputFn)(ctx, 5, &rv))) return st;
  if (rv) {   /* R: dY's shape exactly (the Sum it replaces had no broadcasting) */
    int64_t rd[16];
    size_t rr, rc;
    if ((st = input_shape(ctx, 5, &rv, rd, &rr, &rc))) return st;
    int same = rr == rank && rc == n;
    for (size_t r = 0; same && r < rank; ++r) same = rd[r] == dims[r];
    if (!same) return fail("fracgraph LayerNormGrad: R must have dY's shape");
    if ((st = API(GetTensorMutableData, GetDataFn)((void*)rv, (void**)&j.res))) return st;
  }
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, dims, rank, &out[0])) ||
      (st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 1, sdims, srank, &out[1])) ||
      (st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 2, sdims, srank, &out[2])))
    return st;
  const float** src[5] = {&j.dy, &j.x, &j.scale, &j.mean, &j.inv_std};
  for (int i = 0; i < 5; ++i)
    if ((st = API(GetTensorMutableData, GetDataFn)((void*)in[i], (void**)src[i]))) return st;
  float *dscale, *dbias;
  if ((st = API(GetTensorMutableData, GetDataFn)(out[0], (void**)&j.dx)) ||
      (st = API(GetTensorMutableData, GetDataFn)(out[1], (void**)&dscale)) ||
      (st = API(GetTensorMutableData, GetDataFn)(out[2], (void**)&dbias)))
    return st;
  const size_t blocks = (j.R + LN_ROWS - 1) / LN_ROWS;
  double* acc = (double*)calloc(2 * j.D, sizeof(double));
  j.part = (float*)malloc(sizeof(float) * 2 * j.D * (blocks ? blocks : 1));
  if (!acc || !j.part) {
    free(acc), free(j.part);
    return fail("fracgraph LayerNormGrad: out of memory");
  }
  if (blocks > 1) st = API(KernelContext_ParallelFor, ParallelForFn)(ctx, ln_grad_block, blocks, 0, &j);
  else if (blocks == 1) ln_grad_block(&j, 0);
  for (size_t b = 0; !st && b < blocks; ++b)
    for (size_t d = 0; d < 2 * j.D; ++d) acc[d] += j.part[b * 2 * j.D + d];
  for (size_t d = 0; !st && d < j.D; ++d) dscale[d] = (float)acc[d], dbias[d] = (float)acc[j.D + d];
  free(acc), free(j.part);
  return st;
}

/* ---- MaxPoolIdxGrad: dX of a max pool from MaxPoolIdx's (or onnxruntime's MaxPool's) indices -------------- */
/* onnxruntime's MaxPoolGrad zeroes dX and adds each dY element at its index, one thread (6.7-8.7% of squeezenet's
 * and googlenet's profiled step). The indices of storage order 0 stay inside their (image, channel) plane, so the
 * planes are independent tasks; within a plane the adds run in dY's order, as onnxruntime's do (bitwise its dX,
 * tests/passes/test_fused_ops.py). A window that covers padding only (ceil mode with padding can make one) has no
 * input element: MaxPool gives it the lowest float and the index of (h, w) = (-1, -1), outside its plane, where
 * onnxruntime's MaxPoolGrad would add its dY into another plane (or before the tensor); here it is dropped. */
typedef struct {
  const float* dy;
  const int64_t* idx;
  float* dx;
  int64_t plane_in, plane_out;   /* H * W, Ho * Wo */
  int64_t planes, per;           /* planes per task (session 11: one task per plane cost more than googlenet's 2x2
                                    and 4x4 planes' adds) */
} PoolGradJob;

static void pool_grad_planes(void* p, size_t t) {
  PoolGradJob* j = (PoolGradJob*)p;
  const int64_t p0 = (int64_t)t * j->per, p1 = p0 + j->per < j->planes ? p0 + j->per : j->planes;
  memset(j->dx + p0 * j->plane_in, 0, sizeof(float) * (size_t)((p1 - p0) * j->plane_in));
  for (int64_t q = p0; q < p1; ++q) {
    float* dx = j->dx + q * j->plane_in;
    const float* dy = j->dy + q * j->plane_out;
    const int64_t* id = j->idx + q * j->plane_out;
    const int64_t base = q * j->plane_in;
    for (int64_t o = 0; o < j->plane_out; ++o) {
      const int64_t i = id[o] - base;
      if (i >= 0 && i < j->plane_in) dx[i] += dy[o];   /* else an empty window's (above) */
    }
  }
}

static OrtStatus* compute_max_pool_grad(void* ctx) {
  const void *dyv, *iv, *sv;
  void* xv;
  int64_t d[16], di[16], ds[16], xs[16];
  size_t rank, irank, srank, count, icount, scount;
  OrtStatus* st;
  PoolGradJob j;
  memset(&j, 0, sizeof j);
  if ((st = input_shape(ctx, 0, &dyv, d, &rank, &count)) || (st = input_shape(ctx, 1, &iv, di, &irank, &icount)) ||
      (st = input_shape(ctx, 2, &sv, ds, &srank, &scount)))
    return st;
  if (rank != 4 || irank != 4 || icount != count || srank != 1 || scount != 4)
    return fail("fracgraph MaxPoolIdxGrad: dY and Indices must be [N, C, Ho, Wo] and shape X's 4 dims");
  const int64_t* shape;
  if ((st = API(GetTensorMutableData, GetDataFn)((void*)sv, (void**)&shape))) return st;
  for (int r = 0; r < 4; ++r) xs[r] = shape[r];
  if (xs[0] != d[0] || xs[1] != d[1] || xs[2] < 1 || xs[3] < 1)
    return fail("fracgraph MaxPoolIdxGrad: X's shape does not match dY's images and channels");
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, xs, 4, &xv))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(xv, (void**)&j.dx)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)dyv, (void**)&j.dy)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)iv, (void**)&j.idx)))
    return st;
  j.plane_in = xs[2] * xs[3], j.plane_out = d[2] * d[3];
  j.planes = d[0] * d[1];
  const int64_t work = j.plane_in > j.plane_out ? j.plane_in : j.plane_out;
  j.per = work >= POOL_TASK ? 1 : POOL_TASK / work;
  const size_t tasks = (size_t)((j.planes + j.per - 1) / j.per);
  if (tasks > 1 && (st = API(KernelContext_ParallelFor, ParallelForFn)(ctx, pool_grad_planes, tasks, 0, &j))) return st;
  if (tasks == 1) pool_grad_planes(&j, 0);
  return NULL;
}

/* ---- DepthwiseConvGradW: the weight gradient of a depthwise conv (group = Ci = Co) ----------------------- */
/* dW[c][0][a][b] = sum_{n,ho,wo} dY[n][c][ho][wo] * X[n][c][ho*sh - ph + a*dh][wo*sw - pw + b*dw]: channels as
 * tasks, images in order, each tap a dot product over the image in float lanes, added in double. No GEMM
 * exists here (one output row per channel), so the im2col + MatMul form would only add col's memory traffic;
 * onnxruntime's ConvGrad runs it as C per-image GEMMs of one row each. */
typedef struct {
  const float *dy, *x;
  float* dwt;
  int64_t N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
} DwJob;

static void dw_channel(void* p, size_t c) {
  const DwJob* j = (const DwJob*)p;
  const int64_t H = j->H, W = j->W, Ho = j->Ho, Wo = j->Wo, sw = j->sw, taps = j->kh * j->kw;
  enum { LANES = 8, MAX_TAPS = 256 };
  double sums[MAX_TAPS];
  for (int64_t t = 0; t < taps; ++t) sums[t] = 0.0;
  for (int64_t n = 0; n < j->N; ++n) {   /* image-major: the image's two planes stay in L1 across the taps */
    const float* dy = j->dy + (n * j->C + (int64_t)c) * Ho * Wo;
    const float* x = j->x + (n * j->C + (int64_t)c) * H * W;
    for (int64_t a = 0; a < j->kh; ++a)
      for (int64_t b = 0; b < j->kw; ++b) {
        /* the output rows/columns whose tap (a, b) lands inside the image */
        int64_t h0 = 0, h1 = Ho, w0 = 0, w1 = Wo;
        while (h0 < Ho && h0 * j->sh - j->ph + a * j->dh < 0) ++h0;
        while (h1 > h0 && (h1 - 1) * j->sh - j->ph + a * j->dh >= H) --h1;
        while (w0 < Wo && w0 * sw - j->pw + b * j->dw < 0) ++w0;
        while (w1 > w0 && (w1 - 1) * sw - j->pw + b * j->dw >= W) --w1;
        float acc[LANES] = {0};
        for (int64_t ho = h0; ho < h1; ++ho) {
          const float* dr = dy + ho * Wo;
          const int64_t hi = ho * j->sh - j->ph + a * j->dh;
          const float* xr = x + hi * W + (w0 * sw - j->pw + b * j->dw);   /* X at output column w0 */
          int64_t wo = w0;
          if (sw == 1)
            for (; wo + LANES <= w1; wo += LANES)
              for (int l = 0; l < LANES; ++l) acc[l] += dr[wo + l] * xr[wo - w0 + l];
          else
            for (; wo + LANES <= w1; wo += LANES)
              for (int l = 0; l < LANES; ++l) acc[l] += dr[wo + l] * xr[(wo - w0 + l) * sw];
          for (; wo < w1; ++wo) acc[wo & (LANES - 1)] += dr[wo] * xr[(wo - w0) * sw];
        }
        double t = 0.0;
        for (int l = 0; l < LANES; ++l) t += acc[l];
        sums[a * j->kw + b] += t;
      }
  }
  for (int64_t t = 0; t < taps; ++t) j->dwt[(int64_t)c * taps + t] = (float)sums[t];
}

#if defined(__AVX512F__)
/* The AVX-512 form of dw_channel: vectors run along the output row (16 output columns per lane set), the taps
 * of a kernel row together (up to DW_NB accumulators, one per tap, each dY vector loaded once for all of them).
 * Each image is first copied into a zero-padded buffer split into sw column phases (column u of the padded
 * image at phase u % sw, index u / sw), so that tap (a, b) of every output column wo reads padded row
 * ho*sh + a*dh, phase (b*dw) % sw, index wo + (b*dw) / sw: a contiguous load for any stride and dilation, and no
 * bounds to test (the padding reads zeros). Loads are masked to the row's Wo columns, so lanes past the row never
 * see other values. Per image the taps' float lanes (a sum of Ho * ceil(Wo/16) products each) are added into
 * double lanes; the 16 double lanes are added at the end. Returns 0 where the buffers cannot be allocated (the
 * caller then runs the plain loops). */
enum { DW_NB = 8 };

/* Row xr's columns [wlo, whi) into the sw phases of a padded row (column u = wi + pw at phase u % sw, index
 * u / sw; phase q at out + q * plane): one strided sweep per phase, no division per element. */
static void dw_split_row(const float* xr, float* out, int64_t wlo, int64_t whi, int64_t pw, int64_t sw, int64_t plane) {
  for (int64_t q = 0; q < sw; ++q) {
    int64_t wi = wlo + ((q - (wlo + pw)) % sw + sw) % sw;   /* the first column of phase q */
    float* o = out + q * plane + (wi + pw) / sw;
    for (; wi < whi; wi += sw) *o++ = xr[wi];
  }
}

static inline __attribute__((always_inline)) void dw_taps(const float* dy, const float* const* xs, int64_t Ho,
                                                          int64_t Wo, int64_t row_step, int nb, __m512d* dsum) {
  __m512 acc[DW_NB];
  for (int i = 0; i < DW_NB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t ho = 0; ho < Ho; ++ho) {
    const float* dr = dy + ho * Wo;
    const int64_t xo = ho * row_step;
    for (int64_t v = 0; v < Wo; v += 16) {
      const __mmask16 m = Wo - v >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (Wo - v)) - 1u);
      const __m512 d = _mm512_maskz_loadu_ps(m, dr + v);
      for (int i = 0; i < DW_NB; ++i)
        if (i < nb) acc[i] = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, xs[i] + xo + v), acc[i]);
    }
  }
  for (int i = 0; i < DW_NB; ++i)
    if (i < nb) {
      dsum[2 * i] = _mm512_add_pd(dsum[2 * i], _mm512_cvtps_pd(_mm512_castps512_ps256(acc[i])));
      dsum[2 * i + 1] = _mm512_add_pd(dsum[2 * i + 1], _mm512_cvtps_pd(_mm256_castpd_ps(
                                                           _mm512_extractf64x4_pd(_mm512_castps_pd(acc[i]), 1))));
    }
}

static int dw_channel_avx512(const DwJob* j, size_t c) {
  const int64_t H = j->H, W = j->W, Ho = j->Ho, Wo = j->Wo, sh = j->sh, sw = j->sw, kh = j->kh, kw = j->kw;
  const int64_t taps = kh * kw;
  /* padded extent: rows -ph .. (Ho-1)*sh - ph + (kh-1)*dh, columns likewise */
  const int64_t Hp = (Ho - 1) * sh + (kh - 1) * j->dh + 1, Wp = (Wo - 1) * sw + (kw - 1) * j->dw + 1;
  const int64_t Wq = (Wp + sw - 1) / sw, plane = Hp * Wq;
  float* xq = (float*)calloc((size_t)(sw * plane), sizeof(float));
  __m512d* dsum = (__m512d*)aligned_alloc(64, (size_t)taps * 2 * sizeof(__m512d));
  if (!xq || !dsum) {
    free(xq);
    free(dsum);
    return 0;
  }
  for (int64_t t = 0; t < 2 * taps; ++t) dsum[t] = _mm512_setzero_pd();
  /* the image columns inside the padded extent: wi in [wlo, whi), rows hi in [hlo, hhi) */
  const int64_t wlo = j->pw > 0 ? 0 : -j->pw, whi = W < Wp - j->pw ? W : Wp - j->pw;
  const int64_t hlo = j->ph > 0 ? 0 : -j->ph, hhi = H < Hp - j->ph ? H : Hp - j->ph;
  for (int64_t n = 0; n < j->N; ++n) {
    const float* dy = j->dy + (n * j->C + (int64_t)c) * Ho * Wo;
    const float* x = j->x + (n * j->C + (int64_t)c) * H * W;
    for (int64_t hi = hlo; hi < hhi; ++hi) {
      const float* xr = x + hi * W;
      const int64_t r = hi + j->ph;
      if (sw == 1) memcpy(xq + r * Wq + wlo + j->pw, xr + wlo, (size_t)(whi - wlo) * sizeof(float));
      else
        dw_split_row(xr, xq + r * Wq, wlo, whi, j->pw, sw, plane);
    }
    for (int64_t a = 0; a < kh; ++a)
      for (int64_t b0 = 0; b0 < kw; b0 += DW_NB) {
        const int nb = kw - b0 < DW_NB ? (int)(kw - b0) : DW_NB;
        const float* xs[DW_NB];
        for (int i = 0; i < nb; ++i) {
          const int64_t u = (b0 + i) * j->dw;
          xs[i] = xq + (u % sw) * plane + a * j->dh * Wq + u / sw;
        }
        __m512d* ds = dsum + 2 * (a * kw + b0);
        switch (nb) {   /* constant tap counts, so that the accumulators stay in registers */
          case 1: dw_taps(dy, xs, Ho, Wo, sh * Wq, 1, ds); break;
          case 2: dw_taps(dy, xs, Ho, Wo, sh * Wq, 2, ds); break;
          case 3: dw_taps(dy, xs, Ho, Wo, sh * Wq, 3, ds); break;
          case 4: dw_taps(dy, xs, Ho, Wo, sh * Wq, 4, ds); break;
          case 5: dw_taps(dy, xs, Ho, Wo, sh * Wq, 5, ds); break;
          case 6: dw_taps(dy, xs, Ho, Wo, sh * Wq, 6, ds); break;
          case 7: dw_taps(dy, xs, Ho, Wo, sh * Wq, 7, ds); break;
          default: dw_taps(dy, xs, Ho, Wo, sh * Wq, DW_NB, ds); break;
        }
      }
  }
  for (int64_t t = 0; t < taps; ++t)
    j->dwt[(int64_t)c * taps + t] = (float)(_mm512_reduce_add_pd(dsum[2 * t]) + _mm512_reduce_add_pd(dsum[2 * t + 1]));
  free(xq);
  free(dsum);
  return 1;
}

static void dw_channel_task(void* p, size_t c) {
  if (!dw_channel_avx512((const DwJob*)p, c)) dw_channel(p, c);
}
#else
static void dw_channel_task(void* p, size_t c) { dw_channel(p, c); }
#endif

static OrtStatus* compute_dw_grad_w(Kernel* k, void* ctx) {
  const void *dyv, *xv;
  void* wv;
  int64_t f[7];
  OrtStatus* st;
  DwJob j;
  memset(&j, 0, sizeof j);
  if ((st = conv_io(k, ctx, "fracgraph DepthwiseConvGradW: dY and X must be NCHW tensors of one batch", &dyv, &xv, f))) return st;
  j.N = f[0], j.C = f[1], j.H = f[2], j.W = f[3], j.Ho = f[5], j.Wo = f[6];
  if (f[4] != j.C) return fail("fracgraph DepthwiseConvGradW: dY and X must have the same channel count");
  if (k->conv[0] * k->conv[1] > 256) return fail("fracgraph DepthwiseConvGradW: at most 256 kernel taps");
  j.kh = k->conv[0], j.kw = k->conv[1], j.sh = k->conv[2], j.sw = k->conv[3];
  j.ph = k->conv[4], j.pw = k->conv[5], j.dh = k->conv[6], j.dw = k->conv[7];
  int64_t wd[4] = {j.C, 1, j.kh, j.kw};
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, wd, 4, &wv))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(wv, (void**)&j.dwt)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)dyv, (void**)&j.dy)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)xv, (void**)&j.x)))
    return st;
  if (j.C > 1) return API(KernelContext_ParallelFor, ParallelForFn)(ctx, dw_channel_task, (size_t)j.C, 0, &j);
  if (j.C == 1) dw_channel_task(&j, 0);
  return NULL;
}


/* ---- DepthwiseConv: a depthwise conv's forward, or its stride-1 input gradient (flip) -------------------- */
/* Y[n][c][ho][wo] = sum_{a,b} W'[c][a][b] * X[n][c][ho*sh - ph + a*dh][wo*sw - pw + b*dw], W' = W, or with flip
 * W'[c][a][b] = W[c][kh-1-a][kw-1-b] (the stride-1 dX conv of conv-grad-split reads the forward weight itself).
 * (image, channel) planes as tasks. As in dw_channel_avx512 the plane is copied into a zero-padded buffer split
 * into sw column phases, so that every tap of an output row is one contiguous (masked) load; vectors run along the
 * output row, DC_ROWS output rows at once share each tap's broadcast weight (independent accumulators), and each
 * output is the taps' sum in order a, b, in float. Plain loops without AVX-512. */
typedef struct {
  const float *x, *w;
  float* y;
  int64_t N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, flip;
} DcJob;

static inline float dc_weight(const DcJob* j, int64_t c, int64_t a, int64_t b) {
  return j->flip ? j->w[(c * j->kh + j->kh - 1 - a) * j->kw + j->kw - 1 - b] : j->w[(c * j->kh + a) * j->kw + b];
}

#if defined(__AVX512F__)
enum { DC_ROWS = 4 };

static inline __attribute__((always_inline)) void dc_rows(const DcJob* j, const float* xq, const float* wt, float* y,
                                                           int64_t ho, int rows, int64_t Wq, int64_t plane) {
  const int64_t Wo = j->Wo, kh = j->kh, kw = j->kw, sw = j->sw;
  for (int64_t v = 0; v < Wo; v += 16) {
    const __mmask16 m = Wo - v >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (Wo - v)) - 1u);
    __m512 acc[DC_ROWS];
    for (int r = 0; r < DC_ROWS; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t a = 0; a < kh; ++a)
      for (int64_t b = 0; b < kw; ++b) {
        const __m512 wv = _mm512_set1_ps(wt[a * kw + b]);
        const int64_t u = b * j->dw;
        const float* xs = xq + (u % sw) * plane + (ho * j->sh + a * j->dh) * Wq + u / sw + v;
        for (int r = 0; r < DC_ROWS; ++r)
          if (r < rows) acc[r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, xs + r * j->sh * Wq), acc[r]);
      }
    for (int r = 0; r < DC_ROWS; ++r)
      if (r < rows) _mm512_mask_storeu_ps(y + (ho + r) * Wo + v, m, acc[r]);
  }
}

static int dc_plane_avx512(const DcJob* j, size_t t) {
  const int64_t n = (int64_t)t / j->C, c = (int64_t)t % j->C;
  const int64_t H = j->H, W = j->W, Ho = j->Ho, Wo = j->Wo, sw = j->sw, kh = j->kh, kw = j->kw;
  const int64_t Hp = (Ho - 1) * j->sh + (kh - 1) * j->dh + 1, Wp = (Wo - 1) * sw + (kw - 1) * j->dw + 1;
  const int64_t Wq = (Wp + sw - 1) / sw, plane = Hp * Wq;
  float* xq = (float*)calloc((size_t)(sw * plane + kh * kw), sizeof(float));
  if (!xq) return 0;
  float* wt = xq + sw * plane;   /* W' of channel c, flipped where asked */
  for (int64_t a = 0; a < kh; ++a)
    for (int64_t b = 0; b < kw; ++b) wt[a * kw + b] = dc_weight(j, c, a, b);
  const int64_t wlo = j->pw > 0 ? 0 : -j->pw, whi = W < Wp - j->pw ? W : Wp - j->pw;
  const int64_t hlo = j->ph > 0 ? 0 : -j->ph, hhi = H < Hp - j->ph ? H : Hp - j->ph;
  const float* x = j->x + (n * j->C + c) * H * W;
  for (int64_t hi = hlo; hi < hhi; ++hi) {
    const int64_t r = hi + j->ph;
    if (sw == 1) memcpy(xq + r * Wq + wlo + j->pw, x + hi * W + wlo, (size_t)(whi - wlo) * sizeof(float));
    else
      dw_split_row(x + hi * W, xq + r * Wq, wlo, whi, j->pw, sw, plane);
  }
  float* y = j->y + (n * j->C + c) * Ho * Wo;
  int64_t ho = 0;
  for (; ho + DC_ROWS <= Ho; ho += DC_ROWS) dc_rows(j, xq, wt, y, ho, DC_ROWS, Wq, plane);
  switch (Ho - ho) {
    case 1: dc_rows(j, xq, wt, y, ho, 1, Wq, plane); break;
    case 2: dc_rows(j, xq, wt, y, ho, 2, Wq, plane); break;
    case 3: dc_rows(j, xq, wt, y, ho, 3, Wq, plane); break;
    default: break;
  }
  free(xq);
  return 1;
}
#endif

static void dc_plane(void* p, size_t t) {
  const DcJob* j = (const DcJob*)p;
#if defined(__AVX512F__)
  if (dc_plane_avx512(j, t)) return;
#endif
  const int64_t n = (int64_t)t / j->C, c = (int64_t)t % j->C, H = j->H, W = j->W;
  const float* x = j->x + (n * j->C + c) * H * W;
  float* y = j->y + (n * j->C + c) * j->Ho * j->Wo;
  for (int64_t ho = 0; ho < j->Ho; ++ho)
    for (int64_t wo = 0; wo < j->Wo; ++wo) {
      float acc = 0.0f;
      for (int64_t a = 0; a < j->kh; ++a) {
        const int64_t hi = ho * j->sh - j->ph + a * j->dh;
        if (hi < 0 || hi >= H) continue;
        for (int64_t b = 0; b < j->kw; ++b) {
          const int64_t wi = wo * j->sw - j->pw + b * j->dw;
          if (wi >= 0 && wi < W) acc += dc_weight(j, c, a, b) * x[hi * W + wi];
        }
      }
      y[ho * j->Wo + wo] = acc;
    }
}

static OrtStatus* compute_dw_conv(Kernel* k, void* ctx) {
  const void *xv, *wv;
  void* yv;
  int64_t xd[16], wd[16];
  size_t xr, wr, xn, wn;
  OrtStatus* st;
  DcJob j;
  memset(&j, 0, sizeof j);
  j.kh = k->conv[0], j.kw = k->conv[1], j.sh = k->conv[2], j.sw = k->conv[3], j.ph = k->conv[4], j.pw = k->conv[5];
  j.dh = k->conv[6], j.dw = k->conv[7], j.flip = k->conv[10];
  const int64_t ph_end = k->conv[8], pw_end = k->conv[9];
  if ((st = input_shape(ctx, 0, &xv, xd, &xr, &xn)) || (st = input_shape(ctx, 1, &wv, wd, &wr, &wn))) return st;
  if (xr != 4 || wr != 4 || wd[0] != xd[1] || wd[1] != 1 || wd[2] != j.kh || wd[3] != j.kw)
    return fail("fracgraph DepthwiseConv: X must be [N, C, H, W] and W [C, 1, kh, kw] with the kernel attributes");
  j.N = xd[0], j.C = xd[1], j.H = xd[2], j.W = xd[3];
  if (j.kh < 1 || j.kw < 1 || j.sh < 1 || j.sw < 1 || j.dh < 1 || j.dw < 1 || j.ph < 0 || j.pw < 0 || ph_end < 0 || pw_end < 0)
    return fail("fracgraph DepthwiseConv: invalid conv attributes");
  j.Ho = (j.H + j.ph + ph_end - j.dh * (j.kh - 1) - 1) / j.sh + 1;
  j.Wo = (j.W + j.pw + pw_end - j.dw * (j.kw - 1) - 1) / j.sw + 1;
  if (j.H + j.ph + ph_end < j.dh * (j.kh - 1) + 1 || j.W + j.pw + pw_end < j.dw * (j.kw - 1) + 1)
    return fail("fracgraph DepthwiseConv: the kernel is larger than the padded input");
  int64_t yd[4] = {j.N, j.C, j.Ho, j.Wo};
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, yd, 4, &yv))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(yv, (void**)&j.y)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)xv, (void**)&j.x)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)wv, (void**)&j.w)))
    return st;
  const size_t tasks = (size_t)(j.N * j.C);
  if (tasks > 1) return API(KernelContext_ParallelFor, ParallelForFn)(ctx, dc_plane, tasks, 0, &j);
  if (tasks == 1) dc_plane(&j, 0);
  return NULL;
}

/* ---- NchwcWeight: a conv weight in the NCHWc filter layout, in one pass --------------------------------- */
/* The logical weight W' [O, C, kh, kw] is W itself, or (transpose = G >= 1) W with its two channel axes swapped
 * within each of G groups and/or (flip) its kernel axes reversed: the weight of the stride-1 dX conv of
 * conv-grad-split, W'[g Cg + c][o][a][b] = W[g Og + o][c][kh-1-a][kw-1-b] (W [G Og, Cg, kh, kw]). The output keeps W''s logical shape and holds onnxruntime's filter layout for block B:
 * OIHWBiBo [O/B, C/B, kh, kw, Bi, Bo] (blocked_in) or OIHWBo [O/B, C, kh, kw, Bo]. onnxruntime's Transpose
 * runs the 6-D permutation of OIHWBiBo at a fraction of memory speed (bench/kernel_probes.py --only reorder);
 * this writes the output in order, one output-channel block per task. */
#define NCHWC_MAX_BLOCK 64   /* onnxruntime's blocks are 8 (AVX2) and 16 (AVX-512) */
typedef struct {
  const float* w;
  float* out;
  int64_t O, C, kh, kw, B, blocked_in, transpose, flip, Ow, Cw;   /* Ow x Cw: W's own channel dims; transpose: G or 0 */
} WtJob;

/* Per task one output-channel block ob. The source offset of W''s element (o, c, tap) separates into A[o] + c S + tap
 * (plain: A = o Cw taps, S = taps; transposed: A = (g C Cw + o - g Cw) taps, S = Cw taps, g = o / Cw), so the B
 * offsets of the block are computed once per task and each output vector [bo] (one c and tap) is B loads at fixed
 * offsets from one pointer: one AVX-512 gather where B is 16, one copy where they are consecutive (a 1x1 dX
 * weight). Session 11: the loop before computed every index, g's 64-bit division included, per element, and ran the
 * transposed weights of regnet's dX convs at 4-9x the time of an Add over the tensor (bench/kernel_probes.py --only
 * reorder). */
static void weight_block(void* p, size_t ob) {
  const WtJob* j = (const WtJob*)p;
  const int64_t B = j->B, C = j->C, kh = j->kh, kw = j->kw, taps = kh * kw, Cw = j->Cw;
  const int64_t bi_n = j->blocked_in ? B : 1, cb_n = j->blocked_in ? C / B : C;
  const int64_t S = j->transpose ? Cw * taps : taps;
  int64_t A[NCHWC_MAX_BLOCK];
  int contiguous = 1, small = 1;
  for (int64_t bo = 0; bo < B; ++bo) {
    const int64_t o = (int64_t)ob * B + bo, g = j->transpose ? o / Cw : 0;
    A[bo] = j->transpose ? (g * C * Cw + o - g * Cw) * taps : o * Cw * taps;
    contiguous &= A[bo] == A[0] + bo;
    small &= A[bo] - A[0] >= 0 && A[bo] - A[0] <= INT32_MAX;
  }
  const float* w0 = j->w + A[0];
  float* out = j->out + (int64_t)ob * B * C * taps;
#if defined(__AVX512F__)
  if (B == 16 && small && !contiguous) {
    int32_t d[16];
    for (int bo = 0; bo < 16; ++bo) d[bo] = (int32_t)(A[bo] - A[0]);
    const __m512i idx = _mm512_loadu_si512(d);
    for (int64_t cb = 0; cb < cb_n; ++cb)
      for (int64_t t = 0; t < taps; ++t) {
        const float* src = w0 + cb * bi_n * S + (j->flip ? taps - 1 - t : t);
        for (int64_t bi = 0; bi < bi_n; ++bi, out += 16) _mm512_storeu_ps(out, _mm512_i32gather_ps(idx, src + bi * S, 4));
      }
    return;
  }
#endif
  for (int64_t cb = 0; cb < cb_n; ++cb)
    for (int64_t t = 0; t < taps; ++t) {
      const float* src = w0 + cb * bi_n * S + (j->flip ? taps - 1 - t : t);
      for (int64_t bi = 0; bi < bi_n; ++bi, out += B) {
        if (contiguous) {
          memcpy(out, src + bi * S, (size_t)B * sizeof(float));
        } else {
          for (int64_t bo = 0; bo < B; ++bo) out[bo] = src[bi * S + A[bo] - A[0]];
        }
      }
    }
}

static OrtStatus* compute_nchwc_weight(Kernel* k, void* ctx) {
  const void* wv;
  void* ov;
  int64_t d[16];
  size_t rank, count;
  OrtStatus* st;
  WtJob j;
  memset(&j, 0, sizeof j);
  if ((st = input_shape(ctx, 0, &wv, d, &rank, &count))) return st;
  if (rank != 4) return fail("fracgraph NchwcWeight: the weight must be [O, C, kh, kw]");
  j.B = k->conv[0], j.blocked_in = k->conv[1], j.transpose = k->conv[2], j.flip = k->conv[3];
  j.Ow = d[0], j.Cw = d[1], j.kh = d[2], j.kw = d[3];
  if (j.transpose < 0 || (j.transpose && j.Ow % j.transpose))
    return fail("fracgraph NchwcWeight: transpose must be 0 or a group count that divides the output channels");
  j.O = j.transpose ? j.transpose * j.Cw : j.Ow, j.C = j.transpose ? j.Ow / j.transpose : j.Cw;
  if (j.B < 1 || j.B > NCHWC_MAX_BLOCK || j.O % j.B || (j.blocked_in && j.C % j.B))
    return fail("fracgraph NchwcWeight: the block must be 1-64 and the channel counts multiples of it");
  int64_t od[4] = {j.O, j.C, j.kh, j.kw};
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, od, 4, &ov))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(ov, (void**)&j.out)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)wv, (void**)&j.w)))
    return st;
  const size_t blocks = (size_t)(j.O / j.B);
  if (blocks > 1) return API(KernelContext_ParallelFor, ParallelForFn)(ctx, weight_block, blocks, 0, &j);
  if (blocks == 1) weight_block(&j, 0);
  return NULL;
}


/* ---- BatchNormTrain -------------------------------------------------------------------------------------- */
/* onnxruntime's com.microsoft BatchNormInternal in training mode: per channel the batch mean and (biased) variance
 * over N x spatial, inv_std = sqrt(1 / (var + eps)), Y = X * (inv_std scale) + (B - mean inv_std scale), and the
 * running statistics running * momentum + batch * (1 - momentum). onnxruntime runs it in three passes over X on
 * one thread (6.6-8.8% of resnet20's and mobilenet_v2's profiled steps); here channels are tasks, the two sums in
 * float lanes added in double. onnxruntime's kernel aliases the running statistics' outputs to their inputs, so
 * that a step updates the model's buffers in place (the eval graph reads them): this writes both, the outputs and
 * the input buffers. */
typedef struct {
  const float *x, *scale, *bias;
  float *rmean_in, *rvar_in;   /* the model's running-statistic buffers (updated in place, as onnxruntime's alias) */
  float *y, *rmean, *rvar, *mean, *inv_std;
  float eps, momentum;
  size_t N, C, S;
  /* BatchNormTrainFused: Y = relu?(X * ks + kb + residual?), and each channel's min and max of Y (NULL: plain) */
  const float* res;
  int relu;
  float *cmin, *cmax;
} BnTrainJob;

/* sum over a channel's N planes of S floats of f(x): LANES float partial sums across the whole channel, added in
 * double at the end (one reduction per channel, not per plane: 8x8 maps are 64 floats a plane) */
#define BN_CHANNEL_SUM(expr, out)                                      \
  do {                                                                 \
    float acc_[LANES] = {0};                                           \
    for (size_t n_ = 0; n_ < N; ++n_) {                                \
      const float* x = j->x + (n_ * C + c) * S;                        \
      size_t i = 0;                                                    \
      for (; i + LANES <= S; i += LANES)                               \
        for (int l = 0; l < LANES; ++l) {                              \
          const float v = x[i + l];                                    \
          acc_[l] += (expr);                                           \
        }                                                              \
      for (; i < S; ++i) {                                             \
        const float v = x[i];                                          \
        acc_[i % LANES] += (expr);                                     \
      }                                                                \
    }                                                                  \
    double t_ = 0.0;                                                   \
    for (int l = 0; l < LANES; ++l) t_ += acc_[l];                     \
    (out) = t_;                                                        \
  } while (0)

static inline float relu0(float v) { return v > 0.0f ? v : 0.0f; }

static void bn_train_channel(void* p, size_t c) {
  const BnTrainJob* j = (const BnTrainJob*)p;
  const size_t N = j->N, C = j->C, S = j->S;
  enum { LANES = 16 };
  double sum, sq;
  BN_CHANNEL_SUM(v, sum);
  const double M = (double)(N * S);
  const float mean = (float)(sum / M);
  BN_CHANNEL_SUM((v - mean) * (v - mean), sq);
  const float var = (float)(sq / M), inv_std = sqrtf(1.0f / (var + j->eps));
  const float ks = inv_std * j->scale[c], kb = j->bias[c] - mean * ks;
  if (!j->cmin) {
    for (size_t n = 0; n < N; ++n) {
      const float* x = j->x + (n * C + c) * S;
      float* y = j->y + (n * C + c) * S;
      for (size_t i = 0; i < S; ++i) y[i] = x[i] * ks + kb;
    }
  } else {   /* the same y, then (y + residual), then the ReLU, and the range: one pass, channel-wide lanes */
    enum { L = 16 };
    float lo_l[L], hi_l[L];
    for (int l = 0; l < L; ++l) lo_l[l] = INFINITY, hi_l[l] = -INFINITY;
#define BN_FUSED_ROW(EXPR)                                                              \
    for (size_t n = 0; n < N; ++n) {                                                   \
      const float* x = j->x + (n * C + c) * S;                                         \
      const float* r = j->res ? j->res + (n * C + c) * S : x; (void)r;                 \
      float* y = j->y + (n * C + c) * S;                                               \
      size_t i = 0;                                                                    \
      for (; i + L <= S; i += L)                                                       \
        for (int l = 0; l < L; ++l) {                                                  \
          const size_t t = i + l;                                                      \
          const float v = (EXPR);                                                      \
          y[t] = v;                                                                    \
          lo_l[l] = v < lo_l[l] ? v : lo_l[l];                                         \
          hi_l[l] = v > hi_l[l] ? v : hi_l[l];                                         \
        }                                                                              \
      for (; i < S; ++i) {                                                             \
        const size_t t = i;                                                            \
        const float v = (EXPR);                                                        \
        y[t] = v;                                                                      \
        lo_l[0] = v < lo_l[0] ? v : lo_l[0];                                           \
        hi_l[0] = v > hi_l[0] ? v : hi_l[0];                                           \
      }                                                                                \
    }
    if (j->res && j->relu) { BN_FUSED_ROW(relu0(x[t] * ks + kb + r[t])) }
    else if (j->res) { BN_FUSED_ROW(x[t] * ks + kb + r[t]) }
    else if (j->relu) { BN_FUSED_ROW(relu0(x[t] * ks + kb)) }
    else { BN_FUSED_ROW(x[t] * ks + kb) }
#undef BN_FUSED_ROW
    for (int l = 1; l < L; ++l) {
      lo_l[0] = lo_l[l] < lo_l[0] ? lo_l[l] : lo_l[0];
      hi_l[0] = hi_l[l] > hi_l[0] ? hi_l[l] : hi_l[0];
    }
    j->cmin[c] = lo_l[0], j->cmax[c] = hi_l[0];
  }
  const float m = j->momentum, m1 = (float)(1.0 - (double)m);
  const float rm = j->rmean_in[c] * m + mean * m1, rv = j->rvar_in[c] * m + var * m1;
  j->mean[c] = mean, j->inv_std[c] = inv_std;
  j->rmean[c] = rm, j->rvar[c] = rv;
  j->rmean_in[c] = rm, j->rvar_in[c] = rv;
}

/* the two scalar outputs min, max (indices i, i + 1) from per-channel ranges lo[C], hi[C] */
static OrtStatus* write_range(void* ctx, size_t i, const float* lo, const float* hi, size_t C) {
  void *lv, *hv;
  float *l, *h;
  OrtStatus* st;
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, i, NULL, 0, &lv)) ||
      (st = API(KernelContext_GetOutput, GetOutputFn)(ctx, i + 1, NULL, 0, &hv)) ||
      (st = API(GetTensorMutableData, GetDataFn)(lv, (void**)&l)) || (st = API(GetTensorMutableData, GetDataFn)(hv, (void**)&h)))
    return st;
  float a = lo[0], b = hi[0];
  for (size_t c = 1; c < C; ++c) {
    a = lo[c] < a ? lo[c] : a;
    b = hi[c] > b ? hi[c] : b;
  }
  *l = a, *h = b;
  return NULL;
}

/* BatchNormTrainFused(X, scale, B, running_mean, running_var, residual?) -> (Y, running_mean', running_var', mean,
 * inv_std, min, max): BatchNormTrain's statistics and running update, Y = X * ks + kb (the same float operations),
 * then + residual (optional, X's shape; onnxruntime's Add), then max(., 0) where attribute relu = 1 (written as
 * y > 0 ? y : 0), and the range of Y (MinMax's min and max). */
static OrtStatus* bn_train_fused(Kernel* k, void* ctx, BnTrainJob* j, const int64_t* dims, size_t rank, size_t n) {
  const void* rv = NULL;
  OrtStatus* st;
  if ((st = API(KernelContext_GetInput, GetInputFn)(ctx, 5, &rv))) return st;
  if (rv) {
    int64_t rd[16];
    size_t rr, rc;
    if ((st = input_shape(ctx, 5, &rv, rd, &rr, &rc))) return st;
    int same = rr == rank && rc == n;
    for (size_t r = 0; same && r < rank; ++r) same = rd[r] == dims[r];
    if (!same) return fail("fracgraph BatchNormTrainFused: the residual must have X's shape");
    if ((st = API(GetTensorMutableData, GetDataFn)((void*)rv, (void**)&j->res))) return st;
  }
  j->relu = k->relu != 0;
  j->cmin = (float*)malloc(2 * j->C * sizeof(float));
  if (!j->cmin) return fail("fracgraph BatchNormTrainFused: out of memory");
  j->cmax = j->cmin + j->C;
  st = NULL;
  if (j->C > 1) st = API(KernelContext_ParallelFor, ParallelForFn)(ctx, bn_train_channel, j->C, 0, j);
  else bn_train_channel(j, 0);
  if (!st) st = write_range(ctx, 5, j->cmin, j->cmax, j->C);
  free(j->cmin);
  return st;
}

static OrtStatus* compute_bn_train(Kernel* k, void* ctx) {
  const void* in[5];
  void* out[5];
  int64_t dims[16], other[16], cdims[1];
  size_t rank, r2, n, count;
  OrtStatus* st;
  BnTrainJob j;
  memset(&j, 0, sizeof j);
  if ((st = input_shape(ctx, 0, &in[0], dims, &rank, &n))) return st;
  if (rank < 2) return fail("fracgraph BatchNormTrain: X must be (N, C, ...)");
  j.N = (size_t)dims[0], j.C = (size_t)dims[1], j.S = (j.N && j.C) ? n / (j.N * j.C) : 0;
  for (size_t i = 1; i < 5; ++i) {
    if ((st = input_shape(ctx, i, &in[i], other, &r2, &count))) return st;
    if (count != j.C) return fail("fracgraph BatchNormTrain: scale, B and the running statistics need one value per channel");
  }
  cdims[0] = (int64_t)j.C;
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, dims, rank, &out[0]))) return st;
  for (int i = 1; i < 5; ++i)
    if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, (size_t)i, cdims, 1, &out[i]))) return st;
  const float** src[3] = {&j.x, &j.scale, &j.bias};
  for (int i = 0; i < 3; ++i)
    if ((st = API(GetTensorMutableData, GetDataFn)((void*)in[i], (void**)src[i]))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)((void*)in[3], (void**)&j.rmean_in)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)in[4], (void**)&j.rvar_in)))
    return st;
  float** dst[5] = {&j.y, &j.rmean, &j.rvar, &j.mean, &j.inv_std};
  for (int i = 0; i < 5; ++i)
    if ((st = API(GetTensorMutableData, GetDataFn)(out[i], (void**)dst[i]))) return st;
  j.eps = k->eps, j.momentum = k->momentum;
  if (!j.N || !j.S) return fail("fracgraph BatchNormTrain: X is empty");
  if (k->kind == BN_TRAIN_FUSED) return bn_train_fused(k, ctx, &j, dims, rank, n);
  if (j.C > 1) return API(KernelContext_ParallelFor, ParallelForFn)(ctx, bn_train_channel, j.C, 0, &j);
  if (j.C == 1) bn_train_channel(&j, 0);
  return NULL;
}

/* ---- BatchNormGrad --------------------------------------------------------------------------------------- */
/* onnxruntime's BatchNormalizationGrad (saved batch mean and inverse std from the forward) in two reads per
 * channel, channels as tasks: dbias = sum dY and s = sum dY (X - mean) (float lanes per image, added in double),
 * then dscale = s * inv_std and dX = scale * inv_std * (dY - dbias / M - (X - mean) * inv_std^2 * s / M),
 * M = N * spatial size: onnxruntime's formula, summed in another order. */
typedef struct {
  const float *dy, *x, *scale, *mean, *inv_std;
  float *dx, *dscale, *dbias;
  size_t N, C, S;   /* batch, channels, spatial size */
  const float* bias;   /* BatchNormGradRange with relu: the forward's B */
  float *cmin, *cmax;  /* BatchNormGradRange: each channel's range of dX */
  float** pieces;      /* BatchNormGradSplit: dX's pieces along the channel axis (else NULL: dX whole) */
  const size_t *piece, *poff, *plen;   /* BatchNormGradSplit: each channel's piece; each piece's first channel, size */
} BnJob;

/* where channel c of image 0 goes in dX, and the distance between images: dX's own layout, or the piece of the
 * channel axis that holds c (BatchNormGradSplit: the Split of dX written directly) */
static inline float* bn_dx_base(const BnJob* j, size_t c, size_t* stride) {
  if (!j->pieces) {
    *stride = j->C * j->S;
    return j->dx + c * j->S;
  }
  const size_t p = j->piece[c];
  *stride = j->plen[p] * j->S;
  return j->pieces[p] + (c - j->poff[p]) * j->S;
}

/* BatchNormGradRange(dY, X, scale, mean, inv_std, B?) -> (dX, dscale, dbias, min, max): BatchNormGrad, and the
 * range of dX (MinMax's min and max). With attribute relu = 1 the forward was BatchNormTrainFused with relu and no
 * residual, and dY is the gradient of its ReLU's output: the ReLU's mask is recomputed from X with the forward's own
 * float operations (y = X * ks + kb, ks = inv_std scale, kb = B - mean ks), so dY' = y > 0 ? dY : 0 is bitwise what
 * ReluGrad(dY, relu(y)) wrote, and the two reads of dY' become reads of dY (no ReluGrad pass, no dY' tensor). */
static void bn_grad_range_channel(void* p, size_t c) {
  const BnJob* j = (const BnJob*)p;
  const size_t N = j->N, C = j->C, S = j->S;
  const float mean = j->mean[c];
  const int relu = j->bias != NULL;
  const float ks = j->inv_std[c] * j->scale[c], kb = relu ? j->bias[c] - mean * ks : 0.0f;
  double sum_dy = 0.0, sum_dy_xmu = 0.0;
  enum { LANES = 16 };
  for (size_t n = 0; n < N; ++n) {
    const float* dy = j->dy + (n * C + c) * S;
    const float* x = j->x + (n * C + c) * S;
    float a[LANES] = {0}, b[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= S; i += LANES)
      for (int l = 0; l < LANES; ++l) {
        const float g = relu ? (x[i + l] * ks + kb > 0.0f ? dy[i + l] : 0.0f) : dy[i + l];
        a[l] += g;
        b[l] += g * (x[i + l] - mean);
      }
    for (; i < S; ++i) {
      const float g = relu ? (x[i] * ks + kb > 0.0f ? dy[i] : 0.0f) : dy[i];
      a[0] += g;
      b[0] += g * (x[i] - mean);
    }
    for (int l = 0; l < LANES; ++l) {
      sum_dy += a[l];
      sum_dy_xmu += b[l];
    }
  }
  const double M = (double)(N * S), inv_std = j->inv_std[c], k = j->scale[c] * inv_std;
  j->dbias[c] = (float)sum_dy;
  j->dscale[c] = (float)(sum_dy_xmu * inv_std);
  const float kd = (float)k, kx = (float)(-k * inv_std * inv_std * sum_dy_xmu / M), k0 = (float)(-k * sum_dy / M);
  enum { L = 16 };
  float lo_l[L], hi_l[L];
  size_t dstride;
  float* const dx0 = bn_dx_base(j, c, &dstride);
  for (int l = 0; l < L; ++l) lo_l[l] = INFINITY, hi_l[l] = -INFINITY;
#define BN_GRAD_ROW(G)                                                                  \
  for (size_t n = 0; n < N; ++n) {                                                     \
    const float* dy = j->dy + (n * C + c) * S;                                         \
    const float* x = j->x + (n * C + c) * S;                                           \
    float* dx = dx0 + n * dstride;                                                     \
    size_t i = 0;                                                                      \
    for (; i + L <= S; i += L)                                                         \
      for (int l = 0; l < L; ++l) {                                                    \
        const size_t t = i + l;                                                        \
        const float v = kd * (G) + kx * (x[t] - mean) + k0;                            \
        dx[t] = v;                                                                     \
        lo_l[l] = v < lo_l[l] ? v : lo_l[l];                                           \
        hi_l[l] = v > hi_l[l] ? v : hi_l[l];                                           \
      }                                                                                \
    for (; i < S; ++i) {                                                               \
      const size_t t = i;                                                              \
      const float v = kd * (G) + kx * (x[t] - mean) + k0;                              \
      dx[t] = v;                                                                       \
      lo_l[0] = v < lo_l[0] ? v : lo_l[0];                                             \
      hi_l[0] = v > hi_l[0] ? v : hi_l[0];                                             \
    }                                                                                  \
  }
  if (relu) { BN_GRAD_ROW(x[t] * ks + kb > 0.0f ? dy[t] : 0.0f) }
  else { BN_GRAD_ROW(dy[t]) }
#undef BN_GRAD_ROW
  for (int l = 1; l < L; ++l) {
    lo_l[0] = lo_l[l] < lo_l[0] ? lo_l[l] : lo_l[0];
    hi_l[0] = hi_l[l] > hi_l[0] ? hi_l[l] : hi_l[0];
  }
  const float lo = lo_l[0], hi = hi_l[0];
  j->cmin[c] = lo, j->cmax[c] = hi;
}

static OrtStatus* compute_bn_grad(Kernel* k, void* ctx) {
  const void* in[5];
  void* out[3];
  int64_t dims[16], other[16], cdims[1];
  size_t rank, r2, n, count;
  OrtStatus* st;
  BnJob j;
  memset(&j, 0, sizeof j);
  if ((st = input_shape(ctx, 0, &in[0], dims, &rank, &n)) || (st = input_shape(ctx, 1, &in[1], other, &r2, &count))) return st;
  if (rank < 2 || count != n) return fail("fracgraph BatchNormGrad: dY and X must be one (N, C, ...) shape");
  j.N = (size_t)dims[0], j.C = (size_t)dims[1], j.S = (j.N && j.C) ? n / (j.N * j.C) : 0;
  for (size_t i = 2; i < 5; ++i) {
    if ((st = input_shape(ctx, i, &in[i], other, &r2, &count))) return st;
    if (count != j.C) return fail("fracgraph BatchNormGrad: scale, mean and inv_std need one value per channel");
  }
  cdims[0] = (int64_t)j.C;
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, dims, rank, &out[0])) ||
      (st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 1, cdims, 1, &out[1])) ||
      (st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 2, cdims, 1, &out[2])))
    return st;
  const float** src[5] = {&j.dy, &j.x, &j.scale, &j.mean, &j.inv_std};
  float** dst[3] = {&j.dx, &j.dscale, &j.dbias};
  for (int i = 0; i < 5; ++i)
    if ((st = API(GetTensorMutableData, GetDataFn)((void*)in[i], (void**)src[i]))) return st;
  for (int i = 0; i < 3; ++i)
    if ((st = API(GetTensorMutableData, GetDataFn)(out[i], (void**)dst[i]))) return st;
  /* BatchNormGrad is BatchNormGradRange without relu, its range left unwritten (the same sums and dX) */
  if (!j.N || !j.S) return fail("fracgraph BatchNormGrad: X is empty");
  if (k->kind == BN_GRAD_RANGE && k->relu) {
    const void* bv;
    if ((st = input_shape(ctx, 5, &bv, other, &r2, &count))) return st;
    if (count != j.C) return fail("fracgraph BatchNormGradRange: B needs one value per channel");
    if ((st = API(GetTensorMutableData, GetDataFn)((void*)bv, (void**)&j.bias))) return st;
  }
  j.cmin = (float*)malloc(2 * j.C * sizeof(float));
  if (!j.cmin) return fail("fracgraph BatchNormGrad: out of memory");
  j.cmax = j.cmin + j.C;
  st = NULL;
  if (j.C > 1) st = API(KernelContext_ParallelFor, ParallelForFn)(ctx, bn_grad_range_channel, j.C, 0, &j);
  else bn_grad_range_channel(&j, 0);
  if (!st && k->kind == BN_GRAD_RANGE) st = write_range(ctx, 3, j.cmin, j.cmax, j.C);
  free(j.cmin);
  return st;
}

/* FakeQuantize's min and scale (FakeQuantizeBits': min and max): when they hold one value per channel along one
 * axis of x (x's rank, that axis x's size, every other axis 1), points j->mnv and *second at them and sets
 * j->channels and j->inner; scalars leave j->mnv NULL. */
static OrtStatus* channel_pair(void* ctx, Job* j, const int64_t* dims, size_t rank, const float** second) {
  const void *mv, *sv;
  int64_t md[16], sd[16];
  size_t mr, sr, mc, sc, axis = rank;
  OrtStatus* st;
  if ((st = input_shape(ctx, 1, &mv, md, &mr, &mc)) || (st = input_shape(ctx, 2, &sv, sd, &sr, &sc))) return st;
  if (mc == 1 && sc == 1) return NULL;
  int ok = mr == rank && sr == rank && mc == sc;
  for (size_t r = 0; ok && r < rank; ++r) {
    ok = md[r] == sd[r] && (md[r] == 1 || (md[r] == dims[r] && axis == rank));
    if (ok && md[r] != 1) axis = r;
  }
  if (!ok || axis == rank)
    return fail("fracgraph FakeQuantize: min and scale (max) must be scalars or per channel along one axis of x "
                "(x's rank, 1 on every other axis)");
  j->channels = (size_t)dims[axis];
  j->inner = 1;
  for (size_t r = axis + 1; r < rank; ++r) j->inner *= (size_t)dims[r];
  if ((st = API(GetTensorMutableData, GetDataFn)((void*)mv, (void**)&j->mnv)) ||
      (st = API(GetTensorMutableData, GetDataFn)((void*)sv, (void**)second)))
    return st;
  return NULL;
}

static OrtStatus* channel_inputs(void* ctx, Job* j, const int64_t* dims, size_t rank) {
  OrtStatus* st = channel_pair(ctx, j, dims, rank, &j->sv);
  if (!st && j->mnv) st = scalar_input(ctx, 3, &j->hi);
  return st;
}

static void copy_chunk(void* p, size_t c) {
  const Job* j = (const Job*)p;
  size_t a = c * CHUNK, b = a + CHUNK < j->n ? a + CHUNK : j->n;
  memcpy(j->y + a, j->x + a, (b - a) * sizeof(float));
}

/* 2^b as onnxruntime's Pow(2, b) computes it (std::pow, i.e. powf): an integer b in [-126, 127] gives the power of
 * two exactly either way, which ldexpf writes without relying on how the compiler treats powf of a constant base */
static float pow2f(float b) {
  if (b == floorf(b) && b >= -126.0f && b <= 127.0f) return ldexpf(1.0f, (int)b);
  volatile float two = 2.0f;
  return powf(two, b);
}

/* FakeQuantizeBits, SRQuantizeBits, SRQuantizeNoiseBits: the scalars of quantizers.py's chain, each op in its order
 * and float rounding, then the fused quantizer's pass over x; bits <= 0: the If's else branch, y = x. */
static OrtStatus* compute_quant_bits(Kernel* k, void* ctx) {
  const void *xv, *bv, *nv;
  void* yv;
  int64_t dims[16], bd[16], nd[16];
  size_t rank, n, br, bn, nr, nn;
  const float* bp;
  const float* mxv = NULL;
  float* sbuf = NULL;
  OrtStatus* st;
  Job j;
  memset(&j, 0, sizeof j);
  if ((st = input_shape(ctx, 0, &xv, dims, &rank, &n))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)((void*)xv, (void**)&j.x))) return st;
  if ((st = input_shape(ctx, 3, &bv, bd, &br, &bn))) return st;
  if (bn != 1) return fail("fracgraph quantizer kernels: bits must be a scalar (per-sample bits keep their chain)");
  if ((st = API(GetTensorMutableData, GetDataFn)((void*)bv, (void**)&bp))) return st;
  const float bits = bp[0];
  j.n = n;
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, dims, rank, &yv))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(yv, (void**)&j.y))) return st;
  if (!(bits > 0.0f)) {   /* Greater(bits, 0) false: the FP32 passthrough */
    size_t chunks = (n + CHUNK - 1) / CHUNK;
    if (chunks > 1) return API(KernelContext_ParallelFor, ParallelForFn)(ctx, copy_chunk, chunks, 0, &j);
    if (n) copy_chunk(&j, 0);
    return NULL;
  }
  /* levels = Max(Pow(2, b) - 1, 1); hi = levels + slack (Add) or levels */
  float lv = pow2f(bits) - 1.0f;
  lv = lv < 1.0f ? 1.0f : lv;
  j.hi = k->has_slack ? lv + k->slack : lv;
  j.lo = k->lo;
  if ((st = channel_pair(ctx, &j, dims, rank, &mxv))) return st;
  if (j.mnv) {   /* per channel: scale_c = Max((max_c - min_c) / levels, eps) */
    if (k->kind != FQ_BITS) return fail("fracgraph SRQuantizeBits: min and max must be scalars");
    sbuf = (float*)malloc(j.channels * sizeof(float));
    if (!sbuf) return fail("fracgraph kernels: out of memory");
    for (size_t c = 0; c < j.channels; ++c) {
      const float s = (mxv[c] - j.mnv[c]) / lv;
      sbuf[c] = s < k->eps ? k->eps : s;
    }
    j.sv = sbuf;
  } else {
    float mx;
    if ((st = scalar_input(ctx, 1, &j.mn)) || (st = scalar_input(ctx, 2, &mx))) return st;
    const float s = (mx - j.mn) / lv;
    j.s = s < k->eps ? k->eps : s;
  }
  j.kind = k->kind == FQ_BITS ? FAKE_QUANT : k->kind == SR_BITS ? SR_RNG : SR_NOISE;
  if (k->kind == SR_NOISE_BITS) {
    if ((st = input_shape(ctx, 4, &nv, nd, &nr, &nn))) return st;
    if (nn != n) return fail("fracgraph kernels: the second tensor has another element count than the first");
    if ((st = API(GetTensorMutableData, GetDataFn)((void*)nv, (void**)&j.aux))) return st;
  }
  if (k->kind == SR_BITS) j.key = mix(g_seed ^ mix(k->salt ^ mix(k->calls)));
  k->calls++;
  st = parallel(ctx, &j);
  free(sbuf);
  return st;
}

static OrtStatus* compute(void* kernel, void* ctx) {
  Kernel* k = (Kernel*)kernel;
  const void *xv, *av;
  void* yv;
  size_t n, rank, an, arank;
  int64_t dims[16], adims[16];
  OrtStatus* st;
  Job j;
  memset(&j, 0, sizeof j);
  j.kind = k->kind;
  if (k->kind == CONV_GRAD_W) return compute_conv_grad_w(k, ctx);
  if (k->kind == BN_GRAD || k->kind == BN_GRAD_RANGE) return compute_bn_grad(k, ctx);
  if (k->kind == BN_TRAIN || k->kind == BN_TRAIN_FUSED) return compute_bn_train(k, ctx);
  if (k->kind == CONV_COLS) return compute_conv_cols(k, ctx);
  if (k->kind == DW_GRAD_W) return compute_dw_grad_w(k, ctx);
  if (k->kind == NCHWC_WEIGHT) return compute_nchwc_weight(k, ctx);
  if (k->kind == IM2COL || k->kind == COL2IM) return compute_cols(k, ctx);
  if (k->kind == MAX_POOL) return compute_max_pool(k, ctx);
  if (k->kind == MAX_POOL_GRAD) return compute_max_pool_grad(ctx);
  if (k->kind == LN_GRAD) return compute_ln_grad(ctx);
  if (k->kind == DW_CONV) return compute_dw_conv(k, ctx);
  if (k->kind >= FQ_BITS) return compute_quant_bits(k, ctx);
  if ((st = input_shape(ctx, 0, &xv, dims, &rank, &n))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)((void*)xv, (void**)&j.x))) return st;
  j.n = n;
  if (k->kind == MIN_MAX) return compute_min_max(ctx, &j);
  if (k->kind == MIN_MAX_ROWS) return compute_min_max_rows(ctx, &j, dims, rank);
  if (k->kind == MIN_MAX_COLS) return compute_min_max_cols(ctx, &j, dims, rank);
  if (k->kind == RELU_GRAD || k->kind == SR_NOISE || k->kind == RELU_GRAD_SUM) {
    if ((st = input_shape(ctx, k->kind == RELU_GRAD ? 1 : k->kind == SR_NOISE ? 4 : 2, &av, adims, &arank, &an))) return st;
    if (an != n) return fail("fracgraph kernels: the second tensor has another element count than the first");
    if ((st = API(GetTensorMutableData, GetDataFn)((void*)av, (void**)&j.aux))) return st;
  }
  if (k->kind == RELU_GRAD_SUM) {   /* ReluGradSum(dY1, dY2, X): dY2 of dY1's shape (no broadcasting) */
    int same = 1;
    if ((st = input_shape(ctx, 1, &av, adims, &arank, &an))) return st;
    same = arank == rank && an == n;
    for (size_t r = 0; same && r < rank; ++r) same = adims[r] == dims[r];
    if (!same) return fail("fracgraph ReluGradSum: the two gradients must have one shape");
    if ((st = API(GetTensorMutableData, GetDataFn)((void*)av, (void**)&j.aux2))) return st;
  }
  if (k->kind == FAKE_QUANT && (st = channel_inputs(ctx, &j, dims, rank))) return st;
  if (k->kind != RELU_GRAD && k->kind != RELU_GRAD_SUM && !j.mnv) {
    if ((st = scalar_input(ctx, 1, &j.mn)) || (st = scalar_input(ctx, 2, &j.s)) || (st = scalar_input(ctx, 3, &j.hi))) return st;
  }
  if (k->kind != RELU_GRAD && k->kind != RELU_GRAD_SUM) j.lo = k->lo;
  if (k->kind == SR_RNG) j.key = mix(g_seed ^ mix(k->salt ^ mix(k->calls)));
  k->calls++;
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, dims, rank, &yv))) return st;
  if ((st = API(GetTensorMutableData, GetDataFn)(yv, (void**)&j.y))) return st;
  return parallel(ctx, &j);
}

static const char* const NAMES[N_KINDS] = {"SRQuantize", "SRQuantizeNoise", "FakeQuantize", "MinMax", "ReluGrad",
                                           "ConvGradW", "BatchNormGrad", "ConvGradWCols", "DepthwiseConvGradW",
                                           "NchwcWeight", "Im2Col", "Col2Im", "MinMaxRows", "MaxPoolIdx",
                                           "DepthwiseConv", "MinMaxCols", "MaxPoolIdxGrad", "LayerNormGrad",
                                           "BatchNormTrain", "BatchNormTrainFused", "BatchNormGradRange",
                                           "ReluGradSum", "FakeQuantizeBits", "SRQuantizeBits",
                                           "SRQuantizeNoiseBits"};
static const size_t N_INPUTS[N_KINDS] = {4, 5, 4, 1, 2, 2, 5, 2, 2, 1, 1, 1, 1, 1, 2, 1, 3, 6, 5, 6, 6, 3, 4, 4, 5};
static const size_t N_OUTPUTS[N_KINDS] = {1, 1, 1, 2, 1, 1, 3, 2, 1, 1, 1, 1, 2, 2, 1, 2, 1, 3, 5, 7, 5, 1, 1, 1, 1};
static const char* const WEIGHT_ATTRS[4] = {"block", "blocked_in", "transpose", "flip"};
static const char* const CONV_ATTRS[9] = {"kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "group"};
static const char* const COL_ATTRS[12] = {"kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "h", "w", "ho", "wo"};
static const char* const POOL_ATTRS[11] = {"kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "ph_end", "pw_end", "flip"};

/* Each op's OrtCustomOp sits first in an OpDef, so the callbacks find their kind from the op pointer. */
typedef struct {
  struct OrtCustomOp op;
  int kind;
} OpDef;

static int kind_of(const OrtCustomOp* op) { return ((const OpDef*)op)->kind; }

static OrtStatus* create(const OrtCustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)api;
  Kernel* k = (Kernel*)calloc(1, sizeof(Kernel));
  OrtStatus* st;
  int64_t salt = 0;
  if (!k) return fail("fracgraph kernels: out of memory");
  k->kind = kind_of(op);
  const int bits_op = k->kind >= FQ_BITS;
  if ((k->kind <= FAKE_QUANT || bits_op) && (st = API(KernelInfoGetAttribute_float, AttrFloatFn)(info, "lo", &k->lo))) { free(k); return st; }
  if (bits_op && (st = API(KernelInfoGetAttribute_float, AttrFloatFn)(info, "eps", &k->eps))) { free(k); return st; }
  if (bits_op) {   /* optional: without it hi = levels (the error quantizers' clamp) */
    k->has_slack = 1;
    if ((st = API(KernelInfoGetAttribute_float, AttrFloatFn)(info, "slack", &k->slack))) {
      API(ReleaseStatus, ReleaseFn)(st);
      k->has_slack = 0;
    }
  }
  if ((k->kind == BN_TRAIN || k->kind == BN_TRAIN_FUSED) &&
      ((st = API(KernelInfoGetAttribute_float, AttrFloatFn)(info, "epsilon", &k->eps)) ||
       (st = API(KernelInfoGetAttribute_float, AttrFloatFn)(info, "momentum", &k->momentum)))) {
    free(k);
    return st;
  }
  if ((k->kind == BN_TRAIN_FUSED || k->kind == BN_GRAD_RANGE) &&
      (st = API(KernelInfoGetAttribute_int64, AttrIntFn)(info, "relu", &k->relu))) {
    free(k);
    return st;
  }
  if ((k->kind == SR_RNG || k->kind == SR_BITS) && (st = API(KernelInfoGetAttribute_int64, AttrIntFn)(info, "salt", &salt))) { free(k); return st; }
  k->salt = (uint64_t)salt;
  if (k->kind == CONV_GRAD_W || k->kind == CONV_COLS || k->kind == DW_GRAD_W)
    for (int a = 0; a < (k->kind == CONV_COLS ? 9 : 8); ++a)
      if ((st = API(KernelInfoGetAttribute_int64, AttrIntFn)(info, CONV_ATTRS[a], &k->conv[a]))) { free(k); return st; }
  if (k->kind == MAX_POOL || k->kind == DW_CONV)
    for (int a = 0; a < (k->kind == DW_CONV ? 11 : 10); ++a)
      if ((st = API(KernelInfoGetAttribute_int64, AttrIntFn)(info, POOL_ATTRS[a], &k->conv[a]))) { free(k); return st; }
  if (k->kind == MAX_POOL && (st = API(KernelInfoGetAttribute_int64, AttrIntFn)(info, "ceil_mode", &k->conv[10]))) {
    API(ReleaseStatus, ReleaseFn)(st);   /* optional (artifacts written before it): floor mode */
    k->conv[10] = 0;
  }
  if (k->kind == IM2COL || k->kind == COL2IM)
    for (int a = 0; a < 12; ++a)
      if ((st = API(KernelInfoGetAttribute_int64, AttrIntFn)(info, COL_ATTRS[a], &k->conv[a]))) { free(k); return st; }
  if (k->kind == NCHWC_WEIGHT)
    for (int a = 0; a < 4; ++a)
      if ((st = API(KernelInfoGetAttribute_int64, AttrIntFn)(info, WEIGHT_ATTRS[a], &k->conv[a]))) { free(k); return st; }
  *out = k;
  return NULL;
}

static void destroy(void* k) { free(k); }
static const char* op_name(const OrtCustomOp* op) { return NAMES[kind_of(op)]; }
static const char* provider(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static int float_type(const OrtCustomOp* op, size_t i) { return kind_of(op) == MAX_POOL_GRAD && i ? INT64_T : FLOAT_T; }
static int output_type(const OrtCustomOp* op, size_t i) { return kind_of(op) == MAX_POOL && i == 1 ? INT64_T : FLOAT_T; }
static size_t n_inputs(const OrtCustomOp* op) { return N_INPUTS[kind_of(op)]; }
static size_t n_outputs(const OrtCustomOp* op) { return N_OUTPUTS[kind_of(op)]; }
/* 0 required, 1 optional: the fused batch norms' sixth input (the residual; B, read only with relu), LayerNormGrad's R */
static int required(const OrtCustomOp* op, size_t i) {
  return (kind_of(op) == BN_TRAIN_FUSED || kind_of(op) == BN_GRAD_RANGE || kind_of(op) == LN_GRAD) && i == 5;
}
static int required_out(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static int mem_default(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static int arity(const OrtCustomOp* op) { (void)op; return 1; }
static int homogeneous(const OrtCustomOp* op) { (void)op; return 1; }

static OpDef g_ops[N_KINDS];

/* int_gemm.c's IntConv, when the library is built with it (kernels/__init__.py compiles both sources) */
OrtStatus* fg_int_gemm_register(void* domain, const void* api) __attribute__((weak));
OrtStatus* fg_gelu_register(void* domain, const void* api) __attribute__((weak));   /* gelu.c's GeluGrad */
OrtStatus* fg_conv_grad_w_register(void* domain, const void* api) __attribute__((weak));   /* conv_grad_w.c */
OrtStatus* fg_permute_register(void* domain, const void* api) __attribute__((weak));   /* permute.c's Permute */
OrtStatus* fg_clip_grad_register(void* domain, const void* api) __attribute__((weak));   /* clip_grad.c's ClipGrad */
OrtStatus* fg_dw_convt_register(void* domain, const void* api) __attribute__((weak));   /* dw_convt.c */
OrtStatus* fg_hard_act_register(void* domain, const void* api) __attribute__((weak));   /* hard_act.c */
OrtStatus* fg_bias_grad_register(void* domain, const void* api) __attribute__((weak));   /* bias_grad.c */
OrtStatus* fg_ln_channels_register(void* domain, const void* api) __attribute__((weak));   /* ln_channels.c */
OrtStatus* fg_channel_mul_register(void* domain, const void* api) __attribute__((weak));   /* channel_mul.c */
OrtStatus* fg_layer_norm_register(void* domain, const void* api) __attribute__((weak));   /* layer_norm.c */

static OrtStatus* fg_bn_concat_register(void* domain);   /* BatchNormGradSplit, SumRange: the end of this file */

OrtStatus* RegisterCustomOps(void* options, const OrtApiBase* base) {
  void* domain;
  OrtStatus* st;
  g_api = base->GetApi(API_VERSION);
  if (!g_api) return NULL;   /* onnxruntime older than 1.17: cannot happen with the pinned 1.19 */
  if ((st = API(CreateCustomOpDomain, CreateDomainFn)("ai.fracgraph", &domain))) return st;
  for (int kind = 0; kind < N_KINDS; ++kind) {
    OrtCustomOp* op = &g_ops[kind].op;
    memset(&g_ops[kind], 0, sizeof g_ops[kind]);
    g_ops[kind].kind = kind;
    op->version = 16;
    op->GetName = op_name;
    op->GetExecutionProviderType = provider;
    op->GetInputType = float_type;
    op->GetInputTypeCount = n_inputs;
    op->GetOutputType = output_type;
    op->GetOutputTypeCount = n_outputs;
    op->KernelDestroy = destroy;
    op->GetInputCharacteristic = required;
    op->GetOutputCharacteristic = required_out;
    op->GetInputMemoryType = mem_default;
    op->GetVariadicInputMinArity = arity;
    op->GetVariadicInputHomogeneity = homogeneous;
    op->GetVariadicOutputMinArity = arity;
    op->GetVariadicOutputHomogeneity = homogeneous;
    op->CreateKernelV2 = create;
    op->KernelComputeV2 = compute;
    if ((st = API(CustomOpDomain_Add, DomainAddFn)(domain, op))) return st;
  }
  if (fg_int_gemm_register && (st = fg_int_gemm_register(domain, g_api))) return st;
  if (fg_gelu_register && (st = fg_gelu_register(domain, g_api))) return st;
  if (fg_conv_grad_w_register && (st = fg_conv_grad_w_register(domain, g_api))) return st;
  if (fg_permute_register && (st = fg_permute_register(domain, g_api))) return st;
  if (fg_clip_grad_register && (st = fg_clip_grad_register(domain, g_api))) return st;
  if (fg_dw_convt_register && (st = fg_dw_convt_register(domain, g_api))) return st;
  if (fg_hard_act_register && (st = fg_hard_act_register(domain, g_api))) return st;
  if (fg_bias_grad_register && (st = fg_bias_grad_register(domain, g_api))) return st;
  if (fg_ln_channels_register && (st = fg_ln_channels_register(domain, g_api))) return st;
  if (fg_channel_mul_register && (st = fg_channel_mul_register(domain, g_api))) return st;
  if (fg_layer_norm_register && (st = fg_layer_norm_register(domain, g_api))) return st;
  if ((st = fg_bn_concat_register(domain))) return st;
  return API(AddCustomOpDomain, AddDomainFn)(options, domain);
}

/* ---- BatchNormGradSplit and SumRange (passes/bn_relu.py: a batch norm reading a Concat, and the gradient
 * accumulation of the Concat's inputs) ------------------------------------------------------------------------
 *
 *   BatchNormGradSplit(dY, X, scale, mean, inv_std, B?, lengths) -> (dscale, dbias, dX_0, ..., dX_k-1)
 *       BatchNormGrad (BatchNormGradRange with attribute relu: the fused forward's ReLU mask recomputed from X)
 *       whose dX onnxruntime's SplitTraining cuts along the channel axis (a Concat's gradient): each channel's dX
 *       goes straight into its piece (lengths: int64, one size per piece, the Split's own input; attribute
 *       pieces = k), so dX is never written whole and the Split's copy disappears. Bitwise BatchNormGrad's dX.
 *   SumRange(x_0, ..., x_k-1) -> (Y, min, max)   onnxruntime's Sum of k >= 2 tensors of one shape (no
 *       broadcasting; attribute n = k) and Y's range (MinMax's): y = ((x_0 + x_1) + x_2) + ..., the order of
 *       onnxruntime's variadic Sum (its first two inputs, then each next one added to the running output), so Y
 *       is bitwise onnxruntime's; but one read of each input and one write of Y per cache-sized chunk, where
 *       onnxruntime's Sum reads and writes Y once per input, and MinMax reads it again. */
typedef struct {
  int kind;   /* 0: BatchNormGradSplit, 1: SumRange */
  int64_t relu, pieces, n;
} BcKernel;

static OrtStatus* bc_tensor(void* ctx, size_t i, const void** v, int64_t* dims, size_t* rank, size_t* count, void** data) {
  OrtStatus* st;
  if ((st = input_shape(ctx, i, v, dims, rank, count))) return st;
  return API(GetTensorMutableData, GetDataFn)((void*)*v, data);
}

static OrtStatus* compute_bn_grad_split(BcKernel* k, void* ctx) {
  const void* in;
  void* out;
  int64_t dims[16], other[16], pdims[16];
  size_t rank, r2, n, count;
  const int64_t* lengths;
  OrtStatus* st;
  BnJob j;
  memset(&j, 0, sizeof j);
  if ((st = bc_tensor(ctx, 0, &in, dims, &rank, &n, (void**)&j.dy)) ||
      (st = bc_tensor(ctx, 1, &in, other, &r2, &count, (void**)&j.x)))
    return st;
  if (rank < 2 || count != n) return fail("fracgraph BatchNormGradSplit: dY and X must be one (N, C, ...) shape");
  j.N = (size_t)dims[0], j.C = (size_t)dims[1], j.S = (j.N && j.C) ? n / (j.N * j.C) : 0;
  if (!j.N || !j.S) return fail("fracgraph BatchNormGradSplit: X is empty");
  const float** per[3] = {&j.scale, &j.mean, &j.inv_std};
  for (size_t i = 2; i < 5; ++i) {
    if ((st = bc_tensor(ctx, i, &in, other, &r2, &count, (void**)per[i - 2]))) return st;
    if (count != j.C) return fail("fracgraph BatchNormGradSplit: scale, mean and inv_std need one value per channel");
  }
  if (k->relu) {
    if ((st = bc_tensor(ctx, 5, &in, other, &r2, &count, (void**)&j.bias))) return st;
    if (count != j.C) return fail("fracgraph BatchNormGradSplit: B needs one value per channel");
  }
  if ((st = bc_tensor(ctx, 6, &in, other, &r2, &count, (void**)&lengths))) return st;
  const size_t K = (size_t)k->pieces;
  if (count != K) return fail("fracgraph BatchNormGradSplit: lengths needs one size per output piece");
  size_t total = 0;
  for (size_t p = 0; p < K; ++p) {
    if (lengths[p] <= 0) return fail("fracgraph BatchNormGradSplit: every piece needs at least one channel");
    total += (size_t)lengths[p];
  }
  if (total != j.C) return fail("fracgraph BatchNormGradSplit: the pieces' lengths must add up to X's channels");
  int64_t cdims[1] = {(int64_t)j.C};
  if ((st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, cdims, 1, &out)) ||
      (st = API(GetTensorMutableData, GetDataFn)(out, (void**)&j.dscale)) ||
      (st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 1, cdims, 1, &out)) ||
      (st = API(GetTensorMutableData, GetDataFn)(out, (void**)&j.dbias)))
    return st;
  /* one block: the pieces' pointers, each channel's piece, each piece's offset and size, the channels' ranges */
  void* mem = malloc(K * sizeof(float*) + (j.C + 2 * K) * sizeof(size_t) + 2 * j.C * sizeof(float));
  if (!mem) return fail("fracgraph BatchNormGradSplit: out of memory");
  j.pieces = (float**)mem;
  size_t* piece = (size_t*)(j.pieces + K);
  size_t *poff = piece + j.C, *plen = poff + K;
  j.cmin = (float*)(plen + K), j.cmax = j.cmin + j.C;
  j.piece = piece, j.poff = poff, j.plen = plen;
  memcpy(pdims, dims, rank * sizeof(int64_t));
  size_t c0 = 0;
  st = NULL;
  for (size_t p = 0; p < K && !st; ++p) {
    poff[p] = c0, plen[p] = (size_t)lengths[p];
    for (size_t c = c0; c < c0 + plen[p]; ++c) piece[c] = p;
    c0 += plen[p];
    pdims[1] = lengths[p];
    if (!(st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 2 + p, pdims, rank, &out)))
      st = API(GetTensorMutableData, GetDataFn)(out, (void**)&j.pieces[p]);
  }
  if (!st) {
    if (j.C > 1) st = API(KernelContext_ParallelFor, ParallelForFn)(ctx, bn_grad_range_channel, j.C, 0, &j);
    else bn_grad_range_channel(&j, 0);
  }
  free(mem);
  return st;
}

#define SUM_CHUNK 4096   /* elements per task: every input's slice and Y's stay in L1/L2 while they are added */

typedef struct {
  const float** x;
  size_t k, n;
  float* y;
  float *part_min, *part_max;
} SumJob;

static void sum_range_chunk(void* p, size_t t) {
  const SumJob* j = (const SumJob*)p;
  const size_t a = t * SUM_CHUNK, b = a + SUM_CHUNK < j->n ? a + SUM_CHUNK : j->n;
  float* y = j->y;
  const float *x0 = j->x[0], *x1 = j->x[1];
  for (size_t i = a; i < b; ++i) y[i] = x0[i] + x1[i];
  for (size_t q = 2; q < j->k; ++q) {
    const float* xq = j->x[q];
    for (size_t i = a; i < b; ++i) y[i] = y[i] + xq[i];
  }
  lane_min_max(y + a, b - a, &j->part_min[t], &j->part_max[t]);
}

static OrtStatus* compute_sum_range(BcKernel* k, void* ctx) {
  const void* in;
  void *yv, *lv, *hv;
  int64_t dims[16], other[16];
  size_t rank, r2, n, count;
  float *lo, *hi;
  OrtStatus* st;
  SumJob j;
  const size_t K = (size_t)k->n;
  if (K < 2) return fail("fracgraph SumRange: needs at least two inputs");
  j.x = (const float**)malloc(K * sizeof(float*));
  if (!j.x) return fail("fracgraph SumRange: out of memory");
  st = bc_tensor(ctx, 0, &in, dims, &rank, &n, (void**)&j.x[0]);
  for (size_t q = 1; q < K && !st; ++q) {
    if ((st = bc_tensor(ctx, q, &in, other, &r2, &count, (void**)&j.x[q]))) break;
    int same = r2 == rank && count == n;
    for (size_t r = 0; same && r < rank; ++r) same = other[r] == dims[r];
    if (!same) st = fail("fracgraph SumRange: every input must have the first one's shape (no broadcasting)");
  }
  if (!st && !n) st = fail("fracgraph SumRange: the tensors are empty");
  if (!st && !(st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 0, dims, rank, &yv)) &&
      !(st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 1, NULL, 0, &lv)) &&
      !(st = API(KernelContext_GetOutput, GetOutputFn)(ctx, 2, NULL, 0, &hv)) &&
      !(st = API(GetTensorMutableData, GetDataFn)(yv, (void**)&j.y)) &&
      !(st = API(GetTensorMutableData, GetDataFn)(lv, (void**)&lo)))
    st = API(GetTensorMutableData, GetDataFn)(hv, (void**)&hi);
  if (st) {
    free(j.x);
    return st;
  }
  j.k = K, j.n = n;
  const size_t tasks = (n + SUM_CHUNK - 1) / SUM_CHUNK;
  j.part_min = (float*)malloc(2 * tasks * sizeof(float));
  if (!j.part_min) {
    free(j.x);
    return fail("fracgraph SumRange: out of memory");
  }
  j.part_max = j.part_min + tasks;
  if (tasks > 1) st = API(KernelContext_ParallelFor, ParallelForFn)(ctx, sum_range_chunk, tasks, 0, &j);
  else sum_range_chunk(&j, 0);
  if (!st) {
    float a = j.part_min[0], b = j.part_max[0];
    for (size_t t = 1; t < tasks; ++t) {
      a = j.part_min[t] < a ? j.part_min[t] : a;
      b = j.part_max[t] > b ? j.part_max[t] : b;
    }
    *lo = a, *hi = b;
  }
  free(j.part_min);
  free(j.x);
  return st;
}

static OrtCustomOp g_bc_ops[2];
static const char* bc_name(const OrtCustomOp* op) { return op == &g_bc_ops[0] ? "BatchNormGradSplit" : "SumRange"; }
static OrtStatus* bc_create(const OrtCustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)api;
  BcKernel* k = (BcKernel*)calloc(1, sizeof(BcKernel));
  OrtStatus* st;
  if (!k) return fail("fracgraph kernels: out of memory");
  k->kind = op == &g_bc_ops[0] ? 0 : 1;
  if (k->kind == 0 && ((st = API(KernelInfoGetAttribute_int64, AttrIntFn)(info, "relu", &k->relu)) ||
                       (st = API(KernelInfoGetAttribute_int64, AttrIntFn)(info, "pieces", &k->pieces)))) {
    free(k);
    return st;
  }
  if (k->kind == 1 && (st = API(KernelInfoGetAttribute_int64, AttrIntFn)(info, "n", &k->n))) {
    free(k);
    return st;
  }
  *out = k;
  return NULL;
}
static OrtStatus* bc_compute(void* kernel, void* ctx) {
  BcKernel* k = (BcKernel*)kernel;
  return k->kind == 0 ? compute_bn_grad_split(k, ctx) : compute_sum_range(k, ctx);
}
/* BatchNormGradSplit: 7 inputs (B optional, lengths int64), outputs dscale, dbias and the variadic pieces;
 * SumRange: one variadic float input, outputs Y, min, max */
static int bc_in_type(const OrtCustomOp* op, size_t i) { return op == &g_bc_ops[0] && i == 6 ? INT64_T : FLOAT_T; }
static size_t bc_n_in(const OrtCustomOp* op) { return op == &g_bc_ops[0] ? 7 : 1; }
static int bc_out_type(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return FLOAT_T; }
static size_t bc_n_out(const OrtCustomOp* op) { (void)op; return 3; }
static int bc_in_char(const OrtCustomOp* op, size_t i) {   /* 0 required, 1 optional, 2 variadic */
  return op == &g_bc_ops[0] ? (i == 5 ? 1 : 0) : 2;
}
static int bc_out_char(const OrtCustomOp* op, size_t i) { return op == &g_bc_ops[0] && i == 2 ? 2 : 0; }
static int bc_zero(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return 0; }
static int bc_min_arity(const OrtCustomOp* op) { return op == &g_bc_ops[0] ? 1 : 2; }
static int bc_one(const OrtCustomOp* op) { (void)op; return 1; }

static OrtStatus* fg_bn_concat_register(void* domain) {
  OrtStatus* st;
  for (int i = 0; i < 2; ++i) {
    OrtCustomOp* op = &g_bc_ops[i];
    memset(op, 0, sizeof *op);
    op->version = 16;
    op->GetName = bc_name;
    op->GetExecutionProviderType = provider;
    op->GetInputType = bc_in_type;
    op->GetInputTypeCount = bc_n_in;
    op->GetOutputType = bc_out_type;
    op->GetOutputTypeCount = bc_n_out;
    op->KernelDestroy = destroy;
    op->GetInputCharacteristic = bc_in_char;
    op->GetOutputCharacteristic = bc_out_char;
    op->GetInputMemoryType = bc_zero;
    op->GetVariadicInputMinArity = bc_min_arity;
    op->GetVariadicInputHomogeneity = bc_one;
    op->GetVariadicOutputMinArity = bc_one;
    op->GetVariadicOutputHomogeneity = bc_one;
    op->CreateKernelV2 = bc_create;
    op->KernelComputeV2 = bc_compute;
    if ((st = API(CustomOpDomain_Add, DomainAddFn)(domain, op))) return st;
  }
  return NULL;
}
