/* Paged decode attention on CPU, fp32: one query token per request against K/V read in place
 * from the token-level pool through req_to_token (no gathered copy), with grouped-query heads
 * sharing each K/V row read. Online softmax over blocks of keys. Built and loaded by
 * radixflow/kernels/cpu_ext.py; reference: kernels/reference.py decode_attention_ref.
 *
 * q, out:   (B, H, D) contiguous
 * k_buf, v_buf: (num_slots, Hkv, D) contiguous
 * req_to_token: int32 rows of `r2t_stride` slot indices; rows[b] is request b's row
 * seq_lens[b]: number of keys of request b (>= 1)
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "cpu_math.h"

#define BLOCK 64
#define MAX_G 16
#define MAX_D 256

/* The online-softmax state before any key: running max -inf, sum 0, accumulator 0. */
static void init_state(float acc[][MAX_D], float *m, float *l, int G, int D) {
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
        memset(acc[g], 0, sizeof(float) * D);
    }
}

static void attend_one(const float *q, const float *k_buf, const float *v_buf, const int32_t *slots,
                       int64_t n, int Hkv, int hk, int G, int D, float scale, float *out) {
    float acc[MAX_G][MAX_D];
    float m[MAX_G], l[MAX_G];
    float s[MAX_G][BLOCK];
    init_state(acc, m, l, G, D);
    for (int64_t start = 0; start < n; start += BLOCK) {
        int nb = (int)((n - start) < BLOCK ? (n - start) : BLOCK);
        for (int j = 0; j < nb; j++) {
            const float *k = k_buf + ((int64_t)slots[start + j] * Hkv + hk) * D;
            for (int g = 0; g < G; g++) {
                const float *qg = q + (int64_t)g * D;
                float dot = 0.f;
                for (int d = 0; d < D; d++) dot += qg[d] * k[d];
                s[g][j] = dot * scale;
            }
        }
        for (int g = 0; g < G; g++) {
            float mb = m[g];
            for (int j = 0; j < nb; j++) mb = s[g][j] > mb ? s[g][j] : mb;
            float corr = m[g] == -INFINITY ? 0.f : expf(m[g] - mb);
            m[g] = mb;
            l[g] *= corr;
            for (int d = 0; d < D; d++) acc[g][d] *= corr;
            float sum = 0.f;
            for (int j = 0; j < nb; j++) {
                s[g][j] = exp_neg(s[g][j] - mb);
                sum += s[g][j];
            }
            l[g] += sum;
        }
        for (int j = 0; j < nb; j++) {
            const float *v = v_buf + ((int64_t)slots[start + j] * Hkv + hk) * D;
            for (int g = 0; g < G; g++) {
                float p = s[g][j];
                float *a = acc[g];
                for (int d = 0; d < D; d++) a[d] += p * v[d];
            }
        }
    }
    for (int g = 0; g < G; g++) {
        float inv = 1.f / l[g];
        for (int d = 0; d < D; d++) out[(int64_t)g * D + d] = acc[g][d] * inv;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* The AVX2 path: the same online softmax with the arithmetic in registers. Scores take each K
 * row once for up to 4 query heads (one accumulator each); P.V keeps a 3-head x 32-column tile
 * of the output in 12 registers across a whole block of keys (the generic loop above reloads
 * and stores the accumulator for every key); exp runs 8 lanes at a time; the next block's K/V
 * rows are prefetched while this one computes, since slots are scattered across the pool. */
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    t = _mm_add_ss(t, _mm_movehdup_ps(t));
    return _mm_cvtss_f32(t);
}

/* exp_neg on 8 lanes (same polynomial and clamping). */
static inline __m256 exp_neg8(__m256 x) {
    __m256 lim = _mm256_set1_ps(-87.0f);
    __m256 keep = _mm256_cmp_ps(x, lim, _CMP_GT_OQ);
    x = _mm256_max_ps(x, lim);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.39575498e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.33337382e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.16664891e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.66666672e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

static inline void prefetch_row(const float *row, int D) {
    for (int d = 0; d < D; d += 16) _mm_prefetch((const char *)(row + d), _MM_HINT_T0);
}

/* s[g][j] = scale * q_g . k_j for GC (1..4) heads starting at g0. */
static inline __attribute__((always_inline)) void scores_gc(const float *q, const float *k, int D, int g0,
                                                            float scale, int j, float s[][BLOCK], const int GC) {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int d = 0; d < D; d += 8) {
        __m256 kv = _mm256_loadu_ps(k + d);
        for (int i = 0; i < GC; i++) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (int64_t)(g0 + i) * D + d), kv, a[i]);
    }
    for (int i = 0; i < GC; i++) s[g0 + i][j] = hsum8(a[i]) * scale;
}

/* acc[g0..g0+GC)[d0..d0+8*NV) += sum_j s[g][j] * v_j[d0..], the tile held in registers. */
static inline __attribute__((always_inline)) void pv_tile(float acc[][MAX_D], float s[][BLOCK], const float *const *vr,
                                                          int nb, int g0, int d0, const int GC, const int NV) {
    __m256 c[3][4];
    for (int i = 0; i < GC; i++)
        for (int t = 0; t < NV; t++) c[i][t] = _mm256_loadu_ps(&acc[g0 + i][d0 + 8 * t]);
    for (int j = 0; j < nb; j++) {
        const float *v = vr[j] + d0;
        __m256 vv[4];
        for (int t = 0; t < NV; t++) vv[t] = _mm256_loadu_ps(v + 8 * t);
        for (int i = 0; i < GC; i++) {
            __m256 p = _mm256_broadcast_ss(&s[g0 + i][j]);
            for (int t = 0; t < NV; t++) c[i][t] = _mm256_fmadd_ps(p, vv[t], c[i][t]);
        }
    }
    for (int i = 0; i < GC; i++)
        for (int t = 0; t < NV; t++) _mm256_storeu_ps(&acc[g0 + i][d0 + 8 * t], c[i][t]);
}

static void pv_heads(float acc[][MAX_D], float s[][BLOCK], const float *const *vr, int nb, int g0, int D, const int GC) {
    int d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) pv_tile(acc, s, vr, nb, g0, d0, GC, 4);
    for (; d0 < D; d0 += 8) pv_tile(acc, s, vr, nb, g0, d0, GC, 1);
}

static void attend_one_avx2(const float *q, const float *k_buf, const float *v_buf, const int32_t *slots,
                            int64_t n, int Hkv, int hk, int G, int D, float scale, float *out) {
    float acc[MAX_G][MAX_D] __attribute__((aligned(32)));
    float s[MAX_G][BLOCK] __attribute__((aligned(32)));
    float m[MAX_G], l[MAX_G];
    const float *kr[BLOCK], *vr[BLOCK];
    const int64_t row = (int64_t)Hkv * D, off = (int64_t)hk * D;
    init_state(acc, m, l, G, D);
    for (int64_t start = 0; start < n; start += BLOCK) {
        int nb = (int)((n - start) < BLOCK ? (n - start) : BLOCK);
        int64_t next = start + BLOCK;
        int nn = next < n ? (int)((n - next) < BLOCK ? (n - next) : BLOCK) : 0;
        for (int j = 0; j < nb; j++) {
            kr[j] = k_buf + (int64_t)slots[start + j] * row + off;
            vr[j] = v_buf + (int64_t)slots[start + j] * row + off;
        }
        for (int j = 0; j < nb; j++) {
            if (j < nn) prefetch_row(k_buf + (int64_t)slots[next + j] * row + off, D);
            int g0 = 0;
            for (; g0 + 4 <= G; g0 += 4) scores_gc(q, kr[j], D, g0, scale, j, s, 4);
            switch (G - g0) {
                case 3: scores_gc(q, kr[j], D, g0, scale, j, s, 3); break;
                case 2: scores_gc(q, kr[j], D, g0, scale, j, s, 2); break;
                case 1: scores_gc(q, kr[j], D, g0, scale, j, s, 1); break;
                default: break;
            }
        }
        int nb8 = (nb + 7) & ~7;
        for (int g = 0; g < G; g++) {
            for (int j = nb; j < nb8; j++) s[g][j] = -INFINITY;
            float mb = m[g];
            for (int j = 0; j < nb; j++) mb = s[g][j] > mb ? s[g][j] : mb;
            float corr = m[g] == -INFINITY ? 0.f : expf(m[g] - mb);
            m[g] = mb;
            __m256 mv = _mm256_set1_ps(mb), sum = _mm256_setzero_ps();
            for (int j = 0; j < nb8; j += 8) {
                __m256 e = exp_neg8(_mm256_sub_ps(_mm256_load_ps(&s[g][j]), mv));
                _mm256_store_ps(&s[g][j], e);
                sum = _mm256_add_ps(sum, e);
            }
            l[g] = l[g] * corr + hsum8(sum);
            if (corr != 1.f) {
                __m256 cv = _mm256_set1_ps(corr);
                for (int d = 0; d < D; d += 8) _mm256_store_ps(&acc[g][d], _mm256_mul_ps(_mm256_load_ps(&acc[g][d]), cv));
            }
        }
        for (int j = 0; j < nn; j++) prefetch_row(v_buf + (int64_t)slots[next + j] * row + off, D);
        int g0 = 0;
        for (; g0 + 3 <= G; g0 += 3) pv_heads(acc, s, vr, nb, g0, D, 3);
        if (G - g0 == 2) pv_heads(acc, s, vr, nb, g0, D, 2);
        if (G - g0 == 1) pv_heads(acc, s, vr, nb, g0, D, 1);
    }
    for (int g = 0; g < G; g++) {
        float inv = 1.f / l[g];
        for (int d = 0; d < D; d++) out[(int64_t)g * D + d] = acc[g][d] * inv;
    }
}
#endif

typedef void (*rf_task)(void *arg, int t, int n);
void rf_parallel(rf_task fn, void *arg, int n);  /* cpu_pool.c */

typedef struct {
    const float *q, *k_buf, *v_buf;
    const int32_t *req_to_token;
    int64_t r2t_stride;
    const int64_t *rows, *seq_lens;
    int B, H, Hkv, D, G;
    float scale;
    float *out;
    _Atomic int64_t next;  /* items are taken one at a time: requests differ in length */
} attn_args;

static void attn_part(void *p, int t, int n) {
    (void)t;
    (void)n;
    attn_args *a = p;
    int Hkv = a->Hkv, G = a->G, D = a->D, H = a->H;
    for (int64_t item; (item = atomic_fetch_add(&a->next, 1)) < (int64_t)a->B * Hkv;) {
        int b = (int)(item / Hkv), hk = (int)(item % Hkv);
        const int32_t *slots = a->req_to_token + a->rows[b] * a->r2t_stride;
        const float *qb = a->q + ((int64_t)b * H + (int64_t)hk * G) * D;
        float *ob = a->out + ((int64_t)b * H + (int64_t)hk * G) * D;
#if defined(__AVX2__) && defined(__FMA__)
        if (D % 8 == 0) {
            attend_one_avx2(qb, a->k_buf, a->v_buf, slots, a->seq_lens[b], Hkv, hk, G, D, a->scale, ob);
            continue;
        }
#endif
        attend_one(qb, a->k_buf, a->v_buf, slots, a->seq_lens[b], Hkv, hk, G, D, a->scale, ob);
    }
}

/* Returns 0, or -1 if the shapes exceed the kernel's fixed limits (the caller falls back).
 * (request, kv head) items are shared among `threads` threads (cpu_pool.c). */
int decode_attention_f32(const float *q, const float *k_buf, const float *v_buf,
                         const int32_t *req_to_token, int64_t r2t_stride, const int64_t *rows,
                         const int64_t *seq_lens, int B, int H, int Hkv, int D, float scale,
                         float *out, int threads) {
    int G = H / Hkv;
    if (G > MAX_G || D > MAX_D || G * Hkv != H) return -1;
    attn_args a = {q, k_buf, v_buf, req_to_token, r2t_stride, rows, seq_lens, B, H, Hkv, D, G, scale, out, 0};
    int items = B * Hkv;
    rf_parallel(attn_part, &a, items < threads ? items : threads);
    return 0;
}
