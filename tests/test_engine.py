"""Engine behaviour on a tiny random-weight model: counts, stops, seeds, preemption, chunking."""

from __future__ import annotations

import random

import pytest
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.engine.sampling_params import RequestOutputKind


def _prompts(n: int, lo: int = 5, hi: int = 60, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _greedy_ids(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_max_tokens_exact_count_and_reason(tiny):
    outs = tiny.generate(
        _prompts(3), SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False
    )
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 7
        assert c.finish_reason == "length"
        assert o.finished


def test_outputs_in_prompt_order_and_per_prompt_params(tiny):
    prompts = _prompts(3)
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in (3, 5, 9)]
    outs = tiny.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5, 9]
    assert [o.prompt_token_ids for o in outs] == prompts


def test_chunked_prefill_matches_unchunked():
    prompts = _prompts(6, lo=20, hi=90, seed=1)
    ref = _greedy_ids(tiny_llm(), prompts)
    chunked = tiny_llm(max_num_batched_tokens=7)
    assert _greedy_ids(chunked, prompts) == ref


def test_batched_matches_one_at_a_time(tiny):
    prompts = _prompts(5, seed=2)
    batched = _greedy_ids(tiny, prompts)
    alone = [_greedy_ids(tiny, [p])[0] for p in prompts]
    assert batched == alone


def test_preemption_completes_with_same_output():
    prompts = _prompts(8, lo=18, hi=30, seed=3)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = _greedy_ids(tiny_llm(), prompts, params)
    # 8 sequences x ~70 tokens need ~40 pages of 16; give the pool 12.
    small = tiny_llm(num_kv_blocks=12)
    got = _greedy_ids(small, prompts, params)
    assert got == ref
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.kv.pool.num_free == 11  # every page back


def test_seeded_samples_independent_of_batch():
    prompt = _prompts(1, seed=4)[0]
    sp = SamplingParams(n=4, temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = tiny_llm().generate([prompt], sp, use_tqdm=False)[0]
    others = _prompts(19, seed=5)
    mixed_prompts = others[:7] + [prompt] + others[7:]
    mixed_params = (
        [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=15 + i % 7, ignore_eos=True) for i in range(7)]
        + [sp]
        + [SamplingParams(temperature=0, max_tokens=10)] * 12
    )
    mixed = tiny_llm().generate(mixed_prompts, mixed_params, use_tqdm=False)[7]
    assert [c.token_ids for c in mixed.outputs] == [c.token_ids for c in alone.outputs]
    assert [c.text for c in mixed.outputs] == [c.text for c in alone.outputs]
    assert len({tuple(c.token_ids) for c in alone.outputs}) == 4  # the 4 samples differ


def test_unseeded_requests_differ_but_engine_seed_reproduces():
    prompt = _prompts(1, seed=6)[0]
    sp = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    a = tiny_llm(seed=7)
    first = _greedy_ids(a, [prompt, prompt], sp)
    assert first[0] != first[1]
    assert _greedy_ids(tiny_llm(seed=7), [prompt, prompt], sp) == first


def test_stop_token_ids_and_min_tokens(tiny):
    prompt = _prompts(1, seed=8)[0]
    greedy = _greedy_ids(tiny, [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop_tok = greedy[2]
    first = greedy.index(stop_tok)
    c = tiny.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]), use_tqdm=False
    )[0].outputs[0]
    assert c.token_ids == greedy[: first + 1]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop_tok)
    c = tiny.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=12, min_tokens=6, stop_token_ids=[stop_tok]),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(c.token_ids) >= 6
    assert stop_tok not in c.token_ids[:5]


def test_eos_and_ignore_eos():
    llm = tiny_llm()
    prompt = _prompts(1, seed=9)[0]
    greedy = _greedy_ids(llm, [prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    eos = greedy[3]
    llm.engine.eos_token_ids[:] = [eos]  # pretend the model's EOS is the 4th greedy token
    cut = greedy.index(eos) + 1
    c = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    assert c.token_ids == greedy[:cut] and c.finish_reason == "stop" and c.stop_reason is None
    c = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[
        0
    ].outputs[0]
    assert c.token_ids == greedy and c.finish_reason == "length"
    c = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=10, min_tokens=cut + 1), use_tqdm=False
    )[0].outputs[0]
    assert eos not in c.token_ids[:cut]


def test_stop_strings_cut_text(tiny):
    prompt = _prompts(1, seed=10)[0]
    full = (
        tiny.generate(
            [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False
        )[0]
        .outputs[0]
        .text
    )
    assert len(full) > 20
    stop = full[10:14]
    expect = full[: full.index(stop)]
    c = tiny.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop, "\u2603never"]), use_tqdm=False
    )[0].outputs[0]
    assert c.text == expect
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    c = tiny.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=30, stop=stop, include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert c.text == expect + stop


def test_streaming_deltas_add_up(tiny):
    engine = tiny.engine
    prompt = _prompts(1, seed=11)[0]
    final = tiny.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=25, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    rid = engine.add_request(
        prompt,
        SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, output_kind=RequestOutputKind.DELTA),
    )
    text, ids, n_outputs = "", [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            n_outputs += 1
            text += out.outputs[0].text
            ids += out.outputs[0].token_ids
    assert ids == final.token_ids and text == final.text
    assert n_outputs == 25


def test_abort_frees_pages(tiny):
    engine = tiny.engine
    free0 = engine.kv.pool.num_free
    rid = engine.add_request(_prompts(1, lo=40, hi=40)[0], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.kv.pool.num_free < free0
    engine.abort_request(rid)
    assert engine.kv.pool.num_free == free0
    assert not engine.has_unfinished_requests()


def test_max_model_len_ends_generation():
    llm = tiny_llm(max_model_len=40)
    c = llm.generate(
        [_prompts(1, lo=30, hi=30)[0]],
        SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(c.token_ids) == 10 and c.finish_reason == "length"


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda llm: llm.generate([""], use_tqdm=False), "prompt is empty"),
        (lambda llm: llm.generate([[]], use_tqdm=False), "prompt is empty"),
        (lambda llm: llm.generate([], use_tqdm=False), "prompts is empty"),
        (lambda llm: llm.generate(["hi"], SamplingParams(max_tokens=0), use_tqdm=False), "max_tokens"),
        (lambda llm: llm.generate(["hi"], SamplingParams(top_p=1.5), use_tqdm=False), "top_p"),
        (lambda llm: llm.generate(["hi"], SamplingParams(top_p=0.0), use_tqdm=False), "top_p"),
        (lambda llm: llm.generate(["hi"], SamplingParams(temperature=-1), use_tqdm=False), "temperature"),
        (lambda llm: llm.generate(["hi"], SamplingParams(n=0), use_tqdm=False), "n must"),
        (lambda llm: llm.generate([[1] * 5000], use_tqdm=False), "max_model_len"),
        (lambda llm: llm.generate([[10**9]], use_tqdm=False), "out of range"),
        (lambda llm: llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False), "SamplingParams"),
        (lambda llm: llm.chat([{"role": "wizard", "content": "x"}], use_tqdm=False), "role"),
        (lambda llm: llm.chat([], use_tqdm=False), "messages"),
    ],
)
def test_bad_input_names_field_and_engine_keeps_serving(tiny, make, field):
    llm = tiny
    with pytest.raises(ValueError, match=field):
        make(llm)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(
        ["still serving"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 3


def test_bad_request_in_batch_adds_nothing(tiny):
    with pytest.raises(ValueError, match="max_model_len"):
        tiny.generate(["fine", [5] * 100_000], use_tqdm=False)
    assert not tiny.engine.has_unfinished_requests()


def test_n_samples_and_chat_batch(tiny):
    outs = tiny.generate(
        ["hello"], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True), use_tqdm=False
    )
    assert [c.index for c in outs[0].outputs] == [0, 1, 2]
    convs = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]]
    outs = tiny.chat(convs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(outs) == 2 and all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert outs[0].prompt.endswith("<|im_start|>assistant\n")


def test_prompts_sharing_a_prefix_in_one_call_compute_it_once(monkeypatch):
    """Six prompts with a 330-token common prefix in one generate(): the prefix is computed once
    (the others wait a step and reuse it), with the same greedy tokens as when each computes it."""
    import forkllm.engine.scheduler as scheduler

    prefix = list(range(100, 430))
    prompts = [{"prompt_token_ids": prefix + [1000 + i] * (5 + i)} for i in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0)
    runs = {}
    for pages in (scheduler.SHARE_MIN_PAGES, 10**9):
        monkeypatch.setattr(scheduler, "SHARE_MIN_PAGES", pages)
        llm = tiny_llm(max_model_len=1024)
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[pages] = ([o.outputs[0].token_ids for o in outs], llm.engine.metrics())
    (shared_ids, shared), (alone_ids, alone) = runs.values()
    assert shared_ids == alone_ids
    total = sum(len(p["prompt_token_ids"]) for p in prompts)
    assert alone["prompt_tokens_computed"] == total and alone["prefix_cache_hit_rate"] == 0.0
    # each follower reuses the prefix's 20 full pages (320 tokens)
    assert shared["prompt_tokens_computed"] == total - 5 * 320
