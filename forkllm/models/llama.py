"""One config-driven Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3).

The model sees a flat batch: token ids [T], positions [T] and an attention context that owns the
KV cache and knows which tokens belong to which sequence. It knows nothing about scheduling.
q/k/v and gate/up projections are fused into one matmul each: fewer, larger ops are what a CPU
(and a GPU at small batch) rewards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from forkllm.kernels import (
    KernelOps,
    Kernels,
    PagedDecodeRows,
    pack_gate_up,
    pack_weight,
    unpack_gate_up,
    unpack_weight,
)
from forkllm.models.config import ModelConfig
from forkllm.models.quant import QuantLinear
from forkllm.models.rope import RotaryApplier, RotaryEmbedding


class AttentionContext(Protocol):
    """Per-step attention state handed to the model by the runner (see forkllm.attention)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (already rotated) -> attention output [T, Hq, D]."""
        ...

    def paged_rows(self) -> PagedDecodeRows | None:
        """The step as plain paged decode rows on the C++ kernel, or None (attention/paged.py)."""
        ...


SMALL_BATCH_ROWS = 8  # up to this many rows, matmuls stream the weights with the C++ GEMV kernel


def packs(kernels: Kernels, w: torch.Tensor) -> bool:
    """Whether `w` is repacked for a packed-GEMM kernel: bf16 on AVX512-BF16 CPUs without AMX,
    float32 on AVX2 CPUs without AVX-512, where each beats oneDNN and the GEMV at every batch size
    measured (csrc/packed_gemm.cpp, csrc/packed_f32.cpp)."""
    return (
        kernels.packs(w.dtype)
        and w.device.type == "cpu"
        and w.dim() == 2
        and (w.dtype == torch.float32 or w.shape[1] % 2 == 0)
    )


# oneDNN's float32 GEMM, called on plain dense tensors. On this AMD CPU it runs 2.2x torch's
# default (MKL) sgemm at 64+ rows; unpacked bf16 matmuls go to oneDNN through F.linear.
_ONEDNN_F32 = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def dense_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    if _ONEDNN_F32 and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def gemv_rows(ops: KernelOps, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T through the GEMV, SMALL_BATCH_ROWS rows at a time: each row's sums run in the same
    order whatever the number of rows (deterministic mode's matmul where the packed GEMM does not
    run; one call for a decode-sized batch)."""
    x = x.contiguous()
    if x.shape[0] == 0:
        return x.new_empty((0, w.shape[0]))
    if x.shape[0] <= SMALL_BATCH_ROWS:
        return ops.small_linear(x, w, b)
    return torch.cat(
        [ops.small_linear(x[i : i + SMALL_BATCH_ROWS], w, b) for i in range(0, x.shape[0], SMALL_BATCH_ROWS)]
    )


class Linear(nn.Linear):
    """nn.Linear that, once given the CPU kernels, routes decode-sized inputs to a multi-threaded
    GEMV, or, where a packed GEMM is compiled in for its dtype (bf16: AVX512-BF16 and no AMX;
    float32: AVX2 and no AVX-512), every input to the packed GEMM.
    A packed layer drops its row-major weight (memory is not doubled); `set_kernels(Kernels.disabled())`
    restores it."""

    ops: KernelOps | None = None
    packed: torch.Tensor | None = None  # set only together with ops
    invariant = False  # Kernels.batch_invariant: unpacked weights go through the GEMV at any rows

    def set_kernels(self, kernels: Kernels) -> None:
        if self.packed is not None and not kernels.packs(self.packed.dtype):
            self.weight = nn.Parameter(unpack_weight(self.packed, self.out_features), requires_grad=False)
            self.packed = None
        self.ops = kernels.ops
        self.invariant = kernels.batch_invariant
        if self.packed is None and packs(kernels, self.weight):
            self.packed = pack_weight(self.weight.detach())
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self.ops
        if ops is not None:
            if self.packed is not None:
                return ops.packed_linear(x.contiguous(), self.packed, self.out_features, self.bias)
            if 0 < x.shape[0] <= SMALL_BATCH_ROWS or self.invariant:
                return gemv_rows(ops, x, self.weight, self.bias)
        return dense_linear(x, self.weight, self.bias)


class GateUpLinear(Linear):
    """The fused [2I, K] gate/up projection of a SwiGLU MLP. Where the packed GEMM runs, its weight
    is packed gate-block / up-block interleaved and `silu_forward` gets silu(gate) * up straight
    from the GEMM's accumulators (no [T, 2I] intermediate, one bf16 rounding)."""

    interleaved = False  # self.packed is pack_gate_up's layout, not pack_weight's

    def set_kernels(self, kernels: Kernels) -> None:
        i = self.out_features // 2
        if self.interleaved and self.packed is not None:  # back to the plain layout: Linear handles that
            self.packed = pack_weight(unpack_gate_up(self.packed, i))
            self.interleaved = False
        super().set_kernels(kernels)
        if self.packed is not None and self.bias is None and i % 16 == 0:
            self.packed = pack_gate_up(unpack_weight(self.packed, self.out_features), i)
            self.interleaved = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            raise RuntimeError("gate_up_proj is packed for the fused activation: call silu_forward")
        return super().forward(x)

    def silu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for rows x."""
        i = self.out_features // 2
        ops = self.ops
        if self.interleaved and ops is not None and self.packed is not None:
            return ops.packed_silu_linear(x.contiguous(), self.packed, i)
        gate_up = self.forward(x)
        if ops is not None:
            return ops.silu_mul(gate_up)
        return F.silu(gate_up[:, :i]) * gate_up[:, i:]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    ops: KernelOps | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op; for bf16 it accumulates in float32 internally (HF instead rounds to bf16
        # before scaling: a last-bit difference, and a third of the ops).
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream x plus delta (x is updated in place by the kernel), and its norm."""
        ops = self.ops
        if ops is not None and x.dim() == 2 and x.dtype == self.weight.dtype:
            return x, ops.add_rms_norm_(x, delta, self.weight, self.eps)
        if delta is not None:
            x = x + delta
        return x, self.forward(x)


# How csrc/decode_stack.cpp multiplies a layer's weight (its `Kind`)
QUANT, PACKED, GEMV, PACKED_SILU = 0, 1, 2, 3


@dataclass
class DecodeStack:
    """Every layer's weights as csrc/decode_stack.cpp takes them: what `Linear`, `GateUpLinear`,
    `QuantLinear` and `RMSNorm` would call, so the fused pass computes the same bits."""

    norms: list[torch.Tensor] = field(default_factory=list)  # input, post-attention per layer; final
    weights: list[torch.Tensor] = field(default_factory=list)  # qkv, o, gate/up, down per layer
    biases: list[torch.Tensor] = field(default_factory=list)  # empty: none
    kinds: list[int] = field(default_factory=list)
    qtypes: list[int] = field(default_factory=list)
    ns: list[int] = field(default_factory=list)
    gemv: bool = False  # some weight goes through the GEMV: its rows limit applies (Linear.forward)

    def add(self, m: nn.Module) -> bool:
        """Appends linear `m` if the fused pass can run it as its module would (else False)."""
        if isinstance(m, QuantLinear):
            one = m.one_part
            if m.ops is None or one is None:
                return False
            w, kind, qtype, n, bias = one[0], QUANT, one[1], one[2], m.bias
        elif isinstance(m, Linear):
            if m.ops is None:
                return False
            if isinstance(m, GateUpLinear) and m.interleaved:
                assert m.packed is not None
                w, kind, qtype, n, bias = m.packed, PACKED_SILU, 0, m.out_features // 2, None
            elif m.packed is not None:
                w, kind, qtype, n, bias = m.packed, PACKED, 0, m.out_features, m.bias
            else:
                w, kind, qtype, n, bias = m.weight, GEMV, 0, m.out_features, m.bias
                self.gemv = True
        else:
            return False
        self.weights.append(w)
        self.biases.append(bias if bias is not None else w.new_empty(0))
        self.kinds.append(kind)
        self.qtypes.append(qtype)
        self.ns.append(n)
        return True


def decode_stack(layers: list[DecoderLayer], final_norm: RMSNorm, dtype: torch.dtype) -> DecodeStack | None:
    """The layers' weights for the fused decode pass, or None where a layer has something it does
    not run (q/k norms, a GGUF q/k/v split in several types, int8 weights, no kernels)."""
    stack = DecodeStack()
    for layer in layers:
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if layer.q_norm is not None or any(n.ops is None or n.weight.dtype != dtype for n in norms):
            return None
        stack.norms.extend(n.weight for n in norms)
        for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            if not stack.add(m):
                return None
    if final_norm.weight.dtype != dtype:
        return None
    stack.norms.append(final_norm.weight)
    return stack


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.gate_up_proj = GateUpLinear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.intermediate_size = cfg.intermediate_size

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor | None, rope: RotaryApplier, attn: AttentionContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream x plus the previous layer's pending output `delta` in; the updated
        stream and this layer's MLP output out (added by the next norm, one pass instead of two)."""
        t = x.shape[0]
        x, h = self.input_layernorm.add_forward(x, delta)
        # .forward, not __call__: no module hooks here, and a decode step makes ~150 such calls
        qkv = self.qkv_proj.forward(h)
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        v = qkv[:, self.q_size + self.kv_size :].view(t, hkv, d)
        qk = qkv[:, : self.q_size + self.kv_size].view(t, hq + hkv, d)  # q and k heads rotate in one go
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :hq]), self.k_norm(qk[:, hq:])], dim=1)
        qk = rope(qk)
        q, k = qk[:, :hq], qk[:, hq:]
        o = attn.attend(self.layer_idx, q, k, v)
        x, h = self.post_attention_layernorm.add_forward(x, self.o_proj.forward(o.reshape(t, self.q_size)))
        return x, self.down_proj.forward(self.gate_up_proj.silu_forward(h))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, rope_freq_factors: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self._layer_list: list[DecoderLayer] = list(self.layers)  # type: ignore[arg-type]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # tied embeddings kept quantized (models/quant.py): the logits' weight; lookups stay dense
        self.quant_logits: QuantLinear | None = None
        self.lm_head = (
            None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, rope_freq_factors
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionContext,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """Flat batch in, final-normed hidden states [T, hidden] out. `num_layers`: only the first
        layers (self-speculation drafts from an early exit; their KV is what the full model
        writes for the same tokens)."""
        x = self.embed_tokens(input_ids)
        stack, ops = self.stack, self.ops
        if (
            stack is not None
            and ops is not None
            and (x.shape[0] <= SMALL_BATCH_ROWS or not stack.gemv or self.invariant)
        ):
            rows = attn.paged_rows()
            if rows is not None:  # a decode-only step on the paged kernel: every layer in one call
                cfg = self.config
                return ops.decode_stack(
                    x,
                    stack.norms,
                    stack.weights,
                    stack.biases,
                    stack.kinds,
                    stack.qtypes,
                    stack.ns,
                    rows.kv_caches,
                    positions,
                    *self.rotary.tables_f32,
                    rows.slot_mapping,
                    rows.tables,
                    rows.starts,
                    rows.ctx_lens,
                    cfg.num_layers if num_layers is None else num_layers,
                    cfg.num_heads,
                    cfg.num_kv_heads,
                    cfg.head_dim,
                    rows.block_size,
                    rows.scale,
                    self.norm.eps,
                )
        rope = RotaryApplier(self.rotary, positions, x.dtype, self.ops)
        delta: torch.Tensor | None = None
        # a plain list: slicing the ModuleList would build a new ModuleList (30 add_module calls)
        # every step
        layers = self._layer_list if num_layers is None else self._layer_list[:num_layers]
        for layer in layers:
            x, delta = layer.forward(x, delta, rope, attn)
        return self.norm.add_forward(x, delta)[1]

    def use_cpu_kernels(self, kernels: Kernels) -> None:
        """Route matmuls through the C++ kernels (weights repacked for the packed GEMM where it is
        compiled in for their dtype, else the GEMV for decode-sized batches) and the norms, MLP activation
        and rotary embedding through the fused elementwise kernels (`Kernels.disabled()`: PyTorch,
        weights restored to their row-major layout). Called once, when the engine starts."""
        self.ops = kernels.ops
        self.invariant = kernels.batch_invariant
        dtype = self.embed_tokens.weight.dtype
        for m in self.modules():
            if isinstance(m, Linear):
                m.set_kernels(kernels)
            elif isinstance(m, QuantLinear):
                m.set_kernels(kernels, dtype)
            elif isinstance(m, RMSNorm):
                m.ops = kernels.ops
        # Tied embeddings: the table stays row-major for lookups, the logits get a packed copy.
        tied = self.lm_head is None and self.quant_logits is None and packs(kernels, self.embed_tokens.weight)
        self.packed_logits = pack_weight(self.embed_tokens.weight.detach()) if tied else None
        self.stack = None if kernels.ops is None else decode_stack(self._layer_list, self.norm, dtype)

    ops: KernelOps | None = None
    packed_logits: torch.Tensor | None = None  # set only together with ops
    # Decode-only steps on the paged kernel run all layers in one C++ call (csrc/decode_stack.cpp,
    # the same kernels in the same order); set by use_cpu_kernels where every layer is eligible
    stack: DecodeStack | None = None
    invariant = False  # Kernels.batch_invariant

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits in float32 for the selected rows only."""
        head, ops = self.lm_head, self.ops
        if isinstance(head, QuantLinear):
            return head(hidden, float_out=True)
        if self.quant_logits is not None:
            return self.quant_logits(hidden, float_out=True)
        if head is not None and head.packed is not None and ops is not None:  # float32 from the accumulators
            return ops.packed_linear(hidden.contiguous(), head.packed, head.out_features, head.bias, True)
        if head is not None:
            return head(hidden).float()
        w = self.embed_tokens.weight
        if ops is not None:
            if self.packed_logits is not None:
                return ops.packed_linear(hidden.contiguous(), self.packed_logits, w.shape[0], None, True)
            if 0 < hidden.shape[0] <= SMALL_BATCH_ROWS or self.invariant:
                return gemv_rows(ops, hidden, w, None).float()
        return dense_linear(hidden, w).float()
