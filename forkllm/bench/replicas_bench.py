"""`forkllm bench replicas`: `forkllm serve --replicas N` with each router on one shared-prefix
trace, in one run (shared/BENCHMARKS.md, issue 21).

The trace: `--systems` system prompts of ~`--system-len` tokens (16 x 1,000 by default), each
request one of them (uniformly) plus its own short question, Poisson arrivals at `--rate` for
`--duration` seconds (W5's arrivals), `--output-len` tokens each, streamed through
/v1/completions as token ids. Each router gets a fresh server (empty caches) with the same
engine flags, replicas and trace. Reported per router: the servers' prefix-cache hit rate and
prompt tokens computed (from /metrics, summed over replicas), TTFT mean / p50 / p99, completed
requests; and the ratios of the prefix router to round-robin.

Routing matters when a replica's cache cannot hold every system prompt: round-robin then sends
all of them to every replica and each cache thrashes, while prefix routing gives each replica its
own share. The default --kv-cache-memory (per replica) is sized for that (~11k tokens each).
"""

from __future__ import annotations

import argparse
import asyncio
import random
from typing import Any

from forkllm.bench.report import save
from forkllm.bench.serve_bench import Traffic, run_phase, summarize
from forkllm.bench.serve_process import ServeProcess
from forkllm.bench.workloads import shared_prefix_prompts

ROUTERS = ("prefix", "round_robin")
DEFAULT_OUTPUT_LEN = 32  # W3's (shared prefix); unset, max_tokens would run to the context's end


def trace(tok: Any, systems: int, system_len: int, count: int, seed: int) -> list[list[int]]:
    """`count` prompts (token ids), each one of `systems` system prompts plus its own question."""
    rng = random.Random(seed)
    per = [shared_prefix_prompts(tok, count, system_len, 12, seed=seed * 1000 + k) for k in range(systems)]
    return [per[rng.randrange(systems)][i].token_ids for i in range(count)]


def ceilings(prompts: list[list[int]], replicas: int, page: int = 16) -> dict[str, float]:
    """The prefix-cache hit rates the trace allows with caches that never evict: any router's best
    (every shared page computed once, as on one cache) and round-robin's (each replica computes
    every prefix it is sent once). A short trace is mostly first sightings of its system prompts:
    then even perfect routing cannot beat round-robin by much."""
    from forkllm.server.replicas.router import PrefixIndex

    def hit_rate(assign: list[int]) -> float:
        caches = [PrefixIndex(page, 1 << 30) for _ in range(replicas)]
        reused = 0
        for ids, r in zip(prompts, assign):
            chain = caches[r].chain(ids)
            reused += caches[r].match(chain) * page
            caches[r].add(chain)
        return reused / max(1, sum(len(p) for p in prompts))

    best = hit_rate([0] * len(prompts))
    rr = hit_rate([i % replicas for i in range(len(prompts))])
    return {"best": best, "round_robin": rr, "ratio": best / rr if rr else float("inf")}


def bench_replicas(args: argparse.Namespace) -> int:
    from forkllm.bench.serve_bench import arrival_times
    from forkllm.engine.args import engine_kwargs
    from forkllm.models.loader import default_tokenizer
    from forkllm.tokenizer import Tokenizer

    kw = engine_kwargs(args)
    kw.setdefault("kv_cache_memory", "256MiB")
    model = kw.get("model")
    if model is None:
        tok = default_tokenizer()
    elif str(model).endswith(".gguf"):
        tok = Tokenizer.from_gguf(str(model))
    else:
        tok = Tokenizer.from_dir(str(model))
    rate, duration = float(args.rate), float(args.duration)
    output_len = int(args.output_len or DEFAULT_OUTPUT_LEN)
    count = len(arrival_times(rate, duration, args.workload_seed))
    prompts = trace(tok, args.systems, args.system_len, count, args.workload_seed)
    cpus = max(1.0, float(args.cpus or 2) / args.replicas)
    bound = ceilings(prompts, args.replicas)
    print(
        f"trace: {count} requests; hit-rate ceilings with caches that never evict: any router "
        f"{bound['best']:.3f}, round-robin {bound['round_robin']:.3f} (x{bound['ratio']:.2f})",
        flush=True,
    )
    rows: dict[str, dict[str, Any]] = {}
    for router in args.routers.split(","):
        server = ServeProcess(
            kw, ["--replicas", str(args.replicas), "--router", router, "--cpus-per-replica", f"{cpus:g}"]
        )
        try:
            traffic = Traffic(server.url, {}, _model(server.base), prompts, [output_len], True, 600.0)
            results, wall, _ = asyncio.run(run_phase(traffic, rate, duration, args.workload_seed))
            row = summarize(rate, results, wall)
            row["hit_rate"] = server.gauge("forkllm_prefix_cache_hit_rate")
            row["prompt_tokens_computed"] = server.gauge("forkllm_prompt_tokens_computed")
        finally:
            server.stop()
        rows[router] = row
        print(
            f"{router:>12}: hit rate {row['hit_rate']:.3f}, prompt tokens computed "
            f"{row['prompt_tokens_computed']:.0f}, TTFT mean {row['ttft_mean']:.2f}s p50 {row['ttft_p50']:.2f}s "
            f"p99 {row['ttft_p99']:.2f}s, completed {row['completed']}/{row['sent']}, errors "
            f"{row['errors']}, lost {row['lost']}",
            flush=True,
        )
    ratios = {}
    if "prefix" in rows and "round_robin" in rows:
        p, rr = rows["prefix"], rows["round_robin"]
        ratios = {
            "hit_rate_prefix_over_round_robin": p["hit_rate"] / rr["hit_rate"]
            if rr["hit_rate"]
            else float("inf"),
            "ttft_mean_round_robin_over_prefix": rr["ttft_mean"] / p["ttft_mean"]
            if p["ttft_mean"]
            else float("nan"),
        }
        print(
            f"prefix / round_robin: hit rate x{ratios['hit_rate_prefix_over_round_robin']:.2f}, "
            f"mean TTFT {ratios['ttft_mean_round_robin_over_prefix']:.2f}x lower",
            flush=True,
        )
    report = {
        "replicas": args.replicas,
        "systems": args.systems,
        "system_len": args.system_len,
        "rate": rate,
        "duration": duration,
        "output_len": output_len,
        "engine": {k: str(v) for k, v in kw.items()},
        "requests": count,
        "ceilings": bound,
        "rows": rows,
        "ratios": ratios,
    }
    save(args.out_dir, "replicas", _markdown(report), [], report)
    return 0


def _model(base: str) -> str:
    import httpx

    return str(httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"])


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# forkllm serve --replicas {report['replicas']}: routers on a shared-prefix trace",
        "",
        f"{report['systems']} system prompts x ~{report['system_len']} tokens, Poisson {report['rate']} req/s for "
        f"{report['duration']} s ({report['requests']} requests), {report['output_len']} output tokens",
        "",
        f"Hit-rate ceilings of this trace with caches that never evict: any router {report['ceilings']['best']:.3f}, "
        f"round-robin {report['ceilings']['round_robin']:.3f} (x{report['ceilings']['ratio']:.2f})",
        "",
        "| router | hit rate | prompt tokens computed | TTFT mean s | p50 | p99 | completed | errors | lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["rows"].items():
        lines.append(
            f"| {name} | {r['hit_rate']:.3f} | {r['prompt_tokens_computed']:.0f} | {r['ttft_mean']:.2f} | "
            f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['completed']}/{r['sent']} | {r['errors']} | {r['lost']} |"
        )
    for k, v in report["ratios"].items():
        lines.append(f"\n{k}: {v:.2f}")
    return "\n".join(lines) + "\n"


def add_replicas_args(group: Any) -> None:
    group.add_argument("--replicas", type=int, default=2, help="replicas of each server (default 2)")
    group.add_argument(
        "--routers", default=",".join(ROUTERS), help="routers to compare, each on a fresh server"
    )
    group.add_argument("--systems", type=int, default=16, help="distinct system prompts in the trace")
    group.add_argument("--system-len", type=int, default=1000, help="tokens per system prompt")
    group.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals, req/s")
    group.add_argument("--cpus", type=float, default=None, help="CPUs shared by the replicas (default 2)")
