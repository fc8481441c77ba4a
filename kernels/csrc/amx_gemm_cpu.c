/* Dense bf16 products of a few rows (decode steps) through AMX tiles:
 *   y[m][n] = sum_k x[m][k] * w[n][k] + bias[n]      (bf16 in, float32 sums, bf16 out)
 *
 * Why not oneDNN: at decode sizes (1-64 rows) a product only has to stream its weight once at
 * the memory's speed. oneDNN's AMX GEMM (torch.ops.mkldnn._linear_pointwise on a packed weight)
 * reached 12-16 GB/s over the 120 decoder GEMMs of a `bench` step on a 2-vCPU Xeon (13-18 ms,
 * plus ~25 us of dispatch per call), and the vdpbf16ps panels of gemv_cpu.c run out of
 * multiply throughput above ~8 rows (25 ms at 16 rows, 95 at 64). AMX tiles have throughput to
 * spare: the kernel is a weight stream.
 *
 * Layout (kernels/native.py `amx_tiles`, once at load): the weight, zero-padded to N32 = n
 * rounded up to 32 outputs and Kp = k rounded up to 32, as [N32/32][Kp/32][2][16][16][2]: for
 * each pair of 16-output blocks and each 32-wide k block, two 1 KB B tiles (16 k pairs x 16
 * outputs x 2 bf16, the VNNI order tdpbf16ps reads). A thread's pairs are one sequential read.
 *
 * The input is copied once per call into a zero-padded [Mp][Kp] bf16 buffer (Mp = m rounded up
 * to 16: tiles always have 16 rows, so one tile configuration serves every call; the extra rows
 * cost multiplies AMX has to spare and are never written out). Per pair of output blocks,
 * rows go in chunks of 32 (two A tiles, four float32 C tiles); the pair's weight (Kp x 64 bytes)
 * stays in L2 for the chunks after the first. Outputs get the bias in float32 and are rounded
 * to bf16 (nearest even), as torch rounds a bf16 GEMM's result.
 *
 * Each output row is computed from its own input row alone, in the same order whatever the
 * other rows: a row's result does not depend on its batch. tdpbf16ps adds pairs of products
 * per step (so the float32 sums differ from gemv_cpu.c's k-ascending order in the last bits)
 * and treats bf16 subnormal inputs as zero.
 *
 * Linux hands out AMX state only on request (arch_prctl ARCH_REQ_XCOMP_PERM): amx_available()
 * asks once and says whether the kernel may run; a build without AMX (another CPU,
 * PAGEDQ_CPU_ISA=avx2) compiles the stub that says no. */
#define _GNU_SOURCE /* syscall() */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_state = -1; /* -1 not asked yet, 0 refused, 1 granted */

int amx_available(void) {
    if (amx_state < 0) {
        int ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
        __atomic_store_n(&amx_state, ok, __ATOMIC_RELEASE);
    }
    return __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Every tile 16 rows of 64 bytes (amx_attention_cpu.c configures the same). Here: tiles 0-1 A
 * (input rows 0-15 / 16-31 of a chunk), 2-3 B (the pair's two output blocks), 4-7 C (A0B0,
 * A0B1, A1B0, A1B1). */
void amx_configure_16x64(void) {
    /* static and initialized: GCC 12 treats _tile_loadconfig as not reading its operand and
     * dropped the stores of a config built on the stack (ldtilecfg then got zero rows) */
    static const TileConfig cfg = {
        .palette = 1,
        .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
        .rows = {16, 16, 16, 16, 16, 16, 16, 16},
    };
    _tile_loadconfig(&cfg);
}

/* The two B tiles of the k block 4 KB ahead, into L1: tileloadd stalls the tile unit on a
 * miss, and the hardware prefetchers alone left the stream at ~14 GB/s of ~22 (2 cores, the
 * 120 GEMMs of a `bench` step: 14.5 ms without, 11.9 with; 8 and 12 KB ahead, or into L2
 * only, measured the same). */
#define PREFETCH(w)                                                               \
    do {                                                                          \
        const char* pf = (const char*)(w) + 4096;                                 \
        for (int l = 0; l < 2048; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);     \
    } while (0)

/* Where a call has more than one chunk of rows, the pair's later chunks read its weight from L2
 * while nothing streams from memory: 64 rows (two chunks) read a `bench` step's weights at
 * ~10-16 GB/s where 16 rows read them at ~20-27. So every k block of every chunk also asks for
 * `lines` lines of the next pair into L2 (from `next` up to `next_end`), spread so that the
 * next pair has been asked for once when it starts; a pair's first chunk asks for its own tiles
 * 4 KB ahead into L1 as before (the later chunks find them in L2). A/B in one process, the 120
 * decoder GEMMs of a `bench` step with cold weights, 2-vCPU Xeon (ms, medians of 6): 40 rows
 * 12.6 -> 11.1, 48 11.8 -> 10.8, 64 13.2-17.2 -> 12.6-13.7, 128 21.5-23.9 -> 20.1-21.7, 8-32
 * rows level. What is left at 64 rows (~13 ms against ~8 for 32) is the second chunk's tile
 * loads from L2 (perf: the stalls sit on the A tiles' loads); x laid out tile by tile (1 KB
 * contiguous A tiles) measured slower, 14.6 -> 16.1 ms. */
typedef struct {
    const char *next, *next_end;
    int lines;
} NextPair;

static inline void prefetch_next(NextPair* np) {
    for (int l = 0; l < np->lines && np->next < np->next_end; l++, np->next += 64) _mm_prefetch(np->next, _MM_HINT_T1);
}

/* One pair of output blocks (wp: its Kp/32 x 2 tiles) times one chunk of 16 (two == 0) or 32
 * input rows starting at xr (row stride Kp), into c [32][32] float32; `first`: the pair's first
 * chunk (its tiles come from memory). */
static inline void pair_chunk(const uint16_t* xr, int Kp, const uint16_t* wp, int two, float* c, int first,
                              NextPair* np) {
    const int kb_n = Kp / 32;
    const long xs = (long)Kp * 2;
    _tile_zero(4);
    _tile_zero(5);
    if (two) {
        _tile_zero(6);
        _tile_zero(7);
        for (int kb = 0; kb < kb_n; kb++) {
            const uint16_t* w = wp + (size_t)kb * 1024;
            if (first) PREFETCH(w);
            prefetch_next(np);
            _tile_loadd(0, xr + kb * 32, xs);
            _tile_loadd(1, xr + 16 * (size_t)Kp + kb * 32, xs);
            _tile_loadd(2, w, 64);
            _tile_loadd(3, w + 512, 64);
            _tile_dpbf16ps(4, 0, 2);
            _tile_dpbf16ps(5, 0, 3);
            _tile_dpbf16ps(6, 1, 2);
            _tile_dpbf16ps(7, 1, 3);
        }
        _tile_stored(6, c + 16 * 32, 128);
        _tile_stored(7, c + 16 * 32 + 16, 128);
    } else {
        for (int kb = 0; kb < kb_n; kb++) {
            const uint16_t* w = wp + (size_t)kb * 1024;
            if (first) PREFETCH(w);
            prefetch_next(np);
            _tile_loadd(0, xr + kb * 32, xs);
            _tile_loadd(2, w, 64);
            _tile_loadd(3, w + 512, 64);
            _tile_dpbf16ps(4, 0, 2);
            _tile_dpbf16ps(5, 0, 3);
        }
    }
    _tile_stored(4, c, 128);
    _tile_stored(5, c + 16, 128);
}

/* x: [m][k] bf16; w: amx_tiles layout for n outputs and k inputs; bias: [n] float32 or NULL;
 * y: [m][n] bf16. Returns 0, -1 when the padded input cannot be allocated, -2 when AMX is not
 * available (y unwritten). */
int amx_gemm_bf16(const uint16_t* x, int m, int k, const uint16_t* w, int n, const float* bias, uint16_t* y,
                  int nthreads) {
    if (!amx_available()) return -2;
    if (m <= 0) return 0;
    const int Kp = (k + 31) / 32 * 32, Mp = (m + 15) / 16 * 16, pairs = (n + 31) / 32;
    uint16_t* xb = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)Mp * Kp);
    if (!xb) return -1;
    for (int r = 0; r < Mp; r++) {
        uint16_t* dst = xb + (size_t)r * Kp;
        if (r < m) {
            memcpy(dst, x + (size_t)r * k, sizeof(uint16_t) * (size_t)k);
            memset(dst + k, 0, sizeof(uint16_t) * (size_t)(Kp - k));
        } else {
            memset(dst, 0, sizeof(uint16_t) * (size_t)Kp);
        }
    }
    const size_t pair_elems = (size_t)Kp * 32; /* Kp/32 k blocks x 2 tiles x 512 bf16 */
    const int chunks = (Mp + 31) / 32;
    /* a pair is 32 lines per k block: over `chunks` walks of it, the next pair's lines in step */
    const int next_lines = chunks > 1 ? (32 + chunks - 1) / chunks : 0;
    const char* w_end = (const char*)(w + (size_t)pairs * pair_elems);
#pragma omp parallel num_threads(nthreads) if (pairs > 1)
    {
        amx_configure_16x64();
        float c[32 * 32] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int p = 0; p < pairs; p++) {
            const uint16_t* wp = w + (size_t)p * pair_elems;
            const int n0 = p * 32, cols = n - n0 < 32 ? n - n0 : 32;
            NextPair np = {(const char*)(wp + pair_elems), (const char*)(wp + 2 * pair_elems), next_lines};
            if (np.next_end > w_end) np.next_end = w_end;
            for (int r0 = 0; r0 < Mp; r0 += 32) {
                const int two = Mp - r0 >= 32;
                pair_chunk(xb + (size_t)r0 * Kp, Kp, wp, two, c, r0 == 0, &np);
                const int rows = (m - r0 < 32 ? m - r0 : 32);
                for (int r = 0; r < rows; r++) {
                    uint16_t* out = y + (size_t)(r0 + r) * n + n0;
                    const float* cr = c + r * 32;
                    if (bias)
                        for (int j = 0; j < cols; j++) out[j] = f32_to_bf16(cr[j] + bias[n0 + j]);
                    else
                        for (int j = 0; j < cols; j++) out[j] = f32_to_bf16(cr[j]);
                }
            }
        }
        _tile_release();
    }
    free(xb);
    return 0;
}
#else
int amx_available(void) { return 0; }

int amx_gemm_bf16(const uint16_t* x, int m, int k, const uint16_t* w, int n, const float* bias, uint16_t* y,
                  int nthreads) {
    (void)x, (void)m, (void)k, (void)w, (void)n, (void)bias, (void)y, (void)nthreads;
    return -2;
}
#endif
