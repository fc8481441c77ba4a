/* Fused elementwise work of a decoder layer for CPUs: each op one pass over its rows, where
 * torch runs 4-8 separate ops with a temporary each (on the `bench` model ~4,000 ops a step).
 *
 *   add_rms_norm  res = x + delta (when delta is given; else res is x), then
 *                 out = weight * rms_norm(res)  -- transformers' LlamaRMSNorm: float32 math,
 *                 the normalised row rounded to the model dtype before the weight multiplies
 *   silu_mul      out = silu(gate) * up, gate/up the two halves of each row of gate_up
 *
 * Both for float32 and bf16 (uint16 bits) tensors, rounding where torch rounds (every bf16 op's
 * result), so bf16 results match torch's op sequence to the last bit but for the order of the
 * float32 sum of squares. Rows are split across threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_math.h"

/* Below this many elements an op runs on the calling thread: waking the pool costs more. */
#define PARALLEL_MIN 65536

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

void add_rms_norm_f32(const float* x, const float* delta, const float* w, float* res, float* out, int rows,
                      int n, float eps, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if ((int64_t)rows * n >= PARALLEL_MIN)
    for (int r = 0; r < rows; r++) {
        const float* xr = x + (int64_t)r * n;
        float* o = out + (int64_t)r * n;
        float ss = 0.f;
        if (delta) {
            const float* dr = delta + (int64_t)r * n;
            float* rr = res + (int64_t)r * n;
#pragma omp simd reduction(+ : ss)
            for (int i = 0; i < n; i++) {
                const float v = xr[i] + dr[i];
                rr[i] = v;
                ss += v * v;
            }
            xr = rr;
        } else {
#pragma omp simd reduction(+ : ss)
            for (int i = 0; i < n; i++) ss += xr[i] * xr[i];
        }
        const float inv = 1.f / sqrtf(ss / (float)n + eps);
#pragma omp simd
        for (int i = 0; i < n; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

void add_rms_norm_bf16(const uint16_t* x, const uint16_t* delta, const uint16_t* w, uint16_t* res, uint16_t* out,
                       int rows, int n, float eps, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if ((int64_t)rows * n >= PARALLEL_MIN)
    for (int r = 0; r < rows; r++) {
        const uint16_t* xr = x + (int64_t)r * n;
        uint16_t* o = out + (int64_t)r * n;
        float ss = 0.f;
        if (delta) {
            const uint16_t* dr = delta + (int64_t)r * n;
            uint16_t* rr = res + (int64_t)r * n;
            for (int i = 0; i < n; i++) {
                const uint16_t v = f32_to_bf16(bf16_to_f32(xr[i]) + bf16_to_f32(dr[i]));
                rr[i] = v;
                const float f = bf16_to_f32(v);
                ss += f * f;
            }
            xr = rr;
        } else {
            for (int i = 0; i < n; i++) {
                const float f = bf16_to_f32(xr[i]);
                ss += f * f;
            }
        }
        const float inv = 1.f / sqrtf(ss / (float)n + eps);
        for (int i = 0; i < n; i++)
            o[i] = f32_to_bf16(bf16_to_f32(w[i]) * round_bf16(bf16_to_f32(xr[i]) * inv));
    }
}

void silu_mul_f32(const float* gu, float* out, int rows, int inter, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if ((int64_t)rows * inter >= PARALLEL_MIN)
    for (int r = 0; r < rows; r++) {
        const float* g = gu + (int64_t)r * 2 * inter;
        const float* u = g + inter;
        float* o = out + (int64_t)r * inter;
#pragma omp simd
        for (int i = 0; i < inter; i++) o[i] = g[i] / (1.f + exp_approx(-g[i])) * u[i];
    }
}

void silu_mul_bf16(const uint16_t* gu, uint16_t* out, int rows, int inter, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if ((int64_t)rows * inter >= PARALLEL_MIN)
    for (int r = 0; r < rows; r++) {
        const uint16_t* g = gu + (int64_t)r * 2 * inter;
        const uint16_t* u = g + inter;
        uint16_t* o = out + (int64_t)r * inter;
        for (int i = 0; i < inter; i++) {
            const float gf = bf16_to_f32(g[i]);
            o[i] = f32_to_bf16(round_bf16(gf / (1.f + exp_approx(-gf))) * bf16_to_f32(u[i]));
        }
    }
}
