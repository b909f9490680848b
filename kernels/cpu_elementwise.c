/* The decoder layer's elementwise steps on CPU, fp32, one C pass each instead of three or four
 * PyTorch ops (each allocating its output, some waking the thread pool): rotary embedding in place
 * on the fused q/k projection, and SiLU-and-multiply on the fused gate/up projection.
 * Built and loaded by radixflow/kernels/cpu_ext.py; references: RotaryEmbedding.rotate and
 * F.silu(gate) * up in runtime/models/llama.py.
 */
#include <stdint.h>

#include "cpu_math.h"

typedef void (*rf_task)(void *arg, int t, int n);
void rf_parallel(rf_task fn, void *arg, int n);  /* cpu_pool.c */

/* Split rows among threads only when there is enough work to pay for waking them. */
#define PARALLEL_MIN 65536

static int threads_for(int64_t work, int64_t rows, int threads) {
    if (work < PARALLEL_MIN || threads < 2) return 1;
    return rows < threads ? (int)rows : threads;
}

/* ---- rotary embedding ------------------------------------------------------------------- */

typedef struct {
    float *x;
    int64_t T, heads, D, row_stride, cache_stride;
    const int64_t *pos;
    const float *cos, *sin;
} rope_args;

/* Part t of n (rf_parallel may run fewer parts than asked, n = 1 doing everything). */
static void rope_part(void *p, int t, int n) {
    rope_args *a = p;
    int64_t lo = a->T * t / n, hi = a->T * (t + 1) / n, half = a->D / 2;
    for (int64_t i = lo; i < hi; i++) {
        const float *c = a->cos + a->pos[i] * a->cache_stride, *s = a->sin + a->pos[i] * a->cache_stride;
        for (int64_t h = 0; h < a->heads; h++) {
            float *x = a->x + i * a->row_stride + h * a->D;
            for (int64_t d = 0; d < half; d++) {
                float x1 = x[d], x2 = x[d + half];
                x[d] = x1 * c[d] - x2 * s[d];
                x[d + half] = x2 * c[d + half] + x1 * s[d + half];
            }
        }
    }
}

/* x: T rows of `heads` contiguous vectors of D floats, rows `row_stride` floats apart; rotated in
 * place, rotate-half style: x * cos[pos] + rotate_half(x) * sin[pos], with cos/sin caches of
 * rows `cache_stride` floats apart (D entries used: both halves, as Hugging Face stores them).
 * Returns -1, with x untouched, if a position is outside [0, max_pos). */
int rope_f32(float *x, int64_t T, int64_t heads, int64_t D, int64_t row_stride, const int64_t *pos,
             const float *cos, const float *sin, int64_t cache_stride, int64_t max_pos, int threads) {
    for (int64_t i = 0; i < T; i++)
        if (pos[i] < 0 || pos[i] >= max_pos) return -1;  /* before anything is written */
    rope_args a = {x, T, heads, D, row_stride, cache_stride, pos, cos, sin};
    rf_parallel(rope_part, &a, threads_for(T * heads * D, T, threads));
    return 0;
}

/* ---- SiLU and multiply ------------------------------------------------------------------ */

typedef struct {
    const float *x;
    float *out;
    int64_t M, I, x_stride;
} silu_args;

static void silu_part(void *p, int t, int n) {
    silu_args *a = p;
    int64_t lo = a->M * t / n, hi = a->M * (t + 1) / n;
    for (int64_t m = lo; m < hi; m++) {
        const float *g = a->x + m * a->x_stride, *u = g + a->I;
        float *o = a->out + m * a->I;
        for (int64_t i = 0; i < a->I; i++) {
            float v = g[i];
            float e = exp_neg(v > 0.f ? -v : v);  /* exp(-|v|): never overflows */
            float sig = v > 0.f ? 1.0f / (1.0f + e) : e / (1.0f + e);
            o[i] = v * sig * u[i];
        }
    }
}

/* out (M, I) contiguous = silu(x[:, :I]) * x[:, I:2I], x rows `x_stride` floats apart. */
void silu_mul_f32(const float *x, int64_t M, int64_t I, int64_t x_stride, float *out, int threads) {
    silu_args a = {x, out, M, I, x_stride};
    rf_parallel(silu_part, &a, threads_for(M * I, M, threads));
}
