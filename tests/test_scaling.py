"""Inference-time scaling policies on a tiny model with scripted extractors and scorers."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.scaling import BeamSearch, BestOfN, ParticleFilter, SelfConsistency, extract, scorers
from forkllm.scaling.voting import leader_probability

PROMPT = list(range(400, 430))


def first_char(text: str) -> str | None:
    return text[:1] or None


def assert_pages_free(llm):
    pool = llm.engine.kv.pool
    assert not llm.engine.has_unfinished_requests()
    assert pool.num_free == pool.num_usable


def reference_texts(n, seed, max_tokens, temperature=1.0):
    out = tiny_llm().generate(
        [PROMPT],
        SamplingParams(n=n, seed=seed, max_tokens=max_tokens, temperature=temperature),
        use_tqdm=False,
    )[0]
    return [c.text for c in sorted(out.outputs, key=lambda c: c.index)], out


def test_extractors():
    assert extract.last_number("so 3 + 4 = 7, then 1,234.0 apples") == "1234"
    assert extract.last_number("no digits") is None
    assert extract.boxed(r"thus \boxed{\frac{1}{2}} and \boxed{42}") == "42"
    assert extract.boxed(r"\boxed{x^{2}}") == "x^{2}"
    assert extract.regex(r"answer is (\w+)")("the answer is foo. the answer is bar") == "bar"
    assert extract.by_name("regex:#### (\\d+)")("a #### 12") == "12"


def test_self_consistency_votes_exactly():
    texts, ref = reference_texts(6, seed=21, max_tokens=8)
    llm = tiny_llm()
    r = llm.scale(PROMPT, SelfConsistency(n=6, extract=first_char, temperature=1.0, max_tokens=8, seed=21))
    expected = Counter(first_char(t) for t in texts)
    assert r.votes == {k: float(v) for k, v in expected.items()}
    assert r.answer == max(expected, key=lambda k: (expected[k], -[first_char(t) for t in texts].index(k)))
    assert sorted(c.text for c in r.candidates) == sorted(texts)
    assert (r.forks, r.prunes) == (5, 0)
    assert r.tokens_generated == sum(len(c.token_ids) for c in ref.outputs)
    assert_pages_free(llm)


def test_leader_probability_by_hand():
    assert leader_probability(3, 0) == pytest.approx(15 / 16)  # P(Bin(4, 1/2) <= 3)
    assert leader_probability(2, 2) == pytest.approx(0.5)
    assert leader_probability(5, 1) == pytest.approx(sum(math.comb(7, j) for j in range(6)) / 128)


def test_self_consistency_early_stop_prunes_when_decided():
    llm = tiny_llm()
    policy = SelfConsistency(
        n=8,
        extract=lambda t: "X",
        early_stop=True,
        min_votes=3,
        confidence=0.999,
        temperature=1.0,
        max_tokens=40,
        seed=3,
    )

    def converge_first_five():  # scripted Answer-Convergence: samples 0-4 state "X" after 2 tokens
        for s in policy.tree.live():
            if s.index < 5 and s.num_output_tokens >= 2:
                policy.answers[s.seq_id] = "X"
                policy.tree.prune(s)

    policy.converge_tokens = 1
    policy._prune_converged = converge_first_five
    r = llm.scale(PROMPT, policy)
    # 5 votes for X, 3 samples running: X cannot be overtaken (5 > 0 + 3), so those 3 are pruned
    assert r.extra["decided_early"] is True
    assert r.votes == {"X": 5.0} and r.answer == "X"
    assert r.prunes == 5 + 3
    assert r.tokens_generated == 8 * 2
    assert_pages_free(llm)


def test_budget_is_respected_exactly():
    llm = tiny_llm()
    r = llm.scale(
        PROMPT, SelfConsistency(n=4, extract=first_char, temperature=1.0, max_tokens=20, seed=1, budget=30)
    )
    assert r.tokens_generated == 30
    with pytest.raises(ValueError, match="budget"):
        llm.scale(PROMPT, SelfConsistency(n=8, budget=5))
    assert_pages_free(llm)


def test_best_of_n_with_verifier_picks_highest_score():
    texts, _ = reference_texts(5, seed=8, max_tokens=10)
    llm = tiny_llm()
    r = llm.scale(
        PROMPT,
        BestOfN(
            n=5,
            scorer=scorers.Verifier(lambda q, t: len(t)),
            extract=first_char,
            temperature=1.0,
            max_tokens=10,
            seed=8,
        ),
    )
    assert r.text == max(texts, key=len)
    assert sorted(c.score for c in r.candidates) == sorted(float(len(t)) for t in texts)
    assert (r.forks, r.prunes) == (4, 0)
    assert_pages_free(llm)


def test_best_of_n_self_judge_reuses_candidate_pages():
    llm = tiny_llm()
    before = llm.engine.metrics()["prefix_cache_reused_tokens"]
    r = llm.scale(PROMPT, BestOfN(n=3, scorer=scorers.SelfJudge(), temperature=1.0, max_tokens=40, seed=2))
    assert len(r.candidates) == 3 and all(c.score is not None and c.score <= 0 for c in r.candidates)
    # each judge request starts with its candidate's tokens: their full pages come from the cache
    assert llm.engine.metrics()["prefix_cache_reused_tokens"] - before >= 3 * 64
    assert_pages_free(llm)


def test_beam_search_tree_shape_by_hand():
    llm = tiny_llm()
    # steps end every 3 tokens; width 2, expand 3, 3 steps; scorer: text length (deterministic)
    r = llm.scale(
        PROMPT,
        BeamSearch(
            width=2,
            expand=3,
            max_steps=3,
            max_step_tokens=3,
            delimiter="\x00",
            scorer=scorers.Verifier(lambda q, t: len(t)),
            temperature=1.0,
            max_tokens=100,
            seed=4,
        ),
    )
    # step 1: 3 samples (2 engine forks), keep 2: 1 loser pruned; 2 x 3 forks, 2 parents pruned
    # step 2: 6 candidates, keep 2: 4 pruned; 2 x 3 forks, 2 parents pruned
    # step 3: 6 candidates, keep 2 (4 pruned); max_steps reached: the 2 survivors pruned
    assert r.forks == 2 + 6 + 6
    assert r.prunes == (1 + 2) + (4 + 2) + (4 + 2)
    assert r.tokens_generated == 3 * 3 + 6 * 3 + 6 * 3
    assert r.extra["steps"] == 3
    assert_pages_free(llm)


def test_particle_filter_resampling_seeded_and_normalised():
    pf = ParticleFilter(n=6, seed=5)
    weights = [0.0, -math.inf, 1.0, 2.0, -math.inf, 0.5]
    counts = pf.resample_counts(weights)
    assert sum(counts) == 6 and counts[1] == 0 and counts[4] == 0
    assert sum(pf.history[-1]) == pytest.approx(1.0)
    assert pf.history[-1][1] == 0.0 and pf.history[-1][4] == 0.0
    assert ParticleFilter(n=6, seed=5).resample_counts(weights) == counts
    assert scorers.softmax([-math.inf, -math.inf]) == [0.5, 0.5]


def test_particle_filter_run_is_reproducible_and_never_draws_minus_inf():
    def reward(q, text):  # particles whose text has an even length are impossible
        return -math.inf if len(text) % 2 == 0 else 1.0

    def run():
        llm = tiny_llm()
        pf = ParticleFilter(
            n=5,
            reward=reward,
            max_steps=4,
            max_step_tokens=2,
            delimiter="\x00",
            temperature=1.0,
            max_tokens=30,
            seed=9,
            extract=first_char,
        )
        r = llm.scale(PROMPT, pf)
        assert_pages_free(llm)
        return r, pf

    a, pf = run()
    b, _ = run()
    assert (a.answer, a.text, a.forks, a.prunes, a.tokens_generated) == (
        b.answer,
        b.text,
        b.forks,
        b.prunes,
        b.tokens_generated,
    )
    for probs in pf.history:
        assert sum(probs) == pytest.approx(1.0)


def test_many_policies_share_the_batch():
    llm = tiny_llm()
    policies = [
        SelfConsistency(n=4, extract=first_char, temperature=1.0, max_tokens=6, seed=i) for i in range(3)
    ]
    results = llm.scale_batch([PROMPT, PROMPT[:20], PROMPT[5:]], policies)
    assert [len(r.candidates) for r in results] == [4, 4, 4]
    assert_pages_free(llm)


@pytest.mark.parametrize("name", ["self-consistency", "best-of-n", "beam-search", "particle-filter"])
def test_eval_equal_token_budget_caps_every_strategy(name):
    from forkllm.bench.eval import policy_for

    llm = tiny_llm()
    policy = policy_for(name, 4, "arithmetic", max_tokens=40, seed=3, tokens_per_sample=10)
    r = llm.scale(PROMPT, policy)
    assert policy.budget == 40
    assert r.tokens_generated <= 40
    assert_pages_free(llm)
