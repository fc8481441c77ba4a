"""IBM Granite (``GraniteForCausalLM``, Granite 3.x dense): Llama with four scalars from config.json.

``embedding_multiplier`` scales the token embeddings, ``residual_multiplier`` each block's
output before it joins the residual stream, ``attention_multiplier`` replaces ``1/sqrt(head_dim)``
as the attention scale, and the logits are divided by ``logits_scaling`` — as transformers'
``modeling_granite`` does, in the same order, so float32 runs agree token for token. Module
names, fused projections and quantizable linears are Llama's.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .llama import DecoderLayer, LlamaForCausalLM


def _scalar(cfg: ModelConfig, name: str) -> float:
    return float(cfg.raw.get(name, 1.0))


class GraniteDecoderLayer(DecoderLayer):
    def __init__(self, cfg: ModelConfig, window: int = 0):
        super().__init__(cfg, window)
        self.residual_multiplier = _scalar(cfg, "residual_multiplier")
        self.self_attn.scale = _scalar(cfg, "attention_multiplier")

    def forward(self, positions, x, kv_cache, meta, rope) -> torch.Tensor:
        m = self.residual_multiplier
        h = self.self_attn(positions, self.input_layernorm(x), kv_cache, meta, rope) * m
        x, normed = self.post_attention_layernorm.add_forward(x, h)
        return x + self.mlp(normed) * m


class GraniteForCausalLM(LlamaForCausalLM):
    hf_model_type = "granite"
    layer_class = GraniteDecoderLayer

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int):
        super().__init__(cfg, dtype, max_positions)
        self.embedding_multiplier = _scalar(cfg, "embedding_multiplier")
        self.logits_scaling = _scalar(cfg, "logits_scaling")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embedding_multiplier

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.logits_scaling
