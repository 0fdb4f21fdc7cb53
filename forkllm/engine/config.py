"""EngineConfig: every engine knob, validated in one place (names follow vLLM's engine args)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from forkllm.kv.prefix_cache import EVICTION_POLICIES
from forkllm.models.quant import QUANTIZATIONS

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
DEFAULT_CPU_KV_BYTES = 4 << 30


def _flag(default: Any, help: str, **extra: Any) -> Any:
    """A field with its command-line help: engine/args.py builds every flag from these."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EngineConfig:
    """Every engine knob, with its one default and its help text (the CLI flags are generated
    from these fields by engine/args.py)."""

    # None: the embedded default; a path; or a preset/config with load_format="dummy"
    model: Any = _flag(
        None,
        "a .gguf file or an HF folder (config.json + safetensors + tokenizer.json); "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    tokenizer: str | None = _flag(None, "folder with tokenizer.json, if not the model's own")
    load_format: str = _flag(
        "auto",
        "how to read --model; 'dummy' = random weights from a config or preset name "
        "(smollm2-135m, tiny, llama-0.5b, llama-1b, llama-8b)",
        choices=["auto", "gguf", "safetensors", "dummy"],
    )
    quantization: str = _flag(
        "auto",
        "weights kept quantized: 'gguf' keeps a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks (other quantized "
        "types become Q8_0) and multiplies on them, as llama.cpp does; 'int8' quantizes float weights to "
        "Q8_0 blocks; 'w8a8' runs the decoder's matmuls as int8 weights (per channel) x int8 activations (per "
        "token) on the VNNI integer GEMM (CPUs with VNNI or AMX only), ~3x bf16 on prompts and large batches where the CPU's bf16 dot product is "
        "slow (slower single-stream decode, +3.6%% perplexity); 'none' dequantizes to --dtype; auto = none for now",
        choices=list(QUANTIZATIONS),
    )
    dtype: str = _flag(
        "auto",
        "float32 | bfloat16 | float16 | auto (CPU: bfloat16 when the CPU has AVX512-BF16/AMX, "
        "else float32; FORKLLM_CPU_DTYPE overrides; CUDA: bfloat16)",
    )
    device: str = _flag("auto", "cpu | cuda[:N] | auto (CUDA when available)")
    block_size: int = _flag(16, "tokens per KV page (a power of two)")
    kv_cache_memory: int | float | str | None = _flag(
        None, "KV cache size, e.g. 4GiB or 512MiB (CPU default 4GiB; CUDA: from --gpu-memory-utilization)"
    )
    gpu_memory_utilization: float = _flag(
        0.9, "CUDA: fraction of device memory for weights + KV cache, in (0, 1]"
    )
    num_kv_blocks: int | None = _flag(None, "exact number of KV pages (overrides the size)")
    max_num_seqs: int = _flag(256, "most sequences in one batch")
    max_num_batched_tokens: int = _flag(2048, "token budget of one step (prefill chunks + decodes)")
    max_model_len: int | None = _flag(None, "context limit (default: the model's)")
    enable_chunked_prefill: bool = _flag(
        True, "split long prompts into chunks that share steps with decodes (SARATHI)"
    )
    # A prompt near the context length must not delay everyone's first token by many steps: its
    # chunk is first cut to this, the other prompts take their chunks, and what budget is left
    # goes back to the cut chunk (a prompt alone is chunked exactly as without the cut).
    long_prefill_token_threshold: int | None = _flag(
        None,
        "with chunked prefill, one prompt's chunk is first cut to this many tokens so other "
        "prompts get chunks in the same step; leftover budget extends it again "
        "(default: a quarter of --max-num-batched-tokens; 0: no cut)",
    )
    # One wide request (n samples, a search tree) must not take every slot of the batch.
    max_seq_share: float = _flag(
        0.5,
        "most of --max-num-seqs that one request's sequences may take while other requests want "
        "slots (its other samples wait); requests share the batch max-min fairly under this cap",
    )
    # A step's time grows with its work, and every request in it waits for the whole step: one
    # request's 128 decode rows or a chunk deep in a near-context prompt would slow everyone's
    # tokens several-fold. Each request gets a max-min fair share of this much work per step.
    fair_step_tokens: int | None = _flag(
        None,
        "a step holds at most this much work (tokens, a chunk deep in a long context weighted by "
        "its attention cost; a request alone too, since a step cannot be interrupted), split "
        "max-min fairly between requests; a long-running request gets at most a quarter of it "
        "while newer ones have work (default: the long-prefill threshold; 0: off)",
    )
    enable_prefix_caching: bool = _flag(True, "reuse the KV pages of prompt prefixes seen before")
    prefix_cache_eviction: str = _flag(
        "lru",
        "which idle cached pages go first when the pool needs room: 'lru' the least recently used; "
        "'lfu' the least reused, then the least recently used (keeps system prompts many requests "
        "share over each request's own text; suits a replica behind the prefix router)",
        choices=list(EVICTION_POLICIES),
    )
    enable_shared_prefix_attention: bool = _flag(
        True, "decode rows that share leading pages read them once per step (forks, shared prompts)"
    )
    # Decode rows sharing fewer leading tokens attend separately: below ~256 shared tokens the extra
    # per-layer work of the shared path costs more than it saves (W1 prompts share 32 template tokens).
    min_shared_prefix_tokens: int = _flag(
        256, "shortest common prefix (tokens) for which decode rows attend to it together"
    )
    deterministic: bool = _flag(
        False,
        "batch-invariant results: the same seed gives the same tokens with the prefix cache on or "
        "off, chunked or not, alone or in any batch (every token attends through the per-row kernel, "
        "every matmul through a kernel whose per-row sums do not depend on the batch; no shared-prefix "
        "attention); needs the CPU kernels; costs prefill speed (README: Deterministic mode)",
    )
    enable_cpu_kernels: bool = _flag(
        True, "the optional C++ CPU kernels (FORKLLM_KERNELS=0 also turns them off); off = PyTorch ops"
    )
    speculative: str | None = _flag(
        None,
        "speculative decoding: 'ngram' (prompt lookup over each sequence's own text), 'suffix' "
        "(one n-gram table per request over its prompt and all its samples' outputs, then recent "
        "finished requests' outputs) or 'self' (the "
        "model's first layers + LM head draft), or a draft model with the same tokenizer (a .gguf "
        "file, an HF folder, or a preset with --load-format dummy); lossless, and a draft is made only "
        "when the step's measured cost says it pays",
    )
    speculative_draft_kv_memory: int | float | str | None = _flag(
        None, "--speculative with a draft model: its KV cache size (default: a quarter of the model's)"
    )
    speculative_tree_width: int = _flag(
        1,
        "--speculative ngram|suffix: guesses a draft may hold (> 1: a draft tree, every branch verified "
        "in the same forward with a tree mask; 1: one chain, the better choice on CPUs, where each "
        "extra row costs; see README)",
    )
    speculative_history_tokens: int = _flag(
        16384,
        "--speculative suffix: output tokens of recent finished requests it also drafts from "
        "(SuffixDecoding's global tree; the longest matching context wins, the request's own text at "
        "equal length; 0: none)",
    )
    speculative_draft_layers: int | None = _flag(
        None, "--speculative self: layers of the early exit that drafts (default: a quarter of the model's)"
    )
    num_speculative_tokens: int = _flag(
        7,
        "most draft tokens per sequence per step (7: with its last token a sequence is 8 rows, the most "
        "the decode matmul kernel takes in one pass)",
    )
    seed: int = _flag(0, "engine seed: seeds of requests that give none")
    num_threads: int | None = _flag(None, "torch CPU threads (default: all cores)")

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}"
            )
        if self.prefix_cache_eviction not in EVICTION_POLICIES:
            raise ValueError(
                f"prefix_cache_eviction must be 'lru' or 'lfu'; got {self.prefix_cache_eviction!r}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 0:
            raise ValueError(
                f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}"
            )
        if self.fair_step_tokens is not None and self.fair_step_tokens < 0:
            raise ValueError(f"fair_step_tokens must be >= 0, got {self.fair_step_tokens}")
        if not 0 < self.max_seq_share <= 1:
            raise ValueError(f"max_seq_share must be in (0, 1], got {self.max_seq_share}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(set(DTYPES))}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.speculative is not None and not str(self.speculative).strip():
            raise ValueError("speculative must be 'ngram', 'suffix', 'self' or a draft model, got ''")
        if self.speculative_draft_kv_memory is not None:
            try:
                parse_bytes(self.speculative_draft_kv_memory)
            except ValueError as e:
                raise ValueError(
                    str(e).replace("kv_cache_memory", "speculative_draft_kv_memory", 1)
                ) from None
        if self.speculative_tree_width < 1:
            raise ValueError(f"speculative_tree_width must be >= 1, got {self.speculative_tree_width}")
        if self.speculative_history_tokens < 0:
            raise ValueError(
                f"speculative_history_tokens must be >= 0, got {self.speculative_history_tokens}"
            )
        if self.speculative_draft_layers is not None and self.speculative_draft_layers < 1:
            raise ValueError(f"speculative_draft_layers must be >= 1, got {self.speculative_draft_layers}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")

    def prefill_chunk_cut(self) -> int:
        """long_prefill_token_threshold resolved: 0 = no cut (also with chunked prefill off)."""
        if not self.enable_chunked_prefill:
            return 0
        if self.long_prefill_token_threshold is None:
            return max(1, self.max_num_batched_tokens // 4)
        return self.long_prefill_token_threshold

    def fair_step_budget(self) -> int:
        """fair_step_tokens resolved: 0 = off."""
        if self.fair_step_tokens is None:
            return self.prefill_chunk_cut()
        return self.fair_step_tokens

    def kv_bytes(self) -> int:
        return parse_bytes(self.kv_cache_memory) if self.kv_cache_memory is not None else DEFAULT_CPU_KV_BYTES


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
