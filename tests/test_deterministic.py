"""Deterministic mode (`deterministic=True`): a seeded request's tokens do not depend on the
prefix cache, on chunking, or on what else is in the batch, because every token attends through
the per-row kernel and every matmul's per-row sums run in one order whatever the batch."""

from __future__ import annotations

import pytest
from conftest import tiny_llm

from forkllm import SamplingParams

PROMPT = [(37 * i) % 40_000 + 100 for i in range(96)]  # 6 full pages: a cache hit computes 1 token
PARAMS = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=24)


def _samples(llm, others: int = 0) -> list[list[int]]:
    prompts = [{"prompt_token_ids": PROMPT}] + [
        {"prompt_token_ids": [(11 * i + j) % 30_000 + 50 for j in range(20 + 3 * i)]} for i in range(others)
    ]
    params = [PARAMS] + [SamplingParams(temperature=0.9, seed=i, max_tokens=24) for i in range(others)]
    return [c.token_ids for c in llm.generate(prompts, params, use_tqdm=False)[0].outputs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_tokens_with_cache_chunking_and_batching(dtype):
    llm = tiny_llm(dtype=dtype, deterministic=True, max_model_len=512)
    cold = _samples(llm)
    assert _samples(llm) == cold  # the whole prompt from the prefix cache: its last token alone
    llm.engine.kv.pool.drop_cached()
    assert _samples(llm, others=63) == cold  # in a batch of 64 requests
    chunked = tiny_llm(
        dtype=dtype,
        deterministic=True,
        max_model_len=512,
        enable_prefix_caching=False,
        max_num_batched_tokens=40,
    )
    assert _samples(chunked) == cold  # three prompt chunks, no cache


def test_deterministic_needs_the_kernels():
    with pytest.raises(ValueError, match="deterministic=True needs the C\\+\\+ CPU kernels"):
        tiny_llm(deterministic=True, enable_cpu_kernels=False)
