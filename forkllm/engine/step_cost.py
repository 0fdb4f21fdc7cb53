"""What a step costs in seconds, fitted online, and what a new request's first token would cost.

The scheduler plans in work units (`Scheduler.cost_at`: tokens weighted by their attention
context); the machine turns them into seconds at its own speed (a 2-core CPU computes ~500 prompt
tokens a second, a GPU tens of thousands). `LinearFit` learns `seconds = base + slope x units`
from the steps the engine runs, so a time limit (the server's `--max-expected-ttft`) means the same
on every machine. Pure: the engine records, the server reads a published snapshot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class LinearFit:
    """y = base + slope * x by least squares with exponential decay (recent samples weigh most).
    No fit until x has varied (standard deviation >= `min_spread`) over `min_samples` samples,
    nor when the fit is not positive (noise over a narrow range)."""

    def __init__(self, decay: float = 0.98, min_samples: int = 8, min_spread: float = 2.0) -> None:
        self.decay, self.min_samples, self.min_spread = decay, min_samples, min_spread
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def record(self, x: float, y: float) -> None:
        d = self.decay
        self.n = self.n * d + 1
        self.sx = self.sx * d + x
        self.sy = self.sy * d + y
        self.sxx = self.sxx * d + x * x
        self.sxy = self.sxy * d + x * y

    def fit(self) -> tuple[float, float] | None:
        """(base, slope), or None while there is no usable fit."""
        var = self.n * self.sxx - self.sx * self.sx
        if self.n < self.min_samples or var < (self.min_spread * self.n) ** 2:
            return None
        slope = (self.n * self.sxy - self.sx * self.sy) / var
        base = (self.sy - slope * self.sx) / self.n
        if slope <= 0 or base <= 0:
            return None
        return base, slope


@dataclass(frozen=True)
class FirstTokenLoad:
    """What stands before a new request's first token, as the engine thread last saw it.

    `ahead` is the prompt work (units) of requests still waiting for their first token that a
    newcomer does not overtake (the scheduler serves least attained service first, so a
    long-running prompt's backlog is not ahead, only its share of each step: `per_step`, with one
    unit per decode row riding along). `cap` is a step's most work (0: no cap)."""

    ahead: float
    per_step: float
    cap: float
    base: float  # seconds of a step with no work (0: no fit yet)
    slope: float  # seconds per unit

    def expected_ttft(self, prompt_units: float, queued_units: float = 0.0) -> float | None:
        """Seconds until a new prompt of `prompt_units` gets its first token, behind `queued_units`
        handed to the engine but not yet taken in; None before the engine has a fit."""
        if self.slope <= 0:
            return None
        work = self.ahead + queued_units + prompt_units
        steps = (math.ceil(work / self.cap) if self.cap else 1) + 0.5  # plus half the step in flight
        return steps * (self.base + self.slope * self.per_step) + self.slope * work
