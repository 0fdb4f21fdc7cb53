"""Weights kept quantized: GGUF Q8_0 / Q4_0 / Q4_1 blocks in memory, matmuls on them.

Single-stream decode reads every weight once per token, so its time is the weights' bytes: a
Q4_1 file read as bf16 moves 3.2x the bytes llama.cpp moves. A `QuantLinear` keeps the file's
blocks (uint8 rows, ggml layout) and multiplies with the C++ `quant_linear` kernel (activations
quantized to int8 per 32-block, int dot products: llama.cpp's numerics). Where the kernels are off
(no compiler, FORKLLM_KERNELS=0, a GPU), the layer dequantizes once to a dense weight and runs
as a plain Linear: the same model, more memory.

Other GGUF types (the K-quants, Q5, IQ...) are dequantized and re-quantized to Q8_0 (within
Q8_0's rounding of the file's values), and `quantization="int8"` quantizes a float checkpoint
to Q8_0 the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from forkllm.kernels import KernelOps, Kernels

QUANTIZATIONS = ("auto", "gguf", "int8", "w8a8", "none")
CPU_ONLY = ("gguf", "int8", "w8a8")  # the quantizations whose kernels run on CPU only
Q4_0, Q4_1, Q8_0 = 2, 3, 8  # ggml type ids
BLOCK = 32
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
TYPE_NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}


@dataclass(frozen=True)
class QuantWeight:
    """One [n, k] weight as ggml blocks: `data` uint8 [n, k / 32 * block bytes]."""

    qtype: int
    data: torch.Tensor
    k: int

    @property
    def n(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    def rows(self, index: torch.Tensor | np.ndarray | slice) -> QuantWeight:
        """A row subset or permutation (rows are independent: blocks never cross a row)."""
        return QuantWeight(self.qtype, self.data[index].contiguous(), self.k)


def check_quant_weight(qtype: int, data: torch.Tensor, k: int) -> None:
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"unsupported quantized type {qtype}; kept types are Q4_0, Q4_1, Q8_0")
    if (
        k % BLOCK
        or data.dtype != torch.uint8
        or data.dim() != 2
        or data.shape[1] != k // BLOCK * BLOCK_BYTES[qtype]
    ):
        raise ValueError(f"bad {TYPE_NAMES[qtype]} weight: data {tuple(data.shape)} {data.dtype} for k={k}")


def _halves(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian -> float32 values of the float16 they hold."""
    return b.contiguous().view(torch.float16).float().squeeze(-1)


def dequantize(w: QuantWeight) -> torch.Tensor:
    """The float32 [n, k] weight the blocks stand for (exact: float16 scales times small ints)."""
    nb = w.k // BLOCK
    blocks = w.data.view(w.n, nb, BLOCK_BYTES[w.qtype])
    d = _halves(blocks[..., 0:2]).unsqueeze(-1)
    if w.qtype == Q8_0:
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(w.n, w.k)
    qs = blocks[..., 4:] if w.qtype == Q4_1 else blocks[..., 2:]
    q = torch.cat([qs & 15, qs >> 4], dim=-1).float()  # byte j: weight j (low), j + 16 (high)
    if w.qtype == Q4_1:
        return (d * q + _halves(blocks[..., 2:4]).unsqueeze(-1)).reshape(w.n, w.k)
    return (d * (q - 8)).reshape(w.n, w.k)


def quantize_q8_0(w: torch.Tensor) -> QuantWeight:
    """A float [n, k] weight (k a multiple of 32) as Q8_0 blocks: per 32 weights a float16 scale
    amax / 127 and int8 values, ggml's reference rounding (to nearest, ties away from zero)."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"Q8_0 needs an input size divisible by {BLOCK}, got {k}")
    x = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    d = x.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = (x * inv).abs().add(0.5).floor().mul(torch.sign(x)).clamp(-127, 127).to(torch.int8)
    scale = d.to(torch.float16).view(torch.uint8).reshape(n, k // BLOCK, 2)
    data = torch.cat([scale, q.view(torch.uint8)], dim=-1).reshape(n, -1).contiguous()
    return QuantWeight(Q8_0, data, k)


def _quant_bytes(qtype: int) -> int:
    return 32 if qtype == Q8_0 else 16


def repack(w: QuantWeight) -> torch.Tensor:
    """The kernel's layout of w's blocks, same bytes per row: every block's quants (Q8_0's as
    unsigned, q + 128), then the blocks' fp16 scales, then Q4_1's fp16 mins. Two blocks' quants
    are then one 64-byte load and 16 scales one conversion (kernels/csrc/quant_gemm.cpp)."""
    n, nb, qb = w.n, w.k // BLOCK, _quant_bytes(w.qtype)
    blocks = w.data.view(n, nb, BLOCK_BYTES[w.qtype])
    head = 4 if w.qtype == Q4_1 else 2
    qs = blocks[..., head:]
    if w.qtype == Q8_0:
        qs = qs ^ 0x80
    parts = [qs.reshape(n, nb * qb), blocks[..., 0:2].reshape(n, nb * 2)]
    if w.qtype == Q4_1:
        parts.append(blocks[..., 2:4].reshape(n, nb * 2))
    return torch.cat(parts, dim=1).contiguous()


def unrepack(qtype: int, data: torch.Tensor, k: int) -> torch.Tensor:
    """repack's inverse: the ggml blocks back."""
    n, nb, qb = data.shape[0], k // BLOCK, _quant_bytes(qtype)
    qs = data[:, : nb * qb].reshape(n, nb, qb)
    if qtype == Q8_0:
        qs = qs ^ 0x80
    parts = [data[:, nb * qb : nb * qb + nb * 2].reshape(n, nb, 2)]
    if qtype == Q4_1:
        parts.append(data[:, nb * qb + nb * 2 :].reshape(n, nb, 2))
    return torch.cat([*parts, qs], dim=2).reshape(n, -1).contiguous()


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies for input rows x: each 32-block scaled by 127 / amax in float32,
    rounded half to even, times amax / 127 again (float64; the tests' reference)."""
    m, k = x.shape
    b = x.float().reshape(m, k // BLOCK, BLOCK)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(b * inv).double() * (amax / 127).double()).reshape(m, k)


def weight_types(model: nn.Module) -> str:
    """ "Q4_1+Q8_0"-style names of the block types a model keeps ("" when none)."""
    names = {t for m in model.modules() if isinstance(m, QuantLinear) for t in m.types}
    return "+".join(sorted(names))


class QuantLinear(nn.Module):
    """A Linear whose weight is one or more row groups of ggml blocks (a fused q/k/v or gate/up
    keeps one group per source tensor when their types differ; their outputs are concatenated)."""

    def __init__(self, parts: list[QuantWeight], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not parts or any(p.k != parts[0].k for p in parts):
            raise ValueError("QuantLinear needs parts with one input size")
        for p in parts:
            check_quant_weight(p.qtype, p.data, p.k)
        self.parts = parts
        self.in_features = parts[0].k
        self.out_features = sum(p.n for p in parts)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.ops: KernelOps | None = None
        self.dense: torch.Tensor | None = None  # the PyTorch fallback's dequantized weight
        self.packed: list[torch.Tensor] | None = None  # each part repacked for the kernel
        self._one: tuple[torch.Tensor, int, int] | None = None  # (packed, qtype, n) of a lone part

    @property
    def nbytes(self) -> int:
        if self.packed is not None:
            return sum(int(w.numel()) for w in self.packed)
        return sum(p.nbytes for p in self.parts)

    @property
    def one_part(self) -> tuple[torch.Tensor, int, int] | None:
        """(repacked blocks, qtype, rows) when the kernels run on one part (the common case)."""
        return self._one

    @property
    def types(self) -> list[str]:
        return [TYPE_NAMES[p.qtype] for p in self.parts]

    def set_kernels(self, kernels: Kernels, dtype: torch.dtype) -> None:
        """With the C++ kernels, run on the blocks (repacked; the ggml rows are dropped);
        without, dequantize once to `dtype`."""
        self.ops = kernels.ops
        if kernels.ops is None:
            self._unpack()
            if self.dense is None:
                self.dense = torch.cat([dequantize(p) for p in self.parts]).to(dtype)
        else:
            self.dense = None
            if self.packed is None:
                self.packed = [repack(p) for p in self.parts]
                if len(self.parts) == 1:
                    self._one = (self.packed[0], self.parts[0].qtype, self.parts[0].n)
                # one copy in memory: the parts keep their shape, their bytes live in `packed`
                self.parts = [
                    QuantWeight(p.qtype, torch.empty((p.n, 0), dtype=torch.uint8), p.k) for p in self.parts
                ]

    def blocks(self) -> list[QuantWeight]:
        """The parts in the ggml layout (unpacked from the kernel's if need be)."""
        if self.packed is None:
            return list(self.parts)
        return [QuantWeight(p.qtype, unrepack(p.qtype, w, p.k), p.k) for p, w in zip(self.parts, self.packed)]

    def _unpack(self) -> None:
        if self.packed is not None:
            self.parts = self.blocks()
            self.packed = None
            self._one = None

    def forward(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        ops = self.ops
        if ops is None:
            w = (
                self.dense
                if self.dense is not None
                else torch.cat([dequantize(p) for p in self.parts]).to(x.dtype)
            )
            y = F.linear(x, w, self.bias)
            return y.float() if float_out else y
        x = x.contiguous()
        one = self._one
        if one is not None:  # the common case: one part
            return ops.quant_linear(x, one[0], one[1], one[2], self.bias, float_out)
        packed = self.packed
        assert packed is not None
        y = torch.cat(
            [ops.quant_linear(x, w, p.qtype, p.n, None, float_out) for p, w in zip(self.parts, packed)], dim=1
        )
        return y if self.bias is None else y + self.bias

    def silu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for a fused [2I, K] gate/up weight (gate rows first)."""
        gate_up = self.forward(x)
        if self.ops is not None:
            return self.ops.silu_mul(gate_up)
        i = self.out_features // 2
        return F.silu(gate_up[:, :i]) * gate_up[:, i:]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, types={self.types}"
