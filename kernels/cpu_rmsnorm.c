/* RMSNorm on CPU, fp32, with the residual add fused in: one pass over each row instead of the
 * five or six PyTorch ops (and thread-pool wake-ups) that F.rms_norm and `x + r` cost on CPU.
 * Built and loaded by radixflow/kernels/cpu_ext.py; reference: the Hugging Face formula
 * w * (s / sqrt(mean(s^2) + eps)), s = x (+ residual).
 *
 * x, out: (M, D) contiguous; residual, residual_out: (M, D) contiguous or NULL (both or neither);
 * residual_out may alias residual. Single-threaded: rows are short and the call is cheaper than
 * waking a sleeping thread pool.
 */
#include <math.h>
#include <stdint.h>

void rmsnorm_f32(const float *x, const float *residual, const float *w, int64_t M, int64_t D, float eps,
                 float *out, float *residual_out) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * D;
        float *o = out + m * D;
        const float *s = xr;
        if (residual) {
            const float *rr = residual + m * D;
            float *ro = residual_out + m * D;
            for (int64_t d = 0; d < D; d++) ro[d] = xr[d] + rr[d];
            s = ro;
        }
        float ss = 0.f;
        for (int64_t d = 0; d < D; d++) ss += s[d] * s[d];
        float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t d = 0; d < D; d++) o[d] = w[d] * (s[d] * inv);
    }
}
