"""Paged attention, KV write and block copy in Triton.

Cache layout as everywhere in pagedq: per layer ``[num_blocks, block_size, num_kv_heads,
head_dim]`` for K and V; token ``t`` of a sequence sits at slot ``table[t // bs] * bs + t % bs``.
The kernels read tokens in tiles of ``BLOCK_N`` consecutive positions and look each one's block
up in the block table, so any block size (1 included) works with the same tiles. Quantized
caches: ``int8`` codes with one scale per token and KV head (``[num_blocks, block_size,
num_kv_heads]``), and ``uint8`` holding the bytes of float8 e4m3 values; both are dequantized
in registers.

* :func:`paged_decode` — one query token per sequence. A program takes one sequence, one KV
  head and all the query heads that share it (GQA: K/V are read once for the group), and one
  split of the context; online softmax in float32. With more than one split (flash-decoding,
  for long contexts and few sequences) every split writes its partial output and log-sum-exp,
  and a second kernel merges them.
* :func:`paged_prefill` — varlen extend attention: every prefill chunk of the packed batch
  (a fresh prompt, a continued chunked prefill, or the rest of a prompt after a prefix-cache
  hit) attends causally to its sequence's cached tokens and itself, in one launch. The chunk's
  own K/V are written to the cache first and read back from it.
* :func:`reshape_and_cache` — new K/V into their slots, quantized when the cache is.
* :func:`copy_blocks` — the copy-on-write copies of a step, all layers, one launch.

Tile sizes: fixed small tiles in the interpreter; on a GPU a table keyed by head dim (bigger
tiles for small heads), with ``num_warps`` 4 and 2 pipeline stages — the usual choices of
flash-decoding kernels; ``triton.autotune`` would need idempotent launches, which the KV write
is not, so the tables are explicit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

KV_PLAIN, KV_INT8, KV_FP8 = 0, 1, 2


def kv_kind(cache: torch.Tensor) -> int:
    if cache.dtype == torch.int8:
        return KV_INT8
    if cache.dtype == torch.uint8:
        return KV_FP8
    return KV_PLAIN


def _tiles(head_dim: int) -> tuple[int, int]:
    """(BLOCK_N tokens per KV tile, num_warps) for a head dim."""
    if INTERPRET:
        return 16, 1
    return (64, 4) if head_dim <= 64 else (32, 4)


@triton.jit
def _load_kv(
    cache_ptr, scale_ptr, slots, head, offs_d, mask_n, mask_d, stride_tok, stride_head, s_tok, s_head,
    KIND: tl.constexpr,
):  # fmt: skip
    """K or V rows ``[BLOCK_N, BLOCK_D]`` of the given slots, dequantized to float32."""
    ptrs = cache_ptr + slots[:, None] * stride_tok + head * stride_head + offs_d[None, :]
    x = tl.load(ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0)
    if KIND == 1:
        s = tl.load(scale_ptr + slots * s_tok + head * s_head, mask=mask_n, other=0.0)
        return x.to(tl.float32) * s.to(tl.float32)[:, None]
    elif KIND == 2:
        return x.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        return x.to(tl.float32)


@triton.jit
def _load_kv_tile(
    k_ptr, v_ptr, ks_ptr, vs_ptr, table_row_ptr, offs_n, mask_n, head, offs_d, mask_d,
    stride_tok, stride_head, s_tok, s_head, BS: tl.constexpr, KIND: tl.constexpr,
):  # fmt: skip
    """K and V of token positions ``offs_n`` of one sequence (its block table row), in float32."""
    blk = tl.load(table_row_ptr + offs_n // BS, mask=mask_n, other=0)
    slots = blk * BS + offs_n % BS
    k = _load_kv(
        k_ptr, ks_ptr, slots, head, offs_d, mask_n, mask_d, stride_tok, stride_head, s_tok, s_head, KIND
    )
    v = _load_kv(
        v_ptr, vs_ptr, slots, head, offs_d, mask_n, mask_d, stride_tok, stride_head, s_tok, s_head, KIND
    )
    return k, v


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One tile of online softmax: scores ``s`` (masked with -inf) against the running max and
    sum of every row. Returns the tile's weights, the factor that rescales what was accumulated
    so far, and the new max and sum. Rows with nothing unmasked yet stay at zero weight."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr, lens_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_tok, stride_head, s_tok, s_head, stride_tb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    scale, HEAD_DIM, SPLIT_TOKENS, WINDOW,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BS: tl.constexpr, KIND: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    start = split * SPLIT_TOKENS
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)
    q = q * scale
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, BLOCK_D), tl.float32)
    end = tl.minimum(start + SPLIT_TOKENS, ctx)
    if WINDOW > 0:  # sliding window: the query (position ctx - 1) sees keys after ctx - 1 - WINDOW
        start = tl.maximum(start, ctx - WINDOW)
    for t0 in range(start, end, BLOCK_N):
        offs_n = t0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k, v = _load_kv_tile(
            k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr + b * stride_tb, offs_n, mask_n, kvh, offs_d, mask_d,
            stride_tok, stride_head, s_tok, s_head, BS, KIND,
        )  # fmt: skip
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_N]
        p, alpha, m_i, l_i = _softmax_step(tl.where(mask_n[None, :], s, float("-inf")), m_i, l_i)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_g[:, None] & mask_d[None, :],
    )
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=mask_g)


@triton.jit
def _merge_kernel(
    part_ptr, lse_ptr, out_ptr, NUM_SPLITS, HEAD_DIM,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    SPLITS_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(mask_s, tl.exp(lse - m), 0.0)
    part = tl.load(
        part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def paged_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    split_tokens: int | None = None,
    window: int = 0,
) -> torch.Tensor:
    """``query [B, num_heads, head_dim]`` against each sequence's blocks -> ``[B, num_heads, head_dim]``.

    ``split_tokens``: context tokens per split (None: one split when the batch fills the
    device, else splits of 512 tokens). ``window > 0``: sliding-window attention (a query at
    position p sees keys p - window < k <= p), as Mistral-style models use.
    """
    b, nh, hd = query.shape
    _, bs, kvh, _ = k_cache.shape
    group = nh // kvh
    block_n, warps = _tiles(hd)
    max_len = int(context_lens.max()) if b else 0
    if split_tokens is None:
        split_tokens = max_len if b * kvh >= 128 or max_len <= 512 else 512
    split_tokens = max(block_n, triton.cdiv(split_tokens, block_n) * block_n)
    num_splits = max(1, triton.cdiv(max_len, split_tokens))
    out = torch.empty_like(query)
    part = (
        out.view(b, nh, 1, hd)
        if num_splits == 1
        else torch.empty(b, nh, num_splits, hd, dtype=torch.float32, device=query.device)
    )
    lse = torch.empty(b, nh, num_splits, dtype=torch.float32, device=query.device)
    ks = k_scale if k_scale is not None else k_cache
    vs = v_scale if v_scale is not None else v_cache
    kind = kv_kind(k_cache)
    s_tok, s_head = (ks.stride(1), ks.stride(2)) if k_scale is not None else (0, 0)
    k_flat_tok, k_head = k_cache.stride(1), k_cache.stride(2)
    _decode_kernel[(b, kvh, num_splits)](
        query, k_cache, v_cache, ks, vs, block_tables, context_lens, part, lse,
        query.stride(0), query.stride(1), k_flat_tok, k_head, s_tok, s_head, block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        scale, hd, split_tokens, window,
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_D=triton.next_power_of_2(hd),
        BLOCK_N=block_n, BS=bs, KIND=kind, num_warps=warps, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        _merge_kernel[(b, nh)](
            part, lse, out, num_splits, hd,
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
            SPLITS_PAD=triton.next_power_of_2(num_splits), BLOCK_D=triton.next_power_of_2(hd),
        )  # fmt: skip
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, table_ptr,
    tile_chunk_ptr, tile_row_ptr, chunk_qstart_ptr, chunk_qlen_ptr, chunk_ctx_ptr,
    stride_qt, stride_qh, stride_tok, stride_head, s_tok, s_head, stride_tc, stride_ot, stride_oh,
    scale, HEAD_DIM, WINDOW,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BS: tl.constexpr, KIND: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // GROUP
    c = tl.load(tile_chunk_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)  # first query of this tile, counted within the chunk
    q_start = tl.load(chunk_qstart_ptr + c)
    q_len = tl.load(chunk_qlen_ptr + c)
    ctx = tl.load(chunk_ctx_ptr + c)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q_pos = ctx - q_len + offs_m  # absolute positions of the queries
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)
    q = q * scale
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    last = tl.minimum(ctx, ctx - q_len + row0 + BLOCK_M)  # keys past the tile's last query are masked anyway
    first = ctx * 0
    if WINDOW > 0:
        first = tl.maximum(0, ctx - q_len + row0 - WINDOW + 1)
    for t0 in range(first, last, BLOCK_N):
        offs_n = t0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < last
        k, v = _load_kv_tile(
            k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr + c * stride_tc, offs_n, mask_n, kvh, offs_d, mask_d,
            stride_tok, stride_head, s_tok, s_head, BS, KIND,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N], float32 operands (exact in the interpreter)
        causal = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        if WINDOW > 0:
            causal = causal & (offs_n[None, :] > q_pos[:, None] - WINDOW)
        p, alpha, m_i, l_i = _softmax_step(tl.where(causal, s, float("-inf")), m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p, v)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def paged_prefill(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunks: list[tuple[int, int, int]],
    block_tables: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Extend attention for the packed prefill chunks ``(query_start, query_len, context_len)``,
    whose K/V are already in the cache; ``block_tables[i]``: chunk ``i``'s blocks (padded).
    Writes the rows of ``out`` (``[num_tokens, num_heads, head_dim]``) those chunks own."""
    _, nh, hd = query.shape
    _, bs, kvh, _ = k_cache.shape
    block_m = 16
    block_n, warps = _tiles(hd)
    tile_chunk, tile_row = [], []
    for i, (_, qlen, _) in enumerate(chunks):
        for r in range(0, qlen, block_m):
            tile_chunk.append(i)
            tile_row.append(r)
    dev = query.device

    def ints(xs):
        return torch.tensor(xs, dtype=torch.int32, device=dev)

    if out is None:
        out = torch.empty_like(query)
    ks = k_scale if k_scale is not None else k_cache
    vs = v_scale if v_scale is not None else v_cache
    s_tok, s_head = (ks.stride(1), ks.stride(2)) if k_scale is not None else (0, 0)
    _prefill_kernel[(len(tile_chunk), nh)](
        query, k_cache, v_cache, ks, vs, out, block_tables,
        ints(tile_chunk), ints(tile_row), ints([c[0] for c in chunks]), ints([c[1] for c in chunks]),
        ints([c[2] for c in chunks]),
        query.stride(0), query.stride(1), k_cache.stride(1), k_cache.stride(2), s_tok, s_head,
        block_tables.stride(0), out.stride(0), out.stride(1),
        scale, hd, window,
        GROUP=nh // kvh, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(hd), BS=bs,
        KIND=kv_kind(k_cache), num_warps=warps, num_stages=2,
    )  # fmt: skip
    return out


@triton.jit
def _e4m3_bits(x):
    """float32 -> float8 e4m3fn bit patterns (as int32), round to nearest even, |x| <= 448.

    Done with integer arithmetic rather than a dtype cast so that it is exact and the same on
    every device and in the interpreter (whose float8 casts do not round like a GPU's).
    """
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    exp = (a >> 23) - 127 + 7  # e4m3 biased exponent
    mant = a & 0x7FFFFF
    m3 = mant >> 20
    rem = mant & 0xFFFFF
    up = (rem > 0x80000) | ((rem == 0x80000) & ((m3 & 1) == 1))
    normal = (exp << 3) + m3 + up.to(tl.int32)  # a mantissa carry moves into the exponent
    # below 2**-6: subnormal steps of 2**-9, rounded half to even
    f = tl.abs(x) * 512.0
    fl = tl.floor(f)
    r = f - fl
    fi = fl.to(tl.int32)
    sub = fi + ((r > 0.5) | ((r == 0.5) & ((fi & 1) == 1))).to(tl.int32)
    return sign | tl.where(exp >= 1, normal, sub)


@triton.jit
def _write_kv_kernel(
    x_ptr, cache_ptr, scale_ptr, slot_ptr, stride_xt, stride_xh, stride_tok, stride_head, s_tok, s_head,
    HEAD_DIM, BLOCK_D: tl.constexpr, KIND: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < HEAD_DIM
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + offs_d, mask=mask, other=0.0).to(tl.float32)
    dst = cache_ptr + slot * stride_tok + h * stride_head + offs_d
    if KIND == 1:
        s = tl.maximum(tl.max(tl.abs(x), axis=0) / 127.0, 1e-8)
        s16 = s.to(tl.float16, fp_downcast_rounding="rtne")
        codes = x / s16.to(tl.float32)
        codes = tl.minimum(tl.maximum(codes, -127.0), 127.0)
        fl = tl.floor(codes)  # round half to even, as torch.round
        r = codes - fl
        odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
        codes = fl + tl.where((r > 0.5) | ((r == 0.5) & odd), 1.0, 0.0)
        tl.store(dst, codes.to(tl.int8), mask=mask)
        tl.store(scale_ptr + slot * s_tok + h * s_head, s16)
    elif KIND == 2:
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        tl.store(dst, _e4m3_bits(x).to(tl.uint8), mask=mask)
    elif cache_ptr.dtype.element_ty == tl.float32:
        tl.store(dst, x, mask=mask)
    else:
        tl.store(dst, x.to(cache_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    t, kvh, hd = key.shape
    if t == 0:
        return
    kind = kv_kind(k_cache)
    for x, cache, sc in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        scale_t = sc if sc is not None else cache
        s_tok, s_head = (sc.stride(1), sc.stride(2)) if sc is not None else (0, 0)
        _write_kv_kernel[(t, kvh)](
            x, cache, scale_t, slot_mapping, x.stride(0), x.stride(1), cache.stride(1), cache.stride(2),
            s_tok, s_head, hd, BLOCK_D=triton.next_power_of_2(hd), KIND=kind,
        )  # fmt: skip


@triton.jit
def _copy_blocks_kernel(
    cache_ptr, src_ptr, dst_ptr, stride_layer, stride_block, BLOCK_ELEMS, BLOCK: tl.constexpr
):
    pair = tl.program_id(0)
    layer = tl.program_id(1)
    chunk = tl.program_id(2)
    src = tl.load(src_ptr + pair)
    dst = tl.load(dst_ptr + pair)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < BLOCK_ELEMS
    base = cache_ptr + layer * stride_layer
    x = tl.load(base + src * stride_block + offs, mask=mask)
    tl.store(base + dst * stride_block + offs, x, mask=mask)


def copy_blocks(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_dim: int) -> None:
    """``cache[..., src[i], ...] -> [..., dst[i], ...]`` along ``block_dim``, for every leading index.

    The copies run concurrently, so a block must not be both a source and a destination
    (the caller checks; the torch op, which gathers first, handles that case)."""
    lead = 1
    for d in cache.shape[:block_dim]:
        lead *= d
    view = cache.reshape(lead, cache.shape[block_dim], -1)
    elems = view.shape[2]
    block = 1024 if not INTERPRET else 256
    _copy_blocks_kernel[(src.numel(), lead, triton.cdiv(elems, block))](
        view, src, dst, view.stride(0), view.stride(1), elems, BLOCK=block
    )
