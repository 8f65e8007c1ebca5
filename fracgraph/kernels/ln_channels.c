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
 * lanes, one vector), each position's sum over c in double, in channel order. Tasks are fixed by the shape: on
 * maps of more than LNC_CHUNK positions (image, chunk of LNC_CHUNK positions); on smaller maps of 16 positions or
 * more, runs of whole images, as many as keep each float lane of dscale, dbias at LNC_TERMS terms or fewer (4x4:
 * 4 images, 5x5: 2, 7x7: 1). dscale and dbias are float sums in 16 lanes within a task, each task's written lanes
 * added in double (a task on fewer than 16 positions writes fewer; the others would add zeros), the tasks' partial
 * sums added in task order in double: the same result on any thread count.
 *
 * Maps under 16 positions (ConvNeXt's 2x2 and 1x1 stages, 3x3): a vector of positions would be mostly empty and
 * each task's 16 lanes per channel would cost more than its elements (session 12 ran 2x2 x 320 slower than the
 * Transpose chain, 1x1 3.7x slower), so an image runs flat over channels and positions together (lnc_fwd_tiny,
 * lnc_grad_tiny below), tasks are runs of whole images (about LNC_TINY elements), and dscale, dbias add each
 * rounded product straight in double.
 *
 * The statistics (double sums, var from the two sums) are at least as exact as onnxruntime's float ones, so the op
 * is onnxruntime's chain up to rounding (tests/passes/test_ln_channels.py bounds it against float64).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"
static const OrtApi* g_api_lnc;
#define LAPI(name, type) ((type)g_api_lnc->slot[S_##name])

enum {
  LNC_LANES = 16,      /* positions per vector */
  LNC_CHUNK = 64,      /* positions per task on maps of 64 positions or more (a multiple of LNC_LANES) */
  LNC_TERMS = 4,       /* at most this many terms in a float lane of dscale, dbias: LNC_CHUNK / LNC_LANES */
  LNC_TINY = 16384,    /* elements per task, about, on maps under LNC_LANES positions (whole images) */
};

typedef float LncV __attribute__((vector_size(LNC_LANES * sizeof(float))));   /* 16 floats */
typedef float LncH __attribute__((vector_size(8 * sizeof(float))));           /* 8 floats */
typedef double LncD __attribute__((vector_size(8 * sizeof(double))));         /* 8 doubles */

typedef struct {
  const float *x, *dy, *scale, *bias, *mean, *inv_std;
  float *y, *dx, *mean_out, *inv_out;
  double* part;   /* gradient: [tasks][2][C] partial dscale, dbias */
  size_t N, C, S;
  size_t chunks;  /* LNC_CHUNK-position chunks per image (maps of 64 positions or more; else 1, a whole image) */
  size_t ipt;     /* images per task (1 when chunks > 1) */
  size_t tasks;
  size_t P;       /* maps under 16 positions: the period, lcm(S, 16) (a multiple of S and of 16); else 0 */
  float *scx, *bix;   /* maps under 16 positions: scale and bias expanded to [C][S] (bix NULL without a bias) */
  float eps;
  int oom;
} LncJob;

/* The task's images [*n0, *n1) and positions [*a, *b) of each. */
static void lnc_task_span(const LncJob* j, size_t t, size_t* n0, size_t* n1, size_t* a, size_t* b) {
  if (j->chunks > 1) {
    *n0 = t / j->chunks, *n1 = *n0 + 1;
    *a = (t % j->chunks) * LNC_CHUNK, *b = *a + LNC_CHUNK < j->S ? *a + LNC_CHUNK : j->S;
  } else {
    *n0 = t * j->ipt, *n1 = *n0 + j->ipt < j->N ? *n0 + j->ipt : j->N;
    *a = 0, *b = j->S;
  }
}

/* The forward of positions [s0, s0 + W) of image n, W <= LNC_LANES; inlined with W = 16 (a constant: each loop
 * over w one vector) and with the partial block's W (lnc_fwd_block). */
static inline __attribute__((always_inline)) void lnc_fwd_w(const LncJob* j, size_t n, size_t s0, size_t W) {
  const size_t C = j->C, S = j->S;
  const float* x = j->x + n * C * S + s0;
  float* y = j->y + n * C * S + s0;
  double sum[LNC_LANES] = {0}, sq[LNC_LANES] = {0};
  float mu[LNC_LANES], is[LNC_LANES];
  for (size_t c = 0; c < C; ++c)
    for (size_t w = 0; w < W; ++w) {
      const double v = x[c * S + w];
      sum[w] += v, sq[w] += v * v;
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

static void lnc_fwd_block(const LncJob* j, size_t n, size_t s0, size_t W) {
  if (W == LNC_LANES) lnc_fwd_w(j, n, s0, LNC_LANES);
  else lnc_fwd_w(j, n, s0, W);
}

/* ---- maps under 16 positions (ConvNeXt's 2x2 and 1x1 stages, a 3x3 one): an image's C * S values are contiguous,
 * so they run as one flat array, 16 at a time, over channels: element i of a run of P = lcm(S, 16) is position
 * i mod S, every vector full. The position sums are P double lanes over the runs, then the lanes of each position
 * in lane order; the per-position statistics are repeated P / S times, the scale and bias expanded to [C][S]. */
static inline LncV lnc_ld(const float* p) {
  LncV v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline void lnc_st(float* p, LncV v) { memcpy(p, &v, sizeof v); }
static inline void lnc_cvt(LncV v, LncD* lo, LncD* hi) {   /* 16 floats to 2 x 8 doubles */
  LncH a, b;
  memcpy(&a, &v, sizeof a);
  memcpy(&b, (const char*)&v + sizeof a, sizeof b);
  *lo = __builtin_convertvector(a, LncD), *hi = __builtin_convertvector(b, LncD);
}
static inline void lnc_ld_d(const float* p, LncD* lo, LncD* hi) { lnc_cvt(lnc_ld(p), lo, hi); }

/* Position sums of two double-lane accumulators [P]: out[s] = sum over lanes k = s mod S, in lane order. */
static void lnc_fold(const double* acc, size_t P, size_t S, double* out) {
  for (size_t s = 0; s < S; ++s) {
    double u = 0.0;
    for (size_t k = s; k < P; k += S) u += acc[k];
    out[s] = u;
  }
}

static void lnc_fwd_tiny(const LncJob* j, size_t n) {
  const size_t C = j->C, S = j->S, P = j->P, E = C * S, R = E - E % P;   /* R: the whole runs */
  const float* x = j->x + n * E;
  float* y = j->y + n * E;
  LncD acc[2 * 240 / 8];   /* sum, then sum of squares: P / 8 vectors each, P <= 240 */
  double ad[2 * 240], sum[LNC_LANES], sq[LNC_LANES];
  float muP[240], isP[240];
  const size_t G = P / 8;
  memset(acc, 0, sizeof(LncD) * 2 * G);
  for (size_t i = 0; i < R; i += P)
    for (size_t g = 0; g < G; g += 2) {
      LncD lo, hi;
      lnc_ld_d(x + i + 8 * g, &lo, &hi);
      acc[g] += lo, acc[g + 1] += hi;
      acc[G + g] += lo * lo, acc[G + g + 1] += hi * hi;
    }
  memcpy(ad, acc, sizeof(double) * 2 * P);
  for (size_t k = 0; R + k < E; ++k) {
    const double v = x[R + k];
    ad[k] += v, ad[P + k] += v * v;
  }
  lnc_fold(ad, P, S, sum);
  lnc_fold(ad + P, P, S, sq);
  for (size_t w = 0; w < S; ++w) {
    const double m = sum[w] / (double)C;
    double var = sq[w] / (double)C - m * m;
    if (var < 0) var = 0;
    muP[w] = (float)m;
    isP[w] = (float)(1.0 / sqrt(var + (double)j->eps));
    j->mean_out[n * S + w] = muP[w];
    j->inv_out[n * S + w] = isP[w];
  }
  for (size_t k = S; k < P; ++k) muP[k] = muP[k - S], isP[k] = isP[k - S];
  const float *sc = j->scx, *bi = j->bix;
  for (size_t i = 0, k0 = 0; i < E; i += LNC_LANES, k0 = k0 + LNC_LANES == P ? 0 : k0 + LNC_LANES) {
    /* k0: i's place in its run; E - i < 16 only at the end of a partial run, done element by element */
    if (i + LNC_LANES <= E) {
      const LncV v = (lnc_ld(x + i) - lnc_ld(muP + k0)) * lnc_ld(isP + k0) * lnc_ld(sc + i);
      lnc_st(y + i, bi ? v + lnc_ld(bi + i) : v + 0.0f);
    } else {
      for (size_t k = 0; i + k < E; ++k)
        y[i + k] = (x[i + k] - muP[k0 + k]) * isP[k0 + k] * sc[i + k] + (bi ? bi[i + k] : 0.0f);
    }
  }
}

static void lnc_fwd_task(void* p, size_t t) {
  const LncJob* j = (const LncJob*)p;
  size_t n0, n1, a, b;
  lnc_task_span(j, t, &n0, &n1, &a, &b);
  for (size_t n = n0; n < n1; ++n) {
    if (j->P) {
      lnc_fwd_tiny(j, n);
      continue;
    }
    for (size_t s = a; s < b; s += LNC_LANES) lnc_fwd_block(j, n, s, b - s < LNC_LANES ? b - s : LNC_LANES);
  }
}

/* The gradient of positions [s0, s0 + W) of image n; ps, pb: the task's [C][LNC_LANES] lane sums. Inlined twice
 * (lnc_grad_block): with W = 16, a constant, each loop over w is one vector; and with the partial block's W. */
static inline __attribute__((always_inline)) void lnc_grad_w(const LncJob* j, size_t n, size_t s0, size_t W,
                                                             float* ps, float* pb) {
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

/* The gradient of image n of a map under 16 positions: dx, and the image's dscale, dbias terms added to the
 * task's double sums ps, pb [C] (each product rounded once, to float, then added in double in position order;
 * tmp: C * S floats). */
static void lnc_grad_block(const LncJob* j, size_t n, size_t s0, size_t W, float* ps, float* pb) {
  if (W == LNC_LANES) lnc_grad_w(j, n, s0, LNC_LANES, ps, pb);
  else lnc_grad_w(j, n, s0, W, ps, pb);
}

static void lnc_grad_tiny(const LncJob* j, size_t n, double* ps, double* pb, float* tmp) {
  const size_t C = j->C, S = j->S, P = j->P, E = C * S, R = E - E % P;
  const float *x = j->x + n * E, *dy = j->dy + n * E, *sc = j->scx;
  float* dx = j->dx + n * E;
  LncD acc[2 * 240 / 8];   /* sum of a, then of a b: P / 8 vectors each */
  double ad[2 * 240], sa[LNC_LANES], sab[LNC_LANES];
  float muP[240], isP[240], faP[240], fabP[240];
  const size_t G = P / 8;
  memset(acc, 0, sizeof(LncD) * 2 * G);
  for (size_t w = 0; w < S; ++w) muP[w] = j->mean[n * S + w], isP[w] = j->inv_std[n * S + w];
  for (size_t k = S; k < P; ++k) muP[k] = muP[k - S], isP[k] = isP[k - S];
  for (size_t i = 0; i < R; i += P)
    for (size_t g = 0; g < G; g += 2) {
      const size_t o = i + 8 * g;
      const LncV av = lnc_ld(dy + o) * lnc_ld(sc + o), bv = (lnc_ld(x + o) - lnc_ld(muP + 8 * g)) * lnc_ld(isP + 8 * g);
      LncD lo, hi;
      lnc_cvt(av, &lo, &hi);
      acc[g] += lo, acc[g + 1] += hi;
      lnc_cvt(av * bv, &lo, &hi);
      acc[G + g] += lo, acc[G + g + 1] += hi;
    }
  memcpy(ad, acc, sizeof(double) * 2 * P);
  for (size_t k = 0; R + k < E; ++k) {
    const float av = dy[R + k] * sc[R + k], bv = (x[R + k] - muP[k]) * isP[k];
    ad[k] += av, ad[P + k] += av * bv;
  }
  lnc_fold(ad, P, S, sa);
  lnc_fold(ad + P, P, S, sab);
  for (size_t w = 0; w < S; ++w) faP[w] = (float)(sa[w] / (double)C), fabP[w] = (float)(sab[w] / (double)C);
  for (size_t k = S; k < P; ++k) faP[k] = faP[k - S], fabP[k] = fabP[k - S];
  for (size_t i = 0, k0 = 0; i < E; i += LNC_LANES, k0 = k0 + LNC_LANES == P ? 0 : k0 + LNC_LANES) {
    if (i + LNC_LANES <= E) {
      const LncV d = lnc_ld(dy + i), bv = (lnc_ld(x + i) - lnc_ld(muP + k0)) * lnc_ld(isP + k0);
      lnc_st(dx + i, lnc_ld(isP + k0) * (d * lnc_ld(sc + i) - lnc_ld(faP + k0) - bv * lnc_ld(fabP + k0)));
      lnc_st(tmp + i, d * bv);
    } else {
      for (size_t k = 0; i + k < E; ++k) {
        const float d = dy[i + k], bv = (x[i + k] - muP[k0 + k]) * isP[k0 + k];
        dx[i + k] = isP[k0 + k] * (d * sc[i + k] - faP[k0 + k] - bv * fabP[k0 + k]);
        tmp[i + k] = d * bv;
      }
    }
  }
  for (size_t c = 0; c < C; ++c) {
    double u = ps[c], v = pb[c];
    for (size_t w = 0; w < S; ++w) u += tmp[c * S + w], v += dy[c * S + w];
    ps[c] = u, pb[c] = v;
  }
}

static void lnc_grad_task(void* p, size_t t) {
  LncJob* j = (LncJob*)p;
  const size_t C = j->C;
  size_t n0, n1, a, b;
  lnc_task_span(j, t, &n0, &n1, &a, &b);
  double* part = j->part + t * 2 * C;
  if (j->P) {
    float* tmp = (float*)malloc(sizeof(float) * C * j->S);
    if (!tmp) {
      j->oom = 1;
      return;
    }
    memset(part, 0, sizeof(double) * 2 * C);
    for (size_t n = n0; n < n1; ++n) lnc_grad_tiny(j, n, part, part + C, tmp);
    free(tmp);
    return;
  }
  /* the lanes a block writes: W = min(16, b - a) of them (every block starts a run of 16 positions); the others
   * stay zero and are not added */
  const size_t L = b - a < LNC_LANES ? b - a : LNC_LANES;
  float* lanes = (float*)calloc(2 * C * LNC_LANES, sizeof(float));
  if (!lanes) {
    j->oom = 1;
    return;
  }
  float *ps = lanes, *pb = lanes + C * LNC_LANES;
  for (size_t n = n0; n < n1; ++n)
    for (size_t s = a; s < b; s += LNC_LANES) lnc_grad_block(j, n, s, b - s < LNC_LANES ? b - s : LNC_LANES, ps, pb);
  for (size_t c = 0; c < C; ++c) {
    double u = 0.0, v = 0.0;
    for (size_t w = 0; w < L; ++w) u += ps[c * LNC_LANES + w], v += pb[c * LNC_LANES + w];
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
  const size_t S = j->S;
  j->chunks = S > LNC_CHUNK ? (S + LNC_CHUNK - 1) / LNC_CHUNK : 1;
  j->P = 0;
  if (S >= LNC_LANES || !S) {
    /* whole images per task below LNC_CHUNK positions, as many as keep a lane's terms <= LNC_TERMS */
    const size_t blocks = (S + LNC_LANES - 1) / LNC_LANES;
    j->ipt = j->chunks == 1 && blocks && blocks < LNC_TERMS ? LNC_TERMS / blocks : 1;
  } else {
    size_t P = LNC_LANES;
    while (P % S) P += LNC_LANES;   /* lcm(S, 16) <= 15 * 16 */
    j->P = P;
    j->ipt = j->C * S >= LNC_TINY ? 1 : LNC_TINY / (j->C * S);
  }
  j->tasks = j->chunks > 1 ? j->N * j->chunks : (j->N + j->ipt - 1) / j->ipt;
  return NULL;
}

/* Maps under 16 positions: scale (and bias) expanded to [C][S], one allocation; freed by the caller (j->scx). */
static int lnc_expand(LncJob* j, const float* bias) {
  const size_t C = j->C, S = j->S;
  float* e = (float*)malloc(sizeof(float) * C * S * (bias ? 2 : 1));
  if (!e) return 0;
  for (size_t c = 0; c < C; ++c)
    for (size_t w = 0; w < S; ++w) {
      e[c * S + w] = j->scale[c];
      if (bias) e[C * S + c * S + w] = bias[c];
    }
  j->scx = e, j->bix = bias ? e + C * S : NULL;
  return 1;
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
  const size_t tasks = j.tasks;
  if (!tasks || !j.C || !j.S) return NULL;
  if (j.P && !lnc_expand(&j, j.bias)) return lfail("fracgraph LayerNormChannels: out of memory");
  if (tasks == 1) lnc_fwd_task(&j, 0);
  else st = LAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, lnc_fwd_task, tasks, 0, &j);
  free(j.scx);
  return st;
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
  const size_t tasks = j.S ? j.tasks : 0;
  if (!j.C) return NULL;
  j.part = (double*)malloc(sizeof(double) * 2 * j.C * (tasks ? tasks : 1));
  if (!j.part) return lfail("fracgraph LayerNormChannelsGrad: out of memory");
  if (tasks && j.P && !lnc_expand(&j, NULL)) {
    free(j.part);
    return lfail("fracgraph LayerNormChannelsGrad: out of memory");
  }
  if (tasks > 1) st = LAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, lnc_grad_task, tasks, 0, &j);
  else if (tasks == 1) lnc_grad_task(&j, 0);
  if (!st && j.oom) st = lfail("fracgraph LayerNormChannelsGrad: out of memory");
  for (size_t c = 0; !st && c < j.C; ++c) {
    double u = 0.0, v = 0.0;
    for (size_t t = 0; t < tasks; ++t) u += j.part[t * 2 * j.C + c], v += j.part[t * 2 * j.C + j.C + c];
    dscale[c] = (float)u, dbias[c] = (float)v;
  }
  free(j.part);
  free(j.scx);
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
