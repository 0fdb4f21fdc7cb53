"""Issue 17: draft trees (engine/spec/tree.py). Several guesses per sequence are verified in one
forward, each node attending only its own ancestors; the kept path's KV moves to the slots a
chain would have used. A scripted proposer puts the right continuation on a later branch, so
the kept path is never the first guess: the output must still be the model's own, token for
token, which it cannot be if any node saw a sibling's KV or a moved key landed wrong."""

from __future__ import annotations

import pytest
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.engine.sequence import Request, Sequence
from forkllm.engine.spec import tree as draft_tree
from forkllm.engine.spec.decoder import StepCost, _in_grammar

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [100, 200, 300, 100], list(range(1000, 1030))]


class RightOnSecondBranch:
    """Guesses: a wrong chain first, the true continuation second (and a third wrong one that
    shares the truth's first token, so the tree has a fork below the root too)."""

    name = "scripted"
    draft_cost = 0.0

    def __init__(self, truth: dict[tuple[int, ...], list[int]]) -> None:
        self.truth = truth  # prompt -> prompt + the model's greedy output
        self.calls = 0

    def _true(self, seq: Sequence, k: int) -> list[int]:
        full = self.truth[tuple(seq.token_ids[: seq.num_prompt_tokens])]
        return full[seq.num_tokens : seq.num_tokens + k]

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self._true(s, k) for s, k in zip(seqs, ks)]

    def propose_trees(self, seqs, ks, width, caps):
        self.calls += 1
        out = []
        for s, k, cap in zip(seqs, ks, caps):
            true = self._true(s, k)
            if not true:
                out.append(([], []))
                continue
            wrong = [(t + 1) % 49152 for t in true]
            near = [*true[:1], *wrong[1:]]
            out.append(draft_tree.merge([wrong, true, near][:width], cap))
        return out

    def drop(self, request: Request) -> None:
        pass

    def clear_history(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


@pytest.fixture(scope="module")
def plain():
    return tiny_llm()


def _ids(outs):
    return [[o.token_ids for o in r.outputs] for r in outs]


@pytest.mark.parametrize("kernels", [True, False], ids=["cpp", "torch"])
def test_the_right_branch_is_kept_and_its_kv_moved(plain, kernels):
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = plain.generate(PROMPTS, sp, use_tqdm=False)
    truth = {tuple(p): p + o.outputs[0].token_ids for p, o in zip(PROMPTS, want)}
    llm = tiny_spec_llm(
        speculative="ngram", num_speculative_tokens=5, speculative_tree_width=3, enable_cpu_kernels=kernels
    )
    spec = llm.engine.spec
    assert spec is not None
    spec.proposer = RightOnSecondBranch(truth)
    assert _ids(llm.generate(PROMPTS, sp, use_tqdm=False)) == _ids(want)
    m = llm.engine.metrics()
    assert m["spec_tree_drafts"] > 0 and m["spec_branch_wins"] == m["spec_tree_drafts"]
    assert m["spec_mean_accepted_length"] > 3  # the true branch passes whole
    assert llm.engine.metrics()["kv_pages_in_use"] == 0


class WeightBound(StepCost):
    """A row costing 2% of a step, as on a real model's weight-bound decode. The tiny model's steps
    take ~0.3 ms, so the measured ratio (row ~ step) and with it whether anything is drafted at
    all varies with the machine; these tests are about what verification keeps, not that rule."""

    def ratio(self) -> float:
        return 0.02


def tiny_spec_llm(**kw):
    llm = tiny_llm(**kw)
    assert llm.engine.spec is not None
    llm.engine.spec.cost = WeightBound()
    return llm


def test_greedy_suffix_and_ngram_trees_are_lossless(plain):
    prompts = [*PROMPTS, [5, 6, 7, 5, 6, 8, 5, 6, 9, 5, 6]]  # (5, 6) went on three ways
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    want = _ids(plain.generate(prompts, sp, use_tqdm=False))
    wins = 0
    for name in ("suffix", "ngram"):
        llm = tiny_spec_llm(speculative=name, num_speculative_tokens=6, speculative_tree_width=3)
        assert _ids(llm.generate(prompts, sp, use_tqdm=False)) == want
        m = llm.engine.metrics()
        assert m["spec_tree_drafts"] > 0 and m["kv_pages_in_use"] == 0
        wins += m["spec_branch_wins"]
    assert wins > 0  # the proposers' second guesses were right sometimes


def test_sampled_output_identical_with_trees(plain):
    """At t = 0.8 (top-k 2) the sampled path leaves the greedy one: guesses from the greedy trajectory are
    kept sometimes, on any branch, rejected often; drafting is forced (a real run backs off)."""
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    truth = {
        tuple(p): p + o.outputs[0].token_ids
        for p, o in zip(PROMPTS, plain.generate(PROMPTS, greedy, use_tqdm=False))
    }
    llm = tiny_spec_llm(speculative="ngram", num_speculative_tokens=5, speculative_tree_width=3)
    spec = llm.engine.spec
    assert spec is not None
    spec.proposer = RightOnSecondBranch(truth)
    spec._rate = lambda req: 0.99  # type: ignore[method-assign]
    sp = SamplingParams(temperature=0.8, top_k=2, n=3, seed=11, max_tokens=32, ignore_eos=True)
    assert _ids(llm.generate(PROMPTS, sp, use_tqdm=False)) == _ids(
        plain.generate(PROMPTS, sp, use_tqdm=False)
    )
    m = llm.engine.metrics()
    assert m["spec_tree_drafts"] > 10 and 0 < m["spec_accepted_tokens"] < m["spec_draft_tokens"]


def test_tree_helpers():
    tokens, parents = draft_tree.merge([[1, 2, 3], [1, 5], [7]], max_nodes=10)
    assert (tokens, parents) == ([1, 2, 3, 5, 7], [-1, 0, 1, 0, -1])
    assert draft_tree.depths(parents) == [1, 2, 3, 2, 1]
    assert draft_tree.path_to(parents, 3) == [0, 3]
    # node 3 (token 5) at pos 10: context [0, 11) and slot 11 (node 0) in one run, its own slot 14
    segs = draft_tree.segments(parents, 10, 3)
    assert [(s.start, s.end) for s in segs] == [(0, 12), (14, 15)]
    assert [(s.start, s.end) for s in draft_tree.segments(parents, 10, 2)] == [(0, 14)]
    # sampled: row 0 (root) drew 1, row 1 (node 0) drew 5, row 4 (node 3) drew 9
    assert draft_tree.walk(tokens, parents, [1, 5, 0, 0, 9, 0]) == [0, 3]
    assert draft_tree.walk(tokens, parents, [7, 0, 0, 0, 0, 0]) == [4]
    assert draft_tree.walk(tokens, parents, [8, 0, 0, 0, 0, 0]) == []
    assert draft_tree.merge([[1, 2, 3], [4, 5, 6]], max_nodes=4) == ([1, 2, 3, 4], [-1, 0, 1, -1])


def test_a_grammar_cuts_tree_nodes_and_their_subtrees():
    class G:
        class matcher:  # allows paths that never contain token 9
            @staticmethod
            def validate_tokens(path):
                return next((i for i, t in enumerate(path) if t == 9), len(path))

    tokens, parents = draft_tree.merge([[1, 2, 3], [1, 9, 4], [5]], max_nodes=10)
    assert _in_grammar(G(), tokens, parents) == ([1, 2, 3, 5], [-1, 0, 1, -1])


def test_tree_width_must_be_positive():
    with pytest.raises(ValueError, match="speculative_tree_width must be >= 1"):
        tiny_llm(speculative="suffix", speculative_tree_width=0)
