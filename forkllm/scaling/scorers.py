"""Scorers for best-of-N, beam search and particle filtering.

A scorer turns sequences into numbers (higher is better). Plain scorers answer at once; the
self-judge asks the model itself through extra engine requests, so it returns a job the policy
polls after later steps (the policy never blocks the engine loop).
"""

from __future__ import annotations

import math
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from collections.abc import Sequence as Seq

from forkllm.engine.llm_engine import LLMEngine
from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams
from forkllm.engine.sequence import Request, Sequence
from forkllm.scaling.extract import last_number


class ScoreJob:
    def __init__(self, scores: list[float] | None = None) -> None:
        self._scores = scores

    def done(self) -> bool:
        return self._scores is not None

    def scores(self) -> list[float]:
        assert self._scores is not None
        return self._scores

    def cancel(self) -> None:
        """Abort whatever engine work the job still has in flight (its policy was stopped)."""


class Scorer(ABC):
    needs_logprobs = False  # the policy must request logprobs for its samples

    @abstractmethod
    def submit(self, engine: LLMEngine, question: str, seqs: Seq[Sequence]) -> ScoreJob: ...


class MeanLogprob(Scorer):
    """Mean token logprob of the generated text (the model's own confidence)."""

    needs_logprobs = True

    def submit(self, engine: LLMEngine, question: str, seqs: Seq[Sequence]) -> ScoreJob:
        return ScoreJob(
            [
                s.cumulative_logprob / max(1, s.num_output_tokens) if s.logprobs is not None else 0.0
                for s in seqs
            ]
        )


class Verifier(Scorer):
    """A Python callable `fn(question, text) -> float`, e.g. one that checks arithmetic."""

    def __init__(self, fn: Callable[[str, str], float]) -> None:
        self.fn = fn

    def submit(self, engine: LLMEngine, question: str, seqs: Seq[Sequence]) -> ScoreJob:
        return ScoreJob([float(self.fn(question, s.text)) for s in seqs])


class RewardModel(Scorer):
    """Interface for an external reward model: implement `score(question, texts) -> list[float]`."""

    def score(self, question: str, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def submit(self, engine: LLMEngine, question: str, seqs: Seq[Sequence]) -> ScoreJob:
        return ScoreJob([float(x) for x in self.score(question, [s.text for s in seqs])])


class HFRewardModel(RewardModel):
    """A transformers sequence-classification reward model from a local folder (logit of the
    positive class, or the single logit)."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        self.device = device

    def score(self, question: str, texts: list[str]) -> list[float]:
        with self.torch.inference_mode():
            enc = self.tokenizer(
                [question] * len(texts), texts, return_tensors="pt", padding=True, truncation=True
            )
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
        return (logits[:, -1] if logits.shape[1] > 1 else logits[:, 0]).float().tolist()


class SelfJudge(Scorer):
    """The same model judges a candidate: the log-probability that it answers "Yes" to a judging
    question appended to the candidate's own tokens. The judge request starts with exactly the
    candidate's tokens, so every full page of its KV comes from the prefix cache."""

    def __init__(
        self, question: str = "Is the answer above correct? Reply with Yes or No.", yes: str = "Yes"
    ) -> None:
        self.judge_question = question
        self.yes = yes

    def submit(self, engine: LLMEngine, question: str, seqs: Seq[Sequence]) -> ScoreJob:
        tok = engine.tokenizer
        if tok is None:
            raise ValueError("SelfJudge needs a tokenizer")
        marker = "\u2063FORKLLM\u2063"
        convo = tok.apply_chat_template(
            [
                {"role": "user", "content": question or "."},
                {"role": "assistant", "content": marker},
                {"role": "user", "content": self.judge_question},
            ],
            add_generation_prompt=True,
        )
        suffix = convo[convo.index(marker) + len(marker) :]
        eos = set(engine.eos_token_ids)
        suffix_ids = tok.encode(suffix, add_special_tokens=False)
        yes_id = tok.encode(self.yes, add_special_tokens=False)[0]
        params = SamplingParams(
            temperature=0, max_tokens=1, logprobs=20, output_kind=RequestOutputKind.FINAL_ONLY
        )
        rids = []
        for s in seqs:
            ids = list(s.token_ids)
            while ids and ids[-1] in eos:  # the template's suffix closes the turn itself
                ids.pop()
            rids.append(engine.add_request(ids + suffix_ids, params))
        return _JudgeJob(engine, [engine.requests[r] for r in rids], yes_id)


class _JudgeJob(ScoreJob):
    def __init__(self, engine: LLMEngine, requests: list[Request], yes_id: int) -> None:
        super().__init__(None)
        self.engine = engine
        self.requests = requests
        self.yes_id = yes_id

    def cancel(self) -> None:
        self.engine.abort_request([r.request_id for r in self.requests if not r.finished])

    def done(self) -> bool:
        if self._scores is None and all(r.finished for r in self.requests):
            scores = []
            for r in self.requests:
                pos = r.seqs[0].logprobs[0] if r.seqs[0].logprobs else {}
                scores.append(pos[self.yes_id].logprob if self.yes_id in pos else -30.0)
            self._scores = scores
        return self._scores is not None


# ---- the built-in arithmetic task ---------------------------------------------------------------
_OPS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "x": operator.mul,
    "×": operator.mul,
}
_QUESTION = re.compile(r"(-?\d+)\s*([+\-*x×])\s*(-?\d+)")
_EQUATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*([+\-*x×])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d[\d,]*(?:\.\d+)?)")


def solve_arithmetic(question: str) -> int | None:
    m = _QUESTION.search(question)
    if not m:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return _OPS[op](a, b)


def arithmetic_check(question: str, text: str) -> float:
    """Verifier for the arithmetic task: 1 if the text's final number is the right result."""
    truth = solve_arithmetic(question)
    ans = last_number(text)
    return 1.0 if truth is not None and ans is not None and ans == str(truth) else 0.0


def arithmetic_steps(question: str, text: str) -> float:
    """Step reward (a process reward) for arithmetic reasoning: 0 while every equation written so
    far is right, minus 4 per wrong one; a final-looking number equal to the result earns +1."""
    score = 0.0
    for a, op, b, c in _EQUATION.findall(text):
        try:
            if abs(_OPS[op](float(a), float(b)) - float(c.replace(",", ""))) > 1e-6:  # type: ignore[arg-type]
                score -= 4.0
        except (KeyError, ValueError):
            continue
    truth = solve_arithmetic(question)
    if truth is not None and str(truth) in re.findall(r"-?\d+", text):
        score += 1.0
    return score


def constant_reward(question: str, text: str) -> float:
    """Every step weighs the same: particle filtering degrades to seeded resampling (a task with
    no step reward)."""
    return 0.0


def by_name(name: str) -> Scorer:
    """'mean_logprob', 'self_judge', 'arithmetic' (a verifier) for the CLI and the HTTP API."""
    if name == "mean_logprob":
        return MeanLogprob()
    if name == "self_judge":
        return SelfJudge()
    if name == "arithmetic":
        return Verifier(arithmetic_check)
    raise ValueError(f"scorer must be 'mean_logprob', 'self_judge' or 'arithmetic', got {name!r}")


def softmax(xs: list[float], temperature: float = 1.0) -> list[float]:
    finite = [x for x in xs if x != float("-inf")]
    if not finite:
        return [1.0 / len(xs)] * len(xs)  # every particle impossible: fall back to uniform
    m = max(finite)
    ws = [0.0 if x == float("-inf") else math.exp((x - m) / temperature) for x in xs]
    total = sum(ws)
    return [w / total for w in ws]
