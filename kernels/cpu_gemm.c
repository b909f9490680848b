/* Dense fp32 y = x @ W^T (+ bias) on CPU for the few-row shapes of decoding, on weights packed once.
 * Built and loaded by radixflow/kernels/cpu_ext.py; reference: torch.nn.functional.linear.
 *
 * Why: a BLAS sgemm repacks W on every call (the whole model, each decode step) and is tuned for
 * large M; at M = 1..32 it reaches about a third of this CPU's peak. Here W is packed at load into
 * panels of NR = 16 output columns, each K-major (panel[k][0..15]), so a decode step streams every
 * weight once, in order, straight into a broadcast-FMA micro-kernel of up to MR = 6 rows x 16
 * columns held in 12 registers. The panels are split between the threads; x stays in cache.
 *
 * Layout: packed[(p * K + k) * NR + j] = W[p * NR + j][k], zero past N; P = ceil(N / NR) panels.
 */
#include <stdint.h>
#include <string.h>

typedef void (*rf_task)(void *arg, int t, int n);
void rf_parallel(rf_task fn, void *arg, int n);  /* cpu_pool.c */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define NR 16
#define MR 6
#ifndef PF
#define PF 32
#endif

typedef struct {
    const float *w;
    int64_t N, K;
    float *packed;
} pack_args;

static void pack_part(void *p, int t, int T) {
    const pack_args *a = p;
    int64_t P = (a->N + NR - 1) / NR, K = a->K;
    for (int64_t q = P * t / T; q < P * (t + 1) / T; q++) {
        float *dst = a->packed + q * K * NR;
        for (int j = 0; j < NR; j++) {
            int64_t n = q * NR + j;
            const float *src = a->w + n * K;
            for (int64_t k = 0; k < K; k++) dst[k * NR + j] = n < a->N ? src[k] : 0.f;
        }
    }
}

void gemm_pack_f32(const float *w, int64_t N, int64_t K, float *packed, int threads) {
    pack_args a = {w, N, K, packed};
    int64_t P = (N + NR - 1) / NR;
    rf_parallel(pack_part, &a, P < threads ? (int)P : threads);
}

/* acc (m x NR) = x rows [0, m) . panel; the caller adds bias and stores the valid columns. */
#if defined(__AVX2__) && defined(__FMA__)
static inline __attribute__((always_inline)) void tile(const int m, const float *x, int64_t ldx,
                                                       const float *panel, int64_t K, float *acc) {
    __m256 c0[MR], c1[MR];
    for (int i = 0; i < m; i++) c0[i] = c1[i] = _mm256_setzero_ps();
    int64_t k = 0;
    if (m <= 2) {  /* few accumulators: a second set over odd k hides the FMA latency */
        __m256 d0[MR], d1[MR];
        for (int i = 0; i < m; i++) d0[i] = d1[i] = _mm256_setzero_ps();
        for (; k + 1 < K; k += 2) {
            const float *b = panel + k * NR;
            _mm_prefetch((const char *)(b + PF * NR), _MM_HINT_T0);
            __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
            __m256 b2 = _mm256_load_ps(b + 16), b3 = _mm256_load_ps(b + 24);
            for (int i = 0; i < m; i++) {
                __m256 a = _mm256_broadcast_ss(x + i * ldx + k), a2 = _mm256_broadcast_ss(x + i * ldx + k + 1);
                c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
                c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
                d0[i] = _mm256_fmadd_ps(a2, b2, d0[i]);
                d1[i] = _mm256_fmadd_ps(a2, b3, d1[i]);
            }
        }
        for (int i = 0; i < m; i++) {
            c0[i] = _mm256_add_ps(c0[i], d0[i]);
            c1[i] = _mm256_add_ps(c1[i], d1[i]);
        }
    }
    for (; k < K; k++) {  /* every k for m > 2; the odd last one for m <= 2 */
        const float *b = panel + k * NR;
        _mm_prefetch((const char *)(b + PF * NR), _MM_HINT_T0);
        __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
        for (int i = 0; i < m; i++) {
            __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
            c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
        }
    }
    for (int i = 0; i < m; i++) {
        _mm256_storeu_ps(acc + i * NR, c0[i]);
        _mm256_storeu_ps(acc + i * NR + 8, c1[i]);
    }
}
#else
static inline void tile(const int m, const float *x, int64_t ldx, const float *panel, int64_t K, float *acc) {
    for (int i = 0; i < m; i++) {
        float c[NR] = {0};
        for (int64_t k = 0; k < K; k++) {
            float a = x[i * ldx + k];
            for (int j = 0; j < NR; j++) c[j] += a * panel[k * NR + j];
        }
        memcpy(acc + i * NR, c, sizeof c);
    }
}
#endif

static void tile_any(int m, const float *x, int64_t ldx, const float *panel, int64_t K, float *acc) {
    switch (m) {  /* constant m: the compiler unrolls the row loops and keeps acc in registers */
        case 1: tile(1, x, ldx, panel, K, acc); break;
        case 2: tile(2, x, ldx, panel, K, acc); break;
        case 3: tile(3, x, ldx, panel, K, acc); break;
        case 4: tile(4, x, ldx, panel, K, acc); break;
        case 5: tile(5, x, ldx, panel, K, acc); break;
        default: tile(6, x, ldx, panel, K, acc); break;
    }
}

typedef struct {
    const float *x, *packed, *bias;
    int64_t ldx, M, N, K, ldy;
    float *y;
} gemm_args;

static void gemm_part(void *p, int t, int T) {
    const gemm_args *a = p;
    int64_t P = (a->N + NR - 1) / NR, K = a->K;
    int64_t p0 = P * t / T, p1 = P * (t + 1) / T;
    float acc[MR * NR];
    for (int64_t q = p0; q < p1; q++) {
        const float *panel = a->packed + q * K * NR;
        int64_t n0 = q * NR, nv = a->N - n0 < NR ? a->N - n0 : NR;
        for (int64_t r = 0; r < a->M; r += MR) {
            int m = a->M - r < MR ? (int)(a->M - r) : MR;
            tile_any(m, a->x + r * a->ldx, a->ldx, panel, K, acc);
            for (int i = 0; i < m; i++) {
                float *dst = a->y + (r + i) * a->ldy + n0;
                const float *src = acc + i * NR;
                if (a->bias)
                    for (int64_t j = 0; j < nv; j++) dst[j] = src[j] + a->bias[n0 + j];
                else
                    memcpy(dst, src, (size_t)nv * sizeof(float));
            }
        }
    }
}

/* y (M, N), row stride ldy = x (M, K), row stride ldx, @ W^T (+ bias (N) or NULL); packed by
 * gemm_pack_f32. The panels are split among `threads` threads (cpu_pool.c). */
void gemm_packed_f32(const float *x, int64_t ldx, const float *packed, const float *bias, int64_t M, int64_t N,
                     int64_t K, float *y, int64_t ldy, int threads) {
    gemm_args a = {x, packed, bias, ldx, M, N, K, ldy, y};
    int64_t P = (N + NR - 1) / NR;
    rf_parallel(gemm_part, &a, P < threads ? (int)P : threads);
}
