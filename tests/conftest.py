"""Shared fixtures: a tiny random-weight engine (fast) and the real default model + HF reference (slow)."""

from __future__ import annotations

import pytest
import torch

from forkllm import LLM

torch.set_num_threads(2)


def tiny_llm(**kw) -> LLM:
    """A 2-layer random-weight Llama with the default model's tokenizer (vocab 49152)."""
    args = dict(load_format="dummy", dtype="float32", kv_cache_memory="64MiB", seed=0)
    args.update(kw)
    return LLM("tiny", **args)


def serve_tiny_cmd(port: int, *extra: str) -> list[str]:
    """The `forkllm serve` command line of the tiny random-weight model on 127.0.0.1:port."""
    import sys

    return [
        sys.executable,
        "-m",
        "forkllm.cli",
        "serve",
        "tiny",
        "--load-format",
        "dummy",
        "--dtype",
        "float32",
        "--kv-cache-memory",
        "64MiB",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny() -> LLM:
    return tiny_llm()


@pytest.fixture(scope="session")
def real() -> LLM:
    """The embedded SmolLM2-135M-Instruct dequantized to float32 (what HF transformers runs), chunked
    prefill forced small."""
    return LLM(dtype="float32", kv_cache_memory="1GiB", max_num_batched_tokens=32, quantization="none")


@pytest.fixture(scope="session")
def hf_folder():
    from forkllm.bench.hf_peer import hf_folder_from_gguf

    return hf_folder_from_gguf()


@pytest.fixture(scope="session")
def hf_model(hf_folder):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32)
    m.eval()
    return m
