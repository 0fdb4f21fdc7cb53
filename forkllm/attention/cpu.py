"""Per-row paged attention with the C++ CPU kernels: the cache write and each decode row's
attention read the pages in place (no gather); prefill chunks stay on SDPA."""

from __future__ import annotations

import torch

from forkllm.attention.metadata import AttentionMetadata
from forkllm.attention.paged import TorchAttention
from forkllm.kernels import KernelOps


class CpuKernelAttention(TorchAttention):
    """Chosen when `Kernels.paged_decode` holds: the kernel is compiled for the model's head_dim
    and GQA group."""

    def __init__(self, ops: KernelOps, block_size: int, scale: float) -> None:
        super().__init__(block_size, scale, torch.device("cpu"), write_kv=ops.kv_write_)
        self.ops = ops

    def rows_on_kernel(self) -> bool:
        return True

    def decode_rows(
        self, cache: torch.Tensor, q: torch.Tensor, meta: AttentionMetadata, want_lse: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert meta.decode_tables is not None and meta.decode_ctx_lens is not None
        res = self.ops.paged_decode(
            q.contiguous(),
            cache[0],
            cache[1],
            meta.decode_tables,
            meta.decode_starts,
            meta.decode_ctx_lens,
            self.block_size,
            self.scale,
            want_lse,
        )
        return res[0], (res[1] if want_lse else None)
