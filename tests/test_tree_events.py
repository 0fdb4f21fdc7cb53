"""The generation tree's live event stream (engine/events.py, server/tree_events.py): what the
web page draws from. The events must agree exactly with the counts the API returns."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.engine.events import TreeEvent
from forkllm.scaling import BeamSearch, ParticleFilter, SelfConsistency

PROMPT = [1, 2, 3, 4, 5, 6, 7]


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(max_model_len=512)


def _kinds(events: list[TreeEvent]) -> Counter[str]:
    return Counter(e.kind for e in events)


def _check_shape(events: list[TreeEvent]) -> None:
    """One root first, `done` last and once; every fork names a parent seen before it; every
    sequence ends once (finish or prune)."""
    assert events[0].kind == "root" and events[-1].kind == "done"
    assert [e.kind for e in events].count("done") == 1
    seen = {events[0].seq}
    for e in events:
        if e.kind == "fork":
            assert e.parent in seen and e.seq not in seen
            seen.add(e.seq)
    ends = Counter(e.seq for e in events if e.kind in ("finish", "prune"))
    assert set(ends) == seen and set(ends.values()) == {1}


@pytest.mark.parametrize(
    "policy",
    [
        lambda: SelfConsistency(n=4, max_tokens=12, seed=3),
        lambda: BeamSearch(width=2, expand=2, max_tokens=24, max_step_tokens=5, seed=1),
        lambda: ParticleFilter(n=4, max_tokens=20, max_step_tokens=4, seed=2),
    ],
    ids=["self_consistency", "beam_search", "particle_filter"],
)
def test_policy_events_match_the_result_counts(llm, policy):
    strategy = policy()
    events: list[TreeEvent] = []
    strategy.watch = events.append
    result = llm.scale(PROMPT, strategy, chat=False)
    kinds = _kinds(events)
    _check_shape(events)
    assert kinds["fork"] == result.forks and kinds["prune"] == result.prunes
    assert result.chosen in {e.seq for e in events}
    if isinstance(strategy, SelfConsistency):
        assert kinds["vote"] == len(result.candidates) == 4
    else:
        assert kinds["score"] >= len(result.candidates) > 0
    # the last progress event counts every token the tree generated
    last = [e for e in events if e.kind == "progress"][-1]
    assert last.data["generated"] == result.tokens_generated


def test_plain_request_fork_pages_are_shared(llm):
    """n = 3: a root, two forks that share the prompt's pages, three finishes; the watch can be
    set before the request is added."""
    engine = llm.engine
    events: list[TreeEvent] = []
    engine.watch("w1", events.append)
    engine.add_request(list(range(1, 40)), SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=1), "w1")
    while engine.has_unfinished_requests():
        engine.step()
    _check_shape(events)
    kinds = _kinds(events)
    assert kinds["root"] == 1 and kinds["fork"] == 2 and kinds["finish"] == 3
    forks = [e for e in events if e.kind == "fork"]
    assert all(e.parent == "w1" and e.pages >= 2 and e.shared == e.pages for e in forks)
    assert all(e.tokens == 5 for e in events if e.kind == "finish")
    assert not engine.tree.events.watching("w1")


def test_unwatched_requests_report_nothing_and_watches_end(llm):
    events: list[TreeEvent] = []
    llm.engine.watch("never-added", events.append)
    llm.engine.abort_request("never-added")  # a watch whose request never came is dropped
    assert not llm.engine.tree.events.watching("never-added") and not events


# ---- over HTTP -------------------------------------------------------------------------------
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_server import LiveServer  # noqa: E402

from forkllm.engine.async_engine import AsyncEngine  # noqa: E402
from forkllm.server.app import ServerConfig, create_app  # noqa: E402

KEY = "k"
MSGS = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def live():
    engine = AsyncEngine(tiny_llm(max_model_len=1024).engine)
    srv = LiveServer(create_app(ServerConfig(served_model_name="tiny", api_key=KEY), engine=engine))
    yield srv
    srv.stop()


def _stream(live, body) -> list[dict]:
    with httpx.stream(
        "POST",
        live.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": MSGS, "stream": True, **body},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [ln[len("data: ") :] for ln in resp.iter_lines() if ln]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_streamed_scaling_events_match_forks_and_prunes(live):
    spec = {"strategy": "beam_search", "width": 2, "expand": 2, "max_step_tokens": 4, "max_tokens": 16}
    chunks = _stream(live, {"scaling": spec, "tree_events": True, "seed": 5})
    events = [c["tree_event"] for c in chunks if "tree_event" in c]
    assert all(c["choices"] == [] for c in chunks if "tree_event" in c)
    scaling = chunks[-1]["scaling"]
    kinds = Counter(e["kind"] for e in events)
    assert kinds["fork"] == scaling["forks"] > 0 and kinds["prune"] == scaling["prunes"] > 0
    assert events[0]["kind"] == "root" and events[-1]["kind"] == "done"
    assert scaling["chosen"] in {e["seq"] for e in events}
    assert {c["seq"] for c in scaling["candidates"]} <= {e["seq"] for e in events}
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == next(c["text"] for c in scaling["candidates"] if c["seq"] == scaling["chosen"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_streamed_scaling_without_events_is_the_non_streamed_answer(live):
    spec = {"strategy": "self_consistency", "n": 3, "max_tokens": 8}
    chunks = _stream(live, {"scaling": spec, "seed": 2})
    assert not any("tree_event" in c for c in chunks)
    r = httpx.post(
        live.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": MSGS, "scaling": spec, "seed": 2},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ).json()
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == r["choices"][0]["message"]["content"]
    assert chunks[-1]["scaling"]["votes"] == r["scaling"]["votes"]


def test_plain_n_samples_stream_their_tree_before_their_text(live):
    chunks = _stream(live, {"n": 3, "max_tokens": 4, "tree_events": True, "temperature": 1.0, "seed": 1})
    events = [c["tree_event"] for c in chunks if "tree_event" in c]
    kinds = Counter(e["kind"] for e in events)
    assert kinds["root"] == 1 and kinds["fork"] == 2 and kinds["finish"] == 3 and kinds["done"] == 1
    first_text = next(
        i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get("content")
    )
    first_fork = next(i for i, c in enumerate(chunks) if c.get("tree_event", {}).get("kind") == "fork")
    assert first_fork < first_text  # forked at the first sample, reported before its text


def test_threads_stream_tree_events_too(live):
    spec = {"fanout": ["Facts.", "Guess."], "max_tokens": 4}
    chunks = _stream(live, {"threads": spec, "tree_events": True, "max_tokens": 3, "temperature": 0})
    kinds = Counter(c["tree_event"]["kind"] for c in chunks if "tree_event" in c)
    assert kinds["fork"] == 2 and kinds["join"] == 2 and kinds["done"] == 1
    assert any("thread_event" in c for c in chunks)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tree_events": True}, "tree_events"),  # not streamed: nowhere to put them
        ({"tree_events": True, "stream": False, "scaling": {"strategy": "best_of_n", "n": 2}}, "tree_events"),
    ],
)
def test_tree_events_need_a_stream(live, body, param):
    r = httpx.post(
        live.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": MSGS, "max_tokens": 2, **body},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_completions_refuse_tree_events(live):
    r = httpx.post(
        live.url + "/v1/completions",
        json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": True, "tree_events": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 400 and "tree_events" in r.text
