"""`forkllm eval` and `forkllm solve`: scaling strategies on a task, with a table and a plot.

`forkllm eval` runs every (strategy, budget) pair over the questions, all questions of a pair as
one batch of policies sharing the engine, and reports accuracy, generated tokens and time, with a
PNG plot of accuracy against generated tokens per question. Strategies are built by the one
registry in scaling/factory.py; this module only adds the eval presets (greedy, early stop, the
budget-to-shape rules of beam search).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forkllm.api import LLM
from forkllm.engine.args import add_engine_args, engine_kwargs
from forkllm.scaling import extract
from forkllm.scaling.base import Policy
from forkllm.scaling.factory import STRATEGIES, make_policy
from forkllm.scaling.tasks import INSTRUCTION, Problem, arithmetic_task, gsm8k_file

# Eval presets on top of the registry's strategies (names with '-' or '_' both work).
PRESETS = ("greedy", "self_consistency_early")
STRATEGY_NAMES = (*PRESETS, *STRATEGIES)


def canonical(name: str) -> str:
    key = name.strip().replace("-", "_")
    if key not in STRATEGY_NAMES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGY_NAMES)}, got {name!r}")
    return key


def policy_spec(
    name: str, budget: int, task: str, max_tokens: int, seed: int, tokens_per_sample: int | None = None
) -> dict[str, Any]:
    """The make_policy spec of a strategy at a sample budget (n, particles, beams x expand).

    With `tokens_per_sample`, every strategy also gets the same exact token budget
    (budget x tokens_per_sample), so strategies are compared at equal generated tokens."""
    key = canonical(name)
    spec: dict[str, Any] = {"max_tokens": max_tokens, "seed": seed}
    if tokens_per_sample:
        spec["budget"] = budget * tokens_per_sample
    arithmetic = task == "arithmetic"
    if key == "greedy":
        return {**spec, "strategy": "self_consistency", "n": 1, "temperature": 0.0}
    if key == "self_consistency_early":
        return {**spec, "strategy": "self_consistency", "n": budget, "early_stop": True}
    if key == "best_of_n":
        return {
            **spec,
            "strategy": key,
            "n": budget,
            "scorer": "arithmetic" if arithmetic else "mean_logprob",
        }
    if key == "beam_search":
        width = max(1, int(budget**0.5))
        return {
            **spec,
            "strategy": key,
            "width": width,
            "expand": max(1, budget // width),
            "delimiter": "\n",
            "max_step_tokens": 48,
            "scorer": "mean_logprob",
        }
    if key == "particle_filter":
        return {
            **spec,
            "strategy": key,
            "n": budget,
            "reward": "arithmetic_steps" if arithmetic else "constant",
        }
    return {**spec, "strategy": key, "n": budget}


def policy_for(
    name: str, budget: int, task: str, max_tokens: int, seed: int, tokens_per_sample: int | None = None
) -> Policy:
    """One fresh policy for a strategy name at a sample budget (see policy_spec)."""
    return make_policy(policy_spec(name, budget, task, max_tokens, seed, tokens_per_sample))


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


def run_eval(args: argparse.Namespace) -> int:
    if args.task == "gsm8k" and not args.data:
        raise ValueError("--task gsm8k needs --data FILE.jsonl")

    problems = (
        arithmetic_task(args.num_questions, args.task_seed)
        if args.task == "arithmetic"
        else gsm8k_file(args.data, args.num_questions)
    )
    if not problems:
        raise ValueError("no questions to evaluate")
    llm = LLM(**engine_kwargs(args))
    budgets = [int(b) for b in args.budgets.split(",")]
    names = [canonical(s) for s in args.strategy.split(",")]
    rows = []
    for name in names:
        for b in [1] if name == "greedy" else budgets:
            res = evaluate(llm, problems, _maker(name, b, args), args.batch)
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


def _maker(name: str, budget: int, args: argparse.Namespace) -> Callable[[], Policy]:
    return lambda: policy_for(
        name, budget, args.task, args.max_tokens, args.sample_seed, args.tokens_per_sample
    )


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


def solve(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {
        "strategy": args.strategy,
        "seed": args.sample_seed,
        "max_tokens": args.max_tokens,
        "extract": args.extract,
    }
    if args.strategy == "beam_search":
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


def add_eval_parsers(sub: Any) -> None:
    """The `solve` and `eval` subcommands."""
    sv = sub.add_parser(
        "solve",
        help="answer one question with an inference-time scaling strategy, in-engine",
        description="Self-consistency, best-of-N, beam search or particle filtering run inside "
        "the engine (one prefill, forks for samples, prunes for losers).",
    )
    sv.add_argument("question")
    sv.add_argument(
        "--strategy",
        default="self_consistency",
        type=canonical,
        help=f"one of {', '.join(STRATEGIES)} ('-' or '_')",
    )
    sv.add_argument("--n", type=int, default=16, help="samples / particles / expansions per beam")
    sv.add_argument("--width", type=int, default=4, help="beam-search: beams kept per step")
    sv.add_argument(
        "--early-stop", action="store_true", help="self-consistency: stop once the vote is decided"
    )
    sv.add_argument(
        "--scorer",
        default=None,
        choices=["mean_logprob", "self_judge", "arithmetic"],
        help="best-of-n / beam-search scorer",
    )
    sv.add_argument("--extract", default="last_number", help="last_number | boxed | regex:<pattern>")
    sv.add_argument("--budget", type=int, default=None, help="cap on generated tokens (all samples together)")
    sv.add_argument("--max-tokens", type=int, default=256, help="tokens per sample")
    sv.add_argument("--sample-seed", type=int, default=0, help="seed of the strategy's sampling")
    add_engine_args(sv)
    sv.set_defaults(func=solve)

    ev = sub.add_parser(
        "eval",
        help="accuracy / tokens / time of scaling strategies on a task, with a plot",
        description="Evaluate strategies at several sample budgets on a seeded arithmetic task "
        "or a GSM8K-format JSONL file; prints a table and saves markdown, JSON and a PNG plot.",
    )
    ev.add_argument("--task", default="arithmetic", choices=["arithmetic", "gsm8k"])
    ev.add_argument("--data", default=None, help="gsm8k: JSONL file with question / answer ('#### n')")
    ev.add_argument("--num-questions", type=int, default=200)
    ev.add_argument("--task-seed", type=int, default=0, help="seed of the arithmetic questions")
    ev.add_argument(
        "--strategy",
        default="greedy,self_consistency,best_of_n,particle_filter",
        help=f"comma-separated: {', '.join(STRATEGY_NAMES)} ('-' or '_')",
    )
    ev.add_argument("--budgets", default="1,2,4,8,16", help="comma-separated sample budgets")
    ev.add_argument("--max-tokens", type=int, default=160, help="tokens per sample")
    ev.add_argument(
        "--tokens-per-sample",
        type=int,
        default=None,
        help="equal token budgets: every strategy at sample budget b may generate at most "
        "b x this many tokens per question (exact); default: no token budget",
    )
    ev.add_argument("--sample-seed", type=int, default=0)
    ev.add_argument("--batch", type=int, default=32, help="questions run together")
    ev.add_argument("--out-dir", default="bench_results")
    add_engine_args(ev)
    ev.set_defaults(func=run_eval)
