"""The OpenAI-compatible server, live on 127.0.0.1 (random port), driven by the official client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import serve_tiny_cmd, tiny_llm  # noqa: E402

from forkllm import SamplingParams  # noqa: E402
from forkllm.engine.async_engine import AsyncEngine  # noqa: E402
from forkllm.server.app import ServerConfig, create_app  # noqa: E402

KEY = "test-key"
MODEL = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def live():
    engine = AsyncEngine(tiny_llm(max_model_len=1024).engine)
    srv = LiveServer(create_app(ServerConfig(served_model_name=MODEL, api_key=KEY), engine=engine))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference():
    """The offline API on the same random weights (seed 0): what the server must reproduce."""
    return tiny_llm(max_model_len=1024)


def _post(live, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(
            live.url + path, content=raw, headers={**headers, "Content-Type": "application/json"}
        )
    return httpx.post(live.url + path, json=body, headers=headers, timeout=60)


def _pages_in_use(live) -> int:
    text = httpx.get(live.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for line in text.splitlines():
        if line.startswith("forkllm_kv_cache_pages_used "):
            return int(float(line.split()[1]))
    raise AssertionError("no kv pages metric")


# ---- happy paths --------------------------------------------------------------------------------
def test_models_and_health(live, client):
    assert httpx.get(live.url + "/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_greedy_matches_offline(client, reference):
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0)
    ref = reference.generate(
        ["The quick brown fox"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False
    )[0].outputs[0]
    assert r.choices[0].text == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == len(reference.get_tokenizer().encode("The quick brown fox"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "text_completion"


def test_chat_greedy_matches_offline_streamed_and_not(client, reference):
    msgs = [{"role": "user", "content": "Name a color."}]
    ref = reference.chat(msgs, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(ref.token_ids)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and not chunks[-1].choices


def test_completion_stream_with_usage(client, reference):
    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon",
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ref = reference.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=9), use_tqdm=False)[0]
    assert text == ref.outputs[0].text
    assert chunks[-1].usage.completion_tokens == 9


def test_n3_logprobs_and_seed(client):
    r = client.completions.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=11,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert all(len(t) >= 3 for t in lp.top_logprobs)
        assert all(x <= 0 for x in lp.token_logprobs)
    assert r.usage.completion_tokens == 18
    again = client.completions.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=11,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_chat_logprobs_top_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob


def test_stop_and_vllm_extras(client, reference):
    full = (
        reference.generate(
            ["abc"], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False
        )[0]
        .outputs[0]
        .text
    )
    stop = full[8:11]
    r = client.completions.create(
        model=MODEL,
        prompt="abc",
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 1},
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_best_of_and_echo_and_token_prompts(client, reference):
    r = client.completions.create(
        model=MODEL, prompt="Hi there", max_tokens=4, n=2, best_of=4, temperature=1.0, seed=3
    )
    assert len(r.choices) == 2
    r = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Echo me")
    ids = reference.get_tokenizer().encode("Token ids")
    r = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=3, temperature=0)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text


def test_tokenize_detokenize(live):
    r = _post(live, "/tokenize", {"prompt": "hello world"}).json()
    assert r["count"] == len(r["tokens"]) > 0
    back = _post(live, "/detokenize", {"tokens": r["tokens"]}).json()
    assert back["prompt"] == "hello world"


# ---- concurrency and cancellation -------------------------------------------------------------------
def test_64_concurrent_streams_complete_correctly(live, reference):
    prompts = [f"Story number {i}:" for i in range(64)]
    refs = [
        o.outputs[0].text
        for o in reference.generate(
            prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False
        )
    ]
    aclient = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)

    async def one(p):
        text = ""
        stream = await aclient.completions.create(
            model=MODEL, prompt=p, max_tokens=16, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        async for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(main()) == refs


def test_cancelled_stream_frees_pages(live):
    idle = _pages_in_use(live)
    with httpx.stream(
        "POST",
        live.url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": MODEL, "prompt": "x " * 200, "max_tokens": 500, "stream": True, "ignore_eos": True},
        timeout=30,
    ) as resp:
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
        assert _pages_in_use(live) > idle
    deadline = time.time() + 10
    while _pages_in_use(live) != idle:
        assert time.time() < deadline, "pages of the cancelled request were not freed"
        time.sleep(0.05)


# ---- bad input ----------------------------------------------------------------------------------------
BAD = [
    ("malformed JSON", "/v1/completions", None, b'{"prompt": 5', 400, "Invalid JSON"),
    ("wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "many"}, None, 400, "max_tokens"),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -3}, None, 400, "max_tokens"),
    ("n=0", "/v1/completions", {"prompt": "x", "n": 0}, None, 400, "n must"),
    ("top_p", "/v1/completions", {"prompt": "x", "top_p": 2.0}, None, 400, "top_p"),
    ("unknown field", "/v1/completions", {"prompt": "x", "frobnicate": 1}, None, 400, "frobnicate"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-9"}, None, 404, "gpt-9"),
    ("oversize prompt", "/v1/completions", {"prompt": "word " * 1200}, None, 400, "maximum context length"),
    (
        "prompt + max_tokens",
        "/v1/completions",
        {"prompt": "word " * 500, "max_tokens": 900},
        None,
        400,
        "maximum context length",
    ),
    ("empty prompt", "/v1/completions", {"prompt": ""}, None, 400, "prompt"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    (
        "invalid role",
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        None,
        400,
        "role",
    ),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, None, 400, "messages"),
    (
        "tools",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{}]},
        None,
        400,
        "tools",
    ),
]


@pytest.mark.parametrize("name, path, body, raw, status, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_clear_error_and_server_keeps_serving(
    live, client, name, path, body, raw, status, needle
):
    r = _post(live, path, body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"] or needle == err["param"], err
    assert "pydantic" not in r.text and "input_value" not in r.text
    ok = client.completions.create(model=MODEL, prompt="still alive", max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_api_key_required(live):
    for key in (None, "wrong"):
        r = _post(live, "/v1/completions", {"prompt": "x"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(live.url + "/health").status_code == 200  # not a /v1 route


def test_metrics_exposed(live, client):
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3)
    assert httpx.get(live.url + "/metrics").status_code == 401  # behind the key, as /v1 is
    text = httpx.get(live.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in (
        "forkllm_requests_total",
        "forkllm_time_to_first_token_seconds_bucket",
        "forkllm_inter_token_latency_seconds_bucket",
        "forkllm_num_sequences_running",
        "forkllm_num_sequences_waiting",
        "forkllm_kv_cache_pages_used",
        "forkllm_prefix_cache_hit_rate",
        "forkllm_generation_tokens_total",
    ):
        assert name in text, name
    assert 'forkllm_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'status="400"' in text or 'status="401"' in text


def test_overloaded_server_answers_503_with_retry_after():
    engine = AsyncEngine(tiny_llm().engine)
    srv = LiveServer(create_app(ServerConfig(served_model_name=MODEL, max_num_waiting=0), engine=engine))
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
    finally:
        srv.stop()


def test_a_request_expected_to_wait_past_max_expected_ttft_gets_503_with_retry_after():
    """--max-expected-ttft: behind a 200-token prompt still to compute (at a step speed fixed
    here: 10 ms a step + 10 ms a unit), a new request's first token is expected ~2 s out: 503 +
    Retry-After naming the flag; once nothing is ahead, the same request is admitted."""
    from forkllm.engine.step_cost import LinearFit

    llm = tiny_llm(max_num_batched_tokens=512)  # a 128-unit cap: 200 tokens is not a long prompt
    fit = LinearFit()
    for units in range(1, 40):
        fit.record(float(units), 0.01 + 0.01 * units)
    llm.engine.step_seconds = fit
    gate = threading.Event()
    llm.engine.add_step_hook(lambda e: gate.wait(30))  # the engine holds after its first step
    engine = AsyncEngine(llm.engine)
    srv = LiveServer(create_app(ServerConfig(served_model_name=MODEL, max_expected_ttft=0.5), engine=engine))
    long_body = {"prompt": list(range(5, 205)), "max_tokens": 2, "ignore_eos": True}
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(httpx.post, srv.url + "/v1/completions", json=long_body, timeout=60)
            deadline = time.time() + 30
            while engine.first_token_load.ahead == 0:
                assert time.time() < deadline
                time.sleep(0.02)
            expected = engine.expected_ttft(3)
            assert expected is not None and expected > 1.5
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1})
            assert r.status_code == 503
            assert int(r.headers["retry-after"]) == max(1, math.ceil(expected - 0.5))
            err = r.json()["error"]
            assert err["code"] == "overloaded" and "--max-expected-ttft" in err["message"]
            r = httpx.post(
                srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
            )
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            llm.engine.remove_step_hook(llm.engine.step_hooks[0])
            gate.set()
            assert held.result().status_code == 200
        assert engine.expected_ttft(3) is None  # nothing ahead
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1})
        assert r.status_code == 200
    finally:
        gate.set()
        srv.stop()


def test_admission_counts_the_work_of_admitted_requests():
    """--max-pending-tokens: a request's prompt + n x max_tokens counts against admission while it
    runs; the next one gets a 503 + Retry-After naming the work, and is admitted once it ends."""
    llm = tiny_llm()
    gate = threading.Event()
    llm.engine.add_step_hook(lambda e: gate.wait(30))  # the engine holds after its first step
    engine = AsyncEngine(llm.engine)
    srv = LiveServer(create_app(ServerConfig(served_model_name=MODEL, max_pending_tokens=300), engine=engine))
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 150, "n": 2, "ignore_eos": True}
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=60)
            deadline = time.time() + 30
            while engine.pending_tokens == 0:
                assert time.time() < deadline
                time.sleep(0.02)
            assert engine.pending_tokens == 4 + 2 * 150
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert err["code"] == "overloaded" and "304 tokens of admitted work" in err["message"]
            llm.engine.remove_step_hook(llm.engine.step_hooks[0])
            gate.set()
            assert held.result().status_code == 200
        assert engine.pending_tokens == 0
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 200
    finally:
        gate.set()
        srv.stop()


def test_health_is_503_while_loading():
    gate = threading.Event()

    def slow_factory():
        gate.wait(30)
        return AsyncEngine(tiny_llm().engine)

    srv = LiveServer(create_app(ServerConfig(served_model_name=MODEL), engine_factory=slow_factory))
    try:
        assert httpx.get(srv.url + "/health").status_code == 503
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        gate.set()
        deadline = time.time() + 30
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        srv.stop()


def test_serve_cli_starts_and_exits_cleanly_on_sigterm(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        serve_tiny_cmd(port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "KV cache" in out and f"127.0.0.1:{port}" in out and "shut down cleanly" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sse_ends_with_done(live):
    with httpx.stream(
        "POST",
        live.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        timeout=30,
    ) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: ") :])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_chat_with_in_engine_scaling(live):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 5,
        "scaling": {"strategy": "self_consistency", "n": 6, "extract": "regex:(.)"},
    }
    r = _post(live, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    data = r.json()
    sc = data["scaling"]
    assert sc["strategy"] == "self_consistency" and len(sc["candidates"]) == 6 and sc["forks"] == 5
    assert sum(sc["votes"].values()) == sum(1 for c in sc["candidates"] if c["answer"] is not None)
    assert data["choices"][0]["message"]["content"] in [c["text"] for c in sc["candidates"]]
    assert (
        data["usage"]["completion_tokens"]
        == sc["tokens_generated"]
        == sum(c["tokens"] for c in sc["candidates"])
    )
    again = _post(live, "/v1/chat/completions", body).json()["scaling"]
    assert again["votes"] == sc["votes"]  # seeded: reproducible
    for bad, needle in (
        ({"strategy": "vibes"}, "strategy"),
        ({"strategy": "best_of_n", "width": 2}, "width"),
        ({"strategy": "self_consistency", "n": 0}, "n must"),
    ):
        r = _post(live, "/v1/chat/completions", {**body, "scaling": bad})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


# ---- fields that are honoured or refused, never ignored ---------------------------------------------
def _sse_events(live, path, body):
    with httpx.stream(
        "POST", live.url + path, headers={"Authorization": f"Bearer {KEY}"}, json=body, timeout=60
    ) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [ln[len("data: ") :] for ln in resp.iter_lines() if ln]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_continuous_usage_stats_puts_exact_running_usage_on_every_chunk(live):
    prompt_tokens = _post(live, "/tokenize", {"prompt": "Count with me"}).json()["count"]
    events = _sse_events(
        live,
        "/v1/completions",
        {
            "prompt": "Count with me",
            "max_tokens": 7,
            "ignore_eos": True,
            "logprobs": 0,  # each chunk's logprobs list its tokens: the exact running count
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    )
    assert all("usage" in e for e in events)
    running = 0
    for e in events[:-1]:
        running += len(e["choices"][0]["logprobs"]["tokens"])
        assert e["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": running,
            "total_tokens": prompt_tokens + running,
        }
    assert running == 7 and events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 7

    chat = _sse_events(
        live,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"continuous_usage_stats": True},
        },
    )
    assert chat[0]["usage"]["completion_tokens"] == 0  # the role chunk
    assert all("usage" in e for e in chat) and all(e["choices"] for e in chat)  # no usage-only chunk
    assert chat[-1]["usage"]["completion_tokens"] == 5
    counts = [e["usage"]["completion_tokens"] for e in chat]
    assert counts == sorted(counts)


def test_streamed_echo_carries_prompt_logprobs_and_text_offsets(live, client):
    events = _sse_events(
        live,
        "/v1/completions",
        {"prompt": "Echo me", "max_tokens": 4, "echo": True, "logprobs": 1, "stream": True, "temperature": 0},
    )
    whole = client.completions.create(
        model=MODEL, prompt="Echo me", max_tokens=4, echo=True, logprobs=1, temperature=0
    )
    tokens, offsets, text = [], [], ""
    for e in events:
        lp = e["choices"][0]["logprobs"]
        tokens += lp["tokens"]
        offsets += lp["text_offset"]
        text += e["choices"][0]["text"]
    assert text == whole.choices[0].text
    assert tokens == whole.choices[0].logprobs.tokens
    assert offsets == whole.choices[0].logprobs.text_offset


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        (
            "/v1/chat/completions",
            {"tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
        ),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        (
            "/v1/completions",
            {"prompt": "x", "stream_options": {"continuous_usage_stats": True}},
            "stream_options",
        ),
        (
            "/v1/chat/completions",
            {"continue_final_message": True, "add_generation_prompt": True},
            "add_generation_prompt",
        ),
        ("/v1/chat/completions", {"scaling": {"strategy": "self_consistency", "n": 2}, "n": 3}, "n"),
        (
            "/v1/chat/completions",
            {"scaling": {"strategy": "self_consistency", "n": 2}, "stop": ["x"]},
            "stop",
        ),
        ("/v1/chat/completions", {"scaling": {"strategy": "beam_search"}, "top_p": 0.5}, "top_p"),
        ("/tokenize", {"prompt": "x", "add_generation_prompt": False}, "add_generation_prompt"),
    ],
)
def test_unsupported_field_is_refused_by_name(live, path, body, param):
    if "prompt" not in body:
        body = {"messages": [{"role": "user", "content": "x"}], **body}
    r = _post(live, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err


def test_tool_choice_none_is_honoured(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, tool_choice="none"
    )
    assert r.choices[0].finish_reason in ("stop", "length")
