"""Self-consistency (majority / logprob-weighted vote, adaptive early stop) and best-of-N; either
over plain samples or over thread trees (`threads=spec`, scaling/threaded.py)."""

from __future__ import annotations

import math

from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Sequence
from forkllm.scaling.base import Candidate, Policy, ScaleResult, votes_for
from forkllm.scaling.extract import Extractor, last_number
from forkllm.scaling.scorers import MeanLogprob, Scorer, SelfJudge
from forkllm.scaling.threaded import TreeCandidates, TreeSpec


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
    threads: each sample is a thread tree of this spec (a Fanout, Subtasks or Protocol) and votes
    with its answer; early_stop then stops the trees still running (weighted, converge_tokens and
    budget do not apply to trees and are refused).
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
        threads: TreeSpec | None = None,
    ) -> None:
        super().__init__(temperature, max_tokens, seed, budget, top_p)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if threads is not None:
            for name, unset in (("weighted", not weighted), ("converge_tokens", not converge_tokens)):
                if not unset:
                    raise ValueError(f"SelfConsistency.{name}: does not apply to thread trees; leave it out")
            if budget is not None:
                raise ValueError(
                    "SelfConsistency.budget: does not apply to thread trees (their specs bound them)"
                )
            self.trees = TreeCandidates(threads, self._params(n, logprobs=False), "SelfConsistency")
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
        if self.trees is not None:
            self._advance_trees()
            return
        for s in tree.finished():
            if s.seq_id not in self.answers and s.finish_reason != "pruned":
                self.answers[s.seq_id] = self.extract(s.text)
                tree.note("vote", s, answer=self.answers[s.seq_id])
        if not tree.sampling:
            return
        if self.converge_tokens:
            self._prune_converged()
        if self.early_stop and self._decided(len(tree.live()) + tree.pending):
            self.decided_early = bool(tree.live()) or tree.pending > 0
            self.done = True
            return
        if not tree.live() and not tree.pending:
            self.done = True
            return
        if not tree.enforce_budget():
            self.done = True

    def _advance_trees(self) -> None:
        """Step the thread trees; count each one's answer as it finishes."""
        trees, tree = self.trees, self.tree
        assert trees is not None and tree is not None
        for i, r in trees.step(tree.engine):
            seq = trees.context(i)
            self.answers[seq.seq_id] = self.extract(r.text)
            tree.note("vote", seq, answer=self.answers[seq.seq_id])
        if self.early_stop and trees.running and self._decided(trees.running):
            self.decided_early = self.done = True
        elif not trees.running:
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

    def _decided(self, running: int) -> bool:
        """`running`: samples (or trees) still to come that could vote."""
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
        v1, v2 = counts[0], (counts[1] if len(counts) > 1 else 0)
        if v1 > v2 + running:
            return True  # cannot be overtaken
        return v1 + v2 >= self.min_votes and leader_probability(v1, v2) >= self.confidence

    def result(self) -> ScaleResult:
        tree = self.tree
        assert tree is not None
        by_id = {s.seq_id: s for s in tree.seqs}
        trees = self.trees
        cands = [
            trees.candidate(sid, ans) if trees is not None else Candidate.of(by_id[sid], ans)
            for sid, ans in self.answers.items()
        ]
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
            tree.generated if trees is None else trees.generated,
            self.seconds(),
            tree.forks,
            tree.prunes,
            chosen.seq_id if chosen else None,
            {
                "decided_early": self.decided_early,
                "samples_counted": len(cands),
                **(trees.extra(cands) if trees is not None else {}),
            },
        )


class BestOfN(Policy):
    """n samples (one prefill, n - 1 forks), each scored once finished; the best one wins.
    threads: each sample is a thread tree of this spec, scored by its answer's text (a Verifier
    or RewardModel: a tree's context holds its threads' tokens, not one sample's logprobs, and
    page-joined slots no judge prompt could replay); budget does not apply to trees."""

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
        threads: TreeSpec | None = None,
    ) -> None:
        super().__init__(temperature, max_tokens, seed, budget, top_p)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if threads is not None:
            if scorer is None or scorer.needs_logprobs or isinstance(scorer, SelfJudge):
                raise ValueError(
                    "BestOfN.scorer: thread trees are scored by their answer's text; give a "
                    "Verifier or a RewardModel"
                )
            if budget is not None:
                raise ValueError("BestOfN.budget: does not apply to thread trees (their specs bound them)")
            self.trees = TreeCandidates(threads, self._params(n, logprobs=False), "BestOfN")
        self.n, self.scorer, self.extract = n, scorer or MeanLogprob(), extract
        self.scored: list[tuple[Sequence, float]] = []

    def sampling_params(self) -> SamplingParams:
        return self._params(self.n, logprobs=self.scorer.needs_logprobs)

    def advance(self) -> None:
        tree, trees = self.tree, self.trees
        assert tree is not None
        if trees is not None:
            trees.step(tree.engine)
            if trees.running:
                return
        elif not tree.sampling:
            return
        elif tree.live() or tree.pending:
            tree.enforce_budget()
            return
        if self.job is None:
            if trees is not None:  # each tree's context: its answer's text
                done = [trees.context(i) for i in sorted(trees.results)]
            else:
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
        trees = self.trees
        cands = [
            trees.candidate(s.seq_id, self.extract(s.text), score)
            if trees is not None
            else Candidate.of(s, self.extract(s.text), score)
            for s, score in self.scored
        ]
        best = max(cands, key=lambda c: c.score if c.score is not None else -math.inf, default=None)
        return ScaleResult(
            self.name,
            best.answer if best else None,
            best.text if best else "",
            votes_for(cands),
            cands,
            tree.generated if trees is None else trees.generated,
            self.seconds(),
            tree.forks,
            tree.prunes,
            best.seq_id if best else None,
            trees.extra(cands) if trees is not None else {},
        )
