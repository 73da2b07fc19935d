/* CachedAttention (domain "edgesplit"): grouped-query attention over a KV cache that is appended in
 * place, with interleaved rotary embeddings; the subset of onnxruntime's GroupQueryAttention the
 * segment graph uses (runtime/graph.py), for an f32 or an f16 cache (two kernels of one name).
 *
 *   inputs  QKV f32 (B, S, (H + 2 Hkv) D): each row's queries, then keys, then values (as
 *           GroupQueryAttention's packed form); PAST_KEY, PAST_VALUE f32 or f16 (B, Hkv, M, D);
 *           SEQLENS_K int32 (B,): session b's past + S - 1; TOTAL_SEQ_LEN int32 (): the longest past_b + S (checked);
 *           COS, SIN f32 (M', D/2), M' >= M: the rotary tables by position
 *   outputs ATTN f32 (B, S, H D); PRESENT_KEY, PRESENT_VALUE (PAST's type and shape): PAST with the
 *           S new positions written at past_b .. past_b + S - 1. Bound to the same buffers as PAST
 *           (the engine's IO binding), nothing else is copied; otherwise PAST is copied first.
 *           The buffers are this operator's own: each (b, kv head) block of K is stored transposed
 *           in tiles of 32 positions, (M/32, D, 32), so that a query meets 16 positions in one
 *           vector and positions fill pages in order; V is stored as declared.
 *   attributes num_heads H, kv_num_heads Hkv (H a multiple of Hkv)
 *
 * Row s of session b sits at position p = past_b + s (past_b = SEQLENS_K[b] + 1 - S) and attends to
 * positions [0, p], scaled by 1/sqrt(D). Rotation of each pair (x[2i], x[2i+1]) by angle i at p.
 *
 * Why: a one-token step's attention is bound by reading the cache (~300 KB a layer at 200
 * positions in f32). onnxruntime's GroupQueryAttention took ~2x that time on this 2-core machine
 * and, with an f16 cache, more than with f32 (it converts). Here a task is one query head of one
 * session: scores 16 positions a vector from the transposed K, a softmax with a polynomial exp on
 * vectors, the weighted sum of V's rows in registers; a prefill takes 8 query rows a pass so that
 * each K and V load serves 8 rows. f16 elements are converted as they are loaded.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "attention_math.h"
#include "ort_ops.h"

static const char *NAME = "CachedAttention";

typedef struct {
    int64_t heads, kv_heads;
    int f16;  /* the cache's element type: 0 f32, 1 f16 */
} Kernel;

/* input i: checked to have `nd` dims (`dims` filled), its data into *data */
static OrtStatus *input(OrtKernelContext *ctx, size_t i, size_t nd, int64_t *dims, const void **data) {
    const OrtValue *v;
    size_t n;
    CHECK(op_input_dims(ctx, NAME, i, &v, dims, &n));
    if (n != nd) {
        char msg[160], ds[80];
        op_dims_text(dims, n, ds, sizeof ds);
        snprintf(msg, sizeof msg, "%s: input %zu has shape %s, expected %zu dimensions", NAME, i, ds, nd);
        return op_fail(msg);
    }
    return g_api->GetTensorMutableData((OrtValue *)v, (void **)data);
}

/* the shapes of every input against H, Hkv and each other, into j */
static OrtStatus *shapes(OrtKernelContext *ctx, const Kernel *k, Job *j, const int32_t **seqlens, int32_t *total,
                         int64_t *dk) {
    int64_t dq[4], dv[4], ds[4], dt[4], dc[4], dn[4];
    const void *pv, *ps, *pt, *pc, *pn;
    CHECK(input(ctx, 0, 3, dq, (const void **)&j->qkv));
    CHECK(input(ctx, 1, 4, dk, &pv));
    CHECK(input(ctx, 2, 4, dv, &pv));
    CHECK(input(ctx, 3, 1, ds, &ps));
    CHECK(input(ctx, 4, 0, dt, &pt));
    CHECK(input(ctx, 5, 2, dc, &pc));
    CHECK(input(ctx, 6, 2, dn, &pn));
    const int64_t D = dk[3], H = k->heads, Hkv = k->kv_heads;
    char msg[480];
    if (dq[0] != dk[0] || dq[0] != ds[0] || dk[1] != Hkv || D < 2 || D % 2 || D > MAX_HEAD_DIM
        || dq[2] != (H + 2 * Hkv) * D || memcmp(dk, dv, 4 * sizeof *dk) || dc[0] < dk[2] || dc[1] != D / 2
        || memcmp(dc, dn, 2 * sizeof *dc)) {
        char a[80], b[80], c[80];
        op_dims_text(dq, 3, a, sizeof a);
        op_dims_text(dk, 4, b, sizeof b);
        op_dims_text(dc, 2, c, sizeof c);
        snprintf(msg, sizeof msg, "%s: QKV %s, PAST %s, COS %s do not match QKV (B, S, (H + 2 Hkv) D), PAST "
                 "(B, Hkv, M, D), COS and SIN (>= M, D/2) with H=%lld, Hkv=%lld, D even <= %d, SEQLENS_K (B,)",
                 NAME, a, b, c, (long long)H, (long long)Hkv, MAX_HEAD_DIM);
        return op_fail(msg);
    }
    *j = (Job){.qkv = j->qkv, .cos = pc, .sin = pn, .B = (size_t)dq[0], .S = (size_t)dq[1], .H = (size_t)H,
               .Hkv = (size_t)Hkv, .M = (size_t)dk[2], .D = (size_t)D, .half = (size_t)D / 2,
               .scale = 1.0f / sqrtf((float)D), .f16 = k->f16};
    *seqlens = ps;
    *total = *(const int32_t *)pt;
    return NULL;
}

/* the present outputs; PAST copied into them where they are other buffers */
static OrtStatus *present(OrtKernelContext *ctx, Job *j, const int64_t *dk) {
    for (size_t i = 0; i < 2; i++) {
        const OrtValue *vin;
        OrtValue *vout;
        const void *past;
        void *pres;
        CHECK(g_api->KernelContext_GetInput(ctx, 1 + i, &vin));
        CHECK(g_api->GetTensorMutableData((OrtValue *)vin, (void **)&past));
        CHECK(g_api->KernelContext_GetOutput(ctx, 1 + i, dk, 4, &vout));
        CHECK(g_api->GetTensorMutableData(vout, (void **)&pres));
        if (pres != past) memcpy(pres, past, (size_t)(dk[0] * dk[1] * dk[2] * dk[3]) * (j->f16 ? 2 : 4));
        *(i ? &j->v : &j->k) = pres;
    }
    return NULL;
}

/* each session's past length into past (B,), checked: its rows' positions inside the cache, and
 * TOTAL_SEQ_LEN the longest past + S */
static OrtStatus *positions(const Job *j, const int32_t *seqlens, int32_t total, int32_t *past) {
    char msg[200];
    int32_t longest = 0;
    for (size_t b = 0; b < j->B; b++) {
        past[b] = seqlens[b] + 1 - (int32_t)j->S;
        if (past[b] < 0 || (size_t)seqlens[b] >= j->M) {
            snprintf(msg, sizeof msg, "%s: SEQLENS_K[%zu] = %d with S = %zu new rows: the positions must lie "
                     "in [0, M=%zu)", NAME, b, seqlens[b], j->S, j->M);
            return op_fail(msg);
        }
        longest = seqlens[b] + 1 > longest ? seqlens[b] + 1 : longest;
    }
    if (j->B && total != longest) {
        snprintf(msg, sizeof msg, "%s: TOTAL_SEQ_LEN = %d, the longest SEQLENS_K + 1 is %d", NAME, total, longest);
        return op_fail(msg);
    }
    return NULL;
}

static OrtStatus *ORT_API_CALL compute(void *kernel, OrtKernelContext *ctx) {
    const Kernel *k = (const Kernel *)kernel;
    Job j = {0};
    const int32_t *seqlens = NULL;
    int64_t dk[4];
    int32_t total = 0;
    CHECK(shapes(ctx, k, &j, &seqlens, &total, dk));
    OrtAllocator *a;
    CHECK(g_api->KernelContext_GetAllocator(ctx, g_cpu, &a));
    int32_t *past = NULL;
    OrtStatus *st = op_scratch(a, j.B * sizeof(int32_t), (void **)&past);
    if (st == NULL) st = positions(&j, seqlens, total, past);
    j.past = past;
    if (st == NULL) st = present(ctx, &j, dk);
    const int64_t dout[3] = {(int64_t)j.B, (int64_t)j.S, (int64_t)(j.H * j.D)};
    OrtValue *vout;
    if (st == NULL) st = g_api->KernelContext_GetOutput(ctx, 0, dout, 3, &vout);
    if (st == NULL) st = g_api->GetTensorMutableData(vout, (void **)&j.out);
    if (st == NULL && j.B * j.S > 0) {
        if (j.f16) append(&j, 1);
        else append(&j, 0);
        st = op_scratch(a, j.B * j.H * RB * (j.M + VL) * sizeof(float), (void **)&j.scores);
        if (st == NULL) st = g_api->KernelContext_ParallelFor(ctx, attend, j.B * j.H, 0, &j);
    }
    if (j.scores) a->Free(a, j.scores);
    if (past) a->Free(a, past);
    g_api->ReleaseAllocator(a);
    return st;
}

static OrtStatus *create(const OrtKernelInfo *info, int f16, void **kernel) {
    const int64_t h = op_attribute(info, "num_heads", 0), kv = op_attribute(info, "kv_num_heads", 0);
    if (h < 1 || kv < 1 || h % kv) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s: num_heads %lld must be a positive multiple of kv_num_heads %lld", NAME,
                 (long long)h, (long long)kv);
        return op_fail(msg);
    }
    const Kernel k = {.heads = h, .kv_heads = kv, .f16 = f16};
    return op_new_kernel(&k, sizeof k, kernel);
}
static OrtStatus *ORT_API_CALL create_f32(const OrtCustomOp *o, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)o; (void)api;
    return create(info, 0, kernel);
}
static OrtStatus *ORT_API_CALL create_f16(const OrtCustomOp *o, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)o; (void)api;
    return create(info, 1, kernel);
}

static const ONNXTensorElementDataType F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, F16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                                       I32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
static const char *ORT_API_CALL name(const OrtCustomOp *op) { (void)op; return NAME; }
static ONNXTensorElementDataType ORT_API_CALL input_f32(const OrtCustomOp *op, size_t i) {
    (void)op;
    return i == 3 || i == 4 ? I32 : F32;
}
static ONNXTensorElementDataType ORT_API_CALL input_f16(const OrtCustomOp *op, size_t i) {
    (void)op;
    return i == 3 || i == 4 ? I32 : i == 1 || i == 2 ? F16 : F32;
}
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) { (void)op; return 7; }
static ONNXTensorElementDataType ORT_API_CALL output_f32(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return F32; }
static ONNXTensorElementDataType ORT_API_CALL output_f16(const OrtCustomOp *op, size_t i) { (void)op; return i ? F16 : F32; }
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { (void)op; return 3; }

int attention_define(OrtCustomOp *op, int f16) {
#ifndef HAVE_F16
    if (f16) return 0;
#endif
    op_define_common(op);
    op->GetName = name;
    op->GetInputType = f16 ? input_f16 : input_f32;
    op->GetInputTypeCount = input_count;
    op->CreateKernelV2 = f16 ? create_f16 : create_f32;
    op->GetOutputType = f16 ? output_f16 : output_f32;
    op->GetOutputTypeCount = output_count;
    op->KernelComputeV2 = compute;
    return 1;
}
