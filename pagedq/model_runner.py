"""Turns one scheduled step into tensors and runs the model once over the whole packed batch.

Its input is the scheduler's :class:`~pagedq.scheduler.SchedulerOutput` and nothing else: per
scheduled sequence the new token ids, their positions, the block table and whether a token is
sampled, plus the step's copy-on-write block copies. The packed batch puts the one-token
queries (decodes) first and the prefill chunks after them; :meth:`ModelRunner.prepare` sets
for every token the position and the cache slot its K/V go to (the slot mapping), and for the
decodes the block ids to gather and the context mask — built once per step, shared by all layers.
"""

from __future__ import annotations

import itertools
import logging

import torch

from pagedq.kernels import AttentionMetadata, PrefillChunk, copy_blocks, cpu_linear, native

from .models import ModelConfig, load_model
from .scheduler import ScheduledSeq, SchedulerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model_dir: str,
        model_config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        block_size: int,
        quantization: str | None = None,
        kv_cache_dtype: str = "auto",
    ):
        self.model_config = model_config
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        # storage dtype of the KV cache: the model dtype, int8 codes (+ scales) or fp8 bytes
        self.kv_storage_dtype = {"auto": dtype, "int8": torch.int8, "fp8_e4m3": torch.uint8}[kv_cache_dtype]
        self._kv_scales: torch.Tensor | None = None
        from pagedq.kernels.backend import backend

        self.backend = backend(device)
        self.model = load_model(model_dir, model_config, dtype, device, max_model_len, quantization)
        if device.type == "cpu":  # weights laid out once for the CPU's GEMM (kernels/cpu_linear.py)
            self.model.pack_weights()
        # CPU steps attend through the native kernel (kernels/csrc/paged_attention_cpu.c); asked
        # after the weights load, so that a cold start compiles it meanwhile (native.start_build)
        self.native_attention = (
            device.type == "cpu" and self.backend == "torch" and native.library() is not None
        )
        # fresh prompts too, when the cache holds K/V at the model's precision, unless they are
        # bf16 on a CPU with native bf16 dot products (AVX-512 BF16, AMX): torch's flash SDPA
        # runs those from their own K/V 3.6-4x faster (2-core Xeon with AMX, one causal prompt
        # of 9 query / 3 KV heads of 64: 512 tokens 2.0 vs 8.1 ms, 256: 0.61 vs 2.19); in
        # float32 (and bf16 packed as float32, AVX2) the kernel is the faster one
        self.native_prompts = (
            self.native_attention
            and kv_cache_dtype == "auto"
            and not (dtype == torch.bfloat16 and cpu_linear.bf16_native())
        )
        self.kv_caches: list[tuple[torch.Tensor, ...]] = []
        self._kv_storage: torch.Tensor | None = None
        self._workspace: dict = {}

    @property
    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for p in list(self.model.parameters()) + list(self.model.buffers()):
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total + self.model.packed_bytes()

    def block_bytes(self) -> int:
        cfg = self.model_config
        per_token = cfg.kv_bytes_per_token(self.kv_storage_dtype)
        if self.kv_storage_dtype == torch.int8:  # one float16 scale per token, KV head, K and V
            per_token += 2 * cfg.num_layers * cfg.num_kv_heads * 2
        return per_token * self.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One tensor for all layers' K and V.

        Slots that hold no token are masked in attention, but a mask cannot hide NaN bit
        patterns (0 * NaN = NaN), so every block must be zeroed before its first use. Zeroing
        a multi-GiB pool up front costs seconds of start-up; instead blocks are zeroed when
        a block id above the high-water mark is first handed out (see :meth:`_zero_new_blocks`).
        """
        cfg = self.model_config
        shape = (cfg.num_layers, 2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self._kv_storage = torch.empty(shape, dtype=self.kv_storage_dtype, device=self.device)
        self._zeroed_blocks = 0
        if self.kv_storage_dtype == torch.int8:
            self._kv_scales = torch.empty(shape[:-1], dtype=torch.float16, device=self.device)
            sc = self._kv_scales
            self.kv_caches = [
                (self._kv_storage[i, 0], self._kv_storage[i, 1], sc[i, 0], sc[i, 1])
                for i in range(cfg.num_layers)
            ]
        else:
            self.kv_caches = [(self._kv_storage[i, 0], self._kv_storage[i, 1]) for i in range(cfg.num_layers)]

    @property
    def kv_storage(self) -> torch.Tensor:
        """The one tensor of every layer's K and V (after :meth:`allocate_kv_cache`)."""
        if self._kv_storage is None:
            raise RuntimeError("the KV cache is not allocated (or was released)")
        return self._kv_storage

    def _zero_new_blocks(self, batch: list[ScheduledSeq]) -> None:
        top = max((max(item.block_table) for item in batch if item.block_table), default=-1) + 1
        if top > self._zeroed_blocks:
            self.kv_storage[:, :, self._zeroed_blocks : top].zero_()
            if self._kv_scales is not None:
                self._kv_scales[:, :, self._zeroed_blocks : top].zero_()
            self._zeroed_blocks = top

    def release(self) -> None:
        """Drop the weights, the cache and every buffer this runner holds."""
        self.kv_caches = []
        self._kv_storage = None
        self._kv_scales = None
        self._workspace = {}
        self.model = None

    # --- one step ----------------------------------------------------------------------------

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Packed input ids, positions and attention metadata. ``batch``: decodes first."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for item in batch:
            n, start, table = item.num_new_tokens, item.start, item.block_table
            input_ids.extend(item.token_ids)
            positions.extend(item.positions)
            if n == 1:
                slots.append(table[start // bs] * bs + start % bs)
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
                bt = torch.tensor(table, dtype=torch.long) if start > 0 else None
                prefills.append(PrefillChunk(len(input_ids) - n, n, start + n, bt, table))
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode_tokens=len(decode_lens),
            prefills=prefills,
            workspace=self._workspace,
            backend=self.backend,
        )
        for p in prefills:
            if p.block_table is not None:
                p.block_table = p.block_table.to(dev)
        if prefills and self.backend == "triton":  # padded block tables of the chunks, for every layer
            padded, _ = _pad_tables([p.block_ids or [] for p in prefills])
            meta.prefill_tables = torch.tensor(padded, dtype=torch.int32, device=dev)
        if self.native_attention:  # one kernel call per layer for every row that reads the cache
            starts = list(itertools.accumulate((item.num_new_tokens for item in batch), initial=0))
            cached = [
                i
                for i, item in enumerate(batch)
                if self.native_prompts or item.num_new_tokens == 1 or item.start > 0
            ]
            meta.native_prompts = self.native_prompts
            padded, _ = _pad_tables([batch[i].block_table for i in cached]) if cached else ([[0]], 1)
            meta.block_tables = torch.tensor(padded, dtype=torch.long)
            meta.query_start = torch.tensor([starts[i] for i in cached], dtype=torch.long)
            meta.query_lens = torch.tensor([batch[i].num_new_tokens for i in cached], dtype=torch.long)
            meta.context_lens = torch.tensor(
                [batch[i].start + batch[i].num_new_tokens for i in cached], dtype=torch.long
            )
            fresh = [(p.query_start, p.query_len) for p in prefills if p.block_table is None]
            if fresh and not self.native_prompts:
                meta.prompt_starts = torch.tensor([f[0] for f in fresh], dtype=torch.long)
                meta.prompt_lens = torch.tensor([f[1] for f in fresh], dtype=torch.long)
        if decode_lens:
            padded, max_blocks = _pad_tables(decode_tables)
            meta.decode_block_ids = torch.tensor(padded, dtype=torch.long, device=dev).view(-1)
            meta.decode_max_blocks = max_blocks
            lens = torch.tensor(decode_lens, dtype=torch.long, device=dev)
            meta.decode_context_lens = lens
            meta.decode_mask = (torch.arange(max_blocks * bs, device=dev)[None, :] < lens[:, None]).view(
                len(decode_lens), 1, 1, max_blocks * bs
            )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos, meta

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput, logit_rows: list[int]) -> torch.Tensor:
        """Do the step's copy-on-write block copies, run the model over its packed batch and
        return logits of the packed rows ``logit_rows``, in the model's dtype: their readers
        widen them where they compute (the sampler's plain greedy rows never need to; a
        [64, 49152] block in float32 is a 12 MB copy per decode step)."""
        batch, copies = step.scheduled, step.block_copies
        self._zero_new_blocks(batch)
        if copies:
            src = torch.tensor([c[0] for c in copies], dtype=torch.long, device=self.device)
            dst = torch.tensor([c[1] for c in copies], dtype=torch.long, device=self.device)
            copy_blocks(self.kv_storage, src, dst, block_dim=2, backend=self.backend)
            if self._kv_scales is not None:
                copy_blocks(self._kv_scales, src, dst, block_dim=2, backend=self.backend)
        ids, pos, meta = self.prepare(batch)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))


def _pad_tables(tables: list[list[int]]) -> tuple[list[list[int]], int]:
    """Block tables padded with block 0 to the longest one (masked out by the context lengths),
    and that width."""
    width = max(len(t) for t in tables)
    return [t + [0] * (width - len(t)) for t in tables], width
