"""W5 serving benchmark: Poisson arrivals against any OpenAI-compatible /v1/completions endpoint.

Each request streams; time to first token is measured to the first chunk with text, inter-token
latency between successive text chunks (chunks are taken as one token each, as forkllm and vLLM
send them). Prompts are the seeded synthetic prompts of forkllm.bench.workloads, so the same
command measures forkllm and a peer on the same text.

Every request ends in exactly one outcome: `ok` (a stream that ended with [DONE]), `rejected`
(503, the server's overload answer; Retry-After counted), `error` (any other HTTP error, or an
error event inside the stream) or `lost` (no response and no error: the connection failed or
closed, the stream stopped before [DONE], or nothing complete came back within
--request-timeout). Lost requests are the silent drops the hardening targets say must be zero.

Modes: the plain rate sweep (W5); `--hostile` (W5-hostile, forkllm.bench.hostile: a clean phase,
then the same arrivals again while one abusive client runs); `--overload` (the sweep, reported
as admission control: 503s, admitted TTFT, silent drops; rates at twice the best completed req/s,
three at most, are added until the offered rate reaches that). The abuse modes only target
loopback addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import statistics
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from forkllm.bench.report import machine_info

OK, REJECTED, ERROR, LOST = "ok", "rejected", "error", "lost"
OUTCOMES = (OK, REJECTED, ERROR, LOST)
MAX_OVERLOAD_EXTRA = 3  # rates --overload may add to reach twice the sustained rate


@dataclass
class RequestResult:
    outcome: str = LOST
    status: int | None = None  # HTTP status, None if no response arrived
    retry_after: str | None = None  # the Retry-After header of a 503
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome == OK


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _stream_into(
    res: RequestResult,
    client: Any,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
    timeout: float,
    t0: float,
) -> None:
    last = None
    async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as resp:
        res.status = resp.status_code
        if resp.status_code != 200:
            res.outcome = REJECTED if resp.status_code == 503 else ERROR
            res.retry_after = resp.headers.get("retry-after")
            res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                res.outcome = OK
                return
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                res.outcome, res.error = ERROR, f"malformed chunk: {data[:200]!r}"
                return
            if "error" in chunk:
                res.outcome, res.error = ERROR, str(chunk["error"])[:200]
                return
            text = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
            if not text:
                continue
            now = time.perf_counter()
            if last is None:
                res.ttft = now - t0
            else:
                res.itls.append(now - last)
            last = now
            res.tokens += 1
    res.outcome, res.error = LOST, "stream ended without [DONE] or an error"


async def _one(
    client: Any, url: str, headers: dict[str, str], body: dict[str, Any], timeout: float
) -> RequestResult:
    """One streamed request, bounded by `timeout` seconds in all."""
    t0 = time.perf_counter()
    res = RequestResult()
    try:
        await asyncio.wait_for(_stream_into(res, client, url, headers, body, timeout, t0), timeout)
    except asyncio.TimeoutError:
        res.outcome, res.error = LOST, f"no complete response within {timeout:g} s"
    except Exception as e:  # connection refused/reset, protocol errors: no answer came back
        res.outcome, res.error = LOST, f"{type(e).__name__}: {e}"[:200]
    finally:
        res.latency = time.perf_counter() - t0
    return res


def arrival_times(rate: float, duration: float, seed: int) -> list[float]:
    """Poisson arrival offsets in [0, duration] (seconds); the same seed gives the same list."""
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return out
        out.append(t)


def http_client() -> Any:
    import httpx

    # keepalive_expiry below the servers' usual 5 s keep-alive: never reuse a socket being closed.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=1.0)
    return httpx.AsyncClient(limits=limits)


@dataclass
class Traffic:
    """The W5 traffic: where it goes and what each request asks."""

    url: str  # .../v1/completions
    headers: dict[str, str]
    model: str
    prompts: list[Any]  # text (W5), or token ids (the replicas trace: its shared prefixes kept)
    outs: list[int]
    ignore_eos: bool
    timeout: float

    def body(self, i: int, tag: str = "") -> dict[str, Any]:
        """Request i; `tag` goes before the prompt so that runs sending the same prompts do not hit
        each other's prefix cache (each phase and rate gets its own)."""
        prompt = self.prompts[i % len(self.prompts)]
        if tag:
            if not isinstance(prompt, str):
                raise ValueError("a tag needs text prompts (token-id prompts keep their prefixes)")
            prompt = tag + prompt
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.outs[i % len(self.outs)],
            "temperature": 0.0,
            "stream": True,
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body


# A coroutine run beside one phase's arrivals: (client, phase start, arrival window in s) -> result.
SideTask = Callable[[Any, float, float], Coroutine[Any, Any, Any]]


async def run_phase(
    traffic: Traffic, rate: float, duration: float, seed: int, side: SideTask | None = None, tag: str = ""
) -> tuple[list[RequestResult], float, Any]:
    """Send the Poisson arrivals of one phase, wait for every answer, and return the results, the
    wall time, and the side task's result (run concurrently, on its own connections). `tag`
    prefixes every prompt: phases with different tags share no cached prefix."""
    tasks: list[asyncio.Task[RequestResult]] = []
    side_result = None
    async with http_client() as client, http_client() as side_client:
        start = time.perf_counter()
        side_task = asyncio.create_task(side(side_client, start, duration)) if side is not None else None
        for i, t in enumerate(arrival_times(rate, duration, seed)):
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(
                    _one(client, traffic.url, traffic.headers, traffic.body(i, tag), traffic.timeout)
                )
            )
        results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - start  # the W5 requests' wall time, not the side task's tail
        if side_task is not None:
            side_result = await side_task
    return results, wall, side_result


def summarize(rate: float, results: list[RequestResult], wall: float) -> dict[str, Any]:
    """One phase's row: outcome counts (they add up to `sent`), then latency over ok requests."""
    by = {o: [r for r in results if r.outcome == o] for o in OUTCOMES}
    ok = by[OK]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [x for r in ok for x in r.itls]
    return {
        "rate": rate,
        "sent": len(results),
        "completed": len(ok),
        "rejected_503": len(by[REJECTED]),
        "retry_after": sum(1 for r in by[REJECTED] if r.retry_after is not None),
        "errors": len(by[ERROR]),
        "lost": len(by[LOST]),
        "error_samples": [r.error for r in by[ERROR]][:3],
        "lost_samples": [r.error for r in by[LOST]][:3],
        "wall_s": wall,
        "completed_per_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft_p50": _pct(ttfts, 0.5),
        "ttft_p99": _pct(ttfts, 0.99),
        "itl_p50": _pct(itls, 0.5),
        "itl_p99": _pct(itls, 0.99),
        "output_tok_s": sum(r.tokens for r in ok) / wall if wall > 0 else 0.0,
        "ttft_mean": statistics.mean(ttfts) if ttfts else float("nan"),
        "ttfts": [r.ttft for r in results],  # per request in arrival order (None: not answered)
    }


def row_line(r: dict[str, Any]) -> str:
    return (
        f"completed {r['completed']}/{r['sent']} ({r['completed_per_s']:.2f} req/s), 503 {r['rejected_503']}, "
        f"errors {r['errors']}, lost {r['lost']}, TTFT p50 {r['ttft_p50']:.2f}s p99 {r['ttft_p99']:.2f}s, "
        f"ITL p50 {r['itl_p50'] * 1e3:.0f}ms p99 {r['itl_p99'] * 1e3:.0f}ms"
    )


def _wait_for_model(httpx: Any, base: str, headers: dict[str, str], timeout: float = 180.0) -> dict[str, Any]:
    """The served model's card from /models, once the server answers (it is 503 while loading)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(base + "/models", headers=headers, timeout=30)
            if r.status_code == 200:
                card: dict[str, Any] = r.json()["data"][0]
                return card
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


def check_loopback(url: str) -> None:
    """The abuse modes send deliberately hostile and overloading traffic: this machine only."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(
            f"forkllm bench serve: --hostile and --overload only target a server on this machine "
            f"(127.0.0.1, ::1 or localhost), not {host!r}"
        )


@dataclass
class Setup:
    """What every mode shares: the server, the traffic, and the workload's shape."""

    base: str
    model: str
    card: dict[str, Any]
    traffic: Traffic
    prompt_ids: list[list[int]]  # the prompts as default-tokenizer ids (near-context fallback)
    lo: int
    hi: int
    olo: int
    ohi: int


def prepare(args: argparse.Namespace) -> Setup:
    import httpx

    from forkllm.bench.workloads import make_prompts
    from forkllm.models.loader import default_tokenizer

    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    card = _wait_for_model(httpx, base, headers)
    model = args.served_model or str(card["id"])
    tok = default_tokenizer()
    lo, hi = (int(x) for x in (args.prompt_len or "64-512").split("-"))
    olo, ohi = (int(x) for x in (args.output_range or "32-256").split("-"))
    rng = random.Random(args.workload_seed)
    made = make_prompts(tok, 200, lo, hi, args.workload_seed)
    outs = [rng.randint(olo, ohi) for _ in range(200)]
    traffic = Traffic(
        base + "/completions",
        headers,
        model,
        [p.text for p in made],
        outs,
        not args.no_ignore_eos,
        args.request_timeout,
    )
    return Setup(base, model, card, traffic, [p.token_ids for p in made], lo, hi, olo, ohi)


def bench_serve(args: argparse.Namespace) -> int:
    run_serve_bench(args)
    return 0


def run_serve_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the mode the flags ask for; print and save the report; return it as a dict."""
    hostile = bool(getattr(args, "hostile", False))
    overload = bool(getattr(args, "overload", False))
    if hostile and overload:
        raise SystemExit("forkllm bench serve: choose one of --hostile and --overload")
    if hostile or overload:
        check_loopback(args.url)
    setup = prepare(args)
    if hostile:
        from forkllm.bench.hostile import run_hostile

        hostile_report, hostile_md = run_hostile(args, setup)
        return _save(args, "w5-hostile", hostile_report, hostile_md)
    rows = _sweep(args, setup, [float(r) for r in args.rates.split(",")], overload)
    m = machine_info()
    md = _sweep_markdown(args, setup, rows, overload, m)
    report: dict[str, Any] = {"mode": "overload" if overload else "sweep", "machine": m, "rows": rows}
    if overload:
        report.update(overload_summary(rows))
    stamp_png = _plot_path(args)
    _plot(rows, stamp_png, args.label or setup.model)
    md += f"\n![W5 curve]({stamp_png.name})\n"
    return _save(args, "w5-overload" if overload else "w5-serve", report, md)


def _sweep(
    args: argparse.Namespace, setup: Setup, rates: list[float], overload: bool
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def run(rate: float) -> None:
        print(
            f"W5: {rate:g} req/s for {args.duration:g}s against {setup.base} ({setup.model}) ...", flush=True
        )
        tag = f"[run {len(rows) + 1}] "  # every rate computes its prompts afresh (no cache hits)
        results, wall, _ = asyncio.run(
            run_phase(setup.traffic, rate, args.duration, args.workload_seed, tag=tag)
        )
        rows.append(summarize(rate, results, wall))
        print("  " + row_line(rows[-1]), flush=True)

    for rate in rates:
        run(rate)
    # Overload: rates at twice the best completed req/s until the offered rate reaches 2x what the
    # server sustains (a rate below saturation completes about what it offers, so this climbs).
    for _ in range(MAX_OVERLOAD_EXTRA if overload else 0):
        sustainable = max(r["completed_per_s"] for r in rows)
        if max(r["rate"] for r in rows) >= 2 * sustainable:
            break
        run(round(2 * sustainable, 2))
    return rows


def overload_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    sustainable = max(r["completed_per_s"] for r in rows)
    top = max(r["rate"] for r in rows)
    return {
        "sustainable_req_s": sustainable,
        "highest_offered_over_sustainable": top / sustainable if sustainable > 0 else float("inf"),
        "rejected_503": sum(r["rejected_503"] for r in rows),
        "retry_after": sum(r["retry_after"] for r in rows),
        "silent_drops": sum(r["lost"] for r in rows),
    }


def _sweep_markdown(
    args: argparse.Namespace, setup: Setup, rows: list[dict[str, Any]], overload: bool, m: dict[str, Any]
) -> str:
    title = "W5 overload" if overload else "W5 serving"
    md = (
        f"## {title}: {args.label or setup.model} at {setup.base}\n\nPoisson arrivals for {args.duration:g} s per "
        f"rate; prompts {setup.lo}-{setup.hi} tokens, outputs {setup.olo}-{setup.ohi} tokens, greedy"
        f"{', ignore_eos' if setup.traffic.ignore_eos else ''}; client on the same machine ({m['nproc']} cores, "
        f"{m['cpu']}). Lost = no response and no error (silent drop); TTFT and ITL over completed requests "
        "(the admitted ones).\n\n"
        "| offered req/s | sent | completed | completed req/s | 503 (with Retry-After) | errors | lost | "
        "TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms | output tok/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        md += (
            f"| {r['rate']:g} | {r['sent']} | {r['completed']} | {r['completed_per_s']:.2f} | "
            f"{r['rejected_503']} ({r['retry_after']}) | {r['errors']} | {r['lost']} | {r['ttft_p50']:.2f} | "
            f"{r['ttft_p99']:.2f} | {r['itl_p50'] * 1e3:.0f} | {r['itl_p99'] * 1e3:.0f} | {r['output_tok_s']:.1f} |\n"
        )
    if overload:
        s = overload_summary(rows)
        md += (
            f"\nSustained at most {s['sustainable_req_s']:.2f} req/s; the highest offered rate is "
            f"{s['highest_offered_over_sustainable']:.2f}x that. 503s: {s['rejected_503']} "
            f"({s['retry_after']} with Retry-After); silent drops: {s['silent_drops']} (target 0).\n"
        )
        return md
    clean = [
        r["rate"] for r in rows if r["errors"] + r["lost"] + r["rejected_503"] == 0 and r["ttft_p99"] < 2.0
    ]
    md += (
        f"\nHighest offered rate with zero failures and p99 TTFT under 2 s: {max(clean):g} req/s\n"
        if clean
        else "\nNo rate met zero failures with p99 TTFT under 2 s.\n"
    )
    return md


def _plot_path(args: argparse.Namespace) -> Path:
    return Path(args.out_dir) / f"w5-serve-{time.strftime('%Y%m%d-%H%M%S')}.png"


def _save(args: argparse.Namespace, name: str, report: dict[str, Any], md: str) -> dict[str, Any]:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report.setdefault("machine", machine_info())
    (out / f"{name}-{stamp}.md").write_text(md)
    (out / f"{name}-{stamp}.json").write_text(json.dumps(report, indent=2))
    print("\n" + md)
    print(f"saved {out / f'{name}-{stamp}.md'} and .json")
    return report


def _plot(rows: list[dict[str, Any]], path: Path, label: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
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


# ---- flags ----------------------------------------------------------------------------------------
def add_abuse_args(group: Any) -> None:
    """The W5-hostile and overload flags (`forkllm bench serve`'s parser adds them to its group)."""
    group.add_argument(
        "--hostile",
        action="store_true",
        help="W5-hostile: a clean phase at --hostile-rate for --duration s, then the same arrivals while one "
        "client sends, in turn, a near-context prompt, n=--hostile-n and a chat request with scaling "
        "n=--hostile-scaling-n; reports the W5 clients' p99 TTFT in both phases, the ratio, and lost/errored "
        "requests (loopback servers only)",
    )
    group.add_argument(
        "--hostile-rate", type=float, default=2.0, help="W5 arrival rate of both hostile phases"
    )
    group.add_argument(
        "--hostile-n", type=int, default=256, help="n of the hostile client's many-samples request"
    )
    group.add_argument(
        "--hostile-scaling-n", type=int, default=64, help="self_consistency n of the hostile scaling request"
    )
    group.add_argument(
        "--hostile-max-tokens",
        type=int,
        default=None,
        help="max_tokens of the hostile n and scaling requests (default: the top of --output-range)",
    )
    group.add_argument(
        "--near-context-margin",
        type=int,
        default=8,
        help="the near-context prompt is max_model_len minus this many tokens (which it then generates)",
    )
    group.add_argument(
        "--overload",
        action="store_true",
        help="report the --rates sweep as admission control (503 + Retry-After counts, admitted TTFT, silent "
        "drops); adds rates at twice the best completed req/s (up to 3) until the offered rate reaches it "
        "(loopback servers only; start the server with --max-num-waiting)",
    )


def add_w5_args(group: Any) -> None:
    """The W5 client's flags, for the standalone parser (`python -m forkllm.bench.serve_bench`)."""
    group.add_argument(
        "--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 base URL (any OpenAI-compatible)"
    )
    group.add_argument("--api-key", default=None, help="bearer key for the server")
    group.add_argument(
        "--served-model", default=None, help="model id to request (default: the first of /v1/models)"
    )
    group.add_argument("--rates", default="1,2,4,8", help="offered Poisson arrival rates, req/s")
    group.add_argument(
        "--duration", type=float, default=60.0, help="seconds of arrivals per rate (per phase)"
    )
    group.add_argument("--prompt-len", default=None, help="min-max prompt tokens (default 64-512)")
    group.add_argument(
        "--output-range", default=None, help="min-max output tokens per request (default 32-256)"
    )
    group.add_argument("--no-ignore-eos", action="store_true", help="do not send vLLM's ignore_eos extension")
    group.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds before a request without an answer is lost",
    )
    group.add_argument("--label", default=None, help="name of the system under test in the report")
    group.add_argument("--out-dir", default="bench_results", help="where the markdown/JSON reports go")
    group.add_argument(
        "--workload-seed", type=int, default=0, help="seed of the synthetic prompts and arrivals"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m forkllm.bench.serve_bench",
        description="W5 serving benchmark (the same as `forkllm bench serve`): Poisson arrivals against an "
        "OpenAI-compatible server; --hostile and --overload for the abuse workloads.",
    )
    add_w5_args(p)
    add_abuse_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return bench_serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
