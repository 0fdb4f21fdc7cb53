"""C++ CPU kernels, compiled on first use with torch's cpp_extension (gcc, 1-2 min once per machine).

- `paged_decode`: attention for single-query rows reading K/V straight from the cache pages.
- `shared_prefix_decode_` / `shared_prefix_attention`: many decode rows over one shared run of
  pages, K/V read once (bf16, AVX512-BF16 CPUs).
- `sample_filtered`: temperature / min-p / top-k / top-p sampling without a vocabulary sort.
- `small_linear`: x @ w.T for 1..8 rows, streaming weights on all threads (decode matmuls).
- `packed_linear`: bf16 x @ w.T for any rows on weights repacked by `pack_weight` (AVX512-BF16
  CPUs without AMX, where it beats oneDNN's bf16 GEMM at every batch size measured), and float32
  on CPUs with AVX2 but no AVX-512 (a 6-row matmul there costs about a 1-row one).
- `add_rms_norm_`, `silu_mul`, `rope_`, `kv_write_`: the decoder's elementwise ops, one pass each.
- `quant_linear`: x @ W.T on weights kept in GGUF Q4_0 / Q4_1 / Q8_0 blocks (int8 activations per
  32-block and VNNI dot products, as llama.cpp does; models/quant.py).
- `apply_token_bitmask_`: a grammar's token bitmask onto the logits (structured output), in place.

Everything here is optional. An engine resolves one `Kernels` object at start-up
(`Kernels.resolve`: EngineConfig.enable_cpu_kernels, the FORKLLM_KERNELS=0 override read there
once, the device, the dtype and the model's head shape) and hands it to the runner, the attention
backend, the sampler and the model; nothing on a hot path looks the kernels up again. When they
are off or the build fails, `Kernels.ops` is None and callers use plain PyTorch, which computes the
same values up to float rounding.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import torch

logger = logging.getLogger("forkllm")

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = (
    "bindings.cpp",
    "decode_stack.cpp",
    "paged_attention.cpp",
    "shared_prefix.cpp",
    "sampler.cpp",
    "gemv.cpp",
    "packed_gemm.cpp",
    "packed_f32.cpp",
    "elementwise.cpp",
    "bitmask.cpp",
    "quant_gemm.cpp",
)
ENV_SWITCH = "FORKLLM_KERNELS"  # "0" turns the kernels off whatever the config says
_BUILD_LOCK = threading.Lock()  # two engines starting on two threads build the extension once


class KernelOps(Protocol):
    """The compiled extension's functions (csrc/bindings.cpp)."""

    def paged_decode(
        self,
        q: torch.Tensor,
        kc: torch.Tensor,
        vc: torch.Tensor,
        tables: torch.Tensor,
        starts: torch.Tensor | None,
        ctx_lens: torch.Tensor,
        block_size: int,
        scale: float,
        want_lse: bool,
    ) -> list[torch.Tensor]: ...
    def paged_decode_supports(self, head_dim: int, group: int) -> bool: ...
    def shared_prefix_attention(
        self,
        q: torch.Tensor,
        kc: torch.Tensor,
        vc: torch.Tensor,
        pages: torch.Tensor,
        lens: torch.Tensor,
        rows: torch.Tensor,
        offsets: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> list[torch.Tensor]: ...
    def shared_prefix_decode_(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        kc: torch.Tensor,
        vc: torch.Tensor,
        pages: torch.Tensor,
        lens: torch.Tensor,
        rows: torch.Tensor,
        offsets: torch.Tensor,
        tables: torch.Tensor,
        ctx_lens: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> None: ...
    def shared_prefix_supported(self, head_dim: int) -> bool: ...
    def softmax_lse_(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor: ...
    def merge_attention_(
        self,
        out: torch.Tensor,
        s_lse: torch.Tensor,
        rows: torch.Tensor,
        p_out: torch.Tensor,
        p_lse: torch.Tensor,
    ) -> None: ...
    def sample_filtered(
        self,
        logits: torch.Tensor,
        temps: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        min_p: torch.Tensor,
        u: torch.Tensor,
    ) -> torch.Tensor: ...
    def add_rms_norm_(
        self, x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float
    ) -> torch.Tensor: ...
    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...
    def rope_(
        self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> None: ...
    def kv_write_(
        self, cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None: ...
    def small_linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...
    def apply_token_bitmask_(
        self, logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None
    ) -> None: ...
    def packed_linear_supported(self) -> bool: ...
    def packed_f32_supported(self) -> bool: ...
    def packed_silu_linear(self, x: torch.Tensor, P: torch.Tensor, I: int) -> torch.Tensor: ...  # noqa: E741
    def packed_linear(
        self, x: torch.Tensor, P: torch.Tensor, N: int, bias: torch.Tensor | None, float_out: bool = False
    ) -> torch.Tensor: ...
    def quant_linear(
        self, x: torch.Tensor, w: torch.Tensor, qtype: int, N: int, bias: torch.Tensor | None, float_out: bool
    ) -> torch.Tensor: ...
    def quant_linear_vnni(self) -> bool: ...
    def decode_stack(
        self,
        x: torch.Tensor,
        norms: list[torch.Tensor],
        weights: list[torch.Tensor],
        biases: list[torch.Tensor],
        kinds: list[int],
        qtypes: list[int],
        ns: list[int],
        caches: list[torch.Tensor],
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        tables: torch.Tensor,
        starts: torch.Tensor | None,
        ctx_lens: torch.Tensor,
        num_layers: int,
        hq: int,
        hkv: int,
        d: int,
        block_size: int,
        scale: float,
        eps: float,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class PagedDecodeRows:
    """A decode-only step whose rows each attend their own pages through the C++ paged kernel (no
    prefill chunk, shared-prefix group or key segment this step): what `KernelOps.decode_stack`, a
    pass over all layers in one call (models/llama.py), needs of the step's attention (made by
    attention/paged.py)."""

    kv_caches: list[torch.Tensor]  # one [2, Hkv, slots, D] per layer
    slot_mapping: torch.Tensor  # [T] where each row's key and value are written
    tables: torch.Tensor  # [T, pages] int64
    starts: torch.Tensor | None  # [T] first key each row attends; None: 0
    ctx_lens: torch.Tensor  # [T] keys each row sees
    block_size: int
    scale: float


class HeadShape(Protocol):
    """What kernel resolution needs of a model config (models.config.ModelConfig has it)."""

    @property
    def head_dim(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux; empty elsewhere): which kernels and dtypes are fast here."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def load_extension() -> KernelOps | None:
    """The compiled extension, or None when it cannot be built (no compiler or headers).

    Builds on the first call on a machine (torch caches the .so) and loads once per process: the
    shared library is process-global whoever asks, so the result is memoised here; whether an
    engine *uses* it is decided by `Kernels.resolve`."""
    with _BUILD_LOCK:
        return _load()


_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def build_directory() -> Path:
    """Where the extension is built: one folder per checkout (torch's build includes the source
    paths, so two checkouts sharing a folder rebuild it in turn) and per content of the sources,
    flags, torch version and machine, under $FORKLLM_KERNELS_DIR (default
    ~/.cache/forkllm/kernels). With torch's one folder per extension name, two checkouts kept
    rebuilding it and a build killed mid-way left a lock that hung every later start."""
    import hashlib
    import platform

    h = hashlib.sha256(str(_CSRC.resolve()).encode())
    for f in sorted(p.name for p in _CSRC.iterdir() if p.suffix in (".cpp", ".h")):
        h.update(f.encode() + b"\0" + (_CSRC / f).read_bytes())
    h.update(" ".join(_CFLAGS + [torch.__version__, platform.machine(), platform.node()]).encode())
    base = os.environ.get("FORKLLM_KERNELS_DIR") or Path.home() / ".cache" / "forkllm" / "kernels"
    return Path(base) / h.hexdigest()[:16]


@functools.cache
def _load() -> KernelOps | None:
    try:
        import fcntl

        from torch.utils.cpp_extension import load

        build = build_directory()
        build.mkdir(parents=True, exist_ok=True)
        # torch marks a build in progress with a `lock` file and waits for it to go away: one
        # left by a process killed mid-build would make every later start wait forever. Builders
        # here hold an OS lock (released when a process dies), so a `lock` found while holding
        # it is stale.
        with open(build / "forkllm.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            stale = build / "lock"
            if stale.exists():
                logger.warning("forkllm: removing a stale kernel build lock %s", stale)
                stale.unlink(missing_ok=True)
            module = load(
                name="forkllm_cpu_kernels",
                sources=[str(_CSRC / f) for f in _SOURCES],
                extra_include_paths=[str(_CSRC)],
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=False,
            )
    except Exception as e:  # no compiler or headers: the PyTorch path still works
        logger.warning("forkllm: C++ CPU kernels unavailable (%s); using PyTorch ops", e)
        return None
    return cast(KernelOps, module)


def env_allows_kernels(environ: Mapping[str, str]) -> bool:
    """False when FORKLLM_KERNELS=0: the operator's override of EngineConfig.enable_cpu_kernels."""
    return environ.get(ENV_SWITCH, "1") != "0"


@dataclass(frozen=True)
class Kernels:
    """The C++ kernels one engine uses and which of them fit its model, resolved once at start-up.

    `ops` is None when the kernels are off (config, FORKLLM_KERNELS=0, not a CPU, build failed);
    every flag is then False. With `ops`, the elementwise kernels, the small-batch GEMV, the KV
    cache write and the sampler kernel always run; the flags say which of the others do."""

    ops: KernelOps | None = None
    # paged_decode compiled in for this head_dim and GQA group (also gates the shared-prefix
    # softmax / merge kernels around the matmul path, as they were measured together)
    paged_decode: bool = False
    # the fused shared-prefix decode kernel: bf16 cache, AVX512-BF16 CPU, head_dim compiled in
    shared_prefix_fused: bool = False
    # the packed bf16 GEMM (AVX512-BF16 CPUs without AMX); bf16 weights only
    packed_gemm: bool = False
    # the packed float32 GEMM (AVX2 CPUs without AVX-512); float32 weights only
    packed_gemm_f32: bool = False
    # deterministic mode: every matmul through a kernel whose per-row result does not depend on
    # how many rows it runs with (the packed GEMM, else the GEMV in slices of its row limit)
    batch_invariant: bool = False

    @classmethod
    def disabled(cls) -> Kernels:
        """Plain PyTorch everywhere."""
        return cls()

    @classmethod
    def resolve(
        cls,
        enabled: bool,
        device: torch.device,
        dtype: torch.dtype,
        heads: HeadShape | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> Kernels:
        """The kernels an engine on `device` with `dtype` weights and caches and attention heads
        `heads` (None: no attention kernels) will use; builds the extension if needed."""
        if not (enabled and device.type == "cpu" and env_allows_kernels(environ)):
            return cls()
        ops = load_extension()
        if ops is None:
            return cls()
        paged = heads is not None and bool(
            ops.paged_decode_supports(heads.head_dim, heads.num_heads // heads.num_kv_heads)
        )
        fused = (
            paged
            and heads is not None
            and dtype == torch.bfloat16
            and bool(ops.shared_prefix_supported(heads.head_dim))
        )
        return cls(
            ops,
            paged_decode=paged,
            shared_prefix_fused=fused,
            packed_gemm=bool(ops.packed_linear_supported()),
            packed_gemm_f32=bool(ops.packed_f32_supported()),
        )

    def packs(self, dtype: torch.dtype) -> bool:
        """Whether weights of `dtype` are repacked for a packed GEMM compiled in here."""
        return (self.packed_gemm and dtype == torch.bfloat16) or (
            self.packed_gemm_f32 and dtype == torch.float32
        )


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] -> [ceil(N/16), K/2, 16, 2]: 16 outputs x one pair of k per 64-byte row, the
    operand layout of vdpbf16ps (see csrc/packed_gemm.cpp); float32 -> [ceil(N/16), K, 16]: 16
    outputs at one k per row (csrc/packed_f32.cpp). N is zero-padded to a multiple of 16."""
    n, k = w.shape
    if w.dtype == torch.float32:
        nb = -(-n // 16)
        if nb * 16 != n:
            w = torch.cat([w, w.new_zeros(nb * 16 - n, k)])
        return w.reshape(nb, 16, k).transpose(1, 2).contiguous()
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
    if packed.dim() == 3:  # float32
        nb, k = packed.shape[:2]
        return packed.transpose(1, 2).reshape(nb * 16, k)[:n].contiguous()
    nb, k2 = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(nb * 16, 2 * k2)[:n].contiguous()
