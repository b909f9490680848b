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

/* fp32 -> IEEE fp16 bits, rounded to nearest even as torch's .to(torch.float16) (F. Giesen's
 * float_to_half_fast3_rtne): overflow to inf, subnormals through one fp32 add, NaN kept quiet. */
static inline uint16_t float_to_half(float f) {
    union { float f; uint32_t u; } v = {f}, magic = {.u = 126u << 23};  /* 0.5: aligns subnormals */
    uint32_t sign = v.u & 0x80000000u;
    v.u ^= sign;
    uint16_t o;
    if (v.u >= (127u + 16) << 23) {                 /* >= 65536: inf or NaN */
        o = v.u > 0x7F800000u ? 0x7E00 : 0x7C00;
    } else if (v.u < 113u << 23) {                  /* below 2^-14: subnormal or zero */
        v.f += magic.f;
        o = (uint16_t)(v.u - magic.u);
    } else {
        uint32_t odd = (v.u >> 13) & 1;
        v.u += ((uint32_t)(15 - 127) << 23) + 0xFFF + odd;
        o = (uint16_t)(v.u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

/* fp32 -> bf16 bits, rounded to nearest even as torch does (NaN -> 0x7FC0). */
static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1)) >> 16);
}

#endif
