"""Sampler semantics on hand-made logits, and logprobs checked against log_softmax of the model."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from forkllm import SamplingParams
from forkllm.attention.metadata import AttentionMetadata, PrefillSpan
from forkllm.attention.paged import TorchAttention
from forkllm.engine.detokenizer import IncrementalDetokenizer
from forkllm.engine.outputs import RequestMetrics
from forkllm.engine.sampler import Sampler, derive_seed, uniform
from forkllm.engine.sequence import Request, Sequence

VOCAB = 8


def _seq(params: SamplingParams, prompt=(1, 2, 3), output=(), seed=0) -> Sequence:
    req = Request("r", None, list(prompt), params, RequestMetrics(0.0))
    s = Sequence(
        "r",
        req,
        0,
        list(prompt) + list(output),
        len(prompt),
        seed,
        IncrementalDetokenizer.for_prompt(len(prompt)),
    )
    req.seqs.append(s)
    return s


def _draws(logits: list[float], params: SamplingParams, n: int = 2000) -> Counter:
    sampler = Sampler(eos_token_ids=[7])
    seqs = [_seq(params, seed=derive_seed(99, i)) for i in range(n)]
    out = sampler(torch.tensor([logits] * n), seqs)
    return Counter(out.token_ids)


PROBS = [0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0]
LOGITS = [math.log(p) if p else -1e9 for p in PROBS]


def test_uniform_is_deterministic_and_spread():
    assert uniform(5, 3) == uniform(5, 3)
    xs = [uniform(5, i) for i in range(4000)]
    assert all(0 <= x < 1 for x in xs)
    assert abs(sum(xs) / len(xs) - 0.5) < 0.02
    assert derive_seed(5, 0) == 5 and derive_seed(5, 1) != derive_seed(5, 2)


def test_temperature_one_matches_distribution():
    counts = _draws(LOGITS, SamplingParams(temperature=1.0))
    for tok, p in enumerate(PROBS[:4]):
        assert abs(counts[tok] / 2000 - p) < 0.04
    assert set(counts) <= {0, 1, 2, 3}


def test_greedy_and_degenerate_filters_pick_argmax():
    for params in (
        SamplingParams(temperature=0),
        SamplingParams(top_k=1),
        SamplingParams(top_p=0.01),
        SamplingParams(min_p=1.0),
    ):
        assert set(_draws(LOGITS, params, 200)) == {0}


def test_top_k_and_top_p_sets():
    assert set(_draws(LOGITS, SamplingParams(top_k=2))) == {0, 1}
    # top_p=0.5: 0.4 alone is < 0.5, so token 1 joins; token 2 would start past the mass.
    assert set(_draws(LOGITS, SamplingParams(top_p=0.5))) == {0, 1}
    assert set(_draws(LOGITS, SamplingParams(top_p=0.75))) == {0, 1, 2}
    # min_p=0.6: keep tokens with p >= 0.6 * 0.4 = 0.24.
    assert set(_draws(LOGITS, SamplingParams(min_p=0.6))) == {0, 1}
    counts = _draws(LOGITS, SamplingParams(top_k=2))
    assert abs(counts[0] / 2000 - 0.4 / 0.7) < 0.04


def test_rows_do_not_influence_each_other():
    sampler = Sampler(eos_token_ids=[])
    plain = _seq(SamplingParams(temperature=1.0), seed=11)
    alone = sampler(torch.tensor([LOGITS]), [plain]).token_ids
    other = _seq(SamplingParams(top_p=0.3, top_k=2, repetition_penalty=1.3), seed=12)
    mixed = sampler(torch.tensor([LOGITS, LOGITS]), [other, plain]).token_ids
    assert mixed[1] == alone[0]


def test_penalties():
    sampler = Sampler(eos_token_ids=[])
    flat = [1.0, 1.0, 0.5, -1.0, 0, 0, 0, 0]
    # repetition: token 0 seen in the prompt -> 1.0 / 2 = 0.5 < 1.0, greedy moves to token 1.
    s = _seq(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=(0, 5))
    assert sampler(torch.tensor([flat]), [s]).token_ids == [1]
    # presence penalty applies to generated tokens only (token 1 generated once).
    s = _seq(SamplingParams(temperature=0, presence_penalty=0.6), prompt=(0,), output=(1,))
    assert sampler(torch.tensor([[1.0, 1.5, 0.5, 0, 0, 0, 0, 0]]), [s]).token_ids == [0]
    # frequency penalty scales with the count: token 1 generated 3 times -> 1.5 - 3 * 0.2 = 0.9 < 1.0
    s = _seq(SamplingParams(temperature=0, frequency_penalty=0.2), output=(1, 1, 1))
    assert sampler(torch.tensor([[1.0, 1.5, 0.5, 0, 0, 0, 0, 0]]), [s]).token_ids == [0]


def test_min_tokens_bans_eos_and_stop_tokens():
    sampler = Sampler(eos_token_ids=[0])
    s = _seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]))
    assert sampler(torch.tensor([LOGITS]), [s]).token_ids == [2]
    s = _seq(SamplingParams(temperature=0, min_tokens=2), output=(4, 4))
    assert sampler(torch.tensor([LOGITS]), [s]).token_ids == [0]


def _reference_logits(llm, ids: list[int]) -> torch.Tensor:
    """Full-sequence causal forward, independent of the paged decode path."""
    engine = llm.engine
    runner = engine.runner
    n = len(ids)
    scratch = [torch.zeros(2, c.shape[1], (n // 16 + 2) * 16, c.shape[3]) for c in runner.kv_caches]
    meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[PrefillSpan(0, n, 0, None, None)])
    with torch.inference_mode():
        h = runner.model(
            torch.tensor(ids), torch.arange(n), TorchAttention(16, runner.scale).context(scratch, meta)
        )
        return runner.model.compute_logits(h)


def test_logprobs_equal_log_softmax_of_raw_logits(tiny):
    prompt = list(range(300, 330))
    k = 4
    out = tiny.generate(
        [prompt],
        SamplingParams(
            temperature=0.7, seed=5, max_tokens=12, logprobs=k, prompt_logprobs=2, ignore_eos=True
        ),
        use_tqdm=False,
    )[0]
    c = out.outputs[0]
    ref = torch.log_softmax(_reference_logits(tiny, prompt + c.token_ids), dim=-1)
    assert len(c.logprobs) == len(c.token_ids) == 12
    total = 0.0
    for i, (tok, pos) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert tok in pos and len(pos) in (k, k + 1)
        assert pos[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert pos[tok].rank == int((row > row[tok]).sum()) + 1
        top = row.topk(k).indices.tolist()
        assert [t for t, lp in sorted(pos.items(), key=lambda kv: kv[1].rank)][:k] == top
        total += pos[tok].logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-3)
    # prompt logprobs: None for the first token, then the logprob of each prompt token.
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        pos = out.prompt_logprobs[i]
        assert pos[prompt[i]].logprob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
        assert len(pos) in (2, 3)


def test_prompt_logprobs_with_chunked_prefill():
    from conftest import tiny_llm

    prompt = list(range(500, 545))
    a = tiny_llm().generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    b = tiny_llm(max_num_batched_tokens=8).generate(
        [prompt], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False
    )[0]
    assert len(b.prompt_logprobs) == len(prompt)
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert x.keys() == y.keys()
        for t in x:
            assert x[t].logprob == pytest.approx(y[t].logprob, abs=1e-4)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.3, min_p=0.05),
        SamplingParams(top_p=0.9),
        SamplingParams(temperature=0.8, top_p=0.95),
        SamplingParams(top_k=50),
        SamplingParams(temperature=1.2, top_k=2000, top_p=0.8),
        SamplingParams(temperature=0.9, top_p=0.9, logit_bias={5: 3.0, 77: -100.0, 1000: 8.5}),
    ],
)
def test_kernel_draws_the_pytorch_tokens(params):
    """The C++ sampler (every random row on CPU) draws the PyTorch path's token for the same
    uniform number: vocabulary order for unfiltered rows, rank order under top-p."""
    from forkllm.kernels import Kernels

    kernels = Kernels.resolve(True, torch.device("cpu"), torch.float32)
    if kernels.ops is None:
        pytest.skip("C++ kernels could not be built here")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 49152, generator=g) * 3
    seqs = [_seq(params, seed=derive_seed(7, i)) for i in range(300)]
    plain = Sampler(eos_token_ids=[]).__call__(logits, seqs).token_ids
    fused = Sampler(eos_token_ids=[], kernels=kernels).__call__(logits, seqs).token_ids
    assert fused == plain


# ---- logit_bias and finite numbers (issue 15) -----------------------------------------------------------
def test_logit_bias_is_added_before_sampling():
    sampler = Sampler(eos_token_ids=[])
    flat = [1.0, 1.0, 0.5, -1.0, 0, 0, 0, 0]
    # -1 + 5 = 4 beats every other logit; greedy follows.
    s = _seq(SamplingParams(temperature=0, logit_bias={3: 5.0}))
    assert sampler(torch.tensor([flat]), [s]).token_ids == [3]
    # -100 bans: 0 and 1 gone, 2 is the best left.
    s = _seq(SamplingParams(temperature=0, logit_bias={0: -100, 1: -100}))
    assert sampler(torch.tensor([flat]), [s]).token_ids == [2]
    # random sampling too, and a biased row leaves its neighbours alone.
    assert set(_draws(LOGITS, SamplingParams(logit_bias={3: 100}), 200)) == {3}
    plain = _seq(SamplingParams(temperature=1.0), seed=11)
    alone = sampler(torch.tensor([LOGITS]), [plain]).token_ids
    biased = _seq(SamplingParams(temperature=1.0, logit_bias={2: 100}), seed=12)
    mixed = sampler(torch.tensor([LOGITS, LOGITS]), [biased, plain]).token_ids
    assert mixed == [2, alone[0]]


def test_logprobs_stay_those_of_the_raw_logits_under_a_bias():
    sampler = Sampler(eos_token_ids=[])
    s = _seq(SamplingParams(temperature=0, logprobs=1, logit_bias={3: 100}))
    out = sampler(torch.tensor([LOGITS]), [s])
    chosen, _ = out.logprobs[0]
    assert out.token_ids == [3] and chosen == pytest.approx(math.log(0.1), rel=1e-4)


def test_without_a_bias_the_logits_reach_the_sampler_untouched():
    """The fused kernel path must see exactly the model's logits (bit-identical draws)."""
    from forkllm.engine.sampler import _apply_logit_bias

    logits = torch.randn(3, VOCAB)
    assert (
        _apply_logit_bias(logits, [SamplingParams(), SamplingParams(logit_bias={}), SamplingParams()])
        is logits
    )


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "field",
    ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"],
)
def test_sampling_params_refuse_non_finite_numbers(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "bias", [{-1: 1.0}, {True: 1.0}, {"5": 1.0}, {5: 100.5}, {5: math.nan}, {5: math.inf}, [1, 2]]
)
def test_sampling_params_refuse_bad_logit_bias(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


def test_sampling_params_check_ids_against_the_vocabulary():
    SamplingParams(logit_bias={7: 1.0}).check_vocab(8)
    with pytest.raises(ValueError, match="logit_bias token id 8"):
        SamplingParams(logit_bias={8: 1.0}).check_vocab(8)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=2**63)


def test_a_huge_temperature_with_a_grammar_stays_inside_it():
    """temperature 3.4e38 (allowed by the API) with a JSON grammar: every token the grammar allows,
    none past the vocabulary (1 / T flushed to 0 made NaN probabilities; the draw ran off the end)."""
    from conftest import tiny_llm

    from forkllm import SamplingParams
    from forkllm.structured.params import StructuredOutputsParams

    llm = tiny_llm()
    sp = SamplingParams(
        temperature=3.4028235677973366e38, max_tokens=4, seed=3, structured=StructuredOutputsParams(json={})
    )
    out = llm.generate([[1, 2, 3]], sp, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 1 and out.finish_reason in ("length", "stop")
