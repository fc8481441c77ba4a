/* Weight-only-quantized GEMM for CPUs with AVX-512 BF16 (or AVX2 + FMA, further below):
 * y[M, N] = x[M, K] (bf16) @ W^T, where W is held as 8- or 4-bit codes with a scale (and zero)
 * per output channel and group of K. Returns 0, or -1 (y unwritten) without memory for scratch.
 *
 * Why it exists: torch's CPU kernels for int8/int4 weights (_weight_int8pack_mm,
 * _weight_int4pack_mm_for_cpu) convert the weight again for every few rows, so their cost
 * grows ~linearly with the rows; at a decode batch of 16-64 they are 1.5-3x slower than a bf16
 * GEMM. Here each weight tile is converted once per call into a bf16 buffer in L1 and reused by
 * every row, so the kernel reads half (int8) or a quarter (int4) of the bytes of a bf16 GEMM and
 * computes as fast as one (vdpbf16ps, fp32 accumulation).
 *
 * Layouts (written by pagedq/quant/linear.py, NativeQuantLinear):
 *   codes, bits 8: int8   [Np/64][K/2][64][2]   value q - 128 of code q (signed)
 *   codes, bits 4: uint8  [Np/64][K/4][64][2]   low nibble u[c][4t+j], high nibble u[c][4t+2+j]
 *     i.e. a panel of 64 output channels, K in pairs (vdpbf16ps takes 2 consecutive k per lane)
 *   scales [G][Np] fp32, zeros [G][Np] uint8 (the code of w = 0), G = K / group
 *   w[c][k] = (code - zero) * scale for the group of k.
 * Conversion is exact: an int8 value goes int32 -> fp32 -> bf16 (8 significant bits hold it);
 * a 4-bit code u becomes the bf16 bit pattern 0x4300 | u, i.e. the number 128 + u. The codes are
 * multiplied as integers and the group epilogue applies the affine map in fp32:
 *   y += s * sum_k x_k c_k - (off + z) * s * sum_k x_k      (c = q - 128, off = -128; c = 128 + u, off = 128)
 * so no weight is rounded to bf16 (a dequantize-then-bf16-GEMM rounds every weight).
 *
 * Blocking: threads split the 64-channel panels; per panel, K in blocks of kc (kc divides the
 * group, kc % 4 == 0), each block converted into buf[kc/2][64][2] bf16 and multiplied into
 * tiles of MR=6 rows x 64 channels (24 zmm accumulators), partial sums kept in fp32 per panel.
 * With M <= MR the codes are converted straight into registers (no buffer round trip).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"

static int woq_amx_on = 1; /* woq_set_amx */

/* Whether calls of AMX_MIN_ROWS rows or more may run on AMX tiles (1 by default); returns the
 * previous setting. Tests switch it off to compare the two paths in one build. Every build
 * keeps the setting, so the tests run alike everywhere; only an AMX build reads it. */
int woq_set_amx(int on) {
    const int was = woq_amx_on;
    woq_amx_on = on != 0;
    return was;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#define NB 64
#define MR 6
#define PREFETCH 2048 /* bytes ahead in the codes stream: the best of 0, 512, 1024, 2048 at 7-32 rows */

int woq_available(void) { return 1; }
const char* woq_isa(void) { return "avx512bf16"; }

/* the 4 vdpbf16ps operands (16 channels each) of K pair kp of a panel block */
static inline __attribute__((always_inline)) void cvt_pair(const int bits, const void* codes, const int kp, __m512bh b[4]) {
    if (bits == 8) {
        const int8_t* p = (const int8_t*)codes + (size_t)kp * 2 * NB;
        for (int j = 0; j < 4; j++) { /* 16 channels x 2 */
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + j * 32))));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + j * 32 + 16))));
            b[j] = _mm512_cvtne2ps_pbh(hi, lo);
        }
    } else { /* pairs 2t and 2t+1 share bytes: low and high nibbles */
        const uint8_t* p = (const uint8_t*)codes + (size_t)(kp / 2) * 2 * NB;
        const __m512i mask = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
        for (int j = 0; j < 4; j++) {
            __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + j * 32)));
            w = (kp & 1) ? _mm512_srli_epi16(w, 4) : _mm512_and_si512(w, mask);
            b[j] = (__m512bh)_mm512_or_si512(w, magic);
        }
    }
}

/* acc[r][j] += x[r][2kp:2kp+2] . b[j] for the rows of the tile; xt is the tile's packed rows:
 * xt[kp * MR + r] holds the pair of bf16 x[r][2kp], x[r][2kp+1] (see pack_rows) */
static inline __attribute__((always_inline)) void fma_pair(
    const int mr, const int32_t* xt, const int kp, const __m512bh b[4], __m512 acc[MR][4]) {
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
        __m512bh a = (__m512bh)_mm512_set1_epi32(xt[(size_t)kp * MR + r]);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
}

/* C[r][:] += acc[r] * s - xs[r] * zs   (zs = (off + z) * s), the group epilogue */
static inline __attribute__((always_inline)) void epilogue(
    const int mr, __m512 acc[MR][4], float* C, const float* s, const __m512 zs[4], const float* xs, const int xs_ld) {
    __m512 sv[4];
    for (int j = 0; j < 4; j++) sv[j] = _mm512_loadu_ps(s + j * 16);
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
        __m512 xr = _mm512_set1_ps(xs[(size_t)r * xs_ld]);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            float* c = C + (size_t)r * NB + j * 16;
            __m512 v = _mm512_fmadd_ps(acc[r][j], sv[j], _mm512_loadu_ps(c));
            _mm512_storeu_ps(c, _mm512_fnmadd_ps(xr, zs[j], v));
        }
    }
}

static inline __attribute__((always_inline)) void zero_acc(__m512 acc[MR][4]) {
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
}

/* a tile of mr rows over one K block, B read from the bf16 buffer */
static inline __attribute__((always_inline)) void tile_buf(
    const int mr, const int32_t* xt, int k0, const uint16_t* buf, int kc, float* C,
    const float* s, const __m512 zs[4], const float* xs, int xs_ld) {
    __m512 acc[MR][4];
    zero_acc(acc);
    for (int kp = 0; kp < kc / 2; kp++) {
        __m512bh b[4];
        for (int j = 0; j < 4; j++) b[j] = (__m512bh)_mm512_loadu_si512(buf + (size_t)kp * 2 * NB + j * 32);
        fma_pair(mr, xt, k0 / 2 + kp, b, acc);
    }
    epilogue(mr, acc, C, s, zs, xs, xs_ld);
}

/* a tile of mr rows over one K block, B converted straight from the codes (and kept in save,
 * when given, for the block's other tiles: the conversion then overlaps this tile's FMAs) */
static inline __attribute__((always_inline)) void tile_direct(
    const int mr, const int bits, const int32_t* xt, int k0, const void* codes, int kc, float* C,
    const float* s, const __m512 zs[4], const float* xs, int xs_ld, uint16_t* save) {
    __m512 acc[MR][4];
    zero_acc(acc);
    for (int kp = 0; kp < kc / 2; kp++) {
        __m512bh b[4];
        /* the codes stream from memory once: ask for them ahead of the hardware prefetcher */
        const char* ahead = (const char*)codes + (size_t)kp * NB * bits / 4 + PREFETCH;
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
        cvt_pair(bits, codes, kp, b);
        if (save)
            for (int j = 0; j < 4; j++) _mm512_storeu_si512(save + (size_t)kp * 2 * NB + j * 32, (__m512i)b[j]);
        fma_pair(mr, xt, k0 / 2 + kp, b, acc);
    }
    epilogue(mr, acc, C, s, zs, xs, xs_ld);
}

#define TILE_CASES(CALL)                                                                              \
    switch (mr) {                                                                                     \
        case 1: CALL(1); break;                                                                       \
        case 2: CALL(2); break;                                                                       \
        case 3: CALL(3); break;                                                                       \
        case 4: CALL(4); break;                                                                       \
        case 5: CALL(5); break;                                                                       \
        default: CALL(6); break;                                                                      \
    }

/* The zero-point term of a group's epilogue for a panel's 64 channels: (off + z) * s, s and z
 * the group's scales and zeros from the panel's first channel. */
static inline void zero_terms(const float* s, const uint8_t* z, float off, __m512 zs[4]) {
    for (int j = 0; j < 4; j++) {
        const __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(z + j * 16))));
        zs[j] = _mm512_mul_ps(_mm512_add_ps(zf, _mm512_set1_ps(off)), _mm512_loadu_ps(s + j * 16));
    }
}

/* Panel pn's float32 rows C [M][NB] into y [M][N] as bf16 (nearest even), its real channels. */
static inline void store_panel(const float* C, int M, uint16_t* y, int N, int pn) {
    const int nc = N - pn * NB < NB ? N - pn * NB : NB;
    for (int r = 0; r < M; r++) {
        uint16_t* yr = y + (size_t)r * N + (size_t)pn * NB;
        const float* cr = C + (size_t)r * NB;
        if (nc == NB) {
            for (int j = 0; j < 4; j++)
                _mm256_storeu_si256((__m256i*)(yr + j * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(cr + j * 16)));
        } else {
            for (int c = 0; c < nc; c++) {
                __m128bh v = _mm_cvtneps_pbh(_mm_set1_ps(cr[c]));
                memcpy(yr + c, &v, 2);
            }
        }
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define WOQ_AMX 1
/* Rows from which the AMX path runs (below, the vdpbf16ps tiles: one weight conversion serves
 * few rows either way, and a 16-row tile would mostly multiply padding). */
#define AMX_MIN_ROWS 8

/* The same product through AMX tiles, for calls of AMX_MIN_ROWS rows or more (K and the group
 * multiples of 32). Why: the vdpbf16ps tiles above run out of multiply throughput beyond a few
 * rows (a `bench` decode step of 64 rows: 25-35 ms in its quantized GEMMs against ~12 for bf16
 * weights on AMX), and dequantizing the whole weight to bf16 for a dense product writes and
 * reads back twice the bf16 weight's bytes every step. Here a group of a panel (group x 64
 * channels) is converted once per call into a bf16 buffer (exact codes, as above) that the
 * tiles read as B (16 K pairs x 16 channels), x goes in as A (16 rows x 32 K, a zero-padded
 * copy), each 32 x 32 block of the output sums the group in four C tiles, and the group's
 * epilogue (scale, zero point) adds it into the panel's float32 rows. The weight is read once,
 * as codes. */
static int woq_amx(const uint16_t* x, int M, int K, const void* codes, int bits, const float* scales,
                   const uint8_t* zeros, int group, uint16_t* y, int N, int Np, const float* xs, int nthreads) {
    const int G = K / group, panels = Np / NB, Mp = (M + 15) / 16 * 16;
    const float off = bits == 8 ? -128.0f : 128.0f;
    const size_t panel_bytes = (size_t)K * NB * bits / 8;
    uint16_t* xb = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)Mp * K);
    if (!xb) return -1;
    memcpy(xb, x, sizeof(uint16_t) * (size_t)M * K);
    memset(xb + (size_t)M * K, 0, sizeof(uint16_t) * (size_t)(Mp - M) * K);
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        uint16_t* buf = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)group * NB);
        float* C = (float*)aligned_alloc(64, sizeof(float) * (size_t)Mp * NB);
        float ct[32 * 32] __attribute__((aligned(64)));
        const int ok = buf && C;
        if (ok) amx_configure_16x64();
#pragma omp for schedule(static)
        for (int pn = 0; pn < panels; pn++) {
            if (!ok) {
                failed = 1; /* every thread still runs the loop (a worksharing construct) */
                continue;
            }
            const uint8_t* pc = (const uint8_t*)codes + (size_t)pn * panel_bytes;
            memset(C, 0, sizeof(float) * (size_t)M * NB);
            for (int g = 0; g < G; g++) {
                const int kp0 = g * group / 2;
                for (int kp = 0; kp < group / 2; kp++) { /* the group's codes, as exact bf16 */
                    __m512bh b[4];
                    const char* ahead = (const char*)pc + (size_t)(kp0 + kp) * NB * bits / 4 + PREFETCH;
                    _mm_prefetch(ahead, _MM_HINT_T0);
                    _mm_prefetch(ahead + 64, _MM_HINT_T0);
                    cvt_pair(bits, pc, kp0 + kp, b);
                    for (int j = 0; j < 4; j++) _mm512_store_si512(buf + (size_t)kp * 2 * NB + j * 32, (__m512i)b[j]);
                }
                const float* s = scales + (size_t)g * Np + (size_t)pn * NB;
                __m512 zs[4]; /* the group's zero-point terms, for every row block */
                zero_terms(s, zeros + (size_t)g * Np + (size_t)pn * NB, off, zs);
                for (int r0 = 0; r0 < Mp; r0 += 32) {
                    const int two = Mp - r0 >= 32, rows = M - r0 < (two ? 32 : 16) ? M - r0 : (two ? 32 : 16);
                    const uint16_t* xr = xb + (size_t)r0 * K + (size_t)g * group;
                    for (int cp = 0; cp < 2; cp++) { /* 32 of the panel's channels */
                        _tile_zero(4);
                        _tile_zero(5);
                        if (two) {
                            _tile_zero(6);
                            _tile_zero(7);
                        }
                        for (int t = 0; t < group / 32; t++) {
                            _tile_loadd(0, xr + t * 32, K * 2);
                            _tile_loadd(2, buf + (size_t)t * 16 * 2 * NB + cp * 64, 2 * NB * 2);
                            _tile_loadd(3, buf + (size_t)t * 16 * 2 * NB + cp * 64 + 32, 2 * NB * 2);
                            _tile_dpbf16ps(4, 0, 2);
                            _tile_dpbf16ps(5, 0, 3);
                            if (two) {
                                _tile_loadd(1, xr + (size_t)16 * K + t * 32, K * 2);
                                _tile_dpbf16ps(6, 1, 2);
                                _tile_dpbf16ps(7, 1, 3);
                            }
                        }
                        _tile_stored(4, ct, 128);
                        _tile_stored(5, ct + 16, 128);
                        if (two) {
                            _tile_stored(6, ct + 16 * 32, 128);
                            _tile_stored(7, ct + 16 * 32 + 16, 128);
                        }
                        /* the group's epilogue: C += sum * s - xs * (off + z) * s */
                        for (int r = 0; r < rows; r++) {
                            const __m512 xr_s = _mm512_set1_ps(xs[(size_t)(r0 + r) * G + g]);
                            for (int j = 0; j < 2; j++) {
                                float* c = C + (size_t)(r0 + r) * NB + cp * 32 + j * 16;
                                const __m512 v = _mm512_fmadd_ps(_mm512_load_ps(ct + r * 32 + j * 16),
                                                                 _mm512_loadu_ps(s + cp * 32 + j * 16), _mm512_load_ps(c));
                                _mm512_store_ps(c, _mm512_fnmadd_ps(xr_s, zs[2 * cp + j], v));
                            }
                        }
                    }
                }
            }
            store_panel(C, M, y, N, pn);
        }
        if (ok) _tile_release();
        free(buf);
        free(C);
    }
    free(xb);
    return failed ? -1 : 0;
}
#else
#define WOQ_AMX 0
#endif

/* x [M, K] bf16; y [M, N] bf16 (N <= Np, the first N channels are written) */
int woq_gemm_bf16(const uint16_t* x, int M, int K, const void* codes, int bits, const float* scales,
                  const uint8_t* zeros, int group, int kc, uint16_t* y, int N, int Np, int nthreads) {
    const int G = K / group, panels = Np / NB;
    const float off = bits == 8 ? -128.0f : 128.0f;
    const size_t panel_bytes = (size_t)K * NB * bits / 8;
    /* per-row sums of x over each group (the zero-point term) */
    float* xs = (float*)malloc(sizeof(float) * (size_t)M * G);
    if (!xs) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int r = 0; r < M; r++) {
        for (int g = 0; g < G; g++) {
            const uint16_t* p = x + (size_t)r * K + (size_t)g * group;
            __m512 a = _mm512_setzero_ps();
            int k = 0;
            for (; k + 16 <= group; k += 16)
                a = _mm512_add_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(
                                         _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p + k))), 16)));
            float t = _mm512_reduce_add_ps(a);
            for (; k < group; k++) {
                uint32_t u = (uint32_t)p[k] << 16;
                float f;
                memcpy(&f, &u, 4);
                t += f;
            }
            xs[(size_t)r * G + g] = t;
        }
    }
#if WOQ_AMX
    if (M >= AMX_MIN_ROWS && K % 32 == 0 && group % 32 == 0 && woq_amx_on && amx_available()) {
        const int status = woq_amx(x, M, K, codes, bits, scales, zeros, group, y, N, Np, xs, nthreads);
        free(xs);
        return status;
    }
#endif
    /* tiles of nearly equal rows (7 rows: 4 + 3, not 6 + 1: a tile of one or two rows has too few
     * accumulators to hide the vdpbf16ps latency), each packed pair by pair so its broadcasts
     * read consecutive bytes (rows K apart would all fall in one L1 set) */
    const int tiles = (M + MR - 1) / MR, base = M / tiles, extra = M % tiles;
#define TILE_START(t) ((t) * base + ((t) < extra ? (t) : extra))
    int32_t* xp = (int32_t*)aligned_alloc(64, sizeof(int32_t) * ((size_t)tiles * MR * (K / 2) + 16));
    if (!xp) {
        free(xs);
        return -1;
    }
    int failed = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int tl = 0; tl < tiles; tl++) {
        int32_t* d = xp + (size_t)tl * MR * (K / 2);
        const int start = TILE_START(tl), rows = base + (tl < extra);
        for (int r = 0; r < MR; r++) {
            const int row = start + r;
            if (r < rows) {
                const uint16_t* src = x + (size_t)row * K;
                for (int kp = 0; kp < K / 2; kp++) memcpy(d + (size_t)kp * MR + r, src + 2 * kp, 4);
            } else {
                for (int kp = 0; kp < K / 2; kp++) d[(size_t)kp * MR + r] = 0;
            }
        }
    }
    const int direct = M <= MR; /* one row tile: convert straight into registers */
#pragma omp parallel num_threads(nthreads)
    {
        float* C = (float*)aligned_alloc(64, sizeof(float) * (size_t)M * NB);
        uint16_t* buf = direct ? NULL : (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)kc * NB);
        const int ok = C && (direct || buf);
#pragma omp for schedule(static)
        for (int pn = 0; pn < panels; pn++) {
            if (!ok) {
                failed = 1; /* every thread still runs the loop (a worksharing construct) */
                continue;
            }
            const uint8_t* pc = (const uint8_t*)codes + (size_t)pn * panel_bytes;
            memset(C, 0, sizeof(float) * (size_t)M * NB);
            for (int k0 = 0; k0 < K; k0 += kc) {
                const int g = k0 / group;
                const float* s = scales + (size_t)g * Np + (size_t)pn * NB;
                __m512 zs[4]; /* the zero-point term, once per group (kc may be less than group) */
                if (k0 % group == 0) {
                    zero_terms(s, zeros + (size_t)g * Np + (size_t)pn * NB, off, zs);
                } else {
                    for (int j = 0; j < 4; j++) zs[j] = _mm512_setzero_ps();
                }
                const void* blk = pc + (size_t)k0 * NB * bits / 8;
                for (int tl = 0; tl < tiles; tl++) {
                    const int m0 = TILE_START(tl), mr = base + (tl < extra);
                    const int32_t* xt = xp + (size_t)tl * MR * (K / 2);
                    if (tl == 0 || direct) {
                        uint16_t* save = tl == 0 && !direct ? buf : NULL;
#define CALL_DIRECT(R) \
    tile_direct(R, bits, xt, k0, blk, kc, C + (size_t)m0 * NB, s, zs, xs + (size_t)m0 * G + g, G, save)
                        TILE_CASES(CALL_DIRECT)
                    } else {
#define CALL_BUF(R) \
    tile_buf(R, xt, k0, buf, kc, C + (size_t)m0 * NB, s, zs, xs + (size_t)m0 * G + g, G)
                        TILE_CASES(CALL_BUF)
                    }
                }
            }
            store_panel(C, M, y, N, pn);
        }
        free(C);
        free(buf);
    }
    free(xs);
    free(xp);
    return failed ? -1 : 0;
}

#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 + FMA, or AVX-512 without BF16 (no bf16 dot product): the same layouts in float32. A
 * __m256 holds 4 channels x the 2 k of a pair, as the codes lie ([c0k0, c0k1, c1k0, ...]), a
 * __m512 8 channels (dq_vec, DQ_CH); x is broadcast as its pair ([x0, x1] in every lane pair),
 * so each lane accumulates one channel's even or odd k and the two are added once per call.
 *
 * Two paths, both threads splitting units of channels of a panel:
 * - up to DIRECT_MAX rows (6; 10 with AVX-512; batch-1 decode, the memory-bound case): codes
 *   become float32 in registers, exactly (c = q - 128 for int8, u for 4-bit), and the group
 *   epilogue of the AVX-512 BF16 kernel applies scale and zero once per group; threads split
 *   whole panels, each read in order (tile_panel).
 * - more rows: a unit's codes are dequantized chunk by chunk into an L1 buffer as float32
 *   weights, (q - z) * s with one rounding (dequantize(float32) exactly), and tiles of up to
 *   MRD rows x 16 channels (12 or 24 accumulators, see tile_dq) run over them with no
 *   per-group epilogue: the conversion is paid once per call, not per row.
 * Either way only fp32 summation and the final bf16 rounding differ from x @ W^T in float64. */
#include <immintrin.h>

#define NB 64
#define MR 3  /* x's packing stride (rows per K pair) for calls of up to 3 rows: denser than MRD */
/* MRD: the most rows of a tile (direct or over dequantized weights), x's stride beyond 3;
 * DIRECT_MAX: calls of up to this many rows run direct tiles. With AVX-512 a direct tile holds
 * 12 rows (2 vectors x 12 of the 32 registers) and pays off up to 10 (bench's four decoder
 * GEMMs, int8, 2-vCPU Xeon without BF16, direct / over dequantized weights: 8 rows 0.33 / 0.40
 * ms, 10 rows 0.40 / 0.42, 12 rows 0.48 / 0.45). */
#if defined(__AVX512F__)
#define MRD 12
#define DIRECT_MAX 10
#else
#define MRD 6
#define DIRECT_MAX 6
#endif
#define CHUNK 128     /* K pairs per dequantized chunk: 16 KB of float32 for a 16-channel unit */
/* row tiles per block of x kept in L2, 192 rows (32 tiles of 6): at 2048 rows 78 -> 68.5 ms (the
 * four GEMMs above; 8 tiles 80, 16 72) */
#define TILE_BLOCK (192 / MRD)
/* rows of codes (128 bytes) prefetched ahead: ~100 ns of work at one row, where a row of int8
 * codes takes half the time of a 4-bit one (a 4-bit row holds two K pairs) */
#define PREFETCH(bits) ((bits) == 8 ? 24 * 2 * NB : 12 * 2 * NB)

int woq_available(void) { return 1; }
#if defined(__AVX512F__)
const char* woq_isa(void) { return "avx512"; }
#else
const char* woq_isa(void) { return "avx2"; }
#endif

/* the 8 lanes of channels c..c+3 x a K pair, as float32, from the codes' row p (int8: the
 * pair's 128 bytes; 4-bit: the 128 bytes of a K quad, whose low nibbles hold its first pair
 * (half 0) and high nibbles its second) */
static inline __attribute__((always_inline)) __m256 cvt8(const int bits, const uint8_t* p, const int half, const int c) {
    if (bits == 8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 2 * c))));
    __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 2 * c)));
    w = half ? _mm256_srli_epi32(w, 4) : _mm256_and_si256(w, _mm256_set1_epi32(0xF));
    return _mm256_cvtepi32_ps(w);
}

#if defined(__AVX512F__)
/* cvt8 for channels c..c+7: 16 lanes from 16 bytes of the row (half the instructions) */
static inline __attribute__((always_inline)) __m512 cvt16(const int bits, const uint8_t* p, const int half, const int c) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)(p + 2 * c));
    if (bits == 8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
    const __m512i w = _mm512_cvtepu8_epi32(raw);
    return _mm512_cvtepi32_ps(half ? _mm512_srli_epi32(w, 4) : _mm512_and_si512(w, _mm512_set1_epi32(0xF)));
}
#endif

/* The vector width of the float32 paths: AVX-512's 16 lanes where the CPU has them (a CPU
 * without AVX-512 BF16 runs this file's float32 kernels), else AVX2's 8. */
#if defined(__AVX512F__)
typedef __m512 dq_vec;
#define DQ_W 16 /* floats per vector: a K pair of the unit (32 floats) is 16 / DQ_W halves of two vectors */
#define DQ_ZERO() _mm512_setzero_ps()
#define DQ_SET1(v) _mm512_set1_ps(v)
#define DQ_FNMA(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define DQ_LOAD(p) _mm512_load_ps(p)
#define DQ_LOADU(p) _mm512_loadu_ps(p)
#define DQ_STORE(p, v) _mm512_store_ps(p, v)
#define DQ_STOREU(p, v) _mm512_storeu_ps(p, v)
#define DQ_ADD(a, b) _mm512_add_ps(a, b)
#define DQ_SUB(a, b) _mm512_sub_ps(a, b)
#define DQ_MUL(a, b) _mm512_mul_ps(a, b)
#define DQ_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define DQ_PAIR(p) _mm512_castpd_ps(_mm512_set1_pd(*(p))) /* a row's (x0, x1) in every lane pair */
#define DQ_CH 8 /* channels per vector (x the 2 k of a pair) */
#define DQ_CVT cvt16
#else
typedef __m256 dq_vec;
#define DQ_W 8
#define DQ_ZERO() _mm256_setzero_ps()
#define DQ_SET1(v) _mm256_set1_ps(v)
#define DQ_FNMA(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define DQ_LOAD(p) _mm256_load_ps(p)
#define DQ_LOADU(p) _mm256_loadu_ps(p)
#define DQ_STORE(p, v) _mm256_store_ps(p, v)
#define DQ_STOREU(p, v) _mm256_storeu_ps(p, v)
#define DQ_ADD(a, b) _mm256_add_ps(a, b)
#define DQ_SUB(a, b) _mm256_sub_ps(a, b)
#define DQ_MUL(a, b) _mm256_mul_ps(a, b)
#define DQ_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define DQ_PAIR(p) _mm256_castpd_ps(_mm256_broadcast_sd(p))
#define DQ_CH 4
#define DQ_CVT cvt8
#endif

/* acc[r][j] += b * x[r] for the pair kp of the tile's packed rows (xt[kp * ld + r]) */
#define FMA_ROWS(mr, ld, xt, kp, j, b)                                                                  \
    {                                                                                                   \
        const dq_vec b_ = (b);                                                                          \
        _Pragma("GCC unroll 12") for (int r = 0; r < (mr); r++) acc[r][j] =                              \
            DQ_FMA(b_, DQ_PAIR((xt) + (size_t)(kp) * (ld) + r), acc[r][j]);                             \
    }

/* up to DIRECT_MAX rows x a whole panel (64 channels) over one K block of kc, x packed ld rows
 * per pair; the codes become float32 in registers. A panel's lanes need more accumulators than
 * there are registers, so it is taken in parts of nv vectors (VECS / nv parts; AVX2: one row
 * 2 x 8, two or three rows 4 x 4, four to six 8 x 2; AVX-512: up to three rows 1 x 8, four to
 * six 2 x 4, seven to ten 4 x 2): rows of codes in blocks of RB, each block's parts
 * in turn with their accumulators reloaded from acc_mem. The codes then stream in order (a part
 * per pass over the block would read at a stride, every other cache line at one row: 9 GB/s of
 * int8 codes there against 14-17 this way) for a few loads and stores per block. Then the group
 * epilogue C[r] += acc[r] * s - xs[r] * zs (lane-expanded s and zs; zero term on even lanes). */
#define RB 16
static inline __attribute__((always_inline)) void tile_panel(
    const int mr, const int nv, const int ld, const int bits, const double* xt, const int k0, const uint8_t* codes,
    const int kc, float* C, const int ldc, const float* s, const float* zs, const float* xs, const int xs_ld) {
    enum { VECS = NB / DQ_CH, MAXV = VECS * MRD }; /* vectors per K pair of the panel */
    dq_vec acc_mem[MAXV]; /* [part][r][j] */
    const int parts = VECS / nv;
    for (int i = 0; i < parts * mr * nv; i++) acc_mem[i] = DQ_ZERO();
    const int per_row = bits == 8 ? 1 : 2, rows = kc / 2 / per_row;
    for (int rb = 0; rb < rows; rb += RB) {
        const int re = rb + RB < rows ? rb + RB : rows;
        for (int part = 0; part < parts; part++) {
            dq_vec acc[MRD][8];
            dq_vec* am = acc_mem + (size_t)part * mr * nv;
#pragma GCC unroll 12
            for (int r = 0; r < mr; r++)
#pragma GCC unroll 8
                for (int j = 0; j < nv; j++) acc[r][j] = am[r * nv + j];
            for (int row = rb; row < re; row++) {
                const uint8_t* p = codes + (size_t)row * 2 * NB;
                if (part == 0) {
                    _mm_prefetch((const char*)p + PREFETCH(bits), _MM_HINT_T0);
                    _mm_prefetch((const char*)p + PREFETCH(bits) + 64, _MM_HINT_T0);
                }
#pragma GCC unroll 2
                for (int h = 0; h < per_row; h++) {
                    const int kp = k0 / 2 + row * per_row + h;
#pragma GCC unroll 8
                    for (int j = 0; j < nv; j++)
                        FMA_ROWS(mr, ld, xt, kp, j, DQ_CVT(bits, p, h, (part * nv + j) * DQ_CH))
                }
            }
#pragma GCC unroll 12
            for (int r = 0; r < mr; r++)
#pragma GCC unroll 8
                for (int j = 0; j < nv; j++) am[r * nv + j] = acc[r][j];
        }
    }
    for (int part = 0; part < parts; part++)
#pragma GCC unroll 12
        for (int r = 0; r < mr; r++) {
            const dq_vec xr = DQ_SET1(xs[(size_t)r * xs_ld]);
#pragma GCC unroll 8
            for (int j = 0; j < nv; j++) {
                const int o = (part * nv + j) * DQ_W;
                float* c = C + (size_t)r * ldc + o;
                const dq_vec v = DQ_FMA(acc_mem[((size_t)part * mr + r) * nv + j], DQ_LOADU(s + o), DQ_LOADU(c));
                DQ_STOREU(c, DQ_FNMA(xr, DQ_LOADU(zs + o), v));
            }
        }
}

/* the float32 weights (q - z) * s of a 16-channel unit's K pairs kp0 .. kp0 + n into
 * buf[n][32] (su, zu: per group, the lane-expanded scales and zero codes + off) */
static inline __attribute__((always_inline)) void dequant_chunk(
    const int bits, const uint8_t* panel, const int c0, const int kp0, const int n, const int group,
    const float* su, const float* zu, float* buf) {
    const int per_row = bits == 8 ? 1 : 2, half_group = group / 2; /* K pairs per group (even) */
    int g = kp0 / half_group, next = (g + 1) * half_group;
    for (int row = kp0 / per_row; row < (kp0 + n) / per_row; row++) {
        const uint8_t* p = panel + (size_t)row * 2 * NB;
        _mm_prefetch((const char*)p + PREFETCH(bits) + 2 * c0, _MM_HINT_T0);
        if (row * per_row == next) { /* a row never straddles two groups: group % 4 == 0 */
            g++;
            next += half_group;
        }
        const float* sg = su + (size_t)g * 32;
        const float* zg = zu + (size_t)g * 32;
#pragma GCC unroll 2
        for (int h = 0; h < per_row; h++) {
            float* o = buf + (size_t)(row * per_row + h - kp0) * 32;
            /* the unit's 16 channels x 2 k in 32 / DQ_W vectors (AVX-512: half the instructions
             * of AVX2's; bench's four decoder GEMMs, 2-vCPU Xeon without BF16, int8: 8 rows
             * 0.43 -> 0.40 ms, 16 rows 0.59 -> 0.55; int4: 0.42 -> 0.37, 0.57 -> 0.52) */
#pragma GCC unroll 4
            for (int j = 0; j < 32 / DQ_W; j++) {
                const dq_vec w = DQ_SUB(DQ_CVT(bits, p, h, c0 + DQ_CH * j), DQ_LOADU(zg + j * DQ_W));
                DQ_STORE(o + j * DQ_W, DQ_MUL(w, DQ_LOADU(sg + j * DQ_W)));
            }
        }
    }
}

/* up to MRD rows x 16 channels over n dequantized K pairs from buf: C[r] += acc[r]. A K pair
 * of the unit is 32 floats: with AVX-512 two vectors, up to 12 rows (24 accumulators, 2 loads
 * and 12 broadcasts per 24 FMAs; 12-row tiles measured level with 6-row ones);
 * with AVX2 each half of the unit (8 channels, 2 vectors) in turn, the same 12 accumulators
 * and loads (a 3 x 4 tile needs 15). AVX-512 (a CPU without AVX-512 BF16: this float32 path
 * serves it) runs FMAs twice as wide: `bench`'s four decoder GEMMs, int8 or int4, 2-vCPU Xeon
 * with AVX-512 and no BF16, AVX2 / AVX-512, ms: 16 rows 0.93 / 0.64, 64 rows 2.84 / 1.72, 256
 * rows 11.1 / 6.4, 2048 rows 109 / 78 (68.5 with TILE_BLOCK; dense float32 GEMMs of the bf16
 * weights: 0.61, 1.70, 5.8, 48). */
static inline __attribute__((always_inline)) void tile_dq(
    const int mr, const double* xt, const int kp0, const int n, const float* buf, float* C, const int ldc) {
#pragma GCC unroll 2
    for (int half = 0; half < 16 / DQ_W; half++) {
        dq_vec acc[MRD][2];
#pragma GCC unroll 12
        for (int r = 0; r < MRD; r++) acc[r][0] = acc[r][1] = DQ_ZERO();
        const float* b = buf + half * 2 * DQ_W;
        for (int i = 0; i < n; i++) {
            const dq_vec b0 = DQ_LOAD(b + (size_t)i * 32), b1 = DQ_LOAD(b + (size_t)i * 32 + DQ_W);
            const double* xk = xt + (size_t)(kp0 + i) * MRD;
#pragma GCC unroll 12
            for (int r = 0; r < mr; r++) {
                const dq_vec xr = DQ_PAIR(xk + r);
                acc[r][0] = DQ_FMA(b0, xr, acc[r][0]);
                acc[r][1] = DQ_FMA(b1, xr, acc[r][1]);
            }
        }
#pragma GCC unroll 12
        for (int r = 0; r < mr; r++)
#pragma GCC unroll 2
            for (int j = 0; j < 2; j++) {
                float* c = C + (size_t)r * ldc + half * 2 * DQ_W + j * DQ_W;
                DQ_STOREU(c, DQ_ADD(DQ_LOADU(c), acc[r][j]));
            }
    }
}

/* The direct tile's instances, X(rows, vectors per part, bits), rows 1 to DIRECT_MAX: vectors per
 * part as many accumulators as the registers hold (16 ymm: one row 8, three 12, six 12; 32 zmm:
 * a whole panel's 8 up to three rows, 4 a part for four to six, 2 beyond). The dequantized
 * tile's, X(rows), rows 1 to MRD. One list each serves the functions and their dispatch. */
#if defined(__AVX512F__)
#define NV_FEW 8
#define NV_MANY 4
#define NV_TOP 2
#define DIRECT_ABOVE_5(X, B) X(6, NV_MANY, B) X(7, NV_TOP, B) X(8, NV_TOP, B) X(9, NV_TOP, B)
#else
#define NV_FEW 4
#define NV_MANY 2
#define NV_TOP 2
#define DIRECT_ABOVE_5(X, B)
#endif
#define DIRECT_TILES(X, B)                                                                   \
    X(1, 8, B) X(2, NV_FEW, B) X(3, NV_FEW, B) X(4, NV_MANY, B) X(5, NV_MANY, B) DIRECT_ABOVE_5(X, B) \
    X(DIRECT_MAX, NV_TOP, B)
#if MRD > 6
#define DQ_TILES(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12)
#else
#define DQ_TILES(X) X(1) X(2) X(3) X(4) X(5) X(6)
#endif

/* Each instance of the two tiles is a function of its own: inlined into woq_gemm_bf16's unit
 * loop, the thirty-odd made one function that took the compiler most of this file's 3.1 s (the
 * library compiles while a cold start waits). The call per panel block or chunk costs nothing
 * visible. Their C strides are constants: a direct unit is a panel (2 * NB floats a row of C),
 * a dequantized one 16 channels (32). */
#define PANEL_NAME(R, V, B) PANEL_NAME_(R, V, B) /* (V expanded first) */
#define PANEL_NAME_(R, V, B) panel_##R##_##V##_##B
#define PANEL_FN(R, V, B)                                                                                  \
    static __attribute__((noinline)) void PANEL_NAME(R, V, B)(                                               \
        const double* xt, int k0, const uint8_t* codes, int kc, float* C, const float* s, const float* zs,  \
        const float* xs, int xs_ld) {                                                                      \
        tile_panel(R, V, R <= MR ? MR : MRD, B, xt, k0, codes, kc, C, 2 * NB, s, zs, xs, xs_ld);           \
    }
DIRECT_TILES(PANEL_FN, 8)
DIRECT_TILES(PANEL_FN, 4)
#define DQ_FN(R)                                                                                             \
    static __attribute__((noinline)) void dq_##R(const double* xt, int kp0, int n, const float* buf, float* C) { \
        tile_dq(R, xt, kp0, n, buf, C, 32);                                                                    \
    }
DQ_TILES(DQ_FN)

int woq_gemm_bf16(const uint16_t* x, int M, int K, const void* codes, int bits, const float* scales,
                  const uint8_t* zeros, int group, int kc, uint16_t* y, int N, int Np, int nthreads) {
    const int G = K / group, panels = Np / NB;
    const float off = bits == 8 ? -128.0f : 0.0f; /* code value = q + off */
    const size_t panel_bytes = (size_t)K * NB * bits / 8;
    const int direct = M <= DIRECT_MAX;
    /* a unit: a whole panel (direct: see tile_panel), or 16 channels (dequantized: 4 __m256) */
    const int unit_ch = direct ? NB : 16, per_panel = NB / unit_ch;
    const int units = panels * per_panel;
    const int mrp = M <= MR ? MR : MRD; /* the rows of a tile, as x is packed */
    const int tiles = (M + mrp - 1) / mrp, base = M / tiles, extra = M % tiles;
#define TILE_START2(t) ((t) * base + ((t) < extra ? (t) : extra))
    float* xs = direct ? (float*)malloc(sizeof(float) * (size_t)M * G) : NULL;
    /* x widened and packed pair by pair per row tile: xp[tile][kp][mrp] pairs of float32 */
    double* xp = (double*)aligned_alloc(64, sizeof(double) * ((size_t)tiles * mrp * (K / 2) + 8));
    int failed = (direct && !xs) || !xp;
    if (failed) {
        free(xs);
        free(xp);
        return -1;
    }
#pragma omp parallel num_threads(nthreads)
    {
        if (direct) { /* per-row sums of x over each group (the zero-point term) */
#pragma omp for schedule(static)
            for (int r = 0; r < M; r++)
                for (int g = 0; g < G; g++) {
                    float t = 0.f;
                    for (int k = 0; k < group; k++) t += bf16_to_f32(x[(size_t)r * K + (size_t)g * group + k]);
                    xs[(size_t)r * G + g] = t;
                }
        }
#pragma omp for schedule(static)
        for (int tl = 0; tl < tiles; tl++) {
            float* d = (float*)(xp + (size_t)tl * mrp * (K / 2));
            const int start = TILE_START2(tl), rows = base + (tl < extra);
            for (int kp = 0; kp < K / 2; kp++)
                for (int r = 0; r < mrp; r++) {
                    float* o = d + ((size_t)kp * mrp + r) * 2;
                    if (r < rows) {
                        o[0] = bf16_to_f32(x[(size_t)(start + r) * K + 2 * kp]);
                        o[1] = bf16_to_f32(x[(size_t)(start + r) * K + 2 * kp + 1]);
                    } else {
                        o[0] = o[1] = 0.f;
                    }
                }
        } /* implicit barrier: xs and xp are complete */
        const int ldc = unit_ch * 2;
        float* C = (float*)aligned_alloc(64, sizeof(float) * ((size_t)M * ldc + 16));
        float* buf = direct ? NULL : (float*)aligned_alloc(64, sizeof(float) * (CHUNK * 32 + 16));
        float* su = direct ? NULL : (float*)malloc(sizeof(float) * (size_t)G * 32 * 2);
        float* zu = su ? su + (size_t)G * 32 : NULL;
        float sdup[128], zsdup[128]; /* direct: the unit's scales and zero terms, lane-expanded */
        const int ok = C && (direct || (buf && su));
#pragma omp for schedule(static)
        for (int u = 0; u < units; u++) {
            if (!ok) {
                failed = 1; /* every thread still runs the loop (a worksharing construct) */
                continue;
            }
            const int pn = u / per_panel, c0 = (u % per_panel) * unit_ch;
            const uint8_t* pc = (const uint8_t*)codes + (size_t)pn * panel_bytes;
            memset(C, 0, sizeof(float) * (size_t)M * ldc);
            if (direct) {
                for (int k0 = 0; k0 < K; k0 += kc) {
                    const int g = k0 / group, first = k0 % group == 0;
                    const float* s = scales + (size_t)g * Np + (size_t)pn * NB + c0;
                    const uint8_t* z = zeros + (size_t)g * Np + (size_t)pn * NB + c0;
                    for (int c = 0; c < unit_ch; c++) {
                        sdup[2 * c] = sdup[2 * c + 1] = s[c];
                        zsdup[2 * c] = first ? ((float)z[c] + off) * s[c] : 0.f;
                        zsdup[2 * c + 1] = 0.f; /* the even lane carries the channel's zero term */
                    }
                    const uint8_t* blk = pc + (size_t)k0 * NB * bits / 8;
#define DIRECT(R, V, B) \
    case R: PANEL_NAME(R, V, B)(xp, k0, blk, kc, C, sdup, zsdup, xs + g, G); break;
                    if (bits == 8) {
                        switch (M) { DIRECT_TILES(DIRECT, 8) }
                    } else {
                        switch (M) { DIRECT_TILES(DIRECT, 4) }
                    }
#undef DIRECT
                }
            } else {
                for (int g = 0; g < G; g++)
                    for (int c = 0; c < 16; c++) {
                        const size_t i = (size_t)g * Np + (size_t)pn * NB + c0 + c;
                        su[g * 32 + 2 * c] = su[g * 32 + 2 * c + 1] = scales[i];
                        zu[g * 32 + 2 * c] = zu[g * 32 + 2 * c + 1] = (float)zeros[i] + off;
                    }
                /* row tiles in blocks whose packed x stays in L2 while the unit's chunks pass
                 * over it (each chunk is dequantized once per block) */
                for (int tb = 0; tb < tiles; tb += TILE_BLOCK)
                for (int kp0 = 0; kp0 < K / 2; kp0 += CHUNK) {
                    const int n = K / 2 - kp0 < CHUNK ? K / 2 - kp0 : CHUNK;
                    if (bits == 8)
                        dequant_chunk(8, pc, c0, kp0, n, group, su, zu, buf);
                    else
                        dequant_chunk(4, pc, c0, kp0, n, group, su, zu, buf);
                    for (int tl = tb; tl < tiles && tl < tb + TILE_BLOCK; tl++) {
                        const int m0 = TILE_START2(tl), mr = base + (tl < extra);
                        const double* xt = xp + (size_t)tl * MRD * (K / 2);
                        float* Ct = C + (size_t)m0 * ldc;
#define DQ(R) \
    case R: dq_##R(xt, kp0, n, buf, Ct); break;
                        switch (mr) { DQ_TILES(DQ) }
#undef DQ
                    }
                }
            }
            /* the even- and odd-k sums of each channel added, rounded to bf16; real channels only */
            const int n0 = pn * NB + c0;
            const int nc = N - n0 < unit_ch ? (N - n0 > 0 ? N - n0 : 0) : unit_ch;
            for (int r = 0; r < M; r++) {
                const float* cr = C + (size_t)r * ldc;
                for (int c = 0; c < nc; c++) y[(size_t)r * N + n0 + c] = f32_to_bf16(cr[2 * c] + cr[2 * c + 1]);
            }
        }
        free(C);
        free(buf);
        free(su);
    }
    free(xs);
    free(xp);
    return failed ? -1 : 0;
#undef TILE_START2
}

#else
int woq_available(void) { return 0; }
const char* woq_isa(void) { return ""; }
int woq_gemm_bf16(const uint16_t* x, int M, int K, const void* codes, int bits, const float* scales,
                  const uint8_t* zeros, int group, int kc, uint16_t* y, int N, int Np, int nthreads) {
    (void)x; (void)M; (void)K; (void)codes; (void)bits; (void)scales; (void)zeros; (void)group;
    (void)kc; (void)y; (void)N; (void)Np; (void)nthreads;
    abort(); /* never called: woq_available() is checked first */
    return -1;
}
#endif

/* The weight of woq_gemm_bf16's layout as a dense bf16 matrix, transposed: wt [K][N] =
 * (code - zero) * scale, the scale first rounded to bf16 and the product rounded once (nearest
 * even) -- NativeQuantLinear's torch dequantization, bit for bit. For many rows on a CPU whose
 * bf16 GEMM runs on AMX tiles, dequantizing once per call and multiplying densely (x @ wt) beats
 * the weight-only kernel, whose vdpbf16ps rows run out of multiply throughput from a few dozen
 * rows; so does a float32 product on a CPU without bf16 dot products (AVX-512 without BF16:
 * the same vector code, rounding to bf16 by integer arithmetic; `bench`'s four decoder
 * weights 2.4 ms in scalar code, 0.4 ms so). Transposed because the codes hold 64 channels side by side for each k: every output
 * row piece is a contiguous, vectorized write (the [N][K] order took 2.6 ms for `bench`'s
 * gate_up, as long as torch's unpack / subtract / multiply). */
void woq_dequant_bf16(const void* codes, int bits, const float* scales, const uint8_t* zeros, int group, int K,
                      int N, int Np, uint16_t* wt, int nthreads) {
    const int panels = (N + 63) / 64, groups = K / group;
#pragma omp parallel for schedule(static) num_threads(nthreads) collapse(2)
    for (int panel = 0; panel < panels; panel++)
        for (int g = 0; g < groups; g++) {
            const int n0 = panel * 64, nc = N - n0 < 64 ? N - n0 : 64;
            const float* sc = scales + (size_t)g * Np + n0;
            const uint8_t* zr = zeros + (size_t)g * Np + n0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            /* the group's scales (rounded to bf16) and zeros of the panel's 64 channels, once */
            __m512 s4[4], z4[4];
            for (int q = 0; q < 4; q++) {
                s4[q] = round_bf16x16(_mm512_loadu_ps(sc + q * 16));
                z4[q] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zr + q * 16))));
            }
            const int whole = nc == 64; /* a last panel of fewer channels goes through `piece` */
#endif
            for (int k = g * group; k < (g + 1) * group; k++) {
                uint16_t* row = wt + (size_t)k * N + n0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
                /* the panel's 64 channels x (k, k + 1) as 64 int16 lanes in two vectors; this
                 * k's byte of each, sign- (int8) or nibble-extended, in 16-lane quarters */
                const size_t pair = bits == 8 ? (size_t)panel * (K / 2) + k / 2 : (size_t)panel * (K / 4) + k / 4;
                const uint8_t* pb = (const uint8_t*)codes + pair * 128;
                uint16_t piece[64];
                uint16_t* dst = whole ? row : piece;
                for (int h = 0; h < 2; h++) {
                    __m512i v = _mm512_loadu_si512((const void*)(pb + h * 64));
                    if (bits == 8) {
                        v = (k & 1) ? _mm512_srai_epi16(v, 8) : _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8);
                        v = _mm512_add_epi16(v, _mm512_set1_epi16(128));
                    } else {
                        v = _mm512_srli_epi16(v, (k & 1) ? 8 : 0);
                        v = _mm512_and_si512(_mm512_srli_epi16(v, (k & 2) ? 4 : 0), _mm512_set1_epi16(15));
                    }
                    for (int q = 0; q < 2; q++) {
                        const __m512 code = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, q)));
                        const __m512 val = _mm512_mul_ps(s4[2 * h + q], _mm512_sub_ps(code, z4[2 * h + q]));
                        _mm256_storeu_si256((__m256i*)(dst + h * 32 + q * 16), cvt_bf16x16(val));
                    }
                }
                if (!whole) memcpy(row, piece, sizeof(uint16_t) * nc);
#else
                if (bits == 8) {
                    const int8_t* p = (const int8_t*)codes + ((size_t)panel * (K / 2) + k / 2) * 128 + (k & 1);
                    for (int c = 0; c < nc; c++)
                        row[c] = f32_to_bf16(bf16_to_f32(f32_to_bf16(sc[c])) * ((float)(p[2 * c] + 128) - (float)zr[c]));
                } else {
                    const uint8_t* p = (const uint8_t*)codes + ((size_t)panel * (K / 4) + k / 4) * 128 + (k & 1);
                    const int shift = (k & 2) ? 4 : 0;
                    for (int c = 0; c < nc; c++)
                        row[c] = f32_to_bf16(bf16_to_f32(f32_to_bf16(sc[c])) *
                                             ((float)((p[2 * c] >> shift) & 15) - (float)zr[c]));
                }
#endif
            }
        }
}
