"""Rotary position embeddings (NeoX / HF "rotate_half" layout), with llama3 and linear scaling."""

from __future__ import annotations

import math
from typing import Any

import torch

from forkllm.kernels import KernelOps


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables; `forward(positions)` returns per-token tables used by every layer."""

    cos_table: torch.Tensor
    sin_table: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
        freq_factors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        if freq_factors is not None:  # GGUF llama3 files ship the scaling as a `rope_freqs` tensor
            inv_freq = inv_freq / freq_factors.to(torch.float64)
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().float(), emb.sin().float()
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)
        # float32 tables for the CPU kernel; a plain attribute, so model.to(bf16) keeps them exact.
        self.tables_f32 = (cos, sin)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos_table.index_select(0, positions).to(dtype)
        sin = self.sin_table.index_select(0, positions).to(dtype)
        # [T, 1, D]: broadcasts over heads.
        return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]. Returns x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


class RotaryApplier:
    """The rotation of one forward pass: the C++ kernel in place, straight from the float32
    tables, or PyTorch ops on cos/sin gathered once for all layers."""

    def __init__(
        self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype, ops: KernelOps | None
    ) -> None:
        self.rotary, self.positions, self.ops = rotary, positions, ops
        if ops is None:
            self.cos, self.sin = rotary(positions, dtype)

    def __call__(self, qk: torch.Tensor) -> torch.Tensor:
        """qk [T, H, D] -> rotated (in place when the kernel runs)."""
        if self.ops is not None:
            self.ops.rope_(qk, self.positions, *self.rotary.tables_f32)
            return qk
        return apply_rotary(qk, self.cos, self.sin)


def rerotate(x: torch.Tensor, delta: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    """Keys x [T, H, D] rotated for positions p, re-rotated for p + delta[t]: RoPE rotations
    compose, so one more rotation by delta (negative too: cos is even, sin odd) moves a key
    without recomputing it. In float32, returned in x's dtype."""
    cos_t, sin_t = (t.to(x.device) for t in rotary.tables_f32)
    idx = delta.abs().to(torch.long)
    cos = cos_t.index_select(0, idx).unsqueeze(1)
    sin = sin_t.index_select(0, idx).unsqueeze(1) * delta.sign().to(torch.float32)[:, None, None]
    return apply_rotary(x.float(), cos, sin).to(x.dtype)
