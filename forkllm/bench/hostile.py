"""W5-hostile (shared/BENCHMARKS.md): W5 traffic at a fixed rate, first alone (the clean phase),
then again with the same arrivals and prompts (each phase's prompts behind its own tag, so the
second computes them afresh instead of hitting the first's prefix cache) while one abusive client
sends, in turn and round after round until the arrivals end:

  (a) a near-context prompt: max_model_len minus --near-context-margin tokens, then that many
      generated (the token ids come from the server's /tokenize, else the default tokenizer);
  (b) n = --hostile-n samples of a short prompt (a 400 that names a smaller limit is recorded and
      the request sent again at that limit; without a number, at half the n);
  (c) a chat request with `"scaling": {"strategy": "self_consistency", "n": --hostile-scaling-n}`,
      with the same retry on a refused n.

The report gives the W5 clients' p99 TTFT in both phases and their ratio (target: at most 2x),
and for both the W5 clients and the hostile client the requests that were refused, errored or
lost (target: zero lost, i.e. no request without a response or an error). The hostile client's
requests are not streamed, each bounded by --request-timeout, at most one round per second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from forkllm.bench.report import machine_info
from forkllm.bench.serve_bench import (
    ERROR,
    LOST,
    OK,
    REJECTED,
    Setup,
    SideTask,
    row_line,
    run_phase,
    summarize,
)

REFUSED = "refused"  # a 4xx that names what it refuses: a limit the server holds to, not a failure
HOSTILE_OUTCOMES = (OK, REFUSED, REJECTED, ERROR, LOST)
RATIO_TARGET = 2.0
MAX_ROUNDS = 50
MAX_RETRIES = 8  # refusals of one request before giving up (256 halves to 1 in 8)

_LIMIT = re.compile(
    r"(?:at most|maximum(?: of| is)?|max(?:imum)?(?: n)?(?: is| of|:)?|<=|up to|limit(?: is| of)?|"
    r"no more than|exceeds)\s*(\d+)",
    re.IGNORECASE,
)


@dataclass
class Attempt:
    kind: str  # near_context | many_samples | scaling
    asked: int  # n, or the prompt's tokens for near_context
    status: int | None
    outcome: str
    seconds: float
    detail: str = ""  # the error message, if any
    param: str | None = None  # the field an error names, if any


@dataclass
class HostilePlan:
    completions_url: str
    chat_url: str
    headers: dict[str, str]
    model: str
    prompt: str
    near_ids: list[int] | None  # None: the server's max_model_len is unknown
    near_max_tokens: int
    n: int
    scaling_n: int
    max_tokens: int
    ignore_eos: bool
    timeout: float


def parse_limit(message: str, asked: int) -> int | None:
    """A limit below `asked` named in a refusal ("n must be at most 128", "limit of 64"), if any."""
    found = [int(m) for m in _LIMIT.findall(message)]
    below = [x for x in found if 0 < x < asked]
    return max(below) if below else None


async def _post(
    client: Any, url: str, plan: HostilePlan, body: dict[str, Any]
) -> tuple[int | None, Any, str]:
    """(status, parsed body or None, detail); status None when nothing came back in time."""
    try:
        r = await asyncio.wait_for(
            client.post(url, json=body, headers=plan.headers, timeout=plan.timeout), plan.timeout
        )
    except asyncio.TimeoutError:
        return None, None, f"no response within {plan.timeout:g} s"
    except Exception as e:  # connection refused/reset: no answer
        return None, None, f"{type(e).__name__}: {e}"[:300]
    try:
        data = r.json()
    except ValueError:  # not JSON
        return r.status_code, None, r.text[:300]
    return r.status_code, data, ""


async def _attempt(
    client: Any, plan: HostilePlan, kind: str, asked: int, url: str, body: dict[str, Any], want_choices: int
) -> Attempt:
    t0 = time.perf_counter()
    status, data, detail = await _post(client, url, plan, body)
    seconds = time.perf_counter() - t0
    param: str | None = None
    if status is None:
        outcome = LOST
    elif status == 200:
        choices = data.get("choices") if isinstance(data, dict) else None
        if isinstance(choices, list) and len(choices) == want_choices:
            outcome, detail = OK, ""
        else:
            n_got = len(choices) if isinstance(choices, list) else None
            outcome, detail = ERROR, f"200 with {n_got} choices, expected {want_choices}"
    else:
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            detail = str(err.get("message") or err)[:300]
            param = str(err.get("param") or "") or None
        elif err is not None:
            detail = str(err)[:300]
        if status == 503:
            outcome = REJECTED
        elif 400 <= status < 500 and err is not None:
            outcome = REFUSED
        else:
            outcome = ERROR
    return Attempt(kind, asked, status, outcome, seconds, detail, param)


async def _at_limit(
    client: Any, plan: HostilePlan, kind: str, n: int, make: Any, url: str, want: Any
) -> tuple[list[Attempt], int]:
    """Send with `n`; on a refusal about n, again at the limit it names (or half). Returns the
    attempts and the n to use next time (the accepted one, or the last tried)."""
    attempts: list[Attempt] = []
    for _ in range(MAX_RETRIES):
        a = await _attempt(client, plan, kind, n, url, make(n), want(n))
        attempts.append(a)
        if a.outcome != REFUSED or n <= 1 or not _about_n(a):
            break
        n = parse_limit(a.detail, n) or n // 2
    return attempts, n


def _about_n(a: Attempt) -> bool:
    """A refusal worth resending with a smaller n: it names n (or scaling) or states a limit."""
    if a.param:
        return a.param in ("n", "best_of") or a.param.startswith("scaling")
    return parse_limit(a.detail, 1 << 30) is not None


def hostile_client(plan: HostilePlan) -> SideTask:
    async def run(client: Any, start: float, window: float) -> dict[str, Any]:
        attempts: list[Attempt] = []
        n, scaling_n = plan.n, plan.scaling_n
        rounds = 0
        while rounds < MAX_ROUNDS:
            rounds += 1
            round_start = time.perf_counter()
            if plan.near_ids is not None:
                body = {
                    "model": plan.model,
                    "prompt": plan.near_ids,
                    "max_tokens": plan.near_max_tokens,
                    "temperature": 0.0,
                }
                if plan.ignore_eos:
                    body["ignore_eos"] = True
                attempts.append(
                    await _attempt(
                        client, plan, "near_context", len(plan.near_ids), plan.completions_url, body, 1
                    )
                )
            tried, n = await _at_limit(
                client,
                plan,
                "many_samples",
                n,
                lambda k: _many_body(plan, k),
                plan.completions_url,
                lambda k: k,
            )
            attempts += tried
            tried, scaling_n = await _at_limit(
                client,
                plan,
                "scaling",
                scaling_n,
                lambda k: _scaling_body(plan, k),
                plan.chat_url,
                lambda k: 1,
            )
            attempts += tried
            if time.perf_counter() - start >= window:
                break
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - round_start)))
        return _client_report(attempts, rounds, plan)

    return run


def _many_body(plan: HostilePlan, n: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": plan.model,
        "prompt": plan.prompt,
        "n": n,
        "max_tokens": plan.max_tokens,
        "temperature": 1.0,
    }
    if plan.ignore_eos:
        body["ignore_eos"] = True
    return body


def _scaling_body(plan: HostilePlan, n: int) -> dict[str, Any]:
    return {
        "model": plan.model,
        "messages": [{"role": "user", "content": plan.prompt}],
        "max_tokens": plan.max_tokens,
        "temperature": 1.0,
        "scaling": {"strategy": "self_consistency", "n": n},
    }


def _client_report(attempts: list[Attempt], rounds: int, plan: HostilePlan) -> dict[str, Any]:
    counts = {o: sum(1 for a in attempts if a.outcome == o) for o in HOSTILE_OUTCOMES}

    def accepted(kind: str) -> int | None:
        ok = [a.asked for a in attempts if a.kind == kind and a.outcome == OK]
        return max(ok) if ok else None

    return {
        "rounds": rounds,
        "sent": len(attempts),
        **counts,
        "near_context_tokens": len(plan.near_ids) if plan.near_ids is not None else None,
        "n_asked": plan.n,
        "n_accepted": accepted("many_samples"),
        "scaling_n_asked": plan.scaling_n,
        "scaling_n_accepted": accepted("scaling"),
        "attempts": [asdict(a) for a in attempts],
    }


def near_context_ids(setup: Setup, length: int) -> tuple[list[int], str]:
    """`length` token ids in the server's vocabulary: from its /tokenize if it has one, else from
    the default tokenizer (the W5 prompts' ids); repeated to the length."""
    import httpx

    root = setup.base[: -len("/v1")] if setup.base.endswith("/v1") else setup.base
    source = "default tokenizer"
    ids: list[int] = [t for p in setup.prompt_ids for t in p]
    try:
        r = httpx.post(
            root + "/tokenize",
            json={"model": setup.model, "prompt": "\n".join(setup.traffic.prompts[:20])},
            headers=setup.traffic.headers,
            timeout=60,
        )
        tokens = r.json().get("tokens") if r.status_code == 200 else None
        if isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens):
            ids, source = tokens, "the server's /tokenize"
    except (httpx.HTTPError, ValueError):
        pass
    reps = -(-length // len(ids))
    return (ids * reps)[:length], source


def _warm_up(setup: Setup) -> None:
    import httpx

    for i in range(2):
        body = {**setup.traffic.body(i), "max_tokens": 4, "stream": False}
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(
                setup.traffic.url, json=body, headers=setup.traffic.headers, timeout=setup.traffic.timeout
            )


def run_hostile(args: argparse.Namespace, setup: Setup) -> tuple[dict[str, Any], str]:
    rate = float(args.hostile_rate)
    margin = int(args.near_context_margin)
    max_len = setup.card.get("max_model_len")
    near_ids, source = (None, "")
    if isinstance(max_len, int) and max_len > margin + 1:
        near_ids, source = near_context_ids(setup, max_len - margin)
    plan = HostilePlan(
        completions_url=setup.traffic.url,
        chat_url=setup.base + "/chat/completions",
        headers=setup.traffic.headers,
        model=setup.model,
        prompt=setup.traffic.prompts[0],
        near_ids=near_ids,
        near_max_tokens=margin,
        n=int(args.hostile_n),
        scaling_n=int(args.hostile_scaling_n),
        max_tokens=int(args.hostile_max_tokens or setup.ohi),
        ignore_eos=setup.traffic.ignore_eos,
        timeout=float(args.request_timeout),
    )
    _warm_up(setup)
    phases: dict[str, dict[str, Any]] = {}
    client_report: dict[str, Any] = {}
    for name in ("clean", "hostile"):
        print(
            f"W5-hostile, {name} phase: {rate:g} req/s for {args.duration:g}s against {setup.base} "
            f"({setup.model}) ...",
            flush=True,
        )
        side = hostile_client(plan) if name == "hostile" else None
        results, wall, side_result = asyncio.run(
            run_phase(setup.traffic, rate, args.duration, args.workload_seed, side, tag=f"[{name}] ")
        )
        phases[name] = summarize(rate, results, wall)
        print("  " + row_line(phases[name]), flush=True)
        if side_result is not None:
            client_report = side_result
    clean, hostile = phases["clean"], phases["hostile"]
    ratio = hostile["ttft_p99"] / clean["ttft_p99"] if clean["ttft_p99"] > 0 else float("nan")
    silent = clean["lost"] + hostile["lost"] + client_report["lost"]
    report: dict[str, Any] = {
        "mode": "hostile",
        "machine": machine_info(),
        "rate": rate,
        "duration_s": args.duration,
        "clean": clean,
        "hostile": hostile,
        "ttft_p99_ratio": ratio,
        "hostile_client": client_report,
        "near_context_source": source or None,
        "silent_drops": silent,
        "targets": {
            "ttft_p99_ratio_at_most": RATIO_TARGET,
            "ratio_met": bool(ratio <= RATIO_TARGET),
            "zero_silent_drops": silent == 0,
        },
    }
    return report, _markdown(args, setup, report)


def _markdown(args: argparse.Namespace, setup: Setup, rep: dict[str, Any]) -> str:
    m = rep["machine"]
    hc = rep["hostile_client"]
    md = (
        f"## W5-hostile: {args.label or setup.model} at {setup.base}\n\nW5 traffic at {rep['rate']:g} req/s "
        f"(Poisson, {args.duration:g} s per phase, the same arrivals and prompts in both, each phase's behind its own tag (no cache hits across phases); prompts "
        f"{setup.lo}-{setup.hi} tokens, outputs {setup.olo}-{setup.ohi}), first alone, then beside one hostile "
        f"client; client on the same machine ({m['nproc']} cores, {m['cpu']}).\n\n"
        "| phase | sent | completed | 503 | errors | lost | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for name in ("clean", "hostile"):
        r = rep[name]
        md += (
            f"| {name} | {r['sent']} | {r['completed']} | {r['rejected_503']} | {r['errors']} | {r['lost']} | "
            f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['itl_p50'] * 1e3:.0f} | {r['itl_p99'] * 1e3:.0f} |\n"
        )
    t = rep["targets"]
    md += (
        f"\nW5 p99 TTFT with the hostile client / without: **{rep['ttft_p99_ratio']:.2f}x** "
        f"(target at most {t['ttft_p99_ratio_at_most']:g}x: {'met' if t['ratio_met'] else 'NOT met'}). "
        f"Silent drops (no response, no error), W5 and hostile together: **{rep['silent_drops']}** "
        f"(target 0: {'met' if t['zero_silent_drops'] else 'NOT met'}).\n\n"
        f"Hostile client: {hc['rounds']} round(s), {hc['sent']} requests: {hc['ok']} ok, {hc['refused']} refused "
        f"(4xx naming a limit), {hc['rejected']} 503, {hc['error']} errors, {hc['lost']} lost. "
        f"Near-context prompt: {hc['near_context_tokens'] or 'skipped (no max_model_len in /v1/models)'} tokens"
        f"{' from ' + rep['near_context_source'] if rep['near_context_source'] else ''}; n asked {hc['n_asked']}, "
        f"accepted {hc['n_accepted']}; scaling n asked {hc['scaling_n_asked']}, accepted {hc['scaling_n_accepted']}.\n\n"
        "| hostile request | asked (n or prompt tokens) | status | outcome | seconds | detail |\n|---|---|---|---|---|---|\n"
    )
    for a in hc["attempts"]:
        detail = str(a["detail"]).replace("|", "\\|")[:160]
        md += f"| {a['kind']} | {a['asked']} | {a['status']} | {a['outcome']} | {a['seconds']:.2f} | {detail} |\n"
    return md
