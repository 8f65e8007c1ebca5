/* fracgraph's integer convolution: a quantized conv's forward GEMM on 8-bit codes with int32 accumulation.
 *
 * Compiled into the same library as fused_ops.c (fracgraph/kernels/__init__.py); fused_ops.c's RegisterCustomOps
 * calls fg_int_gemm_register to add this file's op to the domain "ai.fracgraph":
 *
 *   IntConv(x, x_min, x_scale, w, w_min, w_scale) -> y     attributes kh, kw, sh, sw, ph, pw, dh, dw (group 1)
 *
 * x is an activation fake-quantized per tensor (x = s_x q_x + m_x, codes q_x in [0, 255]), w a weight
 * fake-quantized per output channel (w[k] = s_w[k] q_w + m_w[k]); both arrive as the float tensors the fake-quant
 * step computes (the backward reads them too), and the codes are recovered as round((v - m) / s), clamped to
 * [0, 255]. Over the taps inside the image (zero padding is a real 0, not a code):
 *
 *   y[n,k,p] = s_x s_w[k] A + s_x m_w[k] Sx[n,p] + m_x s_w[k] Sw[k,p] + m_x m_w[k] C T[p]
 *
 * with A = sum q_x q_w (exact, int32), Sx = the window sum of q_x, Sw = the sum of q_w over the taps that fall
 * inside the image at p, T = the number of such taps. The integer sum runs with the weights offset to signed
 * bytes (q_w - 128) and the codes unsigned (pads are code 0): acc = A - 128 Sx, A = acc + 128 Sx in int32
 * (exact; rescaling acc and 128 Sx separately would cancel large float terms at few bits), and
 *
 *   y = a_k A + b_k Sx + t[p,k],  a_k = s_x s_w[k],  b_k = s_x m_w[k],
 *       t[p,k] = m_x s_w[k] Sw[k,p] + m_x m_w[k] C T[p]   (per call, in double)
 *
 * Three paths for the integer sum, picked at run time by FRACGRAPH_INT_ISA (auto | vnni | avx2 | scalar; auto =
 * the best one compiled for this CPU; asking for one not compiled fails in one line):
 *   vnni   AVX-512 VNNI vpdpbusd: 16 output channels x 4 input channels per instruction, 8 positions per tile;
 *   avx2   vpmaddwd on 16-bit codes: 8 output channels x 2 input channels (vpmaddubsw would saturate);
 *   scalar plain int32 loops.
 * Images are the parallel tasks; each packs its codes into a zero-padded NHWC buffer (channels padded to 4).
 */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The ORT C API subset (the same slot table as fused_ops.c; see its header for why slots). */
typedef struct OrtStatus OrtStatus;
typedef struct { void* slot[275]; } OrtApi;
enum {
  S_CreateStatus = 0, S_CustomOpDomain_Add = 27, S_GetTensorMutableData = 51, S_GetDimensionsCount = 61,
  S_GetDimensions = 62, S_GetTensorShapeElementCount = 64, S_GetTensorTypeAndShape = 65,
  S_KernelInfoGetAttribute_int64 = 86, S_KernelContext_GetInput = 90, S_KernelContext_GetOutput = 91,
  S_ReleaseTensorTypeAndShapeInfo = 99, S_KernelContext_ParallelFor = 274,
};
typedef OrtStatus* (*CreateStatusFn)(int, const char*);
typedef OrtStatus* (*DomainAddFn)(void*, const void*);
typedef OrtStatus* (*GetDataFn)(void*, void**);
typedef OrtStatus* (*ElemCountFn)(const void*, size_t*);
typedef OrtStatus* (*TypeShapeFn)(const void*, void**);
typedef OrtStatus* (*AttrIntFn)(const void*, const char*, int64_t*);
typedef OrtStatus* (*GetInputFn)(const void*, size_t, const void**);
typedef OrtStatus* (*GetOutputFn)(void*, size_t, const int64_t*, size_t, void**);
typedef void (*ReleaseFn)(void*);
typedef OrtStatus* (*DimCountFn)(const void*, size_t*);
typedef OrtStatus* (*DimsFn)(const void*, int64_t*, size_t);
typedef OrtStatus* (*ParallelForFn)(const void*, void (*)(void*, size_t), size_t, size_t, void*);
static const OrtApi* i_api;
#define IAPI(name, type) ((type)i_api->slot[S_##name])

typedef struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const struct OrtCustomOp*, const OrtApi*, const void*);
  const char* (*GetName)(const struct OrtCustomOp*);
  const char* (*GetExecutionProviderType)(const struct OrtCustomOp*);
  int (*GetInputType)(const struct OrtCustomOp*, size_t);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp*);
  int (*GetOutputType)(const struct OrtCustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp*);
  void (*KernelCompute)(void*, void*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const struct OrtCustomOp*, size_t);
  int (*GetOutputCharacteristic)(const struct OrtCustomOp*, size_t);
  int (*GetInputMemoryType)(const struct OrtCustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp*);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp*);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp*);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp*);
  OrtStatus* (*CreateKernelV2)(const struct OrtCustomOp*, const OrtApi*, const void*, void**);
  OrtStatus* (*KernelComputeV2)(void*, void*);
  void* tail[16];   /* later fields, unread at version 16 */
} OrtCustomOp;

static OrtStatus* ifail(const char* msg) { return IAPI(CreateStatus, CreateStatusFn)(1, msg); }

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };
#define TILE 8   /* output positions per register tile */

/* which paths this build has (the library is compiled with -march=native for the machine that runs it) */
int fg_int_isa_available(int isa) {
  if (isa == ISA_SCALAR) return 1;
#if defined(__AVX2__)
  if (isa == ISA_AVX2) return 1;
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (isa == ISA_VNNI) return 1;
#endif
  return 0;
}

/* FRACGRAPH_INT_ISA -> path, or -1 when it names one this build lacks (or an unknown word) */
static int chosen_isa(void) {
  const char* e = getenv("FRACGRAPH_INT_ISA");
  if (!e || !*e || !strcmp(e, "auto"))
    return fg_int_isa_available(ISA_VNNI) ? ISA_VNNI : fg_int_isa_available(ISA_AVX2) ? ISA_AVX2 : ISA_SCALAR;
  int isa = !strcmp(e, "vnni") ? ISA_VNNI : !strcmp(e, "avx2") ? ISA_AVX2 : !strcmp(e, "scalar") ? ISA_SCALAR : -1;
  return isa >= 0 && fg_int_isa_available(isa) ? isa : -1;
}

typedef struct {
  int64_t conv[8];   /* kh, kw, sh, sw, ph, pw, dh, dw */
} IKernel;

typedef struct {
  int isa;
  const float* x;
  float* y;
  float mx, sx;
  int64_t N, C, H, W, K, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t Cp, Hp, Wp, Kb, lanes, P, taps;
  const void* wpack;       /* packed signed weights (layout per path) */
  const float* a;          /* [Kb]: s_x s_w[k] */
  const float* b;          /* [Kb]: s_x m_w[k] */
  const float* t;          /* [Kb][P]: m_x s_w[k] Sw[k,p] + m_x m_w[k] C T[p] */
  const int64_t* tap_off;  /* [taps]: element offset of each tap in the padded NHWC image */
  const int64_t* pos_off;  /* [P]: element offset of each output position's window origin */
  const int64_t* tap_pix;  /* the same two in pixels (for the window sums of the codes) */
  const int64_t* pos_pix;
  int failed;              /* an image's scratch could not be allocated */
  size_t scratch_bytes;
} IJob;

/* the code of a fake-quantized value v = s q + m: (v - m) / s is q up to a few ulps (far from the 0.5 that would
 * round elsewhere while |m| / s < 2^20), so multiplying by 1 / s is as good as dividing */
static inline uint8_t code_of(float v, float m, float inv_s) {
  float u = nearbyintf((v - m) * inv_s);
  return (uint8_t)(u < 0.0f ? 0.0f : u > 255.0f ? 255.0f : u);
}

/* A tile of TILE positions [p0, p0 + TILE) (the last tile repeats its last position) and one block of `lanes`
 * output channels: acc[j][l] = sum_{tap, c} xpad[pos_off[p_j] + tap_off[tap] + c] * wq[kb*lanes + l][tap][c] */
static void tile_scalar(const IJob* j, const uint8_t* xp, const int8_t* wp, const int64_t* po, int64_t kb, int32_t* acc) {
  const int64_t L = j->lanes, Cp = j->Cp;
  for (int t = 0; t < TILE; ++t)
    for (int64_t l = 0; l < L; ++l) {
      const int8_t* w = wp + (size_t)(kb * L + l) * j->taps * Cp;
      int32_t s = 0;
      for (int64_t tap = 0; tap < j->taps; ++tap) {
        const uint8_t* xr = xp + po[t] + j->tap_off[tap];
        const int8_t* wr = w + tap * Cp;
        for (int64_t c = 0; c < Cp; ++c) s += (int32_t)xr[c] * (int32_t)wr[c];
      }
      acc[t * L + l] = s;
    }
}

#if defined(__AVX2__)
/* x as 16-bit codes; weights [Kb/8][taps][Cp/2][8 lanes][2 channels] int16 */
__attribute__((target("avx2")))
static void tile_avx2(const IJob* j, const uint16_t* xp, const int16_t* wp, const int64_t* po, int64_t kb, int32_t* acc) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const int64_t c2n = j->Cp / 2;
  const int16_t* w = wp + (size_t)kb * j->taps * c2n * 16;
  for (int64_t tap = 0; tap < j->taps; ++tap) {
    const int64_t to = j->tap_off[tap];
    const uint16_t *x0 = xp + po[0] + to, *x1 = xp + po[1] + to, *x2 = xp + po[2] + to, *x3 = xp + po[3] + to;
    const uint16_t *x4 = xp + po[4] + to, *x5 = xp + po[5] + to, *x6 = xp + po[6] + to, *x7 = xp + po[7] + to;
    for (int64_t c2 = 0; c2 < c2n; ++c2, w += 16) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)w);
      int32_t v;
#define STEP(A, X) memcpy(&v, X + 2 * c2, 4); A = _mm256_add_epi32(A, _mm256_madd_epi16(_mm256_set1_epi32(v), wv));
      STEP(a0, x0) STEP(a1, x1) STEP(a2, x2) STEP(a3, x3) STEP(a4, x4) STEP(a5, x5) STEP(a6, x6) STEP(a7, x7)
#undef STEP
    }
  }
  _mm256_storeu_si256((__m256i*)(acc + 0), a0); _mm256_storeu_si256((__m256i*)(acc + 8), a1);
  _mm256_storeu_si256((__m256i*)(acc + 16), a2); _mm256_storeu_si256((__m256i*)(acc + 24), a3);
  _mm256_storeu_si256((__m256i*)(acc + 32), a4); _mm256_storeu_si256((__m256i*)(acc + 40), a5);
  _mm256_storeu_si256((__m256i*)(acc + 48), a6); _mm256_storeu_si256((__m256i*)(acc + 56), a7);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* x as 8-bit codes; weights [Kb/16][taps][Cp/4][16 lanes][4 channels] int8 */
static void tile_vnni(const IJob* j, const uint8_t* xp, const int8_t* wp, const int64_t* po, int64_t kb, int32_t* acc) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const int64_t c4n = j->Cp / 4;
  const int8_t* w = wp + (size_t)kb * j->taps * c4n * 64;
  for (int64_t tap = 0; tap < j->taps; ++tap) {
    const int64_t to = j->tap_off[tap];
    const uint8_t *x0 = xp + po[0] + to, *x1 = xp + po[1] + to, *x2 = xp + po[2] + to, *x3 = xp + po[3] + to;
    const uint8_t *x4 = xp + po[4] + to, *x5 = xp + po[5] + to, *x6 = xp + po[6] + to, *x7 = xp + po[7] + to;
    for (int64_t c4 = 0; c4 < c4n; ++c4, w += 64) {
      const __m512i wv = _mm512_loadu_si512((const void*)w);
      int32_t v;
#define STEP(A, X) memcpy(&v, X + 4 * c4, 4); A = _mm512_dpbusd_epi32(A, _mm512_set1_epi32(v), wv);
      STEP(a0, x0) STEP(a1, x1) STEP(a2, x2) STEP(a3, x3) STEP(a4, x4) STEP(a5, x5) STEP(a6, x6) STEP(a7, x7)
#undef STEP
    }
  }
  _mm512_storeu_si512(acc + 0, a0); _mm512_storeu_si512(acc + 16, a1); _mm512_storeu_si512(acc + 32, a2);
  _mm512_storeu_si512(acc + 48, a3); _mm512_storeu_si512(acc + 64, a4); _mm512_storeu_si512(acc + 80, a5);
  _mm512_storeu_si512(acc + 96, a6); _mm512_storeu_si512(acc + 112, a7);
}
#endif

/* one image: pack codes, window sums, every tile and channel block, rescale into y[n] (NCHW) */
static void conv_image(void* p, size_t n) {
  const IJob* j = (const IJob*)p;
  const int64_t C = j->C, H = j->H, W = j->W, Cp = j->Cp, Hp = j->Hp, Wp = j->Wp, P = j->P, L = j->lanes;
  const size_t img = (size_t)(Hp * Wp * Cp);
  const int wide = j->isa == ISA_AVX2;
  char* buf = (char*)calloc(1, img * (wide ? 2 : 1) + (size_t)(Hp * Wp) * sizeof(int32_t) + (size_t)P * sizeof(int32_t)
                                   + TILE * 16 * sizeof(int32_t) + 64);
  if (!buf) { ((IJob*)p)->failed = 1; return; }
  uint8_t* xp8 = (uint8_t*)buf;
  uint16_t* xp16 = (uint16_t*)buf;
  int32_t* colsum = (int32_t*)(buf + img * (wide ? 2 : 1));
  int32_t* sx = colsum + Hp * Wp;
  int32_t* acc = (int32_t*)(((uintptr_t)(sx + P) + 63) & ~(uintptr_t)63);
  const float* x = j->x + (size_t)n * C * H * W;
  const float mx = j->mx, inv = 1.0f / j->sx;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const uint8_t q = code_of(x[(c * H + h) * W + w], mx, inv);
        const size_t at = (size_t)(((h + j->ph) * Wp + w + j->pw) * Cp + c);
        if (wide) xp16[at] = q; else xp8[at] = q;
        colsum[(h + j->ph) * Wp + w + j->pw] += q;
      }
  for (int64_t q = 0; q < P; ++q) {   /* window sums of the codes (pads are 0) */
    int32_t acc_s = 0;
    for (int64_t tap = 0; tap < j->taps; ++tap) acc_s += colsum[j->pos_pix[q] + j->tap_pix[tap]];
    sx[q] = acc_s;
  }
  float* y = j->y + (size_t)n * j->K * P;
  int64_t po[TILE];
  for (int64_t p0 = 0; p0 < P; p0 += TILE) {
    const int64_t m = P - p0 < TILE ? P - p0 : TILE;
    for (int t = 0; t < TILE; ++t) po[t] = j->pos_off[p0 + (t < m ? t : m - 1)];
    for (int64_t kb = 0; kb < j->Kb / L; ++kb) {
      switch (j->isa) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
        case ISA_VNNI: tile_vnni(j, xp8, (const int8_t*)j->wpack, po, kb, acc); break;
#endif
#if defined(__AVX2__)
        case ISA_AVX2: tile_avx2(j, xp16, (const int16_t*)j->wpack, po, kb, acc); break;
#endif
        default: tile_scalar(j, xp8, (const int8_t*)j->wpack, po, kb, acc); break;
      }
      for (int64_t l = 0; l < L; ++l) {
        const int64_t k = kb * L + l;
        if (k >= j->K) break;
        const float a = j->a[k], b = j->b[k];
        float* yk = y + (size_t)k * P + p0;
        const float* tk = j->t + (size_t)k * P;
        for (int64_t t = 0; t < m; ++t)
          yk[t] = a * (float)(acc[t * L + l] + 128 * sx[p0 + t]) + b * (float)sx[p0 + t] + tk[p0 + t];
      }
    }
  }
  free(buf);
}

static OrtStatus* in_shape(void* ctx, size_t i, const float** data, int64_t* dims, size_t* rank, size_t* count) {
  const void* v;
  void* info;
  OrtStatus* st;
  if ((st = IAPI(KernelContext_GetInput, GetInputFn)(ctx, i, &v))) return st;
  if ((st = IAPI(GetTensorTypeAndShape, TypeShapeFn)(v, &info))) return st;
  if (!(st = IAPI(GetDimensionsCount, DimCountFn)(info, rank))) {
    if (*rank > 8) st = ifail("fracgraph IntConv: tensors above rank 8 are not supported");
    else if (!(st = IAPI(GetDimensions, DimsFn)(info, dims, *rank)))
      st = IAPI(GetTensorShapeElementCount, ElemCountFn)(info, count);
  }
  IAPI(ReleaseTensorTypeAndShapeInfo, ReleaseFn)(info);
  if (!st) st = IAPI(GetTensorMutableData, GetDataFn)((void*)v, (void**)data);
  return st;
}

static OrtStatus* compute_int_conv(void* kernel, void* ctx) {
  IKernel* kern = (IKernel*)kernel;
  int64_t xd[8], wd[8], d[8];
  size_t xr, wr, r, xn, wn, cnt;
  const float *x, *w, *mxp, *sxp, *mw, *sw;
  OrtStatus* st;
  IJob j;
  memset(&j, 0, sizeof j);
  if ((st = in_shape(ctx, 0, &x, xd, &xr, &xn)) || (st = in_shape(ctx, 3, &w, wd, &wr, &wn))) return st;
  if (xr != 4 || wr != 4 || xd[1] != wd[1]) return ifail("fracgraph IntConv: x must be [N, C, H, W] and w [K, C, kh, kw]");
  if ((st = in_shape(ctx, 1, &mxp, d, &r, &cnt))) return st;
  if (cnt != 1) return ifail("fracgraph IntConv: x_min must be a scalar");
  if ((st = in_shape(ctx, 2, &sxp, d, &r, &cnt))) return st;
  if (cnt != 1) return ifail("fracgraph IntConv: x_scale must be a scalar");
  if ((st = in_shape(ctx, 4, &mw, d, &r, &cnt))) return st;
  if ((int64_t)cnt != wd[0]) return ifail("fracgraph IntConv: w_min must hold one value per output channel");
  if ((st = in_shape(ctx, 5, &sw, d, &r, &cnt))) return st;
  if ((int64_t)cnt != wd[0]) return ifail("fracgraph IntConv: w_scale must hold one value per output channel");
  j.isa = chosen_isa();
  if (j.isa < 0) return ifail("fracgraph IntConv: FRACGRAPH_INT_ISA names a path this CPU's build lacks "
                              "(use auto, vnni, avx2 or scalar; vnni needs AVX-512 VNNI, avx2 needs AVX2)");
  j.N = xd[0], j.C = xd[1], j.H = xd[2], j.W = xd[3], j.K = wd[0];
  j.kh = kern->conv[0], j.kw = kern->conv[1], j.sh = kern->conv[2], j.sw = kern->conv[3];
  j.ph = kern->conv[4], j.pw = kern->conv[5], j.dh = kern->conv[6], j.dw = kern->conv[7];
  if (wd[2] != j.kh || wd[3] != j.kw || j.sh < 1 || j.sw < 1 || j.dh < 1 || j.dw < 1 || j.ph < 0 || j.pw < 0)
    return ifail("fracgraph IntConv: the weight's shape or the conv attributes do not match");
  j.Ho = (j.H + 2 * j.ph - (j.kh - 1) * j.dh - 1) / j.sh + 1;
  j.Wo = (j.W + 2 * j.pw - (j.kw - 1) * j.dw - 1) / j.sw + 1;
  if (j.Ho < 1 || j.Wo < 1) return ifail("fracgraph IntConv: the output would be empty");
  j.x = x, j.mx = *mxp, j.sx = *sxp;
  j.lanes = j.isa == ISA_VNNI ? 16 : j.isa == ISA_AVX2 ? 8 : 1;
  j.Kb = (j.K + j.lanes - 1) / j.lanes * j.lanes;
  j.Cp = (j.C + 3) / 4 * 4;
  j.Hp = j.H + 2 * j.ph, j.Wp = j.W + 2 * j.pw;   /* symmetric pads (the pass sends only those) */
  j.P = j.Ho * j.Wo;
  j.taps = j.kh * j.kw;
  const int64_t K = j.K, C = j.C, Kb = j.Kb, Cp = j.Cp, taps = j.taps, P = j.P, L = j.lanes;
  /* weight codes, their per-(k, tap) sums, the per-channel coefficients */
  uint8_t* qw = (uint8_t*)malloc((size_t)(K * C * taps));
  int32_t* wsum = (int32_t*)calloc((size_t)(K * taps), sizeof(int32_t));
  float* a = (float*)calloc((size_t)Kb, sizeof(float));
  float* b = (float*)calloc((size_t)Kb, sizeof(float));
  float* t = (float*)calloc((size_t)(P * Kb), sizeof(float));
  int64_t* tap_off = (int64_t*)malloc((size_t)taps * sizeof(int64_t));
  int64_t* pos_off = (int64_t*)malloc((size_t)P * sizeof(int64_t));
  int64_t* tap_pix = (int64_t*)malloc((size_t)taps * sizeof(int64_t));
  int64_t* pos_pix = (int64_t*)malloc((size_t)P * sizeof(int64_t));
  size_t wbytes = (size_t)(Kb * taps * Cp) * (j.isa == ISA_AVX2 ? 2 : 1);
  void* wpack = calloc(1, wbytes + 64);
  void* yv;
  int64_t yd[4] = {j.N, K, j.Ho, j.Wo};
  st = NULL;
  if (!qw || !wsum || !a || !b || !t || !tap_off || !pos_off || !tap_pix || !pos_pix || !wpack) { st = ifail("fracgraph IntConv: out of memory"); goto done; }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t tap = 0; tap < taps; ++tap) {
        const uint8_t q = code_of(w[(k * C + c) * taps + tap], mw[k], 1.0f / sw[k]);
        qw[(k * C + c) * taps + tap] = q;
        wsum[k * taps + tap] += q;
        const int8_t sq = (int8_t)((int)q - 128);
        if (j.isa == ISA_VNNI)
          ((int8_t*)wpack)[((((k / 16) * taps + tap) * (Cp / 4) + c / 4) * 16 + k % 16) * 4 + c % 4] = sq;
        else if (j.isa == ISA_AVX2)
          ((int16_t*)wpack)[((((k / 8) * taps + tap) * (Cp / 2) + c / 2) * 8 + k % 8) * 2 + c % 2] = sq;
        else
          ((int8_t*)wpack)[(k * taps + tap) * Cp + c] = sq;
      }
    a[k] = j.sx * sw[k];
    b[k] = j.sx * mw[k];
  }
  for (int64_t ta = 0; ta < j.kh; ++ta)
    for (int64_t tb = 0; tb < j.kw; ++tb) {
      tap_pix[ta * j.kw + tb] = ta * j.dh * j.Wp + tb * j.dw;
      tap_off[ta * j.kw + tb] = tap_pix[ta * j.kw + tb] * Cp;
    }
  for (int64_t ho = 0; ho < j.Ho; ++ho)
    for (int64_t wo = 0; wo < j.Wo; ++wo) {
      const int64_t q = ho * j.Wo + wo;
      pos_pix[q] = ho * j.sh * j.Wp + wo * j.sw;
      pos_off[q] = pos_pix[q] * Cp;
      /* taps inside the image at this position: Sw[k, p] and C T[p] */
      int64_t inside = 0;
      for (int64_t ta = 0; ta < j.kh; ++ta)
        for (int64_t tb = 0; tb < j.kw; ++tb) {
          const int64_t hi = ho * j.sh - j.ph + ta * j.dh, wi = wo * j.sw - j.pw + tb * j.dw;
          if (hi < 0 || hi >= j.H || wi < 0 || wi >= j.W) continue;
          ++inside;
          for (int64_t k = 0; k < K; ++k) t[k * P + q] += (float)wsum[k * taps + ta * j.kw + tb];
        }
      for (int64_t k = 0; k < K; ++k)
        t[k * P + q] = (float)((double)j.mx * sw[k] * t[k * P + q] + (double)j.mx * mw[k] * (double)(C * inside));
    }
  j.wpack = wpack, j.a = a, j.b = b, j.t = t, j.tap_off = tap_off, j.pos_off = pos_off, j.tap_pix = tap_pix, j.pos_pix = pos_pix;
  if ((st = IAPI(KernelContext_GetOutput, GetOutputFn)(ctx, 0, yd, 4, &yv))) goto done;
  if ((st = IAPI(GetTensorMutableData, GetDataFn)(yv, (void**)&j.y))) goto done;
  (void)L;
  if (j.N == 1) conv_image(&j, 0);
  else st = IAPI(KernelContext_ParallelFor, ParallelForFn)(ctx, conv_image, (size_t)j.N, 0, &j);
  if (!st && j.failed) st = ifail("fracgraph IntConv: out of memory");
done:
  free(qw); free(wsum); free(a); free(b); free(t); free(tap_off); free(pos_off); free(tap_pix); free(pos_pix); free(wpack);
  return st;
}

/* ---- registration ----------------------------------------------------------------------------------------- */
static const char* const I_ATTRS[8] = {"kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw"};

static OrtStatus* i_create(const OrtCustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)op, (void)api;
  IKernel* k = (IKernel*)calloc(1, sizeof(IKernel));
  OrtStatus* st;
  if (!k) return ifail("fracgraph IntConv: out of memory");
  for (int a = 0; a < 8; ++a)
    if ((st = IAPI(KernelInfoGetAttribute_int64, AttrIntFn)(info, I_ATTRS[a], &k->conv[a]))) { free(k); return st; }
  *out = k;
  return NULL;
}
static void i_destroy(void* k) { free(k); }
static const char* i_name(const OrtCustomOp* op) { (void)op; return "IntConv"; }
static const char* i_provider(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static int i_float(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return 1; }
static size_t i_n_in(const OrtCustomOp* op) { (void)op; return 6; }
static size_t i_n_out(const OrtCustomOp* op) { (void)op; return 1; }
static int i_zero(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static int i_one(const OrtCustomOp* op) { (void)op; return 1; }

static OrtCustomOp g_int_conv;

OrtStatus* fg_int_gemm_register(void* domain, const void* api) {
  i_api = (const OrtApi*)api;
  memset(&g_int_conv, 0, sizeof g_int_conv);
  g_int_conv.version = 16;
  g_int_conv.GetName = i_name;
  g_int_conv.GetExecutionProviderType = i_provider;
  g_int_conv.GetInputType = i_float;
  g_int_conv.GetInputTypeCount = i_n_in;
  g_int_conv.GetOutputType = i_float;
  g_int_conv.GetOutputTypeCount = i_n_out;
  g_int_conv.KernelDestroy = i_destroy;
  g_int_conv.GetInputCharacteristic = (int (*)(const struct OrtCustomOp*, size_t))i_zero;
  g_int_conv.GetOutputCharacteristic = (int (*)(const struct OrtCustomOp*, size_t))i_zero;
  g_int_conv.GetInputMemoryType = (int (*)(const struct OrtCustomOp*, size_t))i_zero;
  g_int_conv.GetVariadicInputMinArity = i_one;
  g_int_conv.GetVariadicInputHomogeneity = i_one;
  g_int_conv.GetVariadicOutputMinArity = i_one;
  g_int_conv.GetVariadicOutputHomogeneity = i_one;
  g_int_conv.CreateKernelV2 = i_create;
  g_int_conv.KernelComputeV2 = compute_int_conv;
  return IAPI(CustomOpDomain_Add, DomainAddFn)(domain, &g_int_conv);
}
