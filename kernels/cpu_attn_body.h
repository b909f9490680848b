/* The decode-attention kernels of cpu_decode_attention.c for one K/V element type, included once
 * per type with KV_T (the stored type), FN(name) (the name with the type's suffix), LD1(p) (one
 * element as float) and, on AVX2, LD8(p) (8 elements as __m256) defined. Not compiled on its own. */

static void FN(attend_one)(const float *q, const KV_T *k_buf, const KV_T *v_buf, const int32_t *slots,
                       int64_t n, int Hkv, int hk, int G, int D, float scale, float *out) {
    float acc[MAX_G][MAX_D];
    float m[MAX_G], l[MAX_G];
    float s[MAX_G][BLOCK];
    init_state(acc, m, l, G, D);
    for (int64_t start = 0; start < n; start += BLOCK) {
        int nb = (int)((n - start) < BLOCK ? (n - start) : BLOCK);
        for (int j = 0; j < nb; j++) {
            const KV_T *k = k_buf + ((int64_t)slots[start + j] * Hkv + hk) * D;
            for (int g = 0; g < G; g++) {
                const float *qg = q + (int64_t)g * D;
                float dot = 0.f;
                for (int d = 0; d < D; d++) dot += qg[d] * LD1(k + d);
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
            const KV_T *v = v_buf + ((int64_t)slots[start + j] * Hkv + hk) * D;
            for (int g = 0; g < G; g++) {
                float p = s[g][j];
                float *a = acc[g];
                for (int d = 0; d < D; d++) a[d] += p * LD1(v + d);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        float inv = 1.f / l[g];
        for (int d = 0; d < D; d++) out[(int64_t)g * D + d] = acc[g][d] * inv;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
static inline void FN(prefetch_row)(const KV_T *row, int D) {
    for (int d = 0; d < D; d += 16) _mm_prefetch((const char *)(row + d), _MM_HINT_T0);
}

/* s[g][j] = scale * q_g . k_j for GC (1..4) heads starting at g0. */
static inline __attribute__((always_inline)) void FN(scores_gc)(const float *q, const KV_T *k, int D, int g0,
                                                            float scale, int j, float s[][BLOCK], const int GC) {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int d = 0; d < D; d += 8) {
        __m256 kv = LD8(k + d);
        for (int i = 0; i < GC; i++) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (int64_t)(g0 + i) * D + d), kv, a[i]);
    }
    for (int i = 0; i < GC; i++) s[g0 + i][j] = hsum8(a[i]) * scale;
}

/* acc[g0..g0+GC)[d0..d0+8*NV) += sum_j s[g][j] * v_j[d0..], the tile held in registers. */
static inline __attribute__((always_inline)) void FN(pv_tile)(float acc[][MAX_D], float s[][BLOCK], const KV_T *const *vr,
                                                          int nb, int g0, int d0, const int GC, const int NV) {
    __m256 c[3][4];
    for (int i = 0; i < GC; i++)
        for (int t = 0; t < NV; t++) c[i][t] = _mm256_loadu_ps(&acc[g0 + i][d0 + 8 * t]);
    for (int j = 0; j < nb; j++) {
        const KV_T *v = vr[j] + d0;
        __m256 vv[4];
        for (int t = 0; t < NV; t++) vv[t] = LD8(v + 8 * t);
        for (int i = 0; i < GC; i++) {
            __m256 p = _mm256_broadcast_ss(&s[g0 + i][j]);
            for (int t = 0; t < NV; t++) c[i][t] = _mm256_fmadd_ps(p, vv[t], c[i][t]);
        }
    }
    for (int i = 0; i < GC; i++)
        for (int t = 0; t < NV; t++) _mm256_storeu_ps(&acc[g0 + i][d0 + 8 * t], c[i][t]);
}

static void FN(pv_heads)(float acc[][MAX_D], float s[][BLOCK], const KV_T *const *vr, int nb, int g0, int D, const int GC) {
    int d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) FN(pv_tile)(acc, s, vr, nb, g0, d0, GC, 4);
    for (; d0 < D; d0 += 8) FN(pv_tile)(acc, s, vr, nb, g0, d0, GC, 1);
}

static void FN(attend_one_avx2)(const float *q, const KV_T *k_buf, const KV_T *v_buf, const int32_t *slots,
                            int64_t n, int Hkv, int hk, int G, int D, float scale, float *out) {
    float acc[MAX_G][MAX_D] __attribute__((aligned(32)));
    float s[MAX_G][BLOCK] __attribute__((aligned(32)));
    float m[MAX_G], l[MAX_G];
    const KV_T *kr[BLOCK], *vr[BLOCK];
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
            if (j < nn) FN(prefetch_row)(k_buf + (int64_t)slots[next + j] * row + off, D);
            int g0 = 0;
            for (; g0 + 4 <= G; g0 += 4) FN(scores_gc)(q, kr[j], D, g0, scale, j, s, 4);
            switch (G - g0) {
                case 3: FN(scores_gc)(q, kr[j], D, g0, scale, j, s, 3); break;
                case 2: FN(scores_gc)(q, kr[j], D, g0, scale, j, s, 2); break;
                case 1: FN(scores_gc)(q, kr[j], D, g0, scale, j, s, 1); break;
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
        for (int j = 0; j < nn; j++) FN(prefetch_row)(v_buf + (int64_t)slots[next + j] * row + off, D);
        int g0 = 0;
        for (; g0 + 3 <= G; g0 += 3) FN(pv_heads)(acc, s, vr, nb, g0, D, 3);
        if (G - g0 == 2) FN(pv_heads)(acc, s, vr, nb, g0, D, 2);
        if (G - g0 == 1) FN(pv_heads)(acc, s, vr, nb, g0, D, 1);
    }
    for (int g = 0; g < G; g++) {
        float inv = 1.f / l[g];
        for (int d = 0; d < D; d++) out[(int64_t)g * D + d] = acc[g][d] * inv;
    }
}
#endif
