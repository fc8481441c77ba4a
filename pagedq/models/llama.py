"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache.

One implementation; the family members differ only in the traits their classes declare
(QKV bias for Qwen2, per-head q/k RMSNorm for Qwen3, when a sliding window applies) and in
switches of :class:`ModelConfig` (rope scaling for Llama 3). Each class also declares how
checkpoint linears pack into its fused parameters and which linears are quantizable
(:data:`LLAMA_LINEARS`); :mod:`pagedq.models.registry` lists the classes. Q, K and V
are one fused projection and so are gate and up: fewer, larger matmuls per layer. The
numerics follow transformers' modeling code step for step (RMSNorm in float32, rope tables in
float32 cast to the model dtype) so that float32 runs agree with it token for token.

The forward pass takes the packed tokens of one scheduler step (prefill chunks and decodes
together) and returns hidden states; logits are computed only for the rows that need them.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pagedq.kernels import AttentionMetadata, cpu_linear, native, paged_attention

from .config import ArchTraits, LinearGroup, ModelConfig

# The linears of a Llama-style decoder layer: Q, K and V fused into one projection, gate and up
# into another (fewer, larger matmuls per layer).
LLAMA_LINEARS = (
    LinearGroup("self_attn", ("q_proj", "k_proj", "v_proj"), fused="qkv_proj", feeds="input_layernorm"),
    LinearGroup("self_attn", ("o_proj",)),
    LinearGroup("mlp", ("gate_proj", "up_proj"), fused="gate_up_proj", feeds="post_attention_layernorm"),
    LinearGroup("mlp", ("down_proj",), feeds="mlp.up_proj"),
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.elementwise_supports(x, self.weight):
            return native.add_rms_norm(x, None, self.weight, self.eps)[1]
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, self(x + delta))``: the residual add and the norm in one pass on CPUs."""
        if native.elementwise_supports(x, self.weight) and delta.is_contiguous():
            return native.add_rms_norm(x, delta, self.weight, self.eps)
        res = x + delta
        return res, self(res)


class Linear(nn.Module):
    """A plain dense layer; quantized formats replace it with a module of the same call shape.

    On a CPU the engine packs it once loaded (:meth:`pack`, :mod:`pagedq.kernels.cpu_linear`):
    the plain weight is then dropped, and :meth:`set_weight` is how a weight is changed.
    """

    weight: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: cpu_linear.PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return cpu_linear.linear(x, self.packed)
        if self.weight is None:
            raise RuntimeError("this layer holds no weight")
        return F.linear(x, self.weight, self.bias)

    def pack(self) -> bool:
        """Pack the weight for this CPU and drop the plain copy; False where nothing is packed."""
        if self.packed is None and self.weight is not None:
            packed = cpu_linear.pack(self.weight, self.bias)
            if packed is not None:
                self.packed, self.weight, self.bias = packed, None, None
        return self.packed is not None

    def set_weight(self, weight: torch.Tensor) -> None:
        """Replace the weight ``[out, in]`` (repacked where the layer is packed)."""
        if self.packed is None:
            if self.weight is None:
                raise RuntimeError("this layer holds no weight")
            self.weight.data.copy_(weight)
            return
        old = self.packed
        bias = None if old.bias is None else old.bias.to(old.dtype)
        self.packed = cpu_linear.pack(weight.to(old.dtype), bias)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with ``linear`` or ``llama3`` scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by position (the rotate-half convention of HF Llama)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict, dtype: torch.dtype):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, head_dim]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int = 0):
        super().__init__()
        self.window = window  # sliding window (0: full causal attention)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, ...],  # (k, v) or, for an int8 cache, (k, v, k_scale, v_scale)
        meta: AttentionMetadata,
        rope: RotaryEmbedding,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # on CPUs one native pass rotates Q and K in place and writes K/V to the cache (a cache
        # of the model's dtype, no per-head norm before the rotation)
        cached = (
            meta.backend == "torch"
            and self.q_norm is None
            and len(kv_cache) == 2
            and native.rope_cache_supports(qkv, rope.cos, kv_cache[0])
        )
        if cached:
            native.rope_cache(
                qkv, self.num_heads, self.num_kv_heads, positions, rope.cos, rope.sin,
                meta.slot_mapping, kv_cache[0], kv_cache[1],
            )  # fmt: skip
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if not cached:
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rope(positions, q, k)
        k_scale, v_scale = kv_cache[2:] if len(kv_cache) == 4 else (None, None)
        out = paged_attention(
            q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, k_scale, v_scale, self.window, cached
        )
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.gate_up_proj, self.down_proj
        rows = x.numel() // x.shape[-1]
        if (  # a bf16 model whose GEMMs run in float32: gate_up stays float32 into SiLU·mul,
            # whose bf16 values reach down_proj as float32 (no conversion on either side)
            isinstance(up, Linear)
            and isinstance(down, Linear)
            and up.packed is not None
            and down.packed is not None
            and x.dtype == torch.bfloat16
            and cpu_linear.float32_output(up.packed, rows)
            and cpu_linear.float32_output(down.packed, rows)
            and native.library() is not None
        ):
            gate_up = cpu_linear.linear(x, up.packed, keep_float32=True).contiguous()
            return down(native.silu_mul(gate_up, round_bf16=True))
        gate_up = up(x)
        if native.elementwise_supports(gate_up):
            return down(native.silu_mul(gate_up))
        gate, up_half = gate_up.split(self.intermediate_size, dim=-1)
        return down(F.silu(gate) * up_half)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg, window)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, kv_cache, meta, rope) -> torch.Tensor:
        h = self.self_attn(positions, self.input_layernorm(x), kv_cache, meta, rope)
        x, normed = self.post_attention_layernorm.add_forward(x, h)
        return x + self.mlp(normed)


@dataclass
class NativeStack:
    """The pointer table ``native.decoder_layers`` runs, and what it was built for: ``key``
    (packing generation, cache address, layer count, dtype); ``layers`` None where the model
    does not qualify; ``rows``, the most rows a step may have; ``attn``, a layer's attention
    (heads, head size, scale)."""

    key: tuple
    layers: ctypes.Array | None = None
    rows: int = 0
    attn: Attention | None = None
    quant: list[native.QuantPtrs] = field(default_factory=list)  # what ``layers`` points to, kept alive


class LlamaForCausalLM(nn.Module):
    # What the registry, the loader and the quantizers read (a subclass overrides what differs):
    hf_model_type = "llama"  # transformers' model_type (and its Config / ForCausalLM classes)
    traits = ArchTraits()
    linear_groups: tuple[LinearGroup, ...] = LLAMA_LINEARS
    layer_class: type[nn.Module] = DecoderLayer

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        windows = cfg.layer_windows or [0] * cfg.num_layers
        self.layers = nn.ModuleList(self.layer_class(cfg, windows[i]) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.packed_lm_head: cpu_linear.PackedWeight | None = None  # tied embeddings, packed
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype)
        self._stack: NativeStack | None = None  # the native decoder stack's pointers, once built

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, ...]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        if not self._native_stack(x, positions, kv_caches, meta):
            for layer, kv_cache in zip(self.layers, kv_caches):
                x = layer(positions, x, kv_cache, meta, self.rope)
        return self.norm(x)

    def _native_stack(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, ...]],
        meta: AttentionMetadata,
    ) -> bool:
        """Run every decoder layer in one native call (``native.decoder_layers``) where a step
        has few rows and this layer stack is exactly what the C code does: plain Llama layers
        whose dense weights cpu_linear keeps for few-row calls (panels, or AMX tiles for bf16 on
        an AMX CPU) or that are int8/int4 codes, a cache of the model's dtype, and every row
        attending through the native kernel or, for fresh bf16 prompts on an AMX CPU, through
        ``native.prompt_attention`` as the Python path does (a mixed step of decodes and new
        prompts). Updates ``x`` in place; False (nothing done) elsewhere. The tokens are the
        Python path's."""
        if (
            meta.backend != "torch"
            or meta.block_tables is None
            or not x.is_contiguous()
            or kv_caches[0][0].dtype != x.dtype
            or len(kv_caches[0]) != 2
        ):
            return False
        stack = self._stack_pointers(kv_caches, x.dtype)
        if stack.layers is None or stack.attn is None or x.shape[0] > stack.rows:
            return False
        cfg, attn = self.config, stack.attn
        bt, qs, ql, cl = meta.block_tables, meta.query_start, meta.query_lens, meta.context_lens
        if qs is None or ql is None or cl is None:
            return False
        step = (positions, meta.slot_mapping, bt, qs, ql, cl)
        prompts: tuple[torch.Tensor, ...] = ()  # (starts, lens) of the step's new prompts
        if not meta.native_prompts and any(c.block_table is None for c in meta.prefills):
            # their rows attend to their own K/V, as _paged_attention_native does
            ps, pl = meta.prompt_starts, meta.prompt_lens
            if (
                ps is None
                or pl is None
                or x.dtype != torch.bfloat16
                or not native.prompt_attention_fits(attn.num_heads, attn.num_kv_heads, attn.head_dim)
            ):
                return False
            prompts = (ps, pl)
        if not all(t.dtype == torch.int64 and t.is_contiguous() for t in (*step, *prompts)):
            return False
        args = native.StepArgs(
            x.shape[0], cfg.hidden_size, cfg.intermediate_size, attn.num_heads, attn.num_kv_heads, attn.head_dim,
            kv_caches[0][0].shape[1], cl.shape[0], bt.shape[1], torch.get_num_threads(), self.norm.eps, attn.scale,
            *(t.data_ptr() for t in step), self.rope.cos.data_ptr(), self.rope.sin.data_ptr(),
            *((prompts[0].data_ptr(), prompts[1].data_ptr(), prompts[1].numel()) if prompts else (None, None, 0)),
        )  # fmt: skip
        native.decoder_layers(stack.layers, x, args)
        return True

    def _stack_pointers(self, kv_caches: list[tuple[torch.Tensor, ...]], dtype: torch.dtype) -> NativeStack:
        """The layers' pointer table for ``native.decoder_layers``, built once per set of packed
        weights and caches (``layers`` None where the stack does not qualify)."""
        key = (cpu_linear.generation, kv_caches[0][0].data_ptr(), len(kv_caches), dtype)
        if self._stack is None or self._stack.key != key:
            self._stack = self._build_stack(kv_caches, dtype, key)
        return self._stack

    def _build_stack(
        self, kv_caches: list[tuple[torch.Tensor, ...]], dtype: torch.dtype, key: tuple
    ) -> NativeStack:
        refused = NativeStack(key)
        if native.library() is None or self.config.qk_norm or self.rope.cos.dtype != dtype:
            return refused
        from pagedq.quant.linear import NativeQuantLinear  # here: pagedq.quant imports the models

        rows: list[int] = []
        table: list[native.LayerPtrs] = []
        quant: list[native.QuantPtrs] = []
        for layer, (kc, vc) in zip(self.layers, kv_caches):
            if type(layer) is not DecoderLayer:
                return refused
            a, mlp = layer.self_attn, layer.mlp
            panels: list[torch.Tensor | None] = []
            qptrs: list[native.QuantPtrs | None] = []
            bias = None
            for i, lin in enumerate((a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)):
                if isinstance(lin, NativeQuantLinear):
                    b = lin.bias
                    if dtype != torch.bfloat16 or (b is not None and (i or b.dtype != dtype)):
                        return refused  # the C code adds a bf16 bias to QKV only
                    qptrs.append(native.QuantPtrs(
                        lin.codes.data_ptr(), lin.scales.data_ptr(), lin.zeros.data_ptr(),
                        None if lin.perm is None else lin.perm.data_ptr(), None if b is None else b.data_ptr(),
                        lin.bits, lin.group_size, lin.kc, lin.scales.shape[1],
                    ))  # fmt: skip
                    panels.append(None)
                    # woq_gemm serves the rows below the layer's dequantize threshold (256 on
                    # AMX), within the dense layers' limit on this CPU
                    rows.append(min(cpu_linear.gemv_rows(native.amx_supported()), lin.dequant_min_tokens - 1))
                    continue
                p = lin.packed if isinstance(lin, Linear) else None
                if p is None or p.panels is None or p.dtype != dtype or (i and p.bias is not None):
                    return refused  # no panels, or a bias the C code does not add (only QKV's)
                if i == 0:
                    bias = p.panel_bias
                panels.append(p.panels)
                qptrs.append(None)
                rows.append(p.gemv_rows)
            kinds = {native.weight_kind(w) for w in panels if w is not None}
            if len(kinds) > 1:
                return refused
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(w.dtype != dtype or not w.is_contiguous() for w in norms) or not kc.is_contiguous():
                return refused
            w_kind = kinds.pop() if kinds else native.W_BF16_PANELS  # all quantized: unused
            wp = [None if w is None else w.data_ptr() for w in panels]
            ptrs = native.LayerPtrs(
                norms[0].data_ptr(), norms[1].data_ptr(), wp[0], None if bias is None else bias.data_ptr(),
                wp[1], wp[2], wp[3], kc.data_ptr(), vc.data_ptr(), w_kind, a.window,
                (ctypes.c_void_p * 4)(*(None if q is None else ctypes.addressof(q) for q in qptrs)),
            )  # fmt: skip
            quant.extend(q for q in qptrs if q is not None)
            table.append(ptrs)
        return NativeStack(key, (native.LayerPtrs * len(table))(*table), min(rows), a, quant)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden)
        if self.packed_lm_head is not None:
            return cpu_linear.linear(hidden, self.packed_lm_head)
        return F.linear(hidden, self.embed_tokens.weight)

    def pack_weights(self) -> None:
        """Pack every dense layer and the LM head for this CPU (:mod:`pagedq.kernels.cpu_linear`).

        Tied embeddings stay as they are for the lookup; the LM head gets its own packed copy
        (it is the largest GEMM of a decode step)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
        if self.lm_head is None:
            self.packed_lm_head = cpu_linear.pack(self.embed_tokens.weight)

    def packed_bytes(self) -> int:
        """Bytes held in packed layouts (outside ``parameters()``)."""
        total = sum(m.packed.nbytes for m in self.modules() if isinstance(m, Linear) and m.packed)
        return total + (self.packed_lm_head.nbytes if self.packed_lm_head is not None else 0)

    def part_slices(self, group: LinearGroup) -> list[slice]:
        """The rows of ``group``'s fused parameter that each of its checkpoint linears fills."""
        cfg = self.config
        if group.fused == "qkv_proj":
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            sizes = [q, kv, kv]
        elif group.fused == "gate_up_proj":
            sizes = [cfg.intermediate_size] * 2
        else:
            raise ValueError(f"{type(self).__name__} has no fused module {group.fused!r}")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [slice(a, a + n) for a, n in zip(starts, sizes)]


class MistralForCausalLM(LlamaForCausalLM):
    hf_model_type = "mistral"


class Qwen2ForCausalLM(LlamaForCausalLM):
    hf_model_type = "qwen2"
    traits = ArchTraits(qkv_bias=True, window_switch="use_sliding_window")


class Qwen3ForCausalLM(LlamaForCausalLM):
    hf_model_type = "qwen3"
    traits = ArchTraits(qk_norm=True, window_switch="use_sliding_window")
