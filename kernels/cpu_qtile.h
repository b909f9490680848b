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

/* Bytes of one tile (16 rows x 32 weights) of kind 4, 6 or 8. */
static inline int64_t qt_tile_bytes(int kind) { return kind == 4 ? 256 : kind == 6 ? 384 : 512; }

/* fp16 scales (and mins) per tile: kind 6 has one per 16 weights of a row (two halves of the
 * block: [half][row]), the others one per block of 32 ([row]). */
static inline int64_t qt_scales_per_tile(int kind) { return kind == 6 ? 32 : 16; }

/* Index of the scale of row n (< 16), weights 16 half .. 16 half + 15 of block b of group g. */
static inline int64_t qt_scale_index(int kind, int64_t nb, int64_t g, int64_t b, int half, int n) {
    return (g * nb + b) * qt_scales_per_tile(kind) + (kind == 6 ? 16 * half : 0) + n;
}

/* Quant of weight 4j + e (j < 8, e < 4) of row n (< 16) in one (group, block) tile: kind 4 in
 * [0, 15], kind 6 in [-32, 31] (stored as q + 32: a kind-4 nibble tile then two vectors of the
 * high 2 bits, see cpu_qmm.c), kind 8 in [-127, 127]. */
static inline int qt_quant(int kind, const uint8_t *tile, int j, int n, int e) {
    if (kind == 4 || kind == 6) {
        uint8_t byte = tile[64 * (j & 3) + 4 * n + e];
        int lo = j < 4 ? byte & 0x0F : byte >> 4;
        if (kind == 4) return lo;
        /* high vector j & 1; bits 0-1: j < 2, 2-3: j = 4, 5, 4-5: j = 2, 3, 6-7: j = 6, 7 */
        int shift = (j & 2 ? 4 : 0) + (j & 4 ? 2 : 0);
        return (lo | (((tile[256 + 64 * (j & 1) + 4 * n + e] >> shift) & 3) << 4)) - 32;
    }
    return (int8_t)tile[64 * j + 4 * n + e];
}
#endif
