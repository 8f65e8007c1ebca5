/* The onnxruntime C API subset that fracgraph's kernel sources use (fused_ops.c, int_gemm.c, gelu.c): only the C
 * API's stable parts, through a table of function-pointer slots of OrtApi version 17 (the slot numbers are the
 * C API header's member order, which onnxruntime only ever appends to). Each source keeps its own static
 * pointer to the table (set in RegisterCustomOps). Part of the kernel cache key (kernels/__init__.py). */
#ifndef FRACGRAPH_ORT_ABI_H
#define FRACGRAPH_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

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

#endif
