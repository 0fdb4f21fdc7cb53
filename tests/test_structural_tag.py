"""Issue 16, structural tags (vLLM's `structural_tag`): free text, but after each trigger one of its
structures' begin, JSON valid under the structure's schema, and its end.

The tiny random-weight model writes noise; a logit bias on "<" (the trigger) makes it start
structures often, and every one it starts must parse and validate. Malformed tags are a
ValueError (engine) or a 400 (server) naming the field."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from conftest import tiny_llm

from forkllm import SamplingParams, StructuredOutputsParams
from forkllm.models.loader import default_tokenizer
from forkllm.server.errors import APIError
from forkllm.server.protocol import ChatCompletionRequest, CompletionRequest
from forkllm.server.structured import check_compiles, structured_request
from forkllm.structured import GrammarCompiler

S = StructuredOutputsParams
PROMPT = list(range(400, 430))
FIELD = "structured_outputs.structural_tag"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"type": "string", "maxLength": 6}},
    "required": ["tz"],
    "additionalProperties": False,
}
STRUCTURES = [
    {"begin": "<get_weather>", "schema": WEATHER, "end": "</get_weather>"},
    {"begin": "<get_time>", "schema": TIME, "end": "</get_time>"},
]
# The trigger is one character, so that a random model, biased towards "<", starts structures.
TAG = {"type": "structural_tag", "structures": STRUCTURES, "triggers": ["<"]}


def _regions(text: str, structures: list[dict], trigger: str, complete: bool) -> list[dict]:
    """Every structure the text starts, checked: begin, JSON valid under its schema, end. With
    `complete` false the last may be cut short (finish_reason "length")."""
    found, pos, decoder = [], 0, json.JSONDecoder()
    while (start := text.find(trigger, pos)) != -1:
        rest = text[start:]
        s = next((s for s in structures if rest.startswith(s["begin"])), None)
        if s is None:
            assert not complete and any(x["begin"].startswith(rest) for x in structures), rest[:80]
            break
        body = start + len(s["begin"])
        try:
            value, stop = decoder.raw_decode(text, body)
        except ValueError:
            assert not complete, f"not JSON after {s['begin']}: {text[body : body + 80]!r}"
            break
        jsonschema.validate(value, s["schema"])
        if not text.startswith(s["end"], stop):
            assert not complete and s["end"].startswith(text[stop:]), text[stop : stop + 40]
            break
        found.append(value)
        pos = stop + len(s["end"])
    return found


# ---- parsing: malformed tags name the field --------------------------------------------------------
@pytest.mark.parametrize(
    ("tag", "says"),
    [
        ("{not json", "not valid JSON"),
        ([1], "must be an object"),
        ({"structures": STRUCTURES}, "triggers must be a non-empty list"),
        ({"structures": STRUCTURES, "triggers": []}, "triggers must be a non-empty list"),
        ({"triggers": ["<"]}, "structures must be a non-empty list"),
        ({"structures": [], "triggers": ["<"]}, "structures must be a non-empty list"),
        (
            {"structures": STRUCTURES, "triggers": ["<fn="]},
            "structures[0].begin '<get_weather>' starts with none",
        ),
        ({"structures": STRUCTURES, "triggers": ["<", "<x"]}, "triggers[1] '<x' begins no structure"),
        (
            {"structures": [{"begin": "<a>", "end": "</a>"}], "triggers": ["<"]},
            "structures[0].schema must be",
        ),
        ({"structures": [{"begin": "<a>", "schema": {}}], "triggers": ["<"]}, "structures[0].end must be"),
        (
            {"structures": [{"begin": "<a>", "schema": {}, "end": "", "x": 1}], "triggers": ["<"]},
            "x is not a field",
        ),
        ({**TAG, "type": "json"}, "type must be 'structural_tag'"),
        ({**TAG, "format": {}}, "format is not a field"),
    ],
)
def test_malformed_tags_are_a_value_error_naming_the_field(tag, says):
    with pytest.raises(ValueError, match=re.escape(FIELD) + ".*" + re.escape(says)):
        S(structural_tag=tag)


def test_each_begin_belongs_to_the_shortest_trigger_that_starts_it():
    spec = S(structural_tag=json.dumps({"structures": STRUCTURES, "triggers": ["<get_w", "<get_t"]}))
    assert spec.kind == "structural_tag" and [s.trigger for s in spec.structures()] == ["<get_w", "<get_t"]
    # "<" fires before "<get_" could: "<get_" would never be enforced
    with pytest.raises(ValueError, match=re.escape("triggers[0] '<get_' begins no structure")):
        S(structural_tag={"structures": STRUCTURES, "triggers": ["<get_", "<"]})


# ---- the grammar ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tok = default_tokenizer()
    return GrammarCompiler(tok, [tok.eos_token_id])


def _accepts(compiler: GrammarCompiler, spec: StructuredOutputsParams, text: str) -> bool:
    matcher = compiler.compile(spec).template.deep_copy()
    ids = default_tokenizer().encode(text, add_special_tokens=False)
    return matcher.validate_tokens(ids) == len(ids)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("no structure at all", True),
        ('a <get_weather>{"city":"Oslo","days":3}</get_weather> b <get_time>{"tz":"UTC"}</get_time>', True),
        ('a <get_weather>{"city": "Oslo", "days": 3}</get_weather>', True),  # bounded whitespace
        ('a <get_weather>{"city":"Rome","days":3}</get_weather>', False),  # not in the enum
        ('a <get_weather>{"city":"Oslo"}</get_weather>', False),  # days is required
        ('a <get_weather>{"city":"Oslo","days":3} b', False),  # no end
        ("a <b>", False),  # the trigger, then no structure's begin
        ('a <get_time>{"tz":" <<< "}</get_time>', True),  # the trigger inside a structure is data
        ('a <get_time>{"tz":"UTC"' + "\n" * 30 + "}", False),  # at most 20 between tokens
    ],
)
def test_the_grammar_accepts_exactly_tagged_text(compiler, text, ok):
    assert _accepts(compiler, S(structural_tag=TAG), text) is ok


def test_a_special_token_trigger_matches_the_token(compiler):
    tag = {
        "structures": [{"begin": "<|im_start|>x", "schema": {"type": "integer"}, "end": "!"}],
        "triggers": ["<|im_start|>"],
    }
    spec = S(structural_tag=tag)
    assert "<[1]>" in compiler.compile(spec).grammar  # SmolLM2's <|im_start|> is token 1
    assert _accepts(compiler, spec, "a <|im_start|>x12! b")
    assert not _accepts(compiler, spec, "a <|im_start|>y12! b")


def test_a_tag_as_dict_or_json_text_is_one_cache_entry():
    tok = default_tokenizer()
    comp = GrammarCompiler(tok, [tok.eos_token_id])
    comp.new_state(S(structural_tag=TAG))
    comp.new_state(S(structural_tag=json.dumps(TAG)))
    comp.new_state(S(structural_tag=TAG, disable_any_whitespace=True))
    assert (comp.misses, comp.hits, len(comp)) == (2, 1, 2)


def test_disable_any_whitespace_applies_inside_structures(compiler):
    spec = S(structural_tag=TAG, disable_any_whitespace=True)
    assert _accepts(compiler, spec, 'a <get_weather>{"city":"Oslo","days":3}</get_weather>')
    assert not _accepts(compiler, spec, 'a <get_weather>{"city": "Oslo","days":3}</get_weather>')


def test_a_schema_the_library_cannot_compile_names_the_structure(tiny):
    tag = {
        **TAG,
        "structures": [
            STRUCTURES[0],
            {**STRUCTURES[1], "schema": {"type": "integer", "minimum": 5, "maximum": 3}},
        ],
    }
    with pytest.raises(ValueError, match=re.escape(FIELD) + r": structures\[1\]\.schema: .*minimum"):
        tiny.engine.add_request(PROMPT, SamplingParams(structured=S(structural_tag=tag)))
    assert not tiny.engine.has_unfinished_requests()


# ---- sampling (tiny random-weight model, temperature 1.0) ------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return tiny_llm()


def _bias() -> dict[int, float]:
    tok = default_tokenizer()
    (lt,) = tok.encode("<", add_special_tokens=False)
    return {lt: 8.0, tok.eos_token_id: 6.0}  # start structures often, end now and then


def test_every_triggered_region_is_valid_json_and_ends(tiny):
    sp = SamplingParams(
        n=16,
        temperature=1.0,
        max_tokens=150,
        seed=0,
        logit_bias=_bias(),
        structured=S(structural_tag=TAG, disable_any_whitespace=True),
    )
    outs = [c for o in tiny.generate([PROMPT, list(range(900, 940))], sp, use_tqdm=False) for c in o.outputs]
    found = [_regions(c.text, STRUCTURES, "<", complete=c.finish_reason == "stop") for c in outs]
    assert sum(map(len, found)) >= 16, [c.text for c in outs]  # structures were started, and all valid
    values = [v for f in found for v in f]
    assert {"city", "days"} <= {k for v in values for k in v} and any("tz" in v for v in values)
    assert any(c.finish_reason == "stop" for c in outs)
    free = [re.sub(r"<get_(weather|time)>.*?</get_\1>", "", c.text) for c in outs]
    assert sum(len(f) for f in free) > 500  # free text between them


# ---- the server ----------------------------------------------------------------------------------
MSGS = [{"role": "user", "content": "What is the weather in Oslo?"}]
RF = {"type": "structural_tag", "structures": STRUCTURES, "triggers": ["<"]}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"response_format": RF}, "response_format"),
        ({"structured_outputs": {"structural_tag": TAG}}, FIELD),
        ({"structured_outputs": {"structural_tag": json.dumps(TAG)}}, FIELD),
    ],
)
def test_each_spelling_maps_to_the_params(fields, field):
    for req in (ChatCompletionRequest(messages=MSGS, **fields), CompletionRequest(prompt="x", **fields)):
        asked = structured_request(req)
        assert asked is not None and asked.field == field and asked.params.kind == "structural_tag"
        assert [s.begin for s in asked.params.structures()] == ["<get_weather>", "<get_time>"]
        check_compiles(asked)


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        (
            {"response_format": {"type": "structural_tag", "structures": STRUCTURES}},
            "response_format",
            "triggers",
        ),
        ({"response_format": {"type": "structural_tag", "triggers": ["<"]}}, "response_format", "structures"),
        (
            {"response_format": {**RF, "triggers": ["<fn="]}},
            "response_format",
            "response_format: structures[0].begin",
        ),
        ({"response_format": {"type": "json_object", "triggers": ["<"]}}, "response_format", "only for type"),
        ({"structured_outputs": {"structural_tag": {"structures": STRUCTURES}}}, FIELD, "triggers"),
        ({"structured_outputs": {"structural_tag": "{x"}}, FIELD, "not valid JSON"),
        ({"response_format": RF, "guided_regex": "a"}, "guided_regex", "give one"),
    ],
)
def test_malformed_requests_are_a_400_naming_the_field(fields, param, says):
    with pytest.raises(APIError) as e:
        structured_request(ChatCompletionRequest(messages=MSGS, **fields))
    assert e.value.status == 400 and e.value.param == param and says in e.value.message, e.value.message


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "strng"}, "structures[1].schema.type: not a valid JSON schema"),
        ({"type": "integer", "minimum": 5, "maximum": 3}, "structures[1].schema: Unsatisfiable"),
    ],
)
def test_a_bad_schema_is_a_400_naming_the_structure(schema, says):
    bad = {**RF, "structures": [STRUCTURES[0], {**STRUCTURES[1], "schema": schema}]}
    asked = structured_request(ChatCompletionRequest(messages=MSGS, response_format=bad))
    assert asked is not None
    with pytest.raises(APIError) as e:
        check_compiles(asked)
    message = e.value.message
    assert e.value.param == "response_format" and message.startswith("response_format: ") and says in message


@pytest.fixture(scope="module")
def live():
    pytest.importorskip("uvicorn")
    from test_server import LiveServer

    from forkllm.engine.async_engine import AsyncEngine
    from forkllm.server.app import ServerConfig, create_app

    srv = LiveServer(
        create_app(ServerConfig(served_model_name="tiny"), engine=AsyncEngine(tiny_llm().engine))
    )
    yield srv
    srv.stop()


def _post(live, path: str, body: dict) -> httpx.Response:
    bias = {str(k): v for k, v in _bias().items()}
    return httpx.post(
        live.url + path, json={"max_tokens": 120, "seed": 1, "logit_bias": bias, **body}, timeout=60
    )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": MSGS, "n": 4, "response_format": RF}),
        ("/v1/completions", {"prompt": "Weather:", "n": 4, "structured_outputs": {"structural_tag": TAG}}),
    ],
)
def test_valid_requests_over_http(live, path, body):
    r = _post(live, path, body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    texts = [(c["message"]["content"] if "message" in c else c["text"], c["finish_reason"]) for c in choices]
    found = [_regions(t, STRUCTURES, "<", complete=reason == "stop") for t, reason in texts]
    assert sum(map(len, found)) >= 2, texts


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": MSGS, "response_format": {**RF, "triggers": []}},
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": MSGS,
                "stream": True,
                "structured_outputs": {"structural_tag": {"structures": STRUCTURES}},
            },
            FIELD,
        ),
        (
            "/v1/completions",
            {
                "prompt": "x",
                "structured_outputs": {
                    "structural_tag": {**TAG, "structures": [{**STRUCTURES[0], "schema": {"type": "strng"}}]}
                },
            },
            FIELD,
        ),
        (
            "/v1/completions",
            {"prompt": "x", "response_format": {**RF, "structures": [{"begin": "<a>"}]}},
            "response_format",
        ),
    ],
)
def test_malformed_tags_are_a_400_over_http(live, path, body, param):
    r = _post(live, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err
