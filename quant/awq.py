"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling them up
before quantization and folding the inverse scale into the operation that feeds them.

For a group of layers reading the same input ``X`` (q/k/v after the input norm, gate/up after
the post-attention norm, down after up), a per-input-channel scale ``s = mean|X|^alpha``
(normalized) is searched over a grid of ``alpha`` in [0, 1) to minimize the error of the
group's outputs after round-to-nearest quantization of ``W * s``; the preceding norm's weight
(or up_proj's rows) is divided by ``s``, which leaves the float model's function unchanged.
Weight clipping search (AutoAWQ's ``auto_clip``) is not done.
"""

from __future__ import annotations

import torch

from .rtn import rtn


def search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int, grid: int = 20
) -> torch.Tensor:
    """The per-input-channel scale ``s[K]`` that best preserves ``x @ W.T`` after quantization."""
    x = x.float().reshape(-1, x.shape[-1])
    w = torch.cat([wt.float() for wt in weights])
    ref = x @ w.T
    x_mean = x.abs().mean(dim=0)
    best, best_s = None, torch.ones_like(x_mean)
    for r in range(grid):
        alpha = r / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = rtn(w * s, bits, group_size, sym=False).dequantize() / s
        err = (x @ wq.T - ref).pow(2).mean().item()
        if best is None or err < best:
            best, best_s = err, s
    return best_s
