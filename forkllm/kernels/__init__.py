"""C++ CPU kernels, compiled on first use with torch's cpp_extension (gcc, 1-2 min once per machine).

- `paged_decode`: attention for single-query rows reading K/V straight from the cache pages.
- `shared_prefix_attention`: many decode rows over one shared run of pages, K/V read once
  (bf16, AVX512-BF16 CPUs).
- `sample_filtered`: temperature / min-p / top-k / top-p sampling without a vocabulary sort.
- `small_linear`: x @ w.T for 1..8 rows, streaming weights on all threads (decode matmuls).
- `packed_linear`: bf16 x @ w.T for any rows on weights repacked by `pack_weight` (AVX512-BF16
  CPUs without AMX, where it beats oneDNN's bf16 GEMM at every batch size measured).
- `add_rms_norm_`, `silu_mul`, `rope_`: the decoder's elementwise ops, one pass each.

Everything here is optional: if the build fails (no compiler) or FORKLLM_KERNELS=0 is set,
`ops()` returns None and callers use plain PyTorch, which computes the same values up to float
rounding.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("forkllm")

_CSRC = Path(__file__).parent / "csrc"
_lock = threading.Lock()
_state: dict[str, Any] = {"module": None, "failed": False}


def ops() -> Any | None:
    """The compiled extension module, or None when unavailable or disabled."""
    if os.environ.get("FORKLLM_KERNELS", "1") == "0":
        return None
    with _lock:
        if _state["module"] is None and not _state["failed"]:
            try:
                from torch.utils.cpp_extension import load

                _state["module"] = load(
                    name="forkllm_cpu_kernels",
                    sources=[
                        str(_CSRC / f)
                        for f in (
                            "bindings.cpp",
                            "paged_attention.cpp",
                            "shared_prefix.cpp",
                            "sampler.cpp",
                            "gemv.cpp",
                            "packed_gemm.cpp",
                            "elementwise.cpp",
                        )
                    ],
                    extra_include_paths=[str(_CSRC)],
                    extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as e:  # no compiler or headers: the PyTorch path still works
                logger.warning("forkllm: C++ CPU kernels unavailable (%s); using PyTorch ops", e)
                _state["failed"] = True
        return _state["module"]


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), K/2, 16, 2]: 16 outputs x one pair of k per 64-byte row, the
    operand layout of vdpbf16ps (see csrc/packed_gemm.cpp). N is zero-padded to a multiple of 16."""
    n, k = w.shape
    if k % 2:
        raise ValueError(f"pack_weight needs an even input size, got {k}")
    nb = -(-n // 16)
    if nb * 16 != n:
        w = torch.cat([w, w.new_zeros(nb * 16 - n, k)])
    return w.reshape(nb, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def pack_gate_up(w: torch.Tensor, intermediate: int) -> torch.Tensor:
    """A fused [2I, K] gate/up weight (gate rows first) packed with gate block i followed by up
    block i, the layout `packed_silu_linear` reads (one tile holds both halves of 16 outputs)."""
    k = w.shape[1]
    if intermediate % 16:
        raise ValueError(f"pack_gate_up needs an intermediate size divisible by 16, got {intermediate}")
    g, u = w[:intermediate].view(-1, 16, k), w[intermediate:].view(-1, 16, k)
    return pack_weight(torch.stack([g, u], dim=1).reshape(2 * intermediate, k))


def unpack_gate_up(packed: torch.Tensor, intermediate: int) -> torch.Tensor:
    """Inverse of `pack_gate_up`: the [2I, K] weight with gate rows first."""
    w = unpack_weight(packed, 2 * intermediate)
    pairs = w.view(-1, 2, 16, w.shape[1])
    return torch.cat([pairs[:, 0].reshape(intermediate, -1), pairs[:, 1].reshape(intermediate, -1)])


def unpack_weight(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_weight`: the row-major [n, K] weight."""
    nb, k2 = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(nb * 16, 2 * k2)[:n].contiguous()
