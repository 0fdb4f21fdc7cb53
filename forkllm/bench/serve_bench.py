"""W5 serving benchmark: Poisson arrivals against any OpenAI-compatible /v1/completions endpoint.

Each request streams; time to first token is measured to the first chunk with text, inter-token
latency between successive text chunks (divided by the tokens a chunk carries when the server
reports usage per chunk is unavailable, chunks are taken as one token each, as forkllm and vLLM
send them). Prompts are the seeded synthetic prompts of forkllm.bench.workloads, so the same
command measures forkllm and a peer on the same text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forkllm.bench.report import machine_info


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""
    tokens: int = 0


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _one(
    client: Any, url: str, headers: dict[str, str], body: dict[str, Any], timeout: float
) -> RequestResult:
    t0 = time.perf_counter()
    res = RequestResult(ok=False)
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                text = "".join(c.get("text") or "" for c in chunk.get("choices", []))
                if not text:
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itls.append(now - last)
                last = now
                res.tokens += 1
        res.ok = True
    except Exception as e:  # timeouts, resets: counted as errors
        res.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        res.latency = time.perf_counter() - t0
    return res


async def _run_rate(
    url: str,
    headers: dict[str, str],
    model: str,
    prompts: list[str],
    outs: list[int],
    rate: float,
    duration: float,
    seed: int,
    ignore_eos: bool,
    timeout: float,
) -> dict[str, Any]:
    import httpx

    rng = random.Random(seed)
    tasks: list[asyncio.Task[RequestResult]] = []
    # keepalive_expiry below the servers' usual 5 s keep-alive: never reuse a socket being closed.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=1.0)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        t = 0.0
        i = 0
        while True:
            t += rng.expovariate(rate)
            if t > duration:
                break
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = {
                "model": model,
                "prompt": prompts[i % len(prompts)],
                "max_tokens": outs[i % len(outs)],
                "temperature": 0.0,
                "stream": True,
            }
            if ignore_eos:
                body["ignore_eos"] = True
            tasks.append(asyncio.create_task(_one(client, url, headers, body, timeout)))
            i += 1
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [x for r in ok for x in r.itls]
    errors = [r.error for r in results if not r.ok]
    return {
        "rate": rate,
        "sent": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": wall,
        "completed_per_s": len(ok) / wall,
        "ttft_p50": _pct(ttfts, 0.5),
        "ttft_p99": _pct(ttfts, 0.99),
        "itl_p50": _pct(itls, 0.5),
        "itl_p99": _pct(itls, 0.99),
        "output_tok_s": sum(r.tokens for r in ok) / wall,
        "ttft_mean": statistics.mean(ttfts) if ttfts else float("nan"),
    }


def _wait_for_model(httpx: Any, base: str, headers: dict[str, str], timeout: float = 180.0) -> str:
    """The served model's id, once the server answers /models (it is 503 while loading)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(base + "/models", headers=headers, timeout=30)
            if r.status_code == 200:
                return str(r.json()["data"][0]["id"])
            detail = f"HTTP {r.status_code}: {r.text[:200]}"
            if r.status_code in (401, 403):
                raise SystemExit(
                    f"forkllm bench serve: {base} refused the request ({detail}); pass --api-key"
                )
        except httpx.TransportError as e:
            detail = str(e)
        if time.monotonic() > deadline:
            raise SystemExit(f"forkllm bench serve: no model ready at {base} after {timeout:.0f}s ({detail})")
        time.sleep(1.0)


def bench_serve(args: argparse.Namespace) -> int:
    import httpx

    from forkllm.bench.workloads import make_prompts
    from forkllm.models.loader import default_tokenizer

    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.served_model or _wait_for_model(httpx, base, headers)
    tok = default_tokenizer()
    lo, hi = (int(x) for x in (args.prompt_len or "64-512").split("-"))
    olo, ohi = (int(x) for x in (args.output_range or "32-256").split("-"))
    rng = random.Random(args.workload_seed)
    prompts = [p.text for p in make_prompts(tok, 200, lo, hi, args.workload_seed)]
    outs = [rng.randint(olo, ohi) for _ in range(200)]
    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    for rate in rates:
        print(f"W5: {rate:g} req/s for {args.duration:g}s against {base} ({model}) ...", flush=True)
        r = asyncio.run(
            _run_rate(
                base + "/completions",
                headers,
                model,
                prompts,
                outs,
                rate,
                args.duration,
                args.workload_seed,
                not args.no_ignore_eos,
                args.request_timeout,
            )
        )
        rows.append(r)
        print(
            f"  completed {r['completed']}/{r['sent']} ({r['completed_per_s']:.2f} req/s), errors {r['errors']}, "
            f"TTFT p50 {r['ttft_p50']:.2f}s p99 {r['ttft_p99']:.2f}s, ITL p50 {r['itl_p50'] * 1e3:.0f}ms "
            f"p99 {r['itl_p99'] * 1e3:.0f}ms",
            flush=True,
        )
    m = machine_info()
    md = (
        f"## W5 serving: {args.label or model} at {base}\n\nPoisson arrivals for {args.duration:g} s per rate; "
        f"prompts {lo}-{hi} tokens, outputs {olo}-{ohi} tokens, greedy{', ignore_eos' if not args.no_ignore_eos else ''}; "
        f"client on the same machine ({m['nproc']} cores, {m['cpu']}).\n\n"
        "| offered req/s | sent | completed | completed req/s | errors | TTFT p50 s | TTFT p99 s | ITL p50 ms | "
        "ITL p99 ms | output tok/s |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        md += (
            f"| {r['rate']:g} | {r['sent']} | {r['completed']} | {r['completed_per_s']:.2f} | {r['errors']} | "
            f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['itl_p50'] * 1e3:.0f} | {r['itl_p99'] * 1e3:.0f} | "
            f"{r['output_tok_s']:.1f} |\n"
        )
    ok_rates = [r["rate"] for r in rows if r["errors"] == 0 and r["ttft_p99"] < 2.0]
    md += (
        f"\nHighest offered rate with zero errors and p99 TTFT under 2 s: {max(ok_rates):g} req/s\n"
        if ok_rates
        else "\nNo rate met zero errors with p99 TTFT under 2 s.\n"
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = out / f"w5-serve-{stamp}.png"
    _plot(rows, png, args.label or model)
    md += f"\n![W5 curve]({png.name})\n"
    (out / f"w5-serve-{stamp}.md").write_text(md)
    (out / f"w5-serve-{stamp}.json").write_text(json.dumps({"machine": m, "rows": rows}, indent=2))
    print("\n" + md)
    print(f"saved {out / f'w5-serve-{stamp}.md'} and {png}")
    return 0


def _plot(rows: list[dict[str, Any]], path: Path, label: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rates = [r["rate"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(rates, [r["ttft_p50"] for r in rows], "o-", label="p50")
    axes[0].plot(rates, [r["ttft_p99"] for r in rows], "s--", label="p99")
    axes[0].axhline(2.0, color="grey", lw=0.8, ls=":")
    axes[0].set(xlabel="offered req/s", ylabel="TTFT (s)", title="time to first token", yscale="log")
    axes[1].plot(rates, [r["itl_p50"] * 1e3 for r in rows], "o-", label="p50")
    axes[1].plot(rates, [r["itl_p99"] * 1e3 for r in rows], "s--", label="p99")
    axes[1].set(xlabel="offered req/s", ylabel="ITL (ms)", title="inter-token latency")
    axes[2].plot(rates, [r["completed_per_s"] for r in rows], "o-", label="completed")
    axes[2].plot(rates, rates, ":", color="grey", label="offered")
    axes[2].set(xlabel="offered req/s", ylabel="req/s", title="throughput")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"W5 serving: {label}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
