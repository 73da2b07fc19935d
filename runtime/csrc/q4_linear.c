/* An onnxruntime custom operator, edgesplit.Q4Linear: Y (T, N) = X (T, K) @ W^T for a weight in
 * the shard q4 layout (runtime/quant.py), the Q4_1 values as they are:
 *
 *   inputs  X f32 (T, K); QW uint8 (N, K/32, 16), element 2j of a block in the low nibble of byte j;
 *           SCALES f16 (N, K/32); MINS f16 (N, K/32); optional (level 4): OUTLIERS int64 (n,),
 *           input channels kept out of the int8 rounding, n <= 16, and OUTLIER_W f32 (N, n), their
 *           weights' SCALES * q
 *   output  Y f32 (T, N), Y[t, n] = sum_k X[t, k] * (SCALES[n, k/32] * q[n, k] + MINS[n, k/32])
 *   attribute accuracy_level: 0 = fp32 compute (exact), 4 = X rounded to int8 per block of 32, as
 *           MatMulNBits' level 4 rounds it (AVX-512 VNNI builds; elsewhere level 4 computes as 0)
 *
 * Why: onnxruntime's MatMulNBits has no Q4_1 form that is both exact and fast (its float zero
 * point path is 12-33x slower), so the engine ran MatMulNBits on d*(q-8) and added the minimums
 * with ~7 further nodes per projection. Here one node reads each weight byte once, straight from
 * the store's layout (no repacked copy: the weights stay the mapped file).
 *
 * Loop shape (q4_math.h): X is de-interleaved once per call (per block its 16 even, then its 16 odd elements:
 * the order the nibbles come in). Parallel tasks own ranges of outputs; a tile of NT outputs x RT
 * rows dequantizes each weight block once and meets every row of the tile with it. AVX-512 where
 * the build machine has it, else portable C loops the compiler vectorizes (-O3 -march=native).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"
#include "q4_math.h"

static const OrtApi *g_api;

#define CHECK(expr) do { OrtStatus *st_ = (expr); if (st_) return st_; } while (0)

static OrtStatus *fail(const char *msg) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg); }

/* the dims of input i into dims (at most 4), their count into nd */
static OrtStatus *input_dims(OrtKernelContext *ctx, size_t i, const OrtValue **v, int64_t *dims, size_t *nd) {
    OrtTensorTypeAndShapeInfo *info;
    CHECK(g_api->KernelContext_GetInput(ctx, i, v));
    CHECK(g_api->GetTensorTypeAndShape(*v, &info));
    OrtStatus *st = g_api->GetDimensionsCount(info, nd);
    if (!st && *nd <= 4) st = g_api->GetDimensions(info, dims, *nd);
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    if (!st && *nd > 4) return fail("Q4Linear: an input has more than 4 dimensions");
    return st;
}

/* The optional outlier inputs (4: channel indices, 5: (N, n) weights), used on the int8 path
 * only: the fp32 path is exact without them. */
static OrtStatus *outlier_inputs(OrtKernelContext *ctx, Job *j) {
    size_t count;
    CHECK(g_api->KernelContext_GetInputCount(ctx, &count));
    if (count < 6 || !j->int8) return NULL;
    const OrtValue *vi, *vw;
    CHECK(g_api->KernelContext_GetInput(ctx, 4, &vi));
    CHECK(g_api->KernelContext_GetInput(ctx, 5, &vw));
    if (vi == NULL || vw == NULL) return NULL;
    int64_t di[4], dw[4];
    size_t ni, nw;
    CHECK(input_dims(ctx, 4, &vi, di, &ni));
    CHECK(input_dims(ctx, 5, &vw, dw, &nw));
    char msg[200];
    if (ni != 1 || di[0] < 1 || di[0] > HALF || nw != 2 || dw[0] != (int64_t)j->N || dw[1] != di[0]) {
        snprintf(msg, sizeof msg, "Q4Linear: outliers (%lld) and their weights (%lld, %lld) must be (n,) and (N=%zu, n), "
                 "1 <= n <= %d", (long long)di[0], (long long)dw[0], (long long)(nw > 1 ? dw[1] : -1), j->N, HALF);
        return fail(msg);
    }
    CHECK(g_api->GetTensorMutableData((OrtValue *)vi, (void **)&j->oidx));
    CHECK(g_api->GetTensorMutableData((OrtValue *)vw, (void **)&j->ow));
    for (int64_t o = 0; o < di[0]; o++)
        if (j->oidx[o] < 0 || j->oidx[o] >= (int64_t)j->K) {
            snprintf(msg, sizeof msg, "Q4Linear: outlier channel %lld is outside [0, K=%zu)", (long long)j->oidx[o], j->K);
            return fail(msg);
        }
    j->n_out = (size_t)di[0];
    return NULL;
}

typedef struct {
    int64_t accuracy_level;  /* attribute: 0 fp32 compute (exact), 4 int8 activations (AVX-512 VNNI builds) */
    int64_t swiglu;          /* attribute: 1 = the weight is gate rows then up rows; Y = silu(gate) * up, (T, N/2) */
} Kernel;

/* X de-interleaved (per block its 16 even, then its 16 odd elements: the nibbles' order), the
 * outputs in parallel tasks and, with `glu`, the SwiGLU of gate and up into `out`; one exit frees
 * this call's buffers. */
static OrtStatus *run_job(OrtKernelContext *ctx, Job *j, const float *x, float *out, int glu) {
    float *xp = (float *)aligned_alloc(64, (j->T * j->K * sizeof(float) + 63) / 64 * 64);
    float *full = glu ? (float *)malloc(j->T * j->N * sizeof(float)) : NULL;  /* gate and up, (T, N) */
    void *qbuf = NULL;
    OrtStatus *st = NULL;
    if (xp == NULL || (glu && full == NULL)) {
        st = g_api->CreateStatus(ORT_FAIL, "Q4Linear: out of memory");
        goto done;
    }
    for (size_t t = 0; t < j->T; t++)
        for (size_t b = 0; b < j->nb; b++)
            for (int l = 0; l < HALF; l++) {
                xp[t * j->K + b * BLOCK + l] = x[t * j->K + b * BLOCK + 2 * l];
                xp[t * j->K + b * BLOCK + HALF + l] = x[t * j->K + b * BLOCK + 2 * l + 1];
            }
    j->xp = xp;
    j->y = glu ? full : out;
#ifdef HAVE_INT8
    if (j->int8 && (qbuf = quantize_rows(j, xp)) == NULL) {
        st = g_api->CreateStatus(ORT_FAIL, "Q4Linear: out of memory");
        goto done;
    }
#endif
    st = g_api->KernelContext_ParallelFor(ctx, run_task, (j->N + N_PER_TASK - 1) / N_PER_TASK, 0, j);
    if (st == NULL && glu) {
        Glu g = {.y = full, .out = out, .F = j->N / 2};
        st = g_api->KernelContext_ParallelFor(ctx, glu_row, j->T, 0, &g);
    }
done:
    free(qbuf);
    free(full);
    free(xp);
    return st;
}

static OrtStatus *ORT_API_CALL compute(void *kernel, OrtKernelContext *ctx) {
    const OrtValue *vx, *vq, *vs, *vm;
    int64_t dx[4], dq[4], ds[4], dm[4];
    size_t nx, nq, ns, nm;
    CHECK(input_dims(ctx, 0, &vx, dx, &nx));
    CHECK(input_dims(ctx, 1, &vq, dq, &nq));
    CHECK(input_dims(ctx, 2, &vs, ds, &ns));
    CHECK(input_dims(ctx, 3, &vm, dm, &nm));
    char msg[256];
    if (nx != 2 || nq != 3 || ns != 2 || nm != 2 || dq[2] != BLOCK / 2 || dx[1] != dq[1] * BLOCK
        || ds[0] != dq[0] || ds[1] != dq[1] || dm[0] != dq[0] || dm[1] != dq[1]) {
        snprintf(msg, sizeof msg, "Q4Linear: shapes X (%lld, %lld), QW (%lld, %lld, %lld) do not match "
                 "X (T, K), QW (N, K/32, 16), SCALES and MINS (N, K/32)",
                 (long long)dx[0], (long long)(nx > 1 ? dx[1] : -1), (long long)dq[0],
                 (long long)(nq > 1 ? dq[1] : -1), (long long)(nq > 2 ? dq[2] : -1));
        return fail(msg);
    }
    Job j = {.T = (size_t)dx[0], .K = (size_t)dx[1], .N = (size_t)dq[0], .nb = (size_t)dq[1]};
    j.ng = (j.nb + 3) / 4;
#ifdef HAVE_INT8
    j.int8 = ((const Kernel *)kernel)->accuracy_level == 4;
#else
    (void)kernel;
#endif
    CHECK(outlier_inputs(ctx, &j));
    const float *x;
    CHECK(g_api->GetTensorMutableData((OrtValue *)vx, (void **)&x));
    CHECK(g_api->GetTensorMutableData((OrtValue *)vq, (void **)&j.qw));
    CHECK(g_api->GetTensorMutableData((OrtValue *)vs, (void **)&j.s));
    CHECK(g_api->GetTensorMutableData((OrtValue *)vm, (void **)&j.m));
    const int glu = ((const Kernel *)kernel)->swiglu != 0;
    if (glu && j.N % 2 != 0) {
        snprintf(msg, sizeof msg, "Q4Linear: swiglu needs gate and up rows, an even N; got N=%zu", j.N);
        return fail(msg);
    }
    int64_t dy[2] = {dx[0], glu ? dq[0] / 2 : dq[0]};
    OrtValue *vy;
    float *out;
    CHECK(g_api->KernelContext_GetOutput(ctx, 0, dy, 2, &vy));
    CHECK(g_api->GetTensorMutableData(vy, (void **)&out));
    if (j.T == 0 || j.N == 0) return NULL;
    return run_job(ctx, &j, x, out, glu);
}

static OrtStatus *ORT_API_CALL create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op; (void)api;
    Kernel *k = (Kernel *)calloc(1, sizeof(Kernel));
    if (k == NULL) return g_api->CreateStatus(ORT_FAIL, "Q4Linear: out of memory");
    OrtStatus *st = g_api->KernelInfoGetAttribute_int64(info, "accuracy_level", &k->accuracy_level);
    if (st != NULL) {  /* absent: 0 */
        g_api->ReleaseStatus(st);
        k->accuracy_level = 0;
    }
    st = g_api->KernelInfoGetAttribute_int64(info, "swiglu", &k->swiglu);
    if (st != NULL) {  /* absent: 0 */
        g_api->ReleaseStatus(st);
        k->swiglu = 0;
    }
    if (k->accuracy_level != 0 && k->accuracy_level != 4) {
        char msg[128];
        snprintf(msg, sizeof msg, "Q4Linear: accuracy_level %lld is not 0 or 4", (long long)k->accuracy_level);
        free(k);
        return fail(msg);
    }
    *kernel = k;
    return NULL;
}

static void ORT_API_CALL destroy_kernel(void *kernel) { free(kernel); }
static const char *ORT_API_CALL op_name(const OrtCustomOp *op) { (void)op; return "Q4Linear"; }
static const char *ORT_API_CALL op_ep(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp *op, size_t i) {
    (void)op;
    static const ONNXTensorElementDataType types[6] = {
        ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
        ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
        ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    return types[i];
}
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) { (void)op; return 6; }
static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { (void)op; return 1; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return INPUT_OUTPUT_REQUIRED; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL optional_outliers(const OrtCustomOp *op, size_t i) {
    (void)op;
    return i < 4 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
static OrtMemType ORT_API_CALL mem_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return OrtMemTypeDefault; }
static int ORT_API_CALL one(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL zero(const OrtCustomOp *op) { (void)op; return 0; }
static int ORT_API_CALL max_version(const OrtCustomOp *op) { (void)op; return 0x7fffffff; }
static size_t ORT_API_CALL no_pairs(int **in, int **out) { *in = NULL; *out = NULL; return 0; }
static void ORT_API_CALL release_pairs(int *in, int *out) { (void)in; (void)out; }

static OrtCustomOp g_op;
static OrtCustomOpDomain *g_domain;  /* lives as long as the process: sessions refer to it */

OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    g_api = base->GetApi(ORT_API_VERSION);
    if (g_api == NULL) return NULL;  /* an onnxruntime older than these headers: it reports the op as unknown */
    if (g_domain == NULL) {
        memset(&g_op, 0, sizeof g_op);
        g_op.version = ORT_API_VERSION;
        g_op.GetName = op_name;
        g_op.GetExecutionProviderType = op_ep;
        g_op.GetInputType = input_type;
        g_op.GetInputTypeCount = input_count;
        g_op.GetOutputType = output_type;
        g_op.GetOutputTypeCount = output_count;
        g_op.KernelDestroy = destroy_kernel;
        g_op.GetInputCharacteristic = optional_outliers;
        g_op.GetOutputCharacteristic = required;
        g_op.GetInputMemoryType = mem_type;
        g_op.GetVariadicInputMinArity = one;
        g_op.GetVariadicInputHomogeneity = zero;
        g_op.GetVariadicOutputMinArity = one;
        g_op.GetVariadicOutputHomogeneity = zero;
        g_op.CreateKernelV2 = create_kernel;
        g_op.KernelComputeV2 = compute;
        g_op.GetStartVersion = one;
        g_op.GetEndVersion = max_version;
        g_op.GetMayInplace = no_pairs;
        g_op.ReleaseMayInplace = release_pairs;
        g_op.GetAliasMap = no_pairs;
        g_op.ReleaseAliasMap = release_pairs;
        CHECK(g_api->CreateCustomOpDomain("edgesplit", &g_domain));
        CHECK(g_api->CustomOpDomain_Add(g_domain, &g_op));
    }
    return g_api->AddCustomOpDomain(options, g_domain);
}
