"""The floor of a workload on the machine that runs it: how fast an ideal engine could go.

An ideal engine computes every prompt at the machine's GEMM peak and, at each decode step,
takes the longer of the step's FLOPs at that peak and its bytes at the machine's read bandwidth
(all weights once, plus every running sequence's KV). Both figures are measured here, at run
time (:func:`measure_machine`), so the fraction of the floor that a benchmark reports means the
same on a laptop, a 2-core AVX2 VM and a 64-core AMX server.

FLOPs count multiply and add as two; attention counts QK^T and PV for every visible key.
Decode steps are those of a schedule that admits every request at once (what the
``throughput`` workload asks for): step ``s`` runs the requests with more than ``s`` output
tokens, at context ``prompt + s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pagedq.models.config import ModelConfig

from .workloads import Workload


@dataclass
class Machine:
    gemm_flops: float  # per second, the best of a few large GEMMs in the model dtype
    read_bytes: float  # per second, streaming reads of a buffer far larger than the caches
    dtype: torch.dtype


@dataclass
class Floor:
    prefill_flops: float
    decode_flops: float
    decode_bytes: float
    seconds: float
    output_tokens: int

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_machine(dtype: torch.dtype, repeats: int = 5) -> Machine:
    """GEMM peak through the dense path the engine uses here (packed weights,
    :mod:`pagedq.kernels.cpu_linear`), and read bandwidth of a 512 MiB sum."""
    from pagedq.kernels import cpu_linear

    def gemm(m: int, n: int, k: int) -> float:
        w = torch.randn(n, k).to(dtype)
        x = torch.randn(m, k).to(dtype)
        packed = cpu_linear.pack(w)
        fn = (lambda: cpu_linear.linear(x, packed)) if packed is not None else (lambda: x @ w.t())
        return 2 * m * n * k / _best_seconds(fn, repeats)

    peak = max(gemm(1024, 3072, 1024), gemm(2048, 2048, 2048))
    buf = torch.ones(512 * 2**20 // 4, dtype=torch.float32)
    bandwidth = buf.numel() * 4 / _best_seconds(lambda: buf.sum(), repeats)
    return Machine(peak, bandwidth, dtype)


def linear_params(cfg: ModelConfig) -> int:
    """Weights of the dense layers of all decoder layers (the LM head apart)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = (
        cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    )
    return per_layer * cfg.num_layers


def workload_floor(cfg: ModelConfig, w: Workload, machine: Machine) -> Floor:
    itemsize = torch.empty((), dtype=machine.dtype).element_size()
    lin = linear_params(cfg)
    head = cfg.hidden_size * cfg.vocab_size
    weight_bytes = (lin + head) * itemsize
    kv_token = cfg.kv_bytes_per_token(machine.dtype)
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # FLOPs per (query, visible key)
    prefill = 0.0
    for p in w.prompts:
        n = len(p)
        prefill += 2 * lin * n + attn * n * (n + 1) / 2 + 2 * head  # the first token's LM head
    seconds = prefill / machine.gemm_flops
    decode_flops = decode_bytes = 0.0
    for s in range(1, max(w.output_lens)):
        running = [len(p) + s for p, n in zip(w.prompts, w.output_lens) if n > s]
        flops = 2 * (lin + head) * len(running) + attn * sum(running)
        nbytes = weight_bytes + kv_token * sum(running)
        decode_flops += flops
        decode_bytes += nbytes
        seconds += max(flops / machine.gemm_flops, nbytes / machine.read_bytes)
    return Floor(prefill, decode_flops, decode_bytes, seconds, w.num_output_tokens)


def decode_floor_tps(cfg: ModelConfig, prompt_len: int, tokens: int, machine: Machine) -> float:
    """Batch-1 decode tokens/s of the ideal engine: ``tokens`` steps after a ``prompt_len``-token
    prefill, each step the longer of its FLOPs at the peak and its bytes (weights and KV) read."""
    w = Workload("decode", [[0] * prompt_len], [tokens + 1])
    floor = workload_floor(cfg, w, machine)
    return tokens / (floor.seconds - floor.prefill_flops / machine.gemm_flops)


def describe(machine: Machine, floor: Floor, measured_tps: float | None = None) -> str:
    lines = [
        f"roofline: GEMM peak {machine.gemm_flops / 1e9:.0f} GFLOP/s ({str(machine.dtype).replace('torch.', '')}), "
        f"read bandwidth {machine.read_bytes / 1e9:.1f} GB/s (measured now)",
        f"  workload: prefill {floor.prefill_flops / 1e12:.2f} TFLOP, decode {floor.decode_flops / 1e12:.2f} TFLOP "
        f"and {floor.decode_bytes / 1e9:.0f} GB read -> floor {floor.seconds:.1f} s = {floor.output_tps:.0f} out tok/s",
    ]
    if measured_tps is not None:
        lines.append(f"  pagedq reaches {100 * measured_tps / floor.output_tps:.0f}% of the floor")
    return "\n".join(lines)
