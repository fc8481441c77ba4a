/* What the three translation units of the CPU paged attention share: paged_attention_cpu.c
 * (the step's tasks, their schedule, the K/V reads and the portable rows),
 * paged_attention_rows_cpu.c (the grouped rows of decodes, AVX2 / AVX-512) and
 * paged_attention_lanes_cpu.c (prefill and extend tiles down the vector lanes, AVX-512). They are
 * three files so that kernels/native.py compiles them in parallel: as one file the kernel took
 * 7.4 s of the library's 12.8 s single-threaded build on a 2-core Xeon, most of a cold start. */
#ifndef PAGEDQ_PAGED_ATTENTION_CPU_H
#define PAGEDQ_PAGED_ATTENTION_CPU_H
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ATT_AVX2 1 /* paged_attention_rows_cpu.c's chunk_avx2 is built */
#ifdef __AVX512F__
#define ATT_AVX512 1 /* its 16-float loops, and paged_attention_lanes_cpu.c's lanes_heads */
#endif
#endif

enum { KV_SAME = 0, KV_INT8 = 1, KV_FP8 = 2 };

/* lanes_chunk (AVX-512): rows of a KV head in up to RV_MAX vectors of 16; tasks of fewer rows
 * per KV head than LANES_MIN_ROWS (2 tokens of 3 heads) run the grouped rows. */
#define RV_MAX 3
#define LANES_MIN_ROWS 8

/* Whether a task of nq query tokens runs lanes_chunk (where the call may: lanes). */
static inline int runs_lanes(int lanes, int nq, int G) { return lanes && nq > 1 && nq * G >= LANES_MIN_ROWS; }

typedef struct {
    int b, q0, nq;
    int64_t cost;
} Task;


/* Each thread computes its tasks (every nth of the sorted list: the order is known in advance)
 * chunk after chunk, and a stream asks for the K and V lines of the blocks it will read, in that
 * order, a line of each at a time between pieces of the work, up to `target` blocks of the
 * thread's sequence: two chunks beyond the one being computed, across the end of a task into
 * the thread's next one. Asking for a whole block at once (384 lines of a float32 block)
 * overflows the core's outstanding-miss slots: the requests then queue with the work. With the
 * next chunk alone asked for, a chunk's last lines were still in flight when it began and the
 * first chunk of every task (a decode of ~300 tokens has ~5) started cold. */
typedef struct {
    const char *kc, *vc;  /* the caches */
    int64_t bytes;        /* bytes of a block */
    const Task* tasks;
    const int64_t *block_tables, *query_lens, *context_lens;
    int ntasks, nth, MAXB, BS, window;
    int next_task;                /* the thread's next task to enter */
    const int64_t* table;         /* the task being asked for: its block table, */
    int64_t blk, end;             /* next block and end */
    const char *k, *v;            /* the block being asked for */
    int64_t off;                  /* offset in it (== bytes: done) */
    int64_t issued, target;       /* blocks of the thread's sequence begun, and how far to go */
} Prefetch;

/* A task's first query position, and the keys [lo, hi) some query of it sees (lo past the
 * window). hi > lo: a task has at least one query, which sees at least itself. */
static inline void task_keys(const Task* t, const int64_t* query_lens, const int64_t* context_lens, int window,
                             int64_t* pos0, int64_t* lo, int64_t* hi) {
    *pos0 = context_lens[t->b] - query_lens[t->b] + t->q0;
    *hi = *pos0 + t->nq;
    *lo = window > 0 && *pos0 - window + 1 > 0 ? *pos0 - window + 1 : 0;
}

/* The blocks [first, end) a task reads (never empty). */
static inline void task_blocks(const Task* t, const int64_t* query_lens, const int64_t* context_lens, int window,
                               int BS, int64_t* first, int64_t* end) {
    int64_t pos0, lo, hi;
    task_keys(t, query_lens, context_lens, window, &pos0, &lo, &hi);
    *first = lo / BS;
    *end = (hi + BS - 1) / BS;
}

/* One line of K and one of V; a cheap no-op once `target` blocks have been asked for. */
static inline void prefetch_line(Prefetch* pf) {
    if (pf->off >= pf->bytes) {
        if (pf->issued >= pf->target) return;
        while (pf->blk >= pf->end) { /* this task's blocks are asked for: the thread's next task */
            if (pf->next_task >= pf->ntasks) return;
            const Task* t = pf->tasks + pf->next_task;
            task_blocks(t, pf->query_lens, pf->context_lens, pf->window, pf->BS, &pf->blk, &pf->end);
            pf->table = pf->block_tables + (int64_t)t->b * pf->MAXB;
            pf->next_task += pf->nth;
        }
        pf->k = pf->kc + pf->table[pf->blk] * pf->bytes;
        pf->v = pf->vc + pf->table[pf->blk] * pf->bytes;
        pf->blk++;
        pf->issued++;
        pf->off = 0;
    }
    __builtin_prefetch(pf->k + pf->off, 0, 2);
    __builtin_prefetch(pf->v + pf->off, 0, 2);
    pf->off += 64;
}

static inline void prefetch_lines(Prefetch* pf, int lines) {
    for (; lines > 0; lines--) prefetch_line(pf);
}

/* Everything up to `target` blocks, now (each call below begins a block or asks for a line:
 * every task has blocks, so a task left to enter always has one to begin). */
static inline void prefetch_rest(Prefetch* pf) {
    while (pf->off < pf->bytes || (pf->issued < pf->target && (pf->blk < pf->end || pf->next_task < pf->ntasks)))
        prefetch_line(pf);
}

/* The online-softmax update of one row for the keys [jlo, jhi) of a chunk (jlo < jhi: callers
 * leave out rows that see none), whose scores are sr[jlo..jhi): they become probabilities
 * (relative to the new running max), sr is zeroed over the rest of [lo, hi) (the keys a row
 * group's value loop reads), the running max m and sum l are updated. Returns the factor the
 * row's accumulator must be scaled by. */
static inline float softmax_update(float* restrict sr, float* m, float* l, int jlo, int jhi, int lo, int hi) {
    int j;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (j = jlo; j < jhi; j++) mx = sr[j] > mx ? sr[j] : mx;
    const float mnew = mx > *m ? mx : *m;
    const float corr = expf(*m - mnew); /* exp(-inf) = 0 on the first chunk */
    float sum = 0.f;
    for (j = lo; j < jlo; j++) sr[j] = 0.f;
#pragma omp simd reduction(+ : sum)
    for (j = jlo; j < jhi; j++) {
        const float p = exp_approx(sr[j] - mnew);
        sr[j] = p;
        sum += p;
    }
    for (j = jhi; j < hi; j++) sr[j] = 0.f;
    *l = *l * corr + sum;
    *m = mnew;
    return corr;
}

#ifdef ATT_AVX2
/* paged_attention_rows_cpu.c */
__attribute__((visibility("hidden"))) void chunk_avx2(const float* qf, const void* const* kp, const void* const* vp, int bf,
                                                    float* s, int CK, float* m, float* l, float* acc, int nq, int H,
                                                    int G, int KVH, int D, int64_t pos0, int64_t k0, int nk,
                                                    int window, Prefetch* pf);
#endif
#ifdef ATT_AVX512
/* paged_attention_lanes_cpu.c */
__attribute__((visibility("hidden"))) void lanes_heads(const float* qt, float* ot, float* m, float* l, float* st,
                                                     const int32_t* rowpos, const float* const* kp,
                                                     const float* const* vp, int KVH, int D, int RV, int64_t k0,
                                                     int nk, int mask, int window, Prefetch* pf);
#endif
#endif
