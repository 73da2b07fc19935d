/* Vectors of one native register (GCC/clang vector extensions) and e^x on them, shared by
 * CachedAttention's softmax (attention_math.h) and the SwiGLU of Q4Linear's gate/up node where the
 * build has no AVX-512 (q4_math.h). */
#ifndef EDGESPLIT_VEC_MATH_H
#define EDGESPLIT_VEC_MATH_H

#include <stdint.h>

/* GCC/clang vector types of one native register: 16 floats on AVX-512, 8 on AVX2, 4 elsewhere
 * (SSE, NEON). Wider than the register, GCC splits each operation and spills the pieces to the
 * stack (16 lanes on AVX2 measured: attention 23% of a decode step, most of it stack traffic). */
#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vf __attribute__((vector_size(4 * VL)));
typedef float vfu __attribute__((vector_size(4 * VL), aligned(4), may_alias));  /* unaligned access */
typedef int32_t vi __attribute__((vector_size(4 * VL)));
#define AI static inline __attribute__((always_inline))
AI vf vload(const float *p) { return *(const vfu *)p; }
AI void vstore(float *p, vf v) { *(vfu *)p = v; }

/* e^x on VL lanes, for x <= 0 (softmax after its max): 2^n 2^f, n = round(x log2 e) (as
 * trunc(t - 0.5), t <= 0), f in [-0.5, 0.5], 2^f = e^(f ln 2) by its Taylor series to degree 7
 * (relative error < 3e-9, below float's). x < -87 gives e^-87 (~1.6e-38), never a denormal. */
AI vf vexp_neg(vf x) {
    const vf lo = x - x - 87.0f;
    const vi small = x < lo;
    x = (vf)((small & (vi)lo) | (~small & (vi)x));
    const vf t = x * 1.44269504f;
    const vi n = __builtin_convertvector(t - 0.5f, vi);
    const vf g = (t - __builtin_convertvector(n, vf)) * 0.693147181f;
    vf p = g * (1.0f / 5040.0f) + 1.0f / 720.0f;
    p = p * g + 1.0f / 120.0f;
    p = p * g + 1.0f / 24.0f;
    p = p * g + 1.0f / 6.0f;
    p = p * g + 0.5f;
    p = p * g + 1.0f;
    p = p * g + 1.0f;
    return p * (vf)((n + 127) << 23);
}

/* silu(g) = g / (1 + e^-g) on VL lanes, through t = e^-|g| <= 1 (never overflows):
 * g / (1 + t) for g >= 0, g t / (1 + t) below */
AI vf vsilu(vf g) {
    const vi neg = g < 0;
    const vf a = (vf)((neg & (vi)g) | (~neg & (vi)(-g)));  /* -|g| */
    const vf t = vexp_neg(a);
    const vf one = a - a + 1.0f;
    return g * (vf)((neg & (vi)t) | (~neg & (vi)one)) / (one + t);
}

#endif
