"""W8A8: int8 weights (one scale per output channel) times int8 activations (one scale per token,
taken at run time), summed in int32 by oneDNN's VNNI GEMM (`torch._int_mm`).

Why: on CPUs with AVX512-VNNI whose bf16 dot product is slow, the int8 GEMM does ~7x the bf16
GEMM's multiply-adds per second (measured on the 2-core test Xeon: ~950 int8 GOP/s against ~130
bf16 GFLOP/s), so every compute-bound matmul (prompts, batches of 16+ rows) gets ~3x faster
with the quantization of both sides counted. The sum over K is exact in int32 and each row has its
own scale, so a row's result does not depend on how many rows run with it (batch-invariant, as
deterministic mode and lossless speculation need). Costs: small batches pay a few elementwise ops
per matmul (single-stream decode is slower than bf16's GEMV), and quality: per-token activation
scales add +3.6% perplexity on SmolLM2-135M (`forkllm bench quality`). The logits stay in the
model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forkllm.kernels import cpu_flags

# CPU flags whose int8 dot products oneDNN's integer GEMM runs on. Without one, `torch._int_mm` falls
# to a reference loop: 2.7 GOP/s measured on an AVX2-only Zen 3, ~50x slower than its float32 GEMM.
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_has_int8_dot(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI / AMX), which W8A8 needs to be fast."""
    return bool(INT8_DOT_FLAGS & cpu_flags(cpuinfo))


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of w [n, k]: (int8 [n, k], float32 scales [n]) with w ~= q * s."""
    wf = w.detach().float()
    s = wf.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(wf / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


class Int8Linear(nn.Module):
    """y = x @ W^T (+ bias) with W int8 per output channel and x quantized per row at run time."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, s = quantize_rows(weight)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.wq = q.t().contiguous()  # [k, n]: the right operand _int_mm takes
        self.scale = s
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @property
    def nbytes(self) -> int:
        return int(self.wq.numel()) + 4 * int(self.scale.numel())

    def dense(self) -> torch.Tensor:
        """The float32 weight the int8 one stands for (tests, references)."""
        return self.wq.t().float() * self.scale[:, None]

    def forward(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty((0, self.out_features), dtype=torch.float32 if float_out else x.dtype)
        xf = x.float()
        xs = xf.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)
        xq = torch.round(xf / xs).to(torch.int8)
        y = torch._int_mm(xq, self.wq).float().mul_(xs).mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y if float_out else y.to(x.dtype)

    def silu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for a fused [2I, K] gate/up weight (gate rows first)."""
        i = self.out_features // 2
        gu = self.forward(x, float_out=True)
        return (F.silu(gu[:, :i]) * gu[:, i:]).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8"
