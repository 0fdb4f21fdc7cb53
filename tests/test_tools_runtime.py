"""Tools inside the engine (forkllm/tools/runtime.py, executor.py, runtime_schema.py; TreeOps.extend
and park_on_stop): calls dispatched as they close, run concurrently, errors and timeouts as
results, other sequences decoding meanwhile, resume without recompute, abort mid-call.

The random-weight model cannot write tool calls, so a scripted sampler stands in for it: it emits
each sequence's messages token by token (everything else, the engine, scheduler, KV and the
policy, is the real thing)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.engine.policy import cancel, drive, run_policies
from forkllm.engine.sampler import SamplerOutput
from forkllm.engine.sequence import SequenceStatus
from forkllm.tools.executor import ToolExecutor
from forkllm.tools.formats import get_format
from forkllm.tools.runtime import ToolCompletionOutput, ToolPolicy, ToolTurnRenderer
from forkllm.tools.runtime_schema import Tool, as_tools, tool_from_function


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(kv_cache_memory="32MiB")


class Scripted:
    """Stands in for the sampler: sample i of the policy's request (of every request when policy is
    None) emits its scripted tokens in order, then EOS; other sequences sample for real."""

    def __init__(
        self,
        real: Any,
        policy: ToolPolicy | None,
        scripts: dict[int, list[int]],
        eos: int,
        per_request: bool = False,
    ) -> None:
        self.real, self.policy, self.eos = real, policy, eos
        self.scripts, self.per_request = scripts, per_request  # per_request: each request afresh
        self.queues: dict[Any, deque[int]] = {k: deque(v) for k, v in scripts.items()}

    def __call__(self, logits: Any, seqs: list[Any]) -> SamplerOutput:
        real = self.real(logits, seqs)
        tokens = list(real.token_ids)
        tree = self.policy.tree if self.policy is not None else None
        for i, s in enumerate(seqs):
            mine = self.policy is None or (tree is not None and s.request is tree.request)
            q = self.queues.get(s.index) if mine else None
            if self.per_request and s.index in self.scripts:
                q = self.queues.setdefault((s.request.request_id, s.index), deque(self.scripts[s.index]))
            if q is not None:
                tokens[i] = q.popleft() if q else self.eos
        return SamplerOutput(tokens, [None] * len(seqs))


def call_text(name: str, **args: Any) -> str:
    import json

    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


def script(llm, *messages: str) -> list[int]:
    """Token ids of assistant messages, each ended by EOS."""
    tok = llm.get_tokenizer()
    eos = llm.engine.eos_token_ids[0]
    out: list[int] = []
    for m in messages:
        out += tok.encode(m, add_special_tokens=False) + [eos]
    return out


_RUNS = itertools.count()  # a fresh prompt per run: no prefix-cache hit from an earlier test


class Run:
    """One ToolPolicy driven on the tiny engine with a scripted sampler."""

    def __init__(
        self,
        llm,
        tools: list[Any],
        messages: list[str] | dict[int, list[str]],
        sp: SamplingParams | None = None,
        **kw: Any,
    ) -> None:
        self.llm, self.engine = llm, llm.engine
        tok = llm.get_tokenizer()
        self.executor = kw.pop("executor", None) or ToolExecutor()
        self.policy = ToolPolicy(
            sp or SamplingParams(temperature=0, max_tokens=200),
            as_tools(tools),
            self.executor,
            ToolTurnRenderer(tok, get_format("hermes")),
            **kw,
        )
        per_index = messages if isinstance(messages, dict) else {0: messages}
        self.scripts = {i: script(llm, *m) for i, m in per_index.items()}
        self.prompt = tok.encode(
            f"<|im_start|>user\nrequest {next(_RUNS)}<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False,
        )

    @property
    def rid(self) -> str:
        assert self.policy.tree is not None
        return self.policy.tree.request.request_id

    def __enter__(self) -> Run:
        self.real = self.engine.sampler
        self.engine.sampler = Scripted(self.real, self.policy, self.scripts, self.engine.eos_token_ids[0])
        return self

    def __exit__(self, *exc: Any) -> None:
        self.engine.sampler = self.real

    def run(self) -> Any:
        return run_policies(self.engine, [(self.policy, self.prompt, "")])[0]


def sleeper(seconds: float) -> Callable[..., str]:
    def sleepy(x: int) -> str:
        """Sleep, then answer.

        Args:
            x: a number.
        """
        time.sleep(seconds)
        return f"slept {x}"

    return sleepy


# ---- concurrency --------------------------------------------------------------------------------
def test_two_calls_of_one_message_run_concurrently(llm):
    """Each call sleeps 300 ms, but only after both have started (a barrier): run one after the
    other, the first would wait at the barrier until it timed out and raised."""
    both = threading.Barrier(2, timeout=10)

    def sleepy(x: int) -> str:
        both.wait()
        time.sleep(0.3)
        return f"slept {x}"

    msg = call_text("sleepy", x=1) + "\n" + call_text("sleepy", x=2)
    with Run(llm, [sleepy], [msg, "both done"]) as r:
        out = r.run()
    o = out.outputs[0]
    assert isinstance(o, ToolCompletionOutput)
    a, b = o.tool_calls
    assert (a.arguments, b.arguments) == ({"x": 1}, {"x": 2})
    assert a.result == "slept 1" and b.result == "slept 2" and a.round == b.round == 0
    # The two 300 ms calls overlap in time: each started before the other finished.
    assert b.started < a.finished and a.started < b.finished
    assert o.text == "both done" and o.finish_reason == "stop" and o.rounds == 1
    roles = [m["role"] for m in o.messages]
    assert roles == ["assistant", "tool", "tool", "assistant"]
    assert [c["function"]["name"] for c in o.messages[0]["tool_calls"]] == ["sleepy", "sleepy"]
    assert o.messages[1]["tool_call_id"] == o.messages[0]["tool_calls"][0]["id"]


def test_a_call_is_dispatched_while_the_message_is_still_decoding(llm):
    msg = (
        call_text("sleepy", x=1)
        + "\nand now a long tail of text before the second call\n"
        + call_text("sleepy", x=2)
    )
    with Run(llm, [sleeper(0.05)], [msg, "ok"]) as r:
        engine = r.engine
        done: list[Any] = []
        handle = drive(engine, r.policy, r.prompt, "", done.append)
        seen_running_with_call = False
        while not done:
            engine.step()
            st = r.policy.states.get(r.rid)
            seq = engine.requests[r.rid].seqs[0] if r.rid in engine.requests else None
            if (
                st
                and st.records
                and seq is not None
                and seq.status is SequenceStatus.RUNNING
                and st.message.round == 0
            ):
                seen_running_with_call = True
        assert handle.settled
    assert seen_running_with_call
    assert [c.result for c in done[0].outputs[0].tool_calls] == ["slept 1", "slept 2"]


# ---- errors --------------------------------------------------------------------------------------
def test_raising_and_timing_out_tools_give_error_messages(llm):
    release = threading.Event()

    def boom(reason: str) -> str:
        raise RuntimeError(f"bad {reason}")

    def stuck() -> str:
        release.wait(10)
        return "late"

    msg = call_text("boom", reason="luck") + "\n" + call_text("stuck") + "\n" + call_text("nope", a=1)
    try:
        with Run(llm, [boom, stuck], [msg, "recovered"], timeout=0.2) as r:
            out = r.run()
    finally:
        release.set()
    o = out.outputs[0]
    by_name = {c.name: c for c in o.tool_calls}
    assert by_name["boom"].error == "RuntimeError: bad luck" and not by_name["boom"].timed_out
    assert by_name["stuck"].timed_out and by_name["stuck"].error == "timed out after 0.2s"
    assert "unknown tool 'nope'" in by_name["nope"].error
    tool_msgs = [m["content"] for m in o.messages if m["role"] == "tool"]
    assert "bad luck" in tool_msgs[0] and "timed out" in tool_msgs[1] and "unknown tool" in tool_msgs[2]
    assert o.text == "recovered"


def test_bad_arguments_are_an_error_result(llm):
    with Run(llm, [sleeper(0.0)], [call_text("sleepy", y=3), "fine"]) as r:
        out = r.run()
    (call,) = out.outputs[0].tool_calls
    assert call.error is not None and call.error.startswith("TypeError")


# ---- the engine keeps going ----------------------------------------------------------------------
def test_other_sequences_keep_decoding_while_a_tool_runs(llm):
    gate = threading.Event()

    def slow() -> str:
        gate.wait(10)
        return "finally"

    with Run(llm, [slow], [call_text("slow"), "end"]) as r:
        engine = r.engine
        done: list[Any] = []
        drive(engine, r.policy, r.prompt, "", done.append)
        # Step until the tool is running and the sequence is parked.
        while not (r.policy.states.get(r.rid) and r.policy.states[r.rid].records):
            engine.step()
        while engine.requests[r.rid].seqs[0].status is not SequenceStatus.PAUSED:
            engine.step()
        other = engine.add_request(
            [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        )
        steps0 = engine.stats.steps
        finished_other = None
        while finished_other is None:
            for o in engine.step():
                if o.request_id == other and o.finished:
                    finished_other = o
        assert len(finished_other.outputs[0].token_ids) == 24
        assert engine.stats.steps - steps0 >= 24  # decode steps ran while the tool was blocked
        rec = r.policy.states[r.rid].records[0]
        assert not rec.done and not done  # still waiting on the tool
        gate.set()
        while not done:
            engine.step()
    assert done[0].outputs[0].tool_calls[0].result == "finally"


def test_resume_computes_only_the_tool_turn(llm):
    """No recompute: every position of the sequence is computed once; the resume chunk starts where
    the parked sequence's KV ended and holds its last sampled token plus the tool turn."""
    with Run(llm, [sleeper(0.0)], [call_text("sleepy", x=7), call_text("sleepy", x=8), "end"]) as r:
        engine = r.engine
        chunks: list[tuple[int, int]] = []  # (first position, tokens) of each chunk of the sequence
        execute = engine.runner.execute

        def spy(sched):
            for s in sched.scheduled:
                if s.seq.seq_id == r.rid:
                    chunks.append((s.seq.num_computed_tokens, s.num_new_tokens))
            return execute(sched)

        engine.runner.execute = spy
        try:
            out = r.run()
        finally:
            engine.runner.execute = execute
    o = out.outputs[0]
    assert o.rounds == 2 and [c.result for c in o.tool_calls] == ["slept 7", "slept 8"]
    positions = [p for start, n in chunks for p in range(start, start + n)]
    first = positions[0]  # 0, or past pages the prefix cache had
    assert positions == list(range(first, first + len(positions)))  # contiguous, nothing computed twice
    resumes = [(start, n) for start, n in chunks[1:] if n > 1]
    assert len(resumes) == 2
    assert sum(n - 1 for _, n in resumes) == o.prefill_tokens  # the tool turns and nothing else


def test_abort_while_a_tool_runs_frees_the_tree(llm):
    gate = threading.Event()
    started = threading.Event()

    def slow() -> str:
        started.set()
        gate.wait(10)
        return "too late"

    with Run(llm, [slow], [call_text("slow"), "never"]) as r:
        engine = r.engine
        used0 = engine.kv.pool.num_used
        done: list[Any] = []
        handle = drive(engine, r.policy, r.prompt, "", done.append)
        while not started.is_set():
            engine.step()
        cancel(engine, handle)
        assert r.rid not in engine.requests and engine.kv.pool.num_used == used0
        assert handle not in engine.step_hooks
        gate.set()  # the tool returns after the abort: nothing happens
        time.sleep(0.05)
        engine.step()
    out = tiny_follow_up(llm)
    assert out.outputs[0].token_ids


def tiny_follow_up(llm):
    return llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]


# ---- rounds, samples, limits ---------------------------------------------------------------------
def test_max_tool_rounds(llm):
    msgs = [call_text("sleepy", x=1), call_text("sleepy", x=2), "end"]
    with Run(llm, [sleeper(0.0)], msgs, max_rounds=1) as r:
        o = r.run().outputs[0]
    assert o.rounds == 1 and [c.arguments for c in o.tool_calls] == [{"x": 1}]
    assert "<tool_call>" in o.text and o.finish_reason == "stop"  # the second round's call, not run


def test_n_samples_run_their_own_tools(llm):
    scripts = {0: [call_text("sleepy", x=10), "zero"], 1: [call_text("sleepy", x=11), "one"]}
    sp = SamplingParams(n=2, temperature=0, max_tokens=100)
    with Run(llm, [sleeper(0.0)], scripts, sp=sp) as r:
        out = r.run()
    assert [o.text for o in out.outputs] == ["zero", "one"]
    assert [[c.result for c in o.tool_calls] for o in out.outputs] == [["slept 10"], ["slept 11"]]


def test_max_tokens_bounds_each_message(llm):
    msgs = [call_text("sleepy", x=1), "an answer far too long to fit" * 10]
    with Run(llm, [sleeper(0.0)], msgs, sp=SamplingParams(temperature=0, max_tokens=40)) as r:
        o = r.run().outputs[0]
    assert o.rounds == 1 and o.finish_reason == "length" and len(o.token_ids) == 40


def test_async_engine_runs_tools(llm):
    from forkllm.engine.async_engine import AsyncEngine

    msg = call_text("sleepy", x=1) + "\n" + call_text("sleepy", x=2)
    with Run(llm, [sleeper(0.1)], [msg, "async done"]) as r:
        aeng = AsyncEngine(r.engine)
        try:
            out = asyncio.run(aeng.run_policy(r.policy, r.prompt))
        finally:
            aeng.shutdown()
    o = out.outputs[0]
    assert o.text == "async done" and len(o.tool_calls) == 2


def test_bad_params_are_refused(llm):
    tok = llm.get_tokenizer()
    renderer = ToolTurnRenderer(tok, get_format("hermes"))
    for sp, field in [
        (SamplingParams(ignore_eos=True), "ignore_eos"),
        (SamplingParams(prompt_logprobs=1), "prompt_logprobs"),
    ]:
        with pytest.raises(ValueError, match=field):
            ToolPolicy(sp, {}, ToolExecutor(), renderer)
    with pytest.raises(ValueError, match="needs tools"):
        llm.chat([{"role": "user", "content": "x"}], run_tools=True)


# ---- tool schemas --------------------------------------------------------------------------------
def test_schema_from_a_function():
    def get_weather(city: str, unit: Literal["c", "f"] = "c", days: int | None = None) -> str:
        """Get the weather of a city.

        Args:
            city: The city,
                e.g. Paris.
            unit: Temperature unit.
        """
        return ""

    t = tool_from_function(get_weather)
    assert t.name == "get_weather" and t.description == "Get the weather of a city."
    assert t.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city, e.g. Paris."},
            "unit": {"enum": ["c", "f"], "description": "Temperature unit.", "default": "c"},
            "days": {"type": "integer", "default": None},
        },
        "required": ["city"],
    }
    spec = {
        "type": "function",
        "function": {"name": "w", "description": "d", "parameters": {"type": "object"}},
    }
    tools = as_tools([get_weather, (spec, get_weather)])
    assert list(tools) == ["get_weather", "w"] and isinstance(tools["w"], Tool)
    with pytest.raises(ValueError, match="twice"):
        as_tools([get_weather, get_weather])


def test_renderer_appends_the_chat_templates_tool_turn(llm):
    tok = llm.get_tokenizer()
    r = ToolTurnRenderer(tok, get_format("hermes"))
    assert r.suffix(["R1", "R2"], "<|im_end|>") == (
        "\n<|im_start|>tool\n<tool_response>\nR1\n</tool_response><|im_end|>\n"
        "<|im_start|>tool\n<tool_response>\nR2\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert r.suffix(["R"], None).startswith("<|im_end|>\n<|im_start|>tool\n")


# ---- the Python API with a grammar forcing the calls (no script: the model samples) ---------------
def weather_grammar(cities: list[str], calls: int = 1) -> str:
    """A Hermes message of `calls` get_weather calls, the city from `cities`."""
    from forkllm.tools.formats.base import json_rule

    call = json_rule(
        {
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {
                    "type": "object",
                    "properties": {"city": {"enum": cities}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
    )
    body = ' "\\n" '.join(['"<tool_call>\\n" call "\\n</tool_call>"'] * calls)
    return f"start: {body}\ncall: {call}\n"


def test_chat_runs_tools_forced_by_a_grammar(llm):
    from forkllm.structured.params import StructuredOutputsParams

    seen: list[str] = []

    def get_weather(city: str) -> dict:
        """Current weather of a city."""
        seen.append(city)
        return {"city": city, "temp_c": len(city)}

    grammar = weather_grammar(["Paris", "Tokyo", "Lima"], calls=2)
    outs = llm.chat(
        [
            [{"role": "user", "content": "weather in Paris and Tokyo?"}],
            [{"role": "user", "content": "and Lima?"}],
        ],
        SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=64),
        tools=[get_weather],
        run_tools=True,
        tool_grammar=lambda r: StructuredOutputsParams(grammar=grammar if r == 0 else 'start: "done"'),
    )
    assert len(outs) == 2 and all(len(o.outputs) == 2 for o in outs)
    for o in outs:
        assert "get_weather" in (o.prompt or "")  # the tools are in the system prompt
        for sample in o.outputs:
            assert isinstance(sample, ToolCompletionOutput)
            assert sample.rounds == 1 and len(sample.tool_calls) == 2
            for c in sample.tool_calls:
                assert c.arguments["city"] in ("Paris", "Tokyo", "Lima")
                assert (
                    c.result == f'{{"city": "{c.arguments["city"]}", "temp_c": {len(c.arguments["city"])}}}'
                )
            assert sample.text == "done" and sample.finish_reason == "stop"
            assert [m["role"] for m in sample.messages] == ["assistant", "tool", "tool", "assistant"]
    assert len(seen) == 8  # 2 conversations x 2 samples x 2 calls, each sample its own


@pytest.mark.slow
def test_real_model_uses_a_tool_result(real):
    """SmolLM2-135M-Instruct, one forced call, then a free answer that reads the tool's message."""
    from forkllm.structured.params import StructuredOutputsParams

    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return f"It is 31 degrees Celsius and sunny in {city}."

    grammar = weather_grammar(["Paris"])
    (out,) = real.chat(
        [{"role": "user", "content": "What is the weather in Paris?"}],
        SamplingParams(temperature=0, max_tokens=40),
        tools=[get_weather],
        run_tools=True,
        tool_grammar=lambda r: StructuredOutputsParams(grammar=grammar) if r == 0 else None,
    )
    o = out.outputs[0]
    assert [c.arguments for c in o.tool_calls] == [{"city": "Paris"}]
    assert o.rounds == 1 and o.text.strip()
    assert "31" in o.text or "sunny" in o.text.lower()


# ---- the opt-in server mode ----------------------------------------------------------------------
@contextlib.contextmanager
def tools_server(*messages: str, n_scripts: int = 1) -> Iterator[tuple[Any, Any]]:
    """A live server in tools mode (tools_for_tests:TOOLS) whose samples write `messages`; yields
    (openai client at /v1/tools, the engine)."""
    import socket

    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi import FastAPI

    from forkllm.engine.async_engine import AsyncEngine
    from forkllm.server.app import ServerConfig, create_app
    from forkllm.server.tools_mode import enable_tools_mode, load_tools

    llm = tiny_llm(kv_cache_memory="32MiB")
    ids = script(llm, *messages)
    llm.engine.sampler = Scripted(
        llm.engine.sampler,
        None,
        {i: ids for i in range(n_scripts)},
        llm.engine.eos_token_ids[0],
        per_request=True,
    )
    app: FastAPI = create_app(ServerConfig(served_model_name="tiny"), engine=AsyncEngine(llm.engine))
    enable_tools_mode(app, load_tools(["tools_for_tests:TOOLS"]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield (
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1/tools", api_key="x", max_retries=0),
            llm.engine,
        )
    finally:
        server.should_exit = True
        thread.join(15)


DOUBLE_TWICE = ("Both.\n" + call_text("double", x=4) + "\n" + call_text("double", x=5), "eighteen")


def test_server_tools_mode_runs_registered_tools():
    openai = pytest.importorskip("openai")
    with tools_server(*DOUBLE_TWICE) as (client, _):
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "double 4 and 5"}],
            temperature=0,
            max_tokens=64,
        )
        choice = r.choices[0]
        assert choice.message.content == "eighteen" and choice.finish_reason == "stop"
        history = choice.model_extra["tool_history"]
        assert [c["result"] for c in history["calls"]] == ["8", "10"]
        assert [m["role"] for m in history["messages"]] == ["assistant", "tool", "tool", "assistant"]
        assert history["messages"][0]["content"] == "Both."  # the parser trims around calls
        assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
        with pytest.raises(openai.BadRequestError, match="tools"):
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "x"}],
                tools=[{"type": "function", "function": {"name": "f"}}],
            )
        with pytest.raises(openai.BadRequestError, match="stream_options"):
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "x"}],
                stream_options={"include_usage": True},
            )


@pytest.mark.parametrize("n", [1, 2])
def test_server_tools_mode_streams_content_calls_and_results(n):
    with tools_server(*DOUBLE_TWICE, n_scripts=n) as (client, engine):
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "double 4 and 5"}],
            "temperature": 0,
        }
        whole = client.chat.completions.create(**body, max_tokens=64, n=n)
        stream = client.chat.completions.create(
            **body, max_tokens=64, n=n, stream=True, stream_options={"include_usage": True}
        )
        content: dict[int, str] = {i: "" for i in range(n)}
        events: list[dict[str, Any]] = []
        finish: dict[int, Any] = {}
        usage = None
        for chunk in stream:  # the SDK's own types parse every chunk
            if chunk.usage is not None:
                usage = chunk.usage
            extra = chunk.model_extra or {}
            if "tool_event" in extra:
                assert chunk.choices == []
                events.append(extra["tool_event"])
            for c in chunk.choices:
                content[c.index] += c.delta.content or ""
                if c.finish_reason is not None:
                    finish[c.index] = (c.finish_reason, c.model_extra["tool_history"])
        for i in range(n):
            mine = [e for e in events if e["index"] == i]
            kinds = [e["type"] for e in mine]
            # Each call is reported when dispatched, its result when settled, then one resume.
            assert sorted(kinds) == ["call", "call", "result", "result", "resume"] and kinds[-1] == "resume"
            calls = [e["call"] for e in mine if e["type"] == "call"]
            assert [c["function"]["name"] for c in calls] == ["double", "double"]
            assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": 4}, {"x": 5}]
            order = [(e["type"], e["call"]["id"]) for e in mine if e["type"] != "resume"]
            for c, result in zip(calls, ["8", "10"], strict=True):
                assert order.index(("call", c["id"])) < order.index(("result", c["id"]))
                assert (
                    next(
                        e["call"]["result"]
                        for e in mine
                        if e["type"] == "result" and e["call"]["id"] == c["id"]
                    )
                    == result
                )
            resume = mine[kinds.index("resume")]
            assert resume["round"] == 1 and resume["prefill_tokens"] > 0
            reason, history = finish[i]
            assert reason == "stop"
            # The streamed content is every message's content; the last equals the whole response's.
            said = [m["content"] or "" for m in history["messages"] if m["role"] == "assistant"]
            assert said == ["Both.", "eighteen"] and content[i] == "".join(said)
            # The same exchange as the whole response's (call ids and timings differ run to run).
            assert [m["role"] for m in history["messages"]] == ["assistant", "tool", "tool", "assistant"]
            assert whole.choices[i].model_extra["tool_history"]["messages"][-1] == history["messages"][-1]
            assert [c["result"] for c in history["calls"]] == ["8", "10"]
            assert whole.choices[i].message.content == "eighteen"
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
        assert not engine.has_unfinished_requests()


def test_server_tools_mode_stream_left_midway_aborts_the_run():
    import httpx

    with tools_server(call_text("double", x=4), "x" * 400) as (client, engine):
        used0 = engine.kv.pool.num_used
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "double 4"}],
            "temperature": 0,
            "max_tokens": 500,
            "stream": True,
        }
        with httpx.stream("POST", f"{client.base_url}chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if '"resume"' in line:
                    break  # the client leaves while the second message decodes
        for _ in range(200):
            if not engine.has_unfinished_requests():
                break
            time.sleep(0.05)
        assert not engine.has_unfinished_requests() and engine.kv.pool.num_used == used0
