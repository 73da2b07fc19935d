/* The arithmetic of edgesplit.Q8Linear (linear_ops.c is its onnxruntime glue): Y = X @ W^T for a
 * weight in the store's q8 layout, Q8_0 as it is: QW uint8 (N, nb, 32) holds u = q + 128, SCALES
 * f16 (N, nb), W[n, k] = SCALES[n, k/32] * (u[n, k] - 128). The Job is q4_math.h's, its q4-only
 * fields unused (m, xsum); `xp` is X in its own order (no de-interleave: bytes are elements).
 * One translation unit with linear_ops.c, after q4_math.h. */
#ifndef EDGESPLIT_Q8_MATH_H
#define EDGESPLIT_Q8_MATH_H

#include "q4_math.h"

#if defined(__AVX512F__)
/* fp32 tile (accuracy level 0, exact): each block's 32 weights dequantized once into two vectors,
 * met by every row of the tile (as q4_math.h's tile). */
static inline __attribute__((always_inline)) void tile8(const Job *j, size_t n0, size_t t0, const int nt, const int R) {
    __m512 lo[NT][RT], hi[NT][RT];
    for (int i = 0; i < nt; i++)
        for (int r = 0; r < R; r++) lo[i][r] = hi[i][r] = _mm512_setzero_ps();
    const __m512i offset = _mm512_set1_epi32(128);
    for (size_t b = 0; b < j->nb; b++) {
        const float *x = j->xp + t0 * j->K + b * BLOCK;
        for (int i = 0; i < nt; i++) {
            const uint8_t *q = j->qw + (n0 + i) * j->K + b * BLOCK;
            if (b % 2 == 0)  /* a tile ahead, a cache line (2 blocks) at a time */
                _mm_prefetch((const char *)(q + PREFETCH_ROWS * j->K), _MM_HINT_T0);
            const __m512 vs = _mm512_set1_ps((float)j->s[(n0 + i) * j->nb + b]);
            const __m512i q0 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q)), offset);
            const __m512i q1 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + HALF))), offset);
            const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(q0), vs), w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(q1), vs);
            for (int r = 0; r < R; r++) {
                lo[i][r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * j->K), lo[i][r]);
                hi[i][r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * j->K + HALF), hi[i][r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float *y = j->y + (t0 + r) * j->N + n0;
        if (nt == NT)
            for (int i = 0; i < NT; i += 4)
                _mm_storeu_ps(y + i, sum4(_mm512_add_ps(lo[i][r], hi[i][r]), _mm512_add_ps(lo[i + 1][r], hi[i + 1][r]),
                                          _mm512_add_ps(lo[i + 2][r], hi[i + 2][r]), _mm512_add_ps(lo[i + 3][r], hi[i + 3][r])));
        else
            for (int i = 0; i < nt; i++) y[i] = _mm512_reduce_add_ps(_mm512_add_ps(lo[i][r], hi[i][r]));
    }
}

static void outputs8(const Job *j, size_t n, int nt) {
    size_t t = 0;
    if (nt == NT) {
        for (; t + RT <= j->T; t += RT) tile8(j, n, t, NT, RT);
        for (; t < j->T; t++) tile8(j, n, t, NT, 1);
    } else {
        for (; t < j->T; t++) tile8(j, n, t, 1, 1);
    }
}

#ifdef INT8_VNNI
/* The int8 path (accuracy level 4): X rounded to int8 per block (step dx), as MatMulNBits' level 4
 * and Q4Linear's. Two weight blocks are 64 bytes of u, met by their 64 int8 x values in one VNNI
 * dot product (vpdpbusd takes u unsigned and x signed; int32 lanes 8b'..8b'+7 hold block b').
 * Per block, sum_l d (u_l - 128) dx qx_l = d dx sum_l u_l qx_l - 128 d dx sum_l qx_l: the second
 * term is one fp32 value per block and row (`resid`, -128 dx sum qx), met by the scales at the end. */
static inline __attribute__((always_inline)) void tile8_int8(const Job *j, size_t n0, size_t t0, const int nt, const int R) {
    __m512 acc[NT][RT];
    for (int i = 0; i < nt; i++)
        for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
    const __m512i pairs = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const size_t kq = j->ng * 2 * BLOCK, stride = 2 * j->ng;
    for (size_t g = 0; g < j->ng; g++) {
        const int two = j->nb - 2 * g >= 2;  /* the last pair may hold one block */
        const __mmask64 load = two ? ~0ULL : (1ULL << BLOCK) - 1;
        for (int i = 0; i < nt; i++) {
            const uint8_t *q = j->qw + (n0 + i) * j->K + g * 2 * BLOCK;
            _mm_prefetch((const char *)(q + PREFETCH_ROWS * j->K), _MM_HINT_T0);
            const __m512i w = _mm512_maskz_loadu_epi8(load, q);
            const __m128 d2 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(two ? 3 : 1, j->s + (n0 + i) * j->nb + 2 * g));
            const __m512 dw = _mm512_permutexvar_ps(pairs, _mm512_castps128_ps512(d2));
            for (int r = 0; r < R; r++) {
                const size_t t = t0 + r;
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(j->qx + t * kq + g * 2 * BLOCK));
                const __m512 scale = _mm512_mul_ps(dw, _mm512_loadu_ps(j->dxe + (t * j->ng + g) * HALF));
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i][r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const size_t t = t0 + r;
        for (size_t c = 0; c < j->nb; c += HALF) {  /* sum_b SCALES_b (-128 dx_b sum qx_b) */
            const __mmask16 m = j->nb - c >= HALF ? 0xFFFF : (__mmask16)((1u << (j->nb - c)) - 1);
            const __m512 re = _mm512_maskz_loadu_ps(m, j->resid + t * stride + c);
            for (int i = 0; i < nt; i++)
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, j->s + (n0 + i) * j->nb + c)), re, acc[i][r]);
        }
        if (j->n_out) {  /* the outlier channels, at fp32 x and f16 weights */
            const __mmask16 m = (__mmask16)((1u << j->n_out) - 1);
            const __m512 xo = _mm512_loadu_ps(j->xo + t * HALF);
            for (int i = 0; i < nt; i++)
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, j->ow + (n0 + i) * j->n_out)), xo, acc[i][r]);
        }
        float *y = j->y + t * j->N + n0;
        if (nt == NT)
            for (int i = 0; i < NT; i += 4) _mm_storeu_ps(y + i, sum4(acc[i][r], acc[i + 1][r], acc[i + 2][r], acc[i + 3][r]));
        else
            for (int i = 0; i < nt; i++) y[i] = _mm512_reduce_add_ps(acc[i][r]);
    }
}

#endif
#else
/* Portable C for the compiler to vectorize: one output's dequantized row against every row of X. */
static void outputs8(const Job *j, size_t n, int nt) {
    float w[j->K];
    for (int i = 0; i < nt; i++) {
        const uint8_t *q = j->qw + (n + i) * j->K;
        for (size_t k = 0; k < j->K; k++) w[k] = (float)j->s[(n + i) * j->nb + k / BLOCK] * (float)((int)q[k] - 128);
        for (size_t t = 0; t < j->T; t++) {
            const float *x = j->xp + t * j->K;
            float acc[HALF] = {0};
            for (size_t k = 0; k < j->K; k += HALF)
                for (int l = 0; l < HALF; l++) acc[l] += w[k + l] * x[k + l];
            float sum = 0.0f;
            for (int l = 0; l < HALF; l++) sum += acc[l];
            j->y[t * j->N + n + i] = sum;
        }
    }
}
#endif

#ifdef HAVE_INT8
/* every row of X against outputs n .. n+nt on the int8 path (the build's tile8_int8) */
static void outputs8_int8(const Job *j, size_t n, int nt) {
    size_t t = 0;
    if (nt == NT) {
        for (; t + RT <= j->T; t += RT) tile8_int8(j, n, t, NT, RT);
        for (; t < j->T; t++) tile8_int8(j, n, t, NT, 1);
    } else {
        for (; t < j->T; t++) tile8_int8(j, n, t, 1, 1);
    }
}
#endif

/* one parallel task: outputs [task * N_PER_TASK, ...), NT at a time, the last N % NT one by one */
static void run_task8(void *user, size_t task) {
    const Job *j = (const Job *)user;
    const size_t n1 = (task + 1) * N_PER_TASK < j->N ? (task + 1) * N_PER_TASK : j->N;
    for (size_t n = task * N_PER_TASK; n < n1;) {
        const int nt = n1 - n >= NT ? NT : 1;
#ifdef HAVE_INT8
        if (j->int8) {
            outputs8_int8(j, n, nt);
            n += (size_t)nt;
            continue;
        }
#endif
        outputs8(j, n, nt);
        n += (size_t)nt;
    }
}

#endif
