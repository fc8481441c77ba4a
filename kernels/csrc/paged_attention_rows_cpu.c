/* The grouped rows of the CPU paged attention (chunk_avx2, called by paged_attention_cpu.c's
 * attend for each chunk of a task's keys): the rows of a KV head three at a time, in 8-float
 * (AVX2) or 16-float (AVX-512) vectors. See paged_attention_cpu.c's head for the measurements. */
#include "paged_attention_cpu.h"

#ifdef ATT_AVX2

/* [sum(a), sum(b), sum(c), sum(d)] of four vectors of eight. */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* Eight elements of a key or value row from float32 or bf16 storage (BF: a constant after
 * inlining; bf16 is widened in registers, so a bf16 cache is read in place). */
static inline __attribute__((always_inline)) __m256 load8(const void* p, int64_t i, const int BF) {
    if (BF) {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
    return _mm256_loadu_ps((const float*)p + i);
}

static inline __m256 same8(__m256 v) { return v; }

/* The two loops of a row group, for one vector type V of W floats (the ops are its intrinsics;
 * TO8 folds a vector to eight floats for hsum4):
 *
 * qk_rows: the scores of NR query rows (q[x]: D floats each) against the keys [lo, hi) of a
 * chunk (row kp[j], element h on: the rows' KV head) into sr[x][lo..hi). Four keys at a time:
 * every loaded piece of a key serves the NR rows (the query heads that share its KV head),
 * 4 * NR accumulators, one horizontal reduction per four keys.
 *
 * pv_rows: acc[x] = acc[x] * corr[x] + sum over keys j in [lo, hi) of p[x][j] * (row vp[j],
 * element h on) for NR rows, 4 * W elements of the head at a time, so each loaded piece of a
 * value row serves the NR rows. */
#define ATT_LOOPS(SUF, V, W, LOADKV, LOADU, SETZERO, FMADD, MUL, SET1, STOREU, TO8)                            \
    static inline __attribute__((always_inline)) void qk_rows##SUF(                                            \
        const float* const* q, const void* const* kp, int h, float* const* sr, int lo, int hi, Prefetch* pf,    \
        const int NR, const int D, const int BF) {                                                             \
        for (int j = lo; j < hi; j += 4) {                                                                     \
            prefetch_lines(pf, 2);                                                                             \
            const void* k4[4];                                                                                 \
            for (int y = 0; y < 4; y++) k4[y] = kp[j + y < hi ? j + y : hi - 1]; /* tail: repeat */            \
            V a[3][4];                                                                                         \
            for (int x = 0; x < NR; x++)                                                                       \
                for (int y = 0; y < 4; y++) a[x][y] = SETZERO();                                               \
            for (int d = 0; d < D; d += W) {                                                                   \
                for (int y = 0; y < 4; y++) {                                                                  \
                    const V k = LOADKV(k4[y], h + d, BF);                                                      \
                    for (int x = 0; x < NR; x++) a[x][y] = FMADD(LOADU(q[x] + d), k, a[x][y]);                 \
                }                                                                                              \
            }                                                                                                  \
            for (int x = 0; x < NR; x++) {                                                                     \
                const __m128 s4 = hsum4(TO8(a[x][0]), TO8(a[x][1]), TO8(a[x][2]), TO8(a[x][3]));               \
                if (j + 4 <= hi) {                                                                             \
                    _mm_storeu_ps(sr[x] + j, s4);                                                              \
                } else {                                                                                       \
                    float tmp[4];                                                                              \
                    _mm_storeu_ps(tmp, s4);                                                                    \
                    for (int y = 0; j + y < hi; y++) sr[x][j + y] = tmp[y];                                    \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    static inline __attribute__((always_inline)) void pv_rows##SUF(                                            \
        float* const* acc, const float* corr, const float* const* p, const void* const* vp, int h, int lo,      \
        int hi, Prefetch* pf, const int NR, const int D, const int BF) {                                       \
        for (int c = 0; c < D; c += 4 * W) {                                                                   \
            V a[3][4];                                                                                         \
            for (int x = 0; x < NR; x++) {                                                                     \
                const V cr = SET1(corr[x]);                                                                    \
                for (int y = 0; y < 4; y++) a[x][y] = MUL(LOADU(acc[x] + c + W * y), cr);                      \
            }                                                                                                  \
            for (int j = lo; j < hi; j++) {                                                                    \
                const void* vj = vp[j];                                                                        \
                prefetch_lines(pf, 2);                                                                         \
                const V v0 = LOADKV(vj, h + c, BF), v1 = LOADKV(vj, h + c + W, BF);                            \
                const V v2 = LOADKV(vj, h + c + 2 * W, BF), v3 = LOADKV(vj, h + c + 3 * W, BF);                \
                for (int x = 0; x < NR; x++) {                                                                 \
                    const V pj = SET1(p[x][j]);                                                                \
                    a[x][0] = FMADD(pj, v0, a[x][0]);                                                          \
                    a[x][1] = FMADD(pj, v1, a[x][1]);                                                          \
                    a[x][2] = FMADD(pj, v2, a[x][2]);                                                          \
                    a[x][3] = FMADD(pj, v3, a[x][3]);                                                          \
                }                                                                                              \
            }                                                                                                  \
            for (int x = 0; x < NR; x++)                                                                       \
                for (int y = 0; y < 4; y++) STOREU(acc[x] + c + W * y, a[x][y]);                               \
        }                                                                                                      \
    }

ATT_LOOPS(, __m256, 8, load8, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_fmadd_ps, _mm256_mul_ps, _mm256_set1_ps,
          _mm256_storeu_ps, same8)

#ifdef ATT_AVX512
/* The same loops with 16-float vectors, for head sizes that are multiples of 64 (Z below):
 * half the instructions per key of the 8-float ones (64 decodes of 400 keys, bf16, 2-core
 * Xeon: see the file's head). */
static inline __attribute__((always_inline)) __m512 load16(const void* p, int64_t i, const int BF) {
    if (BF) {
        return widen_bf16x16(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i)));
    }
    return _mm512_loadu_ps((const float*)p + i);
}

static inline __m256 half_sum(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

ATT_LOOPS(512, __m512, 16, load16, _mm512_loadu_ps, _mm512_setzero_ps, _mm512_fmadd_ps, _mm512_mul_ps, _mm512_set1_ps,
          _mm512_storeu_ps, half_sum)

#define Z64 1 /* a head of 64 runs the 16-float loops */
#else
#define Z64 0
#endif

/* Up to three rows of one KV head through a chunk: scores, softmax update, values. */
static inline __attribute__((always_inline)) void group_chunk(const float* const* q, float* const* sr,
                                                              float* const* acc, float* const* m, float* const* l,
                                                              const int* jlo, const int* jhi, const void* const* kp,
                                                              const void* const* vp, int h, Prefetch* pf,
                                                              const int NR, const int D, const int BF, const int Z) {
    int lo = jlo[0], hi = jhi[0];
    for (int x = 1; x < NR; x++) {
        lo = jlo[x] < lo ? jlo[x] : lo;
        hi = jhi[x] > hi ? jhi[x] : hi;
    }
    float corr[3];
#ifdef ATT_AVX512
    if (Z) qk_rows512(q, kp, h, sr, lo, hi, pf, NR, D, BF);
    else
#endif
        qk_rows(q, kp, h, sr, lo, hi, pf, NR, D, BF);
    for (int x = 0; x < NR; x++) corr[x] = softmax_update(sr[x], m[x], l[x], jlo[x], jhi[x], lo, hi);
#ifdef ATT_AVX512
    if (Z) pv_rows512(acc, corr, (const float* const*)sr, vp, h, lo, hi, pf, NR, D, BF);
    else
#endif
        pv_rows(acc, corr, (const float* const*)sr, vp, h, lo, hi, pf, NR, D, BF);
}

/* Each instance (rows, head size or 0 for a runtime one, storage, width) is a function of its
 * own: inlined into one, the eighteen made a function the compiler took 4.5 s over. */
#define GROUP_FN(NR, DC, BF, Z)                                                                              \
    static __attribute__((noinline)) void group_##NR##_##DC##_##BF##_##Z(                                      \
        const float* const* q, float* const* sr, float* const* acc, float* const* m, float* const* l,          \
        const int* jlo, const int* jhi, const void* const* kp, const void* const* vp, int h, Prefetch* pf,    \
        int D) {                                                                                             \
        group_chunk(q, sr, acc, m, l, jlo, jhi, kp, vp, h, pf, NR, DC ? DC : D, BF, Z);                      \
    }
#define GROUP_FNS(DC, BF, Z) GROUP_FN(1, DC, BF, Z) GROUP_FN(2, DC, BF, Z) GROUP_FN(3, DC, BF, Z)
GROUP_FNS(64, 0, Z64)
GROUP_FNS(64, 1, Z64)
#ifdef ATT_AVX512
GROUP_FNS(0, 0, 1)
GROUP_FNS(0, 1, 1)
#endif
GROUP_FNS(0, 0, 0)
GROUP_FNS(0, 1, 0)
#define GROUP_CHUNK(n, DC, BF, Z) group_##n##_##DC##_##BF##_##Z(q, sr, ar, mr, lr, jlo, jhi, kp, vp, g * D, pf, D)

/* The groups of three rows of one chunk, for a constant head size, storage type and width. */
#define GROUPS(n, D, BF, Z)                        \
    do {                                           \
        if (n == 3) GROUP_CHUNK(3, D, BF, Z);      \
        else if (n == 2) GROUP_CHUNK(2, D, BF, Z); \
        else GROUP_CHUNK(1, D, BF, Z);             \
    } while (0)

/* All rows of a task through one chunk (its keys [k0, k0 + nk), kp/vp their rows, float32 or,
 * with bf, bf16): the rows of each KV head (query tokens x its G query heads) three at a time. A
 * group's keys are those any of its rows sees; a row that sees none of the chunk's keys is left
 * out. */
void chunk_avx2(const float* qf, const void* const* kp, const void* const* vp, int bf, float* s, int CK,
                       float* m, float* l, float* acc, int nq, int H, int G, int KVH, int D, int64_t pos0, int64_t k0,
                       int nk, int window, Prefetch* pf) {
    for (int g = 0; g < KVH; g++) {
        const float* q[3];
        float *sr[3], *ar[3], *mr[3], *lr[3];
        int jlo[3], jhi[3], n = 0;
        for (int u = 0; u < nq * G; u++) {
            const int i = u / G, r = i * H + g * G + u % G;
            const int64_t qpos = pos0 + i, first = window > 0 ? qpos - window + 1 : 0;
            const int lo = first > k0 ? (int)(first - k0) : 0;
            const int hi = qpos + 1 < k0 + nk ? (int)(qpos + 1 - k0) : nk;
            if (lo < hi) {
                q[n] = qf + (int64_t)r * D;
                sr[n] = s + (int64_t)r * CK;
                ar[n] = acc + (int64_t)r * D;
                mr[n] = m + r;
                lr[n] = l + r;
                jlo[n] = lo;
                jhi[n] = hi;
                n++;
            }
            if (n == 3 || (u == nq * G - 1 && n > 0)) {
                if (D == 64) { /* the common head size: loops of a known length */
                    if (bf) GROUPS(n, 64, 1, Z64);
                    else GROUPS(n, 64, 0, Z64);
#ifdef ATT_AVX512
                } else if (D % 64 == 0) { /* 16-float vectors */
                    if (bf) GROUPS(n, 0, 1, 1);
                    else GROUPS(n, 0, 0, 1);
#endif
                } else {
                    if (bf) GROUPS(n, 0, 1, 0);
                    else GROUPS(n, 0, 0, 0);
                }
                n = 0;
            }
        }
    }
}
#endif
