"""Evaluation of scaling strategies: a seeded arithmetic task and GSM8K-format JSONL files.

`forkllm eval` runs every (strategy, budget) pair over the questions, all questions of a pair as
one batch of policies sharing the engine, and reports accuracy, generated tokens and time, with a
PNG plot of accuracy against generated tokens per question.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkllm.scaling import scorers
from forkllm.scaling.base import Policy
from forkllm.scaling.extract import last_number, normalize_number
from forkllm.scaling.search import BeamSearch, ParticleFilter
from forkllm.scaling.voting import BestOfN, SelfConsistency

INSTRUCTION = "Solve it step by step, one short line per step, and end with the final number."


@dataclass
class Problem:
    question: str
    answer: str


def arithmetic_task(count: int, seed: int = 0) -> list[Problem]:
    """Two-operand integer problems ("What is 17 + 25?"), seeded."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        op = rng.choice(["+", "-", "+", "*"])
        a, b = (
            (rng.randint(2, 99), rng.randint(2, 99))
            if op != "*"
            else (rng.randint(2, 19), rng.randint(2, 12))
        )
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(Problem(f"What is {a} {op} {b}?", str(value)))
    return out


def gsm8k_file(path: str | Path, count: int | None = None) -> list[Problem]:
    """JSONL lines with "question" and "answer" ending in "#### <number>"."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "question" not in row or "answer" not in row:
                raise ValueError(f"{path}:{i + 1}: each line needs 'question' and 'answer'")
            gold = str(row["answer"]).split("####")[-1].strip()
            out.append(Problem(row["question"], normalize_number(gold)))
            if count is not None and len(out) >= count:
                break
    return out


STRATEGY_NAMES = (
    "greedy",
    "self-consistency",
    "self-consistency-early",
    "best-of-n",
    "beam-search",
    "particle-filter",
)


def policy_for(
    name: str, budget: int, task: str, max_tokens: int, seed: int, tokens_per_sample: int | None = None
) -> Policy:
    """One (fresh) policy for a strategy name at a sample budget (n, particles, beams x expand).

    With `tokens_per_sample`, every strategy also gets the same exact token budget
    (budget x tokens_per_sample), so strategies are compared at equal generated tokens."""
    tokens = budget * tokens_per_sample if tokens_per_sample else None
    verifier = scorers.Verifier(scorers.arithmetic_check) if task == "arithmetic" else scorers.MeanLogprob()
    reward = scorers.arithmetic_steps if task == "arithmetic" else (lambda q, t: 0.0)
    if name == "greedy":
        return SelfConsistency(n=1, temperature=0.0, max_tokens=max_tokens, seed=seed, budget=tokens)
    if name == "self-consistency":
        return SelfConsistency(n=budget, max_tokens=max_tokens, seed=seed, budget=tokens)
    if name == "self-consistency-early":
        return SelfConsistency(n=budget, early_stop=True, max_tokens=max_tokens, seed=seed, budget=tokens)
    if name == "best-of-n":
        return BestOfN(n=budget, scorer=verifier, max_tokens=max_tokens, seed=seed, budget=tokens)
    if name == "beam-search":
        width = max(1, int(budget**0.5))
        return BeamSearch(
            width=width,
            expand=max(1, budget // width),
            delimiter="\n",
            max_step_tokens=48,
            max_tokens=max_tokens,
            seed=seed,
            scorer=scorers.MeanLogprob(),
            budget=tokens,
        )
    if name == "particle-filter":
        return ParticleFilter(n=budget, reward=reward, max_tokens=max_tokens, seed=seed, budget=tokens)
    raise ValueError(f"strategy must be one of {', '.join(STRATEGY_NAMES)}, got {name!r}")


def evaluate(
    llm: Any, problems: list[Problem], make: Callable[[], Policy], batch: int = 32
) -> dict[str, Any]:
    t0 = time.perf_counter()
    correct, tokens = 0, 0
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        results = llm.scale_batch([f"{p.question} {INSTRUCTION}" for p in chunk], [make() for _ in chunk])
        for p, r in zip(chunk, results):
            correct += int(r.answer is not None and r.answer == p.answer)
            tokens += r.tokens_generated
    seconds = time.perf_counter() - t0
    return {
        "accuracy": correct / len(problems),
        "tokens_per_question": tokens / len(problems),
        "seconds": seconds,
    }


def run_eval(args: Any) -> int:
    from forkllm.api import LLM
    from forkllm.cli import engine_kwargs

    problems = (
        arithmetic_task(args.num_questions, args.task_seed)
        if args.task == "arithmetic"
        else gsm8k_file(args.data, args.num_questions)
    )
    if not problems:
        raise ValueError("no questions to evaluate")
    llm = LLM(**engine_kwargs(args))
    budgets = [int(b) for b in args.budgets.split(",")]
    names = [s.strip() for s in args.strategy.split(",")]
    rows = []
    for name in names:
        for b in [1] if name == "greedy" else budgets:
            res = evaluate(
                llm,
                problems,
                lambda name=name, b=b: policy_for(
                    name, b, args.task, args.max_tokens, args.sample_seed, args.tokens_per_sample
                ),
                args.batch,
            )
            rows.append({"strategy": name, "budget": b, **res})
            print(
                f"{name:>24} budget {b:>3}: accuracy {res['accuracy']:.3f}, {res['tokens_per_question']:.0f} "
                f"tokens/question, {res['seconds']:.1f}s",
                flush=True,
            )
    cap = f"; token budget {args.tokens_per_sample} x samples per question" if args.tokens_per_sample else ""
    md = (
        f"## forkllm eval: {args.task}, {len(problems)} questions, model {llm.engine.load_info.source}{cap}\n\n"
        "| strategy | budget (samples) | accuracy | generated tokens / question | seconds |\n|---|---|---|---|---|\n"
    )
    for r in rows:
        md += (
            f"| {r['strategy']} | {r['budget']} | {r['accuracy']:.3f} | {r['tokens_per_question']:.0f} | "
            f"{r['seconds']:.1f} |\n"
        )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = out / f"eval-{args.task}-{stamp}.png"
    _plot(rows, png, f"{args.task}: accuracy vs generated tokens ({len(problems)} questions)")
    md += f"\n![accuracy vs tokens]({png.name})\n"
    (out / f"eval-{args.task}-{stamp}.md").write_text(md)
    (out / f"eval-{args.task}-{stamp}.json").write_text(json.dumps(rows, indent=2))
    print("\n" + md)
    print(f"saved {out / f'eval-{args.task}-{stamp}.md'} and {png}")
    return 0


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r["strategy"] for r in rows):
        pts = [r for r in rows if r["strategy"] == name]
        ax.plot([r["tokens_per_question"] for r in pts], [r["accuracy"] for r in pts], "o-", label=name)
        for r in pts:
            ax.annotate(
                str(r["budget"]),
                (r["tokens_per_question"], r["accuracy"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
            )
    ax.set(xscale="log", xlabel="generated tokens per question (log)", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def solve(args: Any) -> int:
    from forkllm.api import LLM
    from forkllm.cli import engine_kwargs
    from forkllm.scaling import extract
    from forkllm.scaling.factory import make_policy

    spec: dict[str, Any] = {
        "strategy": args.strategy.replace("-", "_"),
        "seed": args.sample_seed,
        "max_tokens": args.max_tokens,
        "extract": args.extract,
    }
    if args.strategy.replace("-", "_") == "beam_search":
        spec.update(width=args.width, expand=args.n)
    else:
        spec["n"] = args.n
    if args.early_stop:
        spec["early_stop"] = True
    if args.scorer:
        spec["scorer"] = args.scorer
    if args.budget:
        spec["budget"] = args.budget
    policy = make_policy(spec)
    extract.by_name(args.extract)
    r = LLM(**engine_kwargs(args)).scale(args.question, policy)
    print(r.text.strip())
    print(f"\nanswer: {r.answer}   votes: {dict(list(r.votes.items())[:8])}")
    print(
        f"{r.strategy}: {len(r.candidates)} candidates, {r.tokens_generated} tokens generated, {r.forks} forks, "
        f"{r.prunes} prunes, {r.seconds:.2f}s"
    )
    return 0


__all__ = [
    "Problem",
    "arithmetic_task",
    "gsm8k_file",
    "evaluate",
    "policy_for",
    "run_eval",
    "solve",
    "last_number",
]
