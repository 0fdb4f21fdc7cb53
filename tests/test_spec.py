"""Speculative decoding: lossless (the same tokens with and without, greedy and sampled), the
sampled distribution, proposer state per request, and KV pages after many rejected drafts."""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.engine.scheduler import ScheduledSequence
from forkllm.engine.spec.decoder import SpeculativeDecoder
from forkllm.engine.spec.proposers import NgramProposer, SuffixProposer, _count, _History

# Prompts with repeated text, so the proposers find drafts in them and in the (looping) output of
# the random-weight model.
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7],
    [100, 200, 300, 100, 200, 300, 100, 200],
    list(range(1000, 1040)) + list(range(1000, 1020)),
]


@pytest.fixture(scope="module")
def plain():
    return tiny_llm()


@pytest.fixture(scope="module", params=["ngram", "suffix", "ngram-tree3", "suffix-tree3"])
def spec(request):
    name, _, width = request.param.partition("-tree")  # -treeW: draft trees of W guesses
    return tiny_llm(speculative=name, num_speculative_tokens=6, speculative_tree_width=int(width or 1))


def _ids(outs):
    return [[o.token_ids for o in r.outputs] for r in outs]


def test_greedy_tokens_identical_with_speculation(plain, spec):
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    before = dict(spec.engine.metrics())
    assert _ids(spec.generate(PROMPTS, sp)) == _ids(plain.generate(PROMPTS, sp))
    after = spec.engine.metrics()
    assert after["spec_draft_tokens"] > before["spec_draft_tokens"]
    assert after["spec_accepted_tokens"] > before["spec_accepted_tokens"]  # drafts were kept


def test_sampled_tokens_identical_with_speculation_n4(plain, spec):
    """Each draft position is drawn with the (seed, step) number it would have had without
    speculation, so even sampled output is the same token for token."""
    sp = SamplingParams(temperature=0.8, top_p=0.95, n=4, seed=7, max_tokens=48, ignore_eos=True)
    assert _ids(spec.generate(PROMPTS, sp)) == _ids(plain.generate(PROMPTS, sp))


def test_penalties_min_tokens_logprobs_identical(plain, spec):
    sp = SamplingParams(
        temperature=0.7,
        seed=3,
        max_tokens=40,
        min_tokens=30,
        repetition_penalty=1.2,
        frequency_penalty=0.3,
        presence_penalty=0.2,
        logprobs=2,
    )
    a, b = plain.generate(PROMPTS, sp), spec.generate(PROMPTS, sp)
    assert _ids(a) == _ids(b)
    for x, y in zip(a, b):
        assert x.outputs[0].logprobs is not None and y.outputs[0].logprobs is not None
        assert len(y.outputs[0].logprobs) == len(y.outputs[0].token_ids)
        for pa, pb in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert pa.keys() == pb.keys()
            for t in pa:
                assert pa[t].logprob == pytest.approx(pb[t].logprob, abs=1e-4)
        assert x.outputs[0].cumulative_logprob == pytest.approx(y.outputs[0].cumulative_logprob, abs=1e-3)


def test_stop_token_inside_an_accepted_draft_ends_there(plain, spec):
    """A stop that lands inside an accepted draft ends the sequence at that token; the draft's
    tokens after it are dropped."""
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    out = plain.generate(PROMPTS[:1], sp)[0].outputs[0].token_ids
    stop = out[40]
    sp_stop = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, stop_token_ids=[stop])
    a = plain.generate(PROMPTS[:1], sp_stop)[0].outputs[0]
    b = spec.generate(PROMPTS[:1], sp_stop)[0].outputs[0]
    assert a.token_ids == b.token_ids and b.finish_reason == "stop" and b.stop_reason == stop
    assert b.token_ids[-1] == stop


def test_stop_string_inside_an_accepted_draft():
    """The real tokenizer: a stop string in the middle of a run of accepted draft tokens."""
    plain, spec = tiny_llm(), tiny_llm(speculative="ngram")
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    text = plain.generate(PROMPTS[:1], sp)[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    sp_stop = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, stop=[stop])
    a = plain.generate(PROMPTS[:1], sp_stop)[0].outputs[0]
    b = spec.generate(PROMPTS[:1], sp_stop)[0].outputs[0]
    assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
    assert b.finish_reason == "stop" and stop not in b.text


def test_kv_pages_return_to_baseline_after_many_rejected_drafts():
    """Drafts that are mostly rejected (18 distinct samples at temperature 0.02) leave no page behind, and
    forked samples (which share pages copy-on-write) get the same tokens as without drafts: no
    sibling's page was written."""
    plain, spec = tiny_llm(), tiny_llm(speculative="suffix", num_speculative_tokens=8)
    eng = spec.engine
    base = eng.kv.pool.num_used
    sp = SamplingParams(temperature=0.02, n=6, seed=11, max_tokens=80, ignore_eos=True)
    assert _ids(spec.generate(PROMPTS, sp)) == _ids(plain.generate(PROMPTS, sp))
    m = eng.metrics()
    assert m["spec_draft_tokens"] > 20 and m["spec_accepted_tokens"] < m["spec_draft_tokens"]
    assert eng.kv.pool.num_used == base
    assert not eng.spec._acceptance  # per-request state dropped with the requests
    assert not eng.spec.proposer._requests


def test_abort_drops_proposer_state():
    spec = tiny_llm(speculative="ngram")
    eng = spec.engine
    base = eng.kv.pool.num_used
    rid = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=100, ignore_eos=True, temperature=0))
    for _ in range(5):
        eng.step()
    assert eng.spec.proposer._prompts
    eng.abort_request(rid)
    assert not eng.spec.proposer._prompts and not eng.spec.proposer._outputs
    assert eng.kv.pool.num_used == base


def _drafted_twice(spec, prompt, sp):
    """(draft tokens, accepted tokens, output) of the same request run twice, one after the other."""
    eng = spec.engine
    runs = []
    for _ in range(2):
        before = eng.metrics()
        out = spec.generate([prompt], sp)[0].outputs[0].token_ids
        after = eng.metrics()
        runs.append(
            (
                after["spec_draft_tokens"] - before["spec_draft_tokens"],
                after["spec_accepted_tokens"] - before["spec_accepted_tokens"],
                out,
            )
        )
    return runs


def test_second_identical_request_is_not_accepted_less():
    """Without history no state carries over: the same request twice drafts and accepts exactly
    the same. With it (the default) the second drafts from the first's output: it accepts more,
    and its tokens are still those of the engine without speculation."""
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompt = list(range(2000, 2030))  # no repeats: the prompt itself drafts nothing
    plain = tiny_llm().generate([prompt], sp)[0].outputs[0].token_ids
    first, second = _drafted_twice(tiny_llm(speculative="suffix", speculative_history_tokens=0), prompt, sp)
    assert first == second and first[2] == plain
    first, second = _drafted_twice(tiny_llm(speculative="suffix"), prompt, sp)
    assert first[2] == second[2] == plain
    assert second[1] > first[1] and second[1] >= 32, (first[:2], second[:2])


def test_structured_output_stays_in_grammar_with_drafts(plain, spec):
    from forkllm.structured.params import StructuredOutputsParams

    so = StructuredOutputsParams(regex=r"(ab|cd){5,30}")
    sp = SamplingParams(temperature=0.9, seed=5, n=3, max_tokens=64, structured=so)
    a, b = plain.generate(["x"], sp), spec.generate(["x"], sp)
    assert _ids(a) == _ids(b)
    import re

    for o in b[0].outputs:
        assert re.fullmatch(r"(ab|cd){5,30}", o.text), o.text


def test_self_speculation_greedy_and_sampled_identical(plain):
    """--speculative self: the model's first layer + LM head drafts (its KV at a draft position is
    what the full model writes there); output unchanged. Its drafting cost is zeroed here so the
    tiny model (whose LM head is nearly all its weights) drafts at all."""
    spec = tiny_llm(speculative="self", speculative_draft_layers=1, num_speculative_tokens=4)
    spec.engine.spec.proposer.draft_cost = 0.0
    base = spec.engine.kv.pool.num_used
    for sp in (
        SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
        SamplingParams(temperature=0.8, n=2, seed=4, max_tokens=32, ignore_eos=True),
    ):
        assert _ids(spec.generate(PROMPTS, sp)) == _ids(plain.generate(PROMPTS, sp))
    m = spec.engine.metrics()
    assert m["spec_draft_tokens"] > 0
    assert spec.engine.kv.pool.num_used == base


def test_self_speculation_backs_off_when_drafting_costs_more_than_it_saves():
    """With its real cost (the tiny model's LM head is ~97% of its weights) an early exit never
    pays: no draft is made and nothing is slower for it."""
    spec = tiny_llm(speculative="self")
    assert spec.engine.spec.proposer.draft_cost > 0.9
    spec.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert spec.engine.metrics()["spec_draft_tokens"] == 0


# ---- proposers --------------------------------------------------------------------------------
class _Seq:
    def __init__(self, tokens, prompt, sid="s", index=0, at_fork=0, req=None):
        self.token_ids = tokens
        self.num_prompt_tokens = prompt
        self.seq_id = sid
        self.num_output_at_fork = at_fork
        self.request = req or _Req()


class _Req:
    request_id = "r"
    seqs: list = []


def test_ngram_proposes_the_latest_continuation():
    p = NgramProposer(min_n=2, max_n=3)
    s = _Seq([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2], prompt=4)
    assert p.propose(s, 3) == [3, 5, 6]  # the later "1 2" (in the output) wins
    s.token_ids.append(7)
    assert p.propose(s, 3) == []


def test_suffix_drafts_from_siblings():
    """A sibling's output drafts for the other: the most frequent continuation of the context."""
    p = SuffixProposer(min_n=2, max_n=4)
    req = _Req()
    a = _Seq([1, 2, 3, 10, 11, 12, 13, 14], prompt=3, sid="a", req=req)
    b = _Seq([1, 2, 3, 10, 11], prompt=3, sid="b", req=req)
    req.seqs = [a, b]
    assert p.propose(a, 0) == []  # feeds a's text
    assert p.propose(b, 3) == [12, 13, 14]


def test_suffix_history_drafts_from_finished_requests_only():
    """A finished request's outputs draft for later requests (behind the request's own table at
    equal context length); aborted and pruned outputs are not kept; clear_history forgets."""
    p = SuffixProposer(min_n=1, max_n=3, history_tokens=100)
    done = _Req()
    done.seqs = [_Seq([1, 2, 3, 10, 11, 12, 13], prompt=3, sid="a", req=done)]
    gone = _Req()
    gone.seqs = [_Seq([1, 2, 3, 20, 21, 22], prompt=3, sid="b", req=gone)]
    for seq, reason in ((done.seqs[0], "stop"), (gone.seqs[0], "abort")):
        seq.finish_reason = reason
    p.drop(done)
    p.drop(gone)
    assert p.history.num_tokens == 4  # the finished output only
    new = _Req()
    new.request_id = "n"
    assert p.propose(_Seq([7, 2, 3], prompt=3, sid="c", req=new), 4) == [10, 11, 12, 13]
    assert p.history_drafts == 1
    # its own text wins at the same context length: "2 3 -> 30" in the prompt beats the history
    own = _Req()
    own.request_id = "o"
    assert p.propose(_Seq([2, 3, 30, 31, 2, 3], prompt=6, sid="d", req=own), 2) == [30, 31]
    assert p.history_drafts == 1
    # a longer context in the history beats a shorter one of its own ("3 -> 50" vs "2 3 -> 10")
    longer = _Req()
    longer.request_id = "l"
    assert p.propose(_Seq([3, 50, 9, 2, 3], prompt=5, sid="f", req=longer), 2) == [10, 11]
    assert p.history_drafts == 2
    p.clear_history()
    assert p.history.num_tokens == 0 and not p.history.table
    new.request_id = "n2"
    assert p.propose(_Seq([7, 2, 3], prompt=3, sid="e", req=new), 4) == []


def test_suffix_history_is_bounded_and_evicts_its_counts():
    """At most max_tokens output tokens are held; the oldest leaves first and the table is then
    exactly the count of the outputs still held."""
    h = _History(range(3, 0, -1), max_tokens=10)
    outs = [([1, 2, 3] + list(range(10 * k, 10 * k + 4)), 3) for k in range(1, 6)]
    for tokens, p in outs:
        h.add(tokens, p)
        assert h.num_tokens <= 10
    assert h.num_tokens == 8  # the last two outputs of 4 tokens
    expect: dict = {}
    for tokens, p in outs[-2:]:
        keep = tokens[max(0, p - 3) :]
        _count(expect, range(3, 0, -1), keep, p - 1 - (len(tokens) - len(keep)), len(keep) - 1)
    assert h.table == expect
    h.add(list(range(100, 150)), 5)  # longer than the history: only its last 10 tokens
    assert h.num_tokens == 10 and (149,) not in h.table and h.table[(148,)] == {149: 1}
    assert (110,) not in h.table and h.table[(140,)] == {141: 1}


def test_history_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="speculative_history_tokens must be >= 0"):
        tiny_llm(speculative="suffix", speculative_history_tokens=-1)


# ---- the sampled distribution -------------------------------------------------------------------
def test_verification_samples_the_target_distribution():
    """Chi-square over 4,000 draws on an 8-token vocabulary: the first token kept after a draft
    follows softmax(logits / T) whether the draft is the most likely token or an unlikely one."""
    from forkllm.engine.sampler import Sampler

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]])
    probs = torch.softmax(logits / 0.9, dim=-1)[0].tolist()
    sampler = Sampler([99])

    class P:
        greedy = False

    for draft_token in (0, 5):
        hist: collections.Counter[int] = collections.Counter()
        accepted = 0
        dec = SpeculativeDecoder(NgramProposer(), 1, 100)
        for seed in range(4000):
            seq = _FakeSeq(seed)
            item = ScheduledSequence(seq, 2, [draft_token])  # type: ignore[arg-type]
            rows = dec.rows(item)
            out = sampler(torch.cat([logits, logits]), rows).token_ids
            a = len(dec.accept(item, out))
            accepted += a
            hist[out[0] if a == 0 else draft_token] += 1
        n = 4000
        chi2 = sum((hist[t] - n * probs[t]) ** 2 / (n * probs[t]) for t in range(8))
        assert chi2 < 24.3, (draft_token, chi2, hist)  # p = 0.001 at 7 degrees of freedom
        assert abs(accepted / n - probs[draft_token]) < 4 * math.sqrt(probs[draft_token] / n) + 0.01


class _FakeSeq:
    def __init__(self, seed: int) -> None:
        from forkllm.engine.sampling_params import SamplingParams as SP

        self.seed = seed
        self.params = SP(temperature=0.9)
        self.grammar = None
        self.num_prompt_tokens = 1
        self.token_ids = [1, 2]
        self.request = _Req()

    @property
    def num_output_tokens(self):
        return len(self.token_ids) - 1

    @property
    def output_token_ids(self):
        return self.token_ids[1:]


# ---- over HTTP ----------------------------------------------------------------------------------
def test_server_streams_drafted_tokens_and_exports_metrics(plain):
    """`serve --speculative`: a stream's deltas (several tokens each when drafts pass) add up to
    the text without speculation, and /metrics carries the speculation counters."""
    import httpx

    pytest.importorskip("uvicorn")
    from test_server import LiveServer

    from forkllm.engine.async_engine import AsyncEngine
    from forkllm.server.app import ServerConfig, create_app

    engine = AsyncEngine(tiny_llm(speculative="ngram").engine)
    srv = LiveServer(create_app(ServerConfig(served_model_name="tiny"), engine=engine))
    try:
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 48, "temperature": 0, "ignore_eos": True}
        with httpx.stream(
            "POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        want = plain.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
        assert text == want[0].outputs[0].text
        assert len([c for c in chunks if c["choices"] and c["choices"][0]["text"]]) < 48  # several per delta
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        accepted = [ln for ln in metrics.splitlines() if ln.startswith("forkllm_spec_accepted_tokens ")]
        assert accepted and float(accepted[0].split()[1]) > 0
    finally:
        srv.stop()
        engine.shutdown()
