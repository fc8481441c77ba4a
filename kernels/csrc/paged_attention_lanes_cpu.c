/* Prefill and extend tasks of the CPU paged attention down the vector lanes (lanes_heads, called
 * by paged_attention_cpu.c's attend for each chunk of a task's keys; AVX-512). */
#include "paged_attention_cpu.h"

#ifdef ATT_AVX512
/* Prefill and extend tasks with AVX-512: the rows of one KV head (a tile's query tokens x the G
 * query heads of the head, up to 48: RV vectors of 16) go down the vector lanes, so that no step
 * needs a horizontal reduction. Per chunk of keys, with K and V rows as float32 (kp[j] + h, vp[j]
 * + h, D floats each):
 *   scores   st[j][r] = sum_d K[j][d] * qt[d][r]   (qt: the rows' queries transposed, scaled)
 *   softmax  per lane: running max m[r] and sum l[r], st becomes probabilities
 *   values   ot[d][r] = ot[d][r] * corr[r] + sum_j V[j][d] * st[j][r]
 * Each step is 8 broadcast elements of K (or V) against RV vectors of rows: 8 x RV independent
 * FMAs per RV loads, against the grouped rows' 4-key dot products and one reduction per 4 keys
 * (4 x 512-token prompts, 9 heads over 3, head 64, bf16 cache, 2-core Xeon: 14.2 ms per layer
 * with the grouped rows). The lanes past the tile's rows hold zero queries at the last row's
 * position; their results are never written. */
#define KEYS_PER_STEP 8

/* Keys a row does not see (causal, window) masked to -inf; only chunks that reach past the
 * tile's first query or before its last one's window need it. */
static inline __mmask16 visible512(int64_t kpos, __m512i rowpos, int window) {
    const __m512i k = _mm512_set1_epi32((int32_t)kpos);
    __mmask16 vis = _mm512_cmple_epi32_mask(k, rowpos);
    if (window > 0) vis &= _mm512_cmpgt_epi32_mask(k, _mm512_sub_epi32(rowpos, _mm512_set1_epi32(window)));
    return vis;
}

static inline __attribute__((always_inline)) void lanes_chunk(
    const float* restrict qt, float* restrict ot, float* restrict m, float* restrict l, float* restrict st,
    const int32_t* rowpos, const float* const* kp, const float* const* vp, int h, int64_t k0, int nk, int mask,
    int window, Prefetch* pf, const int RV, const int D) {
    const int RP = RV * 16;
    __m512i pos[RV_MAX];
    for (int v = 0; v < RV; v++) pos[v] = _mm512_loadu_si512((const void*)(rowpos + 16 * v));
    /* scores */
    for (int j = 0; j < nk; j += KEYS_PER_STEP) {
        prefetch_lines(pf, 2);
        const float* k8[KEYS_PER_STEP];
        for (int y = 0; y < KEYS_PER_STEP; y++) k8[y] = kp[j + y < nk ? j + y : nk - 1] + h; /* tail: repeat */
        __m512 a[KEYS_PER_STEP][RV_MAX];
        for (int y = 0; y < KEYS_PER_STEP; y++)
            for (int v = 0; v < RV; v++) a[y][v] = _mm512_setzero_ps();
        for (int d = 0; d < D; d++) {
            __m512 q[RV_MAX];
            for (int v = 0; v < RV; v++) q[v] = _mm512_loadu_ps(qt + d * RP + 16 * v);
            for (int y = 0; y < KEYS_PER_STEP; y++) {
                const __m512 k = _mm512_set1_ps(k8[y][d]);
                for (int v = 0; v < RV; v++) a[y][v] = _mm512_fmadd_ps(k, q[v], a[y][v]);
            }
        }
        for (int y = 0; y < KEYS_PER_STEP && j + y < nk; y++)
            for (int v = 0; v < RV; v++) {
                __m512 sv = a[y][v];
                if (mask) sv = _mm512_mask_blend_ps(visible512(k0 + j + y, pos[v], window), _mm512_set1_ps(-INFINITY), sv);
                _mm512_storeu_ps(st + (j + y) * RP + 16 * v, sv);
            }
    }
    /* online softmax, per lane */
    __m512 corr[RV_MAX];
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int v = 0; v < RV; v++) {
        __m512 mx = ninf;
        for (int j = 0; j < nk; j++) mx = _mm512_max_ps(mx, _mm512_loadu_ps(st + j * RP + 16 * v));
        const __m512 mold = _mm512_loadu_ps(m + 16 * v), mnew = _mm512_max_ps(mold, mx);
        /* a lane that has seen no key yet keeps -inf: subtract 0 there (its values are 0) */
        const __m512 msafe = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mnew, ninf, _CMP_EQ_OQ), mnew, _mm512_setzero_ps());
        corr[v] = exp512(_mm512_sub_ps(mold, msafe));
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < nk; j++) {
            float* sp = st + j * RP + 16 * v;
            const __m512 sv = _mm512_loadu_ps(sp);
            __m512 p = exp512(_mm512_sub_ps(sv, msafe));
            if (mask) p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sv, ninf, _CMP_NEQ_OQ), p); /* exactly 0 */
            _mm512_storeu_ps(sp, p);
            sum = _mm512_add_ps(sum, p);
        }
        _mm512_storeu_ps(l + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16 * v), corr[v], sum));
        _mm512_storeu_ps(m + 16 * v, mnew);
    }
    /* values, 8 elements of the head at a time */
    for (int d0 = 0; d0 < D; d0 += KEYS_PER_STEP) {
        __m512 a[KEYS_PER_STEP][RV_MAX];
        for (int y = 0; y < KEYS_PER_STEP; y++)
            for (int v = 0; v < RV; v++) a[y][v] = _mm512_mul_ps(_mm512_loadu_ps(ot + (d0 + y) * RP + 16 * v), corr[v]);
        for (int j = 0; j < nk; j++) {
            const float* vj = vp[j] + h + d0;
            __m512 p[RV_MAX];
            for (int v = 0; v < RV; v++) p[v] = _mm512_loadu_ps(st + j * RP + 16 * v);
            for (int y = 0; y < KEYS_PER_STEP; y++) {
                const __m512 x = _mm512_set1_ps(vj[y]);
                for (int v = 0; v < RV; v++) a[y][v] = _mm512_fmadd_ps(x, p[v], a[y][v]);
            }
        }
        for (int y = 0; y < KEYS_PER_STEP; y++)
            for (int v = 0; v < RV; v++) _mm512_storeu_ps(ot + (d0 + y) * RP + 16 * v, a[y][v]);
    }
}

/* lanes_chunk for each KV head of a task, RV and the common head size as constants. */
void lanes_heads(const float* qt, float* ot, float* m, float* l, float* st, const int32_t* rowpos,
                        const float* const* kp, const float* const* vp, int KVH, int D, int RV, int64_t k0, int nk,
                        int mask, int window, Prefetch* pf) {
    const int RP = RV * 16;
    for (int g = 0; g < KVH; g++) {
        const int64_t o = (int64_t)g * D * RP;
#define LANES(R, DD) lanes_chunk(qt + o, ot + o, m + g * RP, l + g * RP, st, rowpos, kp, vp, g * (DD), k0, nk, mask, window, pf, R, DD)
        if (D == 64) {
            if (RV == 3) LANES(3, 64);
            else if (RV == 2) LANES(2, 64);
            else LANES(1, 64);
        } else {
            if (RV == 3) LANES(3, D);
            else if (RV == 2) LANES(2, D);
            else LANES(1, D);
        }
#undef LANES
    }
}
#endif
