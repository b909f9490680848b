/* Quantized y = x @ W^T (+ bias) on CPU, W kept in 4- or 8-bit blocks of 32 along K.
 * Compiled three times by radixflow/kernels/cpu_quant.py, never with -march=native: with
 * QM_SUFFIX=portable (no ISA flags), =avx2 (-mavx2 -mfma -mf16c) and =avx512 (+ -mavx512f/bw/vl/dq
 * -mavx512vnni); cpu_quant.c picks one at run time from the CPU's flags. Reference:
 * kernels/reference.py qlinear_ref (exact integer semantics) and F.linear on dequantize(W).
 *
 * Weight layout: rows in groups of 16 (G = ceil(N / 16) groups, padding rows zero), nb = K / 32
 * blocks. One tile per (group g, block b), tiles in (g, b) order, so a group's weights are one
 * contiguous run:
 *   kind 4: 256 bytes = 4 vectors of 64; byte 4n + e of vector v holds, for row n of the group,
 *           q[32b + 4v + e] in its low nibble and q[32b + 4(v + 4) + e] in its high nibble,
 *           q unsigned in [0, 15];        value = d * q + m
 *   kind 6: 384 bytes: q + 32 in [0, 63] (GGUF Q6_K), its low nibbles as a kind-4 tile, then 2
 *           vectors of the high 2 bits: byte 4n + e of vector u (0, 1) holds those of weight
 *           4j + e for j = u in bits 0-1, j = u + 4 in bits 2-3, j = u + 2 in bits 4-5 and
 *           j = u + 6 in bits 6-7 (one shift and one mask put each at bits 4-5 of its nibble's
 *           byte);                         value = d_half * q + m_half
 *   kind 8: 512 bytes = 8 vectors of 64; byte 4n + e of vector j = q[32b + 4j + e] as int8.
 *   d, m: fp16, 16 per tile (one per row of the group), at (g * nb + b) * 16 + n. m may be NULL.
 *   Kind 6 has 32 per tile, one per row and half of the block (weights 0-15 and 16-31, vectors
 *   0-3 and 4-7), at (g * nb + b) * 32 + 16 half + n (cpu_qtile.h qt_scale_index).
 * Four consecutive weights of one row share an int32 lane, and a vector holds 16 rows: one VNNI
 * vpdpbusd multiplies 4 weights of each of 16 rows by 4 activations broadcast to every lane, and
 * the per-block scales of the 16 rows are one vector load. No horizontal sums, no shuffles.
 *
 * Two paths. Few rows (M < int_max_m, decoding): x is quantized per block to 16 bits (scale
 * dx = amax / QMAX, q = rint(x / dx); 8-bit activations as llama.cpp's cost 4% top-1 agreement on
 * a 135M model), split as q = 256 h + l with h, l signed bytes, and the block dot products are
 * integer: qw . q = 256 (qw . h) + (qw . l). The unsigned operand of vpdpbusd is the weight: kind 4
 * quants are unsigned already, kind 6 ones are stored as q + 32 and corrected by -32 sum(q) per
 * half, kind 8 ones are flipped to q + 128 and corrected by -128 sum(q)).
 * y = sum_b d_w dx (qw . qx) + sum_b m_w dx sum(qx). More rows (prefill): every thread dequantizes
 * one group's 16 rows into an fp32 panel (K-major, in cache) and runs an fp32 FMA tile over all
 * rows of x: no fp32 copy of W is ever kept.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_qtile.h"

#define QK 32
#define QMAX 32639.f /* activations: 16 bits per block of 32, as 256 h + l with h, l in [-128, 127] */
#define NR 16        /* rows per group */
#define QM_CAT2(a, b) a##_##b
#define QM_CAT(a, b) QM_CAT2(a, b)
#define QM_FN(name) QM_CAT(name, QM_SUFFIX)

typedef void (*rf_task)(void *arg, int t, int n);
typedef void (*rf_par)(rf_task fn, void *arg, int n);

typedef struct {
    int kind;
    const float *x;
    int64_t ldx, M, N, K, nb, ldy;
    const uint8_t *qs;
    const uint16_t *d, *m;
    const float *bias;
    float *y;
    const int8_t *xh, *xl; /* int path: (M, K) high and low bytes of the quantized activations */
    const float *xd;       /* (M, nb) dx */
    const float *xs;       /* (M, nb) dx * sum(qx) */
    const float *xs2;      /* (M, nb, 2) dx * sum(qx) over each half of the block (kind 6) */
    const int16_t *xq;     /* AVX2 and kind 8 only: (M, K) the quantized activations whole */
    float *panels;         /* fp32 path: one (K, NR) panel per thread */
} qm_args;

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return qt_half_to_float(h);
#endif
}

/* ---- activation quantization ------------------------------------------------------------- */
typedef struct {
    const float *x;
    int64_t ldx, M, K;
    int8_t *xh, *xl;
    float *xd, *xs, *xs2;
    int16_t *xq; /* NULL, or (M, K): also keep q whole (256 h + l) */
} qx_args;

/* One block of 32: dx = amax / QMAX, q = rint(x / dx) (the CPU's round-to-nearest-even, as
 * rintf), split into h and l; sums[0], sums[1]: sum(q) over the halves. */
static inline void quantize_block(const float *v, int8_t *h, int8_t *l, float *dx_out, int sums[2]) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float dx = amax / QMAX, id = amax > 0 ? 1.f / dx : 0.f;
    const __m512i hi = _mm512_set1_epi32(32639), lo = _mm512_set1_epi32(-32639);
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    q0 = _mm512_max_epi32(_mm512_min_epi32(q0, hi), lo);
    q1 = _mm512_max_epi32(_mm512_min_epi32(q1, hi), lo);
    __m512i l0 = _mm512_srai_epi32(_mm512_slli_epi32(q0, 24), 24), l1 = _mm512_srai_epi32(_mm512_slli_epi32(q1, 24), 24);
    _mm_storeu_si128((__m128i *)l, _mm512_cvtepi32_epi8(l0));
    _mm_storeu_si128((__m128i *)(l + 16), _mm512_cvtepi32_epi8(l1));
    _mm_storeu_si128((__m128i *)h, _mm512_cvtepi32_epi8(_mm512_srai_epi32(_mm512_sub_epi32(q0, l0), 8)));
    _mm_storeu_si128((__m128i *)(h + 16), _mm512_cvtepi32_epi8(_mm512_srai_epi32(_mm512_sub_epi32(q1, l1), 8)));
    *dx_out = dx;
    sums[0] = _mm512_reduce_add_epi32(q0);
    sums[1] = _mm512_reduce_add_epi32(q1);
#else
    float amax = 0.f;
    for (int j = 0; j < QK; j++) {
        float a = v[j] < 0 ? -v[j] : v[j];
        amax = a > amax ? a : amax;
    }
    float dx = amax / QMAX, id = amax > 0 ? 1.f / dx : 0.f;
    sums[0] = sums[1] = 0;
    for (int j = 0; j < QK; j++) {
        int q = (int)__builtin_rintf(v[j] * id);
        q = q > 32639 ? 32639 : q < -32639 ? -32639 : q; /* rounding of amax * (1 / dx) */
        int8_t lo = (int8_t)(uint8_t)(q & 0xFF);
        l[j] = lo;
        h[j] = (int8_t)((q - lo) >> 8);
        sums[j >> 4] += q;
    }
    *dx_out = dx;
#endif
}

static void quantize_part(void *p, int t, int T) {
    const qx_args *a = p;
    int64_t nb = a->K / QK;
    for (int64_t i = a->M * t / T; i < a->M * (t + 1) / T; i++) {
        for (int64_t b = 0; b < nb; b++) {
            float dx;
            int sums[2];
            quantize_block(a->x + i * a->ldx + b * QK, a->xh + i * a->K + b * QK, a->xl + i * a->K + b * QK, &dx,
                           sums);
            a->xd[i * nb + b] = dx;
            a->xs[i * nb + b] = dx * (float)(sums[0] + sums[1]);
            a->xs2[2 * (i * nb + b)] = dx * (float)sums[0];
            a->xs2[2 * (i * nb + b) + 1] = dx * (float)sums[1];
            if (a->xq) {
                const int8_t *h = a->xh + i * a->K + b * QK, *l = a->xl + i * a->K + b * QK;
                int16_t *q = a->xq + i * a->K + b * QK;
                for (int j = 0; j < QK; j++) q[j] = (int16_t)(256 * h[j] + l[j]);
            }
        }
    }
}

/* ---- the integer path: one group of 16 weight rows against R rows of x -------------------- */
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define IR 4 /* rows of x per pass */
/* The 8 weight vectors of one tile as unsigned bytes (vector j: weights 4j .. 4j + 3 of 16 rows):
 * kind 4 q, kind 6 q + 32, kind 8 q + 128. */
static inline __attribute__((always_inline)) void load_tile512(int kind, const uint8_t *tile, __m512i w[8]) {
    const __m512i lo4 = _mm512_set1_epi8(0x0F), hi2 = _mm512_set1_epi8(0x30);
    if (kind == 8) {
        for (int j = 0; j < 8; j++)
            w[j] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(tile + 64 * j)), _mm512_set1_epi8((char)0x80));
        return;
    }
    for (int v = 0; v < 4; v++) {
        __m512i raw = _mm512_loadu_si512((const void *)(tile + 64 * v));
        w[v] = _mm512_and_si512(raw, lo4);
        w[v + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), lo4);
    }
    if (kind == 6) { /* the high 2 bits to bits 4-5 of each byte (16-bit shifts: the mask drops what crosses) */
        for (int u = 0; u < 2; u++) {
            __m512i hv = _mm512_loadu_si512((const void *)(tile + 256 + 64 * u));
            w[u] = _mm512_or_si512(w[u], _mm512_and_si512(_mm512_slli_epi16(hv, 4), hi2));
            w[u + 4] = _mm512_or_si512(w[u + 4], _mm512_and_si512(_mm512_slli_epi16(hv, 2), hi2));
            w[u + 2] = _mm512_or_si512(w[u + 2], _mm512_and_si512(hv, hi2));
            w[u + 6] = _mm512_or_si512(w[u + 6], _mm512_and_si512(_mm512_srli_epi16(hv, 2), hi2));
        }
    }
}

/* Integer dot products of the 16 rows' weights j0 .. j0 + 3 with 16 activations h, l: 256 h + l. */
static inline __attribute__((always_inline)) __m512 dot_half512(const __m512i w[8], int j0, const int8_t *h,
                                                                const int8_t *l) {
    __m512i sh = _mm512_setzero_si512(), sl = _mm512_setzero_si512();
    for (int j = j0; j < j0 + 4; j++) {
        int32_t hj, lj;
        memcpy(&hj, h + 4 * j, 4);
        memcpy(&lj, l + 4 * j, 4);
        sh = _mm512_dpbusd_epi32(sh, w[j], _mm512_set1_epi32(hj));
        sl = _mm512_dpbusd_epi32(sl, w[j], _mm512_set1_epi32(lj));
    }
    return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(sh, 8), sl));
}

static inline __attribute__((always_inline)) void int_group(const qm_args *a, int64_t g, int64_t r, const int R,
                                                            float *out) {
    __m512 acc[IR];
    for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
    const int kind = a->kind;
    const int64_t nb = a->nb, tb = qt_tile_bytes(kind), spt = qt_scales_per_tile(kind);
    const uint8_t *tile = a->qs + g * nb * tb;
    const uint16_t *dg = a->d + g * nb * spt, *mg = a->m ? a->m + g * nb * spt : NULL;
    for (int64_t b = 0; b < nb; b++, tile += tb) {
        __m512i w[8];
        load_tile512(kind, tile, w);
        _mm_prefetch((const char *)(tile + 4 * tb), _MM_HINT_T0);
        if (kind == 6) { /* two scales (and mins) per row and block: one per half */
            __m512 dv0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dg + b * 32)));
            __m512 dv1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dg + b * 32 + 16)));
            for (int i = 0; i < R; i++) {
                const int8_t *h = a->xh + (r + i) * a->K + b * QK, *l = a->xl + (r + i) * a->K + b * QK;
                __m512 dx = _mm512_set1_ps(a->xd[(r + i) * nb + b]);
                float xs0 = a->xs2[2 * ((r + i) * nb + b)], xs1 = a->xs2[2 * ((r + i) * nb + b) + 1];
                /* the weights were stored as q + 32: take 32 sum(qx) of each half back out */
                __m512 t0 = _mm512_fmadd_ps(dot_half512(w, 0, h, l), dx, _mm512_set1_ps(-32.f * xs0));
                __m512 t1 = _mm512_fmadd_ps(dot_half512(w, 4, h, l), dx, _mm512_set1_ps(-32.f * xs1));
                acc[i] = _mm512_fmadd_ps(dv1, t1, _mm512_fmadd_ps(dv0, t0, acc[i]));
                if (mg) {
                    __m512 mv0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mg + b * 32)));
                    __m512 mv1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mg + b * 32 + 16)));
                    acc[i] = _mm512_fmadd_ps(mv1, _mm512_set1_ps(xs1), _mm512_fmadd_ps(mv0, _mm512_set1_ps(xs0), acc[i]));
                }
            }
            continue;
        }
        __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dg + b * NR)));
        __m512 mv = mg ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mg + b * NR))) : _mm512_setzero_ps();
        for (int i = 0; i < R; i++) {
            const int8_t *h = a->xh + (r + i) * a->K + b * QK, *l = a->xl + (r + i) * a->K + b * QK;
            __m512i sh = _mm512_setzero_si512(), sl = _mm512_setzero_si512();
            for (int j = 0; j < 8; j++) {
                int32_t hj, lj;
                memcpy(&hj, h + 4 * j, 4);
                memcpy(&lj, l + 4 * j, 4);
                sh = _mm512_dpbusd_epi32(sh, w[j], _mm512_set1_epi32(hj));
                sl = _mm512_dpbusd_epi32(sl, w[j], _mm512_set1_epi32(lj));
            }
            __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(sh, 8), sl));
            float dx = a->xd[(r + i) * nb + b], xs = a->xs[(r + i) * nb + b];
            /* kind 8: the weights were flipped to q + 128: take 128 sum(qx) back out */
            __m512 t = kind == 4 ? _mm512_mul_ps(dot, _mm512_set1_ps(dx))
                                 : _mm512_fmadd_ps(dot, _mm512_set1_ps(dx), _mm512_set1_ps(-128.f * xs));
            acc[i] = _mm512_fmadd_ps(dv, t, acc[i]);
            if (mg) acc[i] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs), acc[i]);
        }
    }
    for (int i = 0; i < R; i++) _mm512_storeu_ps(out + i * NR, acc[i]);
}
#elif defined(__AVX2__)
#define IR 4
/* Kinds 4 and 8, rows r .. r + R - 1 of x against one group: for each half of the group's rows
 * (8 rows, one 256-bit vector), each weight vector is expanded once and used by all R rows (j
 * outer, rows inner), so the R rows' accumulators stay in registers.
 *   kind 4: u8 weights (at most 15) times the s8 activation bytes h and l (pmaddubsw pairs, at
 *           most 2 * 15 * 128): the 8 vectors of a block add up in int16 (at most 30720) before
 *           one pmaddwd widens them;
 *   kind 8: the 16-bit activations whole against sign-extended weights (pmaddwd, 4 rows per
 *           vector; |w q| sums stay far below 2^31), no sign trick. */
static inline __attribute__((always_inline)) void int_group48(const qm_args *a, int64_t g, int64_t r, const int R,
                                                              float *out) {
    const int kind = a->kind;
    const int64_t nb = a->nb, tb = qt_tile_bytes(kind), K = a->K;
    const uint8_t *tiles = a->qs + g * nb * tb;
    const uint16_t *dg = a->d + g * nb * NR, *mg = a->m ? a->m + g * nb * NR : NULL;
    const __m256i lo4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int half = 0; half < 2; half++) { /* rows 8 half .. 8 half + 7 */
        __m256 acc[IR];
        for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *t = tiles + b * tb + 32 * half;
            __m256i s[IR], u[IR]; /* kind 4: int16 pair sums of h (s) and l (u); kind 8: int32 rows 0-3, 4-7 */
            for (int i = 0; i < R; i++) s[i] = u[i] = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) {
                if (kind == 4) {
                    __m256i raw = _mm256_loadu_si256((const __m256i *)(t + 64 * (j & 3)));
                    __m256i w = j < 4 ? _mm256_and_si256(raw, lo4) : _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4);
                    for (int i = 0; i < R; i++) {
                        int32_t hj, lj;
                        memcpy(&hj, a->xh + (r + i) * K + b * QK + 4 * j, 4);
                        memcpy(&lj, a->xl + (r + i) * K + b * QK + 4 * j, 4);
                        s[i] = _mm256_add_epi16(s[i], _mm256_maddubs_epi16(w, _mm256_set1_epi32(hj)));
                        u[i] = _mm256_add_epi16(u[i], _mm256_maddubs_epi16(w, _mm256_set1_epi32(lj)));
                    }
                } else {
                    __m256i w03 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(t + 64 * j)));
                    __m256i w47 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(t + 64 * j + 16)));
                    for (int i = 0; i < R; i++) {
                        int64_t qj;
                        memcpy(&qj, a->xq + (r + i) * K + b * QK + 4 * j, 8);
                        __m256i xv = _mm256_set1_epi64x(qj); /* q[4j .. 4j + 3] in every row's 4 int16 */
                        s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(w03, xv));
                        u[i] = _mm256_add_epi32(u[i], _mm256_madd_epi16(w47, xv));
                    }
                }
            }
            __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dg + b * NR + 8 * half)));
            __m256 mv = mg ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mg + b * NR + 8 * half)))
                           : _mm256_setzero_ps();
            for (int i = 0; i < R; i++) {
                __m256i d32;
                if (kind == 4) {
                    d32 = _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(s[i], ones), 8),
                                           _mm256_madd_epi16(u[i], ones));
                } else { /* two pair sums per row: hadd gives rows 0 1 4 5 | 2 3 6 7 */
                    d32 = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(s[i], u[i]),
                                                      _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
                }
                float dx = a->xd[(r + i) * nb + b], xs = a->xs[(r + i) * nb + b];
                acc[i] = _mm256_fmadd_ps(dv, _mm256_mul_ps(_mm256_cvtepi32_ps(d32), _mm256_set1_ps(dx)), acc[i]);
                if (mg) acc[i] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs), acc[i]);
            }
        }
        for (int i = 0; i < R; i++) _mm256_storeu_ps(out + i * NR + 8 * half, acc[i]);
    }
}

/* Kind 6: rows 8 half .. 8 half + 7 of one tile as u8 q + 32 (vector j: weights 4j .. 4j + 3):
 * the nibbles, then the high 2 bits to bits 4-5 of each byte (cpu_qmm.c's layout). */
static inline __attribute__((always_inline)) void load_tile6_256(const uint8_t *tile, int half, __m256i w[8]) {
    const __m256i lo4 = _mm256_set1_epi8(0x0F), hi2 = _mm256_set1_epi8(0x30);
    for (int v = 0; v < 4; v++) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)(tile + 64 * v + 32 * half));
        w[v] = _mm256_and_si256(raw, lo4);
        w[v + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4);
    }
    for (int u = 0; u < 2; u++) {
        __m256i hv = _mm256_loadu_si256((const __m256i *)(tile + 256 + 64 * u + 32 * half));
        w[u] = _mm256_or_si256(w[u], _mm256_and_si256(_mm256_slli_epi16(hv, 4), hi2));
        w[u + 4] = _mm256_or_si256(w[u + 4], _mm256_and_si256(_mm256_slli_epi16(hv, 2), hi2));
        w[u + 2] = _mm256_or_si256(w[u + 2], _mm256_and_si256(hv, hi2));
        w[u + 6] = _mm256_or_si256(w[u + 6], _mm256_and_si256(_mm256_srli_epi16(hv, 2), hi2));
    }
}

/* Kind 6: integer dot products of 8 rows' weights j0 .. j0 + 3 with activations 256 h + l; u8
 * weights of at most 63 times s8 bytes: two pmaddubsw pair sums (at most 2 * 63 * 128 each) add
 * up in int16 before each pmaddwd. */
static inline __attribute__((always_inline)) __m256 dot6_256(const __m256i w[8], int j0, const int8_t *h,
                                                             const int8_t *l) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i sh = _mm256_setzero_si256(), sl = _mm256_setzero_si256();
    for (int j = j0; j < j0 + 4; j += 2) {
        int32_t h0, h1, l0, l1;
        memcpy(&h0, h + 4 * j, 4);
        memcpy(&h1, h + 4 * j + 4, 4);
        memcpy(&l0, l + 4 * j, 4);
        memcpy(&l1, l + 4 * j + 4, 4);
        __m256i ph = _mm256_add_epi16(_mm256_maddubs_epi16(w[j], _mm256_set1_epi32(h0)),
                                      _mm256_maddubs_epi16(w[j + 1], _mm256_set1_epi32(h1)));
        __m256i pl = _mm256_add_epi16(_mm256_maddubs_epi16(w[j], _mm256_set1_epi32(l0)),
                                      _mm256_maddubs_epi16(w[j + 1], _mm256_set1_epi32(l1)));
        sh = _mm256_add_epi32(sh, _mm256_madd_epi16(ph, ones));
        sl = _mm256_add_epi32(sl, _mm256_madd_epi16(pl, ones));
    }
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(sh, 8), sl));
}

/* Kind 6: a scale and min per half of the block (k): weights 16 k .. 16 k + 15. */
static inline __attribute__((always_inline)) void int_group6(const qm_args *a, int64_t g, int64_t r, const int R,
                                                             float *out) {
    __m256 acc[IR][2];
    for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const int64_t nb = a->nb, tb = qt_tile_bytes(6);
    const uint8_t *tile = a->qs + g * nb * tb;
    const uint16_t *dg = a->d + g * nb * 32, *mg = a->m ? a->m + g * nb * 32 : NULL;
    for (int64_t b = 0; b < nb; b++, tile += tb) {
        for (int half = 0; half < 2; half++) { /* rows 8 half .. 8 half + 7 */
            const uint16_t *ds = dg + b * 32 + 8 * half, *ms = mg ? mg + b * 32 + 8 * half : NULL;
            __m256i w[8];
            load_tile6_256(tile, half, w);
            __m256 dv0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)ds));
            __m256 dv1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ds + 16)));
            for (int i = 0; i < R; i++) {
                const int8_t *h = a->xh + (r + i) * a->K + b * QK, *l = a->xl + (r + i) * a->K + b * QK;
                __m256 dx = _mm256_set1_ps(a->xd[(r + i) * nb + b]);
                float xs0 = a->xs2[2 * ((r + i) * nb + b)], xs1 = a->xs2[2 * ((r + i) * nb + b) + 1];
                /* the weights were stored as q + 32: take 32 sum(qx) of each half back out */
                __m256 t0 = _mm256_fmadd_ps(dot6_256(w, 0, h, l), dx, _mm256_set1_ps(-32.f * xs0));
                __m256 t1 = _mm256_fmadd_ps(dot6_256(w, 4, h, l), dx, _mm256_set1_ps(-32.f * xs1));
                acc[i][half] = _mm256_fmadd_ps(dv1, t1, _mm256_fmadd_ps(dv0, t0, acc[i][half]));
                if (ms) {
                    __m256 mv0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)ms));
                    __m256 mv1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ms + 16)));
                    acc[i][half] = _mm256_fmadd_ps(mv1, _mm256_set1_ps(xs1),
                                                   _mm256_fmadd_ps(mv0, _mm256_set1_ps(xs0), acc[i][half]));
                }
            }
        }
    }
    for (int i = 0; i < R; i++) {
        _mm256_storeu_ps(out + i * NR, acc[i][0]);
        _mm256_storeu_ps(out + i * NR + 8, acc[i][1]);
    }
}

static inline __attribute__((always_inline)) void int_group(const qm_args *a, int64_t g, int64_t r, const int R,
                                                            float *out) {
    if (a->kind == 6) int_group6(a, g, r, R, out);
    else int_group48(a, g, r, R, out);
}
#else
#define IR 4
static void int_group(const qm_args *a, int64_t g, int64_t r, const int R, float *out) {
    const int64_t nb = a->nb, tb = qt_tile_bytes(a->kind);
    for (int i = 0; i < R; i++) {
        float acc[NR] = {0};
        const int8_t *h = a->xh + (r + i) * a->K, *l = a->xl + (r + i) * a->K;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *tile = a->qs + (g * nb + b) * tb;
            float dx = a->xd[(r + i) * nb + b];
            for (int n = 0; n < NR; n++) {
                for (int half = 0; half < 2; half++) { /* kinds 4 and 8 read their one scale twice */
                    int32_t s = 0;
                    for (int j = 4 * half; j < 4 * half + 4; j++) {
                        for (int e = 0; e < 4; e++) {
                            int k = b * QK + 4 * j + e;
                            s += qt_quant(a->kind, tile, j, n, e) * (256 * h[k] + l[k]);
                        }
                    }
                    int64_t sc = qt_scale_index(a->kind, nb, g, b, half, n);
                    acc[n] += half_to_float(a->d[sc]) * dx * (float)s;
                    if (a->m) acc[n] += half_to_float(a->m[sc]) * a->xs2[2 * ((r + i) * nb + b) + half];
                }
            }
        }
        memcpy(out + i * NR, acc, sizeof acc);
    }
}
#endif

/* Rows of x per block of the int path's loop: their quantized activations (3 bytes a value, 64
 * rows of K = 1536: 288 KB) stay in L2 while every group of W streams past them, instead of
 * every group streaming all M rows from L3 (prefill). */
#define RB 64

static void int_part(void *p, int t, int T) {
    const qm_args *a = p;
    int64_t G = (a->N + NR - 1) / NR;
    float out[IR * NR];
    /* many rows: each thread takes a share of the row blocks and every group; few: a share of
     * the groups and every row */
    const int by_rows = a->M >= (int64_t)RB * T;
    int64_t nrb = (a->M + RB - 1) / RB;
    int64_t b0 = by_rows ? nrb * t / T : 0, b1 = by_rows ? nrb * (t + 1) / T : nrb;
    int64_t g0 = by_rows ? 0 : G * t / T, g1 = by_rows ? G : G * (t + 1) / T;
    for (int64_t r0 = b0 * RB; r0 < b1 * RB && r0 < a->M; r0 += RB) {
        int64_t r1 = a->M - r0 < RB ? a->M : r0 + RB;
        for (int64_t g = g0; g < g1; g++) {
            int nv = a->N - g * NR < NR ? (int)(a->N - g * NR) : NR;
            for (int64_t r = r0; r < r1; r += IR) {
                int R = r1 - r < IR ? (int)(r1 - r) : IR;
                switch (R) { /* constant R: the loops unroll and the accumulators stay in registers */
                    case 1: int_group(a, g, r, 1, out); break;
#if IR > 2
                    case 2: int_group(a, g, r, 2, out); break;
                    case 3: int_group(a, g, r, 3, out); break;
#endif
                    default: int_group(a, g, r, IR, out); break;
                }
                for (int i = 0; i < R; i++) {
                    float *dst = a->y + (r + i) * a->ldy + g * NR;
                    for (int n = 0; n < nv; n++) dst[n] = out[i * NR + n] + (a->bias ? a->bias[g * NR + n] : 0.f);
                }
            }
        }
    }
}

/* ---- the fp32 panel path ----------------------------------------------------------------- */
/* panel[k * NR + n] = W[16 g + n][k] (padding rows are zero in the layout). */
static void dequant_panel(const qm_args *a, int64_t g, float *panel) {
    const int64_t nb = a->nb, tb = qt_tile_bytes(a->kind);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *tile = a->qs + (g * nb + b) * tb;
        float *dst = panel + b * QK * NR;
#if defined(__AVX512F__)
        if (a->kind != 6) {
            const uint16_t *dp = a->d + (g * nb + b) * NR, *mp = a->m ? a->m + (g * nb + b) * NR : NULL;
            __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dp));
            __m512 mv = mp ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)mp)) : _mm512_setzero_ps();
            for (int j = 0; j < 8; j++) {
                /* lane n holds bytes 4n .. 4n + 3: weights 4j .. 4j + 3 of row n */
                __m512i v = _mm512_loadu_si512((const void *)(tile + 64 * (a->kind == 4 ? (j & 3) : j)));
                for (int e = 0; e < 4; e++) {
                    __m512i q;
                    if (a->kind == 4)
                        q = _mm512_and_si512(_mm512_srli_epi32(v, 8 * e + (j < 4 ? 0 : 4)), _mm512_set1_epi32(0x0F));
                    else
                        q = _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * e), 24);
                    _mm512_store_ps(dst + (4 * j + e) * NR, _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), dv, mv));
                }
            }
            continue;
        }
#endif
        /* kind 6 (the panel path only runs with int_max_m = 0) and the portable build */
        for (int half = 0; half < 2; half++) {
            float dv[NR], mv[NR];
            for (int n = 0; n < NR; n++) {
                int64_t sc = qt_scale_index(a->kind, nb, g, b, half, n);
                dv[n] = half_to_float(a->d[sc]);
                mv[n] = a->m ? half_to_float(a->m[sc]) : 0.f;
            }
            for (int j = 4 * half; j < 4 * half + 4; j++) {
                for (int e = 0; e < 4; e++) {
                    float *row = dst + (4 * j + e) * NR;
                    for (int n = 0; n < NR; n++) row[n] = dv[n] * (float)qt_quant(a->kind, tile, j, n, e) + mv[n];
                }
            }
        }
    }
}

#if defined(__AVX512F__)
#define MR 8
static inline __attribute__((always_inline)) void fp_tile(int m, const float *x, int64_t ldx, const float *panel,
                                                          int64_t K, float *acc) {
    __m512 c[MR];
    for (int i = 0; i < m; i++) c[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 b = _mm512_load_ps(panel + k * NR);
        for (int i = 0; i < m; i++) c[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), b, c[i]);
    }
    for (int i = 0; i < m; i++) _mm512_storeu_ps(acc + i * NR, c[i]);
}
#elif defined(__AVX2__)
#define MR 6
static inline __attribute__((always_inline)) void fp_tile(int m, const float *x, int64_t ldx, const float *panel,
                                                          int64_t K, float *acc) {
    __m256 c0[MR], c1[MR];
    for (int i = 0; i < m; i++) c0[i] = c1[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 b0 = _mm256_load_ps(panel + k * NR), b1 = _mm256_load_ps(panel + k * NR + 8);
        for (int i = 0; i < m; i++) {
            __m256 av = _mm256_broadcast_ss(x + i * ldx + k);
            c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
        }
    }
    for (int i = 0; i < m; i++) {
        _mm256_storeu_ps(acc + i * NR, c0[i]);
        _mm256_storeu_ps(acc + i * NR + 8, c1[i]);
    }
}
#else
#define MR 4
static inline void fp_tile(int m, const float *x, int64_t ldx, const float *panel, int64_t K, float *acc) {
    for (int i = 0; i < m; i++) {
        float c[NR] = {0};
        for (int64_t k = 0; k < K; k++)
            for (int j = 0; j < NR; j++) c[j] += x[i * ldx + k] * panel[k * NR + j];
        memcpy(acc + i * NR, c, sizeof c);
    }
}
#endif

static void fp_tile_any(int m, const float *x, int64_t ldx, const float *panel, int64_t K, float *acc) {
    switch (m) {
        case 1: fp_tile(1, x, ldx, panel, K, acc); break;
        case 2: fp_tile(2, x, ldx, panel, K, acc); break;
        case 3: fp_tile(3, x, ldx, panel, K, acc); break;
#if MR > 4
        case 4: fp_tile(4, x, ldx, panel, K, acc); break;
        case 5: fp_tile(5, x, ldx, panel, K, acc); break;
#endif
#if MR > 6
        case 6: fp_tile(6, x, ldx, panel, K, acc); break;
        case 7: fp_tile(7, x, ldx, panel, K, acc); break;
#endif
        default: fp_tile(MR, x, ldx, panel, K, acc); break;
    }
}

static void fp_part(void *p, int t, int T) {
    const qm_args *a = p;
    int64_t G = (a->N + NR - 1) / NR;
    float *panel = a->panels + (int64_t)t * a->K * NR;
    float acc[MR * NR];
    for (int64_t g = G * t / T; g < G * (t + 1) / T; g++) {
        int64_t n0 = g * NR;
        int nv = a->N - n0 < NR ? (int)(a->N - n0) : NR;
        dequant_panel(a, g, panel);
        for (int64_t r = 0; r < a->M; r += MR) {
            int m = a->M - r < MR ? (int)(a->M - r) : MR;
            fp_tile_any(m, a->x + r * a->ldx, a->ldx, panel, a->K, acc);
            for (int i = 0; i < m; i++) {
                float *dst = a->y + (r + i) * a->ldy + n0;
                for (int j = 0; j < nv; j++) dst[j] = acc[i * NR + j] + (a->bias ? a->bias[n0 + j] : 0.f);
            }
        }
    }
}

/* Returns 0, or -1 when scratch memory could not be allocated. `par` runs a task on the kernels'
 * thread pool (cpu_pool.c's rf_parallel) or is NULL (one thread). d and m are fp16. */
int QM_FN(qm_linear)(int kind, const float *x, int64_t ldx, int64_t M, const uint8_t *qs, const uint16_t *d,
                     const uint16_t *m, const float *bias, int64_t N, int64_t K, float *y, int64_t ldy,
                     int int_max_m, rf_par par, int threads) {
    qm_args a = {kind, x, ldx, M, N, K, K / QK, ldy, qs, d, m, bias, y, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    int64_t G = (N + NR - 1) / NR;
    int T = G < threads ? (int)G : threads;
    if (T < 1 || !par) T = 1;
    if (M < int_max_m) {
#if defined(__AVX2__) && !(defined(__AVX512BW__) && defined(__AVX512VNNI__))
        const int whole = kind == 8;  /* the AVX2 kind-8 path reads q whole (int16) */
#else
        const int whole = 0;
#endif
        int8_t *xb = malloc((size_t)((whole ? 4 : 2) * M * K) + 64);
        float *xf = malloc(sizeof(float) * (size_t)(4 * M * a.nb + 1));
        if (!xb || !xf) {
            free(xb);
            free(xf);
            return -1;
        }
        qx_args qa = {x, ldx, M, K, xb, xb + M * K, xf, xf + M * a.nb, xf + 2 * M * a.nb,
                      whole ? (int16_t *)(xb + 2 * M * K) : NULL};
        int TQ = M < 16 || !par ? 1 : threads;  /* rows split among the threads when there are many */
        if (TQ > 1) par(quantize_part, &qa, TQ); else quantize_part(&qa, 0, 1);
        a.xh = xb;
        a.xl = xb + M * K;
        a.xd = xf;
        a.xs = xf + M * a.nb;
        a.xs2 = xf + 2 * M * a.nb;
        a.xq = qa.xq;
        if (T > 1) par(int_part, &a, T); else int_part(&a, 0, 1);  /* one caller per pool call */
        free(xb);
        free(xf);
        return 0;
    }
    a.panels = aligned_alloc(64, (size_t)T * K * NR * sizeof(float));  /* K % 32 == 0: a multiple of 64 */
    if (!a.panels) return -1;
    if (T > 1) par(fp_part, &a, T); else fp_part(&a, 0, 1);
    free(a.panels);
    return 0;
}
