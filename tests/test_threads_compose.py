"""Thread trees composed: n trees of one prompt (LLM.threads(..., n=...)), trees as the candidates
of scaling strategies, SamplingParams(threads=...) on LLM.generate, and n over HTTP."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import tiny_llm
from test_tree import assert_no_leaks

from forkllm import SamplingParams
from forkllm.engine.policy import drive
from forkllm.engine.sampler import derive_seed
from forkllm.scaling import BestOfN, SelfConsistency, scorers
from forkllm.threads import Fanout, MapReduce, Protocol
from forkllm.threads.factory import make_trees
from forkllm.threads.result import ThreadCompletionOutput

SPEC = Fanout(["List the facts.", "Guess."], max_tokens=5, final_max_tokens=6)
SAMPLED = SamplingParams(temperature=0.8, seed=7)


def _texts(r):
    return [t.text for t in r.threads]


# ---- n trees of one prompt ----------------------------------------------------------------------
def test_n_trees_fork_from_one_computed_prompt():
    llm = tiny_llm(enable_prefix_caching=False)
    engine = llm.engine
    prompt = list(range(300, 340))  # 40 tokens: two full pages of 16, one partial
    trees = make_trees(SPEC, SAMPLED.clone(n=3))
    done: list = []
    drive(engine, trees, prompt, "", done.append)
    before = engine.stats.prompt_tokens_computed
    while not trees.forked:
        engine.step()
    contexts = trees.tree.seqs[:3]
    assert [c.index for c in contexts] == [0, 1, 2]
    shared = contexts[0].block_table[:2]
    assert all(c.block_table[:2] == shared for c in contexts)  # one copy of the prompt's pages
    assert all(engine.kv.pool.ref_counts[p] >= 3 for p in shared)
    while not done:
        engine.step()
    assert engine.stats.prompt_tokens_computed - before == 40  # the prompt computed once
    results = done[0]
    assert len(results) == 3
    # only the first tree counts the prompt; every tree counts its own thread prompts
    assert results[0].prefill_tokens - results[1].prefill_tokens == 40
    assert_no_leaks(engine)


def test_greedy_trees_are_identical_sampled_trees_differ():
    llm = tiny_llm()
    greedy = llm.threads("question", SPEC, chat=False, n=3)
    assert len({tuple(_texts(r)) for r in greedy}) == 1
    assert greedy[0].text == llm.threads("question", SPEC, chat=False).text
    sampled = llm.threads("question", SPEC, SAMPLED, chat=False, n=3)
    assert len({r.text for r in sampled}) == 3
    assert len({tuple(_texts(r)[1:]) for r in sampled}) == 3  # threads differ too
    again = llm.threads("question", SPEC, SAMPLED, chat=False, n=3)
    assert [_texts(r) for r in again] == [_texts(r) for r in sampled]
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize(
    "spec",
    [SPEC, Protocol("multiverse", outline=["alpha", "beta"], max_tokens=4, final_max_tokens=5)],
    ids=["fanout", "multiverse"],
)
def test_tree_i_is_the_lone_tree_seeded_as_sample_i(spec):
    """Contexts take the seeds of samples 0..n-1, threads derive theirs from their parent's:
    tree i equals a lone run seeded derive_seed(seed, i), whatever the other trees do."""
    llm = tiny_llm()
    trees = llm.threads("question", spec, SAMPLED, chat=False, n=3)
    for i, r in enumerate(trees):
        alone = llm.threads("question", spec, SAMPLED.clone(seed=derive_seed(7, i)), chat=False)
        assert _texts(alone) == _texts(r) and alone.token_ids == r.token_ids
    assert_no_leaks(llm.engine)


def test_deferred_contexts_keep_their_sample_seeds():
    """Two prompts of 3 trees on 4 sequence slots: some contexts are forked late (deferred);
    no tree acts before its request's contexts all exist, so each keeps its sample's seed."""
    llm = tiny_llm(max_num_seqs=4)
    both = llm.threads_batch(["question", "other"], [SPEC, SPEC], SAMPLED, chat=False, n=3)
    for prompt, trees in zip(["question", "other"], both):
        for i, r in enumerate(trees):
            alone = llm.threads(prompt, SPEC, SAMPLED.clone(seed=derive_seed(7, i)), chat=False)
            assert _texts(alone) == _texts(r)
    assert_no_leaks(llm.engine)


def test_n_is_checked_and_abort_frees_every_page():
    llm = tiny_llm(max_num_seqs=4, block_size=4)
    engine = llm.engine
    with pytest.raises(ValueError, match="n=5 trees exceed max_num_seqs"):
        llm.threads("q", Fanout(["a"]), chat=False, n=5)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        llm.threads("q", Fanout(["a"]), chat=False, n=0)
    with pytest.raises(ValueError, match=r"n must be 1 per tree \(n trees: LLM.threads"):
        llm.threads("q", Fanout(["a"]), SamplingParams(n=2), chat=False)
    assert_no_leaks(engine)
    for steps in (1, 3, 8):  # before the fork, at the fan-out, with threads running
        trees = make_trees(Fanout(["a", "b"], max_tokens=50), SAMPLED.clone(n=3))
        handle = drive(engine, trees, engine.tokenizer.encode("q"), "q", lambda _: None)
        for _ in range(steps):
            engine.step()
        handle.cancel(engine)
        assert_no_leaks(engine)
    assert llm.generate(["still serving"], SamplingParams(max_tokens=3))[0].outputs[0].token_ids


# ---- thread trees inside scaling strategies ------------------------------------------------------
def _parity(text: str) -> str:
    return "odd" if len(text) % 2 else "even"


def test_self_consistency_votes_over_the_trees_answers():
    llm = tiny_llm()
    r = llm.scale("question", SelfConsistency(n=4, threads=SPEC, extract=_parity, seed=3), chat=False)
    trees = llm.threads("question", SPEC, SamplingParams(temperature=0.8, seed=3), chat=False, n=4)
    assert sorted(c.text for c in r.candidates) == sorted(t.text for t in trees)
    assert [t.text for t in r.extra["threads"]] == [c.text for c in r.candidates]
    votes = Counter(_parity(t.text) for t in trees)
    assert r.votes == {k: float(v) for k, v in votes.items()}
    assert r.answer == max(votes, key=lambda k: votes[k])
    assert _parity(r.text) == r.answer and r.tokens_generated == sum(t.generated_tokens for t in trees)
    assert_no_leaks(llm.engine)


def test_best_of_n_scores_the_trees_answers():
    llm = tiny_llm()
    longest = scorers.Verifier(lambda q, text: float(len(text)))
    r = llm.scale("question", BestOfN(n=3, threads=SPEC, scorer=longest, seed=5), chat=False)
    trees = llm.threads("question", SPEC, SamplingParams(temperature=0.8, seed=5), chat=False, n=3)
    assert r.text == max((t.text for t in trees), key=len)
    assert sorted(c.score for c in r.candidates) == sorted(float(len(t.text)) for t in trees)
    assert_no_leaks(llm.engine)


def test_strategies_refuse_what_trees_cannot_do():
    with pytest.raises(ValueError, match="BestOfN.scorer: thread trees are scored by their answer's text"):
        BestOfN(n=2, threads=SPEC)
    with pytest.raises(ValueError, match="BestOfN.scorer"):
        BestOfN(n=2, threads=SPEC, scorer=scorers.SelfJudge())
    with pytest.raises(ValueError, match="SelfConsistency.weighted: does not apply to thread trees"):
        SelfConsistency(n=2, threads=SPEC, weighted=True)
    with pytest.raises(ValueError, match="SelfConsistency.budget"):
        SelfConsistency(n=2, threads=SPEC, budget=100)
    with pytest.raises(ValueError, match="SelfConsistency.threads must be a Fanout, Subtasks or Protocol"):
        SelfConsistency(n=2, threads=MapReduce("m", "r"))  # type: ignore[arg-type]


def test_stopping_a_strategy_over_trees_frees_every_page():
    llm = tiny_llm(block_size=4)
    engine = llm.engine
    policy = SelfConsistency(n=3, threads=Fanout(["a", "b"], max_tokens=50), extract=_parity)
    handle = drive(engine, policy, engine.tokenizer.encode("q"), "q", lambda _: None)
    for _ in range(6):
        engine.step()
    handle.cancel(engine)
    assert_no_leaks(engine)


# ---- SamplingParams(threads=...) on generate -------------------------------------------------------
def test_generate_with_threads_equals_llm_threads():
    llm = tiny_llm()
    params = SamplingParams(temperature=0.8, seed=5, n=2, threads=SPEC)
    out = llm.generate(["question", "plain"], [params, SamplingParams(temperature=0.0, max_tokens=4)])
    trees = llm.threads("question", SPEC, SamplingParams(temperature=0.8, seed=5), chat=False, n=2)
    assert [c.index for c in out[0].outputs] == [0, 1]
    for c, r in zip(out[0].outputs, trees):
        assert isinstance(c, ThreadCompletionOutput) and c.thread_tree is not None
        assert c.text == r.text and c.token_ids == r.token_ids and c.finish_reason == r.finish_reason
        assert _texts(c.thread_tree) == _texts(r)
    assert out[0].prompt == "question" and out[0].finished
    plain = llm.generate(["plain"], SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert out[1].outputs[0].token_ids == plain.outputs[0].token_ids
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0.0, threads=SPEC))
    assert isinstance(chat[0].outputs[0], ThreadCompletionOutput)
    assert_no_leaks(llm.engine)


def test_generate_refuses_what_a_tree_cannot_do():
    llm = tiny_llm()
    with pytest.raises(ValueError, match="a MapReduce takes its chunks as the prompt"):
        llm.generate(["q"], SamplingParams(threads=MapReduce("m", "r")))
    with pytest.raises(ValueError, match="SamplingParams.threads must be a Fanout"):
        llm.generate(["q"], SamplingParams(threads="fanout"))
    with pytest.raises(ValueError, match="SamplingParams.logprobs: thread trees do not report"):
        llm.generate(["q"], SamplingParams(threads=SPEC, logprobs=1))
    with pytest.raises(ValueError, match="SamplingParams.threads: a thread tree runs through LLM"):
        llm.engine.add_request("q", SamplingParams(threads=SPEC))
    assert_no_leaks(llm.engine)


# ---- n with threads over HTTP ---------------------------------------------------------------------
KEY = "test-key"
MSGS = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def live():
    pytest.importorskip("uvicorn")
    from test_server import LiveServer

    from forkllm.engine.async_engine import AsyncEngine
    from forkllm.server.app import ServerConfig, create_app

    engine = AsyncEngine(tiny_llm(max_model_len=1024).engine)
    srv = LiveServer(create_app(ServerConfig(served_model_name="tiny", api_key=KEY), engine=engine))
    yield srv
    srv.stop()


def _post(live, body, stream=False):
    import httpx

    url, headers = live.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    if stream:
        return httpx.stream("POST", url, json=body, headers=headers, timeout=60)
    return httpx.post(url, json=body, headers=headers, timeout=60)


def test_http_n_with_threads_gives_n_choices_with_trees(live):
    from test_server import _pages_in_use

    spec = {"fanout": ["List the facts.", "Guess."], "max_tokens": 5}
    body = {"model": "tiny", "messages": MSGS, "temperature": 0.8, "seed": 3, "max_tokens": 6}
    r = _post(live, {**body, "n": 3, "threads": spec})
    assert r.status_code == 200, r.text
    data = r.json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2] and "threads" not in data
    offline = tiny_llm(max_model_len=1024).threads(
        MSGS,
        Fanout(["List the facts.", "Guess."], max_tokens=5, final_max_tokens=6),
        SamplingParams(temperature=0.8, seed=3),
        n=3,
    )
    for c, t in zip(data["choices"], offline):
        assert c["message"]["content"] == t.text
        assert [th["text"] for th in c["threads"]["threads"]] == _texts(t)
    assert data["usage"]["completion_tokens"] == sum(t.generated_tokens for t in offline)
    # streamed: content deltas and thread events say whose tree; the last chunk has every tree
    content, indices, last = ["", "", ""], set(), None
    with _post(live, {**body, "n": 3, "threads": spec, "stream": True}, stream=True) as s:
        for line in s.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "thread_event" in chunk:
                indices.add(chunk["thread_event"]["index"])
            for c in chunk["choices"]:
                content[c["index"]] += c["delta"].get("content") or ""
                if "threads" in c:
                    last = chunk
    assert indices == {0, 1, 2} and content == [t.text for t in offline]
    assert last is not None and [len(c["threads"]["threads"]) for c in last["choices"]] == [3, 3, 3]
    assert _pages_in_use(live) == 0


@pytest.mark.parametrize(
    "n, threads, param, message",
    [
        (2, {"fanout": ["a"] * 40}, "n", "40 x n=2 threads at once"),
        (60, {"fanout": ["a"], "max_tokens": 1000}, "n", "(n=60 trees)"),
        (2, {"fanout": ["a"], "max_tokens": 100000}, "threads.max_tokens", "over this server's limit"),
        (0, {"fanout": ["a"]}, "n", "n must be at least 1"),
    ],
)
def test_http_n_with_threads_is_checked_against_the_limits(live, n, threads, param, message):
    r = _post(live, {"model": "tiny", "messages": MSGS, "n": n, "threads": threads})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"]
