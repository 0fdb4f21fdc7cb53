"""The chat route's `threads` extension, live, with the openai SDK and raw SSE."""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from conftest import tiny_llm  # noqa: E402
from test_server import LiveServer, _pages_in_use  # noqa: E402

from forkllm import SamplingParams  # noqa: E402
from forkllm.engine.async_engine import AsyncEngine  # noqa: E402
from forkllm.server.app import ServerConfig, create_app  # noqa: E402
from forkllm.threads import Fanout  # noqa: E402

KEY = "test-key"  # what test_server._pages_in_use sends
MSGS = [{"role": "user", "content": "Why is the sky blue?"}]


def _chat_stream(live, body):
    return httpx.stream(
        "POST",
        live.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )


@pytest.fixture(scope="module")
def live():
    engine = AsyncEngine(tiny_llm(max_model_len=1024).engine)
    srv = LiveServer(create_app(ServerConfig(served_model_name="tiny", api_key=KEY), engine=engine))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


def test_threads_answer_matches_offline_and_carries_the_tree(client):
    spec = {"fanout": ["List the facts.", "Guess."], "join": "kv_concat", "max_tokens": 6}
    r = client.chat.completions.create(
        model="tiny", messages=MSGS, temperature=0, max_tokens=5, extra_body={"threads": spec}
    )
    tree = r.model_extra["threads"]
    assert [t["parent"] for t in tree["threads"]] == [None, 0, 0]
    assert [e["event"] for e in tree["events"]][0] == "spawn" and tree["join"] == "kv_concat"
    assert r.usage.completion_tokens == tree["generated_tokens"] == 5 + 2 * 7
    offline = tiny_llm(max_model_len=1024).threads(
        MSGS,
        Fanout(["List the facts.", "Guess."], max_tokens=6, final_max_tokens=5),
        SamplingParams(temperature=0),
    )
    assert r.choices[0].message.content == offline.text


def test_threads_stream_events_then_answer(live, client):
    body = {
        "model": "tiny",
        "messages": MSGS,
        "temperature": 0,
        "max_tokens": 5,
        "stream": True,
        "threads": {
            "map_reduce": ["part one", "part two", "part three"],
            "map": "Sum:",
            "reduce": "All:",
            "max_tokens": 4,
        },
    }
    events, content, last = [], "", None
    with _chat_stream(live, body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "thread_event" in chunk:
                events.append(chunk["thread_event"])
            for c in chunk["choices"]:
                content += c["delta"].get("content") or ""
            if "threads" in chunk:
                last = chunk
    kinds = [e["event"] for e in events]
    assert kinds[0] == "spawn" and events[0]["children"] == [1, 2, 3]
    assert kinds.count("end") == 4 and "join" in kinds and "delta" in kinds  # 3 threads + the context
    assert last is not None and last["choices"][0]["finish_reason"] == "length"
    assert content and len(last["threads"]["threads"]) == 4
    # the SDK reads the same stream as plain content
    stream = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        temperature=0,
        max_tokens=5,
        stream=True,
        extra_body={"threads": body["threads"]},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content
    assert _pages_in_use(live) == 0


@pytest.mark.parametrize(
    "threads, param, message",
    [
        ({"fanout": ["a"], "join": "glue"}, "threads.join", "'glue' is not one of kv_concat, reprefill"),
        ({"fanout": []}, "threads.fanout", "non-empty list"),
        ({"fanout": ["a"], "width": 3}, "threads.width", "not a parameter of fanout"),
        ({"subtasks": ["a"], "prune": "yes"}, "threads.prune", "true or false"),
        ({"fanout": ["a"] * 65}, "threads", "65 threads at once"),
        ({"fanout": ["a"], "max_tokens": 100000}, "threads.max_tokens", "over this server's limit"),
        ("fanout", "threads", ""),
        ({"protocol": "nope"}, "threads.protocol", "unknown protocol 'nope'"),
        ({"protocol": "apr", "join": "kv_concat"}, "threads.join", "apr joins by computing"),
        ({"protocol": "apr", "outline": ["a\nb"]}, "threads.outline", "item 0 is not one non-empty line"),
        ({"protocol": "apr", "returns": "all"}, "threads.returns", "'all' is not one of goal, text"),
        ({"protocol": "apr", "returns": 3}, "threads.returns", "must be a string"),
        ({"protocol": "multiverse", "outline": "a"}, "threads.outline", "list of non-empty strings"),
    ],
)
def test_bad_threads_are_400s_naming_the_key(live, threads, param, message):
    r = httpx.post(
        live.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": MSGS, "threads": threads},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"]


def test_threads_refuse_what_they_do_not_apply(live):
    for extra, param in (
        ({"n": 65}, "n"),  # 65 trees of one thread: over --max-scaling-width (n itself is allowed)
        ({"logprobs": True}, "logprobs"),
        ({"scaling": {"strategy": "best_of_n"}}, "scaling"),
    ):
        r = httpx.post(
            live.url + "/v1/chat/completions",
            json={"model": "tiny", "messages": MSGS, "threads": {"fanout": ["a"]}, **extra},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(
        live.url + "/v1/completions",
        json={"model": "tiny", "prompt": "x", "threads": {"fanout": ["a"]}},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "threads"
    assert _pages_in_use(live) == 0


def test_leaving_mid_stream_aborts_the_tree(live):
    import time

    body = {
        "model": "tiny",
        "messages": MSGS,
        "stream": True,
        "max_tokens": 500,
        "threads": {"fanout": ["a", "b", "c"], "max_tokens": 500},
    }
    with _chat_stream(live, body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += "delta" in line
            if seen >= 3:
                break  # leave with the threads still running
    deadline = time.time() + 20
    while _pages_in_use(live) and time.time() < deadline:
        time.sleep(0.1)
    assert _pages_in_use(live) == 0


def test_protocol_over_http(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        temperature=0,
        max_tokens=4,
        extra_body={"threads": {"protocol": "multiverse", "outline": ["x", "y"], "max_tokens": 3}},
    )
    tree = r.model_extra["threads"]
    assert [t["prompt"] for t in tree["threads"]] == ["Why is the sky blue?", "1: x", "2: y"]
    assert [e["event"] for e in tree["events"]].count("join") == 1


def test_apr_protocol_over_http(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        temperature=0,
        max_tokens=4,
        extra_body={"threads": {"protocol": "apr", "outline": ["Moving to Node #1,0", "x"], "max_tokens": 3}},
    )
    tree = r.model_extra["threads"]
    assert [t["prompt"] for t in tree["threads"]] == ["Why is the sky blue?", "Moving to Node #1,0", "x"]
    assert [e["event"] for e in tree["events"]] == ["spawn", "end", "end", "join", "end"]
    assert tree["join"] == "reprefill"
