"""Replicas on paper: replay a shared-prefix trace against N simulated forkllm replicas to show
routing quality and queueing at 8-64 replicas, which two cores cannot show (issue 21).

Each simulated replica runs forkllm's step loop in miniature: a token budget per step, decode
rows first, then prompt chunks FCFS; a prefix cache of pages (LRU over the pages no running
request holds) from which a prompt revives its leading pages; a step costs
`step = base + per_row x decode rows + per_token x prompt tokens computed`, the costs measured
on forkllm (`--measure` times the real engine on this machine; the defaults were measured on the
2-core Zen 4: 16.5 ms + 1.26 ms per decode row + 1.75 ms per prompt token, bf16 SmolLM2-135M).
Requests are routed by the server's own Router (server/replicas/router.py), fed token ids with
the trace's shared prefixes. `--split P` simulates a prefill/decode split (Splitwise): P replicas
only prefill, the rest only decode, and a request's KV moves between them at `--transfer-ms` per
1,000 tokens.

    python -m forkllm.bench.replica_sim --replicas 8,16,32,64 --routers prefix,round_robin,least_loaded
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field

from forkllm.server.replicas.router import Router


@dataclass(frozen=True)
class Costs:
    base_ms: float = 16.5
    per_row_ms: float = 1.26
    per_token_ms: float = 1.75

    def step(self, rows: int, tokens: int) -> float:
        return (self.base_ms + self.per_row_ms * rows + self.per_token_ms * tokens) / 1000.0


@dataclass
class Req:
    rid: int
    arrival: float
    ids: list[int]
    output: int
    computed: int = 0  # prompt tokens done (reused or computed)
    generated: int = 0
    reused: int = 0
    first_token: float | None = None
    done: float | None = None
    decode_only: bool = False  # arrived with its KV (prefill/decode split)


@dataclass
class Replica:
    costs: Costs
    page: int
    cache_pages: int
    budget: int = 2048
    max_seqs: int = 256
    role: str = "both"  # both | prefill | decode
    waiting: list[Req] = field(default_factory=list)
    running: list[Req] = field(default_factory=list)
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    busy_until: float = 0.0
    computed_tokens: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0

    def chain(self, ids: list[int]) -> list[int]:
        out, h = [], 0
        for i in range(0, len(ids) - self.page + 1, self.page):
            h = hash((h, tuple(ids[i : i + self.page])))
            out.append(h)
        return out

    def held(self) -> int:
        """Pages running requests hold beyond the cached prefixes they share (their own question
        and output; the shared system prompt's pages are the cache's)."""
        return sum((len(r.ids) - r.reused + r.generated) // self.page + 1 for r in self.running)

    def admit_prefix(self, r: Req) -> None:
        """Revive the leading cached pages of a new prompt (at least its last token is computed)."""
        n = 0
        for h in self.chain(r.ids):
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            n += 1
        r.reused = min(n * self.page, len(r.ids) - 1)
        r.computed = r.reused
        self.prompt_tokens += len(r.ids)
        self.reused_tokens += r.reused

    def insert(self, r: Req) -> None:
        for h in self.chain(r.ids):
            self.cache[h] = None
            self.cache.move_to_end(h)
        room = max(self.cache_pages - self.held(), 0)
        while len(self.cache) > room:
            self.cache.popitem(last=False)

    def step(self, now: float) -> tuple[float, list[Req]]:
        """One step from `now`: its duration and the requests whose prompt it finished."""
        budget, rows = self.budget, 0
        decodes = [r for r in self.running if r.computed >= len(r.ids)]
        rows = min(len(decodes), budget)
        budget -= rows
        tokens = 0
        finished_prompts: list[Req] = []
        for r in [r for r in self.running if r.computed < len(r.ids)]:
            n = min(len(r.ids) - r.computed, budget)
            r.computed += n
            tokens += n
            budget -= n
            if r.computed >= len(r.ids):
                finished_prompts.append(r)
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            r = self.waiting.pop(0)
            if not r.decode_only:
                self.admit_prefix(r)
            self.running.append(r)
            n = min(len(r.ids) - r.computed, budget)
            r.computed += n
            tokens += n
            budget -= n
            if r.computed >= len(r.ids):
                finished_prompts.append(r)
        dt = self.costs.step(rows, tokens)
        end = now + dt
        for r in decodes[:rows]:
            r.generated += 1
        for r in finished_prompts:
            if r.first_token is None:
                r.first_token = end
            r.generated = max(r.generated, 1)
            self.insert(r)
        self.computed_tokens += tokens
        return dt, finished_prompts

    def retire(self, end: float) -> list[Req]:
        done = [
            r for r in self.running if r.generated >= r.output or (self.role == "prefill" and r.first_token)
        ]
        for r in done:
            self.running.remove(r)
            if self.role != "prefill":
                r.done = end
        return done


def make_trace(
    systems: int, system_len: int, question_len: int, rate: float, count: int, output: int, seed: int
) -> list[Req]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(count):
        t += rng.expovariate(rate)
        k = rng.randrange(systems)
        ids = [k * 1_000_003 + j for j in range(system_len)] + [
            7_000_000 + i * 97 + j for j in range(question_len)
        ]
        out.append(Req(i, t, ids, output))
    return out


def simulate(
    trace: list[Req],
    replicas: int,
    router: str,
    costs: Costs,
    cache_tokens: int,
    split: int = 0,
    transfer_ms: float = 5.0,
    page: int = 16,
) -> dict[str, float]:
    """Run the trace to completion; TTFT, latency, hit rate, busy fraction."""
    reqs = [Req(r.rid, r.arrival, r.ids, r.output) for r in trace]
    pre = split if split else replicas
    reps = [
        Replica(
            costs,
            page,
            cache_tokens // page,
            role=("prefill" if split and i < split else "decode" if split else "both"),
        )
        for i in range(replicas)
    ]
    route = Router(pre, router, page=page)
    dec_route = Router(replicas - split, "least_loaded", page=page) if split else None
    events: list[tuple[float, int, int, int]] = []  # (time, kind 0=arrival 1=step-end 2=handoff, seq, index)
    seq = 0
    for r in reqs:
        heapq.heappush(events, (r.arrival, 0, seq, r.rid))
        seq += 1
    idle = [True] * replicas
    where: dict[int, int] = {}
    busy = [0.0] * replicas

    def kick(i: int, now: float) -> None:
        nonlocal seq
        rep = reps[i]
        if idle[i] and (rep.waiting or rep.running):
            idle[i] = False
            dt, _ = rep.step(now)
            busy[i] += dt
            heapq.heappush(events, (now + dt, 1, seq, i))
            seq += 1

    end = 0.0
    while events:
        now, kind, _, x = heapq.heappop(events)
        end = max(end, now)
        if kind == 0:  # arrival
            r = reqs[x]
            i = route.pick(r.ids)
            route.started(i)
            where[r.rid] = i
            reps[i].waiting.append(r)
            kick(i, now)
        elif kind == 2:  # KV arrives at a decode replica
            r = reqs[x]
            assert dec_route is not None
            j = split + dec_route.pick(r.ids)
            dec_route.started(j - split)
            r.decode_only = True
            where[r.rid] = j
            reps[j].waiting.append(r)
            kick(j, now)
        else:  # a step ended
            i = x
            idle[i] = True
            for r in reps[i].retire(now):
                if i < pre:
                    route.finished(i)
                elif dec_route is not None:
                    dec_route.finished(i - split)
                if split and i < split:
                    heapq.heappush(events, (now + transfer_ms / 1000.0 * len(r.ids) / 1000.0, 2, seq, r.rid))
                    seq += 1
            kick(i, now)
    ttft = [r.first_token - r.arrival for r in reqs if r.first_token is not None]
    lat = [r.done - r.arrival for r in reqs if r.done is not None]
    prompt = sum(rep.prompt_tokens for rep in reps)
    reused = sum(rep.reused_tokens for rep in reps)
    q = sorted(ttft)
    return {
        "replicas": replicas,
        "completed": len(lat),
        "hit_rate": reused / prompt if prompt else 0.0,
        "ttft_mean": statistics.mean(ttft),
        "ttft_p99": q[min(len(q) - 1, int(0.99 * (len(q) - 1)))],
        "latency_mean": statistics.mean(lat),
        "req_per_s": len(lat) / end if end else 0.0,
        "busy": sum(busy) / (replicas * end) if end else 0.0,
    }


def measure_costs() -> Costs:
    """Time the real engine (default model, bf16) on this machine: decode steps at 1 and 32 rows,
    a 512-token prefill; a least-squares line through them."""
    import time

    from forkllm import LLM, SamplingParams

    llm = LLM(dtype="bfloat16")
    engine = llm.engine

    def timed(prompts: list[list[int]], max_tokens: int) -> float:
        for p in prompts:
            engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0))
        engine.step()  # the prompts
        t = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        return (time.perf_counter() - t) / max(steps, 1)

    d1 = timed([[1 + j for j in range(64)]], 65)
    d32 = timed([[1 + i + j for j in range(64)] for i in range(32)], 65)
    engine.kv.pool.drop_cached()
    t = time.perf_counter()
    engine.add_request(list(range(2, 514)), SamplingParams(max_tokens=1))
    engine.step()
    prefill = time.perf_counter() - t
    per_row = (d32 - d1) / 31
    base = d1 - per_row
    return Costs(base * 1000, per_row * 1000, max(prefill - base, 0.0) / 512 * 1000)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m forkllm.bench.replica_sim", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--replicas", default="8,16,32,64")
    ap.add_argument("--routers", default="prefix,round_robin,least_loaded")
    ap.add_argument(
        "--systems-per-replica",
        type=float,
        default=8,
        help="distinct system prompts in the trace, per replica (8 x 1,000 tokens fit a replica's cache; all of "
        "them do not)",
    )
    ap.add_argument("--system-len", type=int, default=1000)
    ap.add_argument("--question-len", type=int, default=30)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument(
        "--load",
        type=float,
        default=0.4,
        help="offered load per replica, as a fraction of one replica's capacity",
    )
    ap.add_argument("--requests-per-replica", type=int, default=400)
    ap.add_argument("--cache-tokens", type=int, default=20_000, help="KV tokens per replica")
    ap.add_argument(
        "--split", type=float, default=0.0, help="prefill/decode split: the fraction of replicas that prefill"
    )
    ap.add_argument(
        "--transfer-ms", type=float, default=5.0, help="KV transfer per 1,000 tokens (split only)"
    )
    ap.add_argument("--measure", action="store_true", help="measure the step costs on this machine first")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    costs = measure_costs() if args.measure else Costs()
    print(
        f"step costs: {costs.base_ms:.1f} ms + {costs.per_row_ms:.2f} ms/decode row + {costs.per_token_ms:.2f} ms/prompt token"
    )
    # One replica's capacity in req/s with every prompt cached but the question (the best case),
    # decoding ~4 requests at a time.
    per_req = costs.step(0, args.question_len) + args.output_len * costs.step(4, 0) / 4  # at ~4 rows a step
    capacity = 1.0 / per_req
    rows = []
    print("| replicas | router | hit rate | TTFT mean s | TTFT p99 s | req/s | busy |")
    print("|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.replicas.split(",")]:
        rate = args.load * capacity * n
        systems = max(1, int(args.systems_per_replica * n))
        trace = make_trace(
            systems,
            args.system_len,
            args.question_len,
            rate,
            args.requests_per_replica * n,
            args.output_len,
            args.seed,
        )
        for router in args.routers.split(","):
            split = int(round(args.split * n)) if args.split else 0
            row = simulate(trace, n, router, costs, args.cache_tokens, split, args.transfer_ms)
            row["router"] = router
            row["split"] = split
            rows.append(row)
            print(
                f"| {n}{' (' + str(split) + ' prefill)' if split else ''} | {router} | {row['hit_rate']:.3f} | {row['ttft_mean']:.2f} | "
                f"{row['ttft_p99']:.2f} | {row['req_per_s']:.1f} | {row['busy']:.2f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"costs": costs.__dict__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
