"""W6: in-engine scaling vs the same algorithm driven from outside through the OpenAI API.

Outside-driven (how its_hub and search-and-learn run): every sample of every step is one
/v1/chat/completions request carrying the whole history (the partial answer as a final assistant
message with vLLM's `continue_final_message`, `add_generation_prompt=false`, `stop=["\\n"]`,
`include_stop_str_in_output`), rewards and resampling on the client. In-engine: the policy forks,
pauses and prunes sequences between engine steps. Both use the same reward, the same step rule and
the same seeded resampling, on the same questions, against forkllm's own server / engine.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from forkllm.bench.report import machine_info, save
from forkllm.engine.args import engine_kwargs
from forkllm.engine.sampler import derive_seed
from forkllm.scaling import scorers
from forkllm.scaling.base import Policy
from forkllm.scaling.extract import last_number
from forkllm.scaling.tasks import INSTRUCTION, arithmetic_task


class _Server:
    """forkllm's server on a free local port, in this process (uvicorn in a thread)."""

    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        import socket

        import uvicorn

        from forkllm.engine.async_engine import AsyncEngine
        from forkllm.engine.config import EngineConfig
        from forkllm.engine.llm_engine import LLMEngine
        from forkllm.server.app import ServerConfig, create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        engine = AsyncEngine(LLMEngine(EngineConfig(**engine_kwargs)))
        app = create_app(ServerConfig(served_model_name="w6"), engine=engine)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


async def _continue(
    client: Any,
    url: str,
    question: str,
    partial: str,
    max_tokens: int,
    seed: int,
    temperature: float,
    stop: list[str] | None,
) -> tuple[str, str, int]:
    messages = [{"role": "user", "content": question}]
    body: dict[str, Any] = {"model": "w6", "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    if partial:
        messages.append({"role": "assistant", "content": partial})
        body.update(continue_final_message=True, add_generation_prompt=False)
    if stop:
        body.update(stop=stop, include_stop_str_in_output=True)
    body["messages"] = messages
    r = await client.post(url, json=body, timeout=600)
    r.raise_for_status()
    data = r.json()
    choice = data["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], data["usage"]["completion_tokens"]


async def pf_outside(
    client: Any,
    url: str,
    question: str,
    n: int,
    seed: int,
    max_steps: int = 24,
    max_step_tokens: int = 64,
    max_tokens: int = 256,
    temperature: float = 0.8,
) -> dict[str, Any]:
    """ParticleFilter's algorithm, driven by HTTP requests (one per particle per step)."""
    prompt = f"{question} {INSTRUCTION}"
    texts, done, used, weights = [""] * n, [False] * n, [0] * n, [0.0] * n
    tokens = 0
    for step in range(1, max_steps + 1):
        live = [i for i in range(n) if not done[i]]
        outs = await asyncio.gather(
            *(
                _continue(
                    client,
                    url,
                    prompt,
                    texts[i],
                    min(max_step_tokens, max_tokens - used[i]),
                    derive_seed(seed, 100_003 * step + i),
                    temperature,
                    ["\n"],
                )
                for i in live
            )
        )
        for i, (text, reason, ntok) in zip(live, outs):
            new = text[len(texts[i]) :] if text.startswith(texts[i]) else text
            texts[i] += new
            used[i] += ntok
            tokens += ntok
            ended_line = new.endswith("\n")
            if (reason == "stop" and not ended_line) or used[i] >= max_tokens:
                done[i] = True
        for i in range(n):
            weights[i] = scorers.arithmetic_steps(question, texts[i])
        if all(done) or step >= max_steps:
            break
        probs = scorers.softmax(weights)
        rng = random.Random(derive_seed(seed, 7919 * step + 17))
        picks = rng.choices(range(n), weights=probs, k=n)
        texts, done, used, weights = (
            [texts[j] for j in picks],
            [done[j] for j in picks],
            [used[j] for j in picks],
            [weights[j] for j in picks],
        )
    finished = [i for i in range(n) if done[i]] or list(range(n))
    best = max(finished, key=lambda i: weights[i])
    return {"answer": last_number(texts[best]), "tokens": tokens}


async def sc_outside(
    client: Any, url: str, question: str, n: int, seed: int, max_tokens: int = 256, temperature: float = 0.8
) -> dict[str, Any]:
    """Self-consistency as n independent requests, majority vote on the client."""
    prompt = f"{question} {INSTRUCTION}"
    outs = await asyncio.gather(
        *(
            _continue(client, url, prompt, "", max_tokens, derive_seed(seed, i), temperature, None)
            for i in range(n)
        )
    )
    votes: dict[str, int] = {}
    for text, _, _ in outs:
        a = last_number(text)
        if a is not None:
            votes[a] = votes.get(a, 0) + 1
    answer = max(votes, key=lambda k: votes[k]) if votes else None
    return {"answer": answer, "tokens": sum(o[2] for o in outs)}


def bench_w6(args: argparse.Namespace) -> int:
    import httpx

    from forkllm import LLM
    from forkllm.scaling import ParticleFilter, SelfConsistency

    kw = engine_kwargs(args)
    problems = arithmetic_task(args.num_prompts or 32, args.workload_seed)
    n = args.n_samples
    prompts = [f"{p.question} {INSTRUCTION}" for p in problems]
    rows: list[dict[str, Any]] = []

    def score(answers: list[str | None]) -> float:
        return sum(a == p.answer for a, p in zip(answers, problems)) / len(problems)

    # ---- in-engine
    llm = LLM(**kw)
    llm.scale_batch(prompts[:2], [SelfConsistency(n=2, max_tokens=8) for _ in range(2)])  # warm-up
    in_engine: dict[str, Callable[[], list[Policy]]] = {
        "particle_filter": lambda: [ParticleFilter(n=n, seed=args.workload_seed) for _ in problems],
        "self_consistency": lambda: [SelfConsistency(n=n, seed=args.workload_seed) for _ in problems],
        "self_consistency_early_stop": lambda: [
            SelfConsistency(n=n, early_stop=True, seed=args.workload_seed) for _ in problems
        ],
    }
    for name, make in in_engine.items():
        llm.engine.kv.pool.drop_cached()
        t0 = time.perf_counter()
        results = llm.scale_batch(prompts, make())
        wall = time.perf_counter() - t0
        rows.append(
            {
                "algorithm": name,
                "driver": "in-engine",
                "seconds": wall,
                "tokens": sum(r.tokens_generated for r in results),
                "accuracy": score([r.answer for r in results]),
            }
        )
        print(
            f"in-engine {name}: {wall:.1f}s, {rows[-1]['tokens']} tokens, accuracy {rows[-1]['accuracy']:.3f}",
            flush=True,
        )
    del llm

    # ---- outside-driven through forkllm's own OpenAI server
    srv = _Server(kw)
    try:

        async def run(kind: str) -> list[dict[str, Any]]:
            # Idle connections expire on the client well before uvicorn's 5 s keep-alive closes
            # them, so a request never races the server's close (httpx.ReadError).
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=1.0)
            async with httpx.AsyncClient(limits=limits) as client:
                if kind == "particle_filter":
                    coros = [pf_outside(client, srv.url, p.question, n, args.workload_seed) for p in problems]
                else:
                    coros = [sc_outside(client, srv.url, p.question, n, args.workload_seed) for p in problems]
                return await asyncio.gather(*coros)

        for kind in ("particle_filter", "self_consistency"):
            t0 = time.perf_counter()
            res = asyncio.run(run(kind))
            wall = time.perf_counter() - t0
            rows.append(
                {
                    "algorithm": kind,
                    "driver": "outside (OpenAI API)",
                    "seconds": wall,
                    "tokens": sum(r["tokens"] for r in res),
                    "accuracy": score([r["answer"] for r in res]),
                }
            )
            print(
                f"outside {kind}: {wall:.1f}s, {rows[-1]['tokens']} tokens, accuracy {rows[-1]['accuracy']:.3f}",
                flush=True,
            )
    finally:
        srv.stop()

    m = machine_info()
    md = (
        f"## W6 in-engine scaling vs outside-driven: {len(problems)} arithmetic questions, {n} samples/particles, "
        f"step = one line; {m['nproc']} cores, {m['cpu']}\n\n"
        "| algorithm | driver | wall s | generated tokens | accuracy | speed-up vs outside |\n|---|---|---|---|---|---|\n"
    )
    outside = {r["algorithm"]: r["seconds"] for r in rows if r["driver"] != "in-engine"}
    for r in rows:
        base = outside.get(r["algorithm"].replace("_early_stop", ""))
        sp = f"{base / r['seconds']:.2f}x" if base and r["driver"] == "in-engine" else ""
        md += (
            f"| {r['algorithm']} | {r['driver']} | {r['seconds']:.1f} | {r['tokens']} | {r['accuracy']:.3f} | "
            f"{sp} |\n"
        )
    sc = {r["algorithm"]: r for r in rows if r["driver"] == "in-engine"}
    if "self_consistency" in sc and "self_consistency_early_stop" in sc:
        a, b = sc["self_consistency"], sc["self_consistency_early_stop"]
        md += (
            f"\nSelf-consistency early stop: {b['tokens']} vs {a['tokens']} tokens "
            f"({100 * (1 - b['tokens'] / a['tokens']):.0f}% saved), accuracy {b['accuracy']:.3f} vs "
            f"{a['accuracy']:.3f}.\n"
        )
    print("\n" + md)
    print(f"saved {save(args.out_dir, 'w6-scaling', md, [], {'rows': rows})}")
    return 0
