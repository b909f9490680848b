/* Scalar math shared by the CPU kernels (included, not compiled on its own). */
#ifndef RADIXFLOW_CPU_MATH_H
#define RADIXFLOW_CPU_MATH_H
#include <stdint.h>

/* exp for x <= 0, vectorizable (no libm call): 2^n * p(r), r = x - n ln2, |r| <= ln2/2, with a
 * degree-6 polynomial; relative error ~2e-7. Returns 0 below -87 (and for -inf). */
static inline float exp_neg(float x) {
    float keep = x > -87.0f ? 1.0f : 0.0f;
    x = x > -87.0f ? x : -87.0f;
    float n = __builtin_roundf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16664891e-2f +
              r * (8.33337382e-3f + r * 1.39575498e-3f)))));
    union { float f; int32_t i; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f * keep;
}

#endif
