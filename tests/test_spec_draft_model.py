"""Issue 17: speculative decoding with a draft model (engine/spec/draft_model.py). The draft is the
tiny random model itself (the same weights: every draft token must pass) or a perturbed copy
(drafts get rejected); either way the output is what the model writes without speculation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.engine.spec.draft_model import DraftModelProposer, check_same_vocabulary

PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], list(range(100, 140))]


@pytest.fixture(scope="module")
def base():
    return tiny_llm()


def drafted(perturb: float = 0.0):
    llm = tiny_llm(speculative="tiny")
    spec = llm.engine.spec
    assert spec is not None and isinstance(spec.proposer, DraftModelProposer)
    spec.proposer.draft_cost = 0.0  # same size as the model: drafting would never pay; force it
    if perturb:
        draft = llm.engine.draft_engine
        assert draft is not None
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in draft.runner.model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * perturb * p.std().clamp_min(1e-3))
    return llm


def outputs(llm, sp):
    return [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, sp, use_tqdm=False)]


def test_the_same_weights_draft_every_token_and_the_output_is_unchanged(base):
    llm = drafted()
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    assert outputs(llm, sp) == outputs(base, sp)
    m = llm.engine.metrics()
    assert m["spec_drafts"] > 0 and m["spec_acceptance_rate"] == 1.0
    assert m["spec_mean_accepted_length"] > 3
    draft = llm.engine.draft_engine
    assert draft is not None and not draft.has_unfinished_requests()
    assert draft.metrics()["kv_pages_in_use"] == 0  # only cached pages are left


def test_a_different_draft_is_rejected_often_and_changes_nothing(base):
    llm = drafted(perturb=0.5)
    for sp in (
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.8, max_tokens=32, n=4, seed=7, ignore_eos=True),
    ):
        assert outputs(llm, sp) == outputs(base, sp)
    m = llm.engine.metrics()
    assert m["spec_drafts"] > 0 and 0 < m["spec_accepted_tokens"] < m["spec_draft_tokens"]


def test_a_stop_string_inside_accepted_drafts(base):
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    text = base.generate(PROMPTS[:1], sp, use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, stop=[stop])
    want = base.generate(PROMPTS[:1], sp, use_tqdm=False)[0].outputs[0]
    got = drafted().generate(PROMPTS[:1], sp, use_tqdm=False)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")


class _Tok:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.backend = self
        self.vocab = vocab

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return self.vocab


def test_a_draft_model_needs_the_same_vocabulary():
    a, b = _Tok({"x": 0, "y": 1}), _Tok({"x": 1, "y": 0})
    check_same_vocabulary((2, a), (2, _Tok({"x": 0, "y": 1})), "d")
    with pytest.raises(ValueError, match="speculative: the draft model 'd' has a vocabulary of 3"):
        check_same_vocabulary((2, a), (3, None), "d")
    with pytest.raises(ValueError, match="speculative: the draft model 'd' has another tokenizer"):
        check_same_vocabulary((2, a), (2, b), "d")


def test_a_draft_model_that_cannot_load_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="speculative: the draft model .*could not be loaded"):
        tiny_llm(speculative=str(tmp_path / "missing.gguf"))


def test_a_bad_draft_kv_size_names_its_field():
    with pytest.raises(ValueError, match="speculative_draft_kv_memory must look like"):
        tiny_llm(speculative="tiny", speculative_draft_kv_memory="lots")
