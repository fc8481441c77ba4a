"""Paged attention and KV writes in native PyTorch: the reference on every device and the CPU path.

Cache layout, per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]`` for K and for V.
A token at position ``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size
+ p % block_size`` of the flattened ``[num_blocks * block_size, num_kv_heads, head_dim]`` view.

The packed batch of one step holds the decode tokens first (one query per sequence), then the
prefill chunks (several queries per sequence). On CPUs one native kernel
(:func:`pagedq.kernels.native.paged_attention`) attends the whole step from the blocks in
place, whatever the cache's storage type. The torch path (the reference, and elsewhere) runs the
decodes as one batched attention over their gathered blocks and each prefill chunk as one
causal attention — a step has few prefill chunks and many decodes, so that split keeps the hot
path free of per-sequence loops.

Quantized KV cache, told apart by the cache tensor's dtype:

* ``int8``: codes ``round(x / s)`` with one float16 scale ``s = max|x| / 127`` per token and
  KV head, kept in ``k_scale`` / ``v_scale`` (``[num_blocks, block_size, num_kv_heads]``);
* ``uint8``: the bits of float8 e4m3 values (``x`` clamped to +-448, no scale; torch's CPU
  ``index_copy_`` does not take float8 tensors, so the cache holds their bytes).

Reads dequantize the gathered blocks to the query's dtype; a fresh prompt attends to its own
unquantized K/V, as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import native


@dataclass
class PrefillChunk:
    """One sequence's chunk of new tokens in the packed batch."""

    query_start: int  # index of its first token in the packed batch
    query_len: int  # new tokens in this chunk
    context_len: int  # tokens in the cache once this chunk is written (cached prefix + chunk)
    block_table: torch.Tensor | None  # [num_blocks] int64; None when the chunk is the whole context
    block_ids: list[int] | None = None  # the sequence's blocks (the Triton path reads every chunk from them)


@dataclass
class AttentionMetadata:
    """What every attention layer of one step needs; built once per step by the model runner."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    num_decode_tokens: int = 0
    decode_block_ids: torch.Tensor | None = None  # [num_decodes * max_blocks] int64 block ids to gather
    decode_max_blocks: int = 0
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_blocks * block_size] bool
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] int64
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Reused gather buffer for decode K/V: fresh multi-MB allocations page-fault on every
    # call (glibc hands them back to the OS), which costs more than the gather itself.
    workspace: dict = field(default_factory=dict)
    backend: str = "torch"  # "triton": the kernels of kernels/triton_attention.py
    prefill_tables: torch.Tensor | None = None  # Triton: padded block tables of the prefill chunks
    # The native CPU kernel: the step's sequences it serves — decodes, chunks after a cached
    # context and, with ``native_prompts``, fresh prompts too (else SDPA attends those to their
    # own unquantized K/V); None elsewhere
    native_prompts: bool = False
    block_tables: torch.Tensor | None = None  # [n, max_blocks] int64, padded with block 0
    query_start: torch.Tensor | None = None  # [n] int64: each sequence's first row
    query_lens: torch.Tensor | None = None  # [n] int64: and its number of rows
    context_lens: torch.Tensor | None = None  # [n] int64: keys in the cache, new ones included
    # Fresh prompts the native kernel does not serve: [p] int64 first rows and lengths, for
    # native.prompt_attention (bf16 on an AMX CPU), which attends them all in one call
    prompt_starts: torch.Tensor | None = None
    prompt_lens: torch.Tensor | None = None

    @property
    def decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block ids, context lengths, mask) of the decode rows: set whenever there are any."""
        ids, lens, mask = self.decode_block_ids, self.decode_context_lens, self.decode_mask
        if ids is None or lens is None or mask is None:
            raise ValueError("this step has no decode rows")
        return ids, lens, mask


FP8_MAX = 448.0  # largest finite float8 e4m3fn value


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x [T, kvh, hd]`` as the cache stores it: (codes, per-token-head scales or None)."""
    if cache_dtype == torch.int8:
        scale = (x.abs().amax(dim=-1).float() / 127.0).clamp(min=1e-8).to(torch.float16)
        codes = torch.round(x.float() / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
        return codes, scale
    if cache_dtype == torch.uint8:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8), None
    return x.to(cache_dtype), None


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_kv`; ``scale`` has the shape of ``codes`` without the last dim."""
    if codes.dtype == torch.int8:
        if scale is None:
            raise ValueError("an int8 KV cache needs its scales")
        return (codes.float() * scale.float()[..., None]).to(dtype)
    if codes.dtype == torch.uint8:
        return codes.view(torch.float8_e4m3fn).to(dtype)
    return codes.to(dtype)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write new K/V ``[num_tokens, num_kv_heads, head_dim]`` into their cache slots."""
    kvh, hd = key.shape[-2:]
    for x, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        codes, s = quantize_kv(x, cache.dtype)
        cache.view(-1, kvh, hd).index_copy_(0, slot_mapping, codes)
        if s is not None and scale is not None:
            scale.view(-1, kvh).index_copy_(0, slot_mapping, s)


def copy_blocks(
    cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_dim: int = 0, backend: str = "torch"
) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` along ``block_dim`` in one batched op (copy on write).

    Given the engine's single ``[layers, 2, num_blocks, ...]`` KV tensor and ``block_dim=2``,
    one call copies the blocks of every layer's K and V. All sources are read before any
    destination is written (a block may be a source and, of another pair, a destination);
    the Triton kernel copies concurrently, so it only takes batches where no block is both.
    """
    if backend == "triton" and cache.is_contiguous() and not set(src.tolist()) & set(dst.tolist()):
        from . import triton_attention

        triton_attention.copy_blocks(cache, src, dst, block_dim)
        return
    cache.index_copy_(block_dim, dst, cache.index_select(block_dim, src))


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, workspace: dict, name: str) -> torch.Tensor:
    flat = cache.view(cache.shape[0], -1)
    shape = (block_ids.numel(), flat.shape[1])
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != flat.dtype or buf.device != flat.device:
        buf = torch.empty(shape, dtype=flat.dtype, device=flat.device)
        workspace[name] = buf
    return torch.index_select(flat, 0, block_ids, out=buf)


def paged_attention_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """One query token per sequence against its blocks. ``query``: [B, num_heads, head_dim].

    On CPU the native kernel reads the blocks in place; elsewhere (and as the reference) the
    blocks are gathered into a reused buffer and attended with one batched SDPA call.
    """
    if native.supports(query, k_cache):
        ids, lens, _ = meta.decode
        b = query.shape[0]
        starts, ones = torch.arange(b, dtype=torch.long), torch.ones(b, dtype=torch.long)
        tables = ids.view(b, meta.decode_max_blocks)
        return native.paged_attention(
            query, k_cache, v_cache, tables, starts, ones, lens, scale, k_scale, v_scale, window
        )
    return paged_attention_decode_torch(query, k_cache, v_cache, meta, scale, k_scale, v_scale, window)


def paged_attention_decode_torch(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    b, nh, hd = query.shape
    _, bs, kvh, _ = k_cache.shape
    ctx = meta.decode_max_blocks * bs
    block_ids, lens, mask = meta.decode
    if window:  # the query at position len - 1 sees keys after len - 1 - window
        first = (lens - window).view(b, 1, 1, 1)
        mask = mask & (torch.arange(ctx, device=query.device).view(1, 1, 1, ctx) >= first)
    kv = []
    for name, cache, sc in (("k", k_cache, k_scale), ("v", v_cache, v_scale)):
        x = _gather_blocks(cache, block_ids, meta.workspace, name).view(b, ctx, kvh, hd)
        if cache.dtype != query.dtype:
            s = None if sc is None else sc.index_select(0, block_ids).view(b, ctx, kvh)
            x = dequantize_kv(x, s, query.dtype)
        kv.append(x.transpose(1, 2))
    # GQA without repeating K/V: the query heads of one KV head act as that head's query rows.
    q = query.view(b, kvh, nh // kvh, hd)
    out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, scale=scale)
    return out.reshape(b, nh, hd)


def paged_attention_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Causal attention of one chunk's queries ``[L, num_heads, head_dim]`` over its context
    (for a sliding-window layer, only keys after ``position - window``).

    When the chunk is the whole context (a fresh prompt), the new K/V are used as they are;
    otherwise (a chunked prefill continuing, or a cached prefix) the context is read from the
    sequence's blocks and the mask is causal with the chunk's offset.
    """
    L, nh, hd = query.shape
    kvh = key.shape[1]
    q = query.transpose(0, 1).unsqueeze(0)  # [1, nh, L, hd]
    if chunk.block_table is None and (not window or window >= L):
        k = key.transpose(0, 1).unsqueeze(0)
        v = value.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=nh != kvh)
    elif chunk.block_table is None:  # a fresh prompt longer than the window
        k = key.transpose(0, 1).unsqueeze(0)
        v = value.transpose(0, 1).unsqueeze(0)
        pos = torch.arange(L, device=query.device)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=nh != kvh)
    else:
        ctx = chunk.context_len
        kv = []
        for cache, sc in ((k_cache, k_scale), (v_cache, v_scale)):
            x = cache.index_select(0, chunk.block_table).view(-1, kvh, hd)[:ctx]
            if cache.dtype != query.dtype:
                s = None if sc is None else sc.index_select(0, chunk.block_table).view(-1, kvh)[:ctx]
                x = dequantize_kv(x, s, query.dtype)
            kv.append(x.transpose(0, 1).unsqueeze(0))
        start = ctx - L
        q_pos = torch.arange(start, ctx, device=query.device)[:, None]
        k_pos = torch.arange(ctx, device=query.device)[None, :]
        mask = k_pos <= q_pos
        if window:
            mask = mask & (k_pos > q_pos - window)
        out = F.scaled_dot_product_attention(
            q, kv[0], kv[1], attn_mask=mask, scale=scale, enable_gqa=nh != kvh
        )
    return out.squeeze(0).transpose(0, 1)  # [L, nh, hd]


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int = 0,
    cached: bool = False,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend. Shapes: ``[num_tokens, heads, head_dim]``.

    ``k_scale`` / ``v_scale``: the per-token scales of an int8 cache (None otherwise);
    ``window``: the layer's sliding window (0: full causal attention); ``cached``: K/V are
    already in the cache (``native.rope_cache`` wrote them with the rotation).
    """
    if meta.backend == "triton":
        return _paged_attention_triton(
            query, key, value, k_cache, v_cache, meta, scale, k_scale, v_scale, window
        )
    if not cached:
        reshape_and_cache(key, value, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
    if meta.block_tables is not None and native.supports(query, k_cache):
        return _paged_attention_native(
            query, key, value, k_cache, v_cache, meta, scale, k_scale, v_scale, window
        )
    nd = meta.num_decode_tokens
    if not meta.prefills:
        return paged_attention_decode(query, k_cache, v_cache, meta, scale, k_scale, v_scale, window)
    out = torch.empty_like(query)
    if nd:
        out[:nd] = paged_attention_decode(query[:nd], k_cache, v_cache, meta, scale, k_scale, v_scale, window)
    for chunk in meta.prefills:
        s, e = chunk.query_start, chunk.query_start + chunk.query_len
        out[s:e] = paged_attention_prefill(
            query[s:e], key[s:e], value[s:e], k_cache, v_cache, chunk, scale, k_scale, v_scale, window
        )
    return out


def _paged_attention_native(
    query, key, value, k_cache, v_cache, meta, scale, k_scale, v_scale, window
) -> torch.Tensor:
    """The CPU kernel for every row of the step that reads the cache. Fresh prompts attend to
    their own K/V (at full precision, whatever the cache holds): in the same kernel over a cache
    of the model's dtype in float32 (faster than torch's flash SDPA up to 512 tokens: one
    prompt, 2 threads, 0.15 vs 0.23 ms at 64 tokens, 6.4 vs 6.9 ms at 512), in bf16 on an AMX
    CPU all in one call of native.prompt_attention, else in torch's SDPA one by one."""
    assert meta.block_tables is not None
    assert meta.query_start is not None
    assert meta.query_lens is not None
    assert meta.context_lens is not None
    out = torch.empty_like(query)
    if meta.query_start.numel():
        native.paged_attention(
            query, k_cache, v_cache, meta.block_tables, meta.query_start, meta.query_lens,
            meta.context_lens, scale, k_scale, v_scale, window, out=out,
        )  # fmt: skip
    if meta.native_prompts:
        return out
    if meta.prompt_starts is not None and native.prompt_attention_supports(query, key, value):
        assert meta.prompt_lens is not None
        native.prompt_attention(query, key, value, meta.prompt_starts, meta.prompt_lens, scale, window, out)
        return out
    for chunk in meta.prefills:
        if chunk.block_table is None:
            s, e = chunk.query_start, chunk.query_start + chunk.query_len
            out[s:e] = paged_attention_prefill(
                query[s:e], key[s:e], value[s:e], k_cache, v_cache, chunk, scale, k_scale, v_scale, window
            )
    return out


def _paged_attention_triton(
    query, key, value, k_cache, v_cache, meta, scale, k_scale, v_scale, window=0
) -> torch.Tensor:
    from . import triton_attention as ta

    ta.reshape_and_cache(key, value, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
    out = torch.empty_like(query)
    nd = meta.num_decode_tokens
    if nd:
        ids, lens, _ = meta.decode
        out[:nd] = ta.paged_decode(
            query[:nd],
            k_cache,
            v_cache,
            ids.view(nd, meta.decode_max_blocks),
            lens,
            scale,
            k_scale,
            v_scale,
            window=window,
        )
    if meta.prefills:
        if meta.prefill_tables is None:
            raise ValueError(
                "the Triton prefill needs meta.prefill_tables (the model runner's prepare builds them)"
            )
        chunks = [(c.query_start, c.query_len, c.context_len) for c in meta.prefills]
        ta.paged_prefill(
            query,
            k_cache,
            v_cache,
            chunks,
            meta.prefill_tables,
            scale,
            k_scale,
            v_scale,
            out=out,
            window=window,
        )
    return out
