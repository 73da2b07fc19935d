/* X's int8 form for the int8 path (accuracy level 4) of Q4Linear and Q8Linear, on every build
 * that has one (AVX-512 VNNI, AVX2): each block of 32 values rounded to int8 with one fp32 step
 * dx = amax / 127, to nearest even (the default rounding mode), as MatMulNBits' quantizer. Plain
 * loops over a block: O(T K) beside the tiles' O(T K N). The layouts are the tiles' (q4_math.h,
 * q8_math.h). Included by q4_math.h after the tiles. */
#ifndef EDGESPLIT_QUANTIZE_X_H
#define EDGESPLIT_QUANTIZE_X_H

#include <math.h>

/* q[l] = x[l] / dx rounded, l < n; returns their sum */
static inline int round_block(const float *x, float inv, int8_t *q, int n) {
    int sum = 0;
    for (int l = 0; l < n; l++) {
        q[l] = (int8_t)(int)rintf(x[l] * inv);  /* |x inv| <= 127; rintf inlines (lrintf is a call) */
        sum += q[l];
    }
    return sum;
}

/* the step of a block of 32 values, and its inverse (0 for an all-zero block) */
static inline float block_step(const float *x, float *inv) {
    float amax = 0.0f;
    for (int l = 0; l < BLOCK; l++) amax = fabsf(x[l]) > amax ? fabsf(x[l]) : amax;  /* fmaxf is a call */
    *inv = amax > 0 ? 127.0f / amax : 0.0f;
    return amax / 127.0f;
}

static inline float block_sum(const float *x) {
    float s = 0.0f;
    for (int l = 0; l < BLOCK; l++) s += x[l];
    return s;
}

/* bytes of quantize_rows' buffer */
static size_t quantized_bytes(const Job *j) {
    return j->T * (j->ng * 4 * BLOCK + 4 * (j->ng * HALF + 2 * 4 * j->ng + HALF));
}

/* Q4Linear's X prepared for tile_int8 in `buf` (quantized_bytes, 64-byte aligned). xp: X
 * de-interleaved, this call's copy (the outlier channels are zeroed in it). */
static void quantize_rows(Job *j, float *xp, char *buf) {
    const size_t kq = j->ng * 4 * BLOCK, stride = 4 * j->ng;
    const size_t q_bytes = j->T * kq, dxe_floats = j->T * j->ng * HALF, sum_floats = j->T * stride;
    const size_t floats = dxe_floats + 2 * sum_floats + j->T * HALF;
    int8_t *qx = (int8_t *)buf;
    float *dxe = (float *)(buf + q_bytes), *xsum = dxe + dxe_floats, *resid = xsum + sum_floats;
    j->xo = resid + sum_floats;
    memset(buf, 0, 4 * floats + q_bytes);
    for (size_t t = 0; t < j->T; t++)
        for (size_t b = 0; b < j->nb; b++)  /* the minimums meet the whole block's sum, outliers included */
            xsum[t * stride + b] = block_sum(xp + t * j->K + b * BLOCK);
    for (size_t t = 0; t < j->T; t++)
        for (size_t o = 0; o < j->n_out; o++) {  /* outliers leave the int8 path */
            const size_t c = (size_t)j->oidx[o], at = t * j->K + (c / BLOCK) * BLOCK + (c % 2) * HALF + (c % BLOCK) / 2;
            j->xo[t * HALF + o] = xp[at];
            xp[at] = 0.0f;
        }
    for (size_t t = 0; t < j->T; t++)
        for (size_t b = 0; b < j->nb; b++) {
            const float *x = xp + t * j->K + b * BLOCK;
            int8_t *q = qx + t * kq + (b / 4) * 4 * BLOCK + (b % 4) * HALF;  /* evens; the odds 64 bytes on */
            float inv;
            const float dx = block_step(x, &inv);
            const int qsum = round_block(x, inv, q, HALF) + round_block(x + HALF, inv, q + 2 * BLOCK, HALF);
            for (int l = 0; l < 4; l++) dxe[(t * j->ng + b / 4) * HALF + (b % 4) * 4 + l] = dx;
            resid[t * stride + b] = 8.0f * (block_sum(x) - dx * (float)qsum);  /* without the outliers */
        }
    j->qx = qx;
    j->dxe = dxe;
    j->xsum = xsum;
    j->resid = resid;
}

/* bytes of quantize_rows8's buffer */
static size_t quantized_bytes8(const Job *j) {
    return j->T * (j->ng * 2 * BLOCK + 4 * (j->ng * HALF + 2 * j->ng + HALF));
}

/* Q8Linear's X prepared for tile8_int8 in `buf` (quantized_bytes8, 64-byte aligned). xp: this
 * call's copy of X. */
static void quantize_rows8(Job *j, float *xp, char *buf) {
    const size_t kq = j->ng * 2 * BLOCK, stride = 2 * j->ng;
    const size_t q_bytes = j->T * kq, dxe_floats = j->T * j->ng * HALF, resid_floats = j->T * stride;
    const size_t floats = dxe_floats + resid_floats + j->T * HALF;
    int8_t *qx = (int8_t *)buf;
    float *dxe = (float *)(buf + q_bytes), *resid = dxe + dxe_floats;
    j->xo = resid + resid_floats;
    memset(buf, 0, 4 * floats + q_bytes);
    for (size_t t = 0; t < j->T; t++)
        for (size_t o = 0; o < j->n_out; o++) {  /* outliers leave the int8 path */
            j->xo[t * HALF + o] = xp[t * j->K + (size_t)j->oidx[o]];
            xp[t * j->K + (size_t)j->oidx[o]] = 0.0f;
        }
    for (size_t t = 0; t < j->T; t++)
        for (size_t b = 0; b < j->nb; b++) {
            const float *x = xp + t * j->K + b * BLOCK;
            float inv;
            const float dx = block_step(x, &inv);
            const int qsum = round_block(x, inv, qx + t * kq + b * BLOCK, BLOCK);
            for (int l = 0; l < 8; l++) dxe[(t * j->ng + b / 2) * HALF + (b % 2) * 8 + l] = dx;
            resid[t * stride + b] = -128.0f * dx * (float)qsum;
        }
    j->qx = qx;
    j->dxe = dxe;
    j->resid = resid;
}

#endif
