/* One decode step of a Llama-family model on CPU in one call: every decoder layer for M decode
 * rows on quantized weights, with no Python between the ops. At batch 1 the Python path makes
 * ~330 calls per step (module calls, tensor allocations, ctypes), several ms of a step whose
 * matmuls take ~25 ms, and that share grows as the matmuls get faster.
 * Built and loaded by radixflow/kernels/cpu_ext.py (wrapper: kernels/cpu_decode_step.py).
 *
 * Per layer, exactly the ops of the Python path (runtime/model/llama.py DecoderLayer), through the
 * same C functions, so the results are bitwise those of the unfused path with the in-place
 * attention kernel:
 *   h = rmsnorm(x + residual)            rmsnorm_f32 (cpu_rmsnorm.c); layer 0: residual = x
 *   qkv = h @ Wqkv^T (+ b)               qm_linear (cpu_quant.c), through a function pointer
 *   rope on q and k, in place            rope_f32 (cpu_elementwise.c)
 *   k, v -> the pool at out_loc          fp32, or cast to fp16 / bf16 / fp8 byte for byte as torch's
 *                                        .to() (cpu_math.h), which the Python path's KVPool.set_kv runs
 *   attn = decode attention              decode_attention_f32 (cpu_decode_attention.c)
 *   o = attn @ Wo^T; h = rmsnorm(o + residual)
 *   x = (silu(gate) * up)(h @ Wgu^T) @ Wdown^T    silu_mul_f32 (cpu_elementwise.c)
 * Weights are opaque (kind, qs, d, m, N, K) handed to qm_linear as they are: this file never reads
 * them. Matmuls and attention split their work on cpu_pool.c's pool; the small ops run on the
 * caller (they are shorter than a wake-up of the pool at these sizes).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu_math.h"

typedef int (*qm_linear_fn)(int kind, const float *x, int64_t ldx, int64_t M, const uint8_t *qs, const void *d,
                            const void *m, const float *bias, int64_t N, int64_t K, float *y, int64_t ldy,
                            int int_max_m, int threads);

/* cpu_rmsnorm.c, cpu_elementwise.c, cpu_decode_attention.c (same library) */
void rmsnorm_f32(const float *x, const float *residual, const float *w, int64_t M, int64_t D, float eps,
                 float *out, float *residual_out);
int rope_f32(float *x, int64_t T, int64_t heads, int64_t D, int64_t row_stride, const int64_t *pos,
             const float *cos, const float *sin, int64_t cache_stride, int64_t max_pos, int threads);
void silu_mul_f32(const float *x, int64_t M, int64_t I, int64_t x_stride, float *out, int threads);
int decode_attention_f32(const float *q, const void *k_buf, const void *v_buf, const int32_t *req_to_token,
                         int64_t r2t_stride, const int64_t *rows, const int64_t *seq_lens, int B, int H, int Hkv,
                         int D, float scale, float *out, int threads, int kv_dtype);

/* A quantized (N, K) weight as cpu_quant.QuantWeight holds it; bias NULL or (N,) fp32. */
typedef struct {
    int64_t kind;
    const void *qs, *d, *m;
    const float *bias;
    int64_t N, K;
} rf_qweight;

typedef struct {
    rf_qweight qkv, o, gate_up, down;
    const float *in_norm, *post_norm;  /* (hidden,) */
    void *k_buf, *v_buf;               /* (num_slots, kv_heads, head_dim) of kv_dtype */
} rf_layer;

/* The model, fixed after load (kernels/cpu_decode_step.py mirrors it as ctypes Structures). */
typedef struct {
    const rf_layer *layers;
    int64_t n_layers, hidden, heads, kv_heads, head_dim, inter;
    float eps, scale;
    const float *cos, *sin;  /* rope caches, rows cache_stride floats apart, max_pos rows */
    int64_t cache_stride, max_pos;
    int64_t kv_dtype, num_slots;  /* 0 fp32, 1 fp16, 2 bf16, 3 fp8 e4m3, 4 fp8 e5m2 (decode_attention_f32's
                                   * codes); rows of each k/v buffer */
    qm_linear_fn linear;
} rf_model;

enum { T_MATMUL, T_ATTENTION, N_TIMERS };

static int64_t clock_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

typedef struct {
    const rf_model *md;
    int64_t M;
    int int_max_m, threads;
    int64_t *timers;  /* NULL: not timed */
} step_ctx;

static int linear(const step_ctx *c, const rf_qweight *w, const float *x, float *y) {
    int64_t t0 = c->timers ? clock_ns() : 0;
    int rc = c->md->linear((int)w->kind, x, w->K, c->M, w->qs, w->d, w->m, w->bias, w->N, w->K, y, w->N,
                           c->int_max_m, c->threads);
    if (c->timers) c->timers[T_MATMUL] += clock_ns() - t0;
    return rc;
}

/* Rows (Hkv * D floats each, `stride` apart) into slots `loc` of a pool of element type kv_dtype. */
static void store_kv(void *buf, int64_t kv_dtype, const float *src, int64_t stride, const int64_t *loc, int64_t M,
                     int64_t n) {
    for (int64_t i = 0; i < M; i++) {
        const float *s = src + i * stride;
        if (kv_dtype == 0) {
            memcpy((float *)buf + loc[i] * n, s, sizeof(float) * n);
        } else if (kv_dtype >= 3) {  /* fp8: one byte per element */
            uint8_t *o = (uint8_t *)buf + loc[i] * n;
            if (kv_dtype == 3) for (int64_t j = 0; j < n; j++) o[j] = float_to_e4m3(s[j]);
            else for (int64_t j = 0; j < n; j++) o[j] = float_to_e5m2(s[j]);
        } else {
            uint16_t *o = (uint16_t *)buf + loc[i] * n;
            if (kv_dtype == 1) for (int64_t j = 0; j < n; j++) o[j] = float_to_half(s[j]);
            else for (int64_t j = 0; j < n; j++) o[j] = float_to_bf16(s[j]);
        }
    }
}

/* Scratch of one step, (M, width) each. */
typedef struct {
    float *h, *qkv, *q, *attn, *gate_up, *act;
} step_bufs;

static int attention_block(const step_ctx *c, const rf_layer *ly, step_bufs *b, float *o_out,
                           const int64_t *pos, const int64_t *out_loc, const int32_t *r2t, int64_t r2t_stride,
                           const int64_t *rows, const int64_t *seq_lens, int attn_threads) {
    const rf_model *md = c->md;
    int64_t M = c->M, H = md->heads, Hkv = md->kv_heads, D = md->head_dim;
    int64_t q_size = H * D, kv_size = Hkv * D, width = q_size + 2 * kv_size;
    if (linear(c, &ly->qkv, b->h, b->qkv)) return -2;
    if (rope_f32(b->qkv, M, H + Hkv, D, width, pos, md->cos, md->sin, md->cache_stride, md->max_pos, 1))
        return -1;
    store_kv(ly->k_buf, md->kv_dtype, b->qkv + q_size, width, out_loc, M, kv_size);
    store_kv(ly->v_buf, md->kv_dtype, b->qkv + q_size + kv_size, width, out_loc, M, kv_size);
    const float *q = b->qkv;
    if (M > 1) {  /* the kernel takes contiguous (M, H, D) queries */
        for (int64_t i = 0; i < M; i++) memcpy(b->q + i * q_size, b->qkv + i * width, sizeof(float) * q_size);
        q = b->q;
    }
    int64_t t0 = c->timers ? clock_ns() : 0;
    int rc = decode_attention_f32(q, ly->k_buf, ly->v_buf, r2t, r2t_stride, rows, seq_lens, (int)M, (int)H,
                                  (int)Hkv, (int)D, md->scale, b->attn, attn_threads, (int)md->kv_dtype);
    if (c->timers) c->timers[T_ATTENTION] += clock_ns() - t0;
    if (rc) return -3;
    return linear(c, &ly->o, b->attn, o_out) ? -2 : 0;
}

/* Checks every index the step dereferences outside the weights (before anything is written). */
static int check_step(const rf_model *md, int64_t M, const int64_t *pos, const int64_t *out_loc,
                      int64_t r2t_stride, int64_t r2t_rows, const int64_t *rows, const int64_t *seq_lens) {
    for (int64_t i = 0; i < M; i++) {
        if (pos[i] < 0 || pos[i] >= md->max_pos || out_loc[i] < 0 || out_loc[i] >= md->num_slots) return -1;
        if (rows[i] < 0 || rows[i] >= r2t_rows || seq_lens[i] < 1 || seq_lens[i] > r2t_stride) return -1;
    }
    return 0;
}

/* Runs every layer for M decode rows. x (M, hidden): the embedded tokens in, the last layer's
 * output out (not yet added to the residual stream); residual (M, hidden): the stream before the
 * last layer's output, out. req_to_token: int32 rows of r2t_stride slots, r2t_rows rows;
 * rows[i], seq_lens[i], pos[i], out_loc[i]: row i's request row, key count (its new token
 * included, whose slot req_to_token already holds), position and slot. timers: NULL, or
 * N_TIMERS int64 nanosecond counters (matmuls, attention) that this call adds to.
 * Returns 0; -1 for an index out of range (nothing written), -2 when scratch memory runs out,
 * -3 for head counts the attention kernel does not take. */
int decode_step_f32(const rf_model *md, float *x, float *residual, int64_t M, const int64_t *pos,
                    const int64_t *out_loc, const int32_t *r2t, int64_t r2t_stride, int64_t r2t_rows,
                    const int64_t *rows, const int64_t *seq_lens, int int_max_m, int threads, int attn_threads,
                    int64_t *timers) {
    if (M < 1 || check_step(md, M, pos, out_loc, r2t_stride, r2t_rows, rows, seq_lens)) return -1;
    int64_t hid = md->hidden, q_size = md->heads * md->head_dim;
    int64_t width = q_size + 2 * md->kv_heads * md->head_dim;
    int64_t per_row = hid + width + 2 * q_size + 3 * md->inter + hid;
    float *mem = malloc(sizeof(float) * per_row * M);
    if (!mem) return -2;
    step_bufs b = {mem, mem + hid * M, 0, 0, 0, 0};
    b.q = b.qkv + width * M;
    b.attn = b.q + q_size * M;
    b.gate_up = b.attn + q_size * M;
    b.act = b.gate_up + 2 * md->inter * M;
    float *o = b.act + md->inter * M;
    step_ctx c = {md, M, int_max_m, threads, timers};
    int rc = 0;
    for (int64_t l = 0; l < md->n_layers && !rc; l++) {
        const rf_layer *ly = &md->layers[l];
        if (l == 0) {
            memcpy(residual, x, sizeof(float) * hid * M);
            rmsnorm_f32(x, NULL, ly->in_norm, M, hid, md->eps, b.h, NULL);
        } else {
            rmsnorm_f32(x, residual, ly->in_norm, M, hid, md->eps, b.h, residual);
        }
        rc = attention_block(&c, ly, &b, o, pos, out_loc, r2t, r2t_stride, rows, seq_lens, attn_threads);
        if (rc) break;
        rmsnorm_f32(o, residual, ly->post_norm, M, hid, md->eps, b.h, residual);
        if (linear(&c, &ly->gate_up, b.h, b.gate_up)) rc = -2;
        else silu_mul_f32(b.gate_up, M, md->inter, 2 * md->inter, b.act, 1);
        if (!rc && linear(&c, &ly->down, b.act, x)) rc = -2;
    }
    free(mem);
    return rc;
}
