"""Real clients, unmodified, against a real `forkllm serve` process (issue 15).

The server is a subprocess on 127.0.0.1 (a free port) serving the 2-layer `tiny` preset with random
weights in float32. The clients are the official openai SDK and its_hub's stock
`OpenAICompatibleLanguageModel` (its self-consistency, best-of-N and particle filtering, with tiny
budgets and toy reward models: what is under test is the wire format, not the answers). its_hub
1.2.0 sends a literal `"extra_body": {...}` object inside the JSON of every chat request (plus the
same fields at the top level); `test_its_hub_wire_body` replays those exact bodies without needing
its_hub installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import serve_tiny_cmd

openai = pytest.importorskip("openai")

MODEL = "tiny"
KEY = "real-clients-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_tiny(*extra: str, timeout: float = 120.0) -> Iterator[str]:
    """`forkllm serve tiny` (random weights, float32, 64 MiB of KV) on a free loopback port with
    API key KEY; yields its /v1 base URL once /health is 200; always terminates it."""
    port = free_port()
    cmd = serve_tiny_cmd(port, "--api-key", KEY, *extra)
    with tempfile.TemporaryFile(mode="w+") as log:  # a file, not a pipe: a chatty server never blocks
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )

        def output() -> str:
            log.seek(0)
            return log.read()[-4000:]

        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"forkllm serve exited with {proc.returncode}:\n{output()}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"forkllm serve not healthy after {timeout:.0f} s:\n{output()}")
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_tiny() as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60)


def failed_requests(base_url: str) -> int:
    """Requests to /v1 the server answered with anything but 200, from its /metrics."""
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    total = 0.0
    for m in re.finditer(r"^forkllm_requests_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        status = re.search(r'status="(\d+)"', m.group(1))
        if status and status.group(1) != "200":
            total += float(m.group(2))
    return int(total)


# ---- the openai SDK -------------------------------------------------------------------------------
AGENT_HISTORY = [
    {"role": "system", "content": "You are a helpful assistant with a weather tool."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 18, "sky": "sunny"}'},
    {"role": "user", "content": "Thanks. Do I need an umbrella?"},
]


def test_openai_agent_history_with_tool_calls(client):
    """The history every agent loop sends back: an assistant turn that is only tool calls
    (content None), the tool's answer, then the user again."""
    r = client.chat.completions.create(model=MODEL, messages=AGENT_HISTORY, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0


def test_openai_stream_usage_n2_extra_body(client):
    """stream + include_usage, n=2, and vLLM's fields through the SDK's extra_body (which the SDK
    merges into the top level of the JSON)."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=6,
        temperature=0.9,
        seed=3,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"top_k": 5, "ignore_eos": True},
    )
    chunks = list(stream)
    finish: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            assert ch.index in (0, 1) and isinstance(ch.delta.content or "", str)
            if ch.finish_reason is not None:
                finish[ch.index] = ch.finish_reason
    assert finish == {0: "length", 1: "length"}  # ignore_eos: both run to max_tokens
    last = chunks[-1]
    assert not last.choices and last.usage is not None
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_completions_n2_extra_body(client):
    r = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=5,
        n=2,
        temperature=0.9,
        extra_body={"top_k": 5, "ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 10


# ---- its_hub --------------------------------------------------------------------------------------
# What its_hub 1.2.0's OpenAICompatibleLanguageModel._prepare_request_data sends to an endpoint
# whose URL does not contain "openai" (it then assumes vLLM): a literal "extra_body" object in the
# JSON, always (empty on a plain request), and the same fields again at the top level.
QUESTION = "What is 2 + 3?"


def its_hub_first_step_body(model: str = MODEL) -> dict:
    """A particle filter's first step: the question alone, stop at a newline."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "extra_body": {"include_stop_str_in_output": False},
        "include_stop_str_in_output": False,
        "stop": "\n",
        "max_completion_tokens": 6,
        "temperature": 0.8,
    }


def its_hub_continuation_body(model: str = MODEL) -> dict:
    """A later step: the steps so far as a final assistant message to continue."""
    return {
        "model": model,
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "First, 2 + 3 means adding.\n"},
        ],
        "extra_body": {
            "add_generation_prompt": False,
            "continue_final_message": True,
            "include_stop_str_in_output": False,
        },
        "add_generation_prompt": False,
        "continue_final_message": True,
        "include_stop_str_in_output": False,
        "stop": "\n",
        "max_completion_tokens": 6,
        "temperature": 0.8,
    }


def its_hub_sampling_body(model: str = MODEL) -> dict:
    """Self-consistency and best-of-N: one request per sample, an empty extra_body."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "extra_body": {},
        "max_completion_tokens": 6,
        "temperature": 0.8,
    }


@pytest.mark.parametrize(
    "make_body", [its_hub_sampling_body, its_hub_first_step_body, its_hub_continuation_body]
)
def test_its_hub_wire_body(base_url, make_body):
    r = httpx.post(base_url + "/chat/completions", json=make_body(), headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")


@pytest.fixture(scope="module")
def its_hub_lm(base_url):
    pytest.importorskip("its_hub")
    from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel

    # max_tries=1: a refused or failed request raises at once instead of being retried.
    return OpenAICompatibleLanguageModel(
        endpoint=base_url,
        api_key=KEY,
        model_name=MODEL,
        max_completion_tokens=6,
        temperature=0.8,
        max_tries=1,
    )


def test_its_hub_bodies_match_the_replayed_ones(its_hub_lm):
    """The literal bodies above are what the installed its_hub really sends."""
    from its_hub.api import ChatMessage

    user = ChatMessage(role="user", content=QUESTION)
    partial = ChatMessage(role="assistant", content="First, 2 + 3 means adding.\n")
    prepare = its_hub_lm._prepare_request_data
    assert prepare([user]) == its_hub_sampling_body()
    assert prepare([user], stop="\n", include_stop_str_in_output=False) == its_hub_first_step_body()
    assert (
        prepare([user, partial], stop="\n", include_stop_str_in_output=False) == its_hub_continuation_body()
    )


def test_its_hub_self_consistency(base_url, its_hub_lm):
    from its_hub import SelfConsistency

    before = failed_requests(base_url)
    result = SelfConsistency().infer(its_hub_lm, QUESTION, budget=4, return_response_only=False)
    assert len(result.responses) == 4
    assert all(r["role"] == "assistant" and isinstance(r["content"], str) for r in result.responses)
    assert result.the_one in result.responses
    assert failed_requests(base_url) == before


def test_its_hub_best_of_n(base_url, its_hub_lm):
    from its_hub import BestOfN
    from its_hub.api import AbstractOutcomeRewardModel

    class LongestAnswer(AbstractOutcomeRewardModel):
        def score(self, messages, **kwargs):
            return [float(len(conv[-1].content or "")) for conv in messages]

        async def ascore(self, messages, orchestrator=None, **kwargs):
            return self.score(messages)

    before = failed_requests(base_url)
    result = BestOfN(LongestAnswer()).infer(its_hub_lm, QUESTION, budget=3, return_response_only=False)
    assert len(result.responses) == 3 and len(result.scores) == 3
    assert result.the_one["content"] == max((r["content"] for r in result.responses), key=len)
    assert failed_requests(base_url) == before


def test_its_hub_particle_filtering(base_url, its_hub_lm):
    """Steps up to a newline; every step after the first continues the partial answer through
    continue_final_message, the request its_hub's particle methods are built on."""
    from its_hub.api import AbstractProcessRewardModel
    from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
    from its_hub.core.lms.step_generation import StepGeneration

    class ToyPRM(AbstractProcessRewardModel):
        def score(self, prompt_or_messages, steps):
            return [0.1 + 0.8 * (len(s) % 10) / 10 for s in steps]

        async def ascore(self, prompt_or_messages, steps):
            return self.score(prompt_or_messages, steps)

    before = failed_requests(base_url)
    pf = ParticleFiltering(StepGeneration(max_steps=2, step_token="\n", temperature=0.8), ToyPRM())
    result = pf.infer(its_hub_lm, QUESTION, budget=3, return_response_only=False)
    assert len(result.responses) == 3 and len(result.log_weights_lst) == 3
    assert all(isinstance(r["content"], str) for r in result.responses)
    assert all(1 <= steps <= 3 for steps in result.steps_used_lst)
    assert failed_requests(base_url) == before
