"""Speculative decoding on the generation tree.

A proposer drafts a few tokens per decoding sequence from text the request already has (its own
prompt and output, its siblings' outputs); the engine verifies every draft in the same forward as
the rest of the batch, one query row per draft token (each row attends to the sequence's context
up to itself, so the C++ decode kernel verifies a chain without a new kernel), and keeps the
longest prefix that passes. Verification samples each row exactly as the engine would have
without speculation (same processing, same per-(seed, step) uniform number) and accepts a draft
token only when the draw equals it: the output is token-for-token what it would have been, at any
temperature. For a deterministic draft this is rejection sampling (accept d with probability
p(d), else draw from p without d), so the acceptance rate is the best one possible for it.
A draft may also be a tree of several guesses (tree.py), each node attending its own ancestors.
"""

from forkllm.engine.spec.decoder import SpecStats, SpeculativeDecoder
from forkllm.engine.spec.proposers import NgramProposer, Proposer, SuffixProposer, make_proposer

__all__ = ["NgramProposer", "Proposer", "SpecStats", "SpeculativeDecoder", "SuffixProposer", "make_proposer"]
