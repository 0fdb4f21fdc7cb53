"""Issue 16, structured output over HTTP: response_format (json_object, json_schema), vLLM's
guided_json / guided_regex / guided_choice / guided_grammar and structured_outputs, on chat and
completions. The request fields map to SamplingParams.structured (checked here without an
engine); conflicts and schemas or grammars the library cannot compile are a 400 naming the field;
and the tiny random model, which writes noise unless constrained, writes valid output through the
openai SDK (n=8 objects valid against their schema, the SDK's own `parse`)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
jsonschema = pytest.importorskip("jsonschema")

from conftest import tiny_llm  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from test_server import LiveServer  # noqa: E402

from forkllm.engine.async_engine import AsyncEngine  # noqa: E402
from forkllm.server.app import ServerConfig, create_app  # noqa: E402
from forkllm.server.errors import APIError  # noqa: E402
from forkllm.server.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402
from forkllm.server.structured import check_compiles, structured_request  # noqa: E402
from forkllm.structured.params import StructuredOutputsParams  # noqa: E402
from forkllm.tools.jsonscan import JsonObjectScanner, Scan  # noqa: E402

MSGS = [{"role": "user", "content": "Describe a thing as JSON."}]
# llguidance reads "x-guidance" options from a schema: no free whitespace between tokens, which a
# random-weight model would otherwise pad without end (jsonschema ignores the key).
SCHEMA = {
    "x-guidance": {"whitespace_flexible": False},
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "fish"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "pet": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["small", "big", "wet"]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {
                "room": {"enum": ["kitchen", "garden"]},
                "floor": {"type": "integer", "minimum": 0, "maximum": 3},
            },
            "required": ["room", "floor"],
            "additionalProperties": False,
        },
    },
    "required": ["kind", "legs", "pet", "tags", "home"],
    "additionalProperties": False,
}


# ---- the mapping, without an engine ---------------------------------------------------------------
def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MSGS, **fields)


@pytest.mark.parametrize(
    "fields, expected, field",
    [
        (
            {"response_format": {"type": "json_object"}},
            StructuredOutputsParams(json_object=True),
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredOutputsParams(json=SCHEMA),
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            StructuredOutputsParams(json_object=True),
            "response_format",
        ),
        ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA), "guided_json"),
        (
            {"guided_json": json.dumps(SCHEMA)},
            StructuredOutputsParams(json=json.dumps(SCHEMA)),
            "guided_json",
        ),
        ({"guided_regex": "[ab]{3}"}, StructuredOutputsParams(regex="[ab]{3}"), "guided_regex"),
        ({"guided_choice": ["yes", "no"]}, StructuredOutputsParams(choice=["yes", "no"]), "guided_choice"),
        ({"guided_grammar": 'start: "a"+'}, StructuredOutputsParams(grammar='start: "a"+'), "guided_grammar"),
        (
            {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
            StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
            "structured_outputs.json",
        ),
        (
            {"structured_outputs": {"regex": "x+"}},
            StructuredOutputsParams(regex="x+"),
            "structured_outputs.regex",
        ),
        (
            {"structured_outputs": {"json_object": True}},
            StructuredOutputsParams(json_object=True),
            "structured_outputs.json_object",
        ),
    ],
)
def test_each_field_maps_to_structured_params(fields, expected, field):
    asked = structured_request(_chat(**fields))
    assert asked is not None and asked.params == expected and asked.field == field
    check_compiles(asked)
    sp = _chat(**fields).sampling_params(16, None, structured=asked.params)
    assert sp.structured == expected
    # the completions route reads the same fields
    done = structured_request(CompletionRequest(prompt="x", **fields))
    assert done is not None and done.params == expected


@pytest.mark.parametrize("fields", [{}, {"response_format": {"type": "text"}}])
def test_text_is_unconstrained(fields):
    assert structured_request(_chat(**fields)) is None


@pytest.mark.parametrize(
    "fields, param, needle",
    [
        ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex", "give one"),
        ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice", "give one"),
        ({"structured_outputs": {"regex": "a"}, "guided_regex": "a"}, "structured_outputs", "give one"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_regex": ""}, "guided_regex", "non-empty"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema object"),
        (
            {"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
            "response_format",
            "only for type",
        ),
    ],
)
def test_conflicts_and_bad_values_name_the_field(fields, param, needle):
    with pytest.raises(APIError) as e:
        structured_request(_chat(**fields))
    assert e.value.status == 400 and e.value.param == param and needle in e.value.message


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"guided_json": {"type": "strng"}}, "guided_json"),  # not a valid schema
        ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "guided_json"),
        ({"guided_regex": "a(?=b)"}, "guided_regex"),  # look-around: the library cannot
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs.grammar"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "2"}},
                }
            },
            "response_format.json_schema.schema",
        ),
    ],
)
def test_what_the_library_cannot_compile_is_a_400_naming_the_field(fields, param):
    asked = structured_request(_chat(**fields))
    assert asked is not None
    with pytest.raises(APIError) as e:
        check_compiles(asked)
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_a_gbnf_grammar_is_accepted_too():
    check_compiles(structured_request(_chat(guided_grammar='root ::= "yes" | "no"')))


# ---- over HTTP, on the tiny random model ---------------------------------------------------------
@pytest.fixture(scope="module")
def live():
    engine = AsyncEngine(tiny_llm(max_model_len=1024).engine)
    srv = LiveServer(create_app(ServerConfig(served_model_name="tiny"), engine=engine))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)


def test_json_schema_n8_gives_8_valid_objects(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True},
        },
        n=8,
        max_tokens=200,
        temperature=1.0,
        seed=0,
    )
    assert len(r.choices) == 8
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        assert c.finish_reason == "stop"
    assert len({c.message.content for c in r.choices}) > 1  # sampled, not one answer eight times


def test_the_sdks_parse_sends_a_schema_we_compile_and_reads_our_answer():
    """client.chat.completions.parse: the SDK turns a pydantic model into a strict json_schema
    (which must compile here) and parses the answer into the model. Over the scripted engine:
    what the tiny model writes in free strings is noise of any length."""
    from test_tools_server import SCRIPTS, ScriptClient

    class Home(BaseModel):
        room: str
        floor: int

    class Thing(BaseModel):
        pet: bool
        home: Home

    SCRIPTS["thing"] = ['{"pet": true, "home": {"room": "garden", "floor": 1}}']
    engine = ScriptClient()
    srv = LiveServer(create_app(ServerConfig(served_model_name="s"), engine=engine))
    try:
        sdk = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r = sdk.chat.completions.parse(
            model="s", messages=[{"role": "user", "content": "SCRIPT:thing"}], response_format=Thing
        )
        assert r.choices[0].message.parsed == Thing(pet=True, home=Home(room="garden", floor=1))
        sent = engine.requests[-1][1].structured
        schema = sent.schema() if sent is not None else None
        assert isinstance(schema, dict) and set(schema["properties"]) == {"pet", "home"}
        assert schema["additionalProperties"] is False  # the SDK's strict form
    finally:
        srv.stop()


def test_streamed_json_schema_is_valid_when_put_together(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=MSGS,
        extra_body={"guided_json": SCHEMA},
        max_tokens=200,
        stream=True,
        seed=3,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_starts_an_object_and_stays_valid(client, stream):
    kw = dict(model="tiny", messages=MSGS, response_format={"type": "json_object"}, max_tokens=24, seed=4)
    if stream:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**kw, stream=True)
            if c.choices
        )
    else:
        text = client.chat.completions.create(**kw).choices[0].message.content
    assert JsonObjectScanner().scan(text) in (Scan.MORE, Scan.DONE), text  # cut by max_tokens, never invalid


def test_guided_choice_and_regex_on_chat_and_completions(client):
    r = client.chat.completions.create(
        model="tiny", messages=MSGS, n=4, max_tokens=10, extra_body={"guided_choice": ["sunny", "rainy day"]}
    )
    assert {c.message.content for c in r.choices} <= {"sunny", "rainy day"}
    r = client.completions.create(
        model="tiny", prompt="Code:", n=4, max_tokens=12, extra_body={"guided_regex": "[A-F][0-9]{3}"}
    )
    for c in r.choices:
        assert re.fullmatch(r"[A-F][0-9]{3}", c.text), c.text
    r = client.completions.create(
        model="tiny",
        prompt="JSON:",
        max_tokens=200,
        seed=5,
        extra_body={"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    assert ": " not in r.choices[0].text and ", " not in r.choices[0].text


def test_guided_grammar_lark_on_completions(client):
    r = client.completions.create(
        model="tiny",
        prompt="Say:",
        max_tokens=12,
        n=3,
        extra_body={
            "guided_grammar": 'start: greeting " " name\ngreeting: "hi" | "hello"\nname: /[a-z]{2,4}/'
        },
    )
    for c in r.choices:
        assert re.fullmatch(r"(hi|hello) [a-z]{2,4}", c.text), c.text


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"messages": MSGS, "guided_regex": "a(?=b)"}, "guided_regex"),
        (
            "/v1/chat/completions",
            {"messages": MSGS, "guided_regex": "a(?=b)", "stream": True},
            "guided_regex",
        ),
        ("/v1/completions", {"prompt": "x", "guided_json": {"type": "strng"}}, "guided_json"),
        ("/v1/completions", {"prompt": "x", "guided_json": {}, "guided_choice": ["a"]}, "guided_choice"),
        (
            "/v1/chat/completions",
            {"messages": MSGS, "response_format": {"type": "xml"}},
            "response_format.type",
        ),
        (
            "/v1/chat/completions",
            {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            "/v1/chat/completions",
            {"messages": MSGS, "structured_outputs": {"structural_tag": "x"}},
            "structured_outputs.structural_tag",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": MSGS,
                "response_format": {"type": "json_object"},
                "scaling": {"strategy": "self_consistency", "n": 2},
            },
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {"messages": MSGS, "guided_choice": ["a"], "scaling": {"strategy": "self_consistency", "n": 2}},
            "guided_choice",
        ),
    ],
)
def test_http_errors_name_the_field_streamed_or_not(live, path, body, param):
    r = httpx.post(live.url + path, json={"max_tokens": 4, **body}, timeout=30)
    assert r.status_code == 400, r.text  # before any stream starts
    err = r.json()["error"]
    assert err["param"] == param, err
