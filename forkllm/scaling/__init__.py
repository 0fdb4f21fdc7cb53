"""Inference-time scaling as policies over the engine's sequence tree.

    from forkllm import LLM
    from forkllm.scaling import SelfConsistency, BestOfN, BeamSearch, ParticleFilter, extract
    r = LLM().scale("What is 17 + 25?", SelfConsistency(n=16, extract=extract.last_number, early_stop=True))
    r.answer, r.votes, r.candidates, r.tokens_generated, r.seconds

Each strategy makes one request (one prefill), forks for samples, prunes losers and pauses
sequences at step boundaries, all from the engine's step hook: the samples of every running
policy (and every other request) share each step's batch.
"""

from forkllm.scaling import extract, scorers
from forkllm.scaling.base import Candidate, Policy, ScaleResult, run_policies
from forkllm.scaling.search import BeamSearch, ParticleFilter
from forkllm.scaling.voting import BestOfN, SelfConsistency

__all__ = [
    "BeamSearch",
    "BestOfN",
    "Candidate",
    "ParticleFilter",
    "Policy",
    "ScaleResult",
    "SelfConsistency",
    "extract",
    "run_policies",
    "scorers",
]
