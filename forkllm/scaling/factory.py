"""Build a policy from a plain dict (HTTP `"scaling": {...}`) or CLI flags."""

from __future__ import annotations

import inspect
from typing import Any

from forkllm.scaling import extract, scorers
from forkllm.scaling.base import Policy
from forkllm.scaling.search import BeamSearch, ParticleFilter
from forkllm.scaling.voting import BestOfN, SelfConsistency

STRATEGIES: dict[str, type[Policy]] = {
    "self_consistency": SelfConsistency,
    "best_of_n": BestOfN,
    "beam_search": BeamSearch,
    "particle_filter": ParticleFilter,
}
_REWARDS = {
    "arithmetic_steps": scorers.arithmetic_steps,
    "arithmetic": scorers.arithmetic_check,
    "constant": scorers.constant_reward,
}


def make_policy(spec: dict[str, Any]) -> Policy:
    """{"strategy": "self_consistency", "n": 16, "extract": "last_number", ...} -> a policy.
    Raises ValueError naming the offending key."""
    if not isinstance(spec, dict):
        raise ValueError('scaling must be an object like {"strategy": "self_consistency", "n": 16}')
    spec = dict(spec)
    name = str(spec.pop("strategy", "")).replace("-", "_")
    if name not in STRATEGIES:
        raise ValueError(f"scaling.strategy must be one of {sorted(STRATEGIES)}, got {name or None!r}")
    cls = STRATEGIES[name]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(spec) - allowed - {"particles"})
    if unknown:
        raise ValueError(
            f"scaling.{unknown[0]} is not a parameter of {name} (known: {', '.join(sorted(allowed))})"
        )
    if "particles" in spec:
        spec["n"] = spec.pop("particles")
    if "extract" in spec:
        spec["extract"] = extract.by_name(str(spec["extract"]))
    if "scorer" in spec:
        spec["scorer"] = scorers.by_name(str(spec["scorer"]))
    if "reward" in spec:
        r = str(spec["reward"])
        if r not in _REWARDS:
            raise ValueError(f"scaling.reward must be one of {sorted(_REWARDS)}, got {r!r}")
        spec["reward"] = _REWARDS[r]
    try:
        return cls(**spec)
    except TypeError as e:
        raise ValueError(f"scaling: {e}") from e
