/* Run-time dispatch of the quantized matmul (cpu_qmm.c, compiled once per instruction set) and
 * the embedding lookup. Compiled without ISA flags, so this file runs on any x86-64 (or other)
 * CPU; the library built on one machine loads on another that shares the cache folder, and only
 * calls code the CPU it runs on supports (GCC/clang's __builtin_cpu_supports, which also checks
 * that the OS saves the AVX / AVX-512 registers).
 *
 * ISA levels: 0 portable C, 1 AVX2 + FMA + F16C (maddubs dot products), 2 AVX-512 F/BW/VL/DQ + VNNI
 * (dpbusd dot products, 512-bit fp32 tiles).
 */
#include <limits.h>
#include <stdint.h>

#include "cpu_qtile.h"

typedef void (*rf_task)(void *arg, int t, int n);
typedef void (*rf_par)(rf_task fn, void *arg, int n);
typedef int (*qm_fn)(int, const float *, int64_t, int64_t, const uint8_t *, const uint16_t *, const uint16_t *,
                     const float *, int64_t, int64_t, float *, int64_t, int, rf_par, int);

int qm_linear_portable(int, const float *, int64_t, int64_t, const uint8_t *, const uint16_t *, const uint16_t *,
                       const float *, int64_t, int64_t, float *, int64_t, int, rf_par, int);
#ifdef QM_HAVE_AVX2
int qm_linear_avx2(int, const float *, int64_t, int64_t, const uint8_t *, const uint16_t *, const uint16_t *,
                   const float *, int64_t, int64_t, float *, int64_t, int, rf_par, int);
#endif
#ifdef QM_HAVE_AVX512
int qm_linear_avx512(int, const float *, int64_t, int64_t, const uint8_t *, const uint16_t *, const uint16_t *,
                     const float *, int64_t, int64_t, float *, int64_t, int, rf_par, int);
#endif

static rf_par pool;  /* set once by qm_set_pool, before any call */
static int level = -1;

/* The best level this CPU (and this build) supports. */
int qm_supported(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
#ifdef QM_HAVE_AVX512
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        return 2;
#endif
#ifdef QM_HAVE_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
#endif
#endif
    return 0;
}

/* Use `want` (clamped to what is supported; < 0: the best). Returns the level in use. */
int qm_set_level(int want) {
    int best = qm_supported();
    level = want < 0 || want > best ? best : want;
    return level;
}

void qm_set_pool(rf_par par) { pool = par; }

int qm_linear(int kind, const float *x, int64_t ldx, int64_t M, const uint8_t *qs, const uint16_t *d,
              const uint16_t *m, const float *bias, int64_t N, int64_t K, float *y, int64_t ldy, int int_max_m,
              int threads) {
    if (level < 0) qm_set_level(-1);
    /* int_max_m < 0: the level's crossover between the integer and the fp32 panel path (one
     * pmaddubsw multiplies half of a 16-bit activation; one vpdpbusd four bytes) */
    if (int_max_m < 0) int_max_m = level == 2 ? INT_MAX : 128;
    qm_fn fn = qm_linear_portable;
#ifdef QM_HAVE_AVX2
    if (level == 1) fn = qm_linear_avx2;
#endif
#ifdef QM_HAVE_AVX512
    if (level == 2) fn = qm_linear_avx512;
#endif
    return fn(kind, x, ldx, M, qs, d, m, bias, N, K, y, ldy, int_max_m, pool, threads);
}

/* out[i] (K floats) = row ids[i] of the weight dequantized (layout of cpu_qmm.c: groups of 16
 * rows, one tile per block; d and m fp16, one per block or, kind 6, per half block). */
void qm_dequant_rows(int kind, const uint8_t *qs, const uint16_t *d, const uint16_t *m, int64_t K,
                     const int64_t *ids, int64_t n, float *out) {
    int64_t nb = K / 32, tb = qt_tile_bytes(kind);
    for (int64_t i = 0; i < n; i++) {
        int64_t g = ids[i] / 16;
        int r = (int)(ids[i] % 16);
        float *o = out + i * K;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *tile = qs + (g * nb + b) * tb;
            for (int j = 0; j < 8; j++) {
                int64_t sc = qt_scale_index(kind, nb, g, b, j >> 2, r);
                float dv = qt_half_to_float(d[sc]), mv = m ? qt_half_to_float(m[sc]) : 0.f;
                for (int e = 0; e < 4; e++) o[b * 32 + 4 * j + e] = dv * (float)qt_quant(kind, tile, j, r, e) + mv;
            }
        }
    }
}
