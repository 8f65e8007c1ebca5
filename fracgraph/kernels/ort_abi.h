/* The onnxruntime C API subset that fracgraph's kernel sources use (fused_ops.c, int_gemm.c, gelu.c): only the C
 * API's stable parts, through a table of function-pointer slots of OrtApi version 17 (the slot numbers are the
 * C API header's member order, which onnxruntime only ever appends to). Each source keeps its own static
 * pointer to the table (set in RegisterCustomOps). Part of the kernel cache key (kernels/__init__.py).
 * Below the ABI: FgOp, the description and shared callbacks of a float-in, float-out op of fixed arity, and the
 * input prologue such ops share (gelu.c, clip_grad.c, hard_act.c, dw_convt.c). */
#ifndef FRACGRAPH_ORT_ABI_H
#define FRACGRAPH_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct OrtStatus OrtStatus;
typedef void OrtApiSlot;
typedef struct { OrtApiSlot* slot[275]; } OrtApi;
typedef struct {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

/* OrtApi slot numbers (member order of struct OrtApi in onnxruntime_c_api.h) */
enum {
  S_CreateStatus = 0, S_CreateCustomOpDomain = 26, S_CustomOpDomain_Add = 27, S_AddCustomOpDomain = 28,
  S_GetTensorMutableData = 51, S_GetTensorShapeElementCount = 64, S_GetTensorTypeAndShape = 65,
  S_KernelInfoGetAttribute_float = 85, S_KernelInfoGetAttribute_int64 = 86, S_KernelContext_GetInput = 90,
  S_KernelContext_GetOutput = 91, S_ReleaseStatus = 93, S_ReleaseTensorTypeAndShapeInfo = 99, S_GetDimensionsCount = 61,
  S_GetDimensions = 62, S_KernelContext_ParallelFor = 274,
};
#define API_VERSION 17
#define ORT_FAIL 1
#define FLOAT_T 1
#define INT64_T 7

typedef OrtStatus* (*CreateStatusFn)(int, const char*);
typedef OrtStatus* (*CreateDomainFn)(const char*, void**);
typedef OrtStatus* (*DomainAddFn)(void*, const void*);
typedef OrtStatus* (*AddDomainFn)(void*, void*);
typedef OrtStatus* (*GetDataFn)(void*, void**);
typedef OrtStatus* (*ElemCountFn)(const void*, size_t*);
typedef OrtStatus* (*TypeShapeFn)(const void*, void**);
typedef OrtStatus* (*AttrFloatFn)(const void*, const char*, float*);
typedef OrtStatus* (*AttrIntFn)(const void*, const char*, int64_t*);
typedef OrtStatus* (*GetInputFn)(const void*, size_t, const void**);
typedef OrtStatus* (*GetOutputFn)(void*, size_t, const int64_t*, size_t, void**);
typedef void (*ReleaseFn)(void*);
typedef OrtStatus* (*DimCountFn)(const void*, size_t*);
typedef OrtStatus* (*DimsFn)(const void*, int64_t*, size_t);
typedef OrtStatus* (*ParallelForFn)(const void*, void (*)(void*, size_t), size_t, size_t, void*);

/* The op description read by onnxruntime (struct OrtCustomOp, version 16 fields). */
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


/* ---- float ops of fixed arity ---------------------------------------------------------------------------- */
typedef OrtStatus* (*FgCreateFn)(const struct OrtCustomOp*, const OrtApi*, const void*, void**);
typedef OrtStatus* (*FgComputeFn)(void*, void*);

typedef struct {
  OrtCustomOp op;   /* first: onnxruntime hands &op to the callbacks, which read the fields below through it */
  const char* name;
  size_t n_in, n_out;
  int tag;          /* the source's own variant number (e.g. HardAct 0, HardActGrad 1) */
} FgOp;

static inline const char* fg_op_name(const OrtCustomOp* op) { return ((const FgOp*)op)->name; }
static inline const char* fg_op_provider(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static inline int fg_op_float(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return FLOAT_T; }
static inline size_t fg_op_n_in(const OrtCustomOp* op) { return ((const FgOp*)op)->n_in; }
static inline size_t fg_op_n_out(const OrtCustomOp* op) { return ((const FgOp*)op)->n_out; }
static inline int fg_op_zero(const OrtCustomOp* op, size_t i) { (void)op, (void)i; return 0; }
static inline int fg_op_one(const OrtCustomOp* op) { (void)op; return 1; }
static inline void fg_op_free(void* kernel) { free(kernel); }
static inline void fg_op_keep(void* kernel) { (void)kernel; }
/* The create function of a stateless op: the kernel handle is the op itself and is never dereferenced. */
static inline OrtStatus* fg_op_stateless(const OrtCustomOp* op, const OrtApi* api, const void* info, void** out) {
  (void)api, (void)info;
  *out = (void*)op;
  return NULL;
}

/* Fill `d` (a static FgOp) and add it to the domain. destroy: fg_op_free for a calloc'ed kernel, fg_op_keep
 * with fg_op_stateless. */
static inline OrtStatus* fg_op_add(const OrtApi* api, void* domain, FgOp* d, const char* name, size_t n_in,
                                   size_t n_out, int tag, FgCreateFn create, void (*destroy)(void*),
                                   FgComputeFn compute) {
  OrtCustomOp* op = &d->op;
  memset(d, 0, sizeof *d);
  d->name = name, d->n_in = n_in, d->n_out = n_out, d->tag = tag;
  op->version = 16;
  op->GetName = fg_op_name;
  op->GetExecutionProviderType = fg_op_provider;
  op->GetInputType = fg_op_float;
  op->GetInputTypeCount = fg_op_n_in;
  op->GetOutputType = fg_op_float;
  op->GetOutputTypeCount = fg_op_n_out;
  op->KernelDestroy = destroy;
  op->GetInputCharacteristic = fg_op_zero;
  op->GetOutputCharacteristic = fg_op_zero;
  op->GetInputMemoryType = fg_op_zero;
  op->GetVariadicInputMinArity = fg_op_one;
  op->GetVariadicInputHomogeneity = fg_op_one;
  op->GetVariadicOutputMinArity = fg_op_one;
  op->GetVariadicOutputHomogeneity = fg_op_one;
  op->CreateKernelV2 = create;
  op->KernelComputeV2 = compute;
  return ((DomainAddFn)api->slot[S_CustomOpDomain_Add])(domain, op);
}

/* Input `index` of a kernel context: its float data, dims (rank <= 16, else the error `too_high`) and, when
 * `count` is not NULL, its element count. */
static inline OrtStatus* fg_float_input(const OrtApi* api, void* ctx, size_t index, const char* too_high,
                                        const float** data, int64_t* dims, size_t* rank, size_t* count) {
#define FG_API(name, type) ((type)api->slot[S_##name])
  const void* v;
  void* info;
  OrtStatus* st;
  if ((st = FG_API(KernelContext_GetInput, GetInputFn)(ctx, index, &v))) return st;
  if ((st = FG_API(GetTensorTypeAndShape, TypeShapeFn)(v, &info))) return st;
  if (!(st = FG_API(GetDimensionsCount, DimCountFn)(info, rank))) {
    if (*rank > 16) st = FG_API(CreateStatus, CreateStatusFn)(ORT_FAIL, too_high);
    else if (!(st = FG_API(GetDimensions, DimsFn)(info, dims, *rank)) && count)
      st = FG_API(GetTensorShapeElementCount, ElemCountFn)(info, count);
  }
  FG_API(ReleaseTensorTypeAndShapeInfo, ReleaseFn)(info);
  if (st) return st;
  return FG_API(GetTensorMutableData, GetDataFn)((void*)v, (void**)data);
#undef FG_API
}

#endif
