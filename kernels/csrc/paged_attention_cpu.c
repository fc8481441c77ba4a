/* Paged attention for CPUs: decode and prefill/extend in one kernel, K/V read in place from
 * each sequence's blocks (no gather, no padding to the longest context of the batch).
 *
 * Layouts (row-major):
 *   q, out        [T, H, D]         the step's packed query tokens, sequence after sequence
 *   k/v cache     [num_blocks, BS, KVH, D] in the cache's storage type (kv_kind):
 *                   KV_SAME  the query's type (float32 or bfloat16)
 *                   KV_INT8  int8 codes, times one float16 scale per token and KV head
 *                            (k/v_scale [num_blocks, BS, KVH])
 *                   KV_FP8   float8 e4m3fn bytes
 *   block_tables  [B, MAXB] int64; query_start, query_lens [B] int64 (sequence b's queries
 *                 are the query_lens[b] rows from query_start[b]; rows of no sequence are
 *                 left as they are); context_lens [B] int64 (keys in the cache for b, its new
 *                 tokens included: query i of n sits at position context_len - n + i and sees
 *                 the keys up to it, and with window > 0 only the last `window` of them).
 *
 * Work is split into tasks of (sequence, tile of up to QT query tokens), all heads together: a
 * block's K and V rows are contiguous in memory across KV heads, so a task streams whole blocks
 * (and prefetches the next one, which lies elsewhere), converts each to float32 once (a float32
 * cache is read in place), and the G = H / KVH query heads of each KV head read their slice of
 * it (GQA). A row's work on a block (row_block) is specialised for 64-element heads, so its
 * loops are unrolled (64 sequences of 16-600 tokens, 2 threads: float32 4.9 -> 3.7-4.1 ms,
 * bf16 4.1 -> 2.4-2.9 ms). The tasks are listed and sorted longest first before the parallel
 * loop (a precomputed schedule: long prefills start first, decodes fill the gaps).
 * Per task, blocks are visited in order with an online softmax (running max and sum per row),
 * each row touching only the keys it sees (causal, window). Scratch is allocated once per
 * thread per call, never per sequence.
 * Accumulation is float32 throughout. Built by kernels/native.py with -O3 -march=native.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"

enum { KV_SAME = 0, KV_INT8 = 1, KV_FP8 = 2 };

static float half_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1fu) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else { /* subnormal half: normalise */
        exp = 113u;
        while (!(man & 0x400u)) {
            man <<= 1;
            exp--;
        }
        u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static float fp8_table[256];

__attribute__((constructor)) static void fill_fp8_table(void) {
    for (int i = 0; i < 256; i++) {
        const int sign = i >> 7, exp = (i >> 3) & 15, man = i & 7;
        float v;
        if (exp == 15 && man == 7) v = NAN;
        else if (exp == 0) v = ldexpf((float)man / 8.f, -6);
        else v = ldexpf(1.f + (float)man / 8.f, exp - 7);
        fp8_table[i] = sign ? -v : v;
    }
}

typedef struct {
    int b, q0, nq;
    int64_t cost;
} Task;

static int by_cost_desc(const void* a, const void* b) {
    const int64_t x = ((const Task*)a)->cost, y = ((const Task*)b)->cost;
    return (x < y) - (x > y);
}

/* One block's K or V rows [n][KVH * D] (contiguous in the block) as float32. */
static inline void load_block(const void* cache, const uint16_t* scales, int64_t elem, int64_t srow, int n,
                              int KVH, int D, int kind, int q_bf16, float* restrict dst) {
    const int64_t count = (int64_t)n * KVH * D;
    if (kind == KV_INT8) {
        for (int64_t r = 0; r < (int64_t)n * KVH; r++) {
            const int8_t* p = (const int8_t*)cache + elem + r * D;
            const float sc = half_to_f32(scales[srow + r]);
            float* o = dst + r * D;
#pragma omp simd
            for (int d = 0; d < D; d++) o[d] = (float)p[d] * sc;
        }
    } else if (kind == KV_FP8) {
        const uint8_t* p = (const uint8_t*)cache + elem;
        for (int64_t x = 0; x < count; x++) dst[x] = fp8_table[p[x]];
    } else if (q_bf16) {
        const uint16_t* p = (const uint16_t*)cache + elem;
#pragma omp simd
        for (int64_t x = 0; x < count; x++) dst[x] = bf16_to_f32(p[x]);
    } else {
        memcpy(dst, (const float*)cache + elem, sizeof(float) * (size_t)count);
    }
}

static inline void prefetch_block(const void* cache, int64_t elem, int64_t bytes, int esize) {
    const char* p = (const char*)cache + elem * esize;
    for (int64_t x = 0; x < bytes; x += 64) __builtin_prefetch(p + x, 0, 1);
}

/* One query row against the keys [jlo, jhi) of one block (kh, vh: its KV head's K and V rows,
 * ``row`` floats apart): scores into sr, then the online-softmax update of the row's running max
 * m, sum l and accumulator ar. Inlined, so a constant D unrolls every loop over the head. */
static inline __attribute__((always_inline)) void row_block(const float* restrict qr, const float* restrict kh,
                                                            const float* restrict vh, float* restrict sr,
                                                            float* m, float* l, float* restrict ar, int jlo,
                                                            int jhi, int nk, int row, const int D) {
    int j = jlo;
    for (; j + 4 <= jhi; j += 4) { /* four keys at once: independent accumulators */
        const float *k0p = kh + (int64_t)j * row, *k1p = k0p + row, *k2p = k1p + row, *k3p = k2p + row;
        float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int d = 0; d < D; d++) {
            const float qd = qr[d];
            d0 += qd * k0p[d];
            d1 += qd * k1p[d];
            d2 += qd * k2p[d];
            d3 += qd * k3p[d];
        }
        sr[j] = d0;
        sr[j + 1] = d1;
        sr[j + 2] = d2;
        sr[j + 3] = d3;
    }
    for (; j < jhi; j++) {
        const float* kj = kh + (int64_t)j * row;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < D; d++) dot += qr[d] * kj[d];
        sr[j] = dot;
    }
    float mx = -INFINITY;
    for (j = jlo; j < jhi; j++) mx = sr[j] > mx ? sr[j] : mx;
    const float mnew = mx > *m ? mx : *m;
    const float corr = expf(*m - mnew); /* exp(-inf) = 0 on the first block */
    float sum = 0.f;
    for (j = 0; j < jlo; j++) sr[j] = 0.f;
#pragma omp simd reduction(+ : sum)
    for (j = jlo; j < jhi; j++) {
        const float p = exp_approx(sr[j] - mnew);
        sr[j] = p;
        sum += p;
    }
    for (j = jhi; j < nk; j++) sr[j] = 0.f;
    *l = *l * corr + sum;
    *m = mnew;
    if (corr != 1.f) {
#pragma omp simd
        for (int d = 0; d < D; d++) ar[d] *= corr;
    }
    for (j = jlo; j < jhi; j++) {
        const float p = sr[j];
        const float* vj = vh + (int64_t)j * row;
#pragma omp simd
        for (int d = 0; d < D; d++) ar[d] += p * vj[d];
    }
}

/* Query tokens per task: enough rows (QT * H) to reuse each converted K/V block, few enough
 * that a long prefill still splits into many tasks. */
static int tile_tokens(int H) { return H >= 64 ? 1 : 64 / H; }

/* Returns 0, or -1 when scratch memory could not be allocated (out is then not written). */
static int attend(const void* q, const void* kc, const void* vc, const uint16_t* ks, const uint16_t* vs,
                   const int64_t* block_tables, const int64_t* query_start, const int64_t* query_lens,
                   const int64_t* context_lens,
                   void* out, int q_bf16, int kind, int B, int H, int KVH, int D, int BS, int MAXB,
                   float scale, int window, int nthreads) {
    const int G = H / KVH, QT = tile_tokens(H), R = H * QT;
    int ntasks = 0;
    for (int b = 0; b < B; b++) ntasks += (int)((query_lens[b] + QT - 1) / QT);
    if (ntasks == 0) return 0;
    Task* tasks = (Task*)malloc(sizeof(Task) * (size_t)ntasks);
    if (!tasks) return -1;
    int failed = 0;
    int t = 0;
    for (int b = 0; b < B; b++) {
        const int n = (int)query_lens[b];
        for (int q0 = 0; q0 < n; q0 += QT) {
            const int nq = n - q0 < QT ? n - q0 : QT;
            const int64_t last = context_lens[b] - n + q0 + nq; /* keys seen by the tile's last query */
            const int64_t keys = window > 0 && last > window + nq ? window + nq : last;
            tasks[t++] = (Task){b, q0, nq, keys * nq};
        }
    }
    qsort(tasks, (size_t)ntasks, sizeof(Task), by_cost_desc);
    const int row = KVH * D; /* elements per token row of a block */
    const int64_t block_elems = (int64_t)BS * row;
    const int esize = kind != KV_SAME ? 1 : (q_bf16 ? 2 : 4);
    const int in_place = kind == KV_SAME && !q_bf16;

#pragma omp parallel num_threads(nthreads)
    {
        float* buf = (float*)malloc(sizeof(float) * ((size_t)2 * R * D + (size_t)2 * R + (size_t)R * BS
                                                     + (size_t)2 * BS * row));
        float* qf = buf;          /* [R][D], pre-scaled; row r = query i * H + head h */
        float* acc = qf + R * D;  /* [R][D] */
        float* m = acc + R * D;   /* [R] running max */
        float* l = m + R;         /* [R] running sum */
        float* s = l + R;         /* [R][BS] scores, then probabilities */
        float* kf = s + R * BS;   /* [BS][KVH][D] K of one block */
        float* vf = kf + BS * row; /* [BS][KVH][D] V of one block */
#pragma omp for schedule(dynamic, 1)
        for (int ti = 0; ti < ntasks; ti++) {
            if (!buf) {
                failed = 1; /* every thread still runs the loop (a worksharing construct) */
                continue;
            }
            const Task tk = tasks[ti];
            const int n = (int)query_lens[tk.b];
            const int64_t pos0 = context_lens[tk.b] - n + tk.q0; /* the tile's first query position */
            const int rows = tk.nq * H;
            const int64_t* table = block_tables + (int64_t)tk.b * MAXB;
            const int64_t qoff = (query_start[tk.b] + tk.q0) * H * (int64_t)D;
            if (q_bf16) {
                const uint16_t* src = (const uint16_t*)q + qoff;
                for (int x = 0; x < rows * D; x++) qf[x] = bf16_to_f32(src[x]) * scale;
            } else {
                const float* src = (const float*)q + qoff;
                for (int x = 0; x < rows * D; x++) qf[x] = src[x] * scale;
            }
            for (int r = 0; r < rows; r++) {
                m[r] = -INFINITY;
                l[r] = 0.f;
            }
            memset(acc, 0, sizeof(float) * (size_t)rows * D);
            const int64_t hi = pos0 + tk.nq; /* keys [lo, hi) are seen by some query of the tile */
            const int64_t lo = window > 0 && pos0 - window + 1 > 0 ? pos0 - window + 1 : 0;
            for (int64_t blk = lo / BS; blk * BS < hi; blk++) {
                const int64_t k0 = blk * BS > lo ? blk * BS : lo;
                const int64_t k1 = (blk + 1) * BS < hi ? (blk + 1) * BS : hi;
                const int off0 = (int)(k0 - blk * BS), nk = (int)(k1 - k0);
                const int64_t base = table[blk] * block_elems + (int64_t)off0 * row;
                const int64_t sbase = (table[blk] * BS + off0) * KVH;
                if ((blk + 1) * BS < hi) { /* the next block is elsewhere in memory: ask for it early */
                    prefetch_block(kc, table[blk + 1] * block_elems, block_elems * esize, esize);
                    prefetch_block(vc, table[blk + 1] * block_elems, block_elems * esize, esize);
                }
                /* a float32 cache is read in place; other storage is converted once per block */
                const float *kb = kf, *vb = vf;
                if (in_place) {
                    kb = (const float*)kc + base;
                    vb = (const float*)vc + base;
                } else {
                    load_block(kc, ks, base, sbase, nk, KVH, D, kind, q_bf16, kf);
                    load_block(vc, vs, base, sbase, nk, KVH, D, kind, q_bf16, vf);
                }
                for (int r = 0; r < rows; r++) {
                    float* sr = s + r * BS;
                    const float* qr = qf + r * D;
                    const int64_t qpos = pos0 + r / H;
                    const int kvh = (r % H) / G;
                    /* keys of this block the row sees: [jlo, jhi) */
                    const int64_t first = window > 0 ? qpos - window + 1 : 0;
                    const int jlo = first > k0 ? (int)(first - k0) : 0;
                    const int jhi = qpos + 1 < k1 ? (int)(qpos + 1 - k0) : nk;
                    if (jlo >= jhi) { /* nothing of this block is visible to the row */
                        for (int j = 0; j < nk; j++) sr[j] = 0.f;
                        continue;
                    }
                    if (D == 64) /* the common head size: loops of a known length, unrolled */
                        row_block(qr, kb + kvh * 64, vb + kvh * 64, sr, m + r, l + r, acc + r * 64, jlo, jhi,
                                  nk, row, 64);
                    else
                        row_block(qr, kb + kvh * D, vb + kvh * D, sr, m + r, l + r, acc + r * D, jlo, jhi,
                                  nk, row, D);
                }
            }
            for (int r = 0; r < rows; r++) {
                const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
                const float* ar = acc + r * D;
                const int64_t off = qoff + (int64_t)r * D;
                if (q_bf16) {
                    uint16_t* dst = (uint16_t*)out + off;
                    for (int d = 0; d < D; d++) dst[d] = f32_to_bf16(ar[d] * inv);
                } else {
                    float* dst = (float*)out + off;
                    for (int d = 0; d < D; d++) dst[d] = ar[d] * inv;
                }
            }
        }
        free(buf);
    }
    free(tasks);
    return failed ? -1 : 0;
}

int paged_attention_f32(const float* q, const void* kc, const void* vc, const uint16_t* ks,
                         const uint16_t* vs, const int64_t* block_tables, const int64_t* query_start,
                         const int64_t* query_lens, const int64_t* context_lens, float* out, int kind, int B, int H, int KVH, int D,
                         int BS, int MAXB, float scale, int window, int nthreads) {
    return attend(q, kc, vc, ks, vs, block_tables, query_start, query_lens, context_lens, out, 0, kind, B, H, KVH, D, BS,
                  MAXB, scale, window, nthreads);
}

int paged_attention_bf16(const uint16_t* q, const void* kc, const void* vc, const uint16_t* ks,
                          const uint16_t* vs, const int64_t* block_tables, const int64_t* query_start,
                          const int64_t* query_lens, const int64_t* context_lens, uint16_t* out, int kind, int B, int H, int KVH, int D,
                          int BS, int MAXB, float scale, int window, int nthreads) {
    return attend(q, kc, vc, ks, vs, block_tables, query_start, query_lens, context_lens, out, 1, kind, B, H, KVH, D, BS,
                  MAXB, scale, window, nthreads);
}
