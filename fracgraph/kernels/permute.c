/* fracgraph's tensor permutation: onnxruntime's Transpose as one cache-blocked, multithreaded copy.
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_permute_register to add this file's op to the domain "ai.fracgraph", written by passes/permute.py:
 *
 *   Permute(X) -> Y          attribute perm_code (int): the permutation, 4 bits per output axis (axis i's source
 *                            axis in bits 4i..4i+3), rank <= 15;  Y[i_0 .. i_r-1] = X[j] with j[perm[k]] = i_k
 *
 * exactly ONNX Transpose(X, perm) for float tensors. onnxruntime 1.19.2's Transpose runs the transformers' head
 * splits and merges at 1.3-3x the time of a plain copy of the same tensor (12.6% of vit_tv's FW8/BW8 step). Here:
 *
 * - the permutation is first reduced: axes of size 1 are dropped and output axes whose source axes are adjacent
 *   in X in the same order are merged (a [B, N, H, D] -> [B, H, N, D] head split stays 4 axes, rows of D floats;
 *   [B, 1, N, C] -> [1, B, N, C] reduces to one axis); a permutation that reduces to one axis is a copy;
 * - where X's innermost axis stays innermost, Y is rows of X's contiguous runs: each output row is one memcpy,
 *   the rows in blocks as tasks on the session's threads;
 * - otherwise Y is a batch of 2-D transposes (X's innermost axis against Y's innermost), done in 8 x 8 tiles
 *   (one AVX register per tile row, transposed in registers, where the library is compiled with AVX; a scalar
 *   loop over the same tile otherwise), tiles in blocks as tasks.
 *
 * It only moves values: Y is bitwise ONNX Transpose's (tests/passes/test_permute.py compares both paths with numpy
 * and with onnxruntime's Transpose, and the step with the pass on and off).
 */
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"   /* the slot table, shared with fused_ops.c */
static const OrtApi* g_api_pm;
#define PAPI(name, type) ((type)g_api_pm->slot[S_##name])

#define PM_MAX_RANK 15
#define PM_TASK 16384   /* about this many elements per task */
#define PM_MIN_PARALLEL 65536   /* below, one thread: handing tasks to the pool costs more than it saves */

/* The reduced problem. */
typedef struct {
  const float* x;
  float* y;
  int s;                         /* reduced rank */
  int64_t d[PM_MAX_RANK];        /* reduced input dims */
  int64_t p[PM_MAX_RANK];        /* reduced permutation: output axis k reads input axis p[k] */
  int64_t od[PM_MAX_RANK];       /* output dims: d[p[k]] */
  int64_t is[PM_MAX_RANK];       /* input stride of output axis k (elements) */
  int64_t n;                     /* elements */
  /* row copy (p[s-1] == s-1): rows of L elements, `per` rows a task */
  int64_t L, rows, per;
  /* 2-D transposes: outer axes (output axes other than q and s-1) in ocount blocks of (nl x na) */
  int q;                         /* output position of input's innermost axis */
  int64_t na, nl, is_a, os_q;    /* Y-inner extent (X stride is_a), X-inner extent (Y stride os_q) */
  int64_t outer, ib, iblocks;    /* outer blocks; X-inner rows (i) per task, i-blocks per outer block */
  int plain;                     /* 1: the scalar tile even where AVX is compiled (tests) */
  size_t tasks;
} PJob;

/* Reduce (dims, perm) into the job; returns 0 on success, -1 on an invalid permutation. */
static int pm_plan(PJob* j, const int64_t* dims, const int64_t* perm, int rank) {
  int seen[PM_MAX_RANK] = {0};
  int64_t n = 1;
  for (int k = 0; k < rank; ++k) {
    if (perm[k] < 0 || perm[k] >= rank || seen[perm[k]]) return -1;
    seen[perm[k]] = 1;
    n *= dims[k];
  }
  j->n = n;
  /* drop size-1 axes: keep[a] = new index of input axis a, or -1 */
  int keep[PM_MAX_RANK], m = 0;
  int64_t d1[PM_MAX_RANK];
  for (int a = 0; a < rank; ++a) {
    keep[a] = dims[a] == 1 ? -1 : m;
    if (dims[a] != 1) d1[m++] = dims[a];
  }
  int64_t p1[PM_MAX_RANK];
  int t = 0;
  for (int k = 0; k < rank; ++k)
    if (keep[perm[k]] >= 0) p1[t++] = keep[perm[k]];
  /* merge runs of output axes whose input axes are consecutive: group g = output axes [start_g, end_g) */
  int group_of_in[PM_MAX_RANK];   /* input axis (after drop) -> group leader's input axis, -1 when merged away */
  int g = 0;                      /* merged groups, in output order */
  int64_t gsize[PM_MAX_RANK];
  for (int k = 0; k < t; ++k) {
    if (k > 0 && p1[k] == p1[k - 1] + 1) {
      gsize[g - 1] *= d1[p1[k]];
      group_of_in[p1[k]] = -1;
    } else {
      gsize[g] = d1[p1[k]];
      group_of_in[p1[k]] = g;
      ++g;
    }
  }
  /* reduced input axes: the leaders in input order; reduced perm: output group k -> its rank among the leaders */
  int rank_of_group[PM_MAX_RANK], s = 0;
  for (int a = 0; a < t; ++a)
    if (group_of_in[a] >= 0) {
      rank_of_group[group_of_in[a]] = s;
      j->d[s++] = gsize[group_of_in[a]];
    }
  j->s = s;
  for (int k = 0; k < g; ++k) j->p[k] = rank_of_group[k];
  int64_t stride[PM_MAX_RANK];
  int64_t acc = 1;
  for (int a = s - 1; a >= 0; --a) { stride[a] = acc; acc *= j->d[a]; }
  for (int k = 0; k < s; ++k) { j->od[k] = j->d[j->p[k]]; j->is[k] = stride[j->p[k]]; }
  j->q = -1;
  if (n == 0) { j->tasks = 0; return 0; }
  if (s <= 1) {   /* a copy: chunks of PM_TASK elements ("rows" of one) */
    j->L = 1, j->rows = n, j->per = PM_TASK;
    j->tasks = (size_t)((n + PM_TASK - 1) / PM_TASK);
    return 0;
  }
  if (j->p[s - 1] == s - 1) {   /* rows of contiguous runs of L elements */
    j->L = j->d[s - 1];
    j->rows = n / j->L;
    j->per = j->L >= PM_TASK ? 1 : PM_TASK / j->L;
    j->tasks = (size_t)((j->rows + j->per - 1) / j->per);
    return 0;
  }
  int q = 0;
  while (j->p[q] != s - 1) ++q;
  j->q = q;
  j->na = j->od[s - 1];
  j->is_a = j->is[s - 1];
  j->nl = j->od[q];
  int64_t os = 1;
  for (int k = s - 1; k > q; --k) os *= j->od[k];
  j->os_q = os;
  j->outer = n / (j->na * j->nl);
  int64_t ib = PM_TASK / (j->na > 0 ? j->na : 1);
  ib = (ib + 7) / 8 * 8;
  if (ib < 8) ib = 8;
  if (ib > j->nl) ib = j->nl;
  j->ib = ib;
  j->iblocks = (j->nl + ib - 1) / ib;
  j->tasks = (size_t)(j->outer * j->iblocks);
  return 0;
}

/* Input and output offsets of output-row r (row copy: all output axes but the last) or outer block r (all output
 * axes but q and s-1), by mixed-radix decomposition over those axes. */
static void pm_offsets(const PJob* j, int64_t r, int skip_q, int64_t* in_off, int64_t* out_off) {
  int64_t io = 0, oo = 0, ostride = 1;
  for (int k = j->s - 1; k >= 0; --k) {
    const int64_t dk = j->od[k];
    if (k == j->s - 1 || k == skip_q) { ostride *= dk; continue; }
    const int64_t ik = r % dk;
    r /= dk;
    io += ik * j->is[k];
    oo += ik * ostride;
    ostride *= dk;
  }
  *in_off = io;
  *out_off = oo;
}

/* a short row inline (the transformers' rows are 32-192 floats: a libc call per row costs about as much) */
#define PM_INLINE_ROW 512
static inline void copy_row(float* out, const float* in, int64_t L) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= L; i += 16) _mm512_storeu_ps(out + i, _mm512_loadu_ps(in + i));
  if (i < L) {
    const __mmask16 m = (__mmask16)((1u << (L - i)) - 1u);
    _mm512_mask_storeu_ps(out + i, m, _mm512_maskz_loadu_ps(m, in + i));
  }
#else
#if defined(__AVX__)
  for (; i + 8 <= L; i += 8) _mm256_storeu_ps(out + i, _mm256_loadu_ps(in + i));
#endif
  for (; i < L; ++i) out[i] = in[i];
#endif
}

static void pm_rows(const PJob* j, size_t task) {
  const int64_t r0 = (int64_t)task * j->per;
  const int64_t r1 = r0 + j->per < j->rows ? r0 + j->per : j->rows;
  const size_t bytes = (size_t)j->L * sizeof(float);
  if (j->s <= 1) {   /* a plain copy, in chunks */
    memcpy(j->y + r0 * j->L, j->x + r0 * j->L, (size_t)(r1 - r0) * bytes);
    return;
  }
  /* odometer over the output axes 0..s-2, started at row r0 */
  const int s1 = j->s - 1;
  int64_t idx[PM_MAX_RANK], rem = r0, io = 0;
  for (int k = s1 - 1; k >= 0; --k) {
    idx[k] = rem % j->od[k];
    rem /= j->od[k];
    io += idx[k] * j->is[k];
  }
  float* out = j->y + r0 * j->L;
  for (int64_t r = r0; r < r1; ++r, out += j->L) {
    if (j->L <= PM_INLINE_ROW) copy_row(out, j->x + io, j->L);
    else memcpy(out, j->x + io, bytes);
    for (int k = s1 - 1; k >= 0; --k) {   /* next row */
      io += j->is[k];
      if (++idx[k] < j->od[k]) break;
      io -= idx[k] * j->is[k];
      idx[k] = 0;
    }
  }
}

/* out[i * os + jj] = in[jj * is + i] for i < ni, jj < nj: one tile, scalar */
static inline void tile_scalar(const float* in, float* out, int64_t is, int64_t os, int64_t ni, int64_t nj) {
  for (int64_t i = 0; i < ni; ++i)
    for (int64_t jj = 0; jj < nj; ++jj) out[i * os + jj] = in[jj * is + i];
}

#if defined(__AVX__)
/* the full 8 x 8 tile in registers: rows jj of `in` (8 floats along i) become rows i of `out` (8 floats along jj) */
static inline void tile8_avx(const float* in, float* out, int64_t is, int64_t os) {
  __m256 r0 = _mm256_loadu_ps(in + 0 * is), r1 = _mm256_loadu_ps(in + 1 * is), r2 = _mm256_loadu_ps(in + 2 * is),
         r3 = _mm256_loadu_ps(in + 3 * is), r4 = _mm256_loadu_ps(in + 4 * is), r5 = _mm256_loadu_ps(in + 5 * is),
         r6 = _mm256_loadu_ps(in + 6 * is), r7 = _mm256_loadu_ps(in + 7 * is);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  r0 = _mm256_shuffle_ps(t0, t2, 0x44); r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  r2 = _mm256_shuffle_ps(t1, t3, 0x44); r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  r4 = _mm256_shuffle_ps(t4, t6, 0x44); r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  r6 = _mm256_shuffle_ps(t5, t7, 0x44); r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(out + 0 * os, _mm256_permute2f128_ps(r0, r4, 0x20));
  _mm256_storeu_ps(out + 1 * os, _mm256_permute2f128_ps(r1, r5, 0x20));
  _mm256_storeu_ps(out + 2 * os, _mm256_permute2f128_ps(r2, r6, 0x20));
  _mm256_storeu_ps(out + 3 * os, _mm256_permute2f128_ps(r3, r7, 0x20));
  _mm256_storeu_ps(out + 4 * os, _mm256_permute2f128_ps(r0, r4, 0x31));
  _mm256_storeu_ps(out + 5 * os, _mm256_permute2f128_ps(r1, r5, 0x31));
  _mm256_storeu_ps(out + 6 * os, _mm256_permute2f128_ps(r2, r6, 0x31));
  _mm256_storeu_ps(out + 7 * os, _mm256_permute2f128_ps(r3, r7, 0x31));
}
#endif

static void pm_tiles(const PJob* j, size_t task) {
  const int64_t ob = (int64_t)task / j->iblocks, blk = (int64_t)task % j->iblocks;
  int64_t io, oo;
  pm_offsets(j, ob, j->q, &io, &oo);
  const int64_t i0 = blk * j->ib, i1 = i0 + j->ib < j->nl ? i0 + j->ib : j->nl;
  const float* in = j->x + io;
  float* out = j->y + oo;
  const int64_t is = j->is_a, os = j->os_q, na = j->na;
  for (int64_t i = i0; i < i1; i += 8) {
    const int64_t ni = i1 - i < 8 ? i1 - i : 8;
    for (int64_t a = 0; a < na; a += 8) {
      const int64_t nj = na - a < 8 ? na - a : 8;
#if defined(__AVX__)
      if (ni == 8 && nj == 8 && !j->plain) {
        tile8_avx(in + a * is + i, out + i * os + a, is, os);
        continue;
      }
#endif
      tile_scalar(in + a * is + i, out + i * os + a, is, os, ni, nj);
    }
  }
}

static void pm_task(void* p, size_t task) {
  const PJob* j = (const PJob*)p;
  if (j->q < 0) pm_rows(j, task);
  else pm_tiles(j, task);
}

/* The kernel on plain arrays, for tests and probes: path 1 = AVX tiles (returns 1 where not compiled), 0 = scalar
 * tiles; the tasks run in turn on this thread. Returns 2 for an invalid permutation or rank. */
int fg_permute(const float* x, float* y, const int64_t* dims, const int64_t* perm, int rank, int path) {
  PJob j;
#if !defined(__AVX__)
  if (path == 1) return 1;
#endif
  if (rank < 0 || rank > PM_MAX_RANK) return 2;
  memset(&j, 0, sizeof j);
  if (pm_plan(&j, dims, perm, rank)) return 2;
  j.x = x, j.y = y, j.plain = path == 0;
  for (size_t t = 0; t < j.tasks; ++t) pm_task(&j, t);
  return 0;
}

/* The reduced rank and form of a permutation (tests: which path a shape takes): rank * 2 + (1 if 2-D tiles). */
int fg_permute_form(const int64_t* dims, const int64_t* perm, int rank) {
  PJob j;
  memset(&j, 0, sizeof j);
  if (rank < 0 || rank > PM_MAX_RANK || pm_plan(&j, dims, perm, rank)) return -1;
  return j.s * 2 + (j.q >= 0);
}

/* ---- the op -------------------------------------------------------------------------------------------------- */
typedef struct {
  int64_t perm[PM_MAX_RANK];
  int rank;
} PmKernel;

static OrtStatus* pfail(const char* msg) { return PAPI(CreateStatus, CreateStatusFn)(ORT_FAIL, msg); }

static OrtStatus* pm_compute(void* kernel, void* ctx) {
  const PmKernel* k = (const PmKernel*)kernel;
  const void* xv;
  void *info, *out;
  int64_t dims[PM_MAX_RANK + 1], odims[PM_MAX_RANK];
  size_t rank;
  OrtStatus* st;
  PJob j;
  if ((st = PAPI(KernelContext_GetInput, GetInputFn)(ctx, 0, &xv))) return st;
  if ((st = PAPI(GetTensorTypeAndShape, TypeShapeFn)(xv, &info))) return st;
  if (!(st = PAPI(GetDimensionsCount, DimCountFn)(info, &rank))) {
    if (rank != (size_t)k->rank) st = pfail("fracgraph Permute: X's rank is not the permutation's");
    else st = PAPI(GetDimensions, DimsFn)(info, dims, rank);
  }
  PAPI(ReleaseTensorTypeAndShapeInfo, ReleaseFn)(info);
  if (st) return st;
  memset(&j, 0, sizeof j);
  if (pm_plan(&j, dims, k->perm, k->rank)) return pfail("fracgraph Permute: perm_code is not a permutation");
  for (int a = 0; a < k->rank; ++a) odims[a] = dims[k->perm[a]];
  if ((st = PAPI(GetTensorMutableData, GetDataFn)((void*)xv, (void**)&j.x))) return st;
  if ((st = PAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, odims, rank, &out))) return st;
  if ((st = PAPI(GetTensorMutableData, GetDataFn)(out, (void**)&j.y))) return st;
  if (j.tasks == 0) return NULL;
  if (j.tasks == 1 || j.n < PM_MIN_PARALLEL) {   /* small: one thread, no hand-off */
    for (size_t t = 0; t < j.tasks; ++t) pm_task(&j, t);
    return NULL;
  }
  return PAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, pm_task, j.tasks, 0, &j);
}

/* ---- registration -------------------------------------------------------------------------------------------- */
static FgOp g_pm_op;

static OrtStatus* pm_create(const OrtCustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)op, (void)api;
  int64_t code;
  OrtStatus* st;
  if ((st = PAPI(KernelInfoGetAttribute_int64, AttrIntFn)(info, "perm_code", &code))) return st;
  PmKernel* k = (PmKernel*)calloc(1, sizeof(PmKernel));
  if (!k) return pfail("fracgraph Permute: out of memory");
  int64_t rank = 0;
  if ((st = PAPI(KernelInfoGetAttribute_int64, AttrIntFn)(info, "rank", &rank))) { free(k); return st; }
  if (rank < 1 || rank > PM_MAX_RANK) { free(k); return pfail("fracgraph Permute: rank must be 1..15"); }
  int seen[PM_MAX_RANK] = {0};
  for (int a = 0; a < rank; ++a) {
    k->perm[a] = (code >> (4 * a)) & 15;
    if (k->perm[a] >= rank || seen[k->perm[a]]) { free(k); return pfail("fracgraph Permute: perm_code is not a permutation"); }
    seen[k->perm[a]] = 1;
  }
  k->rank = (int)rank;
  *out = k;
  return NULL;
}
OrtStatus* fg_permute_register(void* domain, const void* api) {
  g_api_pm = (const OrtApi*)api;
  return fg_op_add(g_api_pm, domain, &g_pm_op, "Permute", 1, 1, 0, pm_create, fg_op_free, pm_compute);
}
