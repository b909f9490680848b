/* Helpers shared by the quantized kernels (cpu_qmm.c, built once per instruction set) and their
 * dispatcher (cpu_quant.c): fp16 to fp32 in portable C, and one quant of a tile of the layout
 * cpu_qmm.c describes. Header only: every includer gets its own static copies. */
#ifndef RF_CPU_QTILE_H
#define RF_CPU_QTILE_H
#include <stdint.h>
#include <string.h>

/* IEEE half to float, subnormals, infinities and NaN included. */
static inline float qt_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalize */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Quant of weight 4j + e (j < 8, e < 4) of row n (< 16) in one (group, block) tile. */
static inline int qt_quant(int kind, const uint8_t *tile, int j, int n, int e) {
    if (kind == 4) {
        uint8_t byte = tile[64 * (j & 3) + 4 * n + e];
        return j < 4 ? byte & 0x0F : byte >> 4;
    }
    return (int8_t)tile[64 * j + 4 * n + e];
}
#endif
