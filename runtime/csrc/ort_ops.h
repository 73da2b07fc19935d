/* What edgesplit's operators share (defined in linear_ops.c, which registers them all): the
 * onnxruntime API, the CPU arena, error statuses, shape and attribute reading, and the parts of
 * an OrtCustomOp every operator fills the same way. */
#ifndef EDGESPLIT_ORT_OPS_H
#define EDGESPLIT_ORT_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "onnxruntime_c_api.h"

extern const OrtApi *g_api;
extern OrtMemoryInfo *g_cpu;  /* onnxruntime's CPU arena: scratch buffers come from it, reused across calls */

#define CHECK(expr) do { OrtStatus *st_ = (expr); if (st_) return st_; } while (0)

/* an ORT_INVALID_ARGUMENT status with `msg` */
OrtStatus *op_fail(const char *msg);
/* the dims of input i (at most 4) into dims, their count into nd; `op` names the operator in errors */
OrtStatus *op_input_dims(OrtKernelContext *ctx, const char *op, size_t i, const OrtValue **v, int64_t *dims, size_t *nd);
/* "(d0, d1, ...)" of n dims into out */
void op_dims_text(const int64_t *d, size_t n, char *out, size_t size);
/* an int64 attribute, `dflt` where it is absent */
int64_t op_attribute(const OrtKernelInfo *info, const char *name, int64_t dflt);
/* `bytes` of the arena `a` into *p (64-byte aligned, as onnxruntime's CPU allocator aligns) */
OrtStatus *op_scratch(OrtAllocator *a, size_t bytes, void **p);
/* the fields every operator shares: CPU, version range, every input and output required (an
 * operator with optional inputs sets its own GetInputCharacteristic), no aliasing, and a kernel
 * state freed with free() (made by op_new_kernel) */
void op_define_common(OrtCustomOp *op);
/* a kernel state: a malloc'd copy of the `size` bytes at `value` into *kernel */
OrtStatus *op_new_kernel(const void *value, size_t size, void **kernel);

/* CachedAttention (attention_op.c) into op, its kernel for an f32 (f16 = 0) or an f16 cache;
 * 0 where this build has no f16 kernel */
int attention_define(OrtCustomOp *op, int f16);

#endif
