"""Engine start-up: device and dtype, the model, the KV cache's size, the context limit.

Everything the environment can change (FORKLLM_CPU_DTYPE, the CPU's bf16 support, free GPU
memory) is read here, once, and the result is passed on explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from forkllm.engine.config import DTYPES, EngineConfig
from forkllm.kernels import cpu_flags
from forkllm.kv.manager import KVCacheSpec
from forkllm.models.config import ModelConfig


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def resolve_placement(config: EngineConfig) -> Placement:
    """The device, and the dtype: explicit, else bf16 on CUDA, else bf16 where the CPU has native
    bf16 dot products (AVX512-BF16 or AMX; measured on W1: 2.9x float32 in batch, 1.6x at batch 1),
    else float32. FORKLLM_CPU_DTYPE overrides the CPU choice."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if config.dtype != "auto":
        return Placement(device, DTYPES[config.dtype])
    if device.type == "cuda":
        return Placement(device, torch.bfloat16)
    env = os.environ.get("FORKLLM_CPU_DTYPE")
    if env:
        if env not in DTYPES:
            raise ValueError(f"FORKLLM_CPU_DTYPE must be one of {sorted(set(DTYPES))}, got {env!r}")
        return Placement(device, DTYPES[env])
    return Placement(device, torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def size_kv_cache(config: EngineConfig, model: ModelConfig, place: Placement) -> KVCacheSpec:
    per_block = model.kv_bytes_per_token(place.dtype.itemsize) * config.block_size
    if config.num_kv_blocks is not None:
        return KVCacheSpec(config.num_kv_blocks, config.block_size, per_block)
    if place.device.type == "cuda" and config.kv_cache_memory is None:
        free, total = torch.cuda.mem_get_info(place.device)
        used = total - free
        budget = int(total * config.gpu_memory_utilization) - used - (1 << 30)  # 1 GiB for activations
        if budget <= per_block * 2:
            raise RuntimeError(f"no GPU memory left for the KV cache (free {free / 2**30:.1f} GiB)")
    else:
        budget = config.kv_bytes()
    num_blocks = budget // per_block
    if num_blocks < 2:
        raise ValueError(f"kv_cache_memory={budget} bytes holds fewer than 2 pages of {per_block} bytes")
    return KVCacheSpec(int(num_blocks), config.block_size, per_block)


def resolve_max_model_len(config: EngineConfig, model: ModelConfig, kv: KVCacheSpec) -> int:
    limit = model.max_position_embeddings
    if model.sliding_window:
        limit = min(limit, model.sliding_window)  # no sliding-window attention: stay inside it
    want = config.max_model_len
    if want is not None:
        if want > limit:
            raise ValueError(f"max_model_len={want} exceeds the model's context of {limit} tokens")
        limit = want
    if kv.num_tokens < limit:
        if want is not None:
            raise ValueError(
                f"max_model_len={want} needs {want} KV slots but the cache holds {kv.num_tokens}; "
                "raise kv_cache_memory or lower max_model_len"
            )
        limit = kv.num_tokens  # one sequence must always fit alone, or preemption could not help it
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < limit:
        # Unchunked, a sequence is scheduled whole: one longer than a step's budget (a long prompt,
        # or a preempted sequence that grew) would wait forever.
        raise ValueError(
            f"max_num_batched_tokens={config.max_num_batched_tokens} is below max_model_len={limit}: "
            "with enable_chunked_prefill off every sequence must fit one step; raise "
            "max_num_batched_tokens, lower max_model_len or turn chunked prefill on"
        )
    return limit


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
