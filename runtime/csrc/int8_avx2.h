/* The int8 path (accuracy level 4) of Q4Linear and Q8Linear on AVX2 + FMA + F16C, for x86 CPUs
 * without AVX-512 VNNI (q4_math.h and q8_math.h describe the layouts and the algebra; X's int8
 * form is quantize_x.h's, the same on every build). Included by q4_math.h on such builds.
 *
 * Q4: two weight blocks are 32 bytes of nibbles. Each nibble (0..15, unsigned) meets its int8 x
 * in vpmaddubsw: pairs of products summed to int16 (at most 2 * 15 * 127 per pair, twice: no
 * saturation), then vpmaddwd by ones to int32 lanes, 4 per block, as VNNI's vpdpbusd gives them.
 * Q8: a block's 32 bytes u = q + 128 (0..255) would saturate vpmaddubsw (2 * 255 * 127 > 32767),
 * so u and x are widened to int16 and meet in vpmaddwd, exact; the -128 offset is `resid`, as on
 * the VNNI path.
 *
 * The tiles read one output's weight row after another: the VNNI path's interleaving of the
 * tile's 4 rows (block b of each, then block b + 1) halved the bandwidth on this AMD EPYC (the q8
 * head, one thread: 3.5 -> 2.1 ms; Q4 rows of 1536: 46 -> 34 us), where its hardware prefetcher
 * follows one stream a row better than four. The rows' x values are reloaded per output, from L1. */
#ifndef EDGESPLIT_INT8_AVX2_H
#define EDGESPLIT_INT8_AVX2_H

#include <immintrin.h>

#define HAVE_INT8 1

/* The four sums of a, b, c, d's lanes, in that order. */
static inline __m128 sum4_avx2(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  /* per 128: a b c d */
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

static inline float hsum_avx2(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/* acc + the outlier channels' weights (f16) . their x values (fp32); past the last multiple of 8
 * into *tail */
static inline __m256 outliers(const Job *j, size_t n, size_t t, __m256 acc, float *tail) {
    const _Float16 *w = j->ow + n * j->n_out;
    const float *x = j->xo + t * HALF;
    size_t o = 0;
    for (; o + 8 <= j->n_out; o += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + o))), _mm256_loadu_ps(x + o), acc);
    for (; o < j->n_out; o++) *tail += (float)w[o] * x[o];
    return acc;
}

/* Y[t, n0 .. n0+nt] from acc (its lanes' sums) and each output's outliers */
static inline __attribute__((always_inline)) void store_tile(const Job *j, size_t n0, size_t t, __m256 *acc, const int nt) {
    float *y = j->y + t * j->N + n0, tail[NT] = {0};
    for (int i = 0; i < nt; i++) acc[i] = outliers(j, n0 + i, t, acc[i], &tail[i]);
    if (nt == NT)
        for (int i = 0; i < NT; i += 4)
            _mm_storeu_ps(y + i, _mm_add_ps(sum4_avx2(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]), _mm_loadu_ps(tail + i)));
    else
        for (int i = 0; i < nt; i++) y[i] = hsum_avx2(acc[i]) + tail[i];
}

/* 4 f16 values from p in the low 64 bits: n of them (the rest zeros). Past a row's last block the
 * 8-byte load reads the next row's values, then masked off; only the buffer's last row (`last`)
 * is copied instead, as its load would end past the buffer. */
static inline __m128i load4h(const _Float16 *p, size_t n, int last) {
    if (n >= 4) return _mm_loadl_epi64((const __m128i *)p);
    if (last) {
        _Float16 pad[8] = {0};
        memcpy(pad, p, n * sizeof(_Float16));
        return _mm_loadu_si128((const __m128i *)pad);
    }
    const __m128i keep = _mm_cvtsi64_si128((long long)((1ULL << (16 * n)) - 1));
    return _mm_and_si128(_mm_loadl_epi64((const __m128i *)p), keep);
}

/* Group g (4 blocks, two halves of 32 bytes; `left` of them in the row, a constant 4 for whole
 * groups) of output n against rows t0 .. t0+R into acc (R,). The 4 blocks' MINS and SCALES are
 * one vector [m0..m3 d0..d3]: it meets the rows' [S_b | E_b] in one FMA (the minimums' and the x
 * rounding's terms) and gives each half's scales by a permute. */
static inline __attribute__((always_inline)) void group(const Job *j, __m256 *acc, size_t n, size_t t0, size_t g,
                                                         const size_t left, const int R) {
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i first = _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), second = _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7);
    const size_t row_bytes = j->nb * HALF, kq = j->ng * 4 * BLOCK, stride = 4 * j->ng;
    const uint8_t *q = j->qw + n * row_bytes + g * 4 * HALF;
    _mm_prefetch((const char *)(q + PREFETCH_ROWS * row_bytes), _MM_HINT_T0);
    const size_t at = n * j->nb + 4 * g;
    const int last = n + 1 == j->N;
    const __m256 md = _mm256_cvtph_ps(_mm_unpacklo_epi64(load4h(j->m + at, left, last), load4h(j->s + at, left, last)));
    for (int r = 0; r < R; r++) {
        const size_t t = t0 + r;
        acc[r] = _mm256_fmadd_ps(md, _mm256_loadu2_m128(j->resid + t * stride + 4 * g, j->xsum + t * stride + 4 * g), acc[r]);
    }
    for (int h = 0; h < 2 && 2 * h < (int)left; h++) {
        const __m256i w = 2 * h + 1 < (int)left ? _mm256_loadu_si256((const __m256i *)(q + h * BLOCK))
                                                 : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(q + h * BLOCK)));
        const __m256i lo = _mm256_and_si256(w, mask), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
        const __m256 dw = _mm256_permutevar8x32_ps(md, h ? second : first);
        for (int r = 0; r < R; r++) {
            const size_t t = t0 + r;
            const int8_t *x = j->qx + t * kq + g * 4 * BLOCK + h * BLOCK;  /* evens; the odds 64 bytes on */
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                               _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 2 * BLOCK))));
            const __m256 dx = _mm256_loadu_ps(j->dxe + (t * j->ng + g) * HALF + h * 8);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_mul_ps(dw, dx), acc[r]);
        }
    }
}

/* Outputs n0 .. n0+nt one after another (each row of weights read in order: interleaving the
 * tile's rows halved the bandwidth on an AMD EPYC) against rows t0 .. t0+R. */
static inline __attribute__((always_inline)) void tile_int8(const Job *j, size_t n0, size_t t0, const int nt, const int R) {
    __m256 acc[NT][RT];
    const size_t whole = j->nb / 4;
    for (int i = 0; i < nt; i++) {
        for (int r = 0; r < R; r++) acc[i][r] = _mm256_setzero_ps();
        for (size_t g = 0; g < whole; g++) group(j, acc[i], n0 + i, t0, g, 4, R);
        switch (j->nb - 4 * whole) {  /* a last, partial group: its size a constant too */
        case 1: group(j, acc[i], n0 + i, t0, whole, 1, R); break;
        case 2: group(j, acc[i], n0 + i, t0, whole, 2, R); break;
        case 3: group(j, acc[i], n0 + i, t0, whole, 3, R); break;
        default: break;
        }
    }
    for (int r = 0; r < R; r++) {
        __m256 row[NT];
        for (int i = 0; i < nt; i++) row[i] = acc[i][r];
        store_tile(j, n0, t0 + r, row, nt);
    }
}

/* Outputs n0 .. n0+nt one after another, each row of weights read in order (as tile_int8). The
 * -128 offset term (resid, one per block and row) is spread over the 8 lanes of the block's dot
 * product, so that one FMA by the block's scale takes both. */
static inline __attribute__((always_inline)) void tile8_int8(const Job *j, size_t n0, size_t t0, const int nt, const int R) {
    __m256 acc[RT][NT];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < nt; i++) acc[r][i] = _mm256_setzero_ps();
    const size_t kq = j->ng * 2 * BLOCK, stride = 2 * j->ng;
    for (int i = 0; i < nt; i++) {
        const uint8_t *qrow = j->qw + (n0 + i) * j->K;
        const _Float16 *srow = j->s + (n0 + i) * j->nb;
        for (size_t b = 0; b < j->nb; b++) {
            const uint8_t *q = qrow + b * BLOCK;
            if (b % 2 == 0) _mm_prefetch((const char *)(q + PREFETCH_ROWS * j->K), _MM_HINT_T0);
            const __m256i u0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
            const __m256i u1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + HALF)));
            const __m256 d = _mm256_set1_ps((float)srow[b]);
            for (int r = 0; r < R; r++) {
                const size_t t = t0 + r;
                const int8_t *x = j->qx + t * kq + b * BLOCK;
                const __m256i dot = _mm256_add_epi32(
                    _mm256_madd_epi16(u0, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)x))),
                    _mm256_madd_epi16(u1, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x + HALF)))));
                const __m256 dx = _mm256_loadu_ps(j->dxe + (t * j->ng + b / 2) * HALF + (b % 2) * 8);
                const __m256 re = _mm256_set1_ps(j->resid[t * stride + b] * 0.125f);
                acc[r][i] = _mm256_fmadd_ps(d, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), dx, re), acc[r][i]);
            }
        }
    }
    for (int r = 0; r < R; r++) store_tile(j, n0, t0 + r, acc[r], nt);
}

#endif
