"""W7's ceilings (forkllm/bench/spec_bound.py): the step-cost curve and what perfect drafts allow."""

from __future__ import annotations

import pytest
from conftest import tiny_llm

from forkllm import SamplingParams
from forkllm.bench.spec_bound import StepRecord, ceiling, cost, marginal, record_steps, step_curve

# a CPU-like curve: flat to 2 rows (weights streamed), then 2 ms a row
CURVE = {1: 0.020, 2: 0.020, 4: 0.024, 8: 0.032, 16: 0.048}


def test_cost_interpolates_and_extends_the_last_slope() -> None:
    assert cost(CURVE, 1) == 0.020
    assert cost(CURVE, 0.5) == 0.020
    assert cost(CURVE, 3) == pytest.approx(0.022)
    assert cost(CURVE, 12) == pytest.approx(0.040)
    assert marginal(CURVE) == pytest.approx(0.002)
    assert cost(CURVE, 32) == pytest.approx(0.080)  # beyond the largest measured: its slope


def test_ceiling_of_a_single_stream_and_of_a_batch() -> None:
    # one stream: 10 decode steps of 1 row (20 ms each) after a 100 ms prompt step
    single = [StepRecord(200, 0, 0.100)] + [StepRecord(0, 1, 0.020)] * 10
    c = ceiling(single, CURVE, 3.0)
    assert c.off_seconds == pytest.approx(0.300)
    assert c.prompt_seconds == pytest.approx(0.100)
    # perfect drafts of mean length 3: a step of 3 rows (22 ms) gives 3 tokens
    assert c.seconds_at_length == pytest.approx(0.100 + 10 * 0.022 / 3)
    assert c.seconds_unlimited == pytest.approx(0.100 + 10 * 0.002)
    # timed from the first token (W7's single stream): the prompt step is on neither side
    d = ceiling(single, CURVE, 3.0, prompts=False)
    assert d.off_seconds == pytest.approx(0.200) and d.prompt_seconds == 0.0
    assert d.speedup_at_length == pytest.approx(0.200 / (10 * 0.022 / 3))
    # a batch of 16 is already on the slope: drafts only save the per-step base
    batch = [StepRecord(0, 16, 0.048)] * 10
    b = ceiling(batch, CURVE, 3.0)
    assert b.speedup_at_length == pytest.approx(0.48 / (10 * 0.112 / 3))  # 48 rows: 112 ms
    assert b.speedup_unlimited == pytest.approx(0.48 / (10 * 16 * 0.002))
    assert "1.29x with perfect drafts" in b.describe()
    assert ceiling(batch, CURVE, 0.5).at_length == 1.0  # no draft accepted: no gain


def test_record_steps_and_step_curve_on_a_tiny_model() -> None:
    llm = tiny_llm()
    eng = llm.engine
    inner = eng.runner.execute
    with record_steps(eng) as log:
        llm.generate([[5, 6, 7, 8]], SamplingParams(n=3, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert eng.runner.execute == inner  # unwrapped again
    assert log[0].prompt_tokens == 4 and log[0].decode_rows == 0
    assert [s.decode_rows for s in log[1:]] == [3, 3, 3]  # the samples fork after the prompt
    assert all(s.seconds > 0 for s in log)
    curve = step_curve(llm, list(range(5, 40)), rows=(1, 2, 4), steps=2)
    assert sorted(curve) == [1, 2, 4] and all(t > 0 for t in curve.values())


def test_proposer_variants_parse_their_options(monkeypatch) -> None:
    """`--proposers suffix-tree3-history0`: options at the end only (a draft model's path may hold
    dashes); an unknown suffix stays part of the name."""
    import forkllm
    from forkllm.bench.spec_bench import _spec_engine

    monkeypatch.setattr(forkllm, "LLM", lambda **kw: kw)
    assert _spec_engine({"seed": 1}, "suffix-tree3-history0") == {
        "seed": 1,
        "speculative": "suffix",
        "speculative_tree_width": 3,
        "speculative_history_tokens": 0,
    }
    assert _spec_engine({}, "suffix-history512") == {
        "speculative": "suffix",
        "speculative_history_tokens": 512,
    }
    assert _spec_engine({}, "/models/small-draft.gguf") == {"speculative": "/models/small-draft.gguf"}
