/* Dense products of a few rows (decode steps of up to ~64 sequences) for CPUs, streaming the
 * weight once in its own dtype:  y[m][n] = sum_k x[m][k] * w[n][k] + bias[n].
 *
 * The weight is laid out once, at load, in panels of 16 output rows, k-major
 * (w_panels[n / 16][k][16], the last panel padded with zeros; kernels/native.py `panels`), so
 * the product is the outer-product micro-kernel of a GEMM: per k, the panel's 16 weights (two
 * AVX2 vectors, one cache line in float32) times up to six input rows broadcast (MR), twelve
 * accumulators that hold whole outputs (no horizontal sums); panels are split across threads.
 * The weight streams as one sequential read per panel, and rows beyond the first six re-read
 * the panel from L2. At one row that is the memory's speed; from ~16 rows it is compute-bound
 * at oneDNN's rate or better. Measured on a 2-vCPU AMD EPYC (AVX2), the 120 float32 GEMMs of a
 * `bench` decode step with cold weights, ms (oneDNN packed / the earlier [n][k] dot-product
 * kernel / these panels): 1 row 44 / 30 / 25, 8 rows 60 / 43 / 36, 24 rows 82 / 82 / 55,
 * 64 rows 151 / 231 / 145. (Its first version kept the accumulators in an array, which GCC
 * stored to the stack on every k: half the speed. They are named variables here.)
 *
 * With AVX-512 a panel is one vector and each call takes two panels (the same twelve
 * accumulators, each FMA twice as wide). Measured on a 2-vCPU AVX-512 Xeon without BF16 (bf16
 * weights, `bench`'s four decoder GEMMs, warm; AVX2 kernel / AVX-512 kernel / oneDNN float32
 * packed, ms): 1 row 0.215 / 0.123 / 0.301, 16 rows 0.803 / 0.519 / 0.601, 64 rows
 * 3.12 / 1.89 / 1.80. A call there takes twelve rows (24 of the 32 registers; a panel is
 * re-read from L1/L2 half as often): 32 rows 0.99 -> 0.90 ms, 64 rows 1.91 -> 1.69 (16 rows
 * level). (Tried, not kept: the two panels of a call interleaved element by element, so that
 * one 64-byte load and one instruction per panel widen them: another 10% at 16-64 rows, but
 * one stream instead of two cut the cold read at one row from 22 to 20 GB/s, batch-1 decode
 * 87 -> 77 tok/s.)
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
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define PANEL 16 /* output rows per panel */
#if defined(__AVX512F__)
#define MR 12 /* input rows per micro-kernel call: 24 accumulators of AVX-512's 32 registers */
#else
#define MR 6 /* input rows per micro-kernel call: 12 accumulators of AVX2's 16 registers */
#endif

/* panel_f32 / panel_bf16 (x, R, k, pw, NP, acc): the outputs of NP panels from pw (NP = 2: pw
 * and the panel after it; NP = 1: pw alone) for R <= MR input rows x, before the bias, into
 * acc[r][j] (j < NP * 16). With AVX-512 a panel is one vector and a call takes two panels
 * (twelve accumulators, as AVX2's two vectors of one panel: twice the FMA width, so from ~16
 * rows twice the rate; at one row both stream at the memory's speed). */
#if defined(__AVX512F__)
#define NPU 2 /* panels per unit: per micro-kernel call, and per thread's share */
typedef __m512 vec_t;
#define VZERO() _mm512_setzero_ps()
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VBCAST(p) _mm512_set1_ps(*(p))
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VLANES 16
#define SECOND(p) ((p) + (int64_t)k * PANEL) /* the next panel's row kk */
#define LOAD_F32(p) _mm512_loadu_ps(p)
#define LOAD_BF16(p) widen_bf16x16(_mm256_loadu_si256((const __m256i*)(p)))
#elif defined(__AVX2__) && defined(__FMA__)
#define NPU 1
typedef __m256 vec_t;
#define VZERO() _mm256_setzero_ps()
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VBCAST(p) _mm256_broadcast_ss(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VLANES 8
#define SECOND(p) ((p) + 8) /* the panel's second half */
static inline __m256 widen_bf16(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#define LOAD_F32(p) _mm256_loadu_ps(p)
#define LOAD_BF16(p) widen_bf16(p)
#endif

#ifdef VLANES
/* Two vectors b0, b1 per k (AVX-512: two panels, or one when NV = 1; AVX2: one panel's
 * halves) times R rows broadcast: accumulators c0r, c1r. */
#define ROW_FMA(r)                                              \
    if (r < R) {                                                \
        const vec_t a = VBCAST(x + (int64_t)r * k + kk);        \
        c0##r = VFMA(a, b0, c0##r);                             \
        if (NV > 1) c1##r = VFMA(a, b1, c1##r);                 \
    }
#define ROW_OUT(r)                                          \
    if (r < R) {                                            \
        VSTORE(acc[r], c0##r);                              \
        if (NV > 1) VSTORE(acc[r] + VLANES, c1##r);         \
    }
/* R input rows and NV vectors (constants in each instance, so the unused accumulators
 * vanish). Prefetches run 1 KB ahead in each stream. */
#define PANEL_KERNEL(NAME, WT, LOAD)                                                               \
    static void NAME(const float* x, int R_, int k, const WT* pw, int np, float acc[MR][NPU * PANEL]) { \
        if (NPU == 1 || np > 1)                                                                    \
            PANEL_ROWS(2, WT, LOAD)                                                                \
        else                                                                                       \
            PANEL_ROWS(1, WT, LOAD)                                                                \
    }
/* one instance per row count R_ (1..MR) */
#define PANEL_ROWS(NVV, WT, LOAD)                           \
    switch (R_) {                                           \
    ROWS_ABOVE_6(NVV, WT, LOAD)                             \
    case 6: PANEL_BODY(6, NVV, WT, LOAD) break;             \
    case 5: PANEL_BODY(5, NVV, WT, LOAD) break;             \
    case 4: PANEL_BODY(4, NVV, WT, LOAD) break;             \
    case 3: PANEL_BODY(3, NVV, WT, LOAD) break;             \
    case 2: PANEL_BODY(2, NVV, WT, LOAD) break;             \
    default: PANEL_BODY(1, NVV, WT, LOAD) break;            \
    }
#define PANEL_BODY(RV, NVV, WT, LOAD)                                                              \
    {                                                                                              \
        enum { R = RV, NV = NVV };                                                                 \
        vec_t c00 = VZERO(), c01 = c00, c02 = c00, c03 = c00, c04 = c00, c05 = c00;                \
        vec_t c10 = c00, c11 = c00, c12 = c00, c13 = c00, c14 = c00, c15 = c00;                    \
        vec_t c06 = c00, c07 = c00, c08 = c00, c09 = c00, c010 = c00, c011 = c00;                  \
        vec_t c16 = c00, c17 = c00, c18 = c00, c19 = c00, c110 = c00, c111 = c00;                  \
        for (int kk = 0; kk < k; kk++) {                                                           \
            const WT* p = pw + (int64_t)kk * PANEL;                                                \
            _mm_prefetch((const char*)p + 1024, _MM_HINT_T0);                                      \
            if (NPU > 1 && NV > 1) _mm_prefetch((const char*)SECOND(p) + 1024, _MM_HINT_T0);       \
            const vec_t b0 = LOAD(p), b1 = NV > 1 ? LOAD(SECOND(p)) : b0;                          \
            (void)b1;                                                                              \
            ROW_FMA(0) ROW_FMA(1) ROW_FMA(2) ROW_FMA(3) ROW_FMA(4) ROW_FMA(5)                      \
            ROW_FMA(6) ROW_FMA(7) ROW_FMA(8) ROW_FMA(9) ROW_FMA(10) ROW_FMA(11)                    \
        }                                                                                          \
        ROW_OUT(0) ROW_OUT(1) ROW_OUT(2) ROW_OUT(3) ROW_OUT(4) ROW_OUT(5)                           \
        ROW_OUT(6) ROW_OUT(7) ROW_OUT(8) ROW_OUT(9) ROW_OUT(10) ROW_OUT(11)                        \
        (void)c00, (void)c01, (void)c02, (void)c03, (void)c04, (void)c05;                          \
        (void)c10, (void)c11, (void)c12, (void)c13, (void)c14, (void)c15;                          \
        (void)c06, (void)c07, (void)c08, (void)c09, (void)c010, (void)c011;                        \
        (void)c16, (void)c17, (void)c18, (void)c19, (void)c110, (void)c111;                        \
    }
#if MR > 6
#define ROWS_ABOVE_6(NVV, WT, LOAD)                         \
    case 12: PANEL_BODY(12, NVV, WT, LOAD) break;           \
    case 11: PANEL_BODY(11, NVV, WT, LOAD) break;           \
    case 10: PANEL_BODY(10, NVV, WT, LOAD) break;           \
    case 9: PANEL_BODY(9, NVV, WT, LOAD) break;             \
    case 8: PANEL_BODY(8, NVV, WT, LOAD) break;             \
    case 7: PANEL_BODY(7, NVV, WT, LOAD) break;
#else
#define ROWS_ABOVE_6(NVV, WT, LOAD)
#endif
PANEL_KERNEL(panel_f32, float, LOAD_F32)
PANEL_KERNEL(panel_bf16, uint16_t, LOAD_BF16)
#else
/* Portable: the same sums in the same order (one accumulator per output, k ascending; without
 * FMA each product is rounded once more). One panel per call. */
#define NPU 1
#define PANEL_KERNEL(NAME, WT, LOAD)                                                          \
    static void NAME(const float* x, int R, int k, const WT* pw, int np, float acc[MR][PANEL]) { \
        (void)np;                                                                             \
        for (int r = 0; r < R; r++) {                                                         \
            float a[PANEL] = {0};                                                             \
            for (int kk = 0; kk < k; kk++) {                                                  \
                const float xv = x[(int64_t)r * k + kk];                                      \
                for (int j = 0; j < PANEL; j++) a[j] += xv * LOAD(pw[(int64_t)kk * PANEL + j]); \
            }                                                                                 \
            memcpy(acc[r], a, sizeof(a));                                                     \
        }                                                                                     \
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
    const int panels = (n + PANEL - 1) / PANEL, units = (panels + NPU - 1) / NPU;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (units > 1)
    for (int u = 0; u < units; u++) {
        const int t = u * NPU, np = panels - t < NPU ? panels - t : NPU;
        const int n0 = t * PANEL, cols = n - n0 < np * PANEL ? n - n0 : np * PANEL;
        const int64_t off = (int64_t)t * k * PANEL;
        for (int r0 = 0; r0 < m; r0 += MR) {
            const int rows = m - r0 < MR ? m - r0 : MR;
            float acc[MR][NPU * PANEL];
            if (w_bf16)
                panel_bf16(xf + (int64_t)r0 * k, rows, k, (const uint16_t*)w + off, np, acc);
            else
                panel_f32(xf + (int64_t)r0 * k, rows, k, (const float*)w + off, np, acc);
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
