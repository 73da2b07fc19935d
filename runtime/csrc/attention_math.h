/* CachedAttention's arithmetic (attention_op.c is its onnxruntime glue): rotary embeddings,
 * scores from the transposed K tiles, the softmax, the weighted sum of V, one task (a session's
 * query head) at a time. Shapes and the layout are described in attention_op.c. */
#ifndef EDGESPLIT_ATTENTION_MATH_H
#define EDGESPLIT_ATTENTION_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "vec_math.h"

#define MAX_HEAD_DIM 256

#if defined(__FLT16_MAX__)
#define HAVE_F16 1  /* the compiler has _Float16 (GCC >= 12 on x86-64, aarch64, clang) */
typedef _Float16 half_t;
#endif

/* one call's work, shared by its parallel tasks */
typedef struct {
    const float *qkv, *cos, *sin;
    void *k, *v;                  /* the cache, f32 or f16 */
    float *out, *scores;          /* scores: (tasks, RB, M + VL) scratch */
    int f16;
    const int32_t *past;          /* (B,) past_b */
    size_t B, S, H, Hkv, M, D, half;
    float scale;
} Job;

/* x (D,) rotated to position p into y: pairs (x[2i], x[2i+1]) by cos/sin[p, i] */
static inline void rotate(const Job *j, const float *x, size_t p, float *y) {
    const float *c = j->cos + p * j->half, *s = j->sin + p * j->half;
    for (size_t i = 0; i < j->half; i++) {
        const float a = x[2 * i], b = x[2 * i + 1];
        y[2 * i] = a * c[i] - b * s[i];
        y[2 * i + 1] = a * s[i] + b * c[i];
    }
}


/* The cache's elements: `h` (a constant where inlined) says f16; i counts elements. */
#ifdef HAVE_F16
/* VL f16 values as floats: the conversion instruction where the build has it (GCC 12 turns the
 * generic form into one call a value on x86 without AVX512-FP16) */
#if defined(__AVX512F__)
AI vf loadh(const half_t *p) { return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
#elif defined(__F16C__) && defined(__AVX__)
AI vf loadh(const half_t *p) { return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#else
typedef half_t vhu __attribute__((vector_size(2 * VL), aligned(2), may_alias));
AI vf loadh(const half_t *p) { return __builtin_convertvector(*(const vhu *)p, vf); }
#endif
AI vf kv_load(const void *base, size_t i, int h) {
    return h ? loadh((const half_t *)base + i) : vload((const float *)base + i);
}
AI float kv_at(const void *base, size_t i, int h) { return h ? (float)((const half_t *)base)[i] : ((const float *)base)[i]; }
AI void kv_put(void *base, size_t i, float x, int h) {
    if (h) ((half_t *)base)[i] = (half_t)x;
    else ((float *)base)[i] = x;
}
#else
AI vf kv_load(const void *base, size_t i, int h) { (void)h; return vload((const float *)base + i); }
AI float kv_at(const void *base, size_t i, int h) { (void)h; return ((const float *)base)[i]; }
AI void kv_put(void *base, size_t i, float x, int h) { (void)h; ((float *)base)[i] = x; }
#endif

#define KT 32  /* positions a tile of the transposed K holds */

/* where K's (position t, channel d) lives in a block of M positions: tiles of KT positions, each
 * (D, KT) (the last, partial one (D, M % KT)). A (D, M) block would touch every channel's page
 * from the first position on (measured: +16 MB peak at a 2048-position cache holding 256); tiles
 * fill the block's pages in position order, as a (M, D) layout does. */
AI size_t kidx(size_t t, size_t d, size_t M, size_t D) {
    const size_t tile = t / KT, w = M - tile * KT < KT ? M - tile * KT : KT;
    return tile * KT * D + d * w + t % KT;
}

/* the new rows' keys (rotated, into column p of the transposed block) and values (row p) */
AI void append(const Job *j, int h) {
    const size_t W = (j->H + 2 * j->Hkv) * j->D, D = j->D, M = j->M;
    float kr[MAX_HEAD_DIM];
    for (size_t b = 0; b < j->B; b++)
        for (size_t s = 0; s < j->S; s++) {
            const size_t p = (size_t)j->past[b] + s;
            const float *row = j->qkv + (b * j->S + s) * W;
            for (size_t g = 0; g < j->Hkv; g++) {
                const size_t block = (b * j->Hkv + g) * M * D;
                const float *v = row + (j->H + j->Hkv + g) * D;
                rotate(j, row + (j->H + g) * D, p, kr);
                for (size_t i = 0; i < D; i++) {
                    kv_put(j->k, block + kidx(p, i, M, D), kr[i], h);
                    kv_put(j->v, block + p * D + i, v[i], h);
                }
            }
        }
}

/* where position t's channel 0 lives in a whole tile; channel d is d KT further */
AI size_t tile_at(size_t kt, size_t t, size_t D) { return kt + t / KT * KT * D + t % KT; }

/* sc[t] = q . K[t] for t < n, from the transposed K block at element `kt`: VL positions a vector
 * accumulate over the D channels in registers (no horizontal sum per position), 4 VL at a time
 * (VL divides KT: a vector never straddles tiles). A last partial vector reads lanes past n
 * (inside its tile; not used); the last partial tile of the buffer is read one value at a time. */
AI void scores(const float *q, const void *K, size_t kt, size_t M, size_t n, size_t D, float *sc, int h) {
    const size_t full = M / KT * KT;  /* positions in whole tiles */
    size_t t0 = 0;
    for (; t0 + 4 * VL <= n && t0 + 4 * VL <= full; t0 += 4 * VL) {
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        const size_t b0 = tile_at(kt, t0, D), b1 = tile_at(kt, t0 + VL, D);
        const size_t b2 = tile_at(kt, t0 + 2 * VL, D), b3 = tile_at(kt, t0 + 3 * VL, D);
        for (size_t d = 0; d < D; d++) {
            const float qd = q[d];
            a0 += qd * kv_load(K, b0 + d * KT, h), a1 += qd * kv_load(K, b1 + d * KT, h);
            a2 += qd * kv_load(K, b2 + d * KT, h), a3 += qd * kv_load(K, b3 + d * KT, h);
        }
        vstore(sc + t0, a0), vstore(sc + t0 + VL, a1), vstore(sc + t0 + 2 * VL, a2), vstore(sc + t0 + 3 * VL, a3);
    }
    for (; t0 < n && t0 + VL <= full; t0 += VL) {
        vf a = {0}, b = {0};  /* two chains: one would wait on each FMA's latency */
        const size_t base = tile_at(kt, t0, D);
        for (size_t d = 0; d < D; d += 2)  /* D is even */
            a += q[d] * kv_load(K, base + d * KT, h), b += q[d + 1] * kv_load(K, base + (d + 1) * KT, h);
        a += b;
        if (t0 + VL <= n) {
            vstore(sc + t0, a);
        } else {
            float lanes[VL];
            vstore(lanes, a);
            memcpy(sc + t0, lanes, (n - t0) * sizeof(float));
        }
    }
    for (; t0 < n; t0++) {  /* the buffer's last, partial tile */
        float acc = 0.0f;
        for (size_t d = 0; d < D; d++) acc += q[d] * kv_at(K, kt + kidx(t0, d, M, D), h);
        sc[t0] = acc;
    }
}

/* sc[0, n) = softmax weights (unnormalized: e^(s - max)); returns their sum. sc has VL floats of
 * room past n (the scratch rows are M + VL long): the last < VL weights take one vector too. */
AI float softmax(float *sc, size_t n) {
    float mx = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : mx)
    for (size_t t = 0; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
    size_t t = 0;
    vf acc = {0};
    for (; t + VL <= n; t += VL) {
        const vf e = vexp_neg(vload(sc + t) - mx);
        vstore(sc + t, e);
        acc += e;
    }
    for (int i = 0; i < VL; i++) sum += acc[i];
    if (t < n) {
        float lanes[VL];
        vstore(lanes, vexp_neg(vload(sc + t) - mx));  /* the lanes past n are not used */
        for (size_t i = 0; t + i < n; i++) {
            sc[t + i] = lanes[i];
            sum += lanes[i];
        }
    }
    return sum;
}

/* one row's attention for one head at position p: softmax of the scores over [0, p], then the
 * weighted sum of V's rows (V at element `vt`) into out (D,); D % VL == 0 keeps it in registers */
AI void attend_row(const Job *j, const float *q, size_t kt, size_t vt, size_t p, size_t D, float *sc, float *out,
                   int h) {
    const size_t n = p + 1;
    scores(q, j->k, kt, j->M, n, D, sc, h);
    const float inv = 1.0f / softmax(sc, n);
    if (D % VL == 0) {
        vf o[MAX_HEAD_DIM / VL];
        for (size_t k = 0; k < D / VL; k++) o[k] = (vf){0};
        for (size_t t = 0; t < n; t++)
            for (size_t k = 0; k < D / VL; k++) o[k] += sc[t] * kv_load(j->v, vt + t * D + k * VL, h);
        for (size_t k = 0; k < D / VL; k++) vstore(out + k * VL, o[k] * inv);
        return;
    }
    float o[MAX_HEAD_DIM];
    for (size_t i = 0; i < D; i++) o[i] = 0.0f;
    for (size_t t = 0; t < n; t++)
        for (size_t i = 0; i < D; i++) o[i] += sc[t] * kv_at(j->v, vt + t * D + i, h);
    for (size_t i = 0; i < D; i++) out[i] = o[i] * inv;
}

#define RB 8  /* query rows a prefill block attends together: each K and V load serves all of them */

/* rows s0 .. s0 + RB - 1 of one head (D % VL == 0): q (RB, D) rotated and scaled, at positions
 * p0 .. p0 + RB - 1. Scores are computed up to the last row's position for every row (those
 * columns hold this step's later keys: finite, then given weight 0). */
AI void attend_block(const Job *j, float q[RB][MAX_HEAD_DIM], size_t kt, size_t vt, size_t p0, size_t D, float *sc,
                     float *out, size_t out_stride, int h) {
    const size_t M = j->M, n = p0 + RB, stride = M + VL, full = M / KT * KT;  /* sc: RB rows of `stride` */
    size_t t0 = 0;
    for (; t0 < n && t0 + 2 * VL <= full; t0 += 2 * VL) {  /* two vectors x RB rows: 16 independent sums */
        vf a[RB][2];
        for (int r = 0; r < RB; r++) a[r][0] = a[r][1] = (vf){0};
        const size_t base = tile_at(kt, t0, D);
        for (size_t d = 0; d < D; d++) {
            const vf k0 = kv_load(j->k, base + d * KT, h), k1 = kv_load(j->k, base + d * KT + VL, h);
            for (int r = 0; r < RB; r++) a[r][0] += q[r][d] * k0, a[r][1] += q[r][d] * k1;
        }
        for (int r = 0; r < RB; r++) vstore(sc + r * stride + t0, a[r][0]), vstore(sc + r * stride + t0 + VL, a[r][1]);
    }
    for (int r = 0; r < RB; r++)
        for (size_t t = t0; t < n; t++) {  /* the buffer's last, partial tile */
            float acc = 0.0f;
            for (size_t d = 0; d < D; d++) acc += q[r][d] * kv_at(j->k, kt + kidx(t, d, M, D), h);
            sc[r * stride + t] = acc;
        }
    float inv[RB];
    for (int r = 0; r < RB; r++) {
        inv[r] = 1.0f / softmax(sc + r * stride, p0 + r + 1);
        for (size_t t = p0 + r + 1; t < n; t++) sc[r * stride + t] = 0.0f;  /* causal */
    }
    for (size_t k0 = 0; k0 < D / VL; k0 += 2) {  /* 32 columns of V a pass: RB x 2 sums in registers */
        const int two = D / VL - k0 > 1;
        vf o[RB][2];
        for (int r = 0; r < RB; r++) o[r][0] = o[r][1] = (vf){0};
        for (size_t t = 0; t < n; t++) {
            const size_t at = vt + t * D + k0 * VL;
            const vf v0 = kv_load(j->v, at, h), v1 = two ? kv_load(j->v, at + VL, h) : (vf){0};
            for (int r = 0; r < RB; r++) {
                const float w = sc[r * stride + t];
                o[r][0] += w * v0, o[r][1] += w * v1;
            }
        }
        for (int r = 0; r < RB; r++) {
            vstore(out + r * out_stride + k0 * VL, o[r][0] * inv[r]);
            if (two) vstore(out + r * out_stride + (k0 + 1) * VL, o[r][1] * inv[r]);
        }
    }
}

/* every row s of session b for query head `task % H`, with the head dim D (a constant where
 * inlined): blocks of RB rows (a prefill), then one row at a time */
AI void attend_head(const Job *j, size_t task, size_t D, int h) {
    const size_t b = task / j->H, head = task % j->H, g = head / (j->H / j->Hkv);
    const size_t W = (j->H + 2 * j->Hkv) * D, block = (b * j->Hkv + g) * j->M * D, ostride = j->H * D;
    const float *qkv = j->qkv + b * j->S * W + head * D;
    float *sc = j->scores + task * RB * (j->M + VL), *out = j->out + b * j->S * ostride + head * D;
    float q[RB][MAX_HEAD_DIM];
    size_t s = 0;
    for (; D % VL == 0 && s + RB <= j->S; s += RB) {
        const size_t p0 = (size_t)j->past[b] + s;
        for (int r = 0; r < RB; r++) {
            rotate(j, qkv + (s + r) * W, p0 + r, q[r]);
            for (size_t i = 0; i < D; i++) q[r][i] *= j->scale;
        }
        attend_block(j, q, block, block, p0, D, sc, out + s * ostride, ostride, h);
    }
    for (; s < j->S; s++) {
        const size_t p = (size_t)j->past[b] + s;
        rotate(j, qkv + s * W, p, q[0]);
        for (size_t i = 0; i < D; i++) q[0][i] *= j->scale;
        attend_row(j, q[0], block, block, p, D, sc, out + s * ostride, h);
    }
}

/* a parallel task: (b, head); the common head dims and each element type compiled as constants
 * (their loops unroll into registers) */
static void attend(void *user, size_t task) {
    const Job *j = (const Job *)user;
    if (j->f16) {
        switch (j->D) {
        case 64: attend_head(j, task, 64, 1); break;
        case 128: attend_head(j, task, 128, 1); break;
        default: attend_head(j, task, j->D, 1);
        }
        return;
    }
    switch (j->D) {
    case 64: attend_head(j, task, 64, 0); break;
    case 128: attend_head(j, task, 128, 0); break;
    default: attend_head(j, task, j->D, 0);
    }
}

#endif
