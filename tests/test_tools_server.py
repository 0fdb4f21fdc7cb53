"""Issue 16, tool calling over HTTP, driven by the official openai SDK (its own types parse every
response and stream chunk).

Most tests run a live server over a scripted EngineClient: a request whose last user message says
`SCRIPT:<name>` gets, for choice j, the j-th reply of SCRIPTS[name], streamed a few characters at a
time (one token per character), with stop strings and max_tokens applied as the engine applies
them, so the tests control exactly what the "model" writes. The last tests run the tiny random
model, where only a grammar can make it call a tool: tool_choice required / named."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from conftest import tiny_llm  # noqa: E402
from test_server import LiveServer  # noqa: E402

from forkllm.engine.async_engine import AsyncEngine  # noqa: E402
from forkllm.engine.llm_engine import PromptInput  # noqa: E402
from forkllm.engine.outputs import CompletionOutput, RequestOutput  # noqa: E402
from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402
from forkllm.models.loader import default_tokenizer  # noqa: E402
from forkllm.scaling.base import Policy, ScaleResult  # noqa: E402
from forkllm.server.app import ServerConfig, create_app  # noqa: E402

MODEL = "scripted"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {"query": {"enum": ["rain", "sun"]}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, SEARCH]


def hermes(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


SCRIPTS: dict[str, list[str]] = {
    "two_calls": [
        "Let me check both.\n"
        + hermes("get_weather", {"city": "Paris"})
        + "\n"
        + hermes("search", {"query": "rain"})
        + "\nOne moment."
    ],
    "text": ["Just words, no <tools> here."],
    "unknown": [hermes("launch_rockets", {"count": 3})],
    "malformed": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'],
    "empty_args": [hermes("search", {})],
    "per_choice": [
        hermes("get_weather", {"city": "Rome"}),
        "No tools needed.",
        hermes("search", {"query": "sun"}),
    ],
    "llama": [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "search", "parameters": {"query": "sun"}}'
    ],
    "pythonic": ['[get_weather(city="Paris"), search(query="sun")]'],
}


class ScriptClient:
    """An EngineClient that writes SCRIPTS replies (see the module docstring) and records what it
    was asked and which requests were closed before their end (aborted)."""

    max_model_len = 8192
    vocab_size = 49152
    is_running = True
    num_waiting = 0

    def __init__(self, chunk: int = 3) -> None:
        self.tokenizer = default_tokenizer()
        self.chunk = chunk
        self.requests: list[tuple[str, SamplingParams]] = []
        self.closed_early: list[str] = []

    async def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str, priority: int = 0, watch=None
    ) -> AsyncIterator[RequestOutput]:
        assert isinstance(prompt, dict)
        text = str(prompt["prompt"])
        self.requests.append((text, params))
        key = re.findall(r"SCRIPT:(\w+)", text)[-1]
        replies = [self._as_engine_ends(SCRIPTS[key][j % len(SCRIPTS[key])], params) for j in range(params.n)]
        step, done = 0, False
        try:
            while not done:
                await asyncio.sleep(0.001)
                outs, done = [], True
                for j, (reply, reason) in enumerate(replies):
                    a, b = step * self.chunk, (step + 1) * self.chunk
                    if params.output_kind is RequestOutputKind.FINAL_ONLY:
                        a, b = 0, len(reply)
                    if a >= len(reply):
                        continue
                    last = b >= len(reply)
                    done = done and last
                    piece = reply[a:b]
                    ids = [ord(c) % self.vocab_size for c in piece]
                    outs.append(CompletionOutput(j, piece, ids, None, None, reason if last else None))
                step += 1
                if params.output_kind is RequestOutputKind.FINAL_ONLY:
                    done = True
                yield RequestOutput(request_id, text, [], None, outs, done)
        finally:
            if not done:
                self.closed_early.append(request_id)

    @staticmethod
    def _as_engine_ends(reply: str, params: SamplingParams) -> tuple[str, str]:
        """The reply cut where the engine would stop: a stop string, or max_tokens characters."""
        cut, reason = len(reply), "stop"
        for stop in params.stop_strings:
            at = reply.find(stop)
            if 0 <= at < cut:
                cut = at + (len(stop) if params.include_stop_str_in_output else 0)
        if params.max_tokens is not None and cut > params.max_tokens:
            cut, reason = params.max_tokens, "length"
        return reply[:cut], reason

    def abort(self, request_id: str) -> None:
        pass

    async def run_policy(self, policy: Policy, prompt_ids: list[int], question: str) -> ScaleResult:
        raise ValueError("no policies here")

    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        raise ValueError("chat only")

    def metrics(self) -> dict[str, float]:
        return {}

    def shutdown(self) -> None:
        pass

    def describe(self) -> str:
        return "scripted"


def _server(parser: str = "hermes", chunk: int = 3):
    engine = ScriptClient(chunk)
    srv = LiveServer(
        create_app(ServerConfig(served_model_name=MODEL, tool_call_parser=parser), engine=engine)
    )
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    return srv, client, engine


@pytest.fixture(scope="module")
def scripted():
    srv, client, engine = _server()
    yield client, engine, srv
    srv.stop()


def ask(script: str) -> list[dict]:
    return [{"role": "user", "content": f"Please answer. SCRIPT:{script}"}]


def gathered(stream) -> list[dict]:
    """The stream's chunks put together per choice, as an agent loop would: content, calls by index."""
    choices: dict[int, dict] = {}
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            got = choices.setdefault(c.index, {"content": None, "calls": {}, "finish_reason": None})
            if c.delta.content:
                got["content"] = (got["content"] or "") + c.delta.content
            for tc in c.delta.tool_calls or ():
                call = got["calls"].setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert call["id"] is None and tc.type == "function"
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
            if c.finish_reason:
                assert got["finish_reason"] is None
                got["finish_reason"] = c.finish_reason
    return [choices[i] for i in sorted(choices)]


def whole(response) -> list[dict]:
    out = []
    for c in sorted(response.choices, key=lambda c: c.index):
        calls = {
            i: {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
            for i, tc in enumerate(c.message.tool_calls or ())
        }
        out.append({"content": c.message.content, "calls": calls, "finish_reason": c.finish_reason})
    return out


def without_ids(choices: list[dict]) -> list[dict]:
    return [{**c, "calls": {i: {**v, "id": None} for i, v in c["calls"].items()}} for c in choices]


# ---- auto -------------------------------------------------------------------------------------
def test_auto_parses_calls_streamed_and_whole_alike(scripted):
    client, engine, _ = scripted
    r = client.chat.completions.create(model=MODEL, messages=ask("two_calls"), tools=TOOLS)
    [choice] = whole(r)
    assert choice["content"] == "Let me check both.One moment."
    assert [(c["name"], json.loads(c["arguments"])) for c in choice["calls"].values()] == [
        ("get_weather", {"city": "Paris"}),
        ("search", {"query": "rain"}),
    ]
    assert choice["finish_reason"] == "tool_calls"
    ids = [c["id"] for c in choice["calls"].values()]
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids) and len(set(ids)) == 2
    streamed = gathered(
        client.chat.completions.create(model=MODEL, messages=ask("two_calls"), tools=TOOLS, stream=True)
    )
    assert without_ids(streamed) == without_ids([choice])
    # the tools went into the system message, Hermes-style (SmolLM2's template has no tools)
    prompt = engine.requests[-1][0]
    assert "<tools>\n" + json.dumps(WEATHER) in prompt and "<tool_call>" in prompt


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_any_delta_size_gives_the_same_message(chunk):
    srv, client, _ = _server(chunk=chunk)
    try:
        streamed = gathered(
            client.chat.completions.create(model=MODEL, messages=ask("two_calls"), tools=TOOLS, stream=True)
        )
        r = client.chat.completions.create(model=MODEL, messages=ask("two_calls"), tools=TOOLS)
        assert without_ids(streamed) == without_ids(whole(r))
        assert len(streamed[0]["calls"]) == 2
    finally:
        srv.stop()


def test_stream_chunks_are_openai_shaped(scripted):
    client, _, _ = scripted
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=ask("two_calls"), tools=TOOLS, stream=True
    ) as raw:
        events = [json.loads(line[6:]) for line in raw.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert deltas[0] == {"role": "assistant"}
    heads = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [h["index"] for h in heads] == [0, 1]
    assert all(h["type"] == "function" and h["function"]["arguments"] == "" for h in heads)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    "script, content",
    [
        ("text", "Just words, no <tools> here."),
        ("unknown", hermes("launch_rockets", {"count": 3})),  # not offered: stays text
        ("malformed", SCRIPTS["malformed"][0]),
    ],
)
def test_what_is_not_a_call_of_an_offered_tool_stays_content(scripted, script, content):
    client, _, _ = scripted
    r = client.chat.completions.create(model=MODEL, messages=ask(script), tools=TOOLS)
    assert r.choices[0].message.content == content and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    streamed = gathered(
        client.chat.completions.create(model=MODEL, messages=ask(script), tools=TOOLS, stream=True)
    )
    assert streamed == [{"content": content, "calls": {}, "finish_reason": "stop"}]


def test_empty_arguments(scripted):
    client, _, _ = scripted
    r = client.chat.completions.create(model=MODEL, messages=ask("empty_args"), tools=TOOLS)
    assert r.choices[0].message.tool_calls[0].function.arguments == "{}"
    assert r.choices[0].message.content is None


def test_each_choice_is_parsed_on_its_own(scripted):
    client, _, _ = scripted
    r = client.chat.completions.create(model=MODEL, messages=ask("per_choice"), tools=TOOLS, n=3)
    got = whole(r)
    assert [c["finish_reason"] for c in got] == ["tool_calls", "stop", "tool_calls"]
    assert [[v["name"] for v in c["calls"].values()] for c in got] == [["get_weather"], [], ["search"]]
    assert got[1]["content"] == "No tools needed."
    streamed = gathered(
        client.chat.completions.create(model=MODEL, messages=ask("per_choice"), tools=TOOLS, n=3, stream=True)
    )
    assert without_ids(streamed) == without_ids(got)


def test_tool_choice_none_leaves_tools_out_and_parses_nothing(scripted):
    client, engine, _ = scripted
    r = client.chat.completions.create(
        model=MODEL, messages=ask("two_calls"), tools=TOOLS, tool_choice="none"
    )
    assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert "<tools>" not in engine.requests[-1][0]


def test_auto_is_not_forced(scripted):
    client, engine, _ = scripted
    client.chat.completions.create(model=MODEL, messages=ask("text"), tools=TOOLS, tool_choice="auto")
    params = engine.requests[-1][1]
    assert params.structured is None and params.stop_strings == []


# ---- required, named, parallel_tool_calls -------------------------------------------------------
def test_required_and_named_are_forced_by_a_grammar(scripted):
    client, engine, _ = scripted
    client.chat.completions.create(
        model=MODEL, messages=ask("two_calls"), tools=TOOLS, tool_choice="required"
    )
    grammar = engine.requests[-1][1].structured.grammar
    assert '"const": "get_weather"' in grammar and '"const": "search"' in grammar
    assert 'tool_call ("\\n" tool_call)*' in grammar  # parallel: one or more calls
    client.chat.completions.create(
        model=MODEL,
        messages=ask("two_calls"),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "search"}},
        parallel_tool_calls=False,
    )
    grammar = engine.requests[-1][1].structured.grammar
    assert '"const": "search"' in grammar and "get_weather" not in grammar
    assert grammar.startswith("start: tool_call\n")  # exactly one call


def test_parallel_tool_calls_false_stops_at_the_first_call_with_a_stop_string(scripted):
    client, engine, _ = scripted
    r = client.chat.completions.create(
        model=MODEL, messages=ask("two_calls"), tools=TOOLS, parallel_tool_calls=False
    )
    assert engine.requests[-1][1].stop_strings == ["</tool_call>"]
    [choice] = whole(r)
    assert [c["name"] for c in choice["calls"].values()] == ["get_weather"]
    assert choice["content"] == "Let me check both." and choice["finish_reason"] == "tool_calls"
    streamed = gathered(
        client.chat.completions.create(
            model=MODEL, messages=ask("two_calls"), tools=TOOLS, parallel_tool_calls=False, stream=True
        )
    )
    assert without_ids(streamed) == without_ids([choice])


@pytest.mark.parametrize("parser, script", [("llama3_json", "llama"), ("pythonic", "pythonic")])
@pytest.mark.parametrize("stream", [False, True])
def test_other_formats_and_parallel_false_ends_the_request_at_the_first_call(parser, script, stream):
    srv, client, engine = _server(parser, chunk=2)
    try:
        both = client.chat.completions.create(model=MODEL, messages=ask(script), tools=TOOLS)
        assert [tc.function.name for tc in both.choices[0].message.tool_calls] == ["get_weather", "search"]
        assert both.choices[0].finish_reason == "tool_calls"
        prompt = engine.requests[-1][0]
        assert ("parameters" in prompt) if parser == "llama3_json" else ("Python list" in prompt)
        kw = dict(model=MODEL, messages=ask(script), tools=TOOLS, parallel_tool_calls=False)
        got = (
            gathered(client.chat.completions.create(**kw, stream=True))
            if stream
            else whole(client.chat.completions.create(**kw))
        )
        assert [(c["name"], json.loads(c["arguments"])) for c in got[0]["calls"].values()] == [
            ("get_weather", {"city": "Paris"})
        ]
        assert got[0]["finish_reason"] == "tool_calls" and not got[0]["content"]
        # the engine request ended there (the second call never generated); the server closes the
        # streamed generator from its own task, so this may land just after the response does
        for _ in range(100):
            if engine.closed_early:
                break
            time.sleep(0.05)
        assert engine.closed_early
    finally:
        srv.stop()


# ---- history ----------------------------------------------------------------------------------
def test_agent_history_round_trip(scripted):
    """Call, run the tool, send everything back: the assistant's calls and the tool's result
    come back to the model as it wrote and reads them."""
    client, engine, _ = scripted
    first = client.chat.completions.create(model=MODEL, messages=ask("two_calls"), tools=TOOLS)
    message = first.choices[0].message
    history = [
        *ask("two_calls"),
        message.model_dump(exclude_none=True),
        *[
            {"role": "tool", "tool_call_id": tc.id, "content": json.dumps({"ok": tc.function.name})}
            for tc in message.tool_calls
        ],
        {"role": "user", "content": "Thanks. SCRIPT:text"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    assert r.choices[0].message.content == SCRIPTS["text"][0]
    prompt = engine.requests[-1][0]
    assert (
        "<|im_start|>assistant\nLet me check both.One moment.\n"
        + hermes("get_weather", {"city": "Paris"})
        + "\n"
        + hermes("search", {"query": "rain"})
        + "<|im_end|>"
    ) in prompt
    assert '<|im_start|>tool\n<tool_response>\n{"ok": "search"}\n</tool_response><|im_end|>' in prompt


# ---- errors -----------------------------------------------------------------------------------
BAD = [
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    (
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS},
        "tool_choice.function.name",
    ),
    ({"tool_choice": {"type": "function"}, "tools": TOOLS}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
        "tools.0.function.parameters",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "properties": 3}},
                }
            ]
        },
        "tools.0.function.parameters.properties",
    ),
    ({"tools": [{"type": "function", "function": {"name": "f", "extra": 1}}]}, "tools.0.function.extra"),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
    ),
    ({"tools": TOOLS, "scaling": {"strategy": "self_consistency", "n": 2}}, "tools"),
    ({"parallel_tool_calls": "maybe"}, "parallel_tool_calls"),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"pattern": "(?=x)"}}},
                    },
                }
            ],
            "tool_choice": "required",
        },
        "tools.0.function.parameters",
    ),
]


@pytest.mark.parametrize("body, param", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_tool_fields_are_a_400_naming_the_field(scripted, body, param):
    _, _, srv = scripted
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": ask("text"), **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


def test_serve_help_shows_the_tool_call_parser():
    out = subprocess.run(
        [sys.executable, "-m", "forkllm.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--tool-call-parser {hermes,llama3_json,pythonic}" in out


# ---- the tiny random model: only a grammar makes it call ----------------------------------------
@pytest.fixture(scope="module")
def tiny_client():
    engine = AsyncEngine(tiny_llm(max_model_len=1024).engine)
    srv = LiveServer(create_app(ServerConfig(served_model_name="tiny"), engine=engine))
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    srv.stop()


def _valid(call, tools=TOOLS) -> None:
    import jsonschema

    spec = next(t["function"] for t in tools if t["function"]["name"] == call["name"])
    jsonschema.validate(json.loads(call["arguments"]), spec["parameters"])


@pytest.mark.parametrize("stream", [False, True])
def test_required_gives_valid_calls_from_the_tiny_model(tiny_client, stream):
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        n=3,
        seed=0,
        temperature=1.0,
    )
    choices = (
        gathered(tiny_client.chat.completions.create(**kw, stream=True))
        if stream
        else whole(tiny_client.chat.completions.create(**kw))
    )
    for c in choices:
        assert c["finish_reason"] == "tool_calls" and c["calls"], c
        for call in c["calls"].values():
            _valid(call)
        # nothing but calls; at most a last call cut by max_tokens, which is not a call
        assert not c["content"] or c["content"].startswith("<tool_call>"), c


def test_named_function_gives_one_call_of_it(tiny_client):
    r = tiny_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Look it up."}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "search"}},
        parallel_tool_calls=False,
        max_tokens=60,
        n=4,
        seed=1,
    )
    for c in whole(r):
        assert [v["name"] for v in c["calls"].values()] == ["search"], c
        _valid(c["calls"][0])
        assert c["finish_reason"] == "tool_calls"
