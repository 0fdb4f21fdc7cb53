"""The fused decode pass (csrc/decode_stack.cpp): a decode-only step's layers in one C++ call give
the same bits as the layers called one by one from Python, and it runs only where it applies."""

from __future__ import annotations

import pytest
from conftest import tiny_llm

from forkllm import LLM, SamplingParams
from forkllm.kernels import load_extension

needs_kernels = pytest.mark.skipif(load_extension() is None, reason="C++ kernels did not build")


class CountingOps:
    """The model's kernels, counting fused passes."""

    def __init__(self, ops):
        self.ops, self.calls = ops, 0

    def decode_stack(self, *args):
        self.calls += 1
        return self.ops.decode_stack(*args)

    def __getattr__(self, name):
        return getattr(self.ops, name)


def _run(llm: LLM, fused: bool, prompts, params) -> tuple[list, int]:
    model = llm.engine.runner.model
    if not fused:
        model.stack = None
    counting = CountingOps(model.ops)
    model.ops = counting
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [(c.token_ids, [sorted(d.items()) for d in c.logprobs or []]) for o in outs for c in o.outputs]
    return got, counting.calls


def _logprob_values(got):
    return [(ids, [[(t, lp.logprob) for t, lp in step] for step in lps]) for ids, lps in got]


PROMPTS = [
    {"prompt_token_ids": [(13 * i + 7 * j) % 30_000 + 100 for j in range(9 + 11 * i)]} for i in range(11)
]


@needs_kernels
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"dtype": "bfloat16"},
        {"deterministic": True},
        {"speculative": "self", "speculative_draft_layers": 1},
    ],
    ids=["float32", "bfloat16", "deterministic", "self-speculation"],
)
def test_fused_pass_gives_the_layers_bits(kw):
    """11 requests (more rows than the GEMV's 8), seeded sampling, n=2, logprobs: the same tokens and
    the same logprob values with the fused pass as without; and the fused pass did run."""
    params = SamplingParams(n=2, temperature=0.9, seed=5, max_tokens=20, ignore_eos=True, logprobs=2)
    fused, calls = _run(tiny_llm(**kw), True, PROMPTS, params)
    plain, none = _run(tiny_llm(**kw), False, PROMPTS, params)
    assert calls > 0 and none == 0
    assert _logprob_values(fused) == _logprob_values(plain)


@needs_kernels
def test_steps_with_shared_prefix_groups_stay_layer_by_layer():
    """Rows grouped over a shared prefix (here 4 samples of a 300-token prompt) attend through the
    shared-prefix path: no fused pass, and the same tokens as with the fused pass switched off."""
    prompt = [{"prompt_token_ids": [(29 * j) % 30_000 + 100 for j in range(300)]}]
    params = SamplingParams(n=4, temperature=1.0, seed=2, max_tokens=12, ignore_eos=True)
    grouped, calls = _run(tiny_llm(max_model_len=512), True, prompt, params)
    plain, _ = _run(tiny_llm(max_model_len=512), False, prompt, params)
    assert calls == 0
    assert grouped == plain


@needs_kernels
def test_no_fused_pass_for_prompt_steps_or_without_kernels():
    """A step with a prompt chunk runs the layers in Python; an engine without kernels has no stack."""
    llm = tiny_llm()
    model = llm.engine.runner.model
    assert model.stack is not None
    counting = CountingOps(model.ops)
    model.ops = counting
    llm.generate([PROMPTS[3]], SamplingParams(max_tokens=1), use_tqdm=False)  # one prefill step only
    assert counting.calls == 0
    assert tiny_llm(enable_cpu_kernels=False).engine.runner.model.stack is None
