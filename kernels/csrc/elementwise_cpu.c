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
#pragma omp simd reduction(+ : ss)
            for (int i = 0; i < n; i++) {
                const uint16_t v = f32_to_bf16(bf16_to_f32(xr[i]) + bf16_to_f32(dr[i]));
                rr[i] = v;
                const float f = bf16_to_f32(v);
                ss += f * f;
            }
            xr = rr;
        } else {
#pragma omp simd reduction(+ : ss)
            for (int i = 0; i < n; i++) {
                const float f = bf16_to_f32(xr[i]);
                ss += f * f;
            }
        }
        const float inv = 1.f / sqrtf(ss / (float)n + eps);
#pragma omp simd
        for (int i = 0; i < n; i++)
            o[i] = f32_to_bf16(bf16_to_f32(w[i]) * round_bf16(bf16_to_f32(xr[i]) * inv));
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* 16 bf16 values (those of mask m) widened to float32. */
static inline __m512 load_bf16x16(const uint16_t* p, __mmask16 m) {
    return widen_bf16x16(_mm256_maskz_loadu_epi16(m, p));
}
#define SILU_VECTOR 1
#else
#define SILU_VECTOR 0
#endif

/* silu_mul's rows: 16 elements a step with AVX-512 (exp512 / silu512: the scalar loop, even
 * vectorized by GCC, divided with vdivps and took 2.2 ms for 2048 x 1536 bf16 on 2 cores).
 *
 * With R (silu_mul_f32r), silu_mul_bf16's result for a bf16 model whose GEMMs run in float32 (a
 * CPU without bf16 dot products): gate_up as the float32 GEMM output, rounded to bf16 on reading
 * (as the bf16 GEMM output would be), the result written as float32 holding bf16 values -- bit
 * for bit what silu_mul_bf16 gives, without the two conversions around it (gate_up's to bf16,
 * the down projection's input back to float32): 2048 x 1536, 2-core Xeon without BF16, 3.5 ms
 * for the bf16 kernel and the two conversions, 1.7 ms so. */
static inline __attribute__((always_inline)) void silu_mul_rows_f32(const float* gu, float* out, int rows, int inter,
                                                                    int nthreads, const int R) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if ((int64_t)rows * inter >= PARALLEL_MIN)
    for (int r = 0; r < rows; r++) {
        const float* g = gu + (int64_t)r * 2 * inter;
        const float* u = g + inter;
        float* o = out + (int64_t)r * inter;
#if SILU_VECTOR
        for (int i = 0; i < inter; i += 16) {
            const __mmask16 m = inter - i >= 16 ? 0xffff : (__mmask16)((1u << (inter - i)) - 1);
            __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
            if (R) {
                gv = round_bf16x16(gv);
                uv = round_bf16x16(uv);
            }
            const __m512 sv = silu512(gv);
            const __m512 ov = _mm512_mul_ps(R ? round_bf16x16(sv) : sv, uv);
            _mm512_mask_storeu_ps(o + i, m, R ? round_bf16x16(ov) : ov);
        }
#else
        if (R) {
#pragma omp simd
            for (int i = 0; i < inter; i++)
                o[i] = round_bf16(round_bf16(silu_approx(round_bf16(g[i]))) * round_bf16(u[i]));
        } else {
#pragma omp simd
            for (int i = 0; i < inter; i++) o[i] = silu_approx(g[i]) * u[i];
        }
#endif
    }
}

void silu_mul_f32(const float* gu, float* out, int rows, int inter, int nthreads) {
    silu_mul_rows_f32(gu, out, rows, inter, nthreads, 0);
}

void silu_mul_f32r(const float* gu, float* out, int rows, int inter, int nthreads) {
    silu_mul_rows_f32(gu, out, rows, inter, nthreads, 1);
}

void silu_mul_bf16(const uint16_t* gu, uint16_t* out, int rows, int inter, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if ((int64_t)rows * inter >= PARALLEL_MIN)
    for (int r = 0; r < rows; r++) {
        const uint16_t* g = gu + (int64_t)r * 2 * inter;
        const uint16_t* u = g + inter;
        uint16_t* o = out + (int64_t)r * inter;
#if SILU_VECTOR
        for (int i = 0; i < inter; i += 16) {
            const __mmask16 m = inter - i >= 16 ? 0xffff : (__mmask16)((1u << (inter - i)) - 1);
            const __m512 s = round_bf16x16(silu512(load_bf16x16(g + i, m)));
            _mm256_mask_storeu_epi16(o + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(s, load_bf16x16(u + i, m))));
        }
#else
#pragma omp simd
        for (int i = 0; i < inter; i++) {
            const float gf = bf16_to_f32(g[i]);
            o[i] = f32_to_bf16(round_bf16(silu_approx(gf)) * bf16_to_f32(u[i]));
        }
#endif
    }
}

/* rope_cache: rotary embeddings applied in place to the Q and K heads of a step's fused QKV
 * output, and the rotated K with V written to their cache slots -- one pass where torch runs
 * ~15 ops (a table lookup, cat, neg, two multiplies and an add per tensor, two index_copy).
 *
 * qkv [T][(H + 2 KVH) D] (Q heads, K heads, V heads); cos/sin [positions][D] in the model's
 * dtype; caches [slots][KVH][D] of the model's dtype. Rotation is transformers' rotate-half:
 * x * cos + rotate_half(x) * sin, rounded where torch rounds (each product and the sum) and
 * without fused multiply-adds, so the result is torch's to the last bit. */
#define ROPE_ATTR __attribute__((optimize("fp-contract=off")))

ROPE_ATTR static void rotate_f32(float* x, const float* c, const float* s, int D) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        const float pa = a * c[i], pb = b * c[i + half];
        const float qa = -b * s[i], qb = a * s[i + half];
        x[i] = pa + qa;
        x[i + half] = pb + qb;
    }
}

ROPE_ATTR static void rotate_bf16(uint16_t* x, const uint16_t* c, const uint16_t* s, int D) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        const float a = bf16_to_f32(x[i]), b = bf16_to_f32(x[i + half]);
        const float pa = round_bf16(a * bf16_to_f32(c[i])), pb = round_bf16(b * bf16_to_f32(c[i + half]));
        const float qa = round_bf16(-b * bf16_to_f32(s[i])), qb = round_bf16(a * bf16_to_f32(s[i + half]));
        x[i] = f32_to_bf16(pa + qa);
        x[i + half] = f32_to_bf16(pb + qb);
    }
}

#define ROPE_CACHE(SUFFIX, T_)                                                                                  \
    void rope_cache_##SUFFIX(T_* qkv, int T, int H, int KVH, int D, const int64_t* pos, const T_* cos_t,        \
                             const T_* sin_t, const int64_t* slots, T_* k_cache, T_* v_cache, int nthreads) {   \
        const int64_t row = (int64_t)(H + 2 * KVH) * D;                                                         \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if ((int64_t)T * row >= PARALLEL_MIN)") \
        for (int t = 0; t < T; t++) {                                                                           \
            T_* r = qkv + t * row;                                                                              \
            const T_* c = cos_t + pos[t] * D;                                                                   \
            const T_* s = sin_t + pos[t] * D;                                                                   \
            for (int h = 0; h < H + KVH; h++) rotate_##SUFFIX(r + (int64_t)h * D, c, s, D);                     \
            const int64_t kv = (int64_t)KVH * D;                                                                \
            memcpy(k_cache + slots[t] * kv, r + (int64_t)H * D, sizeof(T_) * (size_t)kv);                       \
            memcpy(v_cache + slots[t] * kv, r + (int64_t)(H + KVH) * D, sizeof(T_) * (size_t)kv);               \
        }                                                                                                       \
    }

ROPE_CACHE(f32, float)
ROPE_CACHE(bf16, uint16_t)

/* argmax_rows_f32 / argmax_rows_bf16: per row of x [rows][n] (row stride ld), the first index
 * of its largest value, a NaN counting as larger than any number (torch.argmax's order), into
 * out [rows] int64. The sampler's greedy pick: torch.argmax over a [64, 49152] float32 row block
 * took ~1.8 ms of a decode step (a scalar reduction); here one vectorized max, then a search by
 * blocks of 64. The bf16 instance reads a bf16 model's logits as they are (widening is exact and
 * keeps the order), so a greedy step skips converting the [rows, vocab] block to float32. */
#define ARGMAX_ROWS(SUFFIX, T_, LOAD)                                                                   \
    void argmax_rows_##SUFFIX(const T_* x, int64_t* out, int rows, int n, int64_t ld, int nthreads) {   \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if ((int64_t)rows * n >= PARALLEL_MIN)") \
        for (int r = 0; r < rows; r++) {                                                                \
            const T_* p = x + (int64_t)r * ld;                                                          \
            float mx = -INFINITY;                                                                       \
            int nan = 0;                                                                                \
            _Pragma("omp simd reduction(max : mx) reduction(| : nan)")                                  \
            for (int i = 0; i < n; i++) {                                                               \
                const float v = LOAD(p[i]);                                                             \
                mx = v > mx ? v : mx;                                                                   \
                nan |= v != v;                                                                          \
            }                                                                                           \
            int64_t best = 0;                                                                           \
            if (nan) { /* rare: the first NaN */                                                        \
                while (LOAD(p[best]) == LOAD(p[best])) best++;                                          \
            } else {                                                                                    \
                for (int c = 0; c < n; c += 64) {                                                       \
                    const int hi = c + 64 < n ? c + 64 : n;                                             \
                    int hit = 0;                                                                        \
                    _Pragma("omp simd reduction(| : hit)")                                              \
                    for (int i = c; i < hi; i++) hit |= LOAD(p[i]) == mx;                               \
                    if (hit) {                                                                          \
                        best = c;                                                                       \
                        while (LOAD(p[best]) != mx) best++;                                             \
                        break;                                                                          \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
            out[r] = best;                                                                              \
        }                                                                                               \
    }

#define AS_FLOAT(v) (v)
ARGMAX_ROWS(f32, float, AS_FLOAT)
ARGMAX_ROWS(bf16, uint16_t, bf16_to_f32)
