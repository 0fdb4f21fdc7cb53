"""Step-level search over the sequence tree: beam search and particle filtering.

A step ends at a delimiter in the newly generated text (or after max_step_tokens). A sequence
that completes its step is paused (it keeps its pages); once no sequence of the tree is still
generating, the policy scores the frontier and decides: survivors are forked (they share every
page), losers are pruned, and the next step starts, all inside the engine's batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from forkllm.engine.policy import TreeRun
from forkllm.engine.sampler import derive_seed
from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Sequence, SequenceStatus
from forkllm.scaling.base import Candidate, Policy, ScaleResult, votes_for
from forkllm.scaling.extract import Extractor, last_number
from forkllm.scaling.scorers import MeanLogprob, Scorer, arithmetic_steps, softmax


class _Stepper:
    """Tracks where each sequence's current step began and pauses it when the step is complete."""

    def __init__(self, delimiter: str, max_step_tokens: int) -> None:
        self.delimiter = delimiter
        self.max_step_tokens = max_step_tokens
        self.start_text: dict[str, int] = {}
        self.start_tokens: dict[str, int] = {}

    def begin(self, seq: Sequence) -> None:
        self.start_text[seq.seq_id] = len(seq.text)
        self.start_tokens[seq.seq_id] = seq.num_output_tokens

    def pause_completed(self, tree: TreeRun) -> None:
        for s in tree.live():
            if s.seq_id not in self.start_text:
                self.begin_at_zero(s)
            new = s.text[self.start_text[s.seq_id] :]
            # A step ends at the first delimiter, as `stop=[delimiter]` ends an API request (so a
            # blank line is a step of its own, exactly as in outside-driven search).
            steps_done = self.delimiter in new
            too_long = s.num_output_tokens - self.start_tokens[s.seq_id] >= self.max_step_tokens
            if steps_done or too_long:
                tree.pause(s)

    def begin_at_zero(self, seq: Sequence) -> None:
        self.start_text[seq.seq_id] = 0
        self.start_tokens[seq.seq_id] = 0


class BeamSearch(Policy):
    """Step-level beam search: expand each beam into `expand` continuations up to the delimiter
    (default a blank line), score them, keep the best `width`, fork again."""

    name = "beam_search"

    def __init__(
        self,
        width: int = 4,
        expand: int = 4,
        scorer: Scorer | None = None,
        delimiter: str = "\n\n",
        extract: Extractor = last_number,
        max_steps: int = 8,
        max_step_tokens: int = 128,
        temperature: float = 0.8,
        max_tokens: int = 512,
        seed: int = 0,
        budget: int | None = None,
    ) -> None:
        super().__init__(temperature, max_tokens, seed, budget)
        if width < 1 or expand < 1:
            raise ValueError("width and expand must be >= 1")
        self.width, self.expand, self.scorer = width, expand, scorer or MeanLogprob()
        self.extract, self.max_steps = extract, max_steps
        self.stepper = _Stepper(delimiter, max_step_tokens)
        self.steps = 0
        self.frontier: list[Sequence] = []
        self.finals: list[tuple[Sequence, float]] = []
        self.partials: list[tuple[Sequence, float]] = []
        self.scored_finished: set[str] = set()

    def sampling_params(self) -> SamplingParams:
        return self._params(self.expand, logprobs=self.scorer.needs_logprobs)

    def advance(self) -> None:
        tree = self.tree
        assert tree is not None
        if not tree.sampling:
            return
        self.stepper.pause_completed(tree)
        if tree.live() or tree.pending:  # samples over the batch share come in later waves
            if not tree.enforce_budget():
                self._stop()
            return
        if self.job is None:
            new_finished = [
                s
                for s in tree.finished()
                if s.seq_id not in self.scored_finished and s.finish_reason != "pruned"
            ]
            self.frontier = tree.paused() + new_finished
            self.job = self.scorer.submit(tree.engine, self.question, self.frontier)
        if not self.job.done():
            return
        ranked = sorted(zip(self.frontier, self.job.scores()), key=lambda x: -x[1])
        for s, score in ranked:
            tree.note("score", s, score)
        self.job = None
        self.steps += 1
        survivors = []
        for rank, (s, score) in enumerate(ranked):
            if s.finished:
                self.scored_finished.add(s.seq_id)
                self.finals.append((s, score))
            elif rank < self.width:
                survivors.append((s, score))
            else:
                self.partials.append((s, score))
                tree.prune(s)
        spent = tree.budget is not None and tree.generated >= tree.budget
        if not survivors or self.steps >= self.max_steps or spent:
            self.partials += survivors
            self._stop()
            return
        for i, (s, _) in enumerate(survivors):
            seeds = [
                derive_seed(self.seed, 1000 * self.steps + self.expand * i + j + 1)
                for j in range(self.expand)
            ]
            for kid in tree.fork(s, self.expand, seeds):
                self.stepper.begin(kid)
            tree.prune(s)
        tree.enforce_budget()

    def _stop(self) -> None:
        self.done = True

    def result(self) -> ScaleResult:
        tree = self.tree
        assert tree is not None
        pool = self.finals or self.partials
        cands = [Candidate.of(s, self.extract(s.text), score) for s, score in pool]
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
            {"steps": self.steps},
        )


@dataclass
class Particle:
    seq: Sequence
    weight: float = 0.0

    @property
    def finished(self) -> bool:
        return self.seq.finished


class ParticleFilter(Policy):
    """Particle filtering for inference-time scaling (Puri et al.): particles advance one step
    (default: one line), are weighted by a step reward, and are resampled by the softmax of their
    weights: survivors are forked once per draw (the first draw keeps the particle itself), the
    rest pruned, until every particle has finished. The answer is the best-weighted finished
    particle's. Resampling is seeded; a particle whose reward is -inf is never drawn."""

    name = "particle_filter"

    def __init__(
        self,
        n: int = 16,
        reward: Callable[[str, str], float] = arithmetic_steps,
        delimiter: str = "\n",
        extract: Extractor = last_number,
        resample_temperature: float = 1.0,
        max_steps: int = 24,
        max_step_tokens: int = 64,
        temperature: float = 0.8,
        max_tokens: int = 256,
        seed: int = 0,
        budget: int | None = None,
    ) -> None:
        super().__init__(temperature, max_tokens, seed, budget)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.reward, self.extract = n, reward, extract
        self.resample_temperature, self.max_steps = resample_temperature, max_steps
        self.stepper = _Stepper(delimiter, max_step_tokens)
        self.population: list[Particle] = []
        self.steps = 0
        self.history: list[list[float]] = []  # normalised weights per resampling step

    def sampling_params(self) -> SamplingParams:
        return self._params(self.n, logprobs=False)

    def advance(self) -> None:
        tree = self.tree
        assert tree is not None
        if not tree.sampling:
            return
        self.stepper.pause_completed(tree)
        if tree.live() or tree.pending:  # samples over the batch share come in later waves
            if not tree.enforce_budget():
                self.done = True
            return
        if not self.population:
            self.population = [Particle(s) for s in tree.seqs]
        for p in self.population:
            if p.seq.status is SequenceStatus.PAUSED or (p.finished and p.seq.finish_reason != "pruned"):
                p.weight = float(self.reward(self.question, p.seq.text))
                tree.note("score", p.seq, p.weight)
        self.steps += 1
        spent = tree.budget is not None and tree.generated >= tree.budget
        if all(p.finished for p in self.population) or self.steps >= self.max_steps or spent:
            self.done = True
            return
        self._resample(tree)
        tree.enforce_budget()

    def resample_counts(self, weights: list[float]) -> list[int]:
        """How many copies of each particle the next population holds (n draws, seeded)."""
        probs = softmax(weights, self.resample_temperature)
        self.history.append(probs)
        rng = random.Random(derive_seed(self.seed, 7919 * self.steps + 17))
        counts = [0] * len(weights)
        for i in rng.choices(range(len(weights)), weights=probs, k=self.n):
            counts[i] += 1
        return counts

    def _resample(self, tree: TreeRun) -> None:
        counts = self.resample_counts([p.weight for p in self.population])
        nxt: list[Particle] = []
        for i, (p, c) in enumerate(zip(self.population, counts)):
            if p.finished:
                nxt += [Particle(p.seq, p.weight) for _ in range(c)]  # finished copies cost nothing
                continue
            if c == 0:
                tree.prune(p.seq)
                continue
            tree.resume(p.seq)
            self.stepper.begin(p.seq)
            nxt.append(Particle(p.seq, p.weight))
            if c > 1:
                seeds = [derive_seed(self.seed, 100_003 * self.steps + 131 * i + j) for j in range(1, c)]
                for kid in tree.fork(p.seq, c - 1, seeds):
                    self.stepper.begin(kid)
                    nxt.append(Particle(kid, p.weight))
        self.population = nxt

    def result(self) -> ScaleResult:
        tree = self.tree
        assert tree is not None
        seen: dict[str, Particle] = {}
        for p in self.population:
            seen.setdefault(p.seq.seq_id, p)
        cands = [Candidate.of(p.seq, self.extract(p.seq.text), p.weight) for p in seen.values()]
        probs = (
            softmax([p.weight for p in self.population], self.resample_temperature) if self.population else []
        )
        votes: dict[str, float] = {}
        for p, w in zip(self.population, probs):
            a = self.extract(p.seq.text)
            if a is not None:
                votes[a] = votes.get(a, 0.0) + w
        votes = dict(sorted(votes.items(), key=lambda kv: -kv[1]))
        finished = [c for c in cands if c.finish_reason not in (None, "pruned")] or cands
        best = max(finished, key=lambda c: c.score if c.score is not None else -math.inf, default=None)
        return ScaleResult(
            self.name,
            best.answer if best else None,
            best.text if best else "",
            votes,
            cands,
            tree.generated,
            self.seconds(),
            tree.forks,
            tree.prunes,
            best.seq_id if best else None,
            {"steps": self.steps, "weights": self.history},
        )


__all__ = ["BeamSearch", "ParticleFilter", "Particle", "votes_for"]
