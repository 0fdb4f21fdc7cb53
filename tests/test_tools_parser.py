"""Issue 16: the tool-call parser. One incremental parser serves streamed and whole messages, so
every split of a message into deltas (one delta, one character per delta, anything between) must
give the same content and the same calls; calls of known tools come out exactly, anything else
(unknown names, malformed JSON, text that merely looks like markup) stays content. Also: the JSON
scanner against json.loads, the forcing grammars against the parser (random walks through
llguidance's token masks), and tools written into prompts."""

from __future__ import annotations

import contextlib
import itertools
import json
import keyword
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkllm.tools import FORMATS, ToolCallParser, parse_tool_calls, tool_specs
from forkllm.tools.formats.pythonic import python_literal
from forkllm.tools.jsonscan import JsonObjectScanner, Scan, scan_object
from forkllm.tools.prompt import render_chat

KNOWN = ["get_weather", "search", "noop"]
UNKNOWN = "launch_rockets"
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def counter_ids():
    c = itertools.count()
    return lambda: f"call_{next(c)}"


def streamed(text: str, cuts: list[int], fmt, tools=KNOWN, max_calls=None):
    """Feed `text` cut at `cuts`; (content, calls) put together from the deltas."""
    parser = ToolCallParser(fmt, tools, max_calls, new_id=counter_ids())
    content, calls = "", []
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(text))), len(text)]
    for a, b in itertools.pairwise(bounds):
        d = parser.feed(text[a:b])
        content, calls = content + d.content, calls + d.calls
    d = parser.finish()
    return content + d.content, calls + d.calls


def whole(text: str, fmt, tools=KNOWN, max_calls=None):
    msg = parse_tool_calls(text, fmt, tools, max_calls, new_id=counter_ids())
    return msg.content, msg.calls


# ---- generated messages ------------------------------------------------------------------------
def pieces(alphabet: list[str], max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    """Text made of these pieces (some longer than one character, e.g. whole markers)."""
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map("".join)


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | pieces([*'ab <>/{}[]();,"\\\n\té😀', "</tool_call>", "<tool_call>"], max_size=12)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text("abxyz_", min_size=1, max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
# (argument names that are Python keywords cannot be written as pythonic calls)
arg_names = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True).filter(lambda k: not keyword.iskeyword(k))
arguments = st.dictionaries(arg_names, json_values, max_size=3)
# Text between calls: no markers of any format, no whitespace at either end (whitespace next to a
# call is the call's markup), not starting with a separator.
plain_text = (
    st.text(st.sampled_from(list("abc xyz.!?é😀<>/()}]\n")), min_size=1, max_size=15)
    .map(str.strip)
    .filter(lambda t: t and t[0] not in ";")
)


@st.composite
def messages(draw, fmt_name: str):
    """(text, expected known calls, unknown names used): text segments and calls, some calls to
    an unknown tool, joined by the whitespace / separators the format allows."""
    parts, expected, unknown = [], [], []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            parts.append(("text", draw(plain_text)))
        else:
            name = draw(st.sampled_from([*KNOWN, UNKNOWN]))
            args = draw(arguments)
            parts.append(("call", (name, args)))
    text = ""
    for kind, value in parts:
        gap = draw(st.sampled_from(["", " ", "\n", "\n\n", " \t "]))
        if kind == "text":
            text += gap + value
            continue
        name, args = value
        if fmt_name == "pythonic":
            # one list per call (a list with an unknown name is content as a whole)
            call = "[" + name + "(" + ", ".join(f"{k}={python_literal(v)}" for k, v in args.items()) + ")]"
        elif fmt_name == "llama3_json":
            key = draw(st.sampled_from(["parameters", "arguments"]))
            sep = draw(st.sampled_from(["", "; ", ";"]))
            call = sep + json.dumps({"name": name, key: args}, ensure_ascii=draw(st.booleans()))
        else:
            body = json.dumps({"name": name, "arguments": args}, ensure_ascii=draw(st.booleans()))
            call = (
                "<tool_call>"
                + draw(st.sampled_from(["", "\n", " "]))
                + body
                + draw(st.sampled_from(["", "\n"]))
                + "</tool_call>"
            )
        text += gap + call
        (expected if name in KNOWN else unknown).append((name, args))
    return text, expected, unknown


def _check_message(fmt_name, data):
    fmt = FORMATS[fmt_name]
    text, expected, unknown = data
    content, calls = whole(text, fmt)
    # the same for one character per delta and for random splits
    assert streamed(text, list(range(len(text))), fmt) == (content, calls)
    return content, calls, expected, unknown


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
@PROPS
@given(data=st.data())
def test_every_split_gives_the_same_content_and_calls(fmt_name, data):
    message = data.draw(messages(fmt_name))
    content, calls, expected, unknown = _check_message(fmt_name, message)
    cuts = data.draw(st.lists(st.integers(0, len(message[0])), max_size=8))
    assert streamed(message[0], cuts, FORMATS[fmt_name]) == (content, calls)
    assert streamed(message[0], [], FORMATS[fmt_name]) == (content, calls)  # one delta


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
@PROPS
@given(data=st.data())
def test_known_calls_come_out_exactly_and_unknown_ones_stay_content(fmt_name, data):
    content, calls, expected, unknown = _check_message(fmt_name, data.draw(messages(fmt_name)))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert [c.id for c in calls] == [f"call_{i}" for i in range(len(calls))]
    for name, _ in unknown:
        assert name in content
    for name in KNOWN:  # no markup of a parsed call leaks into the content
        if not unknown:
            assert name not in content


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
@PROPS
@given(data=st.data())
def test_max_calls_one_stops_after_the_first_call_for_every_split(fmt_name, data):
    text, expected, _ = data.draw(messages(fmt_name))
    fmt = FORMATS[fmt_name]
    content, calls = whole(text, fmt, max_calls=1)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected[:1]
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    assert streamed(text, cuts, fmt, max_calls=1) == (content, calls)
    assert streamed(text, list(range(len(text))), fmt, max_calls=1) == (content, calls)


@PROPS
@given(
    text=pieces(
        [
            *'<tool_call>/{}[]"name:;, ()=abc\n',
            "<tool_call>",
            "</tool_call>",
            "<|python_tag|>",
            '{"name": "noop"',
            "noop(a=1)",
        ],
        max_size=40,
    )
)
def test_any_text_parses_the_same_streamed_and_whole(text):
    for fmt in FORMATS.values():
        content, calls = whole(text, fmt, tools=None)
        assert streamed(text, list(range(len(text))), fmt, tools=None) == (content, calls)
        if not calls:
            assert content == text  # nothing is lost or added when nothing is a call


# ---- examples -----------------------------------------------------------------------------------
HERMES = FORMATS["hermes"]


def _calls(content_calls):
    content, calls = content_calls
    return content, [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize(
    "text, content, calls",
    [
        (
            'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            "Let me look.",
            [("get_weather", '{"city": "Paris"}')],
        ),
        ('<tool_call>{"name": "noop", "arguments": {}}</tool_call>', "", [("noop", "{}")]),
        ('<tool_call>{"name": "noop"}</tool_call>', "", [("noop", "{}")]),  # arguments left out
        (
            '<tool_call>{"name": "search", "arguments": "{\\"q\\": 1}"}</tool_call>',
            "",
            [("search", '{"q": 1}')],
        ),
        # unclosed at the end (a stop string or max_tokens took the tag): still a call
        ('<tool_call>\n{"name": "noop", "arguments": {}}\n', "", [("noop", "{}")]),
        ('<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_', "", [("noop", "{}")]),
        # malformed JSON, junk after the object, an unknown tool, a half tag: content, as written
        ('<tool_call>{"name": "noop", "arguments": {"a": }}</tool_call>', None, []),
        ('<tool_call>{"name": "noop", "arguments": {}} junk</tool_call>', None, []),
        ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', None, []),
        ('<tool_call>{"name": "noop", "arguments": [1]}</tool_call>', None, []),
        ('<tool_call>{"name": "noop", "arguments": {"x": NaN}}</tool_call>', None, []),
        ("I'd write <tool_ca", None, []),
        # text after a call, two calls, a string holding the closing tag
        (
            '<tool_call>{"name": "noop", "arguments": {}}</tool_call>\n\nDone.',
            "Done.",
            [("noop", "{}")],
        ),
        (
            '<tool_call>{"name": "search", "arguments": {"q": "</tool_call>"}}</tool_call>'
            '<tool_call>{"name": "noop", "arguments": {}}</tool_call>',
            "",
            [("search", '{"q": "</tool_call>"}'), ("noop", "{}")],
        ),
    ],
)
def test_hermes_examples(text, content, calls):
    expected_content = text if content is None else content
    assert _calls(whole(text, HERMES)) == (expected_content, calls)
    assert _calls(streamed(text, list(range(len(text))), HERMES)) == (expected_content, calls)


@pytest.mark.parametrize(
    "fmt_name, text, content, calls",
    [
        (
            "llama3_json",
            '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "noop", "parameters": {}}',
            "",
            [("get_weather", '{"city": "Paris"}'), ("noop", "{}")],
        ),
        ("llama3_json", '<|python_tag|>{"name": "noop", "arguments": {}}', "", [("noop", "{}")]),
        ("llama3_json", 'Use {"a": 1} or {x}.', 'Use {"a": 1} or {x}.', []),
        # a call is never dug out of a larger object
        ("llama3_json", '{"wrap": {"name": "noop", "parameters": {}}}', None, []),
        ("llama3_json", '{"name": "noop", "parameters": {}', None, []),  # never closed
        (
            "pythonic",
            '[get_weather(city="Paris", days=3), search(q=\'a)b\', opts={"x": [true, None]})]',
            "",
            [
                ("get_weather", '{"city": "Paris", "days": 3}'),
                ("search", '{"q": "a)b", "opts": {"x": [true, null]}}'),
            ],
        ),
        ("pythonic", "[noop()] and that is all", "and that is all", [("noop", "{}")]),
        ("pythonic", "[see note 1] and [noop(1)]", None, []),  # positional arguments are not a call
        ("pythonic", "[noop(a=1, a=2)]", None, []),  # a repeated keyword
        ("pythonic", "[noop(a=f(1))]", None, []),  # not a literal
        ("pythonic", "[noop(a=1), oops]", None, []),
        ("pythonic", "[noop(a=1)", None, []),
    ],
)
def test_llama3_json_and_pythonic_examples(fmt_name, text, content, calls):
    fmt = FORMATS[fmt_name]
    expected_content = text if content is None else content
    assert _calls(whole(text, fmt)) == (expected_content, calls)
    assert _calls(streamed(text, list(range(len(text))), fmt)) == (expected_content, calls)


def test_max_calls_ends_a_pythonic_list_at_its_first_call():
    text = "[noop(a=1), search(q=2)]"
    fmt = FORMATS["pythonic"]
    parser = ToolCallParser(fmt, KNOWN, max_calls=1, new_id=counter_ids())
    seen = []
    for ch in text:
        seen += parser.feed(ch).calls
        if parser.done:
            break
    assert [(c.name, c.arguments) for c in seen] == [("noop", '{"a": 1}')]
    assert ch == ")"  # done as soon as the first call closed: generation can stop there


def test_call_ids_look_like_openai_ones():
    msg = parse_tool_calls(
        '<tool_call>{"name": "noop"}</tool_call><tool_call>{"name": "noop"}</tool_call>', HERMES, KNOWN
    )
    ids = [c.id for c in msg.calls]
    assert all(i.startswith("call_") and len(i) == 29 and i[5:].isalnum() for i in ids)
    assert len(set(ids)) == 2 and msg.content == ""


def test_feed_after_finish_is_an_error():
    parser = ToolCallParser(HERMES, KNOWN)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


# ---- the JSON scanner ---------------------------------------------------------------------------
objects = st.dictionaries(st.text(max_size=5), json_values, max_size=4)


@PROPS
@given(obj=objects, indent=st.sampled_from([None, 0, 2]), tail=st.text(max_size=5))
def test_scanner_finds_the_end_of_every_object(obj, indent, tail):
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    assert scan_object(text + tail) == (Scan.DONE, len(text))
    for cut in range(len(text)):  # every proper prefix is a valid beginning
        assert scan_object(text[:cut])[0] is Scan.MORE
    scanner = JsonObjectScanner()  # resumed one character at a time: the same verdict
    for cut in range(1, len(text) + 1):
        result = scanner.scan(text[:cut])
    assert (result, scanner.end) == (Scan.DONE, len(text))


@PROPS
@given(text=st.text(st.sampled_from(list('{}[]",:0123456789-+.eEtrufalsn \\/u\n')), max_size=25))
def test_scanner_agrees_with_json_loads(text):
    result, end = scan_object(text)
    if result is Scan.DONE:
        assert isinstance(json.loads(text[:end]), dict)
    try:
        value = json.loads(text, parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError):
        return
    if isinstance(value, dict):
        assert (result, end) == (Scan.DONE, len(text.rstrip(" \n")))


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 01}',
        '{"a": 1.}',
        '{"a": -}',
        '{"a": 1e}',
        '{"a": tru}',
        '{"a": "\x01"}',
        "{,}",
        '{"a":1,}',
        "[1]",
        '{"a" 1}',
        '{"\\x": 1}',
    ],
)
def test_scanner_refuses_what_json_refuses(text):
    assert scan_object(text)[0] is Scan.INVALID
    with contextlib.suppress(ValueError):  # not JSON, or
        assert not isinstance(json.loads(text), dict)  # not an object: [1]


# ---- forcing grammars against the parser ---------------------------------------------------------
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Rome"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 9},
                    "metric": {"type": "boolean"},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "noop",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    },
]


@pytest.fixture(scope="module")
def ll_tokenizer():
    llguidance = pytest.importorskip("llguidance")
    from forkllm.models.loader import default_tokenizer

    tok = default_tokenizer()
    return tok, llguidance.LLTokenizer(tok.backend.to_str(), eos_token=tok.eos_token_id)


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
@pytest.mark.parametrize("parallel", [True, False])
def test_every_sentence_of_a_forcing_grammar_parses_to_valid_calls(ll_tokenizer, fmt_name, parallel):
    """Random walks through llguidance's masks: whatever the sampler picks, the text is one call
    (or several, with parallel) of the tools, arguments valid against their schemas, no content."""
    import jsonschema
    import llguidance
    import numpy as np

    tok, llt = ll_tokenizer
    specs = tool_specs(TOOLS)
    fmt = FORMATS[fmt_name]
    grammar = llguidance.LLMatcher.grammar_from_lark(fmt.grammar(specs, parallel))
    assert not llguidance.LLMatcher.validate_grammar(grammar, llt)
    rng = random.Random(0)
    for _ in range(6):
        matcher = llguidance.LLMatcher(llt, grammar)
        out = []
        for _ in range(120):
            allowed = np.nonzero(np.frombuffer(matcher.compute_logit_bias(), dtype=np.uint8))[0]
            token = int(rng.choice(list(allowed)))
            if token == tok.eos_token_id or (tok.eos_token_id in allowed and rng.random() < 0.5):
                break  # (ending whenever allowed, half the time, keeps parallel lists short)
            assert matcher.consume_token(token), matcher.get_error()
            out.append(token)
        text = tok.decode(out)
        assert matcher.is_accepting(), text
        content, calls = whole(text, fmt, tools=[s.name for s in specs])
        assert content == "" and calls and (parallel or len(calls) == 1), text
        for call in calls:
            spec = next(s for s in specs if s.name == call.name)
            jsonschema.validate(json.loads(call.arguments), spec.parameters)


def test_pythonic_grammar_keeps_required_arguments_and_property_order():
    grammar = FORMATS["pythonic"].grammar(tool_specs(TOOLS[:1]), parallel=False)
    assert '"get_weather(" first_0_0 ")"' in grammar
    assert "first_0_0: item_0_0 rest_0_1\n" in grammar  # city is required: always first
    assert 'rest_0_1: ", " item_0_1 rest_0_2 | rest_0_2' in grammar  # days is optional


# ---- tools in prompts ---------------------------------------------------------------------------
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "18C"},
]


@pytest.fixture(scope="module")
def tok():
    from forkllm.models.loader import default_tokenizer

    return default_tokenizer()


def test_a_template_without_tools_gets_them_in_the_system_message_hermes_style(tok):
    text = render_chat(tok, HISTORY, tools=TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools")
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n" in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        in text
    )
    assert "<|im_start|>tool\n<tool_response>\n18C\n</tool_response><|im_end|>" in text
    # a system message of the caller's own keeps its text, the tools come after it
    text = render_chat(tok, [{"role": "system", "content": "Be brief."}, *HISTORY], tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")


@pytest.mark.parametrize(
    "fmt_name, call",
    [
        ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
        ("pythonic", '[get_weather(city="Paris")]'),
    ],
)
def test_history_is_written_in_the_servers_format(tok, fmt_name, call):
    text = render_chat(tok, HISTORY, tools=TOOLS, tool_format=fmt_name)
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text


def test_a_template_that_takes_tools_gets_them_as_hf_passes_them(tok):
    template = (
        "{% for t in tools %}TOOL {{ t.function.name }}{{ '\\n' }}{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {% if m.tool_calls %}{% for c in m.tool_calls %}"
        "CALL {{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
        "{% else %}{{ m.content }}{% endif %}{{ '\\n' }}{% endfor %}"
    )
    text = render_chat(tok, HISTORY, tools=TOOLS, chat_template=template, add_generation_prompt=False)
    assert (
        text
        == "TOOL get_weather\nTOOL noop\nuser: Weather in Paris?\nassistant: CALL get_weather(Paris)\ntool: 18C\n"
    )


def test_no_tools_no_tool_turns_renders_as_before(tok):
    plain = [{"role": "user", "content": "hi"}]
    assert render_chat(tok, plain) == tok.apply_chat_template(plain)
