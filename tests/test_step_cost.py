"""Step speed fitted online and the expected time to a new request's first token (engine/step_cost),
the scheduler's view of the work ahead of a newcomer, and the server's --max-expected-ttft shedding."""

from __future__ import annotations

import pytest
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.engine.scheduler import LONG_RUNNING_SHARE_BESIDE_PROMPTS, LONG_RUNNING_STEPS
from forkllm.engine.spec.decoder import StepCost
from forkllm.engine.step_cost import FirstTokenLoad, LinearFit


def test_linear_fit_recovers_base_and_slope_and_waits_for_spread():
    fit = LinearFit()
    for _ in range(20):
        fit.record(10.0, 0.5)  # one x only: no slope can be told
    assert fit.fit() is None
    fit = LinearFit()
    for i in range(5):
        fit.record(float(i * 10), 0.02 + 0.003 * i * 10)
    assert fit.fit() is None  # fewer than 8 samples (counted with decay)
    for i in range(5, 12):
        fit.record(float(i * 10), 0.02 + 0.003 * i * 10)
    base, slope = fit.fit() or (0.0, 0.0)
    assert base == pytest.approx(0.02) and slope == pytest.approx(0.003)


def test_spec_step_cost_is_the_fit_as_a_ratio():
    cost = StepCost(prior=0.5)
    assert cost.ratio() == 0.5
    for rows in range(1, 17):
        cost.record(rows, 0.016 + 0.002 * rows)
    assert cost.ratio() == pytest.approx(0.002 / 0.016)


def test_expected_ttft_by_hand():
    load = FirstTokenLoad(ahead=300.0, per_step=8.0, cap=128.0, base=0.02, slope=0.002)
    # 300 ahead + 20 queued + 50 own = 370 units: ceil(370/128) = 3 steps + half the one in flight,
    # each carrying 8 units besides, plus the 370 units themselves
    assert load.expected_ttft(50.0, 20.0) == pytest.approx(3.5 * (0.02 + 0.002 * 8) + 0.002 * 370)
    assert FirstTokenLoad(0, 0, 128.0, 0.0, 0.0).expected_ttft(50.0) is None  # no fit yet
    uncapped = FirstTokenLoad(ahead=300.0, per_step=0.0, cap=0.0, base=0.02, slope=0.002)
    assert uncapped.expected_ttft(50.0) == pytest.approx(1.5 * 0.02 + 0.002 * 350)


def test_work_ahead_skips_long_running_prompts_but_counts_their_share_of_a_step():
    """A newcomer overtakes a long prompt (long-running, here from the start: skip-join), so its backlog
    is not ahead; only the sixteenth of a step it keeps beside a prompt, and a unit per decode row."""
    llm = tiny_llm(max_num_batched_tokens=64, long_prefill_token_threshold=32)
    engine, sched = llm.engine, llm.engine.scheduler
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request([100 + i for i in range(600)], greedy, request_id="long")
    engine.add_request(
        [7, 8, 9], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), request_id="short"
    )
    long_req = engine.requests["long"]
    for _ in range(3):
        engine.step()  # short's prompt done (now a decode row); long took its small share
    assert engine.requests["short"].seqs[0].num_output_tokens == 3
    engine.add_request([20 + i for i in range(40)], greedy, request_id="fresh")
    ahead, per_step = sched.first_token_work()
    long_seq = long_req.seqs[0]
    long_due = sched.cost_at(long_seq.num_computed_tokens, 600 - long_seq.num_computed_tokens)
    assert ahead == pytest.approx(sched.cost_at(0, 40))
    rows = 1  # short's decode row
    assert per_step == pytest.approx(
        rows + min(long_due, LONG_RUNNING_SHARE_BESIDE_PROMPTS * sched.fair_step_cost)
    )
    load = engine.first_token_load()
    assert (load.ahead, load.per_step, load.cap) == (ahead, per_step, sched.fair_step_cost)
    while engine.has_unfinished_requests():
        engine.step()
    assert sched.first_token_work() == (0.0, 0.0)
    assert engine.step_seconds.n > LONG_RUNNING_STEPS  # every step was timed for the fit
