/* Paged decode attention for CPUs: one query token per sequence, K/V read in place from the
 * sequence's blocks (no gather, no padding to the longest context in the batch).
 *
 * Layouts (row-major):
 *   q, out        [B, H, D]
 *   k/v cache     [num_blocks, BS, KVH, D]
 *   block_tables  [B, MAXB] int64, context_lens [B] int64 (keys visible to each query)
 *
 * One task per sequence: each token's K (and V) row, all KV heads together, is contiguous in
 * its block, so a task streams whole rows and converts each once; the G = H / KVH query heads
 * of a KV head share its slice (GQA). Three passes per task: scores = q.K (fp32), softmax,
 * out = p.V (fp32 accumulation). Built by kernels/native.py with
 * -O3 -march=native -fopenmp; OpenMP resolves to the libgomp that torch already loaded.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

#define DEFINE_DECODE(NAME, T, LOAD, STORE)                                                          \
void NAME(const T* q, const T* kc, const T* vc, const int64_t* block_tables,                         \
          const int64_t* context_lens, T* out, int B, int H, int KVH, int D, int BS, int MAXB,        \
          float scale, int nthreads) {                                                               \
    const int G = H / KVH;                                                                           \
    const int row = KVH * D; /* one token's K (or V) across KV heads: contiguous in a block */       \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                           \
    for (int b = 0; b < B; b++) {                                                                    \
        const int len = (int)context_lens[b];                                                        \
        const int64_t* table = block_tables + (int64_t)b * MAXB;                                     \
        const int nblk = (len + BS - 1) / BS;                                                        \
        float* buf = (float*)malloc(sizeof(float) * ((size_t)2 * H * D + row + (size_t)H * len));    \
        float* qf = buf;             /* [H][D], pre-scaled */                                        \
        float* acc = qf + H * D;     /* [H][D] */                                                    \
        float* xf = acc + H * D;     /* one token row, fp32 */                                       \
        float* scores = xf + row;    /* [len][H] */                                                  \
        for (int i = 0; i < H * D; i++) {                                                            \
            qf[i] = LOAD(q[(int64_t)b * H * D + i]) * scale;                                         \
            acc[i] = 0.f;                                                                            \
        }                                                                                            \
        float* sp = scores;                                                                          \
        for (int i = 0; i < nblk; i++) {                                                             \
            const T* kp = kc + table[i] * BS * (int64_t)row;                                         \
            const int n = (i == nblk - 1) ? len - i * BS : BS;                                       \
            for (int t = 0; t < n; t++, kp += row, sp += H) {                                        \
                _Pragma("omp simd")                                                                  \
                for (int x = 0; x < row; x++) xf[x] = LOAD(kp[x]);                                   \
                for (int h = 0; h < H; h++) {                                                        \
                    const float* qh = qf + h * D;                                                    \
                    const float* kh = xf + (h / G) * D;                                              \
                    float s = 0.f;                                                                   \
                    _Pragma("omp simd reduction(+ : s)")                                             \
                    for (int d = 0; d < D; d++) s += qh[d] * kh[d];                                  \
                    sp[h] = s;                                                                       \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (int h = 0; h < H; h++) {                                                                \
            float m = -INFINITY, l = 0.f;                                                            \
            for (int t = 0; t < len; t++) m = scores[t * H + h] > m ? scores[t * H + h] : m;         \
            _Pragma("omp simd reduction(+ : l)")                                                     \
            for (int t = 0; t < len; t++) {                                                          \
                const float e = expf(scores[t * H + h] - m);                                         \
                scores[t * H + h] = e;                                                               \
                l += e;                                                                              \
            }                                                                                        \
            const float inv = l > 0.f ? 1.f / l : 0.f;                                               \
            for (int t = 0; t < len; t++) scores[t * H + h] *= inv;                                  \
        }                                                                                            \
        sp = scores;                                                                                 \
        for (int i = 0; i < nblk; i++) {                                                             \
            const T* vp = vc + table[i] * BS * (int64_t)row;                                         \
            const int n = (i == nblk - 1) ? len - i * BS : BS;                                       \
            for (int t = 0; t < n; t++, vp += row, sp += H) {                                        \
                _Pragma("omp simd")                                                                  \
                for (int x = 0; x < row; x++) xf[x] = LOAD(vp[x]);                                   \
                for (int h = 0; h < H; h++) {                                                        \
                    const float p = sp[h];                                                           \
                    const float* vh = xf + (h / G) * D;                                              \
                    float* ah = acc + h * D;                                                         \
                    _Pragma("omp simd")                                                              \
                    for (int d = 0; d < D; d++) ah[d] += p * vh[d];                                  \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (int i = 0; i < H * D; i++) out[(int64_t)b * H * D + i] = STORE(acc[i]);                 \
        free(buf);                                                                                   \
    }                                                                                                \
}

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)

DEFINE_DECODE(paged_decode_f32, float, LOAD_F32, STORE_F32)
DEFINE_DECODE(paged_decode_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
