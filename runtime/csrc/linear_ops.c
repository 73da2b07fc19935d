/* edgesplit's onnxruntime custom operators (domain "edgesplit"), Y (T, N) = X (T, K) @ W^T for a
 * weight in the store's layout as it is (runtime/quant.py):
 *
 * Q4Linear, the Q4_1 values (arithmetic in q4_math.h):
 *   inputs  X f32 (T, K) or (B, S, K); QW uint8 (N, K/32, 16), element 2j of a block in the low nibble of byte j;
 *           SCALES f16 (N, K/32); MINS f16 (N, K/32); optional (level 4): OUTLIERS int64 (n,),
 *           input channels kept out of the int8 rounding, n <= 16, and OUTLIER_W f16 (N, n), their
 *           weights' SCALES * q
 *   output  Y f32 (T, N) (or (B, S, N)), Y[t, n] = sum_k X[t, k] * (SCALES[n, k/32] * q[n, k] + MINS[n, k/32])
 *   attribute swiglu: 1 = the weight is gate rows then up rows; Y = silu(gate) * up, (T, N/2)
 * Q8Linear, the Q8_0 values (arithmetic in q8_math.h):
 *   inputs  X f32 (T, K) or (B, S, K); QW uint8 (N, K/32, 32), u = q + 128; SCALES f16 (N, K/32); optional
 *           (level 4): OUTLIERS int64 (n,), n <= 16, and OUTLIER_W f16 (N, n), SCALES * q there
 *   output  Y f32 (T, N), Y[t, n] = sum_k X[t, k] * SCALES[n, k/32] * (u[n, k] - 128)
 * Both: attribute accuracy_level: 0 = fp32 compute (exact), 4 = X rounded to int8 per block of
 *   32, as MatMulNBits' level 4 rounds it (AVX-512 VNNI and AVX2 builds; elsewhere level 4
 *   computes as 0).
 *
 * Why: onnxruntime's MatMulNBits has no Q4_1 form that is both exact and fast (its float zero
 * point path is 12-33x slower), so the engine ran MatMulNBits on d*(q-8) and added the minimums
 * with ~7 further nodes per projection; and MatMulNBits repacks every weight into a copy of its
 * own (the 8-bit head: 35 MB beside the 30 MB table). Here one node reads each weight byte once,
 * straight from the store's layout (no repacked copy: the weights stay the mapped file).
 *
 * Loop shape: parallel tasks own ranges of outputs; a tile of NT outputs x RT rows dequantizes
 * each weight block once and meets every row of the tile with it. Q4Linear first de-interleaves X
 * per block (its 16 even, then its 16 odd elements: the order the nibbles come in). AVX-512 where
 * the build machine has it; the int8 path on AVX2 where it has no AVX-512 VNNI (int8_avx2.h);
 * else portable C loops the compiler vectorizes (-O3 -march=native). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ort_ops.h"
#include "q4_math.h"
#include "q8_math.h"

const OrtApi *g_api;
OrtMemoryInfo *g_cpu;

OrtStatus *op_fail(const char *msg) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg); }

typedef struct {
    const char *name;  /* "Q4Linear" or "Q8Linear" */
    int bits;          /* 4 or 8 */
} OpKind;

static const OpKind Q4 = {"Q4Linear", 4}, Q8 = {"Q8Linear", 8};

typedef struct {
    const OpKind *kind;
    int64_t accuracy_level;  /* attribute: 0 fp32 compute (exact), 4 int8 activations (AVX-512 VNNI, AVX2 builds) */
    int64_t swiglu;          /* attribute (Q4Linear): 1 = the weight is gate rows then up rows; Y = silu(gate) * up, (T, N/2) */
} Kernel;

OrtStatus *op_input_dims(OrtKernelContext *ctx, const char *op, size_t i, const OrtValue **v, int64_t *dims, size_t *nd) {
    OrtTensorTypeAndShapeInfo *info;
    CHECK(g_api->KernelContext_GetInput(ctx, i, v));
    CHECK(g_api->GetTensorTypeAndShape(*v, &info));
    OrtStatus *st = g_api->GetDimensionsCount(info, nd);
    if (!st && *nd <= 4) st = g_api->GetDimensions(info, dims, *nd);
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    if (!st && *nd > 4) {
        char msg[96];
        snprintf(msg, sizeof msg, "%s: input %zu has more than 4 dimensions", op, i);
        return op_fail(msg);
    }
    return st;
}

/* The optional outlier inputs (`first`: channel indices, first + 1: (N, n) weights), used on the
 * int8 path only: the fp32 path is exact without them. */
static OrtStatus *outlier_inputs(OrtKernelContext *ctx, const OpKind *op, size_t first, Job *j) {
    size_t count;
    CHECK(g_api->KernelContext_GetInputCount(ctx, &count));
    if (count < first + 2 || !j->int8) return NULL;
    const OrtValue *vi, *vw;
    CHECK(g_api->KernelContext_GetInput(ctx, first, &vi));
    CHECK(g_api->KernelContext_GetInput(ctx, first + 1, &vw));
    if (vi == NULL || vw == NULL) return NULL;
    int64_t di[4], dw[4];
    size_t ni, nw;
    CHECK(op_input_dims(ctx, op->name, first, &vi, di, &ni));
    CHECK(op_input_dims(ctx, op->name, first + 1, &vw, dw, &nw));
    char msg[200];
    if (ni != 1 || di[0] < 1 || di[0] > HALF || nw != 2 || dw[0] != (int64_t)j->N || dw[1] != di[0]) {
        snprintf(msg, sizeof msg, "%s: outliers (%lld) and their weights (%lld, %lld) must be (n,) and (N=%zu, n), "
                 "1 <= n <= %d", op->name, (long long)di[0], (long long)dw[0], (long long)(nw > 1 ? dw[1] : -1), j->N, HALF);
        return op_fail(msg);
    }
    CHECK(g_api->GetTensorMutableData((OrtValue *)vi, (void **)&j->oidx));
    CHECK(g_api->GetTensorMutableData((OrtValue *)vw, (void **)&j->ow));
    for (int64_t o = 0; o < di[0]; o++)
        if (j->oidx[o] < 0 || j->oidx[o] >= (int64_t)j->K) {
            snprintf(msg, sizeof msg, "%s: outlier channel %lld is outside [0, K=%zu)", op->name, (long long)j->oidx[o], j->K);
            return op_fail(msg);
        }
    j->n_out = (size_t)di[0];
    return NULL;
}

OrtStatus *op_scratch(OrtAllocator *a, size_t bytes, void **p) {
    *p = a->Alloc(a, bytes ? bytes : 1);
    return *p ? NULL : g_api->CreateStatus(ORT_FAIL, "edgesplit linear operator: out of memory");
}

/* This call's copy of X (Q4Linear: de-interleaved per block, its 16 even then its 16 odd
 * elements, the nibbles' order), X's int8 form on that path, the outputs in parallel tasks and,
 * with `glu`, the SwiGLU of gate and up into `out`. The buffers are onnxruntime's arena's: from
 * malloc, a prefill's (MBs) were fresh pages each call wherever glibc maps large blocks (the
 * cloud worker fixes its mmap threshold), and prefill took 1.45x as long. */
static OrtStatus *run_job(OrtKernelContext *ctx, const OpKind *op, Job *j, const float *x, float *out, int glu) {
    OrtAllocator *a;
    CHECK(g_api->KernelContext_GetAllocator(ctx, g_cpu, &a));
    void *xp = NULL, *full = NULL, *qbuf = NULL;
    OrtStatus *st = op_scratch(a, j->T * j->K * sizeof(float), &xp);
    if (st == NULL && glu) st = op_scratch(a, j->T * j->N * sizeof(float), &full);  /* gate and up, (T, N) */
#ifdef HAVE_INT8
    if (st == NULL && j->int8) st = op_scratch(a, op->bits == 8 ? quantized_bytes8(j) : quantized_bytes(j), &qbuf);
#endif
    if (st != NULL) goto done;
    float *xf = (float *)xp;
    if (op->bits == 8)
        memcpy(xf, x, j->T * j->K * sizeof(float));  /* a copy: the int8 path zeroes the outliers in it */
    else
        for (size_t t = 0; t < j->T; t++)
            for (size_t b = 0; b < j->nb; b++)
                for (int l = 0; l < HALF; l++) {
                    xf[t * j->K + b * BLOCK + l] = x[t * j->K + b * BLOCK + 2 * l];
                    xf[t * j->K + b * BLOCK + HALF + l] = x[t * j->K + b * BLOCK + 2 * l + 1];
                }
    j->xp = xf;
    j->y = glu ? (float *)full : out;
#ifdef HAVE_INT8
    if (j->int8) {
        if (op->bits == 8) quantize_rows8(j, xf, (char *)qbuf);
        else quantize_rows(j, xf, (char *)qbuf);
    }
#endif
    st = g_api->KernelContext_ParallelFor(ctx, op->bits == 8 ? run_task8 : run_task, (j->N + N_PER_TASK - 1) / N_PER_TASK, 0, j);
    if (st == NULL && glu) {
        Glu g = {.y = (float *)full, .out = out, .F = j->N / 2};
        st = g_api->KernelContext_ParallelFor(ctx, glu_row, j->T, 0, &g);
    }
done:
    if (qbuf) a->Free(a, qbuf);
    if (full) a->Free(a, full);
    if (xp) a->Free(a, xp);
    g_api->ReleaseAllocator(a);
    return st;
}

void op_dims_text(const int64_t *d, size_t n, char *out, size_t size) {
    int at = snprintf(out, size, "(");
    for (size_t i = 0; i < n && at > 0 && (size_t)at < size; i++)
        at += snprintf(out + at, size - (size_t)at, i ? ", %lld" : "%lld", (long long)d[i]);
    if (at > 0 && (size_t)at < size) snprintf(out + at, size - (size_t)at, ")");
}

/* X (T, K) or (B, S, K) (rows T = B S: the graph's residual stream is 3-D, as GroupQueryAttention
 * takes it), QW (N, nb, 16 or 32), SCALES (N, nb) and, for Q4Linear, MINS (N, nb): checked, into
 * j; X's dims into dx (the output keeps its leading ones), their count into nx. */
static OrtStatus *weight_inputs(OrtKernelContext *ctx, const OpKind *op, Job *j, const float **x, int64_t *dx, size_t *nx) {
    const OrtValue *vx, *vq, *vs, *vm = NULL;
    int64_t dq[4], ds[4], dm[4] = {0};
    size_t nq, ns, nm = 2;
    CHECK(op_input_dims(ctx, op->name, 0, &vx, dx, nx));
    CHECK(op_input_dims(ctx, op->name, 1, &vq, dq, &nq));
    CHECK(op_input_dims(ctx, op->name, 2, &vs, ds, &ns));
    const int64_t row = op->bits == 8 ? BLOCK : BLOCK / 2;  /* bytes per block */
    if (op->bits == 4) CHECK(op_input_dims(ctx, op->name, 3, &vm, dm, &nm));
    const size_t n = *nx;
    if (n < 2 || n > 3 || nq != 3 || ns != 2 || nm != 2 || dq[2] != row || dx[n - 1] != dq[1] * BLOCK
        || ds[0] != dq[0] || ds[1] != dq[1] || (op->bits == 4 && (dm[0] != dq[0] || dm[1] != dq[1]))) {
        char msg[300], xs[80], qs[80];
        op_dims_text(dx, n, xs, sizeof xs);
        op_dims_text(dq, nq, qs, sizeof qs);
        snprintf(msg, sizeof msg, "%s: shapes X %s, QW %s do not match X (T, K) or (B, S, K), QW (N, K/32, %lld), "
                 "SCALES%s (N, K/32)", op->name, xs, qs, (long long)row, op->bits == 4 ? " and MINS" : "");
        return op_fail(msg);
    }
    j->T = (size_t)dx[0] * (n == 3 ? (size_t)dx[1] : 1);
    j->K = (size_t)dx[n - 1], j->N = (size_t)dq[0], j->nb = (size_t)dq[1];
    j->ng = op->bits == 8 ? (j->nb + 1) / 2 : (j->nb + 3) / 4;  /* blocks per 64-byte load: 2 or 4 */
    CHECK(g_api->GetTensorMutableData((OrtValue *)vx, (void **)x));
    CHECK(g_api->GetTensorMutableData((OrtValue *)vq, (void **)&j->qw));
    CHECK(g_api->GetTensorMutableData((OrtValue *)vs, (void **)&j->s));
    if (vm != NULL) CHECK(g_api->GetTensorMutableData((OrtValue *)vm, (void **)&j->m));
    return NULL;
}

static OrtStatus *ORT_API_CALL compute(void *kernel, OrtKernelContext *ctx) {
    const Kernel *k = (const Kernel *)kernel;
    const OpKind *op = k->kind;
    Job j = {0};
    const float *x;
    int64_t dy[4];  /* X's dims; the last becomes the output's width */
    size_t ny;
    CHECK(weight_inputs(ctx, op, &j, &x, dy, &ny));
#ifdef HAVE_INT8
    j.int8 = k->accuracy_level == 4;
#endif
    CHECK(outlier_inputs(ctx, op, op->bits == 8 ? 3 : 4, &j));
    const int glu = k->swiglu != 0;
    if (glu && j.N % 2 != 0) {
        char msg[128];
        snprintf(msg, sizeof msg, "%s: swiglu needs gate and up rows, an even N; got N=%zu", op->name, j.N);
        return op_fail(msg);
    }
    dy[ny - 1] = (int64_t)(glu ? j.N / 2 : j.N);
    OrtValue *vy;
    float *out;
    CHECK(g_api->KernelContext_GetOutput(ctx, 0, dy, ny, &vy));
    CHECK(g_api->GetTensorMutableData(vy, (void **)&out));
    if (j.T == 0 || j.N == 0) return NULL;
    return run_job(ctx, op, &j, x, out, glu);
}

int64_t op_attribute(const OrtKernelInfo *info, const char *name, int64_t dflt) {
    int64_t v;
    OrtStatus *st = g_api->KernelInfoGetAttribute_int64(info, name, &v);
    if (st == NULL) return v;
    g_api->ReleaseStatus(st);
    return dflt;
}

static OrtStatus *create(const OpKind *op, const OrtKernelInfo *info, void **kernel) {
    const int64_t level = op_attribute(info, "accuracy_level", 0), swiglu = op_attribute(info, "swiglu", 0);
    char msg[128];
    if (level != 0 && level != 4) {
        snprintf(msg, sizeof msg, "%s: accuracy_level %lld is not 0 or 4", op->name, (long long)level);
        return op_fail(msg);
    }
    if (swiglu != 0 && op->bits != 4) {
        snprintf(msg, sizeof msg, "%s: swiglu %lld: only Q4Linear applies SwiGLU", op->name, (long long)swiglu);
        return op_fail(msg);
    }
    const Kernel k = {.kind = op, .accuracy_level = level, .swiglu = swiglu};
    return op_new_kernel(&k, sizeof k, kernel);
}

static OrtStatus *ORT_API_CALL create_q4(const OrtCustomOp *o, const OrtApi *a, const OrtKernelInfo *info, void **kernel) {
    (void)o; (void)a;
    return create(&Q4, info, kernel);
}
static OrtStatus *ORT_API_CALL create_q8(const OrtCustomOp *o, const OrtApi *a, const OrtKernelInfo *info, void **kernel) {
    (void)o; (void)a;
    return create(&Q8, info, kernel);
}

static void ORT_API_CALL destroy_kernel(void *kernel) { free(kernel); }

OrtStatus *op_new_kernel(const void *value, size_t size, void **kernel) {
    *kernel = malloc(size);
    if (*kernel == NULL) return g_api->CreateStatus(ORT_FAIL, "edgesplit operator: out of memory for its kernel state");
    memcpy(*kernel, value, size);
    return NULL;
}
static const char *ORT_API_CALL name_q4(const OrtCustomOp *op) { (void)op; return Q4.name; }
static const char *ORT_API_CALL name_q8(const OrtCustomOp *op) { (void)op; return Q8.name; }
static const char *ORT_API_CALL op_ep(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static const ONNXTensorElementDataType F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, U8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
                                       F16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, I64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
static ONNXTensorElementDataType ORT_API_CALL inputs_q4(const OrtCustomOp *op, size_t i) {
    (void)op;
    const ONNXTensorElementDataType types[6] = {F32, U8, F16, F16, I64, F16};
    return types[i];
}
static ONNXTensorElementDataType ORT_API_CALL inputs_q8(const OrtCustomOp *op, size_t i) {
    (void)op;
    const ONNXTensorElementDataType types[5] = {F32, U8, F16, I64, F16};
    return types[i];
}
static size_t ORT_API_CALL count_q4(const OrtCustomOp *op) { (void)op; return 6; }
static size_t ORT_API_CALL count_q8(const OrtCustomOp *op) { (void)op; return 5; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL optional_q4(const OrtCustomOp *op, size_t i) {
    (void)op;
    return i < 4 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;  /* the outliers */
}
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL optional_q8(const OrtCustomOp *op, size_t i) {
    (void)op;
    return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}
static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return F32; }
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { (void)op; return 1; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return INPUT_OUTPUT_REQUIRED; }
static OrtMemType ORT_API_CALL mem_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return OrtMemTypeDefault; }
static int ORT_API_CALL one(const OrtCustomOp *op) { (void)op; return 1; }
static int ORT_API_CALL zero(const OrtCustomOp *op) { (void)op; return 0; }
static int ORT_API_CALL max_version(const OrtCustomOp *op) { (void)op; return 0x7fffffff; }
static size_t ORT_API_CALL no_pairs(int **in, int **out) { *in = NULL; *out = NULL; return 0; }
static void ORT_API_CALL release_pairs(int *in, int *out) { (void)in; (void)out; }

void op_define_common(OrtCustomOp *op) {
    memset(op, 0, sizeof *op);
    op->version = ORT_API_VERSION;
    op->GetExecutionProviderType = op_ep;
    op->KernelDestroy = destroy_kernel;
    op->GetInputCharacteristic = required;
    op->GetOutputCharacteristic = required;
    op->GetInputMemoryType = mem_type;
    op->GetVariadicInputMinArity = one;
    op->GetVariadicInputHomogeneity = zero;
    op->GetVariadicOutputMinArity = one;
    op->GetVariadicOutputHomogeneity = zero;
    op->GetStartVersion = one;
    op->GetEndVersion = max_version;
    op->GetMayInplace = no_pairs;
    op->ReleaseMayInplace = release_pairs;
    op->GetAliasMap = no_pairs;
    op->ReleaseAliasMap = release_pairs;
}

static OrtCustomOp g_q4, g_q8, g_attention[2];  /* CachedAttention: f32 and f16 caches */
static OrtCustomOpDomain *g_domain;  /* lives as long as the process: sessions refer to it */

typedef const char *(ORT_API_CALL *NameFn)(const OrtCustomOp *);
typedef ONNXTensorElementDataType(ORT_API_CALL *TypeFn)(const OrtCustomOp *, size_t);
typedef size_t(ORT_API_CALL *CountFn)(const OrtCustomOp *);
typedef OrtCustomOpInputOutputCharacteristic(ORT_API_CALL *CharFn)(const OrtCustomOp *, size_t);
typedef OrtStatus *(ORT_API_CALL *CreateFn)(const OrtCustomOp *, const OrtApi *, const OrtKernelInfo *, void **);

/* a linear operator: its own name, inputs and kernel creation; one f32 output */
static void define(OrtCustomOp *op, NameFn name, TypeFn inputs, CountFn count, CharFn optional, CreateFn create) {
    op_define_common(op);
    op->GetName = name;
    op->GetInputType = inputs;
    op->GetInputTypeCount = count;
    op->GetInputCharacteristic = optional;
    op->CreateKernelV2 = create;
    op->GetOutputType = output_type;
    op->GetOutputTypeCount = output_count;
    op->KernelComputeV2 = compute;
}

OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    g_api = base->GetApi(ORT_API_VERSION);
    if (g_api == NULL) return NULL;  /* an onnxruntime older than these headers: it reports the ops as unknown */
    if (g_domain == NULL) {
        define(&g_q4, name_q4, inputs_q4, count_q4, optional_q4, create_q4);
        define(&g_q8, name_q8, inputs_q8, count_q8, optional_q8, create_q8);
        CHECK(g_api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &g_cpu));
        CHECK(g_api->CreateCustomOpDomain("edgesplit", &g_domain));
        CHECK(g_api->CustomOpDomain_Add(g_domain, &g_q4));
        CHECK(g_api->CustomOpDomain_Add(g_domain, &g_q8));
        for (int f16 = 0; f16 < 2; f16++)
            if (attention_define(&g_attention[f16], f16)) CHECK(g_api->CustomOpDomain_Add(g_domain, &g_attention[f16]));
    }
    return g_api->AddCustomOpDomain(options, g_domain);
}

/* Which arithmetic this build compiled (for runtime/kernels.py): "avx512-vnni", "avx2" (both with
 * the int8 path of accuracy level 4) or "portable" (C loops the compiler vectorizes, fp32 at
 * every level: slower than MatMulNBits where measured, so "auto" does not pick it). */
const char *edgesplit_simd(void) {
#if defined(INT8_VNNI)
    return "avx512-vnni";
#elif defined(HAVE_INT8)
    return "avx2";
#else
    return "portable";
#endif
}
