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
 * Work is split into tasks of (sequence, tile of up to QT query tokens), all heads together; the
 * tasks are listed and sorted longest first before the parallel loop, and thread t takes tasks
 * t, t + nth, ... of that list (a precomputed schedule: long prefills start first, the loads
 * stay within a task of each other, and each thread knows its next task). A task walks its keys in chunks of whole
 * blocks, about 64 keys (chunk_keys), with an online softmax (running max and sum per row), each
 * row touching only the keys it sees (causal, window): the per-row bookkeeping is paid once per
 * chunk. A float32 cache is read in place, and so is a bf16 one where chunk_avx2 runs (widened in
 * registers: 64 decodes of 400 keys, bf16, 2-core Xeon, 2.7 -> 2.45 ms per layer with the
 * caches in memory, 2.3 -> 1.7 in L3); other storage is converted to float32 once per chunk,
 * and the lines of the thread's next two chunks (across tasks) are prefetched a few at a time
 * during the work (Prefetch; whole-workload float32 A/B on 2 vCPUs: 91.4-92.4 -> 85.5-89.8 s,
 * against the next chunk only, within a task, under dynamic scheduling).
 * With AVX-512 and head sizes that are multiples of 64 the same loops run 16-float vectors
 * (qk_rows512, pv_rows512; half the instructions per key): 64 decodes of 400 keys, bf16 cache
 * in memory, 2-core Xeon, 1.9-2.5 -> 1.35-2.1 ms per layer (medians 2.06 -> 1.52), 16 decodes
 * 0.55 -> 0.34; PAGEDQ_CPU_ISA=avx2 builds the 8-float path alone (tested on such a CPU too).
 * With AVX2 and head sizes that are multiples of 32 (chunk_avx2), the rows of each KV head go
 * three at a time: each loaded piece of a key or value row serves the three (the G query heads
 * of a KV head, GQA), scores four keys at a time with one horizontal reduction. Elsewhere each
 * row runs alone (row_chunk, unrolled for 64-element heads). Measured on a 2-vCPU AMD EPYC
 * (AVX2), 64 decodes of 16-600 tokens, float32, 2 threads: 3.7-5.2 -> 3.2-3.9 ms (per block of
 * 16 with one row at a time -> chunks of 64 with rows in threes); one 512-token prompt 6.4 ms
 * against torch's flash SDPA's 6.9. With AVX-512, tasks of several query tokens (prefill,
 * extend) put the rows of a KV head down the vector lanes instead (lanes_chunk: 16 query tokens
 * of 3 heads = 48 lanes a tile; no horizontal reductions, softmax per lane): 4 prompts of 512
 * tokens, 9 heads over 3, bf16, 2-core Xeon, 14.2 -> 6.2 ms per layer; decodes keep the grouped
 * rows. Scratch is allocated once per thread per call, never per sequence.
 * Accumulation is float32 throughout. Built by kernels/native.py with -O3 -march=native.
 * This file holds the tasks, their schedule, the K/V reads and the portable rows (row_chunk);
 * the grouped rows (chunk_avx2) are in paged_attention_rows_cpu.c, the lanes (lanes_heads) in
 * paged_attention_lanes_cpu.c, what they share in paged_attention_cpu.h: three files that
 * compile in parallel.
 */
#include "paged_attention_cpu.h"

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

/* One query row against the keys [jlo, jhi) of a chunk (kp[j] + h, vp[j] + h: key j's K and V
 * slice of the row's KV head): scores into sr, then the online-softmax update of the row's
 * running max m, sum l and accumulator ar. Inlined, so a constant D unrolls every loop over the
 * head. The portable path; x86 CPUs with AVX2 run chunk_avx2 below for head sizes that are
 * multiples of 32. */
static inline __attribute__((always_inline)) void row_chunk(const float* restrict qr, const float* const* kp,
                                                            const float* const* vp, int h, float* restrict sr,
                                                            float* m, float* l, float* restrict ar, int jlo,
                                                            int jhi, const int D) {
    int j = jlo;
    for (; j + 4 <= jhi; j += 4) { /* four keys at once: independent accumulators */
        const float *k0p = kp[j] + h, *k1p = kp[j + 1] + h, *k2p = kp[j + 2] + h, *k3p = kp[j + 3] + h;
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
        const float* kj = kp[j] + h;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < D; d++) dot += qr[d] * kj[d];
        sr[j] = dot;
    }
    const float corr = softmax_update(sr, m, l, jlo, jhi, jlo, jhi); /* values read over [jlo, jhi) only */
    if (corr != 1.f) {
#pragma omp simd
        for (int d = 0; d < D; d++) ar[d] *= corr;
    }
    for (j = jlo; j < jhi; j++) {
        const float p = sr[j];
        const float* vj = vp[j] + h;
#pragma omp simd
        for (int d = 0; d < D; d++) ar[d] += p * vj[d];
    }
}

/* Query tokens per task of the grouped rows: enough rows (QT * H) to reuse each converted K/V
 * chunk, few enough that a long prefill still splits into many tasks (lanes_chunk's tiles: 48
 * rows per KV head). */
static int tile_tokens(int H) { return H >= 64 ? 1 : 64 / H; }

/* Keys per chunk: whole blocks, about 64 keys, so the per-row softmax bookkeeping (max, exp of
 * the correction, rescaling the accumulator) is paid once per 64 keys, not once per block of 16
 * (64 decodes of 16-600 tokens, float32, one thread, K/V in cache: 2.3-2.6 ms with a chunk per
 * block of 16, 1.6-1.9 ms with chunks of 64). */
static int chunk_keys(int BS) { return BS >= 64 ? BS : (64 / BS) * BS; }

/* Returns 0, or -1 when scratch memory could not be allocated (out is then not written). */
static int attend(const void* q, const void* kc, const void* vc, const uint16_t* ks, const uint16_t* vs,
                   const int64_t* block_tables, const int64_t* query_start, const int64_t* query_lens,
                   const int64_t* context_lens,
                   void* out, int q_bf16, int kind, int B, int H, int KVH, int D, int BS, int MAXB,
                   float scale, int window, int nthreads) {
    const int G = H / KVH, CK = chunk_keys(BS);
#ifdef ATT_AVX512
    /* prefill/extend tasks run lanes_chunk (tiles of at least two tokens: up to 24 query heads
     * per KV head) */
    const int lanes = D % 16 == 0 && 2 * G <= 16 * RV_MAX;
#else
    const int lanes = 0;
#endif
    /* a tile's rows per KV head fill up to RV_MAX vectors of lanes; tasks of fewer than
     * LANES_MIN_ROWS rows per KV head, and decodes, run the grouped rows (R rows at most) */
    const int QT = lanes ? 16 * RV_MAX / G : tile_tokens(H);
    int grouped_tokens = QT; /* the most query tokens of a task that runs the grouped rows */
    while (grouped_tokens > 1 && runs_lanes(lanes, grouped_tokens, G)) grouped_tokens--;
    const int R = H * grouped_tokens;
    int ntasks = 0;
    int lane_tasks = 0; /* whether a task runs lanes_chunk (its scratch is allocated only then) */
    for (int b = 0; b < B; b++) {
        ntasks += (int)((query_lens[b] + QT - 1) / QT);
        lane_tasks |= runs_lanes(lanes, query_lens[b] < QT ? (int)query_lens[b] : QT, G); /* its first tile */
    }
    if (ntasks == 0) return 0;
    const int RPT = lane_tasks ? (QT * G + 15) / 16 * 16 : 0; /* lanes of a full tile */
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
#ifdef ATT_AVX2
    const int wide = D % 32 == 0; /* chunk_avx2 runs (else row_chunk, on float32 rows) */
#else
    const int wide = 0;
#endif
    /* read in place: a float32 cache, and a bf16 one where chunk_avx2 widens it in registers
     * (lanes_chunk converts bf16 chunks: it broadcasts single float32 elements) */
    const int in_place = kind == KV_SAME && (!q_bf16 || wide);
    const int convert = !in_place || (lane_tasks && q_bf16);

#pragma omp parallel num_threads(nthreads)
    {
        const size_t lane_floats = (size_t)RPT * (2 * (size_t)KVH * D + 2 * (size_t)KVH + CK + 1);
        size_t floats = (size_t)2 * R * D + (size_t)2 * R + (size_t)R * CK + (convert ? (size_t)2 * CK * row : 0);
        floats += lane_floats;
        floats += floats & 1; /* the pointer arrays after the floats stay 8-byte aligned */
        float* buf = (float*)malloc(sizeof(float) * floats + sizeof(float*) * (size_t)2 * CK);
        float* qf = buf;          /* [R][D], pre-scaled; row r = query i * H + head h */
        float* acc = qf + R * D;  /* [R][D] */
        float* m = acc + R * D;   /* [R] running max */
        float* l = m + R;         /* [R] running sum */
        float* s = l + R;         /* [R][CK] scores, then probabilities */
        float* kf = s + R * CK;   /* [CK][KVH][D] K of one chunk, converted (not when read in place) */
        float* vf = kf + (convert ? CK * row : 0); /* [CK][KVH][D] V */
        /* lanes_chunk's (RP = the task's row vectors x 16, RP <= RPT): */
        float* qt = vf + (convert ? CK * row : 0); /* [KVH][D][RP] queries, transposed, scaled */
        float* ot = qt + (size_t)KVH * D * RPT;    /* [KVH][D][RP] accumulators */
        float* ml = ot + (size_t)KVH * D * RPT;    /* [KVH][RP] running max */
        float* ll = ml + (size_t)KVH * RPT;        /* [KVH][RP] running sum */
        float* st = ll + (size_t)KVH * RPT;        /* [CK][RP] scores, then probabilities */
        int32_t* rowpos = (int32_t*)(st + (size_t)CK * RPT); /* [RP] each lane's query position */
        const void** kp = (const void**)(buf + floats); /* [CK] each key's K row */
        const void** vp = kp + CK;                                      /* [CK] each key's V row */
        /* every nth task of the sorted list (longest first: the threads' loads stay within a
         * task of each other), so that the stream knows the thread's next task */
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t bytes = block_elems * esize;
        Prefetch pf = {(const char*)kc, (const char*)vc, bytes, tasks, block_tables, query_lens, context_lens,
                       ntasks, nth, MAXB, BS, window, tid, NULL, 0, 0, NULL, NULL, bytes /* off: none begun */, 0, 0};
        int64_t pos = 0; /* blocks of the thread's sequence computed */
        if (!buf) failed = 1;
        for (int ti = tid; buf && ti < ntasks; ti += nth) {
            const Task tk = tasks[ti];
            int64_t pos0, lo, hi; /* the tile's first query position; keys [lo, hi) are seen by some query */
            task_keys(&tk, query_lens, context_lens, window, &pos0, &lo, &hi);
            const int rows = tk.nq * H;
            const int64_t* table = block_tables + (int64_t)tk.b * MAXB;
            const int64_t qoff = (query_start[tk.b] + tk.q0) * H * (int64_t)D;
            const int use_lanes = runs_lanes(lanes, tk.nq, G);
            const int RV = (tk.nq * G + 15) / 16, RP = 16 * RV, nr = tk.nq * G;
            if (use_lanes) {
                for (int g = 0; g < KVH; g++) {
                    float* qg = qt + (int64_t)g * D * RP;
                    for (int r = 0; r < RP; r++) {
                        const int64_t src = qoff + ((int64_t)(r / G) * H + g * G + r % G) * D;
                        if (r >= nr)
                            for (int d = 0; d < D; d++) qg[d * RP + r] = 0.f;
                        else if (q_bf16)
                            for (int d = 0; d < D; d++) qg[d * RP + r] = bf16_to_f32(((const uint16_t*)q)[src + d]) * scale;
                        else
                            for (int d = 0; d < D; d++) qg[d * RP + r] = ((const float*)q)[src + d] * scale;
                    }
                }
                for (int r = 0; r < RP; r++) rowpos[r] = (int32_t)(pos0 + (r < nr ? r / G : tk.nq - 1));
                for (int x = 0; x < KVH * RP; x++) {
                    ml[x] = -INFINITY;
                    ll[x] = 0.f;
                }
                memset(ot, 0, sizeof(float) * (size_t)KVH * D * RP);
            } else if (q_bf16) {
                const uint16_t* src = (const uint16_t*)q + qoff;
                for (int x = 0; x < rows * D; x++) qf[x] = bf16_to_f32(src[x]) * scale;
            } else {
                const float* src = (const float*)q + qoff;
                for (int x = 0; x < rows * D; x++) qf[x] = src[x] * scale;
            }
            if (!use_lanes) {
                for (int r = 0; r < rows; r++) {
                    m[r] = -INFINITY;
                    l[r] = 0.f;
                }
                memset(acc, 0, sizeof(float) * (size_t)rows * D);
            }
            int64_t k1;
            for (int64_t k0 = lo; k0 < hi; k0 = k1) {
                /* a chunk: keys [k0, k1), whole blocks after the first, up to CK keys */
                const int64_t blk0 = k0 / BS, blk1 = blk0 + CK / BS;
                k1 = blk1 * BS < hi ? blk1 * BS : hi;
                const int nk = (int)(k1 - k0);
                const int64_t nb = (k1 + BS - 1) / BS - blk0;
                pf.target = pos + nb; /* this chunk's lines: asked for by now, normally long since */
                prefetch_rest(&pf);
                pf.target = pos + nb + 2 * (CK / BS); /* and the next two chunks' during its work */
                pos += nb;
                /* each key's rows: read in place (esize bytes an element), else converted once */
                for (int j = 0; j < nk;) {
                    const int64_t blk = (k0 + j) / BS;
                    const int off = (int)((k0 + j) % BS), cnt = BS - off < nk - j ? BS - off : nk - j;
                    const int64_t base = table[blk] * block_elems + (int64_t)off * row;
                    const char *kb = (const char*)(kf + (int64_t)j * row), *vb = (const char*)(vf + (int64_t)j * row);
                    int64_t stride = (int64_t)row * 4;
                    if (in_place && !(use_lanes && q_bf16)) {
                        kb = (const char*)kc + base * esize;
                        vb = (const char*)vc + base * esize;
                        stride = (int64_t)row * esize;
                    } else {
                        const int64_t sbase = (table[blk] * BS + off) * KVH;
                        load_block(kc, ks, base, sbase, cnt, KVH, D, kind, q_bf16, kf + (int64_t)j * row);
                        load_block(vc, vs, base, sbase, cnt, KVH, D, kind, q_bf16, vf + (int64_t)j * row);
                    }
                    for (int x = 0; x < cnt; x++, j++) {
                        kp[j] = kb + x * stride;
                        vp[j] = vb + x * stride;
                    }
                }
#ifdef ATT_AVX512
                if (use_lanes) { /* masks where the chunk reaches past the first query or before the last's window */
                    const int mask = k1 - 1 > pos0 || (window > 0 && k0 < pos0 + tk.nq - window);
                    lanes_heads(qt, ot, ml, ll, st, rowpos, (const float* const*)kp, (const float* const*)vp, KVH, D,
                                RV, k0, nk, mask, window, &pf);
                    continue;
                }
#endif
#ifdef ATT_AVX2
                if (wide) {
                    chunk_avx2(qf, kp, vp, in_place && q_bf16, s, CK, m, l, acc, tk.nq, H, G, KVH, D, pos0, k0, nk,
                               window, &pf);
                    continue; /* a lead the work fell short of is made up during the next chunks */
                }
#endif
                prefetch_rest(&pf);
                for (int r = 0; r < rows; r++) {
                    float* sr = s + (int64_t)r * CK;
                    const int64_t qpos = pos0 + r / H;
                    const int h = (r % H) / G * D; /* the row's KV head, as an offset in a key row */
                    /* keys of this chunk the row sees: [jlo, jhi) */
                    const int64_t first = window > 0 ? qpos - window + 1 : 0;
                    const int jlo = first > k0 ? (int)(first - k0) : 0;
                    const int jhi = qpos + 1 < k1 ? (int)(qpos + 1 - k0) : nk;
                    if (jlo >= jhi) continue; /* nothing of this chunk is visible to the row */
                    const float* const* kr = (const float* const*)kp; /* float32 rows here */
                    const float* const* vr = (const float* const*)vp;
                    if (D == 64) /* the common head size: loops of a known length, unrolled */
                        row_chunk(qf + r * 64, kr, vr, h, sr, m + r, l + r, acc + r * 64, jlo, jhi, 64);
                    else
                        row_chunk(qf + r * D, kr, vr, h, sr, m + r, l + r, acc + r * D, jlo, jhi, D);
                }
            }
            if (use_lanes) {
                for (int g = 0; g < KVH; g++)
                    for (int r = 0; r < nr; r++) {
                        const int x = g * RP + r;
                        const float inv = ll[x] > 0.f ? 1.f / ll[x] : 0.f;
                        const float* og = ot + (int64_t)g * D * RP + r;
                        const int64_t off = qoff + ((int64_t)(r / G) * H + g * G + r % G) * D;
                        if (q_bf16)
                            for (int d = 0; d < D; d++) ((uint16_t*)out)[off + d] = f32_to_bf16(og[d * RP] * inv);
                        else
                            for (int d = 0; d < D; d++) ((float*)out)[off + d] = og[d * RP] * inv;
                    }
                continue;
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
