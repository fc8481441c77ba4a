/* Float helpers shared by the native CPU kernels (included by each csrc/*.c). */
#ifndef PAGEDQ_CPU_MATH_H
#define PAGEDQ_CPU_MATH_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; a NaN stays a (quiet) NaN. Branch-free, so that loops calling it
 * vectorize (with the NaN test as a branch, GCC left every bf16 loop scalar: silu_mul over
 * 512 x 1536 bf16 took 3.8 ms on 2 cores, ~15 cycles an element). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/* exp(x), written so that the loops calling it vectorize (glibc's vector expf is not declared
 * without -ffinite-math-only): 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p of degree 6
 * (relative error < 2e-7); x is clamped to [-87, 88], where float32 exp neither under- nor
 * overflows. */
static inline float exp_approx(float x) {
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    const float n = __builtin_roundf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f; /* ln2 split in two */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* silu(g) = g * sigmoid(g), from the exponential of -|g| only. Written as g / (1 + exp(-g)),
 * GCC (-ffast-math) evaluated the clamped cases of exp_approx as separate products, one of
 * them by 1 / (1 + e^88), a subnormal constant, for every vector; each such product stalls on
 * a subnormal-operand assist unless the process flushes subnormals (silu_mul 8-10x slower:
 * 512 x 1536 float32 in 3.8 ms instead of 0.4 on one core). With -|g| every constant of every
 * case is a normal float. */
static inline float silu_approx(float g) {
    const float e = exp_approx(-__builtin_fabsf(g));
    return g * ((g >= 0.f ? 1.f : e) / (1.f + e));
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* exp_approx for 16 floats at once: 2^n * p(r) through vscalefps (no integer exponent
 * arithmetic); x below -87 gives ~0 (about 1e-38), not a subnormal. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

/* 16 bf16 values widened to float32 (exact: the bf16 bits are the float's upper half). */
static inline __m512 widen_bf16x16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 floats as bf16, rounded to nearest even as f32_to_bf16 (vcvtneps2bf16 where the CPU has
 * AVX-512 BF16; else the same integer rounding, a NaN kept quiet), and widened back. */
#if defined(__AVX512BF16__)
static inline __m256i cvt_bf16x16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
#else
static inline __m256i cvt_bf16x16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    const __mmask16 is_nan =
        _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(is_nan, rounded, nan));
}
#endif
static inline __m512 round_bf16x16(__m512 x) { return widen_bf16x16(cvt_bf16x16(x)); }

/* silu_approx for 16 floats: g * (g >= 0 ? 1 : e) / (1 + e), e = exp(-|g|), the division a
 * reciprocal estimate and one Newton step (relative error ~1e-7; a vdivps costs more than the
 * rest of the element's math). */
static inline __m512 silu512(__m512 g) {
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 d = _mm512_add_ps(one, e);
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
    const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ), e, one);
    return _mm512_mul_ps(_mm512_mul_ps(g, num), r);
}
#endif

/* amx_gemm_cpu.c: whether this process may use AMX tiles (asked of Linux once), and the one
 * tile configuration the AMX kernels use (eight tiles of 16 rows x 64 bytes; AMX builds only). */
int amx_available(void);
void amx_configure_16x64(void);

#endif
