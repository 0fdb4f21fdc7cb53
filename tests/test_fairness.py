"""No request holds the engine hostage (issue 15), on a tiny random-weight model.

- a long prompt is cut so another prompt gets its first chunk in the same step;
- a wide request (n samples) keeps to its share of the batch while others want slots, and its
  samples over the share are forked later with exactly the tokens they would have had;
- priorities order admission;
- a client that leaves (non-streaming completion, scaling run) aborts its work, pages freed;
- tree policies never wait on an idle engine loop, and one that needs work after its last step
  (a judge scoring candidates after budget pruning) gets it.

Counts, not clocks: the asserts are about which step did what, never about seconds.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import pytest
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.engine.async_engine import AsyncEngine
from forkllm.engine.llm_engine import LLMEngine
from forkllm.engine.scheduler import (
    LONG_RUNNING_SHARE,
    LONG_RUNNING_SHARE_BESIDE_PROMPTS,
    LONG_RUNNING_STEPS,
    SchedulerOutput,
)
from forkllm.engine.sequence import Request
from forkllm.scaling import BestOfN, ParticleFilter, SelfConsistency, scorers

PROMPT = list(range(400, 430))


def record_batches(engine: LLMEngine) -> list[SchedulerOutput]:
    """Keep every SchedulerOutput the engine runs (the plan of each step)."""
    plans: list[SchedulerOutput] = []
    schedule = engine.scheduler.schedule

    def recording() -> SchedulerOutput:
        out = schedule()
        plans.append(out)
        return out

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    return plans


def per_request(plan: SchedulerOutput) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in plan.scheduled:
        rid = s.seq.request.request_id
        counts[rid] = counts.get(rid, 0) + 1
    return counts


def outputs_by_index(out) -> list[list[int]]:
    return [list(c.token_ids) for c in sorted(out.outputs, key=lambda c: c.index)]


def assert_pages_free(engine: LLMEngine) -> None:
    pool = engine.kv.pool
    assert not engine.has_unfinished_requests()
    assert pool.num_free == pool.num_usable
    assert not engine.scheduler.deferred


# ---- long prompts ----------------------------------------------------------------------------


@pytest.mark.parametrize(("threshold", "fair"), [(16, None), (16, 0), (0, 0)])
def test_a_short_prompt_gets_its_first_token_while_a_long_one_prefills(threshold, fair):
    long_prompt = [100 + (i * 37) % 30000 for i in range(600)]
    short_prompt = [7, 8, 9, 10, 11]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = tiny_llm(max_num_batched_tokens=64, long_prefill_token_threshold=threshold, fair_step_tokens=fair)
    engine = llm.engine
    plans = record_batches(engine)
    engine.add_request(long_prompt, greedy, request_id="long")
    engine.step()
    # alone it is still held to the step's work cap (16 tokens' work), not the whole budget
    first = 16 if threshold and fair is None else 64
    assert per_request(plans[-1]) == {"long": 1} and plans[-1].num_batched_tokens == first
    engine.add_request(short_prompt, greedy, request_id="short")
    engine.step()
    long_req, short_req = engine.requests["long"], engine.requests["short"]
    sched = engine.scheduler
    if threshold and fair is None:
        # contended: the step holds 16 tokens' work (the threshold); the short prompt wants 5.
        # The long one (600 tokens: long-running from the start, skip-join) keeps a sixteenth of
        # the step beside a newcomer's prompt, weighed by its context (16 tokens in): one token.
        beside = LONG_RUNNING_SHARE_BESIDE_PROMPTS * sched.fair_step_cost
        long_n = max(1, sched.tokens_within(16, beside))
        assert long_n == 1
        assert [(s.seq.seq_id, s.num_new_tokens) for s in plans[-1].scheduled] == [
            ("long", long_n),
            ("short", 5),
        ]
        assert short_req.seqs[0].num_output_tokens == 1
    elif threshold:
        # no work cap: the long prompt was cut to 16, the short one took its 5, the long one the other 43
        assert [(s.seq.seq_id, s.num_new_tokens) for s in plans[-1].scheduled] == [
            ("long", 59),
            ("short", 5),
        ]
        assert short_req.seqs[0].num_output_tokens == 1
    else:
        assert per_request(plans[-1]) == {"long": 1}
        assert short_req.seqs[0].num_output_tokens == 0
    assert long_req.seqs[0].num_computed_tokens < len(long_prompt)  # still prefilling
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o
    alone = tiny_llm().generate([long_prompt, short_prompt], greedy, use_tqdm=False)
    assert outputs_by_index(outs["long"]) == outputs_by_index(alone[0])  # exact-token parity
    assert outputs_by_index(outs["short"]) == outputs_by_index(alone[1])
    assert_pages_free(engine)


def test_a_long_running_request_gets_a_small_share_of_the_step_while_a_newcomer_has_work():
    """After LONG_RUNNING_STEPS capped steps alone, a long prompt is demoted: in the step of a
    newcomer's prompt it gets a sixteenth of the step's work, beside its decodes a quarter,
    however much the newcomer leaves."""
    long_prompt = [100 + (i * 37) % 30000 for i in range(600)]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = tiny_llm(max_num_batched_tokens=64, long_prefill_token_threshold=32)
    engine, sched = llm.engine, llm.engine.scheduler
    plans = record_batches(engine)
    engine.add_request(long_prompt, greedy, request_id="long")
    long_req = engine.requests["long"]
    long_seq = long_req.seqs[0]
    steps = 0
    while long_req.service < LONG_RUNNING_STEPS * sched.fair_step_cost:
        start = long_seq.num_computed_tokens
        engine.step()
        steps += 1
        # alone, each step holds the cap's work (32 fresh tokens' worth), not the 64-token budget
        assert plans[-1].num_batched_tokens == sched.tokens_within(start, sched.fair_step_cost) <= 32
    assert steps == LONG_RUNNING_STEPS + 1  # each step falls short of the cap by a fraction
    engine.add_request([7, 8, 9], greedy, request_id="new")
    start = long_seq.num_computed_tokens
    engine.step()  # the newcomer's prompt: the long one keeps a sixteenth (at least a token)
    plan = {s.seq.seq_id: s.num_new_tokens for s in plans[-1].scheduled}
    assert plan["new"] == 3
    beside = sched.tokens_within(start, LONG_RUNNING_SHARE_BESIDE_PROMPTS * sched.fair_step_cost)
    assert plan["long"] == max(1, beside)
    start = long_seq.num_computed_tokens
    engine.step()  # the newcomer decodes: the long one gets a quarter
    plan = {s.seq.seq_id: s.num_new_tokens for s in plans[-1].scheduled}
    assert plan["new"] == 1
    assert plan["long"] == sched.tokens_within(start, LONG_RUNNING_SHARE * sched.fair_step_cost)
    assert plan["long"] < sched.tokens_within(start, sched.fair_step_cost - sched.cost_at(3, 1))
    while engine.has_unfinished_requests():
        engine.step()
    assert_pages_free(engine)


# ---- wide requests -----------------------------------------------------------------------------


def test_samples_over_the_batch_are_forked_later_with_the_same_tokens():
    sp = SamplingParams(n=12, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    ref = tiny_llm().generate([PROMPT], sp, use_tqdm=False)[0]
    llm = tiny_llm(max_num_seqs=4)
    plans = record_batches(llm.engine)
    deferred_seen = []
    llm.engine.add_step_hook(lambda e: deferred_seen.append(e.metrics()["deferred_samples"]))
    out = llm.generate([PROMPT], sp, use_tqdm=False)[0]
    assert outputs_by_index(out) == outputs_by_index(ref)
    assert max(len(p.scheduled) for p in plans) == 4
    assert deferred_seen[0] == 12 - 4  # 3 forked at the first sample, 8 waiting for room
    assert llm.engine.tree.num_forks == 11
    assert_pages_free(llm.engine)


def test_a_wide_request_keeps_to_its_share_while_another_waits():
    wide = SamplingParams(n=8, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    small = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm = tiny_llm(max_num_seqs=4, max_seq_share=0.5)
    engine = llm.engine
    plans = record_batches(engine)
    engine.add_request(PROMPT, wide, request_id="wide")
    engine.step()
    engine.step()
    assert per_request(plans[-1]) == {"wide": 4}  # alone it takes every slot
    engine.add_request([5, 6, 7], small, request_id="small")
    small_req = engine.requests["small"]
    outs = {}
    steps_with_small = 0
    while engine.has_unfinished_requests():
        small_live = not small_req.finished
        for o in engine.step():
            outs[o.request_id] = o
        if small_live:
            steps_with_small += 1
            assert per_request(plans[-1]).get("wide", 0) <= 2  # its share: half of 4
    assert steps_with_small == 3  # admitted at once: 3 tokens in 3 steps
    assert small_req.metrics.first_token_time is not None
    ref = tiny_llm().generate([PROMPT, [5, 6, 7]], [wide, small], use_tqdm=False)
    assert outputs_by_index(outs["wide"]) == outputs_by_index(ref[0])
    assert outputs_by_index(outs["small"]) == outputs_by_index(ref[1])
    assert_pages_free(engine)


def test_aborting_a_request_with_deferred_samples_frees_the_anchor():
    llm = tiny_llm(max_num_seqs=2)
    engine = llm.engine
    engine.add_request(PROMPT, SamplingParams(n=6, max_tokens=50, ignore_eos=True), request_id="w")
    engine.step()
    assert engine.scheduler.deferred and engine.requests["w"].pending_samples == 4  # 1 forked
    engine.abort_request("w")
    assert_pages_free(engine)


def test_self_consistency_over_the_batch_width_votes_the_same():
    def run(**kw):
        llm = tiny_llm(**kw)
        policy = SelfConsistency(n=10, extract=lambda t: t[:1] or None, temperature=1.0, max_tokens=5, seed=4)
        r = llm.scale(PROMPT, policy)
        assert_pages_free(llm.engine)
        return r

    wide, narrow = run(), run(max_num_seqs=3)
    assert narrow.votes == wide.votes
    assert sorted(c.text for c in narrow.candidates) == sorted(c.text for c in wide.candidates)
    assert (narrow.tokens_generated, narrow.forks) == (wide.tokens_generated, wide.forks)


def test_budget_counts_samples_not_forked_yet():
    llm = tiny_llm(max_num_seqs=3)
    policy = SelfConsistency(
        n=8, extract=lambda t: t[:1] or None, temperature=1.0, max_tokens=20, seed=1, budget=30
    )
    r = llm.scale(PROMPT, policy)
    # 3 samples run; once 30 - generated can no longer cover them and the 5 deferred, the
    # deferred are given up (they have nothing yet) and the 3 spend the budget exactly
    assert r.tokens_generated == 30 and r.forks == 2
    assert_pages_free(llm.engine)


# ---- priorities --------------------------------------------------------------------------------


def test_lower_priority_value_is_admitted_first():
    llm = tiny_llm(max_num_seqs=1)
    engine = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    for rid, prio in (("a", 0), ("b", 5), ("c", -1), ("d", 0)):
        engine.add_request([10, 11, 12], sp, request_id=rid, priority=prio)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["c", "a", "d", "b"]
    with pytest.raises(ValueError, match="priority"):
        engine.add_request([1], sp, priority="high")  # type: ignore[arg-type]


# ---- the async engine: metrics during a step, priorities, policies without idle waits ----------


@pytest.fixture()
def aengine():
    eng = AsyncEngine(tiny_llm().engine)
    yield eng
    eng.shutdown()


def test_metrics_show_the_batch_while_the_step_runs(aengine):
    seen: list[dict[str, float]] = []
    runner = aengine.engine.runner
    execute = runner.execute

    def spying(sched):
        seen.append(dict(aengine.metrics_snapshot))  # what /metrics would read now
        return execute(sched)

    runner.execute = spying  # type: ignore[method-assign]

    async def main():
        sp = SamplingParams(n=3, max_tokens=2, ignore_eos=True)
        return [o async for o in aengine.generate(PROMPT, sp, priority=2)]

    asyncio.run(main())
    first = seen[0]
    assert (first["running_seqs"], first["waiting_seqs"], first["scheduled_seqs"]) == (1, 0, 1)
    assert seen[1]["running_seqs"] == seen[1]["scheduled_seqs"] == 3


def test_generate_passes_the_priority_on(aengine):
    seen: list[int] = []

    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def look(engine: LLMEngine) -> None:
            seen.append(engine.requests["p"].priority)
            loop.call_soon_threadsafe(done.set_result, None)

        sp = SamplingParams(max_tokens=1000, ignore_eos=True)
        async for _ in aengine.generate([1, 2, 3], sp, request_id="p", priority=-4):
            aengine.call(look)  # runs before the engine's next step: the request is still there
            await done
            break

    asyncio.run(main())
    assert seen == [-4]


def run_async_policy(aengine, policy, timeout=60.0):
    """Run a policy on the async engine; returns its result and how many times the engine loop
    slept idle between the policy's start and its result (both read on the engine thread)."""
    marks: list[int] = []
    start, result = policy.start, policy.result

    def marked_start(*args):
        marks.append(aengine.num_idle_waits)
        return start(*args)

    def marked_result():
        marks.append(aengine.num_idle_waits)
        return result()

    policy.start, policy.result = marked_start, marked_result

    async def main():
        return await asyncio.wait_for(aengine.run_policy(policy, PROMPT), timeout)

    out = asyncio.run(main())
    return out, marks[1] - marks[0]


def test_a_policy_that_needs_a_step_after_its_tree_ended_gets_it_at_once(aengine):
    # Budget pruning ends the tree inside a hook; best-of-n scores on the next call.
    policy = BestOfN(n=4, scorer=scorers.Verifier(lambda q, t: len(t)), max_tokens=40, seed=2, budget=20)
    result, idle_waits = run_async_policy(aengine, policy)
    assert result.tokens_generated == 20 and len(result.candidates) == 4
    assert idle_waits == 0
    assert_pages_free(aengine.engine)


def particle_filter() -> ParticleFilter:
    """Particles pause at an "a" in their text; the reward is 0 for a finished particle and -inf
    for a paused one, so the first resampling draws only finished particles: every paused one is
    pruned and the tree ends inside the policy's hook, which must then be called once more."""
    holder: list[ParticleFilter] = []

    def reward(question: str, text: str) -> float:
        done = [s for s in holder[0].tree.seqs if s.text == text and s.finished]  # type: ignore[union-attr]
        return 0.0 if done else -math.inf

    pf = ParticleFilter(
        n=4,
        reward=reward,
        delimiter="a",
        max_step_tokens=8,
        max_steps=10,
        temperature=1.0,
        max_tokens=6,
        seed=0,
    )
    holder.append(pf)
    return pf


def test_particle_filter_over_the_async_engine_matches_python_and_never_idles(aengine):
    expected = tiny_llm().scale(PROMPT, particle_filter())
    assert expected.extra["weights"][0] == [0.5, 0.0, 0.0, 0.5]  # the scenario above happened
    result, idle_waits = run_async_policy(aengine, particle_filter())
    assert idle_waits == 0
    assert (result.text, result.tokens_generated, result.forks, result.prunes, result.extra) == (
        expected.text,
        expected.tokens_generated,
        expected.forks,
        expected.prunes,
        expected.extra,
    )
    assert_pages_free(aengine.engine)


def test_a_stalled_policy_fails_instead_of_hanging(aengine):
    class Stuck(SelfConsistency):
        def advance(self) -> None:  # never done, never asks for work once its samples end
            pass

    with pytest.raises(RuntimeError, match="stalled"):
        run_async_policy(aengine, Stuck(n=2, max_tokens=3, seed=0))
    assert not aengine.engine.step_hooks


def judged(seed: int) -> BestOfN:
    return BestOfN(n=4, scorer=scorers.SelfJudge(), temperature=1.0, max_tokens=40, seed=seed, budget=96)


def test_best_of_n_self_judge_with_a_budget_over_a_batch(aengine):
    """The budget prunes each tree inside a hook; the judge's requests come on the next call."""
    prompts = [PROMPT, PROMPT[:20], PROMPT[5:]]
    llm = tiny_llm()
    expected = llm.scale_batch(prompts, [judged(s) for s in range(3)])
    assert [r.tokens_generated for r in expected] == [96, 96, 96]
    assert_pages_free(llm.engine)

    async def main():
        runs = [aengine.run_policy(judged(s), p) for s, p in enumerate(prompts)]
        return await asyncio.wait_for(asyncio.gather(*runs), 60)

    results = asyncio.run(main())
    assert [r.text for r in results] == [r.text for r in expected]
    for got, want in zip(results, expected):
        assert [c.score for c in got.candidates] == pytest.approx([c.score for c in want.candidates])
    assert_pages_free(aengine.engine)


def test_cancelling_a_policy_aborts_its_judge_requests():
    from forkllm.engine.policy import drive

    engine = tiny_llm().engine
    policy = BestOfN(n=3, scorer=scorers.SelfJudge(), temperature=1.0, max_tokens=4, seed=0)
    outcomes: list[object] = []
    handle = drive(engine, policy, PROMPT, "", outcomes.append)
    while policy.job is None:
        engine.step()
    judges = list(policy.job.requests)  # type: ignore[attr-defined]
    assert len(judges) == 3 and all(r.request_id in engine.requests for r in judges)
    handle.cancel(engine)
    assert all(s.finish_reason == "abort" for r in judges for s in r.seqs)
    assert not engine.step_hooks and not outcomes
    assert_pages_free(engine)


# ---- a client that leaves ----------------------------------------------------------------------


class FakeRequest:
    """What run_to_completion / unless_disconnected read of a FastAPI Request: its receive channel,
    which yields http.disconnect once `leave` is set."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()

    async def receive(self) -> dict[str, str]:
        await self.leave.wait()
        return {"type": "http.disconnect"}


def test_a_non_streaming_request_whose_client_left_is_aborted(aengine):
    from forkllm.server.client import LocalEngineClient
    from forkllm.server.errors import APIError
    from forkllm.server.requests import run_to_completion
    from forkllm.server.state import ServerConfig, ServerState

    engine = aengine.engine
    state = ServerState(ServerConfig(served_model_name="tiny"), None, None)
    raw = FakeRequest()
    held: list[Request] = []

    async def main():
        sp = SamplingParams(max_tokens=1500, ignore_eos=True)
        run = asyncio.ensure_future(
            run_to_completion(state, LocalEngineClient(aengine), [("", PROMPT)], [sp], "cmpl-1", raw)  # type: ignore[arg-type]
        )
        while not held:  # the request is generating
            await asyncio.sleep(0.001)
            req = engine.requests.get("cmpl-1-0")
            if req is not None and req.seqs[0].num_output_tokens > 0:
                held.append(req)
        raw.leave.set()
        with pytest.raises(APIError) as e:
            await run
        assert e.value.status == 499
        for _ in range(1000):
            if not engine.has_unfinished_requests():
                return
            await asyncio.sleep(0.005)

    asyncio.run(main())
    seq = held[0].seqs[0]
    assert seq.finish_reason == "abort" and seq.num_output_tokens < 1500
    assert_pages_free(engine)


class LiveServer:
    def __init__(self, app) -> None:
        uvicorn = pytest.importorskip("uvicorn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return
            time.sleep(0.05)
        raise AssertionError("server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def post_then_leave(port: int, path: str, body: dict, engine: LLMEngine) -> Request:
    """POST `body`, wait until its engine request is generating, close the socket; returns the
    engine's Request (kept after it leaves the engine)."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head + data)
    for _ in range(20000):
        try:  # a read-only peek from the test thread; the engine thread may resize the dict
            reqs = list(engine.requests.values())
        except RuntimeError:
            continue
        live = [r for r in reqs if any(s.num_output_tokens > 0 for s in list(r.seqs))]
        if live:
            sock.close()
            return live[0]
        time.sleep(0.002)
    sock.close()
    raise AssertionError("the request never started generating")


def wait_idle(engine: LLMEngine) -> None:
    for _ in range(3000):
        if not engine.has_unfinished_requests():
            return
        time.sleep(0.01)


@pytest.fixture()
def live_server():
    from forkllm.server.app import ServerConfig, create_app

    aeng = AsyncEngine(tiny_llm(max_model_len=2048).engine)
    srv = LiveServer(create_app(ServerConfig(served_model_name="tiny"), engine=aeng))
    yield srv, aeng.engine
    srv.stop()
    aeng.shutdown()


def test_http_completion_aborted_when_the_client_closes_the_socket(live_server):
    srv, engine = live_server
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1900, "ignore_eos": True}
    req = post_then_leave(srv.port, "/v1/completions", body, engine)
    wait_idle(engine)
    seq = req.seqs[0]
    assert seq.finish_reason == "abort" and seq.num_output_tokens < 1900
    assert_pages_free(engine)


def test_http_scaling_run_aborted_as_a_whole_when_the_client_leaves(live_server):
    srv, engine = live_server
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        "max_tokens": 1500,
        "scaling": {"strategy": "self_consistency", "n": 4},
    }
    req = post_then_leave(srv.port, "/v1/chat/completions", body, engine)
    wait_idle(engine)
    assert len(req.seqs) == 4
    assert {s.finish_reason for s in req.seqs} <= {"abort", "pruned"}
    assert all(s.num_output_tokens < 1500 for s in req.seqs)
    assert not engine.step_hooks  # the policy is no longer driven
    assert_pages_free(engine)


def test_a_new_prompt_goes_ahead_of_a_wide_request_that_has_run_for_a_while():
    """Contended steps hold fair_step_tokens of work, least attained service first: the wide
    request's 8 decode rows (small next to the prompt, but its 4th step) get only what the new
    prompt leaves, and the step stays within the cap (plus the one-token floor)."""
    llm = tiny_llm(max_num_batched_tokens=64, long_prefill_token_threshold=16)
    engine, sched = llm.engine, llm.engine.scheduler
    plans = record_batches(engine)
    wide = SamplingParams(n=8, temperature=1.0, seed=1, max_tokens=20, ignore_eos=True)
    engine.add_request(PROMPT, wide, request_id="wide")
    for _ in range(4):
        engine.step()
    assert per_request(plans[-1]) == {"wide": 8}  # alone: every row, every step
    engine.add_request(list(range(200, 212)), SamplingParams(temperature=0, max_tokens=2), request_id="new")
    engine.step()
    plan = plans[-1]
    new_n = [s.num_new_tokens for s in plan.scheduled if s.seq.request.request_id == "new"]
    assert new_n == [12]  # all of its prompt: it has had no work yet
    wide_rows = per_request(plan)["wide"]
    left = sched.fair_step_cost - sched.cost_at(0, 12)
    assert 1 <= wide_rows < 8
    work = sum(sched.cost_at(s.seq.num_computed_tokens, s.num_new_tokens) for s in plan.scheduled)
    assert work <= sched.fair_step_cost + sched.cost_at(len(PROMPT) + 4, 1)
    row = sched.cost_at(len(PROMPT) + 4, 1)  # every row is 4 tokens past the shared prompt
    assert wide_rows == max(1, int(left // row))
    while engine.has_unfinished_requests():
        engine.step()
    assert_pages_free(engine)
