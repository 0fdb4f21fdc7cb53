"""APR's spawn/join call protocol (`Protocol("apr")`): its format, and the engine running it from
the model's own output (forced calls on the tiny random-weight model)."""

from __future__ import annotations

import re

import pytest
from conftest import tiny_llm
from test_tree import assert_no_leaks

from forkllm import SamplingParams
from forkllm.engine.policy import drive
from forkllm.structured.params import StructuredOutputsParams
from forkllm.threads import AprPolicy, Protocol
from forkllm.threads.apr_format import ChildCall, parse_call, results_block, returned_message, spawn_call
from forkllm.threads.spec import spec_from_dict

INPUTS = ["Moving to Node #1,0", "Moving to Node #1,1"]


# ---- the format, as APR's code writes and reads it -----------------------------------------------
def test_format_matches_apr_traces():
    call = spawn_call(INPUTS)
    assert call == (
        "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #1,0\n"
        "<Start Sub Search 1 at level 1> Moving to Node #1,1\n<End Calling Sub Searches>"
    )
    pos, kids = parse_call("Moving to Node #0\n" + call)
    assert pos == len("Moving to Node #0\n")
    assert kids == [ChildCall("0", "1", INPUTS[0]), ChildCall("1", "1", INPUTS[1])]
    path = "Moving to Node #1,0\nExploring Operation: 51-12=39, Resulting Numbers: [39]\n39,39 equal: Goal Reached"
    found = f"Exploring Operation: 9+30=39, Resulting Numbers: [39]\n39,39 equal: Goal Reached\n{path}\n"
    # get_search_result: the path restated after the second-to-last "Goal Reached"
    assert returned_message(found, "goal") == path
    assert returned_message("No solution found.\n", "goal") is None
    assert returned_message("  all of it \n", "text") == "all of it"
    # get_main_trace_after_sub_search's block
    assert results_block(kids, [path, None]) == (
        "<Sub Searches>\n<Goal Reached in Sub Search 0 at level 1 at Node #1,0>\n"
        f"{path}\n<No Solution in Sub Search 1 at level 1 at Node #1,1>\n<End Sub Searches>\n"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("<Start Sub Search 0 at level 1> a\n<End Calling Sub Searches>", "never opened"),
        ("<Calling Sub Searches>\nhello\n<End Calling Sub Searches>", "malformed spawn call line 'hello'"),
        ("<Calling Sub Searches>\n<Start Sub Search 0 at level 1>\n<End Calling Sub Searches>", "no input"),
        ("<Calling Sub Searches>\n<End Calling Sub Searches>", "lists no child"),
    ],
)
def test_malformed_calls_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_call(text)


def test_bad_specs_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="Protocol.join: apr joins by computing"):
        Protocol("apr", join="kv_concat")
    with pytest.raises(ValueError, match="Protocol.outline: item 1 is not one non-empty line"):
        Protocol("apr", outline=["a", "b\nc"])
    with pytest.raises(ValueError, match="Protocol.returns: 'all'"):
        Protocol("apr", returns="all")
    with pytest.raises(ValueError, match="3 paths exceed max_paths"):
        Protocol("apr", outline=["a", "b", "c"], max_paths=2)
    with pytest.raises(ValueError, match="AprPolicy runs Protocol"):
        AprPolicy(Protocol("multiverse"))
    assert Protocol("apr").join == "reprefill" and Protocol("multiverse").join == "kv_concat"
    spec, _ = spec_from_dict({"protocol": "apr", "outline": INPUTS, "returns": "text", "max_tokens": 3})
    assert spec == Protocol("apr", outline=INPUTS, returns="text", max_tokens=3)
    with pytest.raises(ValueError, match=r"^threads\.join: apr joins"):
        spec_from_dict({"protocol": "apr", "join": "kv_concat"})


# ---- the engine runs it --------------------------------------------------------------------------
class _Recording(AprPolicy):
    """Notes the context's tokens after each spawn (what its children continued from) and after
    each join (what it goes on from)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.bases: list[tuple[list[int], str]] = []
        self.joined: list[list[int]] = []

    def _spawn(self):
        super()._spawn()
        self.bases.append((list(self.ctx.token_ids), self.leftover))

    def _join(self):
        super()._join()
        self.joined.append(list(self.ctx.token_ids))


def _force(engine, seq, text):
    """Make the sequence write `text` next (a regex grammar: it samples it token by token)."""
    params = SamplingParams(structured=StructuredOutputsParams(regex=re.escape(text)))
    seq.grammar = engine.inputs.grammar_state(params)


def _greedy(llm, ids, n):
    return llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=n))[0].outputs[0]


def test_spawn_and_join_per_call_and_the_joined_context_equals_one_plain_sequence():
    llm = tiny_llm()
    engine, tok = llm.engine, llm.get_tokenizer()
    spec = Protocol("apr", outline=INPUTS, returns="text", max_tokens=5, final_max_tokens=60, max_blocks=2)
    policy = _Recording(spec)
    prompt = tok.encode("q")
    second = ["x y", "z"]
    done: list = []
    drive(engine, policy, prompt, "q", done.append)
    forced = False
    while not done:
        engine.step()
        if policy.calls == 1 and policy.state == "free" and not forced:
            # the second call is forced after some text of the context's own
            _force(engine, policy.ctx, "Now: " + spawn_call(second))
            forced = True
    r = done[0]
    assert not isinstance(r, BaseException), r
    assert [e.event for e in r.events] == ["spawn", "end", "end", "join"] * 2 + ["end"]
    assert [e.children for e in r.events if e.event == "spawn"] == [[1, 2], [3, 4]]
    assert [t.prompt for t in r.threads] == ["q", *INPUTS, *second]
    assert [t.parent for t in r.threads] == [None, 0, 0, 0, 0]
    blocks = []
    for call, inputs, (base, leftover) in zip(range(2), (INPUTS, second), policy.bases):
        kids = r.threads[1 + 2 * call : 3 + 2 * call]
        for t, x in zip(kids, inputs):  # each child continued the context, its input appended
            plain = _greedy(llm, base + tok.encode(f"{leftover}{x}\n", add_special_tokens=False), 5)
            assert t.text == plain.text and 1 <= t.generated_tokens <= 5
        calls = [ChildCall(str(i), "1", x) for i, x in enumerate(inputs)]
        blocks.append(results_block(calls, [t.text.strip() or None for t in kids]))
    # the first call began the output: nothing of it kept; the context then takes only the block
    assert policy.bases[0] == (prompt, "")
    assert policy.joined[0] == prompt + tok.encode(blocks[0], add_special_tokens=False)
    # the second: the text before it stays, the call goes, the children's messages come in
    base, leftover = policy.bases[1]
    assert tok.decode(base) + leftover == tok.decode(policy.joined[0]) + "Now: "
    assert policy.joined[1] == base + tok.encode(leftover + blocks[1], add_special_tokens=False)
    assert policy.joined[1][: len(policy.bases[1][0])] == policy.bases[1][0]
    assert "Calling Sub Searches" not in tok.decode(policy.joined[1])
    # greedy: the answer equals one plain sequence fed the joined context
    assert r.text == _greedy(llm, policy.joined[1], 60).text
    block_ids = sum(len(j) - len(b[0]) for j, b in zip(policy.joined, policy.bases))
    suffixes = sum(
        len(tok.encode(f"{b[1]}{x}\n", add_special_tokens=False))
        for b, xs in zip(policy.bases, (INPUTS, second))
        for x in xs
    )
    assert r.prefill_tokens == len(prompt) + suffixes + block_ids
    assert r.join == "reprefill" and r.critical_path_tokens < r.generated_tokens
    assert_no_leaks(engine)


def test_goal_rule_children_without_a_goal_return_no_solution():
    llm = tiny_llm()
    r = llm.threads("q", Protocol("apr", outline=INPUTS, max_tokens=3, final_max_tokens=2), chat=False)
    assert [e.event for e in r.events] == ["spawn", "end", "end", "join", "end"]
    assert all(t.generated_tokens <= 3 for t in r.threads[1:])
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize(
    "written, message",
    [
        ("<Start Sub Search 0 at level 1> a\n<End Calling Sub Searches>", "never opened"),
        ("<Calling Sub Searches>\nhello\n<End Calling Sub Searches>", "malformed spawn call line"),
        (spawn_call(["a", "b", "c"]), "spawned 3 children; max_paths is 2"),
    ],
)
def test_a_malformed_call_fails_the_tree_and_frees_every_page(written, message):
    llm = tiny_llm()
    engine, tok = llm.engine, llm.get_tokenizer()
    policy = AprPolicy(Protocol("apr", max_paths=2, final_max_tokens=80))
    done: list = []
    drive(engine, policy, tok.encode("q"), "q", done.append)
    _force(engine, policy.ctx, written)
    while not done:
        engine.step()
    assert isinstance(done[0], ValueError) and message in str(done[0])
    assert_no_leaks(engine)
    assert llm.generate(["still serving"], SamplingParams(max_tokens=3))[0].outputs[0].token_ids


def test_abort_mid_tree_frees_every_page():
    llm = tiny_llm(block_size=4)
    engine, tok = llm.engine, llm.get_tokenizer()
    policy = AprPolicy(Protocol("apr", outline=["a", "b", "c"], max_tokens=200))
    handle = drive(engine, policy, tok.encode("q"), "q", lambda _: None)
    while policy.state != "waiting":
        engine.step()
    for _ in range(3):
        engine.step()
    assert len(policy.kids) == 3 and engine.kv.pool.num_used > 0
    handle.cancel(engine)
    assert_no_leaks(engine)
