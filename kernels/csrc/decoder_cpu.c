/* The decoder layers of a Llama-style model for a step of a few rows (batch-1 decode), in one
 * call from Python.
 *
 * At one row every piece of a layer is small (the dense products stream their weights in
 * ~0.5 ms, attention, norms and rope take microseconds) and the Python around them -- module
 * calls, views, checks, a dozen ctypes calls -- cost ~0.3 ms per layer, a third of a `bench`
 * decode step. Here the same kernels run in the same order with the same roundings as
 * pagedq/models/llama.py's DecoderLayer.forward on the native path:
 *
 *   normed = rms_norm(x) * ln1                    add_rms_norm (no delta)
 *   qkv    = normed @ Wqkv^T (+ bias)             gemv
 *   rope + K/V into the cache                     rope_cache
 *   attn   = paged attention of the Q heads       paged_attention
 *   x, normed = x + attn @ Wo^T, rms_norm(..)*ln2 gemv, add_rms_norm
 *   x      = x + down(silu(gate) * up)            gemv, silu_mul, gemv, one rounded add
 *
 * so the tokens are those of the Python path. Weights are the panels (gemv_cpu.c's layout) or
 * the AMX tiles (amx_gemm_cpu.c's) that kernels/cpu_linear.py keeps for few-row calls, or (bf16 models) the int8/int4 codes of
 * NativeQuantLinear run by woq_gemm_bf16; the cache holds the model's dtype. Scratch is
 * allocated once per call. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"

int gemv(const void* x, int x_bf16, int m, int k, const void* w, int w_kind, int n, const float* bias, void* y,
         int nthreads);
void add_rms_norm_f32(const float* x, const float* delta, const float* w, float* res, float* out, int rows, int n,
                      float eps, int nthreads);
void add_rms_norm_bf16(const uint16_t* x, const uint16_t* delta, const uint16_t* w, uint16_t* res, uint16_t* out,
                       int rows, int n, float eps, int nthreads);
void silu_mul_f32(const float* gu, float* out, int rows, int inter, int nthreads);
void silu_mul_bf16(const uint16_t* gu, uint16_t* out, int rows, int inter, int nthreads);
void rope_cache_f32(float* qkv, int T, int H, int KVH, int D, const int64_t* pos, const float* cos_t,
                    const float* sin_t, const int64_t* slots, float* k_cache, float* v_cache, int nthreads);
void rope_cache_bf16(uint16_t* qkv, int T, int H, int KVH, int D, const int64_t* pos, const uint16_t* cos_t,
                     const uint16_t* sin_t, const int64_t* slots, uint16_t* k_cache, uint16_t* v_cache, int nthreads);
int paged_attention_f32(const float* q, const void* kc, const void* vc, const uint16_t* ks, const uint16_t* vs,
                         const int64_t* block_tables, const int64_t* query_start, const int64_t* query_lens,
                         const int64_t* context_lens, float* out, int kind, int B, int H, int KVH, int D, int BS,
                         int MAXB, float scale, int window, int nthreads);
int paged_attention_bf16(const uint16_t* q, const void* kc, const void* vc, const uint16_t* ks, const uint16_t* vs,
                          const int64_t* block_tables, const int64_t* query_start, const int64_t* query_lens,
                          const int64_t* context_lens, uint16_t* out, int kind, int B, int H, int KVH, int D, int BS,
                          int MAXB, float scale, int window, int nthreads);

int amx_prompt_attention_bf16(const uint16_t* q, int64_t qs, const uint16_t* k, int64_t ks, const uint16_t* v,
                              int64_t vs, uint16_t* out, int64_t os, const int64_t* starts, const int64_t* lens,
                              int n, int T, int H, int KVH, int D, float scale, int window, int nthreads);

int woq_gemm_bf16(const uint16_t* x, int M, int K, const void* codes, int bits, const float* scales,
                  const uint8_t* zeros, int group, int kc, uint16_t* y, int N, int Np, int nthreads);

/* A projection held as weight-only-quantized codes (NativeQuantLinear; QuantPtrs in
 * kernels/native.py): woq_gemm_bf16's arguments, the act-order permutation of the input
 * channels (or NULL) and a bf16 bias added after the product is rounded, as the module adds it. */
typedef struct {
    const void* codes;
    const float* scales;
    const uint8_t* zeros;
    const int64_t* perm;
    const uint16_t* bias;
    int64_t bits, group, kc, np;
} QuantPtrs;

/* One layer's tensors (the field order is LayerPtrs' in kernels/native.py). */
typedef struct {
    const void* ln1;
    const void* ln2;
    const void* w_qkv;
    const float* b_qkv; /* or NULL */
    const void* w_o;
    const void* w_gate_up;
    const void* w_down;
    void* k_cache;
    void* v_cache;
    int64_t w_kind; /* gemv's: float32 panels 0, bf16 panels 1, bf16 AMX tiles 2 */
    int64_t window;
    const QuantPtrs* q[4]; /* qkv, o, gate_up, down held quantized (bf16 models), else NULL */
} LayerPtrs;

/* One step's shapes and attention metadata (StepArgs in kernels/native.py). */
typedef struct {
    int64_t m, hidden, inter, H, KVH, D, BS, B, MAXB, nthreads;
    float eps, scale;
    const int64_t* positions;
    const int64_t* slots;
    const int64_t* block_tables;
    const int64_t* query_start;
    const int64_t* query_lens;
    const int64_t* context_lens;
    const void* cos_t;
    const void* sin_t;
    /* fresh prompts (rows not in the cache's tables): n_prompts ranges of rows attended to their
     * own K/V through amx_prompt_attention_bf16, as the Python path does on an AMX CPU */
    const int64_t* prompt_starts;
    const int64_t* prompt_lens;
    int64_t n_prompts;
} StepArgs;

/* y [m][n] = x [m][k] @ W^T (+ bias) for a weight w in panels or quantized codes q; tmp holds
 * m * k elements (the permuted input). Returns gemv's / woq_gemm_bf16's status. */
static int dense(const void* x, int x_bf16, int m, int k, const void* w, int w_kind, const QuantPtrs* q, int n,
                 const float* bias, void* y, uint16_t* tmp, int nt) {
    if (!q) return gemv(x, x_bf16, m, k, w, w_kind, n, bias, y, nt);
    const uint16_t* xin = (const uint16_t*)x;
    if (q->perm) {
        for (int r = 0; r < m; r++)
            for (int i = 0; i < k; i++) tmp[(size_t)r * k + i] = xin[(size_t)r * k + q->perm[i]];
        xin = tmp;
    }
    uint16_t* out = (uint16_t*)y;
    if (woq_gemm_bf16(xin, m, k, q->codes, (int)q->bits, q->scales, q->zeros, (int)q->group, (int)q->kc, out, n,
                      (int)q->np, nt))
        return -1;
    if (q->bias)
        for (int r = 0; r < m; r++)
            for (int i = 0; i < n; i++)
                out[(size_t)r * n + i] = f32_to_bf16(bf16_to_f32(out[(size_t)r * n + i]) + bf16_to_f32(q->bias[i]));
    return 0;
}

/* x: [m][hidden] residual stream in the model's dtype (x_bf16), updated in place through all
 * `L` layers. Returns 0, or -1 when scratch memory could not be allocated (x is then not the
 * step's result: the caller raises). */
int decoder_layers(const LayerPtrs* layers, int L, void* x, int x_bf16, const StepArgs* a) {
    const int m = (int)a->m, hid = (int)a->hidden, inter = (int)a->inter, H = (int)a->H, KVH = (int)a->KVH;
    const int D = (int)a->D, nt = (int)a->nthreads;
    const int qsz = H * D, qkv_n = (H + 2 * KVH) * D;
    const size_t es = x_bf16 ? 2 : 4;
    const size_t elems = (size_t)m * ((size_t)hid * 3 + (size_t)qkv_n + (size_t)qsz * 2 + (size_t)inter * 3);
    const size_t widest = (size_t)(hid > inter ? (hid > qsz ? hid : qsz) : (inter > qsz ? inter : qsz));
    uint16_t* tmp = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)m * widest);
    char* scratch = (char*)malloc(es * elems);
    int status = 0;
    if (!scratch || !tmp) {
        free(scratch);
        free(tmp);
        return -1;
    }
    char* normed = scratch;
    char* qkv = normed + es * (size_t)m * hid;
    char* q = qkv + es * (size_t)m * qkv_n;
    char* attn = q + es * (size_t)m * qsz;
    char* h = attn + es * (size_t)m * qsz;
    char* gu = h + es * (size_t)m * hid;
    char* act = gu + es * (size_t)m * 2 * inter;
    char* down = act + es * (size_t)m * inter;
    for (int l = 0; l < L && !status; l++) {
        const LayerPtrs* p = &layers[l];
        const int wb = (int)p->w_kind;
        if (x_bf16)
            add_rms_norm_bf16((const uint16_t*)x, NULL, (const uint16_t*)p->ln1, NULL, (uint16_t*)normed, m, hid,
                              a->eps, nt);
        else
            add_rms_norm_f32((const float*)x, NULL, (const float*)p->ln1, NULL, (float*)normed, m, hid, a->eps, nt);
        status |= dense(normed, x_bf16, m, hid, p->w_qkv, wb, p->q[0], qkv_n, p->b_qkv, qkv, tmp, nt);
        if (x_bf16)
            rope_cache_bf16((uint16_t*)qkv, m, H, KVH, D, a->positions, (const uint16_t*)a->cos_t,
                            (const uint16_t*)a->sin_t, a->slots, (uint16_t*)p->k_cache, (uint16_t*)p->v_cache, nt);
        else
            rope_cache_f32((float*)qkv, m, H, KVH, D, a->positions, (const float*)a->cos_t, (const float*)a->sin_t,
                           a->slots, (float*)p->k_cache, (float*)p->v_cache, nt);
        for (int r = 0; r < m; r++) /* the Q heads of each row, contiguous for the attention */
            memcpy(q + es * (size_t)r * qsz, qkv + es * (size_t)r * qkv_n, es * (size_t)qsz);
        if (a->B > 0 && x_bf16) /* the rows that read the cache (none in a step of new prompts only) */
            status |= paged_attention_bf16((const uint16_t*)q, p->k_cache, p->v_cache, NULL, NULL, a->block_tables,
                                 a->query_start, a->query_lens, a->context_lens, (uint16_t*)attn, 0, (int)a->B, H,
                                 KVH, D, (int)a->BS, (int)a->MAXB, a->scale, (int)p->window, nt);
        else if (a->B > 0)
            status |= paged_attention_f32((const float*)q, p->k_cache, p->v_cache, NULL, NULL, a->block_tables,
                                a->query_start, a->query_lens, a->context_lens, (float*)attn, 0, (int)a->B, H, KVH,
                                D, (int)a->BS, (int)a->MAXB, a->scale, (int)p->window, nt);
        if (x_bf16 && a->n_prompts > 0) { /* new prompts; Q, K, V: strided views of the rotated qkv rows */
            const uint16_t* qv = (const uint16_t*)qkv;
            status |= amx_prompt_attention_bf16(qv, qkv_n, qv + qsz, qkv_n, qv + qsz + KVH * D, qkv_n, (uint16_t*)attn,
                                                qsz, a->prompt_starts, a->prompt_lens, (int)a->n_prompts, m, H, KVH, D,
                                                a->scale, (int)p->window, nt) != 0;
        }
        status |= dense(attn, x_bf16, m, qsz, p->w_o, wb, p->q[1], hid, NULL, h, tmp, nt);
        if (x_bf16)
            add_rms_norm_bf16((const uint16_t*)x, (const uint16_t*)h, (const uint16_t*)p->ln2, (uint16_t*)x,
                              (uint16_t*)normed, m, hid, a->eps, nt);
        else
            add_rms_norm_f32((const float*)x, (const float*)h, (const float*)p->ln2, (float*)x, (float*)normed, m,
                             hid, a->eps, nt);
        status |= dense(normed, x_bf16, m, hid, p->w_gate_up, wb, p->q[2], 2 * inter, NULL, gu, tmp, nt);
        if (x_bf16)
            silu_mul_bf16((const uint16_t*)gu, (uint16_t*)act, m, inter, nt);
        else
            silu_mul_f32((const float*)gu, (float*)act, m, inter, nt);
        status |= dense(act, x_bf16, m, inter, p->w_down, wb, p->q[3], hid, NULL, down, tmp, nt);
        const int64_t n = (int64_t)m * hid;
        if (x_bf16) {
            uint16_t* xs = (uint16_t*)x;
            const uint16_t* ds = (const uint16_t*)down;
            for (int64_t i = 0; i < n; i++) xs[i] = f32_to_bf16(bf16_to_f32(xs[i]) + bf16_to_f32(ds[i]));
        } else {
            float* xs = (float*)x;
            const float* ds = (const float*)down;
            for (int64_t i = 0; i < n; i++) xs[i] += ds[i];
        }
    }
    free(scratch);
    free(tmp);
    return status ? -1 : 0;
}
