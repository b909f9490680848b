/* Quantized y = x @ W^T (+ bias) on CPU, W kept in 4- or 8-bit blocks of 32 along K.
 * Compiled three times by radixflow/kernels/cpu_quant.py, never with -march=native: with
 * QM_SUFFIX=portable (no ISA flags), =avx2 (-mavx2 -mfma -mf16c) and =avx512 (+ -mavx512f/bw/vl/dq
 * -mavx512vnni); cpu_quant.c picks one at run time from the CPU's flags. Reference:
 * kernels/reference.py qlinear_ref (exact integer semantics) and F.linear on dequantize(W).
 *
 * Weight layout (one row of W per output column n, nb = K / 32 blocks, nbp = nb rounded up to even):
 *   kind 4: qs (N, nbp * 16) bytes, pairs of blocks: byte j of pair p = q[2p][j] | q[2p+1][j] << 4,
 *           q unsigned in [0, 15];       value = d[n][b] * q + m[n][b]
 *   kind 8: qs (N, K) int8, block-major;  value = d[n][b] * q + m[n][b]
 *   d, m: (N, nbp) fp32 (padding blocks 0). m may be NULL (all zero).
 * Two paths. Few rows (M < 8, decoding): x is quantized per block to int16 (scale dx = amax / 32767,
 * q = rint(x / dx); int8 activations as llama.cpp's cost 4% top-1 agreement on a 135M model) and
 * the block dot products are integer (AVX-512: the block's 32 weights widened to int16 in one
 * register, VNNI vpdpwssd; AVX2: pmaddwd): y = sum_b d_w dx (qw . qx) + sum_b m_w dx sum(qx). More rows
 * (prefill): every thread dequantizes a panel of 16 columns of W into fp32 (K-major, in cache) and
 * runs an fp32 FMA tile over all rows: no fp32 copy of W is ever kept.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QK 32
#define QMAX 32767.f  /* activations: int16 per block of 32 */
#define NR 16
#define QM_CAT2(a, b) a##_##b
#define QM_CAT(a, b) QM_CAT2(a, b)
#define QM_FN(name) QM_CAT(name, QM_SUFFIX)

typedef void (*rf_task)(void *arg, int t, int n);
typedef void (*rf_par)(rf_task fn, void *arg, int n);

typedef struct {
    int kind;
    const float *x;
    int64_t ldx, M, N, K, nbp, ldy;
    const uint8_t *qs;
    const float *d, *m, *bias;
    float *y;
    const int16_t *xq; /* int path: (M, nbp * 32) */
    const float *xd;    /* (M, nbp) */
    const float *xs;    /* (M, nbp): dx * sum(qx) */
    float *panels;      /* fp32 path: one (K, NR) panel per thread */
} qm_args;

/* ---- activation quantization ------------------------------------------------------------- */
static void quantize_rows(const float *x, int64_t ldx, int64_t M, int64_t K, int64_t nbp, int16_t *xq,
                          float *xd, float *xs) {
    int64_t nb = K / QK;
    for (int64_t i = 0; i < M; i++) {
        for (int64_t b = 0; b < nbp; b++) {
            int16_t *q = xq + (i * nbp + b) * QK;
            if (b >= nb) {
                memset(q, 0, QK * sizeof(int16_t));
                xd[i * nbp + b] = xs[i * nbp + b] = 0.f;
                continue;
            }
            const float *v = x + i * ldx + b * QK;
            float amax = 0.f;
            for (int j = 0; j < QK; j++) {
                float a = v[j] < 0 ? -v[j] : v[j];
                amax = a > amax ? a : amax;
            }
            float dx = amax / QMAX, id = amax > 0 ? 1.f / dx : 0.f;
            int sum = 0;
            for (int j = 0; j < QK; j++) {
                int qi = (int)__builtin_rintf(v[j] * id);
                q[j] = (int16_t)qi;
                sum += qi;
            }
            xd[i * nbp + b] = dx;
            xs[i * nbp + b] = dx * (float)sum;
        }
    }
}

/* ---- integer block dot products: int16 activations, 4- or 8-bit weights widened to int16 --- */
#if defined(__AVX512BW__)
typedef __m512 facc;
#define FACC_ZERO() _mm512_setzero_ps()
#define FACC_SUM(v) _mm512_reduce_add_ps(v)
/* 16 int32 sums over pairs of w (32 int16) * x (32 int16) */
static inline __m512i dot16(__m512i w, __m512i x) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, x);
#else
    return _mm512_madd_epi16(w, x);
#endif
}
static inline facc block_fma(__m256i w8, int is_signed, const int16_t *xq, float scale, facc acc) {
    __m512i w = is_signed ? _mm512_cvtepi8_epi16(w8) : _mm512_cvtepu8_epi16(w8);
    __m512i s = dot16(w, _mm512_loadu_si512((const void *)xq));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(scale), acc);
}
#elif defined(__AVX2__)
typedef __m256 facc;
#define FACC_ZERO() _mm256_setzero_ps()
static inline float FACC_SUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline facc block_fma(__m256i w8, int is_signed, const int16_t *xq, float scale, facc acc) {
    __m128i l = _mm256_castsi256_si128(w8), h = _mm256_extracti128_si256(w8, 1);
    __m256i wl = is_signed ? _mm256_cvtepi8_epi16(l) : _mm256_cvtepu8_epi16(l);
    __m256i wh = is_signed ? _mm256_cvtepi8_epi16(h) : _mm256_cvtepu8_epi16(h);
    __m256i s = _mm256_add_epi32(_mm256_madd_epi16(wl, _mm256_loadu_si256((const __m256i *)xq)),
                                 _mm256_madd_epi16(wh, _mm256_loadu_si256((const __m256i *)(xq + 16))));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(scale), acc);
}
#endif

#if defined(__AVX2__)
/* rows r .. r+R-1 of x (R <= 4) against weight rows n .. n+NW-1 (NW <= 4):
 * out[w * 4 + i] = sum_b d_w dx (qw . qx). NW x R independent accumulators hide the FMA latency. */
static inline __attribute__((always_inline)) void int_tile(const qm_args *a, const int R, int64_t r, int64_t n,
                                                           const int NW, float *out) {
    facc acc[4][4];
    for (int w = 0; w < NW; w++)
        for (int i = 0; i < R; i++) acc[w][i] = FACC_ZERO();
    const int64_t ldq = a->nbp * QK;
    if (a->kind == 4) {
        const __m256i lo4 = _mm256_set1_epi8(0x0F);
        for (int64_t p = 0; p < a->nbp / 2; p++) {
            const int16_t *xq0 = a->xq + r * ldq + p * 64;
            const float *xd0 = a->xd + r * a->nbp + 2 * p;
            for (int w = 0; w < NW; w++) {
                const float *dw = a->d + (n + w) * a->nbp + 2 * p;
                __m256i v = _mm256_loadu_si256((const __m256i *)(a->qs + (n + w) * a->nbp * 16 + p * 32));
                __m256i wl = _mm256_and_si256(v, lo4), wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
                for (int i = 0; i < R; i++) {
                    const int16_t *xq = xq0 + i * ldq;
                    const float *xd = xd0 + i * a->nbp;
                    acc[w][i] = block_fma(wl, 0, xq, dw[0] * xd[0], acc[w][i]);
                    acc[w][i] = block_fma(wh, 0, xq + 32, dw[1] * xd[1], acc[w][i]);
                }
            }
        }
    } else {
        for (int64_t b = 0; b < a->K / QK; b++) {
            for (int w = 0; w < NW; w++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(a->qs + (n + w) * a->K + b * QK));
                float dw = a->d[(n + w) * a->nbp + b];
                for (int i = 0; i < R; i++)
                    acc[w][i] = block_fma(v, 1, a->xq + (r + i) * ldq + b * QK, dw * a->xd[(r + i) * a->nbp + b],
                                          acc[w][i]);
            }
        }
    }
    for (int w = 0; w < NW; w++)
        for (int i = 0; i < R; i++) out[w * 4 + i] = FACC_SUM(acc[w][i]);
}
#else
static inline void int_tile(const qm_args *a, const int R, int64_t r, int64_t n, const int NW, float *out) {
    const int64_t ldq = a->nbp * QK, nb = a->K / QK;
    for (int w = 0; w < NW; w++) {
        const float *dw = a->d + (n + w) * a->nbp;
        for (int i = 0; i < R; i++) {
            const int16_t *xq = a->xq + (r + i) * ldq;
            const float *xd = a->xd + (r + i) * a->nbp;
            float acc = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                int32_t s = 0;
                if (a->kind == 4) {
                    const uint8_t *q = a->qs + (n + w) * a->nbp * 16 + (b / 2) * 32;
                    int shift = (b & 1) * 4;
                    for (int j = 0; j < QK; j++) s += (int32_t)((q[j] >> shift) & 0x0F) * xq[b * QK + j];
                } else {
                    const int8_t *q = (const int8_t *)a->qs + (n + w) * a->K + b * QK;
                    for (int j = 0; j < QK; j++) s += (int32_t)q[j] * xq[b * QK + j];
                }
                acc += dw[b] * xd[b] * (float)s;
            }
            out[w * 4 + i] = acc;
        }
    }
}
#endif

/* sum_b m[b] * xs[b]: the mins' share of a dot product */
static inline float mterm(const float *m, const float *xs, int64_t nb) {
    float v = 0.f;
#pragma omp simd reduction(+ : v)
    for (int64_t b = 0; b < nb; b++) v += m[b] * xs[b];
    return v;
}

#define INT_TILE(R_, NW_) int_tile(a, R_, r, n, NW_, out)
static void int_part(void *p, int t, int T) {
    const qm_args *a = p;
    /* 4-row groups of W split among the threads */
    int64_t G = (a->N + 3) / 4, nb = a->K / QK;
    int64_t n0 = G * t / T * 4, n1 = G * (t + 1) / T * 4;
    if (n1 > a->N) n1 = a->N;
    float out[16];
    for (int64_t n = n0; n < n1;) {
        int NW = n1 - n >= 4 ? 4 : 1;
        for (int64_t r = 0; r < a->M; r += 4) {
            int R = a->M - r < 4 ? (int)(a->M - r) : 4;
            /* constant R and NW: the loops unroll and the accumulators stay in registers */
            if (NW == 4) {
                switch (R) {
                    case 1: INT_TILE(1, 4); break;
#if defined(__AVX512BW__)
                    case 2: INT_TILE(2, 4); break;
                    case 3: INT_TILE(3, 4); break;
                    default: INT_TILE(4, 4); break;
#else  /* 16 registers: two tiles of 2 weight rows */
                    case 2: int_tile(a, 2, r, n, 2, out); int_tile(a, 2, r, n + 2, 2, out + 8); break;
                    case 3: int_tile(a, 3, r, n, 2, out); int_tile(a, 3, r, n + 2, 2, out + 8); break;
                    default: int_tile(a, 4, r, n, 2, out); int_tile(a, 4, r, n + 2, 2, out + 8); break;
#endif
                }
            } else {
                switch (R) {
                    case 1: INT_TILE(1, 1); break;
                    case 2: INT_TILE(2, 1); break;
                    case 3: INT_TILE(3, 1); break;
                    default: INT_TILE(4, 1); break;
                }
            }
            for (int w = 0; w < NW; w++) {
                const float *mw = a->m ? a->m + (n + w) * a->nbp : NULL;
                for (int i = 0; i < R; i++) {
                    float v = out[w * 4 + i];
                    if (mw) v += mterm(mw, a->xs + (r + i) * a->nbp, nb);
                    if (a->bias) v += a->bias[n + w];
                    a->y[(r + i) * a->ldy + n + w] = v;
                }
            }
        }
        n += NW;
    }
}

/* ---- the fp32 panel path ----------------------------------------------------------------- */
/* panel[k * NR + j] = W[n0 + j][k] for j < nv, 0 past it. Block by block: the 16 rows' 32 values
 * are dequantized row-major into a small tile (contiguous, vectorized), then transposed in L1. */
static void dequant_panel(const qm_args *a, int64_t n0, int nv, float *panel) {
    int64_t nb = a->K / QK;
    float tile[NR][QK] __attribute__((aligned(64)));
    memset(tile, 0, sizeof tile);
    for (int64_t b = 0; b < nb; b++) {
        for (int j = 0; j < nv; j++) {
            int64_t n = n0 + j;
            float dv = a->d[n * a->nbp + b], mv = a->m ? a->m[n * a->nbp + b] : 0.f;
            float *t = tile[j];
            if (a->kind == 4) {
                const uint8_t *w = a->qs + n * a->nbp * 16 + (b / 2) * 32;
                if (b & 1)
                    for (int e = 0; e < QK; e++) t[e] = dv * (float)(w[e] >> 4) + mv;
                else
                    for (int e = 0; e < QK; e++) t[e] = dv * (float)(w[e] & 0x0F) + mv;
            } else {
                const int8_t *w = (const int8_t *)a->qs + n * a->K + b * QK;
                for (int e = 0; e < QK; e++) t[e] = dv * (float)w[e] + mv;
            }
        }
        float *dst = panel + b * QK * NR;
        for (int e = 0; e < QK; e++)
            for (int j = 0; j < NR; j++) dst[e * NR + j] = tile[j][e];
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
    int64_t P = (a->N + NR - 1) / NR;
    float *panel = a->panels + (int64_t)t * a->K * NR;
    float acc[MR * NR];
    for (int64_t q = P * t / T; q < P * (t + 1) / T; q++) {
        int64_t n0 = q * NR;
        int nv = a->N - n0 < NR ? (int)(a->N - n0) : NR;
        dequant_panel(a, n0, nv, panel);
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
 * thread pool (cpu_pool.c's rf_parallel) or is NULL (one thread). */
int QM_FN(qm_linear)(int kind, const float *x, int64_t ldx, int64_t M, const uint8_t *qs, const float *d,
                     const float *m, const float *bias, int64_t N, int64_t K, float *y, int64_t ldy, int int_max_m,
                     rf_par par, int threads) {
    int64_t nbp = ((K / QK) + 1) & ~(int64_t)1;
    qm_args a = {kind, x, ldx, M, N, K, nbp, ldy, qs, d, m, bias, y, NULL, NULL, NULL, NULL};
    int64_t units = M < int_max_m ? N : (N + NR - 1) / NR;
    int T = units < threads ? (int)units : threads;
    if (T < 1) T = 1;
    if (M < int_max_m) {
        int16_t *xq = aligned_alloc(64, (size_t)(M * nbp * QK * 2 + 64) & ~(size_t)63);
        float *xf = malloc(sizeof(float) * (size_t)(2 * M * nbp + 1));
        if (!xq || !xf) {
            free(xq);
            free(xf);
            return -1;
        }
        quantize_rows(x, ldx, M, K, nbp, xq, xf, xf + M * nbp);
        a.xq = xq;
        a.xd = xf;
        a.xs = xf + M * nbp;
        if (par && T > 1) par(int_part, &a, T); else int_part(&a, 0, 1);  /* one caller per pool call */
        free(xq);
        free(xf);
        return 0;
    }
    if (!par) T = 1;
    a.panels = aligned_alloc(64, (size_t)T * K * NR * sizeof(float));  /* K % 32 == 0: a multiple of 64 */
    if (!a.panels) return -1;
    if (T > 1) par(fp_part, &a, T); else fp_part(&a, 0, 1);
    free(a.panels);
    return 0;
}
