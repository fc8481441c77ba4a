/* Dense products of a few rows (decode steps of up to ~64 sequences) for CPUs, streaming the
 * weight once in its own dtype:  y[m][n] = sum_k x[m][k] * w[n][k] + bias[n].
 *
 * The weight is laid out once, at load, in panels of 16 output rows, k-major
 * (w_panels[n / 16][k][16], the last panel padded with zeros; kernels/native.py `panels`), so
 * the product is the outer-product micro-kernel of a GEMM: per k, the panel's 16 weights (two
 * AVX2 vectors, one cache line in float32) times up to six input rows broadcast, twelve
 * accumulators that hold whole outputs (no horizontal sums); panels are split across threads.
 * The weight streams as one sequential read per panel, and rows beyond the first six re-read
 * the panel from L2. At one row that is the memory's speed; from ~16 rows it is compute-bound
 * at oneDNN's rate or better. Measured on a 2-vCPU AMD EPYC (AVX2), the 120 float32 GEMMs of a
 * `bench` decode step with cold weights, ms (oneDNN packed / the earlier [n][k] dot-product
 * kernel / these panels): 1 row 44 / 30 / 25, 8 rows 60 / 43 / 36, 24 rows 82 / 82 / 55,
 * 64 rows 151 / 231 / 145. (Its first version kept the accumulators in an array, which GCC
 * stored to the stack on every k: half the speed. They are named variables here.)
 *
 * bf16 weights are widened in registers (half the bytes to stream); inputs are widened to
 * float32 once per call, outputs written in the input's dtype (bf16 rounded to nearest even,
 * as torch rounds a bf16 GEMM's float32 result). Each output is one float32 sum over k in
 * order, whatever the rows of the call: a row's result does not depend on its batch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define PANEL 16 /* output rows per panel */
#define MR 6     /* input rows per micro-kernel call */

/* panel_f32 / panel_bf16 (x, R, k, pw, acc): the outputs of one panel pw for R <= MR input rows
 * x, before the bias, into acc[r][j]. */
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 widen8(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

#define ROW_FMA(r)                                                 \
    if (r < R) {                                                   \
        const __m256 a = _mm256_broadcast_ss(x + (int64_t)r * k + kk); \
        c0##r = _mm256_fmadd_ps(a, b0, c0##r);                     \
        c1##r = _mm256_fmadd_ps(a, b1, c1##r);                     \
    }
#define ROW_OUT(r)                                \
    if (r < R) {                                  \
        _mm256_storeu_ps(acc[r], c0##r);          \
        _mm256_storeu_ps(acc[r] + 8, c1##r);      \
    }
/* R input rows (a constant in each instance, so the unused accumulators vanish); LOAD0/LOAD1
 * give the panel's two vectors at k. Prefetches run 1 KB ahead in the panel. */
#define PANEL_KERNEL(NAME, WT, LOAD0, LOAD1)                                                        \
    static void NAME(const float* x, int R_, int k, const WT* pw, float acc[MR][PANEL]) {          \
        switch (R_) {                                                                              \
        case 6: PANEL_BODY(6, WT, LOAD0, LOAD1) break;                                              \
        case 5: PANEL_BODY(5, WT, LOAD0, LOAD1) break;                                              \
        case 4: PANEL_BODY(4, WT, LOAD0, LOAD1) break;                                              \
        case 3: PANEL_BODY(3, WT, LOAD0, LOAD1) break;                                              \
        case 2: PANEL_BODY(2, WT, LOAD0, LOAD1) break;                                              \
        default: PANEL_BODY(1, WT, LOAD0, LOAD1) break;                                             \
        }                                                                                          \
    }
#define PANEL_BODY(RV, WT, LOAD0, LOAD1)                                                           \
    {                                                                                              \
        enum { R = RV };                                                                           \
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c04 = c00, c05 = c00;  \
        __m256 c10 = c00, c11 = c00, c12 = c00, c13 = c00, c14 = c00, c15 = c00;                  \
        for (int kk = 0; kk < k; kk++) {                                                           \
            const WT* p = pw + (int64_t)kk * PANEL;                                                \
            _mm_prefetch((const char*)p + 1024, _MM_HINT_T0);                                      \
            const __m256 b0 = LOAD0(p), b1 = LOAD1(p);                                             \
            ROW_FMA(0) ROW_FMA(1) ROW_FMA(2) ROW_FMA(3) ROW_FMA(4) ROW_FMA(5)                      \
        }                                                                                          \
        ROW_OUT(0) ROW_OUT(1) ROW_OUT(2) ROW_OUT(3) ROW_OUT(4) ROW_OUT(5)                           \
        (void)c00, (void)c01, (void)c02, (void)c03, (void)c04, (void)c05;                          \
        (void)c10, (void)c11, (void)c12, (void)c13, (void)c14, (void)c15;                          \
    }
#define LOAD_F32_0(p) _mm256_loadu_ps(p)
#define LOAD_F32_1(p) _mm256_loadu_ps((p) + 8)
#define LOAD_BF16_0(p) widen8(p)
#define LOAD_BF16_1(p) widen8((p) + 8)
PANEL_KERNEL(panel_f32, float, LOAD_F32_0, LOAD_F32_1)
PANEL_KERNEL(panel_bf16, uint16_t, LOAD_BF16_0, LOAD_BF16_1)
#else
/* Portable: the same sums in the same order (one accumulator per output, k ascending; without
 * FMA each product is rounded once more). */
#define PANEL_KERNEL(NAME, WT, LOAD)                                                  \
    static void NAME(const float* x, int R, int k, const WT* pw, float acc[MR][PANEL]) { \
        for (int r = 0; r < R; r++) {                                                 \
            float a[PANEL] = {0};                                                     \
            for (int kk = 0; kk < k; kk++) {                                          \
                const float xv = x[(int64_t)r * k + kk];                              \
                for (int j = 0; j < PANEL; j++) a[j] += xv * LOAD(pw[(int64_t)kk * PANEL + j]); \
            }                                                                         \
            memcpy(acc[r], a, sizeof(a));                                             \
        }                                                                             \
    }
#define AS_F32(v) (v)
PANEL_KERNEL(panel_f32, float, AS_F32)
PANEL_KERNEL(panel_bf16, uint16_t, bf16_to_f32)
#endif

int amx_gemm_bf16(const uint16_t* x, int m, int k, const uint16_t* w, int n, const float* bias, uint16_t* y,
                  int nthreads);

/* x: [m][k] float32 (x_bf16 = 0) or bf16; w: panels [ceil(n / 16)][k][16] of float32
 * (w_kind 0) or bf16 (w_kind 1), or bf16 AMX tiles (w_kind 2, amx_gemm_cpu.c's layout, bf16 x
 * only); bias: [n] float32 or NULL; y: [m][n] in x's dtype. Returns 0, -1 (y unwritten) when
 * the widened input cannot be allocated, -2 when the AMX kernel cannot run (not built for
 * this CPU, the tile state refused, or a float32 x). */
int gemv(const void* x, int x_bf16, int m, int k, const void* w, int w_kind, int n, const float* bias, void* y,
         int nthreads) {
    if (w_kind == 2)
        return x_bf16 ? amx_gemm_bf16((const uint16_t*)x, m, k, (const uint16_t*)w, n, bias, (uint16_t*)y, nthreads)
                      : -2;
    const int w_bf16 = w_kind == 1;
    const float* xf = (const float*)x;
    float* widened = NULL;
    if (x_bf16) {
        widened = (float*)malloc(sizeof(float) * (size_t)m * (size_t)k);
        if (!widened) return -1;
        for (int64_t i = 0; i < (int64_t)m * k; i++) widened[i] = bf16_to_f32(((const uint16_t*)x)[i]);
        xf = widened;
    }
    const int panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (panels > 1)
    for (int t = 0; t < panels; t++) {
        const int n0 = t * PANEL, cols = n - n0 < PANEL ? n - n0 : PANEL;
        const int64_t off = (int64_t)t * k * PANEL;
        for (int r0 = 0; r0 < m; r0 += MR) {
            const int rows = m - r0 < MR ? m - r0 : MR;
            float acc[MR][PANEL];
            if (w_bf16)
                panel_bf16(xf + (int64_t)r0 * k, rows, k, (const uint16_t*)w + off, acc);
            else
                panel_f32(xf + (int64_t)r0 * k, rows, k, (const float*)w + off, acc);
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < cols; j++) {
                    const float v = acc[r][j] + (bias ? bias[n0 + j] : 0.f);
                    const int64_t o = (int64_t)(r0 + r) * n + n0 + j;
                    if (x_bf16)
                        ((uint16_t*)y)[o] = f32_to_bf16(v);
                    else
                        ((float*)y)[o] = v;
                }
        }
    }
    free(widened);
    return 0;
}
