"""EngineConfig: every engine knob, validated in one place (names follow vLLM's engine args)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
DEFAULT_CPU_KV_BYTES = 4 << 30


@dataclass
class EngineConfig:
    model: Any = None  # None: the embedded default; a path; or a preset/config with load_format="dummy"
    tokenizer: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    kv_cache_memory: int | float | str | None = None  # bytes, or "2GiB"; CPU default 4 GiB
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of device memory for weights + KV
    num_kv_blocks: int | None = None  # override the computed pool size (tests)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    enable_shared_prefix_attention: bool = True
    # Decode rows sharing fewer leading tokens attend separately: below ~256 shared tokens the extra
    # per-layer work of the shared path costs more than it saves (W1 prompts share 32 template tokens).
    min_shared_prefix_tokens: int = 256
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(set(_DTYPES))}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.torch_device().type == "cuda":
            return torch.bfloat16
        return default_cpu_dtype()

    def kv_bytes(self) -> int:
        return parse_bytes(self.kv_cache_memory) if self.kv_cache_memory is not None else DEFAULT_CPU_KV_BYTES


def default_cpu_dtype() -> torch.dtype:
    """bfloat16 where the CPU has native bf16 dot products (AVX512-BF16 or AMX), else float32.

    Measured on W1 (README): bf16 is 2.9x float32 in batch and 1.6x at batch 1 on such CPUs.
    FORKLLM_CPU_DTYPE overrides the choice.
    """
    env = os.environ.get("FORKLLM_CPU_DTYPE")
    if env:
        if env not in _DTYPES:
            raise ValueError(f"FORKLLM_CPU_DTYPE must be one of {sorted(set(_DTYPES))}, got {env!r}")
        return _DTYPES[env]
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
}


def parse_bytes(v: int | float | str) -> int:
    """4294967296, 4.0 (GiB when a float below 1024), "4GiB", "512MiB"."""
    if isinstance(v, bool):
        raise ValueError(f"kv_cache_memory must be a size, got {v!r}")
    if isinstance(v, float) and v < 1024:
        return int(v * (1 << 30))
    if isinstance(v, (int, float)):
        return int(v)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", v)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"kv_cache_memory must look like '4GiB' or '512MiB', got {v!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
