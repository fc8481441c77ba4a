"""``QuantLinear``: linear layers over quantized weights, one small class per execution path.

Every class holds its weight in the layout its kernel reads and implements two things:
``_kernel(x)`` (the weight-only-quantized matmul, best for few tokens: decode) and
``dequantize(dtype)`` (the real weight, for many tokens: prefill). ``forward`` picks between
them by the number of rows: on CPU the int4/int8 kernels beat a bf16 GEMM only while the work
is memory-bound, and a dequantize-then-GEMM wins beyond ``dequant_min_tokens`` rows (measured
by ``pagedq bench quant --crossover``).

* :class:`NativeQuantLinear` — 4- or 8-bit codes, any full groups, bf16 activations on a CPU with
  AVX-512 BF16: our kernel (``kernels/csrc/woq_gemm_cpu.c``), as fast as a vdpbf16ps bf16 GEMM
  at every token count, and on AMX tiles from 8 rows on a CPU that has them (faster than the
  bf16 weights' product up to ~128 rows: it reads the codes once). There, prefill chunks of
  ``AMX_DEQUANT_MIN_TOKENS`` rows or more dequantize natively into a transposed bf16 weight for
  one dense product; on an AVX-512 CPU without bf16 dot products chunks of
  ``FP32_DEQUANT_MIN_TOKENS`` rows or more do so into a float32 product. The classes below
  serve other dtypes and CPUs.
* :class:`Int4Linear` — 4-bit codes with per-group scale and zero (GPTQ 4-bit, AWQ, RTN int4):
  ``torch.ops.aten._weight_int4pack_mm_for_cpu``. Zeros are folded into a float offset
  ``(8 - z) * s`` (the kernel computes ``(q - 8) * s + offset``). GPTQ act-order (``g_idx``
  not sorted) becomes sorted groups by permuting the input channels once at load and the
  activations at run time.
* :class:`Int8Linear` — 8-bit per-output-channel symmetric codes (``quantization="int8"``,
  GPTQ 8-bit without groups): ``torch.ops.aten._weight_int8pack_mm``.
* :class:`GroupedLinear` — any other bits / groups / ``g_idx``: dequantize and GEMM.
"""

from __future__ import annotations

import logging
import threading
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .formats.base import QuantWeight

logger = logging.getLogger(__name__)

# Rows from which dequantize + dense GEMM beats the weight-only kernels, per class (see the
# module docstring). Measured with ``pagedq bench quant --crossover`` on bench-1b's gate_up
# ([16384 x 2048], bf16, 2 cores): the int8 kernel costs 0.26 ms/row, its dequantize 5 ms;
# the int4 kernel 0.19 ms/row, its dequantize 36 ms; a bf16 GEMM 0.07 ms/row.
DEQUANT_MIN_TOKENS = 40

# NativeQuantLinear on a CPU whose bf16 GEMMs run on AMX tiles: rows from which a native
# dequantize (``native.woq_dequant``) plus a dense bf16 product beats the weight-only kernel,
# which runs on AMX tiles itself from 8 rows (csrc/woq_gemm_cpu.c, woq_amx). Measured on a
# 2-vCPU Xeon (AMX), `bench`'s four decoder GEMMs (qkv, o, gate_up, down; int4 in groups of
# 64/128, int8 per channel), kernel vs dequantize + product (vs the bf16 weights' product), ms:
# int4 64 rows 0.48 / 1.19 (0.70), 128 rows 0.95 / 1.38 (1.42), 256 rows 2.81 / 3.06 (1.36);
# int8 64 rows 0.50 / 1.19, 128 rows 0.78 / 1.36, 256 rows 1.42 / 1.72 (a second run at 256:
# int4 1.67 / 1.49, int8 1.21 / 1.50; at 512 the dequantize wins, 3.2 / 1.9). (Before the kernel
# had AMX tiles the crossover was 32 rows: vdpbf16ps alone ran 2.9-3.2 ms at 64 rows.) Prefill
# chunks of more rows dequantize once and run oneDNN's GEMM.
AMX_DEQUANT_MIN_TOKENS = 256

# ... and on an AVX-512 CPU without native bf16 dot products, where the dense layers run
# float32 GEMMs (kernels/cpu_linear.py): from this many rows the layer
# dequantizes (natively, 0.4 ms for the four below) and runs a float32 product. 2-vCPU AVX-512
# Xeon without BF16, `bench`'s four decoder GEMMs, the kernel (AVX-512 tiles over dequantized
# chunks) vs dequantize + float32 product, ms (either bit width alike): 256 rows 6.6 / 7.8,
# 384 10.1 / 10.6, 512 14.0 / 13.1, 640 18.0 / 16.3, 2048 71.5 / 49.4 (the bf16 weights'
# packed float32 product: 6.1, 8.6, 11.8, 14.6, 46.3). An AVX2-only CPU keeps the kernel at
# every row count: there its tiles ran 0.95-1.15x of oneDNN's packed float32 GEMM at 64-1024
# rows (2-vCPU AMD EPYC), and no dequantize path was measured against them.
FP32_DEQUANT_MIN_TOKENS = 448

# per thread (two engines of one process can step at once), the dense weights of the last
# dequantize per shape: rewritten by every call, so a step's layers share them
_dense = threading.local()

_INT4_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel takes, largest first


class QuantLinear(nn.Module):
    """Base class: ``y = x @ W.T + b`` with ``W`` held quantized."""

    in_features: int
    out_features: int
    dequant_min_tokens: int = DEQUANT_MIN_TOKENS
    # buffers and settings the subclasses hold (declared for the type checker: nn.Module's
    # attribute lookup says nothing about them)
    bias: torch.Tensor | None
    perm: torch.Tensor | None
    scales: torch.Tensor
    bits: int
    group_size: int

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.dequant_min_tokens:
            return F.linear(self._prepare(x), self._gemm_weight(x.dtype), self.bias)
        out = self._kernel(self._prepare(x))
        return out if self.bias is None else out + self.bias

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The real weight ``[out_features, in_features]``."""
        raise NotImplementedError

    def _gemm_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the dense GEMM of :meth:`forward` reads it (after ``_prepare``)."""
        return self.dequantize(dtype)

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def _int4_block(n: int, k: int) -> int | None:
    """The channel block of torch's CPU int4 packing of an ``[n, k]`` weight, if it is one that
    ``_unpack_int4`` reads (None: keep the codes as bytes besides).

    torch packs blocks of 64 output channels where it was built for AVX-512 and of 32 on AVX2;
    the layout is internal to torch, so it is checked on a probe once per shape, not trusted.
    """
    key = (n, k)
    if key not in _LAYOUT_CHECKED:
        g = torch.Generator().manual_seed(n * 7919 + k)
        probe = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        _LAYOUT_CHECKED[key] = next(
            (
                block
                for block in (64, 32)
                if packed.shape == (n, k // 2)
                and n % block == 0
                and torch.equal(_unpack_int4(packed, n, k, block), probe.to(torch.uint8))
            ),
            None,
        )
    return _LAYOUT_CHECKED[key]


_LAYOUT_CHECKED: dict[tuple[int, int], int | None] = {}


def _unpack_int4(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """Codes ``[n, k]`` from torch's CPU int4 packing: blocks of ``block`` output channels, each
    a ``[k, block / 2]`` byte array whose low nibbles are the block's first half of channels and
    whose high nibbles the second."""
    b = packed.view(n // block, k, block // 2)
    q = torch.cat([b & 0xF, b >> 4], dim=2)  # [n/block, k, block]
    return q.transpose(1, 2).reshape(n, k)


class SortedGroupsLinear(QuantLinear):
    """Layers whose kernels need each quantization group to be a contiguous run of input
    channels: GPTQ act-order (``g_idx`` not sorted) becomes sorted groups by permuting the input
    channels once at load (``perm``) and the activations at run time."""

    def _sort_groups(self, w: QuantWeight) -> torch.Tensor:
        """The codes with the input channels sorted by group; registers ``perm``."""
        perm, q = None, w.q
        if w.regular_group_size is None:
            perm = torch.argsort(w.g_idx, stable=True)
            q = q[:, perm]
        self.register_buffer("perm", perm)
        return q

    @staticmethod
    def _full_groups(w: QuantWeight) -> bool:
        """Whether every group holds ``K / groups`` channels (act-order or not)."""
        groups = w.scales.shape[0]
        counts = torch.bincount(w.g_idx, minlength=groups)
        return bool((counts == w.shape[1] // groups).all())

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.perm is None else x.index_select(-1, self.perm)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        w = self._gemm_weight(dtype)
        return w if self.perm is None else w[:, torch.argsort(self.perm)]


class Int4Linear(SortedGroupsLinear):
    dequant_min_tokens = 320
    packed: torch.Tensor
    scale_zeros: torch.Tensor
    codes: torch.Tensor | None
    block: int | None

    def __init__(self, w: QuantWeight, bias: torch.Tensor | None, dtype: torch.dtype):
        n, k = w.shape
        super().__init__(k, n, bias)
        q = self._sort_groups(w)
        groups = w.scales.shape[0]
        size = k // groups
        scales, zeros = w.scales, w.zeros
        if size not in _INT4_GROUPS:  # one group per channel (group_size -1): repeat it
            size = next(s for s in _INT4_GROUPS if k % s == 0 and s <= size and size % s == 0)
            reps = (k // groups) // size
            scales, zeros = scales.repeat_interleave(reps, 0), zeros.repeat_interleave(reps, 0)
        self.group_size = size
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        )
        self.register_buffer(
            "scale_zeros", torch.stack([scales, (8.0 - zeros) * scales], dim=-1).to(dtype).contiguous()
        )
        # codes for dequantize(), kept only if torch's packing is not a layout we can read
        self.block = _int4_block(n, k)
        self.register_buffer("codes", None if self.block is not None else q.contiguous())

    @staticmethod
    def supports(w: QuantWeight) -> bool:
        _n, k = w.shape
        if w.bits != 4 or k % 32:
            return False
        groups = w.scales.shape[0]
        if k % groups:
            return False
        size = k // groups
        if size not in _INT4_GROUPS and not any(size % s == 0 and k % s == 0 for s in _INT4_GROUPS):
            return False
        return Int4Linear._full_groups(w)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        sz = self.scale_zeros if self.scale_zeros.dtype == x.dtype else self.scale_zeros.to(x.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, sz)

    def _gemm_weight(self, dtype: torch.dtype) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        sz = self.scale_zeros if self.scale_zeros.dtype == dtype else self.scale_zeros.to(dtype)  # [G, N, 2]
        if self.codes is not None:
            s = sz[..., 0].T.repeat_interleave(g, 1)
            return (self.codes.to(dtype) - 8) * s + sz[..., 1].T.repeat_interleave(g, 1)
        # straight from torch's packing ([n/B, k, B/2] bytes: a block's first half of channels in
        # the low nibbles, its second half high): nibbles split four bytes at a time, one
        # byte-sized transpose, one conversion, then the group scales broadcast in place — no
        # [N, K] scale tensors are built
        words = self.packed.view(torch.int32)
        b = self.block
        assert b is not None  # codes are kept exactly when the packing is not one we read
        both = torch.empty(2, n // b, k, b // 2, dtype=torch.uint8, device=words.device)
        torch.bitwise_and(words, 0x0F0F0F0F, out=both[0].view(torch.int32).view(words.shape))
        torch.bitwise_and(words >> 4, 0x0F0F0F0F, out=both[1].view(torch.int32).view(words.shape))
        w = both.permute(1, 0, 3, 2).reshape(n, k).to(dtype).view(n, k // g, g)
        w.sub_(8).mul_(sz[..., 0].T[:, :, None]).add_(sz[..., 1].T[:, :, None])
        return w.view(n, k)


class Int8Linear(QuantLinear):
    weight_int8: torch.Tensor

    def __init__(self, w: QuantWeight, bias: torch.Tensor | None, dtype: torch.dtype):
        n, k = w.shape
        super().__init__(k, n, bias)
        self.register_buffer("weight_int8", (w.q.to(torch.int16) - 128).to(torch.int8).contiguous())
        self.register_buffer("scales", w.scales[0].to(dtype).contiguous())

    @staticmethod
    def supports(w: QuantWeight) -> bool:
        return w.bits == 8 and w.scales.shape[0] == 1 and bool((w.zeros == 128).all())

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, s)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight_int8.to(dtype)
        return w.mul_(self.scales.to(dtype)[:, None])


def _kc(group: int) -> int:
    """The K block of the native kernel: the largest multiple of 4 up to 128 dividing the group
    (a block never straddles two groups; 128 keeps the converted bf16 block in L1)."""
    return max(d for d in range(4, min(group, 128) + 1, 4) if group % d == 0)


class NativeQuantLinear(SortedGroupsLinear):
    """4- or 8-bit codes with a scale and zero per group and output channel, multiplied by the
    AVX-512 BF16 kernel of ``kernels/csrc/woq_gemm_cpu.c`` for bf16 activations.

    The kernel converts each weight tile once per call and reuses it for every row, so unlike
    torch's weight-only kernels it stays as fast as a bf16 GEMM at any token count (decode
    batches and prefill chunks alike) while reading a half or a quarter of the weight bytes:
    ``dequant_min_tokens`` is never reached. Activations of another dtype (the fp32 exactness
    reference) multiply the dequantized weight. Codes are held in the kernel's panel layout:
    64 output channels, K in pairs (``pack_panels``).
    """

    dequant_min_tokens = 2**62

    codes: torch.Tensor
    zeros: torch.Tensor

    def __init__(self, w: QuantWeight, bias: torch.Tensor | None, dtype: torch.dtype):
        from pagedq.kernels import cpu_linear, native

        n, k = w.shape
        super().__init__(k, n, bias)
        # many rows dequantize for a dense product (not with PAGEDQ_CPU_LINEAR forcing another
        # path): in bf16 where GEMMs run on AMX tiles (AMX_DEQUANT_MIN_TOKENS), in float32 on an
        # AVX-512 CPU without bf16 dot products (FP32_DEQUANT_MIN_TOKENS)
        self.dense_dtype = torch.bfloat16
        if dtype == torch.bfloat16 and cpu_linear.mode() == "auto":
            if native.amx_supported():
                self.dequant_min_tokens = AMX_DEQUANT_MIN_TOKENS
            elif not cpu_linear.bf16_native() and torch.cpu._is_avx512_supported():
                self.dequant_min_tokens = FP32_DEQUANT_MIN_TOKENS
                self.dense_dtype = torch.float32
        q = self._sort_groups(w)
        groups = w.scales.shape[0]
        self.bits, self.group_size = w.bits, k // groups
        self.kc = _kc(self.group_size)
        np_ = -(-n // 64) * 64
        pad = np_ - n
        self.register_buffer("codes", pack_panels(F.pad(q, (0, 0, 0, pad)), w.bits))
        self.register_buffer("scales", F.pad(w.scales.float(), (0, pad)).contiguous())
        self.register_buffer("zeros", F.pad(w.zeros.round(), (0, pad)).to(torch.uint8).contiguous())

    @staticmethod
    def supports(w: QuantWeight) -> bool:
        from pagedq.kernels import native

        _n, k = w.shape
        groups = w.scales.shape[0]
        if w.bits not in (4, 8) or k % groups or (k // groups) % 4 or not native.woq_supported():
            return False
        z = w.zeros
        if not bool(((z == z.round()) & (z >= 0) & (z < 2**w.bits)).all()):
            return False
        return NativeQuantLinear._full_groups(w)

    def quant_weight(self) -> QuantWeight:
        """The canonical weight back (codes, scales, zeros, g_idx): for comparing kernels."""
        n, k = self.out_features, self.in_features
        q = unpack_panels(self.codes, self.bits, k)[:n]
        g_idx = torch.arange(k) // self.group_size
        if self.perm is not None:
            inv = torch.argsort(self.perm)
            q, g_idx = q[:, inv], g_idx[inv]
        return QuantWeight(q, self.scales[:, :n], self.zeros[:, :n].float(), g_idx, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.shape[0] < self.dequant_min_tokens:
            return super().forward(x)
        from pagedq.kernels import native

        shape = (self.in_features, self.out_features)
        buffers = _dense.__dict__.setdefault("buffers", {})
        if shape not in buffers:
            buffers[shape] = torch.empty(shape, dtype=torch.bfloat16)
        wt = native.woq_dequant(
            self.codes, self.bits, self.scales, self.zeros, self.group_size, *shape, out=buffers[shape]
        )
        if self.dense_dtype == torch.float32:  # exact widening; one rounding of the float32 product
            key = (*shape, torch.float32)
            if key not in buffers:
                buffers[key] = torch.empty(shape, dtype=torch.float32)
            y = (self._prepare(x).float() @ buffers[key].copy_(wt)).to(torch.bfloat16)
        else:
            y = self._prepare(x) @ wt
        return y if self.bias is None else y + self.bias

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return F.linear(x, self._gemm_weight(x.dtype))
        from pagedq.kernels import native

        y = native.woq_gemm(
            x.reshape(-1, self.in_features), self.codes, self.bits, self.scales, self.zeros,
            self.group_size, self.kc, self.out_features,
        )  # fmt: skip
        return y.view(*x.shape[:-1], self.out_features)

    def _gemm_weight(self, dtype: torch.dtype) -> torch.Tensor:
        n, k, size = self.out_features, self.in_features, self.group_size
        w = unpack_panels(self.codes, self.bits, k)[:n].to(dtype).view(n, k // size, size)
        # (q - z) is exact in every float dtype (|q - z| < 256), so one rounding: the product
        w.sub_(self.zeros[:, :n].T.to(dtype)[:, :, None]).mul_(self.scales[:, :n].T.to(dtype)[:, :, None])
        return w.view(n, k)


def pack_panels(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[N, K]`` (N a multiple of 64) in the native kernel's layout: panels of 64 output
    channels with K in pairs — int8 ``[N/64, K/2, 64, 2]`` holding ``q - 128``; 4-bit
    ``[N/64, K/4, 64, 2]`` bytes whose low nibble is k = 4t + j and high nibble 4t + 2 + j."""
    n, k = q.shape
    p = n // 64
    if bits == 8:
        c = (q.to(torch.int16) - 128).to(torch.int8)
        return c.view(p, 64, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    u = q.to(torch.uint8).view(p, 64, k // 4, 2, 2)
    return (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()


def unpack_panels(codes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The inverse of :func:`pack_panels`: codes ``[N, K]`` uint8."""
    p = codes.shape[0]
    # a channel's two codes of a K pair (bytes j = 0, 1) move together: transpose them as int16
    rows = codes.view(torch.int16).squeeze(-1).transpose(1, 2).contiguous().view(codes.dtype)
    if bits == 8:  # stored q - 128 as int8: flipping the top bit gives q as uint8
        return rows.view(torch.uint8).view(p * 64, k) ^ 0x80
    rows = rows.view(p, 64, k // 4, 1, 2)  # [P, 64, t, 1, j]
    return torch.cat([rows & 0xF, rows >> 4], dim=3).view(p * 64, k)  # k = 4t + 2·half + j


class GroupedLinear(QuantLinear):
    """Any canonical weight, dequantized for every call: correct for every layout, not fast."""

    dequant_min_tokens = 0
    q: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def __init__(self, w: QuantWeight, bias: torch.Tensor | None, dtype: torch.dtype):
        n, k = w.shape
        super().__init__(k, n, bias)
        self.bits = w.bits
        self.register_buffer("q", w.q.contiguous())
        self.register_buffer("scales", w.scales.to(dtype))
        self.register_buffer("zeros", w.zeros.to(dtype))
        self.register_buffer("g_idx", w.g_idx)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        s = self.scales.to(dtype)[self.g_idx].T
        z = self.zeros.to(dtype)[self.g_idx].T
        return (self.q.to(dtype) - z) * s


class TritonQuantLinear(QuantLinear):
    """4- or 8-bit weights in GPTQ's packed layout (or AWQ's, for AWQ checkpoints), multiplied by
    the Triton W4A16/W8A16 kernel of ``pagedq.kernels.triton_gemm`` at every token count."""

    dequant_min_tokens = 2**62  # the fused kernel serves prefill as well
    qweight: torch.Tensor
    qzeros: torch.Tensor
    g_idx: torch.Tensor | None

    def __init__(
        self, w: QuantWeight, bias: torch.Tensor | None, dtype: torch.dtype, device, layout: str = "gptq"
    ):
        from .formats.awq import awq_pack_cols
        from .formats.base import pack_int32

        n, k = w.shape
        super().__init__(k, n, bias)
        self.bits = w.bits
        self.awq = layout == "awq" and w.bits == 4 and w.regular_group_size is not None and n % 8 == 0
        zeros = w.zeros.round().to(torch.int64)
        if self.awq:
            self.group_size = w.regular_group_size or 0
            qweight, qzeros = awq_pack_cols(w.q.T.contiguous()), awq_pack_cols(zeros.to(torch.uint8))
            g_idx = None
        else:
            pf = 32 // w.bits
            if k % pf or n % pf:
                raise ValueError(
                    f"a {w.bits}-bit layer needs in/out features divisible by {pf}, got {k} x {n}"
                )
            self.group_size = 0
            qweight, qzeros = pack_int32(w.q.T.contiguous(), w.bits, 0), pack_int32(zeros, w.bits, 1)
            g_idx = w.g_idx.to(torch.int32)
        self.register_buffer("qweight", qweight.to(device))
        self.register_buffer("qzeros", qzeros.to(device))
        self.register_buffer("scales", w.scales.float().to(device))
        self.register_buffer("g_idx", None if g_idx is None else g_idx.to(device))
        if self.bias is not None:
            self.bias.data = self.bias.data.to(device)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        from pagedq.kernels.triton_gemm import quant_matmul

        return quant_matmul(
            x.contiguous(), self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size,
            self.awq, self.out_features,
        )  # fmt: skip

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        from .formats.awq import awq_unpack_cols
        from .formats.base import unpack_int32

        if self.awq:
            q = awq_unpack_cols(self.qweight).T.float()
            z = awq_unpack_cols(self.qzeros).float()
            g = torch.arange(self.in_features, device=q.device) // self.group_size
        else:
            q = unpack_int32(self.qweight, self.bits, 0).T.float()
            z = unpack_int32(self.qzeros, self.bits, 1).float()
            assert self.g_idx is not None  # GPTQ's layout keeps g_idx
            g = self.g_idx.long()
        return ((q - z[g].T) * self.scales[g].T).to(dtype)


def make_quant_linear(
    w: QuantWeight,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    layout: str = "gptq",
) -> QuantLinear:
    """The fastest layer that can run ``w`` on ``device`` (``layout``: the checkpoint's packing,
    which the Triton kernel reads as it is: ``gptq`` or ``awq``)."""
    from pagedq.kernels.backend import backend

    if backend(device) == "triton" and w.bits in (4, 8):
        return TritonQuantLinear(w, bias, dtype, device, layout)
    if device.type == "cpu":
        if dtype == torch.bfloat16 and NativeQuantLinear.supports(w):
            return NativeQuantLinear(w, bias, dtype)
        if Int4Linear.supports(w):
            return Int4Linear(w, bias, dtype)
        if Int8Linear.supports(w):
            return Int8Linear(w, bias, dtype)
    logger.debug("quantized layer %s (%d-bit) runs as dequantize + GEMM", w.shape, w.bits)
    return GroupedLinear(w, bias, dtype).to(device)


class ConcatLinear(nn.Module):
    """Layers that read one input but could not be fused (e.g. q/k/v with different act-order
    permutations): run each, concatenate the outputs."""

    def __init__(self, parts: list[QuantLinear]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([cast(QuantLinear, p).dequantize(dtype) for p in self.parts])


def make_fused_quant_linear(
    weights: list[QuantWeight | QuantLinear],
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    layout: str = "gptq",
) -> nn.Module:
    """One layer for projections that share an input (q/k/v, gate/up), fused when their
    quantization groups agree. ``weights`` may also hold ready layers (bitsandbytes 4-bit)."""
    canonical = [w for w in weights if isinstance(w, QuantWeight)]
    if len(canonical) == len(weights):
        if len(canonical) == 1:
            return make_quant_linear(canonical[0], bias, dtype, device, layout)
        try:
            return make_quant_linear(QuantWeight.cat(canonical), bias, dtype, device, layout)
        except ValueError:
            pass
    sizes = [w.shape[0] if isinstance(w, QuantWeight) else w.out_features for w in weights]
    biases = [None] * len(weights) if bias is None else list(bias.split(sizes))
    layers = []
    for w, b in zip(weights, biases):
        if isinstance(w, QuantWeight):
            layers.append(make_quant_linear(w, b, dtype, device, layout))
        else:
            if b is not None:
                w.bias = nn.Parameter(b, requires_grad=False)
            layers.append(w)
    return layers[0] if len(layers) == 1 else ConcatLinear(layers)
