"""The attention backend interface the runner talks to, and the start-up choice of one.

A step: the runner packs an `AttentionBatch` (slots, decode rows' page tables, prefill chunks),
the backend turns it into `AttentionMetadata` once (page-table tensors, shared-prefix groups),
and `context` hands the model the per-layer `attend` for that step.

| backend                      | chosen when                                                   |
|------------------------------|---------------------------------------------------------------|
| `TorchAttention`             | no paged-decode kernel (GPU, kernels off, head size not built) |
| `CpuKernelAttention`         | `Kernels.paged_decode`                                         |
| `SharedPrefixAttention`      | shared-prefix on, over either of the two above, no kernels    |
| `CpuSharedPrefixAttention`   | shared-prefix on, `Kernels.paged_decode`, not fused            |
| `FusedSharedPrefixAttention` | shared-prefix on, `Kernels.shared_prefix_fused` (bf16)         |
"""

from __future__ import annotations

from typing import Protocol

import torch

from forkllm.attention.cpu import CpuKernelAttention
from forkllm.attention.metadata import AttentionBatch, AttentionMetadata
from forkllm.attention.paged import AttentionStep, TorchAttention
from forkllm.attention.shared_prefix import (
    CpuSharedPrefixAttention,
    FusedSharedPrefixAttention,
    SharedPrefixAttention,
)
from forkllm.kernels import Kernels


class AttentionBackend(Protocol):
    def build_metadata(self, batch: AttentionBatch) -> AttentionMetadata:
        """The step's tensors, built once and read by every layer."""
        ...

    def context(self, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> AttentionStep:
        """The per-step object whose `attend` the model calls every layer."""
        ...

    def decode(self, cache: torch.Tensor, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Decode rows alone over one layer's cache (their keys already written): what `attend`
        runs for them, callable by itself for benchmarks and reference checks."""
        ...


def select_backend(
    kernels: Kernels,
    block_size: int,
    scale: float,
    device: torch.device,
    shared_prefix: bool,
    min_shared_prefix_tokens: int,
) -> TorchAttention:
    """The backend for an engine: its kernels, and whether decode rows sharing at least
    `min_shared_prefix_tokens` leading tokens attend to them together."""
    ops = kernels.ops
    rows: TorchAttention
    if ops is not None and kernels.paged_decode:
        rows = CpuKernelAttention(ops, block_size, scale)
    elif ops is not None:
        rows = TorchAttention(block_size, scale, device, write_kv=ops.kv_write_)
    else:
        rows = TorchAttention(block_size, scale, device)
    if not shared_prefix:
        return rows
    min_pages = max(1, -(-min_shared_prefix_tokens // block_size))
    if ops is not None and kernels.shared_prefix_fused:
        return FusedSharedPrefixAttention(ops, block_size, scale, min_pages)
    if isinstance(rows, CpuKernelAttention):
        return CpuSharedPrefixAttention(rows, min_pages)
    return SharedPrefixAttention(rows, min_pages)
