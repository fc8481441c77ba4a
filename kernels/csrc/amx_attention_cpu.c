/* Causal attention of fresh prompts over their own K/V (bf16) through AMX tiles:
 *   out[t][h] = softmax(scale * q[t][h] . k[s][h / G] over keys s <= t) @ v[s][h / G]
 * (G = H / KVH query heads per KV head; with a sliding window only keys s > t - window).
 *
 * Why: a step's fresh prompts went to torch's flash SDPA, which ran them at ~150 GFLOP/s here
 * (2-vCPU Xeon with AMX; one 512-token prompt of 9 query / 3 KV heads of 64: 1.2-2.0 ms a
 * layer), a fifth of a 2048-token prefill step. The products of attention are small GEMMs that
 * AMX runs fast; what is left is the softmax's exponentials, vectorized here with AVX-512.
 * Four 512-token prompts: 3.1-3.5 ms against SDPA's 4.7-7.1 (interleaved, same minute); the
 * `bench` model's 2048-token prefill step 461-538 ms against 554-622.
 *
 * Per (prompt, KV head), once: K as B tiles of K^T ([Lp/16][D/32][16 d pairs][16 keys][2], the
 * VNNI order tdpbf16ps reads) and V as B tiles ([Lp/32][D/16][16 key pairs][16 d][2]), both
 * zero-padded to Lp = the prompt's length rounded up to 64 keys. Then per (prompt, query head,
 * block of 16 queries), with online softmax over chunks of 64 keys (flash attention):
 *   S [16 x 64] = Q K^T in four float32 C tiles (A: the 16 query rows, loaded from their
 *   strided rows; a last block of fewer rows from a zero-padded copy);
 *   row maxima, p = exp(scale * S - m) in float32 (masked keys exactly 0), row sums; P to bf16;
 *   PV [16 x D] in C tiles, then O [16 x D] (float32, in L1) = O * exp(m_old - m) + PV.
 * Every row has a valid key (its own position), so no row's softmax ends empty. The units go to
 * the threads longest first (dynamic), so causal prompts' uneven rows balance on the cores.
 *
 * Each query row's result depends on its own prompt alone: a prompt attends the same whatever
 * else the step holds. Precision: S and O in float32, P rounded to bf16 for the PV product
 * (as torch's flash attention does for bf16), the output rounded to bf16 (nearest even).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__AVX512BF16__) && \
    defined(__linux__)
#include <immintrin.h>

#define KC 64     /* keys per chunk: four 16-key C tiles of S */
#define MAX_D 256 /* head dims up to this (multiples of 32) */

/* A prompt of L tokens: its keys padded to whole chunks, and its blocks of 16 queries. */
static inline int padded_keys(int64_t L) { return (int)((L + KC - 1) / KC * KC); }
static inline int query_blocks(int64_t L) { return (int)((L + 15) / 16); }

/* Which of the 16 keys from key0 a query at pos sees: key <= pos, and key > pos - window. */
static inline __mmask16 key_mask(int key0, int pos, int window) {
    const __m512i key = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(key0));
    __mmask16 v = _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(pos));
    if (window > 0) v &= _mm512_cmpgt_epi32_mask(key, _mm512_set1_epi32(pos - window));
    return v;
}

/* K of one (prompt, KV head), rows k[s * ks .. + D], as B tiles of K^T: tile row r holds the
 * d pair r of 16 keys, a gather of one dword from each key's row. */
static void pack_k(const uint16_t* k, int64_t ks, int L, int Lp, int D, uint16_t* kt) {
    const int db_n = D / 32;
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)ks));
    for (int kb = 0; kb < Lp / 16; kb++) {
        const int left = L - kb * 16;
        const __mmask16 live = left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        for (int db = 0; db < db_n; db++) {
            const uint16_t* base = k + (int64_t)kb * 16 * ks + db * 32;
            uint16_t* t = kt + ((size_t)kb * db_n + db) * 512;
            for (int r = 0; r < 16; r++)
                _mm512_store_si512((__m512i*)(t + r * 32),
                                   _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows, base + 2 * r, 2));
        }
    }
}

/* V of one (prompt, KV head) as B tiles: tile row r of d block 16 interleaves keys 2r and 2r+1. */
static void pack_v(const uint16_t* v, int64_t vs, int L, int Lp, int D, uint16_t* vp) {
    const int dn = D / 16;
    for (int kp = 0; kp < Lp / 32; kp++)
        for (int r = 0; r < 16; r++) {
            const int k0 = kp * 32 + 2 * r;
            for (int db = 0; db < dn; db++) {
                const __m512i a = k0 < L ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v + k0 * vs + db * 16)))
                                         : _mm512_setzero_si512();
                const __m512i b = k0 + 1 < L
                                      ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v + (k0 + 1) * vs + db * 16)))
                                      : _mm512_setzero_si512();
                _mm512_store_si512((__m512i*)(vp + (((size_t)kp * dn + db) * 16 + r) * 32),
                                   _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
            }
        }
}

/* A thread's working set (L1-sized for D = 64). Scores, probabilities, PV products and the
 * rescale factors are double-buffered by chunk parity: the tile unit works on one chunk while
 * the vector unit works on the other (see attend_block). */
typedef struct {
    uint16_t q[16 * MAX_D] __attribute__((aligned(64)));
    float o[16 * MAX_D] __attribute__((aligned(64)));
    float s[2][16 * KC] __attribute__((aligned(64)));
    uint16_t p[2][16 * KC] __attribute__((aligned(64)));
    float pv[2][16 * MAX_D] __attribute__((aligned(64)));
    float alpha[2][16] __attribute__((aligned(64)));
    float m[16] __attribute__((aligned(64))), l[16] __attribute__((aligned(64)));
} Scratch;

/* S tile t (4..7) of key block j (0..3) of chunk c: sum over the D/32 d blocks, into s. */
#define S_TILE(t, j)                                                                  \
    if (nb > j) {                                                                     \
        _tile_zero(t);                                                                \
        for (int db = 0; db < db_n; db++) {                                           \
            _tile_loadd(0, q + db * 32, qstride);                                     \
            _tile_loadd(1, kt + ((size_t)(c * KC / 16 + j) * db_n + db) * 512, 64);   \
            _tile_dpbf16ps(t, 0, 1);                                                  \
        }                                                                             \
        _tile_stored(t, s + j * 16, KC * 4);                                          \
    }

/* Key blocks of 16 that chunk c holds below hi (the block's end). */
static inline int chunk_blocks(int c, int hi) { return (hi - c * KC + 15) / 16 < 4 ? (hi - c * KC + 15) / 16 : 4; }

/* S [16][KC] of chunk c: the block's queries q [16][D] times the chunk's keys (tiles). */
static inline void s_chunk(const uint16_t* q, int64_t qstride, const uint16_t* kt, int c, int nb, int D, float* s) {
    const int db_n = D / 32;
    S_TILE(4, 0)
    S_TILE(5, 1)
    S_TILE(6, 2)
    S_TILE(7, 3)
}

/* PV tile t (4..7) of d block dg * 4 + j over the chunk's key halves in use. */
#define PV_TILE_ZERO(t, j) \
    if (nd > j) _tile_zero(t);
#define PV_TILE_DP(t, j)                                                                   \
    if (nd > j) {                                                                          \
        _tile_loadd(1, vp + (((size_t)(2 * c + half) * dn + dg * 4 + j) * 512), 64);       \
        _tile_dpbf16ps(t, 0, 1);                                                           \
    }
#define PV_TILE_STORE(t, j) \
    if (nd > j) _tile_stored(t, pv + dg * 64 + j * 16, D * 4);

/* PV [16][D] of chunk c: P [16][KC] bf16 times the chunk's values (tiles). */
static inline void pv_chunk(const uint16_t* p, const uint16_t* vp, int c, int nb, int D, float* pv) {
    const int dn = D / 16, halves = nb > 2 ? 2 : 1;
    for (int dg = 0; dg * 4 < dn; dg++) {
        const int nd = dn - dg * 4 < 4 ? dn - dg * 4 : 4;
        PV_TILE_ZERO(4, 0)
        PV_TILE_ZERO(5, 1)
        PV_TILE_ZERO(6, 2)
        PV_TILE_ZERO(7, 3)
        for (int half = 0; half < halves; half++) {
            _tile_loadd(0, p + half * 32, KC * 2);
            PV_TILE_DP(4, 0)
            PV_TILE_DP(5, 1)
            PV_TILE_DP(6, 2)
            PV_TILE_DP(7, 3)
        }
        PV_TILE_STORE(4, 0)
        PV_TILE_STORE(5, 1)
        PV_TILE_STORE(6, 2)
        PV_TILE_STORE(7, 3)
    }
}

/* The online softmax of chunk c (scores s, block from q0): P in bf16 (masked keys exactly 0),
 * the rows' rescale factors alpha for O, and the running maxima m and sums l updated. */
static inline void softmax_chunk(const float* s, int c, int nb, int q0, int window, float scale, uint16_t* p,
                                 float* alpha_out, float* m, float* l) {
    /* a chunk wholly before the block's first query (and inside every row's window) needs no mask */
    const int full = c * KC + nb * 16 - 1 <= q0 && (window <= 0 || c * KC > q0 + 15 - window);
    const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    float cmax[16] __attribute__((aligned(64))), rsum[16] __attribute__((aligned(64)));
    float mu[16] __attribute__((aligned(64)));
    for (int r = 0; r < 16; r++) { /* pass 1: each row's maximum over its valid keys */
        const float* sr = s + r * KC;
        __m512 mx = ninf;
        for (int j = 0; j < nb; j++)
            mx = full ? _mm512_max_ps(mx, _mm512_load_ps(sr + j * 16))
                      : _mm512_mask_max_ps(mx, key_mask(c * KC + j * 16, q0 + r, window), mx,
                                           _mm512_load_ps(sr + j * 16));
        cmax[r] = _mm512_reduce_max_ps(mx);
    }
    const __m512 m_old = _mm512_load_ps(m);
    const __m512 m_new = _mm512_max_ps(m_old, _mm512_mul_ps(_mm512_load_ps(cmax), vscale));
    /* rows seeing their first keys start from O = 0, l = 0; a row with none yet (a window's
     * first chunks) subtracts 0 from its all-masked scores */
    const __m512 alpha =
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_old, ninf, _CMP_NEQ_OQ), exp512(_mm512_sub_ps(m_old, m_new)));
    _mm512_store_ps(mu, _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, ninf, _CMP_EQ_OQ), _mm512_setzero_ps()));
    _mm512_store_ps(m, m_new);
    _mm512_store_ps(alpha_out, alpha);
    for (int r = 0; r < 16; r++) { /* pass 2: p = exp(scale * s - m) */
        const float* sr = s + r * KC;
        const __m512 vm = _mm512_set1_ps(mu[r]);
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < 4; j++) {
            __m512 e = _mm512_setzero_ps();
            if (j < nb) {
                e = exp512(_mm512_fmsub_ps(_mm512_load_ps(sr + j * 16), vscale, vm));
                if (!full) e = _mm512_maskz_mov_ps(key_mask(c * KC + j * 16, q0 + r, window), e);
                sum = _mm512_add_ps(sum, e);
            }
            _mm256_store_si256((__m256i*)(p + r * KC + j * 16), (__m256i)_mm512_cvtneps_pbh(e));
        }
        rsum[r] = _mm512_reduce_add_ps(sum);
    }
    _mm512_store_ps(l, _mm512_fmadd_ps(_mm512_load_ps(l), alpha, _mm512_load_ps(rsum)));
}

/* O = O * alpha + PV, row by row. */
static inline void o_update(float* o, const float* alpha, const float* pv, int D) {
    for (int r = 0; r < 16; r++) {
        const __m512 va = _mm512_set1_ps(alpha[r]);
        for (int d = 0; d < D; d += 16)
            _mm512_store_ps(o + r * D + d,
                            _mm512_fmadd_ps(_mm512_load_ps(o + r * D + d), va, _mm512_load_ps(pv + r * D + d)));
    }
}

/* One block of 16 queries (from q0) of one head: q/out point at the prompt's head h.
 *
 * The tile unit runs its instructions in order, behind the core: a vector load of what a tile
 * store wrote, or a vector store to what a tile load still has to read, waits until the tile
 * unit has caught up. Done in the plain order (S, softmax, PV, O update), each chunk waited on
 * the tile unit twice (a third of the kernel's time). So the chunks are skewed: while the core
 * computes the softmax of chunk c and then updates O with chunk c-1's product, the tile unit
 * still works on what it was given before -- and the buffers either side touches alternate
 * with the chunk's parity. */
static void attend_block(const uint16_t* q, int64_t qs, uint16_t* out, int64_t os, const uint16_t* kt,
                         const uint16_t* vp, int L, int q0, int D, float scale, int window, Scratch* sc) {
    const int rows = L - q0 < 16 ? L - q0 : 16;
    /* the queries load as a tile straight from their rows; a last block of under 16 rows goes
     * through a zero-padded copy (no reads past the prompt) */
    const uint16_t* qt = q + (int64_t)q0 * qs;
    int64_t qstride = qs * 2;
    if (rows < 16) {
        for (int r = 0; r < 16; r++) {
            if (r < rows)
                memcpy(sc->q + r * D, q + (int64_t)(q0 + r) * qs, sizeof(uint16_t) * D);
            else
                memset(sc->q + r * D, 0, sizeof(uint16_t) * D);
        }
        qt = sc->q, qstride = D * 2;
    }
    for (int r = 0; r < 16; r++) {
        sc->m[r] = -INFINITY;
        sc->l[r] = 0.f;
    }
    memset(sc->o, 0, sizeof(float) * 16 * D);
    const int hi = q0 + 16; /* keys below this (row r sees keys <= q0 + r) */
    const int lo = window > 0 && q0 - window + 1 > 0 ? q0 - window + 1 : 0;
    const int c0 = lo / KC, c1 = (hi + KC - 1) / KC;
    s_chunk(qt, qstride, kt, c0, chunk_blocks(c0, hi), D, sc->s[c0 & 1]);
    for (int c = c0; c < c1; c++) {
        const int nb = chunk_blocks(c, hi), b = c & 1;
        softmax_chunk(sc->s[b], c, nb, q0, window, scale, sc->p[b], sc->alpha[b], sc->m, sc->l);
        if (c > c0) o_update(sc->o, sc->alpha[b ^ 1], sc->pv[b ^ 1], D);
        if (c + 1 < c1) s_chunk(qt, qstride, kt, c + 1, chunk_blocks(c + 1, hi), D, sc->s[b ^ 1]);
        pv_chunk(sc->p[b], vp, c, nb, D, sc->pv[b]);
    }
    o_update(sc->o, sc->alpha[(c1 - 1) & 1], sc->pv[(c1 - 1) & 1], D);
    for (int r = 0; r < rows; r++) {
        const __m512 inv = _mm512_set1_ps(1.f / sc->l[r]);
        uint16_t* o = out + (int64_t)(q0 + r) * os;
        for (int d = 0; d < D; d += 16)
            _mm256_storeu_si256((__m256i*)(o + d),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(sc->o + r * D + d), inv)));
    }
}

/* q/k/v: a step's rows (row strides qs/ks/vs elements; heads contiguous, D apart); out: rows of
 * stride os; T rows in all. Prompt i is rows starts[i] .. + lens[i], attending to itself alone.
 * D: a multiple of 32 up to 256; H a multiple of KVH. Returns 0, -1 when scratch cannot be
 * allocated, -2 when AMX is unavailable, -3 for a shape the kernel does not take, -4 for a
 * prompt that is empty or not within the T rows (nothing written then). */
int amx_prompt_attention_bf16(const uint16_t* q, int64_t qs, const uint16_t* k, int64_t ks, const uint16_t* v,
                              int64_t vs, uint16_t* out, int64_t os, const int64_t* starts, const int64_t* lens,
                              int n, int T, int H, int KVH, int D, float scale, int window, int nthreads) {
    if (!amx_available()) return -2;
    if (D % 32 || D <= 0 || D > MAX_D || KVH <= 0 || H % KVH) return -3;
    for (int i = 0; i < n; i++)
        if (lens[i] <= 0 || starts[i] < 0 || starts[i] + lens[i] > T) return -4;
    const int G = H / KVH;
    size_t* koff = (size_t*)malloc(sizeof(size_t) * (size_t)(n + 1));
    if (!koff) return -1;
    size_t units = 0;
    koff[0] = 0;
    for (int i = 0; i < n; i++) {
        koff[i + 1] = koff[i] + (size_t)padded_keys(lens[i]) * D * KVH;
        units += (size_t)H * query_blocks(lens[i]);
    }
    uint16_t* kt = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (koff[n] ? koff[n] : 1));
    uint16_t* vp = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (koff[n] ? koff[n] : 1));
    int32_t* unit = (int32_t*)malloc(sizeof(int32_t) * 3 * (units ? units : 1));
    if (!kt || !vp || !unit) {
        free(koff), free(kt), free(vp), free(unit);
        return -1;
    }
    /* units longest first: query blocks from the last, over prompts and heads */
    size_t u = 0;
    int maxb = 0;
    for (int i = 0; i < n; i++) maxb = query_blocks(lens[i]) > maxb ? query_blocks(lens[i]) : maxb;
    for (int b = maxb - 1; b >= 0; b--)
        for (int i = 0; i < n; i++)
            if (b < query_blocks(lens[i]))
                for (int h = 0; h < H; h++) {
                    unit[3 * u] = i, unit[3 * u + 1] = h, unit[3 * u + 2] = b;
                    u++;
                }
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int pk = 0; pk < n * KVH; pk++) {
            const int i = pk / KVH, g = pk % KVH;
            const int L = (int)lens[i], Lp = padded_keys(L);
            const size_t off = koff[i] + (size_t)g * Lp * D;
            pack_k(k + starts[i] * ks + (int64_t)g * D, ks, L, Lp, D, kt + off);
            pack_v(v + starts[i] * vs + (int64_t)g * D, vs, L, Lp, D, vp + off);
        }
        Scratch* sc = (Scratch*)aligned_alloc(64, sizeof(Scratch));
        if (sc) amx_configure_16x64();
#pragma omp for schedule(dynamic, 1)
        for (size_t w = 0; w < units; w++) {
            if (!sc) { /* every thread takes part in the loop; this one cannot compute */
                __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
                continue;
            }
            const int i = unit[3 * w], h = unit[3 * w + 1], b = unit[3 * w + 2];
            const int L = (int)lens[i], Lp = padded_keys(L), g = h / G;
            const size_t off = koff[i] + (size_t)g * Lp * D;
            attend_block(q + starts[i] * qs + (int64_t)h * D, qs, out + starts[i] * os + (int64_t)h * D, os,
                         kt + off, vp + off, L, b * 16, D, scale, window, sc);
        }
        if (sc) {
            _tile_release();
            free(sc);
        }
    }
    free(koff), free(kt), free(vp), free(unit);
    return failed ? -1 : 0;
}
#else
int amx_prompt_attention_bf16(const uint16_t* q, int64_t qs, const uint16_t* k, int64_t ks, const uint16_t* v,
                              int64_t vs, uint16_t* out, int64_t os, const int64_t* starts, const int64_t* lens,
                              int n, int T, int H, int KVH, int D, float scale, int window, int nthreads) {
    (void)T, (void)q, (void)qs, (void)k, (void)ks, (void)v, (void)vs, (void)out, (void)os, (void)starts, (void)lens;
    (void)n, (void)H, (void)KVH, (void)D, (void)scale, (void)window, (void)nthreads;
    return -2;
}
#endif
