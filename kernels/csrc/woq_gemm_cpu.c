/* Weight-only-quantized GEMM for CPUs with AVX-512 BF16: y[M, N] = x[M, K] (bf16) @ W^T, where
 * W is held as 8- or 4-bit codes with a scale (and zero) per output channel and group of K.
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

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#define NB 64
#define MR 6
#define PREFETCH 2048 /* bytes ahead in the codes stream: the best of 0, 512, 1024, 2048 at 7-32 rows */

int woq_available(void) { return 1; }

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

/* x [M, K] bf16; y [M, N] bf16 (N <= Np, the first N channels are written) */
void woq_gemm_bf16(const uint16_t* x, int M, int K, const void* codes, int bits, const float* scales,
                   const uint8_t* zeros, int group, int kc, uint16_t* y, int N, int Np, int nthreads) {
    const int G = K / group, panels = Np / NB;
    const float off = bits == 8 ? -128.0f : 128.0f;
    const size_t panel_bytes = (size_t)K * NB * bits / 8;
    /* per-row sums of x over each group (the zero-point term) */
    float* xs = (float*)malloc(sizeof(float) * (size_t)M * G);
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
    /* tiles of nearly equal rows (7 rows: 4 + 3, not 6 + 1: a tile of one or two rows has too few
     * accumulators to hide the vdpbf16ps latency), each packed pair by pair so its broadcasts
     * read consecutive bytes (rows K apart would all fall in one L1 set) */
    const int tiles = (M + MR - 1) / MR, base = M / tiles, extra = M % tiles;
#define TILE_START(t) ((t) * base + ((t) < extra ? (t) : extra))
    int32_t* xp = (int32_t*)aligned_alloc(64, sizeof(int32_t) * (size_t)tiles * MR * (K / 2));
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
#pragma omp for schedule(static)
        for (int pn = 0; pn < panels; pn++) {
            const uint8_t* pc = (const uint8_t*)codes + (size_t)pn * panel_bytes;
            memset(C, 0, sizeof(float) * (size_t)M * NB);
            for (int k0 = 0; k0 < K; k0 += kc) {
                const int g = k0 / group;
                const float* s = scales + (size_t)g * Np + (size_t)pn * NB;
                const uint8_t* z = zeros + (size_t)g * Np + (size_t)pn * NB;
                __m512 zs[4]; /* the zero-point term, once per group (kc may be less than group) */
                for (int j = 0; j < 4; j++) zs[j] = _mm512_setzero_ps();
                for (int j = 0; j < 4 && k0 % group == 0; j++) {
                    __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(z + j * 16))));
                    zs[j] = _mm512_mul_ps(_mm512_add_ps(zf, _mm512_set1_ps(off)), _mm512_loadu_ps(s + j * 16));
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
            /* fp32 -> bf16 (round to nearest even), only the real channels */
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
        free(C);
        free(buf);
    }
    free(xs);
    free(xp);
}

#else
int woq_available(void) { return 0; }
void woq_gemm_bf16(const uint16_t* x, int M, int K, const void* codes, int bits, const float* scales,
                   const uint8_t* zeros, int group, int kc, uint16_t* y, int N, int Np, int nthreads) {
    (void)x; (void)M; (void)K; (void)codes; (void)bits; (void)scales; (void)zeros; (void)group;
    (void)kc; (void)y; (void)N; (void)Np; (void)nthreads;
    abort(); /* never called: woq_available() is checked first */
}
#endif
