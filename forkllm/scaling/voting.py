"""Self-consistency (majority / logprob-weighted vote, adaptive early stop) and best-of-N."""

from __future__ import annotations

import math

from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Sequence
from forkllm.scaling.base import Candidate, Policy, ScaleResult, votes_for
from forkllm.scaling.extract import Extractor, last_number
from forkllm.scaling.scorers import MeanLogprob, Scorer


def leader_probability(v1: int, v2: int) -> float:
    """P(p1 > p2) for the two leading answers' shares under a uniform prior: P(X > 1/2) for
    X ~ Beta(v1 + 1, v2 + 1), i.e. P(Binomial(v1 + v2 + 1, 1/2) <= v1) (Adaptive-Consistency's
    Beta stopping rule)."""
    n = v1 + v2 + 1
    return sum(math.comb(n, j) for j in range(v1 + 1)) / 2**n


class SelfConsistency(Policy):
    """n samples of one prompt (one prefill, n - 1 forks), answers extracted, majority vote.

    early_stop: stop sampling once the leading answer cannot be overtaken by the samples still
    running, or once P(leader's share > runner-up's) >= confidence; the running samples are pruned.
    converge_tokens: a running sample whose extracted answer (from its completed lines) stayed the
    same for this many tokens is considered decided: it is pruned and its answer counted
    (Answer-Convergence style; 0 = off).
    weighted: votes weighted by each sample's mean token probability.
    """

    name = "self_consistency"

    def __init__(
        self,
        n: int = 16,
        extract: Extractor = last_number,
        early_stop: bool = False,
        confidence: float = 0.95,
        min_votes: int = 3,
        weighted: bool = False,
        converge_tokens: int = 0,
        temperature: float = 0.8,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int = 0,
        budget: int | None = None,
    ) -> None:
        super().__init__(temperature, max_tokens, seed, budget, top_p)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.extract, self.early_stop = n, extract, early_stop
        self.confidence, self.min_votes, self.weighted = confidence, min_votes, weighted
        self.converge_tokens = converge_tokens
        self.answers: dict[str, str | None] = {}  # seq id -> answer, for counted samples
        self._stable: dict[str, tuple[str | None, int]] = {}
        self.decided_early = False

    def sampling_params(self) -> SamplingParams:
        return self._params(self.n, logprobs=self.weighted)

    def advance(self) -> None:
        tree = self.tree
        assert tree is not None
        for s in tree.finished():
            if s.seq_id not in self.answers and s.finish_reason != "pruned":
                self.answers[s.seq_id] = self.extract(s.text)
                tree.note("vote", s, answer=self.answers[s.seq_id])
        if not tree.sampling:
            return
        if self.converge_tokens:
            self._prune_converged()
        if self.early_stop and self._decided():
            self.decided_early = bool(tree.live()) or tree.pending > 0
            self.done = True
            return
        if not tree.live() and not tree.pending:
            self.done = True
            return
        if not tree.enforce_budget():
            self.done = True

    def _prune_converged(self) -> None:
        tree = self.tree
        assert tree is not None
        for s in tree.live():
            text = s.text
            complete = text[: text.rfind("\n") + 1] if "\n" in text else ""
            ans = self.extract(complete) if complete else None
            seen, since = self._stable.get(s.seq_id, (None, s.num_output_tokens))
            if ans is None or ans != seen:
                self._stable[s.seq_id] = (ans, s.num_output_tokens)
            elif s.num_output_tokens - since >= self.converge_tokens:
                self.answers[s.seq_id] = ans
                tree.note("vote", s, answer=ans)
                tree.prune(s)

    def _decided(self) -> bool:
        counts = sorted(
            (
                sum(1 for a in self.answers.values() if a == ans)
                for ans in set(self.answers.values())
                if ans is not None
            ),
            reverse=True,
        )
        if not counts:
            return False
        assert self.tree is not None
        running = len(self.tree.live()) + self.tree.pending  # samples still to come could vote
        v1, v2 = counts[0], (counts[1] if len(counts) > 1 else 0)
        if v1 > v2 + running:
            return True  # cannot be overtaken
        return v1 + v2 >= self.min_votes and leader_probability(v1, v2) >= self.confidence

    def result(self) -> ScaleResult:
        tree = self.tree
        assert tree is not None
        by_id = {s.seq_id: s for s in tree.seqs}
        cands = []
        for sid, ans in self.answers.items():
            cands.append(Candidate.of(by_id[sid], ans))
        weights = (
            [math.exp(c.mean_logprob) if c.mean_logprob is not None else 1.0 for c in cands]
            if self.weighted
            else None
        )
        votes = votes_for(cands, weights)
        answer = next(iter(votes), None)
        chosen = next((c for c in cands if c.answer == answer), None)
        return ScaleResult(
            self.name,
            answer,
            chosen.text if chosen else "",
            votes,
            cands,
            tree.generated,
            self.seconds(),
            tree.forks,
            tree.prunes,
            chosen.seq_id if chosen else None,
            {"decided_early": self.decided_early, "samples_counted": len(cands)},
        )


class BestOfN(Policy):
    """n samples (one prefill, n - 1 forks), each scored once finished; the best one wins."""

    name = "best_of_n"

    def __init__(
        self,
        n: int = 16,
        scorer: Scorer | None = None,
        extract: Extractor = last_number,
        temperature: float = 0.8,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int = 0,
        budget: int | None = None,
    ) -> None:
        super().__init__(temperature, max_tokens, seed, budget, top_p)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.scorer, self.extract = n, scorer or MeanLogprob(), extract
        self.scored: list[tuple[Sequence, float]] = []

    def sampling_params(self) -> SamplingParams:
        return self._params(self.n, logprobs=self.scorer.needs_logprobs)

    def advance(self) -> None:
        tree = self.tree
        assert tree is not None
        if not tree.sampling:
            return
        if tree.live() or tree.pending:
            tree.enforce_budget()
            return
        if self.job is None:
            done = [s for s in tree.finished() if s.num_output_tokens > 0]
            self.job = self.scorer.submit(tree.engine, self.question, done)
            self._pending = done
        if self.job.done():
            self.scored = list(zip(self._pending, self.job.scores()))
            for s, score in self.scored:
                tree.note("score", s, score)
            self.done = True

    def result(self) -> ScaleResult:
        tree = self.tree
        assert tree is not None
        cands = [Candidate.of(s, self.extract(s.text), score) for s, score in self.scored]
        best = max(cands, key=lambda c: c.score if c.score is not None else -math.inf, default=None)
        return ScaleResult(
            self.name,
            best.answer if best else None,
            best.text if best else "",
            votes_for(cands),
            cands,
            tree.generated,
            self.seconds(),
            tree.forks,
            tree.prunes,
            best.seq_id if best else None,
        )
