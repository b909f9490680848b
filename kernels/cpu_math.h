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

/* fp32 -> fp8 bits, byte for byte torch's casts (c10 fp8e4m3fn_from_fp32_value and
 * fp8e5m2_from_fp32_value as of torch 2.13; older releases gave NaN on e4m3 overflow): rounded to
 * nearest even, subnormals through one fp32 add as in float_to_half, the sign kept (NaN included:
 * 0x7F | sign). e4m3 (float8_e4m3fn, no infinities) saturates: finite overflow and +-inf give
 * +-448 (0x7E); e5m2 overflows to +-inf as fp16 does. The readers are cpu_decode_attention.c's
 * e4m3_to_float / e5m2_to_float. */
static inline uint8_t float_to_e4m3(float f) {
    union { float f; uint32_t u; } v = {f}, magic = {.u = 141u << 23};  /* 2^14: aligns subnormals */
    uint32_t sign = v.u & 0x80000000u;
    v.u ^= sign;
    uint8_t o;
    if (v.u >= 1087u << 20) {                       /* >= 480 (rounds past 448), inf or NaN */
        o = v.u > 0x7F800000u ? 0x7F : 0x7E;
    } else if (v.u < 121u << 23) {                  /* below 2^-6: subnormal or zero */
        v.f += magic.f;
        o = (uint8_t)(v.u - magic.u);
    } else {
        uint32_t odd = (v.u >> 20) & 1;
        v.u += ((uint32_t)(7 - 127) << 23) + 0x7FFFF + odd;
        o = (uint8_t)(v.u >> 20);
        if (o == 0x7F) o = 0x7E;                    /* 464 < |f| < 480 rounds up to the NaN code */
    }
    return (uint8_t)(o | (sign >> 24));
}

static inline uint8_t float_to_e5m2(float f) {
    union { float f; uint32_t u; } v = {f}, magic = {.u = 134u << 23};  /* 2^7: aligns subnormals */
    uint32_t sign = v.u & 0x80000000u;
    v.u ^= sign;
    uint8_t o;
    if (v.u >= 143u << 23) {                        /* >= 65536: inf or NaN */
        o = v.u > 0x7F800000u ? 0x7F : 0x7C;
    } else if (v.u < 113u << 23) {                  /* below 2^-14: subnormal or zero */
        v.f += magic.f;
        o = (uint8_t)(v.u - magic.u);
    } else {
        uint32_t odd = (v.u >> 21) & 1;
        v.u += ((uint32_t)(15 - 127) << 23) + 0xFFFFF + odd;
        o = (uint8_t)(v.u >> 21);                   /* [61440, 65536) carries into inf (0x7C) */
    }
    return (uint8_t)(o | (sign >> 24));
}

#endif
