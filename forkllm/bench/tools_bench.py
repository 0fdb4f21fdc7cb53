"""W9 (`forkllm bench tools`): tools run inside the engine vs the usual client loop through the
OpenAI server.

16 tasks, each needing 3 or 4 calls to tools that sleep 300 ms: "which of two cities is warmer, and
by how many degrees": `get_weather` for both cities (two independent calls, one message), then
`difference` of the two temperatures, then (every other task) `to_fahrenheit` of that difference,
then a one-line answer. The 135M model's own tool use is weak, so every assistant message is forced
by a grammar (Lark with `%json` call objects, the same text for both drivers): message 0 is the two
weather calls, message 1 the difference call, message 2 the conversion (4-call tasks), the last one
the answer. Greedy sampling; all tasks run at once.

- in-engine: `LLM.chat(..., tools=..., run_tools=True, tool_grammar=...)`: each call starts when its
  `</tool_call>` closes (the first weather call runs while the second is decoded), the calls of a
  message run concurrently, and the sequence resumes from its own KV with the results.
- client loop: forkllm's own server (`forkllm serve`, a fresh process per run with the same engine
  flags: bench/serve_process.py); per task, the usual
  agent loop of the openai SDK: POST /v1/chat/completions with the tools, `tool_choice: auto` and the
  round's grammar (`structured_outputs.grammar`); run the returned `tool_calls` (one after the other,
  as most agent loops do; `client loop, parallel tools` runs them with asyncio.gather); append the
  assistant message and the tool messages; send the whole history back.

Before every run the prefix cache is emptied, then the tools' system prompt is cached (one
1-token request with it, as a serving engine would always have it): requests admitted in the same
step do not share a prefix they all have yet, which would cost the in-engine run (all tasks
admitted at once) a prefill of the system prompt per task that HTTP arrivals, a few ms apart,
mostly avoid.

Reported per driver: end-to-end wall time for all tasks (median of --reps), prefill tokens the
engine computed (prompt tokens, plus the appended tool turns in-engine; the server's from its
/metrics), and tool time overlapped with the model running (in-engine: the part of each call's
run that overlapped the runner's executions; client loop, where the model is out of sight: the
part while some task had a request in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from forkllm.bench.report import machine_info, median, save
from forkllm.bench.serve_process import ServeProcess
from forkllm.engine.args import engine_kwargs
from forkllm.structured.params import StructuredOutputsParams
from forkllm.tools.executor import result_text
from forkllm.tools.formats.base import json_rule

TOOL_SECONDS = 0.3
TEMPERATURES = {
    "Paris": 18, "Tokyo": 24, "Cairo": 33, "Oslo": 7, "Lima": 19, "Delhi": 35, "Sydney": 22,
    "Moscow": 3, "Nairobi": 21, "Toronto": 11, "Madrid": 27, "Seoul": 16, "Dubai": 39,
    "Reykjavik": 2, "Bangkok": 32, "Berlin": 14, "Santiago": 17, "Mumbai": 31,
}  # fmt: skip
CITIES = list(TEMPERATURES)


# ---- the tools ------------------------------------------------------------------------------------
def get_weather(city: str) -> dict[str, Any]:
    """Current weather of a city.

    Args:
        city: The city's name.
    """
    time.sleep(TOOL_SECONDS)
    return {"city": city, "temp_c": TEMPERATURES.get(city, 20)}


def difference(a: int, b: int) -> dict[str, Any]:
    """The difference a - b of two numbers.

    Args:
        a: The first number.
        b: The number subtracted from it.
    """
    time.sleep(TOOL_SECONDS)
    return {"difference": a - b}


def to_fahrenheit(celsius_delta: int) -> dict[str, Any]:
    """A temperature difference in degrees Celsius, in degrees Fahrenheit.

    Args:
        celsius_delta: The difference in degrees Celsius.
    """
    time.sleep(TOOL_SECONDS)
    return {"fahrenheit_delta": round(celsius_delta * 9 / 5, 1)}


TOOLS: dict[str, Callable[..., Any]] = {f.__name__: f for f in (get_weather, difference, to_fahrenheit)}


def _call(name: str, properties: dict[str, Any]) -> str:
    args = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    return json_rule(
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": args},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
    )


def _calls_grammar(*calls: str) -> str:
    rules = [f"c{i}: {c}" for i, c in enumerate(calls)]
    body = ' "\\n" '.join(f'"<tool_call>\\n" c{i} "\\n</tool_call>"' for i in range(len(calls)))
    return "\n".join([f"start: {body}", *rules]) + "\n"


@dataclass(frozen=True)
class Task:
    a: str
    b: str
    fahrenheit: bool  # 4 calls (the difference converted) instead of 3

    @property
    def num_calls(self) -> int:
        return 4 if self.fahrenheit else 3

    @property
    def question(self) -> str:
        unit = "Fahrenheit" if self.fahrenheit else "Celsius"
        steps = (
            "compute the difference, then convert it to Fahrenheit"
            if self.fahrenheit
            else "compute the difference"
        )
        return (
            f"Which is warmer now, {self.a} or {self.b}, and by how many degrees {unit}? Get the weather "
            f"of both cities at once, then {steps} with the tools, then answer in one line."
        )

    def grammar(self, round: int) -> str:
        small = {"type": "integer", "minimum": -60, "maximum": 60}
        if round == 0:
            return _calls_grammar(
                _call("get_weather", {"city": {"const": self.a}}),
                _call("get_weather", {"city": {"const": self.b}}),
            )
        if round == 1:
            return _calls_grammar(_call("difference", {"a": small, "b": small}))
        if round == 2 and self.fahrenheit:
            return _calls_grammar(_call("to_fahrenheit", {"celsius_delta": small}))
        return f'start: "Answer: " CITY " is warmer, by " NUM " degrees."\nCITY: "{self.a}" | "{self.b}"\nNUM: /[0-9]{{1,3}}/\n'

    def round_grammar(self) -> Callable[[int], StructuredOutputsParams | None]:
        return lambda r: StructuredOutputsParams(grammar=self.grammar(r))


def tool_wait_bound(tasks: list[Task]) -> str:
    """What the tools alone allow: each driver's wall time if the model took no time (tasks run
    at once, so the longest task's tool waits). A sequential client waits for every call; a
    parallel client and the engine wait once for the two weather calls, then once per call."""
    seq = max(t.num_calls for t in tasks) * TOOL_SECONDS
    par = max(t.num_calls - 1 for t in tasks) * TOOL_SECONDS
    return (
        f"\nBound from the tools alone (zero model time): client loop {seq:.1f} s, client loop with "
        f"parallel tools {par:.1f} s, in-engine {par:.1f} s: in-engine can be at most {seq / par:.2f}x "
        "faster than the client loop, plus whatever the loop's round trips cost.\n"
    )


def make_tasks(n: int) -> list[Task]:
    return [Task(CITIES[i % len(CITIES)], CITIES[(i + 7) % len(CITIES)], i % 2 == 0) for i in range(n)]


# ---- what the engine was doing --------------------------------------------------------------------
class ModelClock:
    """Records when the model runs (the runner's execute calls) to measure tool-time overlap."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.busy: list[tuple[float, float]] = []
        self._execute = engine.runner.execute

        def execute(sched: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return self._execute(sched)
            finally:
                self.busy.append((t0, time.perf_counter()))

        engine.runner.execute = execute

    def overlap(self, intervals: list[tuple[float, float]]) -> float:
        return self.overlap_with(sorted(self.busy), intervals)

    @staticmethod
    def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
        """The union of intervals, as disjoint sorted intervals."""
        out: list[tuple[float, float]] = []
        for s, e in sorted(intervals):
            if out and s <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], e))
            else:
                out.append((s, e))
        return out

    @staticmethod
    def overlap_with(busy: list[tuple[float, float]], intervals: list[tuple[float, float]]) -> float:
        """Seconds of `intervals` inside the disjoint `busy` intervals."""
        total = 0.0
        for s, e in intervals:
            total += sum(max(0.0, min(e, b1) - max(s, b0)) for b0, b1 in busy if b1 > s and b0 < e)
        return total

    def restore(self) -> None:
        self.engine.runner.execute = self._execute


# ---- in-engine ------------------------------------------------------------------------------------
def run_in_engine(llm: Any, tasks: list[Task], max_tokens: int) -> tuple[float, list[Any]]:
    from forkllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    convs = [[{"role": "user", "content": t.question}] for t in tasks]
    t0 = time.perf_counter()
    outs = llm.chat(
        convs, sp, tools=list(TOOLS.values()), run_tools=True, tool_grammar=[t.round_grammar() for t in tasks]
    )
    return time.perf_counter() - t0, outs


# ---- the client loop ------------------------------------------------------------------------------
async def client_task(
    client: Any, url: str, task: Task, specs: list[dict[str, Any]], max_tokens: int, parallel: bool
) -> dict[str, Any]:
    """The usual agent loop for one task: call, run the tool calls, send the whole history back."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": task.question}]
    calls: list[tuple[float, float]] = []
    posts: list[tuple[float, float]] = []  # when this task had a request in flight
    prompt_tokens = 0
    answer = ""
    for round in range(task.num_calls + 1):
        body = {
            "model": "w9",
            "messages": messages,
            "tools": specs,
            "tool_choice": "auto",
            "temperature": 0,
            "max_tokens": max_tokens,
            "structured_outputs": {"grammar": task.grammar(round)},
        }
        t_post = time.perf_counter()
        r = await client.post(url, json=body, timeout=600)
        posts.append((t_post, time.perf_counter()))
        r.raise_for_status()
        data = r.json()
        prompt_tokens += data["usage"]["prompt_tokens"]
        msg = data["choices"][0]["message"]
        tool_calls = msg.get("tool_calls") or []
        if not tool_calls:
            answer = msg.get("content") or ""
            break
        messages.append({"role": "assistant", "content": msg.get("content"), "tool_calls": tool_calls})

        async def run(call: dict[str, Any]) -> str:
            fn = TOOLS[call["function"]["name"]]
            args = json.loads(call["function"]["arguments"])
            t0 = time.perf_counter()
            try:
                value = result_text(await asyncio.to_thread(fn, **args))
            except Exception as e:
                value = json.dumps({"error": f"{type(e).__name__}: {e}"})
            calls.append((t0, time.perf_counter()))
            return value

        if parallel:
            results = await asyncio.gather(*(run(c) for c in tool_calls))
        else:
            results = [await run(c) for c in tool_calls]
        for call, result in zip(tool_calls, results):
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return {"calls": calls, "posts": posts, "prompt_tokens": prompt_tokens, "answer": answer}


def run_client_loop(
    url: str, tasks: list[Task], max_tokens: int, parallel: bool
) -> tuple[float, list[dict[str, Any]]]:
    import httpx

    from forkllm.tools.runtime_schema import as_tools

    specs = [t.spec() for t in as_tools(list(TOOLS.values())).values()]

    async def main() -> list[dict[str, Any]]:
        # As many tool threads as calls can be in flight (asyncio's default pool has cpu + 4).
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(64, thread_name_prefix="w9-tool"))
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=1.0)
        async with httpx.AsyncClient(limits=limits) as client:
            return await asyncio.gather(
                *(client_task(client, url, t, specs, max_tokens, parallel) for t in tasks)
            )

    t0 = time.perf_counter()
    res = asyncio.run(main())
    return time.perf_counter() - t0, res


# ---- the benchmark --------------------------------------------------------------------------------
WARM_MESSAGES = [{"role": "user", "content": "Hello."}]


def _warm_in_engine(llm: Any) -> None:
    """Cache the tools' system prompt (what a serving engine always has cached), as the server's."""
    from forkllm import SamplingParams

    llm.chat(WARM_MESSAGES, SamplingParams(max_tokens=1), tools=list(TOOLS.values()), use_tqdm=False)


def _warm_server(url: str) -> None:
    import httpx

    from forkllm.tools.runtime_schema import as_tools

    specs = [t.spec() for t in as_tools(list(TOOLS.values())).values()]
    body = {"model": "w9", "messages": WARM_MESSAGES, "tools": specs, "max_tokens": 1}
    httpx.post(url, json=body, timeout=600).raise_for_status()


def _in_engine_rep(llm: Any, tasks: list[Task], max_tokens: int, clock: ModelClock) -> dict[str, Any]:
    engine = llm.engine
    engine.kv.pool.drop_cached()
    _warm_in_engine(llm)
    clock.busy.clear()
    before = engine.stats.prompt_tokens_computed
    wall, outs = run_in_engine(llm, tasks, max_tokens)
    samples = [o.outputs[0] for o in outs]
    calls = [(c.started, c.finished) for s in samples for c in s.tool_calls]
    return {
        "wall": wall,
        "calls": calls,
        "overlap": clock.overlap(calls),
        # The prompts, then the appended tool turns (the only tokens computed on a resume).
        "prefill_tokens": engine.stats.prompt_tokens_computed
        - before
        + sum(s.prefill_tokens for s in samples),
        "prompt_tokens_sent": sum(len(o.prompt_token_ids) for o in outs),
        "answer": samples[0].text if samples else "",
    }


def _client_rep(kw: dict[str, Any], tasks: list[Task], max_tokens: int, parallel: bool) -> dict[str, Any]:
    """A fresh `forkllm serve` process per run (bench/serve_process.py), warmed, then timed. The
    model's busy time is not visible from outside: a tool call counts as overlapped while some
    task had a request in flight."""
    srv = ServeProcess(kw, ["--served-model-name", "w9"])
    url = srv.base + "/v1/chat/completions"
    try:
        _warm_server(url)  # the tools' system prompt cached, as a serving engine would have it
        before = srv.gauge("forkllm_prompt_tokens_computed")
        wall, res = run_client_loop(url, tasks, max_tokens, parallel)
        after = srv.gauge("forkllm_prompt_tokens_computed")
    finally:
        srv.stop()
    calls = [c for r in res for c in r["calls"]]
    busy = ModelClock.merged([p for r in res for p in r["posts"]])
    return {
        "wall": wall,
        "calls": calls,
        "overlap": ModelClock.overlap_with(busy, calls),
        "prefill_tokens": int(after - before),
        "prompt_tokens_sent": sum(r["prompt_tokens"] for r in res),
        "answer": res[0]["answer"] if res else "",
    }


def bench_tools(args: argparse.Namespace) -> int:
    """The three drivers take turns within each repetition (in-engine, client loop, client loop
    with parallel tools), so a shared machine's drift hits them alike; medians per driver."""
    from forkllm import LLM

    kw = engine_kwargs(args)
    tasks = make_tasks(args.num_prompts or 16)
    max_tokens = 128
    expected = sum(t.num_calls for t in tasks)
    llm = LLM(**kw)
    clock = ModelClock(llm.engine)
    drivers: dict[str, Callable[[], dict[str, Any]]] = {
        "in-engine": lambda: _in_engine_rep(llm, tasks, max_tokens, clock),
        "client loop": lambda: _client_rep(kw, tasks, max_tokens, parallel=False),
        "client loop, parallel tools": lambda: _client_rep(kw, tasks, max_tokens, parallel=True),
    }
    reps: dict[str, list[dict[str, Any]]] = {name: [] for name in drivers}
    try:
        run_in_engine(llm, make_tasks(2), max_tokens)  # warm-up: kernels ready
        for rep in range(args.reps):
            for name, run in drivers.items():
                r = run()
                reps[name].append(r)
                if len(r["calls"]) != expected:
                    print(f"warning: {name} made {len(r['calls'])} calls, expected {expected}", flush=True)
                print(f"rep {rep + 1} {name}: {r['wall']:.2f}s, {len(r['calls'])} calls", flush=True)
    finally:
        clock.restore()
    rows: list[dict[str, Any]] = []
    for name, rs in reps.items():
        mid = sorted(rs, key=lambda r: r["wall"])[len(rs) // 2]
        rows.append(
            {
                "driver": name,
                "seconds": median([r["wall"] for r in rs]),
                "runs": [r["wall"] for r in rs],
                "tool_calls": len(mid["calls"]),
                "tool_seconds": sum(e - s for s, e in mid["calls"]),
                "tool_seconds_overlapped": mid["overlap"],
                "prefill_tokens": mid["prefill_tokens"],
                "prompt_tokens_sent": mid["prompt_tokens_sent"],
                "answer_example": mid["answer"],
            }
        )
    reps_n = args.reps

    m = machine_info()
    base = next(r["seconds"] for r in rows if r["driver"] == "client loop")
    md = (
        f"## W9 tools: {len(tasks)} tasks x 3-4 calls (two independent) to tools sleeping {TOOL_SECONDS * 1000:.0f} ms, "
        f"calls forced by a grammar, greedy; median of {reps_n}; {m['nproc']} cores, {m['cpu']}\n\n"
        "| driver | wall s | speed-up vs client loop | tool calls | tool s | tool s overlapped with the model | "
        "prompt tokens sent | prefill tokens computed |\n|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        md += (
            f"| {r['driver']} | {r['seconds']:.2f} | {base / r['seconds']:.2f}x | {r['tool_calls']} | "
            f"{r['tool_seconds']:.1f} | {r['tool_seconds_overlapped']:.1f} | {r['prompt_tokens_sent']} | "
            f"{r['prefill_tokens']} |\n"
        )
    md += tool_wait_bound(tasks)
    md += "\nruns: " + "; ".join(f"{r['driver']} {[round(x, 2) for x in r['runs']]}" for r in rows) + "\n"
    md += f"\nexample answers: in-engine {rows[0]['answer_example']!r}; client loop {rows[1]['answer_example']!r}\n"
    print("\n" + md)
    print(f"saved {save(args.out_dir, 'w9-tools', md, [], {'rows': rows})}")
    return 0
