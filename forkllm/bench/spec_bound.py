"""What speculation could gain at most on this machine, from its own step costs (W7's ceilings).

A drafted sequence adds one query row per draft token to the step. Where a step's cost grows with
its rows (a CPU's matmuls are compute-bound from a few rows), the gain is capped whatever the
proposer: perfect drafts that are all accepted turn a decode step of r rows, each giving one
token, into a step of r x L rows giving L tokens each, so a run's decode part costs
sum f(r x L) / L instead of sum f(r), where f is the step time by rows measured here. Steps that
compute prompt tokens are counted as they were (speculation does not shorten them). The ceiling at
the mean accepted length a proposer reached, and with unlimited perfect drafts (each row at the
marginal cost of the largest batch measured), bound what any proposer or cost model could reach.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

CURVE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class StepRecord:
    prompt_tokens: int  # tokens of multi-token chunks (prompts) in the step
    decode_rows: int  # single-token rows
    seconds: float


@contextmanager
def record_steps(engine: Any) -> Iterator[list[StepRecord]]:
    """Every model step the engine runs inside the block: its prompt tokens, decode rows, time."""
    inner = engine.runner.execute
    steps: list[StepRecord] = []

    def execute(sched: Any) -> Any:
        prompt = sum(s.num_new_tokens for s in sched.scheduled if s.num_new_tokens > 1 and not s.draft)
        rows = sum(1 for s in sched.scheduled if s.num_new_tokens == 1)
        t0 = time.perf_counter()
        out = inner(sched)
        steps.append(StepRecord(prompt, rows, time.perf_counter() - t0))
        return out

    engine.runner.execute = execute
    try:
        yield steps
    finally:
        engine.runner.execute = inner


def step_curve(
    llm: Any, prompt_ids: list[int], rows: tuple[int, ...] = CURVE_ROWS, steps: int = 8
) -> dict[int, float]:
    """Median seconds of a decode step of r rows (r samples of one prompt, after two warm-up steps)."""
    from forkllm import SamplingParams

    eng = llm.engine
    curve: dict[int, float] = {}
    for r in rows:
        sp = SamplingParams(n=r, temperature=1.0, seed=0, max_tokens=steps + 3, ignore_eos=True)
        eng.add_request(prompt_ids, sp)
        with record_steps(eng) as log:
            while eng.has_unfinished_requests():
                eng.step()
        times = sorted(s.seconds for s in log if not s.prompt_tokens and s.decode_rows == r)[: steps + 1]
        curve[r] = times[len(times) // 2]
    return curve


def cost(curve: dict[int, float], rows: float) -> float:
    """Step seconds at `rows` rows: linear between measured sizes, the last segment's slope beyond."""
    xs = sorted(curve)
    if rows <= xs[0]:
        return curve[xs[0]]
    i = min(bisect.bisect_left(xs, rows), len(xs) - 1)
    a, b = xs[i - 1], xs[i]
    return curve[a] + (curve[b] - curve[a]) * (rows - a) / (b - a)


def marginal(curve: dict[int, float]) -> float:
    """Seconds one more row adds at the largest batch measured."""
    xs = sorted(curve)
    a, b = xs[-2], xs[-1]
    return (curve[b] - curve[a]) / (b - a)


@dataclass(frozen=True)
class Ceiling:
    off_seconds: float  # the run as measured (model steps only)
    prompt_seconds: float  # of which steps computing prompt tokens
    at_length: float  # the mean accepted length the bound assumes
    seconds_at_length: float  # the run with perfect drafts of that length
    seconds_unlimited: float  # ... of unlimited length

    @property
    def speedup_at_length(self) -> float:
        return self.off_seconds / self.seconds_at_length

    @property
    def speedup_unlimited(self) -> float:
        return self.off_seconds / self.seconds_unlimited

    def describe(self) -> str:
        return (
            f"ceiling on this machine: {self.speedup_at_length:.2f}x with perfect drafts of the measured mean "
            f"length {self.at_length:.2f}, {self.speedup_unlimited:.2f}x with unlimited ones "
            f"(model steps {self.off_seconds:.2f} s, {self.prompt_seconds:.2f} s of them computing prompts)"
        )


def ceiling(steps: list[StepRecord], curve: dict[int, float], length: float, prompts: bool = True) -> Ceiling:
    """The bound of a run without speculation (its steps) at mean accepted length `length`.
    `prompts=False` for a speed timed from each first token (W7's single stream): the steps
    computing prompts are left out of both sides, as they are of the speed (counting them
    understated that bound: 1.61x printed where decode alone allowed 1.83x)."""
    prompt = sum(s.seconds for s in steps if s.prompt_tokens) if prompts else 0.0
    decode = [s for s in steps if not s.prompt_tokens and s.decode_rows]
    off = prompt + sum(s.seconds for s in decode)
    length = max(1.0, length)
    at = prompt + sum(cost(curve, s.decode_rows * length) / length for s in decode)
    unlimited = prompt + sum(s.decode_rows * marginal(curve) for s in decode)
    return Ceiling(off, prompt, length, at, unlimited)
