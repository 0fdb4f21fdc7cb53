"""Issue 15, the HTTP layer: every bad input a clean 4xx naming the field, errors always
OpenAI-shaped, limits, the event loop kept free, shutdown that ends streams properly, and real
clients (a literal extra_body, logit_bias, x-request-id) served unmodified.

Most tests drive the app in-process (TestClient) over a tiny random model; those about the
event loop, connections and shutdown run a live uvicorn over a fake EngineClient whose timing
they control."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import AsyncIterator

import httpx
import pytest

uvicorn = pytest.importorskip("uvicorn")
from conftest import serve_tiny_cmd, tiny_llm  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_server import LiveServer, _free_port  # noqa: E402

from forkllm.engine.async_engine import AsyncEngine  # noqa: E402
from forkllm.engine.llm_engine import PromptInput  # noqa: E402
from forkllm.engine.outputs import CompletionOutput, RequestOutput  # noqa: E402
from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402
from forkllm.scaling.base import Policy, ScaleResult  # noqa: E402
from forkllm.server.app import ServerConfig, create_app  # noqa: E402
from forkllm.server.errors import APIError  # noqa: E402
from forkllm.server.limits import Limits, check_scaling_spec  # noqa: E402
from forkllm.server.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402

KEY = "test-key"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(max_request_bytes=256 * 1024, max_prompt_bytes=16 * 1024)
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def engine():
    engine = AsyncEngine(tiny_llm(max_model_len=256).engine)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def http(engine):
    """The app in-process, with an API key and small body / prompt limits."""
    config = ServerConfig(
        served_model_name=MODEL, api_key=KEY, limits=LIMITS, trust_request_chat_template=True
    )
    return TestClient(create_app(config, engine=engine), headers=AUTH)


def test_a_requests_chat_template_is_refused_unless_the_server_trusts_it(engine):
    """It is template code run on the server (e.g. a loop building a 10 GB string): a 400 naming
    chat_template by default, as vLLM's --trust-request-chat-template does."""
    plain = TestClient(create_app(ServerConfig(served_model_name=MODEL), engine=engine))
    body = {**CHAT, "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    err = _error(plain.post("/v1/chat/completions", json=body), 400, "chat_template")
    assert "--trust-request-chat-template" in err["message"]
    assert plain.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.engine.tokenizer


def _raw(http, path, text: str, headers=None):
    """POST `text` verbatim as the JSON body (for NaN, lone surrogates, deep nesting)."""
    return http.post(
        path, content=text.encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )


def _error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---- 4: valid input that used to be a 500 ----------------------------------------------------------
AGENT_HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
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
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
]


def test_agent_history_with_null_content_and_tool_messages_renders(http):
    r = http.post("/v1/chat/completions", json={"messages": AGENT_HISTORY, "max_tokens": 2})
    assert r.status_code == 200, r.text
    as_null = http.post("/tokenize", json={"messages": AGENT_HISTORY}).json()["tokens"]
    empty = [dict(m, content=m["content"] or "") for m in AGENT_HISTORY]
    assert as_null == http.post("/tokenize", json={"messages": empty}).json()["tokens"]


def test_a_template_sees_tool_calls_with_parsed_arguments(http, tokenizer):
    template = (
        "{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}"
        "CALL {{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
        "{% else %}{{ m.role }}: {{ m.content }}{% endif %}{{ '\\n' }}{% endfor %}"
    )
    r = http.post(
        "/v1/chat/completions", json={"messages": AGENT_HISTORY, "max_tokens": 1, "chat_template": template}
    )
    assert r.status_code == 200, r.text
    expected = "user: Weather in Paris?\nCALL get_weather(Paris)\ntool: 18C\n"
    assert r.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(expected, add_special_tokens=False))


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "messages.0.content",
        ),
        ("/v1/completions", '{"prompt": "x\\ud800"}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt.1"),
        ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"]}', "stop.0"),
        ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(http, path, body, param):
    err = _error(_raw(http, path, body), 400, param)
    assert err["code"] == "invalid_unicode" and "surrogate" in err["message"]


@pytest.mark.parametrize(
    "template, needle",
    [
        ("{{ raise_exception('no system role here') }}", "no system role here"),
        ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
    ],
)
def test_chat_template_errors_are_a_400_naming_chat_template(http, template, needle):
    r = http.post("/v1/chat/completions", json={**CHAT, "chat_template": template})
    assert needle in _error(r, 400, "chat_template")["message"]


def test_the_schema_lists_the_roles_templates_accept():
    from typing import get_args

    from forkllm.server.protocol import Role
    from forkllm.tokenizer import VALID_ROLES

    assert set(get_args(Role)) == set(VALID_ROLES)


# ---- 5: finite numbers only ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e309"])
@pytest.mark.parametrize(
    "path, field",
    [
        ("/v1/completions", "temperature"),
        ("/v1/completions", "repetition_penalty"),
        ("/v1/completions", "top_p"),
        ("/v1/chat/completions", "presence_penalty"),
        ("/v1/chat/completions", "min_p"),
    ],
)
def test_non_finite_numbers_are_a_400_naming_the_field(http, path, field, value):
    base = (
        '{"prompt": "x", "max_tokens": 2'
        if path == "/v1/completions"
        else '{"messages": [{"role": "user", "content": "x"}]'
    )
    err = _error(_raw(http, path, f'{base}, "{field}": {value}}}'), 400, field)
    assert "finite" in err["message"]


def test_non_finite_numbers_inside_free_form_objects_are_named(http):
    r = _raw(http, "/v1/completions", '{"prompt": "x", "logit_bias": {"5": NaN}}')
    _error(r, 400, "logit_bias.5")
    r = _raw(
        http,
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "x"}], "scaling": {"temperature": Infinity}}',
    )
    _error(r, 400, "scaling.temperature")


# ---- 6: the event loop, body size, the key ---------------------------------------------------------
def test_body_over_the_limit_is_a_413_declared_or_streamed(http):
    big = json.dumps({"prompt": "x" * (LIMITS.max_request_bytes + 10)}).encode()
    err = _error(http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}), 413)
    assert err["code"] == "request_too_large" and "--max-request-body" in err["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert _error(r, 413)["code"] == "request_too_large"
    assert http.post("/v1/completions", json={"prompt": "fits", "max_tokens": 1}).status_code == 200


def test_prompt_over_the_byte_limit_is_refused_before_tokenizing(http):
    r = http.post("/v1/completions", json={"prompt": "é" * (LIMITS.max_prompt_bytes // 2 + 1)})
    assert _error(r, 400, "prompt")["code"] == "prompt_too_large"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 20000}]})
    assert "--max-prompt-bytes" in _error(r, 400, "messages")["message"]
    r = http.post("/tokenize", json={"prompt": "x" * 20000})
    _error(r, 400, "prompt")


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/tokenize", {"prompt": "x"}),
        ("POST", "/detokenize", {"tokens": [1]}),
        ("GET", "/metrics", None),
    ],
)
def test_tokenize_detokenize_and_metrics_need_the_key(http, method, path, body):
    r = http.request(method, path, json=body, headers={"Authorization": "Bearer wrong"})
    assert _error(r, 401)["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert http.request(method, path, json=body).status_code == 200
    assert http.get("/health", headers={"Authorization": ""}).status_code == 200


# ---- 8: every error OpenAI-shaped, models by id, the schema -------------------------------------------
def test_framework_errors_are_openai_shaped(http):
    r = http.get("/v1/completions")
    assert _error(r, 405)["code"] == "method_not_allowed" and "POST" in r.headers["allow"]
    assert _error(http.post("/v1/nothing-here", json={}), 404)["code"] == "not_found"
    deep = '{"prompt": ' + "[" * 50000 + "]" * 50000 + "}"
    assert _error(_raw(http, "/v1/completions", deep), 400)["code"] == "invalid_json"
    nested = '{"prompt": "x", "scaling": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}"  # parses; still refused
    assert "nested" in _error(_raw(http, "/v1/completions", nested), 400)["message"]


def test_model_by_id(http):
    r = http.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200 and r.json()["id"] == MODEL and r.json()["object"] == "model"
    assert _error(http.get("/v1/models/gpt-9"), 404, "model")["code"] == "model_not_found"
    assert _error(http.get("/v1/models/org/gpt-9"), 404, "model")["code"] == "model_not_found"


def test_top_logprobs_out_of_range_names_top_logprobs(http):
    for k in (21, -1):
        r = http.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": k})
        _error(r, 400, "top_logprobs")


def test_openapi_documents_400_with_the_error_model_and_never_422(http):
    schema = http.get("/openapi.json").json()
    assert "ErrorResponse" in schema["components"]["schemas"]
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses, path
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "HTTPValidationError" not in schema["components"]["schemas"]


# ---- 9: real clients --------------------------------------------------------------------------------
def test_a_literal_extra_body_is_merged(http):
    body = {"prompt": "x", "max_tokens": 3, "extra_body": {"ignore_eos": True, "top_k": 5}}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    r = http.post("/v1/chat/completions", json={**CHAT, "extra_body": {"repetition_penalty": 1.1}})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={**body, "extra_body": {"max_tokens": 5}})
    assert "extra_body" in _error(r, 400, "max_tokens")["message"]
    # its_hub repeats each extra_body field at the top level, with the same value: accepted.
    r = http.post("/v1/completions", json={**body, "extra_body": {"max_tokens": 3, "seed": 1}})
    assert r.status_code == 200, r.text
    _error(http.post("/v1/completions", json={**body, "extra_body": [1]}), 400, "extra_body")
    _error(http.post("/v1/completions", json={**body, "extra_body": {"frobnicate": 1}}), 400, "frobnicate")


def _greedy_tokens(http, **extra) -> list[str]:
    r = http.post(
        "/v1/completions",
        json={"prompt": "The", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 0, **extra},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def test_logit_bias_steers_sampling(http, tokenizer):
    """+100 makes a token all but certain (the ban and the arithmetic: tests/test_sampler.py)."""
    plain = _greedy_tokens(http)
    forced = tokenizer.encode(" banana", add_special_tokens=False)[0]
    assert _greedy_tokens(http, logit_bias={str(forced): 100}) == [tokenizer.decode([forced])] * 4
    chat = http.post(
        "/v1/chat/completions", json={**CHAT, "temperature": 0, "logit_bias": {str(forced): 100}}
    )
    assert chat.json()["choices"][0]["message"]["content"] == tokenizer.decode([forced]) * 2
    assert _greedy_tokens(http, logit_bias={}) == plain


@pytest.mark.parametrize("bias", [{"abc": 1}, {"49152": 1}, {"-1": 1}, {"5": 101}, {"5": -100.5}])
def test_bad_logit_bias_is_a_400(http, bias):
    _error(http.post("/v1/completions", json={"prompt": "x", "logit_bias": bias}), 400, "logit_bias")


def test_every_response_carries_x_request_id(http):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.headers["x-request-id"] == r.json()["id"]
    r = http.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "client-42"})
    assert r.headers["x-request-id"] == "client-42"
    for r in (http.get("/health"), http.get("/v1/nope"), http.get("/metrics", headers={"Authorization": ""})):
        assert len(r.headers["x-request-id"]) >= 16
    with http.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 1, "stream": True}) as r:
        assert r.headers["x-request-id"].startswith("cmpl-")


# ---- limits -------------------------------------------------------------------------------------------
def test_n_and_best_of_limits(http):
    assert (
        "--max-n" in _error(http.post("/v1/completions", json={"prompt": "x", "n": 129}), 400, "n")["message"]
    )
    _error(http.post("/v1/chat/completions", json={**CHAT, "n": 129}), 400, "n")
    r = http.post("/v1/completions", json={"prompt": "x", "n": 2, "best_of": 129})
    assert "--max-best-of" in _error(r, 400, "best_of")["message"]


def test_a_list_of_prompts_multiplies_the_samples_under_one_limit(http):
    r = http.post("/v1/completions", json={"prompt": ["x"] * 9, "n": 128, "max_tokens": 1})
    msg = _error(r, 400, "prompt")["message"]
    assert "9 prompts x 128 samples = 1152 sequences" in msg and "--max-request-sequences" in msg
    # one prompt given as token ids is one prompt, not a list of 20
    r = http.post("/v1/completions", json={"prompt": list(range(10, 30)), "n": 2, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


@pytest.mark.parametrize(
    "spec, param",
    [
        ({"strategy": "self_consistency", "n": 65}, "scaling.n"),
        ({"strategy": "particle_filter", "particles": 100}, "scaling.particles"),
        ({"strategy": "beam_search", "width": 8, "expand": 9}, "scaling.width"),
        ({"strategy": "beam_search", "expand": 0}, "scaling.expand"),
        ({"strategy": "best_of_n", "n": "8"}, "scaling.n"),
        ({"strategy": "best_of_n", "budget": 10**6}, "scaling.budget"),
        ({"strategy": "best_of_n", "n": 64, "max_tokens": 2048}, "scaling.max_tokens"),
        ({"strategy": "best_of_n", "max_tokens": True}, "scaling.max_tokens"),
    ],
)
def test_scaling_spec_limits(spec, param):
    with pytest.raises(APIError) as e:
        check_scaling_spec(spec, Limits())
    assert e.value.status == 400 and e.value.param == param


def test_scaling_limits_apply_on_the_chat_route(http):
    r = http.post("/v1/chat/completions", json={**CHAT, "scaling": {"strategy": "self_consistency", "n": 65}})
    assert "--max-scaling-width" in _error(r, 400, "scaling.n")["message"]
    r = http.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 4096, "scaling": {"strategy": "best_of_n", "n": 64}},
    )
    _error(r, 400, "max_tokens")


def test_scaling_spec_within_limits_passes():
    check_scaling_spec({"strategy": "beam_search", "width": 8, "expand": 8, "max_tokens": 512}, Limits())
    check_scaling_spec({"strategy": "best_of_n", "n": 64, "max_tokens": 4096, "budget": 65536}, Limits())
    check_scaling_spec({"strategy": "self_consistency"}, Limits())


def test_serve_help_shows_the_limits():
    import argparse

    from forkllm.server.serve import add_serve_parser, limits_from_args

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_serve_parser(sub)
    text = sub.choices["serve"].format_help()
    for flag in (
        "--max-n",
        "--max-best-of",
        "--max-scaling-width",
        "--max-scaling-budget",
        "--max-prompt-bytes",
        "--max-request-body",
        "--max-request-sequences",
    ):
        assert flag in text, flag
    assert limits_from_args(parser.parse_args(["serve"])) == Limits()
    assert limits_from_args(
        parser.parse_args(["serve", "--max-request-body", "1MiB", "--max-n", "4"])
    ) == Limits(max_n=4, max_request_bytes=1 << 20)


# ---- property tests -----------------------------------------------------------------------------------
# Text that broke the server before issue 15: lone surrogates and chat-template code.
tricky_text = st.sampled_from(
    [
        "\ud800",
        "a\udfffb",
        "{{ x",
        "{% for %}",
        "{{ raise_exception('no') }}",
        "{{ messages[0].content + 1 }}",
        "",
    ]
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and the infinities included
    | st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates included
    | tricky_text
)


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": inner},
        optional={"tool_calls": inner, "tool_call_id": inner, "name": inner},
    )
    return (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        | st.lists(message, min_size=1, max_size=3)
    )


json_values = st.recursive(leaves, _containers, max_leaves=8)


def _fuzzed(base: dict, fields: list[str]):
    return st.dictionaries(st.sampled_from(fields), json_values, max_size=3).map(lambda d: {**base, **d})


def _send(http, path: str, body: dict):
    """Sent as Python's json writes it (NaN, surrogate escapes), streamed responses read to the end."""
    text = json.dumps(body)
    with http.stream("POST", path, content=text.encode(), headers={"Content-Type": "application/json"}) as r:
        r.read()
    event(f"{path} -> {r.status_code}")
    return r


def _assert_survives(http) -> None:
    assert http.get("/health").status_code == 200
    assert http.post("/v1/completions", json={"prompt": "still here", "max_tokens": 1}).status_code == 200


FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=_fuzzed({"prompt": "hi", "max_tokens": 2}, sorted(CompletionRequest.model_fields)))
@example(body={"prompt": "a\ud800", "max_tokens": 2})  # each was a 500 before issue 15
@example(body={"prompt": "hi", "max_tokens": 2, "top_k": 2**70})
def test_random_completion_fields_get_a_4xx_or_a_200(http, body):
    r = _send(http, "/v1/completions", body)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.text)


@FUZZ
@given(body=_fuzzed(dict(CHAT), sorted(ChatCompletionRequest.model_fields)))
@example(body={**CHAT, "messages": [{"role": "assistant", "content": None}]})  # each was a 500 before
@example(body={**CHAT, "chat_template": "{{ raise_exception('no') }}"})
@example(body={**CHAT, "messages": [{"role": "user", "content": "\udfff"}]})
def test_random_chat_fields_get_a_4xx_or_a_200(http, body):
    r = _send(http, "/v1/chat/completions", body)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.text)


def _from_schema(schema: dict, defs: dict, depth: int = 0) -> st.SearchStrategy:
    """Values for a JSON schema (the subset FastAPI emits): schema-shaped bodies reach the code
    behind field validation, where random JSON rarely gets."""
    if depth > 12:
        return st.none()
    if "$ref" in schema:
        return _from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, depth + 1)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([_from_schema(s, defs, depth + 1) for s in schema[key]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        shaped = st.fixed_dictionaries(
            {k: _from_schema(v, defs, depth + 1) for k, v in props.items() if k in required},
            optional={k: _from_schema(v, defs, depth + 1) for k, v in props.items() if k not in required},
        )
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and not props:
            return st.dictionaries(st.text(max_size=6), _from_schema(extra, defs, depth + 1), max_size=3)
        return shaped
    strategies = {
        "array": lambda: st.lists(
            _from_schema(schema.get("items", {}), defs, depth + 1),
            min_size=schema.get("minItems", 0),
            max_size=3,
        ),
        "string": lambda: st.text(max_size=12),
        "integer": lambda: st.integers(min_value=-(2**40), max_value=2**40),
        "number": lambda: st.floats(allow_nan=False, allow_infinity=False),
        "boolean": st.booleans,
        "null": st.none,
    }
    return strategies[kind]() if kind in strategies else json_values


def _operations(http) -> list[tuple[str, st.SearchStrategy]]:
    schema = http.get("/openapi.json").json()
    defs = schema["components"]["schemas"]
    ops = []
    for path, item in sorted(schema["paths"].items()):
        if "post" in item:
            body = item["post"]["requestBody"]["content"]["application/json"]["schema"]
            ops.append((path, _from_schema(body, defs)))
    return ops


def test_schema_shaped_bodies_never_get_a_5xx(http):
    """Bodies drawn from the app's own OpenAPI schema, every POST route; max_tokens kept small
    so a valid body costs milliseconds."""
    ops = _operations(http)
    assert {p for p, _ in ops} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}

    @FUZZ
    @given(data=st.data())
    def run(data):
        path, bodies = data.draw(st.sampled_from(ops))
        body = data.draw(bodies)
        if path.startswith("/v1/") and body.get("max_tokens") is None:
            body["max_tokens"] = 2
        r = _send(http, path, body)
        assert r.status_code < 500, (path, body, r.text)

    run()
    for model_id in ("tiny", "x/y", "%00", "..", "a" * 300):
        assert http.get(f"/v1/models/{model_id}").status_code in (200, 404)


def test_server_survives_the_fuzzing(http):
    _assert_survives(http)


# ---- live: the event loop, keep-alive after a 500, shutdown -------------------------------------------
class SlowTokenizer:
    """Stands in for a tokenizer working through megabytes: encode blocks its thread."""

    seconds = 1.5

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        time.sleep(self.seconds)
        return [ord(c) % 256 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


class TickClient:
    """An EngineClient streaming one 'a' per tick (so tests control timing). Prompts starting
    with 'slow' tokenize slowly, 'boom' fail while tokenizing and 'die' fail mid-stream, each with
    an error no route expects."""

    max_model_len = 1_000_000
    vocab_size = 256
    is_running = True
    num_waiting = 0

    def __init__(self, tick: float = 0.02) -> None:
        self.tick = tick
        self.tokenizer = SlowTokenizer()

    async def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str, priority: int = 0, watch=None
    ) -> AsyncIterator[RequestOutput]:
        assert isinstance(prompt, dict)
        ids, text = list(prompt["prompt_token_ids"]), str(prompt.get("prompt"))
        total = params.max_tokens or 1
        for k in range(total):
            await asyncio.sleep(self.tick)
            if text.startswith("die") and k == 1:
                raise KeyError("engine fault")
            last = k == total - 1
            if params.output_kind is RequestOutputKind.FINAL_ONLY and not last:
                continue
            n = total if params.output_kind is RequestOutputKind.FINAL_ONLY else 1
            out = CompletionOutput(0, "a" * n, [97] * n, None, None, "length" if last else None)
            yield RequestOutput(request_id, text, ids, None, [out], last)

    def abort(self, request_id: str) -> None:
        pass

    async def run_policy(self, policy: Policy, prompt_ids: list[int], question: str) -> ScaleResult:
        raise ValueError("no policies here")

    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        assert isinstance(prompt, str)
        if prompt.startswith("boom"):
            raise KeyError("tokenizer fault")
        if prompt.startswith("slow"):
            return prompt, self.tokenizer.encode(prompt)
        return prompt, [ord(c) % 256 for c in prompt]

    def metrics(self) -> dict[str, float]:
        return {}

    def shutdown(self) -> None:
        pass

    def describe(self) -> str:
        return "ticks"


@pytest.fixture(scope="module")
def tick_server():
    srv = LiveServer(create_app(ServerConfig(served_model_name=MODEL), engine=TickClient()))
    yield srv
    srv.stop()


def test_health_answers_while_large_inputs_are_tokenized(tick_server):
    url = tick_server.url
    slow = [
        threading.Thread(
            target=httpx.post, args=(url + "/tokenize",), kwargs={"json": {"prompt": "x"}, "timeout": 30}
        ),
        threading.Thread(
            target=httpx.post,
            args=(url + "/v1/completions",),
            kwargs={"json": {"prompt": "slow", "max_tokens": 1}, "timeout": 30},
        ),
    ]
    for t in slow:
        t.start()
    time.sleep(0.3)  # both are inside encode() now
    start = time.perf_counter()
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert time.perf_counter() - start < 0.5, "the event loop was blocked by tokenization"
    for t in slow:
        t.join(30)


def _local_port(r: httpx.Response) -> int:
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_a_500_is_json_and_keeps_the_connection(tick_server):
    with httpx.Client(base_url=tick_server.url, timeout=30) as c:
        first = c.post("/v1/completions", json={"prompt": "boom"})
        err = _error(first, 500)
        assert err["type"] == "internal_server_error" and "KeyError" in err["message"]
        again = c.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2})
        assert again.status_code == 200 and _local_port(again) == _local_port(first)


def test_a_fault_mid_stream_ends_with_an_error_event_and_done(tick_server):
    with httpx.stream(
        "POST",
        tick_server.url + "/v1/completions",
        json={"prompt": "die", "max_tokens": 5, "stream": True},
        timeout=30,
    ) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["type"] == "internal_server_error"


def test_shutdown_ends_running_requests_and_exits_within_the_timeout():
    """SIGTERM with a 1 s graceful timeout: a running stream ends with an error event and [DONE],
    a running non-streamed request gets a 503, and the server is gone soon after."""
    from forkllm.server.serve import _Server, drain_seconds

    app = create_app(ServerConfig(served_model_name=MODEL), engine=TickClient(tick=0.05))
    state = app.state.forkllm
    port = _free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1.0
    )
    server = _Server(config, on_stop=lambda: state.drain.begin(drain_seconds(1.0)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"
    results: dict[str, object] = {}

    def stream() -> None:
        with httpx.stream(
            "POST", url, json={"prompt": "x", "max_tokens": 10**5, "stream": True}, timeout=30
        ) as r:
            results["stream"] = [ln for ln in r.iter_lines() if ln]

    def whole() -> None:
        results["whole"] = httpx.post(url, json={"prompt": "x", "max_tokens": 10**5}, timeout=30)

    clients = [threading.Thread(target=stream), threading.Thread(target=whole)]
    for t in clients:
        t.start()
    time.sleep(0.5)
    start = time.time()
    server.handle_exit(signal.SIGTERM, None)
    for t in clients:
        t.join(15)
    thread.join(15)
    assert not thread.is_alive() and time.time() - start < 1.0 + 3
    lines = results["stream"]
    assert isinstance(lines, list) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert len(lines) > 3  # it was streaming before
    whole_response = results["whole"]
    assert isinstance(whole_response, httpx.Response)
    assert _error(whole_response, 503)["code"] == "shutting_down"


def test_serve_process_ends_busy_streams_and_exits_0_within_the_timeout():
    """The real `forkllm serve`, busy with a long stream, gets SIGTERM with a 1 s graceful
    timeout: the stream ends with an error event and [DONE], and the process exits 0 in time."""
    import os
    import subprocess

    port = _free_port()
    proc = subprocess.Popen(
        serve_tiny_cmd(port, "--graceful-shutdown-timeout", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health")
                if health.status_code == 200:
                    break
                assert health.json()["status"] != "failed", "the model failed to load"
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        # 4 x 2,000 tokens take ~3 s on the tiny model (one alone finished inside a 2 s drain on a fast CPU)
        body = {"prompt": "go", "max_tokens": 2000, "n": 4, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    start = time.time()
                    proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        elapsed = time.time() - start
        assert proc.returncode == 0 and elapsed < 1 + 5, (elapsed, out)
        assert "terminate called" not in out, out
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "shutting_down", lines[-2]
    finally:
        if proc.poll() is None:
            proc.kill()
