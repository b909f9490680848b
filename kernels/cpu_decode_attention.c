/* Paged decode attention on CPU, fp32: one query token per request against K/V read in place
 * from the token-level pool through req_to_token (no gathered copy), with grouped-query heads
 * sharing each K/V row read. Online softmax over blocks of keys. Built and loaded by
 * radixflow/kernels/cpu_ext.py; reference: kernels/reference.py decode_attention_ref.
 *
 * q, out:   (B, H, D) contiguous fp32
 * k_buf, v_buf: (num_slots, Hkv, D) contiguous, fp32, fp16, bf16, fp8 e4m3 or fp8 e5m2
 *               (cpu_attn_body.h, once per type)
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

/* attend_one, the generic path: see cpu_attn_body.h */

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

#endif

/* K/V element types: fp32, fp16 (IEEE half) and bf16, each read as fp32. */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) bits = sign | 0x7F800000u | (man << 13);               /* inf, nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);           /* normal */
    else if (!man) bits = sign;                                               /* zero */
    else {                                                                    /* subnormal */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    union { uint32_t u; float f; } v = {bits};
    return v.f;
}
static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

#define KV_T float
#define FN(name) name##_f32
#define LD1(p) (*(p))
#define LD8(p) _mm256_loadu_ps(p)
#include "cpu_attn_body.h"
#undef KV_T
#undef FN
#undef LD1
#undef LD8
#define KV_T uint16_t
#define FN(name) name##_f16
#if defined(__F16C__) && defined(__AVX2__)
#define LD1(p) _cvtsh_ss(*(p))
#define LD8(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#else  /* LD8 is used on the AVX2 path only */
#define LD1(p) half_to_float(*(p))
#define LD8(p) load8_half(p)
#if defined(__AVX2__)
static inline __m256 load8_half(const uint16_t *p) {
    float f[8];
    for (int i = 0; i < 8; i++) f[i] = half_to_float(p[i]);
    return _mm256_loadu_ps(f);
}
#endif
#endif
#include "cpu_attn_body.h"
#undef KV_T
#undef FN
#undef LD1
#undef LD8
#define KV_T uint16_t
#define FN(name) name##_bf16
#define LD1(p) bf16_to_float(*(p))
#define LD8(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#include "cpu_attn_body.h"
#undef KV_T
#undef FN
#undef LD1
#undef LD8

/* fp8 e5m2 is the top byte of an fp16. fp8 e4m3 (no infinities; torch's float8_e4m3fn, stored
 * saturated): its 7 low bits shifted into an fp16's exponent and mantissa give the value times
 * 2^-8, subnormals included. */
static inline float e5m2_to_float(uint8_t b) { return half_to_float((uint16_t)(b << 8)); }
static inline float e4m3_to_float(uint8_t b) {
    float f = half_to_float((uint16_t)((b & 0x7F) << 7)) * 256.f;
    return b & 0x80 ? -f : f;
}
#define KV_T uint8_t
#define FN(name) name##_e5m2
#define LD1(p) e5m2_to_float(*(p))
#if defined(__F16C__) && defined(__AVX2__)
#define LD8(p) _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(p))), 8))
#elif defined(__AVX2__)
#define LD8(p) load8_e5m2(p)
static inline __m256 load8_e5m2(const uint8_t *p) {
    float f[8];
    for (int i = 0; i < 8; i++) f[i] = e5m2_to_float(p[i]);
    return _mm256_loadu_ps(f);
}
#endif
#include "cpu_attn_body.h"
#undef KV_T
#undef FN
#undef LD1
#undef LD8
#define KV_T uint8_t
#define FN(name) name##_e4m3
#define LD1(p) e4m3_to_float(*(p))
#if defined(__F16C__) && defined(__AVX2__)
static inline __m256 load8_e4m3(const uint8_t *p) {
    __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7),
                             _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
    return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f));
}
#elif defined(__AVX2__)
static inline __m256 load8_e4m3(const uint8_t *p) {
    float f[8];
    for (int i = 0; i < 8; i++) f[i] = e4m3_to_float(p[i]);
    return _mm256_loadu_ps(f);
}
#endif
#define LD8(p) load8_e4m3(p)
#include "cpu_attn_body.h"
#undef KV_T
#undef FN
#undef LD1
#undef LD8

typedef void (*rf_task)(void *arg, int t, int n);
void rf_parallel(rf_task fn, void *arg, int n);  /* cpu_pool.c */

typedef struct {
    const float *q;
    const void *k_buf, *v_buf;
    int kv_dtype;  /* 0 fp32, 1 fp16, 2 bf16, 3 fp8 e4m3, 4 fp8 e5m2 */
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
        int64_t n = a->seq_lens[b];
#if defined(__AVX2__) && defined(__FMA__)
        if (D % 8 == 0) {
            if (a->kv_dtype == 1) attend_one_avx2_f16(qb, a->k_buf, a->v_buf, slots, n, Hkv, hk, G, D, a->scale, ob);
            else if (a->kv_dtype == 2) attend_one_avx2_bf16(qb, a->k_buf, a->v_buf, slots, n, Hkv, hk, G, D, a->scale, ob);
            else if (a->kv_dtype == 3) attend_one_avx2_e4m3(qb, a->k_buf, a->v_buf, slots, n, Hkv, hk, G, D, a->scale, ob);
            else if (a->kv_dtype == 4) attend_one_avx2_e5m2(qb, a->k_buf, a->v_buf, slots, n, Hkv, hk, G, D, a->scale, ob);
            else attend_one_avx2_f32(qb, a->k_buf, a->v_buf, slots, n, Hkv, hk, G, D, a->scale, ob);
            continue;
        }
#endif
        if (a->kv_dtype == 1) attend_one_f16(qb, a->k_buf, a->v_buf, slots, n, Hkv, hk, G, D, a->scale, ob);
        else if (a->kv_dtype == 2) attend_one_bf16(qb, a->k_buf, a->v_buf, slots, n, Hkv, hk, G, D, a->scale, ob);
        else if (a->kv_dtype == 3) attend_one_e4m3(qb, a->k_buf, a->v_buf, slots, n, Hkv, hk, G, D, a->scale, ob);
        else if (a->kv_dtype == 4) attend_one_e5m2(qb, a->k_buf, a->v_buf, slots, n, Hkv, hk, G, D, a->scale, ob);
        else attend_one_f32(qb, a->k_buf, a->v_buf, slots, n, Hkv, hk, G, D, a->scale, ob);
    }
}

/* Returns 0, or -1 if the shapes exceed the kernel's fixed limits (the caller falls back).
 * k_buf / v_buf hold fp32 (kv_dtype 0), fp16 (1), bf16 (2), fp8 e4m3 (3) or fp8 e5m2 (4)
 * elements; q and out are fp32.
 * (request, kv head) items are shared among `threads` threads (cpu_pool.c). */
int decode_attention_f32(const float *q, const void *k_buf, const void *v_buf,
                         const int32_t *req_to_token, int64_t r2t_stride, const int64_t *rows,
                         const int64_t *seq_lens, int B, int H, int Hkv, int D, float scale,
                         float *out, int threads, int kv_dtype) {
    int G = H / Hkv;
    if (G > MAX_G || D > MAX_D || G * Hkv != H || kv_dtype < 0 || kv_dtype > 4) return -1;
    attn_args a = {q, k_buf, v_buf, kv_dtype, req_to_token, r2t_stride, rows, seq_lens, B, H, Hkv, D, G, scale,
                   out, 0};
    int items = B * Hkv;
    rf_parallel(attn_part, &a, items < threads ? items : threads);
    return 0;
}
