/* Dense products of a few rows (batch-1 decode) for CPUs, streaming the weight once in its own
 * dtype:  y[m][n] = sum_k x[m][k] * w[n][k] + bias[n],  m <= a few rows.
 *
 * At one row a dense layer is a pass over its weight: the time is the weight's bytes over the
 * memory bandwidth. oneDNN's packed float32 GEMM reaches ~60% of that bandwidth at one row on a
 * 2-core AVX2 machine, and a bf16 model there is packed as float32 (no native bf16 GEMM), so it
 * reads twice the bytes of its own weights. Here the plain [n][k] weight is read as it is
 * (float32, or bf16 widened in registers), four output rows at a time against up to two input
 * rows held in registers (eight AVX2 accumulators), output rows split across threads; inputs
 * are widened to float32 once per call, outputs written in the input's dtype (bf16 rounded to
 * nearest even, as torch rounds a bf16 GEMM's float32 result).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define TILE_N 4
/* The tile's rows are contiguous: while it is read as four streams, the same number of bytes
 * ~18 KB ahead (two float32 tiles, four bf16 ones) is prefetched as one (a row of a
 * small model is only 1-3 KB, too short for the hardware prefetcher to ramp up on each; on
 * `bench`'s LM head this took 12.5 to 17.6 GB/s, and bf16's whole step 25 to 22 ms). */
#define PREFETCH_NEXT(base, off)                                         \
    {                                                                    \
        _mm_prefetch((base) + (off), _MM_HINT_T0);                       \
        _mm_prefetch((base) + (off) + 64, _MM_HINT_T0);                  \
    }

#ifdef __AVX2__
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float weight_at(const void* w, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t*)w)[i]) : ((const float*)w)[i];
}

#ifdef __AVX2__
/* one k-loop for either weight type: LOAD widens 8 weights of type WT to float32; the prefetch
 * runs ~18 KB (8 * TILE_N * k bytes) ahead, whatever the weight's size */
#define TILE_LOOP(WT, LOAD)                                                                        \
    {                                                                                              \
        const WT* w0 = (const WT*)w + (int64_t)n0 * k;                                             \
        const char* next = (const char*)w0 + 8 * TILE_N * (int64_t)k;                              \
        for (; kk + 8 <= k; kk += 8) {                                                             \
            PREFETCH_NEXT(next, kk * (int64_t)sizeof(WT) * TILE_N)                                 \
            const __m256 xa = load8(x + kk), xb = load8(x1 + kk);                                  \
            const __m256 b0 = LOAD(w0 + kk), b1 = LOAD(w0 + k + kk);                               \
            const __m256 b2 = LOAD(w0 + 2 * (int64_t)k + kk), b3 = LOAD(w0 + 3 * (int64_t)k + kk); \
            a00 = _mm256_fmadd_ps(b0, xa, a00), a01 = _mm256_fmadd_ps(b1, xa, a01);               \
            a02 = _mm256_fmadd_ps(b2, xa, a02), a03 = _mm256_fmadd_ps(b3, xa, a03);               \
            a10 = _mm256_fmadd_ps(b0, xb, a10), a11 = _mm256_fmadd_ps(b1, xb, a11);               \
            a12 = _mm256_fmadd_ps(b2, xb, a12), a13 = _mm256_fmadd_ps(b3, xb, a13);               \
        }                                                                                          \
    }
/* the same for three input rows (12 accumulators; each weight vector feeds three FMAs) */
#define TILE_LOOP3(WT, LOAD)                                                                       \
    {                                                                                              \
        const WT* w0 = (const WT*)w + (int64_t)n0 * k;                                             \
        const char* next = (const char*)w0 + 8 * TILE_N * (int64_t)k;                              \
        for (; kk + 8 <= k; kk += 8) {                                                             \
            PREFETCH_NEXT(next, kk * (int64_t)sizeof(WT) * TILE_N)                                 \
            const __m256 xa = load8(x + kk), xb = load8(x + k + kk), xc = load8(x + 2 * k + kk);   \
            __m256 b = LOAD(w0 + kk);                                                              \
            a00 = _mm256_fmadd_ps(b, xa, a00), a10 = _mm256_fmadd_ps(b, xb, a10);                 \
            a20 = _mm256_fmadd_ps(b, xc, a20);                                                     \
            b = LOAD(w0 + k + kk);                                                                 \
            a01 = _mm256_fmadd_ps(b, xa, a01), a11 = _mm256_fmadd_ps(b, xb, a11);                 \
            a21 = _mm256_fmadd_ps(b, xc, a21);                                                     \
            b = LOAD(w0 + 2 * (int64_t)k + kk);                                                    \
            a02 = _mm256_fmadd_ps(b, xa, a02), a12 = _mm256_fmadd_ps(b, xb, a12);                 \
            a22 = _mm256_fmadd_ps(b, xc, a22);                                                     \
            b = LOAD(w0 + 3 * (int64_t)k + kk);                                                    \
            a03 = _mm256_fmadd_ps(b, xa, a03), a13 = _mm256_fmadd_ps(b, xb, a13);                 \
            a23 = _mm256_fmadd_ps(b, xc, a23);                                                     \
        }                                                                                          \
    }
#endif

/* acc[r][j] = dot(x row r0 + r, w row n0 + j) for r < rows (1..3), j < cols (1..4); every
 * (row, column) sum is accumulated the same way whatever the tile's rows, so a row's output
 * does not depend on how a call's rows are tiled */
static void tile(const float* x, int rows, int k, const void* w, int bf16, int n0, int cols, float acc[3][TILE_N]) {
    int kk = 0;
    for (int r = 0; r < 3; r++)
        for (int j = 0; j < TILE_N; j++) acc[r][j] = 0.f;
#ifdef __AVX2__
    if (cols == TILE_N && rows == 3) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
        __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
        __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
        if (bf16)
            TILE_LOOP3(uint16_t, load8_bf16)
        else
            TILE_LOOP3(float, load8)
        acc[0][0] = hsum8(a00), acc[0][1] = hsum8(a01), acc[0][2] = hsum8(a02), acc[0][3] = hsum8(a03);
        acc[1][0] = hsum8(a10), acc[1][1] = hsum8(a11), acc[1][2] = hsum8(a12), acc[1][3] = hsum8(a13);
        acc[2][0] = hsum8(a20), acc[2][1] = hsum8(a21), acc[2][2] = hsum8(a22), acc[2][3] = hsum8(a23);
    } else if (cols == TILE_N) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
        __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
        const float* x1 = x + (rows > 1 ? k : 0); /* a second row, or the first again (discarded) */
        if (bf16)
            TILE_LOOP(uint16_t, load8_bf16)
        else
            TILE_LOOP(float, load8)
        acc[0][0] = hsum8(a00), acc[0][1] = hsum8(a01), acc[0][2] = hsum8(a02), acc[0][3] = hsum8(a03);
        acc[1][0] = hsum8(a10), acc[1][1] = hsum8(a11), acc[1][2] = hsum8(a12), acc[1][3] = hsum8(a13);
    }
#endif
    for (int r = 0; r < rows; r++) {
        const float* xr = x + (int64_t)r * k;
        for (int j = 0; j < cols; j++) {
            const int64_t base = (int64_t)(n0 + j) * k;
            float s = 0.f;
            for (int i = kk; i < k; i++) s += xr[i] * weight_at(w, bf16, base + i);
            acc[r][j] += s;
        }
    }
}

/* x: [m][k] float32 (x_bf16 = 0) or bf16; w: [n][k] float32 (w_bf16 = 0) or bf16; bias: [n]
 * float32 or NULL; y: [m][n] in x's dtype. Returns 0, or -1 (y unwritten) when the widened
 * input cannot be allocated. */
int gemv(const void* x, int x_bf16, int m, int k, const void* w, int w_bf16, int n, const float* bias, void* y,
         int nthreads) {
    float* xf = (float*)malloc(sizeof(float) * (size_t)m * (size_t)k);
    if (!xf) return -1;
    for (int64_t i = 0; i < (int64_t)m * k; i++)
        xf[i] = x_bf16 ? bf16_to_f32(((const uint16_t*)x)[i]) : ((const float*)x)[i];
    const int tiles = (n + TILE_N - 1) / TILE_N;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (tiles > 1)
    for (int t = 0; t < tiles; t++) {
        const int n0 = t * TILE_N, cols = n - n0 < TILE_N ? n - n0 : TILE_N;
        for (int r0 = 0; r0 < m;) { /* tiles of 3 rows, then 2 (4 = 2 + 2) or 1 */
            const int left = m - r0, rows = left == 4 ? 2 : (left < 3 ? left : 3);
            float acc[3][TILE_N];
            tile(xf + (int64_t)r0 * k, rows, k, w, w_bf16, n0, cols, acc);
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < cols; j++) {
                    const float v = acc[r][j] + (bias ? bias[n0 + j] : 0.f);
                    const int64_t o = (int64_t)(r0 + r) * n + n0 + j;
                    if (x_bf16)
                        ((uint16_t*)y)[o] = f32_to_bf16(v);
                    else
                        ((float*)y)[o] = v;
                }
            r0 += rows;
        }
    }
    free(xf);
    return 0;
}
