"""Hardware limits measured on the spot (bandwidth, GEMM rate) and the bounds they imply.

Each benchmark result is stated as a fraction of the relevant bound: decode is bounded by the
bytes a step must read (weights + KV) over memory bandwidth; batched work by FLOPs over the
matmul rate at the step's batch size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from forkllm.kernels import Kernels
from forkllm.models.config import ModelConfig
from forkllm.models.llama import Linear, dense_linear


@dataclass
class MachineLimits:
    bandwidth_gbs: float  # memory read bandwidth, GB/s
    gemm_gflops: dict[str, float]  # "float32@64" -> GFLOP/s on a 576x1536 weight

    def gemm(self, dtype: torch.dtype, m: int) -> float:
        name = str(dtype).removeprefix("torch.")
        key = f"{name}@{64 if m < 512 else 1024}"
        return self.gemm_gflops.get(key) or self.gemm_gflops[f"float32@{64 if m < 512 else 1024}"]


def _best(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_limits() -> MachineLimits:
    a = torch.ones(64 << 20)  # 256 MB of float32
    bw = a.numel() * 4 / _best(lambda: a.sum()) / 1e9
    # The matmul kernels an engine on this CPU would use (no attention: no head shape needed).
    kernels = Kernels.resolve(True, torch.device("cpu"), torch.bfloat16)
    rates: dict[str, float] = {}
    with torch.inference_mode():
        _measure_gemms(rates, kernels)
    return MachineLimits(bw, rates)


def _measure_gemms(rates: dict[str, float], kernels: Kernels) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(1536, 576).to(dtype)
        lin = Linear(576, 1536, bias=False).to(dtype)
        lin.set_kernels(kernels)  # bf16 on AVX512-BF16 without AMX: the packed kernel
        for m in (64, 1024):
            x = torch.randn(m, 576).to(dtype)
            # The best of oneDNN and the path forkllm's model takes: the limit is the machine's.
            t = min(_best(lambda x=x, w=w: dense_linear(x, w)), _best(lambda x=x, lin=lin: lin(x)))
            rates[f"{str(dtype).removeprefix('torch.')}@{m}"] = 2 * m * 576 * 1536 / t / 1e9


def flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Matmul FLOPs of one token: every weight once (the tied lm_head too) plus attention."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_layer = 2 * h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 2 * 3 * h * i
    attn = 2 * 2 * cfg.num_heads * d * context
    return cfg.num_layers * (per_layer + attn) + 2 * h * cfg.vocab_size


def weight_bytes(cfg: ModelConfig, dtype_size: int) -> int:
    """Bytes read per decode step: every weight except the (gathered, not streamed) embedding rows."""
    emb = cfg.vocab_size * cfg.hidden_size
    return (cfg.num_params - (0 if cfg.tie_word_embeddings else emb)) * dtype_size


def streamed_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step streams, as the model holds them (kept-quantized
    blocks, packed or dense matrices, the logits' weight), not counting embedding lookups."""
    from forkllm.models.int8 import Int8Linear
    from forkllm.models.quant import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear | Int8Linear):
            total += m.nbytes
        elif isinstance(m, Linear):
            w = m.packed if m.packed is not None else m.weight
            total += w.numel() * w.element_size()
    if getattr(model, "lm_head", None) is None and getattr(model, "quant_logits", None) is None:
        emb = model.get_parameter("embed_tokens.weight")
        total += emb.numel() * emb.element_size()
    return total


def decode_bound_seconds(
    cfg: ModelConfig,
    dtype_size: int,
    batch: int,
    context: int,
    lim: MachineLimits,
    weights: int | None = None,
) -> float:
    """`weights`: the bytes the model streams per step (streamed_weight_bytes), else every
    weight at dtype_size."""
    kv = batch * context * cfg.kv_bytes_per_token(dtype_size)
    w = weight_bytes(cfg, dtype_size) if weights is None else weights
    return (w + kv) / (lim.bandwidth_gbs * 1e9)


def compute_bound_seconds(total_flops: float, dtype: torch.dtype, m: int, lim: MachineLimits) -> float:
    return total_flops / (lim.gemm(dtype, m) * 1e9)
