/* The arithmetic of edgesplit.Q4Linear (q4_linear.c is its onnxruntime glue): the fp32 and int8
 * tiles over the q4 layout, X's preparation for the int8 path, and the SwiGLU row. No onnxruntime
 * API here; one translation unit with q4_linear.c, which includes it. */
#ifndef EDGESPLIT_Q4_MATH_H
#define EDGESPLIT_Q4_MATH_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec_math.h"

#define BLOCK 32
#define HALF 16         /* a block's even (low-nibble) or odd (high-nibble) elements */
#ifndef NT
#define NT 4            /* outputs per tile (a multiple of 4): they share each row's x loads */
#endif
#ifndef RT
#if defined(__AVX512F__)
#define RT 3            /* rows of X per tile */
#else
#define RT 4            /* int8_avx2.h's tiles take one output at a time: RT accumulators (a
                           128-token prefill's gate/up 2.86 ms at 4 rows, 3.69 at 2, 3.40 at 6) */
#endif
#endif
#define N_PER_TASK 32   /* outputs per parallel task */
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 16
#endif

typedef struct {
    const float *xp;      /* (T, K) X de-interleaved per block: its 16 even, then its 16 odd elements */
    const int8_t *qx;     /* int8 path: (T, ng, 128) per 4 blocks their even, then their odd elements, int8 */
    const float *dxe;     /* int8 path: (T, ng, 16) the 4 blocks' steps dx, 4 lanes each */
    const float *xsum;    /* int8 path: (T, 4 * ng) each block's exact fp32 sum S */
    const float *resid;   /* int8 path: (T, 4 * ng) each block's 8 (S - dx sum qx) */
    size_t ng;            /* groups of 4 blocks: ceil(nb / 4) (the fp32 path's sf, mf rows are 4 * ng long) */
    const int64_t *oidx;  /* int8 path: outlier input channels, kept out of the int8 rounding (or NULL) */
    size_t n_out;         /* how many (at most HALF) */
    const _Float16 *ow;   /* (N, n_out) their weights' SCALES * q, rounded to f16 once at build (the minimums meet
                           * the exact block sums); f32 was 7 MB of the whole model's 104 */
    float *xo;            /* (T, HALF) their x values, zero-padded */
    int int8;             /* run the int8 path */
    const uint8_t *qw;    /* (N, nb, 16) */
    const _Float16 *s;    /* (N, nb) */
    const _Float16 *m;    /* (N, nb) */
    float *y;             /* (T, N) */
    size_t T, K, N, nb;
} Job;

#if defined(__AVX512F__)
#include <immintrin.h>

/* The four sums of a, b, c, d's lanes, in that order (one transposing reduction for four
 * outputs instead of four reductions). */
static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  /* a b a b per 128 */
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  /* a b c d */
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

/* Y[t0 .. t0+R, n0 .. n0+nt]: each block's 32 weights of an output are dequantized into two
 * vectors (its even and its odd elements) and meet the matching halves of each row of xp. The
 * rows' x loads are shared by the tile's outputs, and the accumulators are independent chains
 * (one chain per output was latency-bound). Inlined with constant nt and R, so they stay in
 * registers. sf, mf: the tile's scales and minimums in fp32, (nt, nb). */
static inline __attribute__((always_inline)) void tile(const Job *j, size_t n0, size_t t0, const float *sf,
                                                        const float *mf, const int nt, const int R) {
    __m512 lo[NT][RT], hi[NT][RT];
    for (int i = 0; i < nt; i++)
        for (int r = 0; r < R; r++) lo[i][r] = hi[i][r] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi32(0x0F);
    const size_t row_bytes = j->nb * HALF;
    const uint8_t *q = j->qw + n0 * row_bytes;
    for (size_t b = 0; b < j->nb; b++) {
        const float *x = j->xp + t0 * j->K + b * BLOCK;
        for (int i = 0; i < nt; i++) {
            if (b % 4 == 0)  /* a tile ahead, a cache line (4 blocks) at a time: see tile_int8 */
                _mm_prefetch((const char *)(q + (i + PREFETCH_ROWS) * row_bytes + b * HALF), _MM_HINT_T0);
            __m512i qi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i * row_bytes + b * HALF)));
            __m512 vs = _mm512_set1_ps(sf[i * 4 * j->ng + b]), vm = _mm512_set1_ps(mf[i * 4 * j->ng + b]);
            __m512 we = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(qi, mask)), vs, vm);
            __m512 wo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(qi, 4)), vs, vm);
            for (int r = 0; r < R; r++) {
                lo[i][r] = _mm512_fmadd_ps(we, _mm512_loadu_ps(x + r * j->K), lo[i][r]);
                hi[i][r] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + r * j->K + HALF), hi[i][r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        if (nt == NT)
            for (int i = 0; i < NT; i += 4)
                _mm_storeu_ps(j->y + (t0 + r) * j->N + n0 + i,
                              sum4(_mm512_add_ps(lo[i][r], hi[i][r]), _mm512_add_ps(lo[i + 1][r], hi[i + 1][r]),
                                   _mm512_add_ps(lo[i + 2][r], hi[i + 2][r]), _mm512_add_ps(lo[i + 3][r], hi[i + 3][r])));
        else
            for (int i = 0; i < nt; i++) j->y[(t0 + r) * j->N + n0 + i] = _mm512_reduce_add_ps(_mm512_add_ps(lo[i][r], hi[i][r]));
    }
}

/* every row of X against outputs n .. n+nt */
static void outputs(const Job *j, size_t n, int nt, const float *sf, const float *mf) {
    size_t t = 0;
    if (nt == NT) {
        for (; t + RT <= j->T; t += RT) tile(j, n, t, sf, mf, NT, RT);
        for (; t < j->T; t++) tile(j, n, t, sf, mf, NT, 1);
    } else {
        for (; t < j->T; t++) tile(j, n, t, sf, mf, 1, 1);
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_INT8 1
#define INT8_VNNI 1
/* The int8 path (accuracy level 4, as MatMulNBits'): X quantized to int8 per block with one fp32
 * step dx per block. Four weight blocks are 64 bytes of nibbles: their low nibbles are the
 * blocks' even elements and their high nibbles the odd ones, and each meets the 64 matching int8
 * x values in one VNNI dot product (vpdpbusd; int32 lanes 4b..4b+3 hold block b's sum).
 *
 * Per block, sum_l (d q_l + m) x_l = d dx sum_l q_l qx_l + (m + 8d) S - 8 d dx sum_l qx_l,
 * S the block's exact fp32 sum: the dot product runs on the unsigned nibbles, but its x rounding
 * error meets q - 8 (centred, as MatMulNBits' symmetric form; q itself doubled the error), and
 * the rest is two fp32 terms per block: m S + d E with E = 8 (S - dx sum qx), kept per row. */
static inline __attribute__((always_inline)) void tile_int8(const Job *j, size_t n0, size_t t0, const int nt, const int R) {
    __m512 acc[NT][RT];
    for (int i = 0; i < nt; i++)
        for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const __m512i quads = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const size_t row_bytes = j->nb * HALF, kq = j->ng * 4 * BLOCK, stride = 4 * j->ng;
    for (size_t g = 0; g < j->ng; g++) {
        const size_t left = j->nb - 4 * g;  /* the last group may hold fewer than 4 blocks */
        const __mmask64 load = left >= 4 ? ~0ULL : (1ULL << (left * HALF)) - 1;
        const __mmask8 scales4 = left >= 4 ? 0x0F : (__mmask8)((1u << left) - 1);
        for (int i = 0; i < nt; i++) {
            /* the next tile's rows, a tile ahead: four row streams at once outrun the hardware prefetcher */
            _mm_prefetch((const char *)(j->qw + (n0 + i + PREFETCH_ROWS) * row_bytes + g * 4 * HALF), _MM_HINT_T0);
            __m512i w = _mm512_maskz_loadu_epi8(load, j->qw + (n0 + i) * row_bytes + g * 4 * HALF);
            __m512i lo = _mm512_and_si512(w, mask), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask);
            const __m128 d4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(scales4, j->s + (n0 + i) * j->nb + 4 * g));
            __m512 dw = _mm512_permutexvar_ps(quads, _mm512_castps128_ps512(d4));
            for (int r = 0; r < R; r++) {
                const size_t t = t0 + r;
                const int8_t *x = j->qx + t * kq + g * 4 * BLOCK;
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(x));
                dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(x + 2 * BLOCK));
                __m512 scale = _mm512_mul_ps(dw, _mm512_loadu_ps(j->dxe + (t * j->ng + g) * HALF));
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i][r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const size_t t = t0 + r;
        for (size_t c = 0; c < stride; c += HALF) {  /* sum_b MINS S_b + SCALES E_b */
            const __mmask16 m = stride - c >= HALF ? 0xFFFF : (__mmask16)((1u << (stride - c)) - 1);
            const __m512 xs = _mm512_maskz_loadu_ps(m, j->xsum + t * stride + c);
            const __m512 re = _mm512_maskz_loadu_ps(m, j->resid + t * stride + c);
            const __mmask16 mn = j->nb - c >= HALF ? 0xFFFF : (__mmask16)((1u << (j->nb - c)) - 1);
            for (int i = 0; i < nt; i++) {
                const size_t row = (n0 + i) * j->nb + c;
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mn, j->m + row)), xs, acc[i][r]);
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mn, j->s + row)), re, acc[i][r]);
            }
        }
        if (j->n_out) {  /* the outlier channels, at fp32 x and f16 weights */
            const __mmask16 m = (__mmask16)((1u << j->n_out) - 1);
            const __m512 xo = _mm512_loadu_ps(j->xo + t * HALF);
            for (int i = 0; i < nt; i++)
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, j->ow + (n0 + i) * j->n_out)), xo, acc[i][r]);
        }
        if (nt == NT)
            for (int i = 0; i < NT; i += 4)
                _mm_storeu_ps(j->y + t * j->N + n0 + i, sum4(acc[i][r], acc[i + 1][r], acc[i + 2][r], acc[i + 3][r]));
        else
            for (int i = 0; i < nt; i++) j->y[t * j->N + n0 + i] = _mm512_reduce_add_ps(acc[i][r]);
    }
}

#endif
#else
/* Portable C with the same tiling over 16-lane arrays, for the compiler to vectorize (NEON on
 * a Raspberry Pi). w: the tile's dequantized rows, (nt, K), in xp's order. */
static void outputs(const Job *j, size_t n, int nt, const float *sf, const float *mf) {
    float w[NT][j->K];
    for (int i = 0; i < nt; i++) {
        const uint8_t *q = j->qw + (n + i) * j->nb * HALF;
        for (size_t b = 0; b < j->nb; b++)
            for (int l = 0; l < HALF; l++) {
                w[i][b * BLOCK + l] = sf[i * 4 * j->ng + b] * (float)(q[b * HALF + l] & 0x0F) + mf[i * 4 * j->ng + b];
                w[i][b * BLOCK + HALF + l] = sf[i * 4 * j->ng + b] * (float)(q[b * HALF + l] >> 4) + mf[i * 4 * j->ng + b];
            }
    }
    for (size_t t = 0; t < j->T; t++) {
        const float *x = j->xp + t * j->K;
        for (int i = 0; i < nt; i++) {
            float acc[HALF] = {0};
            for (size_t k = 0; k < j->K; k += HALF)
                for (int l = 0; l < HALF; l++) acc[l] += w[i][k + l] * x[k + l];
            float sum = 0.0f;
            for (int l = 0; l < HALF; l++) sum += acc[l];
            j->y[t * j->N + n + i] = sum;
        }
    }
}
#endif

#if !defined(INT8_VNNI) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "int8_avx2.h"  /* x86 without AVX-512 VNNI: the int8 path on AVX2 */
#endif

#ifdef HAVE_INT8
/* every row of X against outputs n .. n+nt on the int8 path (the build's tile_int8) */
static void outputs_int8(const Job *j, size_t n, int nt) {
    size_t t = 0;
    if (nt == NT) {
        for (; t + RT <= j->T; t += RT) tile_int8(j, n, t, NT, RT);
        for (; t < j->T; t++) tile_int8(j, n, t, NT, 1);
    } else {
        for (; t < j->T; t++) tile_int8(j, n, t, 1, 1);
    }
}
#endif

/* dst[0 .. padded) = src[0 .. n) as fp32, then zeros */
static inline void to_f32(const _Float16 *src, size_t n, float *dst, size_t padded) {
    size_t b = 0;
#if defined(__AVX512F__)
    for (; b + HALF <= n; b += HALF) _mm512_storeu_ps(dst + b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + b))));
#endif
    for (; b < n; b++) dst[b] = (float)src[b];
    for (; b < padded; b++) dst[b] = 0.0f;
}

/* one parallel task: outputs [task * N_PER_TASK, ...), NT at a time, the last N % NT one by one */
static void run_task(void *user, size_t task) {
    const Job *j = (const Job *)user;
    size_t n0 = task * N_PER_TASK, n1 = n0 + N_PER_TASK < j->N ? n0 + N_PER_TASK : j->N;
    const size_t stride = 4 * j->ng;
    float sf[NT * stride], mf[NT * stride];  /* the tile's scales and minimums in fp32, zero-padded */
    for (size_t n = n0; n < n1;) {
        const int nt = n1 - n >= NT ? NT : 1;
#if defined(__AVX512F__)
        if (n + PREFETCH_ROWS + nt <= j->N)  /* the scales and minimums of the tile a tile ahead */
            for (size_t b = 0; b < (size_t)nt * j->nb * 2; b += 64) {
                _mm_prefetch((const char *)(j->s + (n + PREFETCH_ROWS) * j->nb) + b, _MM_HINT_T0);
                _mm_prefetch((const char *)(j->m + (n + PREFETCH_ROWS) * j->nb) + b, _MM_HINT_T0);
            }
#endif
#ifdef HAVE_INT8
        if (j->int8) {  /* reads the f16 scales and minimums itself */
            outputs_int8(j, n, nt);
            n += (size_t)nt;
            continue;
        }
#endif
        for (int i = 0; i < nt; i++) {
            to_f32(j->s + (n + i) * j->nb, j->nb, sf + i * stride, stride);
            to_f32(j->m + (n + i) * j->nb, j->nb, mf + i * stride, stride);
        }
        outputs(j, n, nt, sf, mf);
        n += (size_t)nt;
    }
}

#ifdef HAVE_INT8
#include "quantize_x.h"
#endif

/* SwiGLU of one row: out[i] = silu(y[i]) * y[F + i], silu(g) = g / (1 + exp(-g)) */
typedef struct {
    const float *y;  /* (T, 2F) */
    float *out;      /* (T, F) */
    size_t F;
} Glu;

#if defined(__AVX512F__)
/* exp(x), Cephes' single-precision form: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in
 * r, then scaled by 2^n (vscalefps); inputs clamped to +-88.38, where float's exp ends. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  /* ln2 in two parts: exact n * hi */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

static void glu_row(void *user, size_t t) {
    const Glu *g = (const Glu *)user;
    const float *gate = g->y + t * 2 * g->F, *up = gate + g->F;
    float *out = g->out + t * g->F;
    size_t i = 0;
#if defined(__AVX512F__)
    for (; i + HALF <= g->F; i += HALF) {
        const __m512 x = _mm512_loadu_ps(gate + i);
        const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
    }
#else
    for (; i + VL <= g->F; i += VL) vstore(out + i, vsilu(vload(gate + i)) * vload(up + i));  /* libm's expf: a call a value */
#endif
    for (; i < g->F; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

#endif
