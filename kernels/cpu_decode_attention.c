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
#include <stdint.h>
#include <string.h>

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

#define BLOCK 64
#define MAX_G 16
#define MAX_D 256

static void attend_one(const float *q, const float *k_buf, const float *v_buf, const int32_t *slots,
                       int64_t n, int Hkv, int hk, int G, int D, float scale, float *out) {
    float acc[MAX_G][MAX_D];
    float m[MAX_G], l[MAX_G];
    float s[MAX_G][BLOCK];
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
        memset(acc[g], 0, sizeof(float) * D);
    }
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

/* Returns 0, or -1 if the shapes exceed the kernel's fixed limits (the caller falls back). */
int decode_attention_f32(const float *q, const float *k_buf, const float *v_buf,
                         const int32_t *req_to_token, int64_t r2t_stride, const int64_t *rows,
                         const int64_t *seq_lens, int B, int H, int Hkv, int D, float scale,
                         float *out) {
    int G = H / Hkv;
    if (G > MAX_G || D > MAX_D || G * Hkv != H) return -1;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < (int64_t)B * Hkv; item++) {
        int b = (int)(item / Hkv), hk = (int)(item % Hkv);
        const int32_t *slots = req_to_token + rows[b] * r2t_stride;
        const float *qb = q + ((int64_t)b * H + (int64_t)hk * G) * D;
        float *ob = out + ((int64_t)b * H + (int64_t)hk * G) * D;
        attend_one(qb, k_buf, v_buf, slots, seq_lens[b], Hkv, hk, G, D, scale, ob);
    }
    return 0;
}
