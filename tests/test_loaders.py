"""Loaders: GGUF vs safetensors agree, dummy models, clear errors."""

from __future__ import annotations

import json
import time

import pytest
import torch

from forkllm import LLM, SamplingParams
from forkllm.models.config import ModelConfig, UnsupportedModelError
from forkllm.models.loader import load_model


def test_dummy_two_layer_model_runs_fast():
    t0 = time.perf_counter()
    llm = LLM(
        {
            "architecture": "llama",
            "vocab_size": 1000,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 256,
        },
        load_format="dummy",
        dtype="float32",
        kv_cache_memory="8MiB",
        tokenizer=None,
    )
    out = llm.generate(
        [[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    assert [len(o.outputs[0].token_ids) for o in out] == [20, 20]
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_dummy_architectures(arch):
    cfg = {
        "model_type": arch,
        "vocab_size": 512,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 128,
        "rope_theta": 1e6,
    }
    lm = load_model(cfg, load_format="dummy")
    assert lm.config.attention_bias == (arch == "qwen2")
    assert lm.config.qk_norm == (arch == "qwen3")
    llm = LLM(cfg, load_format="dummy", dtype="float32", kv_cache_memory="4MiB")
    out = llm.generate(
        [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 5


def test_llama3_rope_scaling_config():
    cfg = ModelConfig.from_hf(
        {
            "model_type": "llama",
            "vocab_size": 100,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "rope_theta": 500000.0,
            "max_position_embeddings": 1024,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        }
    )
    assert cfg.rope_scaling["rope_type"] == "llama3"
    from forkllm.models.rope import inverse_frequencies

    base = inverse_frequencies(16, 500000.0, None)
    scaled = inverse_frequencies(16, 500000.0, cfg.rope_scaling)
    assert torch.allclose(scaled[0], base[0])  # high frequencies untouched
    assert torch.allclose(scaled[-1], base[-1] / 8)  # low frequencies divided by the factor


def test_missing_path_is_clear():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM("/no/such/model.gguf")


def test_unsupported_architecture_is_clear(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "hidden_size": 8}
        )
    )
    with pytest.raises(UnsupportedModelError, match="unsupported architecture"):
        LLM(str(tmp_path))


def test_corrupt_gguf_is_clear(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises(ValueError, match="not a valid GGUF"):
        LLM(str(bad))
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(ValueError, match="not a valid GGUF"):
        LLM(str(trunc))


@pytest.mark.slow
def test_gguf_and_safetensors_give_same_logits(hf_folder):
    """The GGUF loader (ours) and the HF folder written by transformers' GGUF reader agree."""
    a = load_model(None, dtype=torch.float32)
    b = load_model(hf_folder, dtype=torch.float32)
    assert a.config.num_layers == b.config.num_layers and b.config.tie_word_embeddings
    for (na, pa), (nb, pb) in zip(sorted(a.model.state_dict().items()), sorted(b.model.state_dict().items())):
        assert na == nb
        assert torch.equal(pa, pb), na
    ids = a.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert ids == b.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    from forkllm.attention.paged import AttentionMetadata, PagedAttention, PrefillSpan

    def logits(lm):
        n = len(ids)
        cache = [
            torch.zeros(2, lm.config.num_kv_heads, 32, lm.config.head_dim)
            for _ in range(lm.config.num_layers)
        ]
        meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[PrefillSpan(0, n, 0, None, None)])
        with torch.inference_mode():
            return lm.model.compute_logits(
                lm.model(
                    torch.tensor(ids),
                    torch.arange(n),
                    PagedAttention(cache, meta, 16, lm.config.head_dim**-0.5),
                )
            )

    assert torch.equal(logits(a), logits(b))
