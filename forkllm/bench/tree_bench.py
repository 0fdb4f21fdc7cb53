"""Tree workloads: W2 parallel sampling, W3 shared prefix, and shared-prefix attention on/off."""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch

from forkllm.attention.backend import AttentionBackend, select_backend
from forkllm.attention.metadata import AttentionBatch
from forkllm.bench.peers import describe, in_process_row, ratios, subprocess_peer_rows
from forkllm.bench.report import Row, median, save, table
from forkllm.engine.args import engine_kwargs


def _llm(args: argparse.Namespace, **overrides: Any) -> Any:
    from forkllm import LLM

    kw = engine_kwargs(args)
    kw.update(overrides)
    return LLM(**kw)


def _dtype_name(llm: Any) -> str:
    return str(llm.engine.dtype).removeprefix("torch.")


def _run_engine(engine: Any, prompts: list[list[int]], params: Any) -> dict[str, Any]:
    """Add every request at t0, step to completion; wall time, peak pages and TTFTs."""
    engine.kv.pool.drop_cached()  # every repetition starts with a cold prefix cache
    t0 = time.time()
    rids = [engine.add_request(p, params, arrival_time=t0) for p in prompts]
    reqs = [engine.requests[r] for r in rids]
    peak, tokens = 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += sum(len(c.token_ids) for c in out.outputs)
        peak = max(peak, engine.kv.pool.num_used)
    wall = time.time() - t0
    ttfts = sorted(r.metrics.first_token_time - t0 for r in reqs)
    return {
        "seconds": wall,
        "tokens": tokens,
        "peak_pages": peak,
        "ttft_mean": statistics.mean(ttfts),
        "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))],
    }


def _repeat(fn: Any, reps: int) -> dict[str, float]:
    fn()  # warm-up
    runs = [fn() for _ in range(reps)]
    keys = runs[0].keys()
    return {k: median([r[k] for r in runs]) for k in keys}


# ---- W2 ----------------------------------------------------------------------------------------
def bench_parallel(args: argparse.Namespace) -> int:
    from forkllm import SamplingParams
    from forkllm.bench.workloads import make_prompts

    n_prompts = args.num_prompts or 8
    lo, hi = (int(x) for x in (args.prompt_len or "96-160").split("-"))
    out_len = args.output_len or 128
    n = args.n_samples
    rows: list[Row] = []
    prompts: list[list[int]] = []
    for dtype in args.dtypes_list:
        llm = _llm(args, dtype=dtype)
        prompts = [
            p.token_ids for p in make_prompts(llm.get_tokenizer(), n_prompts, lo, hi, args.workload_seed)
        ]
        sp = SamplingParams(
            n=n, temperature=0.8, top_p=0.95, max_tokens=out_len, ignore_eos=True, seed=args.workload_seed
        )
        r = _repeat(lambda llm=llm, sp=sp, prompts=prompts: _run_engine(llm.engine, prompts, sp), args.reps)
        unshared = n_prompts * n * -(-(hi + out_len) // llm.engine.config.block_size)
        rows.append(
            Row(
                "forkllm",
                _dtype_name(llm),
                {
                    "output_tok_s": r["tokens"] / r["seconds"],
                    "seconds": r["seconds"],
                    "peak_kv_pages": r["peak_pages"],
                },
                note=f"one prefill per prompt, {n - 1} forks; unshared would need up to {unshared} pages",
            )
        )
        print(
            f"forkllm {dtype}: {r['tokens'] / r['seconds']:.1f} output tok/s, peak pages {r['peak_pages']}",
            flush=True,
        )
        del llm
        gc.collect()
    ours = list(rows)
    if "hf" in args.peers_list:

        def hf() -> Row:
            from forkllm.bench.hf_peer import HFPeer

            peer = HFPeer(torch.float32)
            per_call = args.hf_batch_size or n_prompts
            gen = dict(do_sample=True, temperature=0.8, top_p=0.95, num_return_sequences=n)
            peer.generate(prompts[:1], 4, **gen)
            times = [peer.generate(prompts, out_len, batch_size=per_call, **gen)[1] for _ in range(args.reps)]
            t = median(times)
            del peer
            gc.collect()
            return Row(
                "hf-transformers",
                "float32",
                {"output_tok_s": n_prompts * n * out_len / t, "seconds": t},
                note=f"generate(num_return_sequences={n}), {per_call} prompts per call",
                samples={"seconds": times},
            )

        rows.append(in_process_row("hf-transformers", "float32", hf))
        print(f"hf float32: {describe(rows[-1])}", flush=True)
    peer_rows, peer_info = subprocess_peer_rows(
        args, "parallel", prompts, out_len, n=n, temperature=0.8, top_p=0.95, seed=args.workload_seed
    )
    rows += peer_rows
    md = (
        f"## W2 parallel sampling: {n_prompts} prompts of {lo}-{hi} tokens x n={n}, {out_len} output tokens, "
        f"temperature 0.8, top_p 0.95, ignore_eos (median of {args.reps}; every engine gets the same token ids)\n"
    )
    md += "\n" + table(
        rows,
        [("output_tok_s", "output tok/s"), ("seconds", "seconds"), ("peak_kv_pages", "peak KV pages")],
        None,
        "output_tok_s",
        speedup_of=ours,
    )
    print("\n" + md)
    extra = {"ratios": ratios(rows, "output_tok_s"), "peers": peer_info}
    print(f"\nsaved {save(args.out_dir, 'w2-parallel', md, rows, extra)}")
    return 0


# ---- W3 ----------------------------------------------------------------------------------------
def bench_prefix(args: argparse.Namespace) -> int:
    from forkllm import SamplingParams
    from forkllm.bench.workloads import shared_prefix_prompts

    n_req = args.num_prompts or 64
    prefix = int(args.prompt_len or 1024)
    out_len = args.output_len or 32
    rows: list[Row] = []
    for dtype in args.dtypes_list:
        for cached in (True, False):
            llm = _llm(args, dtype=dtype, enable_prefix_caching=cached)
            prompts = [
                p.token_ids
                for p in shared_prefix_prompts(llm.get_tokenizer(), n_req, prefix, 32, args.workload_seed)
            ]
            sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
            r = _repeat(
                lambda llm=llm, sp=sp, prompts=prompts: _run_engine(llm.engine, prompts, sp), args.reps
            )
            rows.append(
                Row(
                    "forkllm" + (" prefix cache" if cached else " no cache"),
                    _dtype_name(llm),
                    {
                        "seconds": r["seconds"],
                        "ttft_mean_s": r["ttft_mean"],
                        "ttft_p90_s": r["ttft_p90"],
                        "output_tok_s": r["tokens"] / r["seconds"],
                    },
                )
            )
            print(
                f"forkllm {dtype} cache={cached}: {r['seconds']:.2f}s, mean TTFT {r['ttft_mean']:.2f}s, "
                f"p90 {r['ttft_p90']:.2f}s",
                flush=True,
            )
            del llm
            gc.collect()
    if "hf" in args.peers_list:
        from forkllm.bench.hf_peer import HFPeer

        peer = HFPeer(torch.float32)
        bs = args.hf_batch_size or 16
        peer.ttft_run(prompts[:2], 2, bs)
        runs = [peer.ttft_run(prompts, out_len, bs) for _ in range(args.reps)]
        rows.append(
            Row(
                "hf-transformers",
                "float32",
                {
                    "seconds": median([r["seconds"] for r in runs]),
                    "ttft_mean_s": median([r["ttft_mean"] for r in runs]),
                    "ttft_p90_s": median([r["ttft_p90"] for r in runs]),
                    "output_tok_s": n_req * out_len / median([r["seconds"] for r in runs]),
                },
                note=f"static batches of {bs}, all requests arrive at t=0",
            )
        )
    base = next((r for r in rows if r.system == "forkllm no cache"), None)
    md = (
        f"## W3 shared prefix: {n_req} requests = one {prefix}-token system prompt + a distinct 32-token "
        f"question, {out_len} output tokens, greedy, all arriving at t=0 (median of {args.reps})\n"
    )
    md += "\n" + table(
        rows,
        [
            ("seconds", "total s"),
            ("ttft_mean_s", "mean TTFT s"),
            ("ttft_p90_s", "p90 TTFT s"),
            ("output_tok_s", "output tok/s"),
        ],
        base,
        "seconds",
        higher_is_better=False,
    )
    print("\n" + md)
    print(f"\nsaved {save(args.out_dir, 'w3-prefix', md, rows, {})}")
    return 0


# ---- shared-prefix attention -------------------------------------------------------------------
def _backends(engine: Any) -> dict[bool, AttentionBackend]:
    """The engine's attention backend with shared-prefix attention off and on (same kernels)."""
    r = engine.runner
    return {
        on: select_backend(
            r.kernels, r.block_size, r.scale, r.device, on, engine.config.min_shared_prefix_tokens
        )
        for on in (False, True)
    }


def _attention_only(engine: Any, backends: dict[bool, AttentionBackend], reps: int) -> dict[bool, float]:
    """Seconds per layer of decode attention for the engine's current decode rows over the same
    pages, per-sequence vs shared-prefix (one layer's cache, random queries of the model dtype)."""
    runner = engine.runner
    seqs = [s for s in engine.scheduler.running if s.num_tokens - s.num_computed_tokens == 1]
    batch = AttentionBatch(
        torch.empty(0, dtype=torch.long),
        [s.block_table for s in seqs],
        [s.num_computed_tokens + 1 for s in seqs],
    )
    cfg = engine.model_config
    q = torch.randn(len(seqs), cfg.num_heads, cfg.head_dim).to(runner.dtype)
    metas = {on: backends[on].build_metadata(batch) for on in (False, True)}
    assert metas[True].shared is not None and metas[False].shared is None, "no shared prefix found"
    out: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * reps + 2):
        on = i % 2 == 0
        t0 = time.perf_counter()
        backends[on].decode(runner.kv_caches[0], q, metas[on])
        if i >= 2:
            out[on].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in out.items()}


def bench_shared_attention(args: argparse.Namespace) -> int:
    """W2 shape with long prompts: decode step time and attention time, shared-prefix on vs off."""
    from forkllm import SamplingParams
    from forkllm.bench.workloads import make_prompts

    n_prompts = args.num_prompts or 8
    plen = int(args.prompt_len or 1024)
    steps = args.output_len or 32
    rows: list[Row] = []
    for dtype in args.dtypes_list:
        llm = _llm(args, dtype=dtype)
        engine = llm.engine
        tok = llm.get_tokenizer()
        prompts = [p.token_ids for p in make_prompts(tok, n_prompts, plen, plen, args.workload_seed)]
        sp = SamplingParams(
            n=args.n_samples, temperature=0.8, top_p=0.95, max_tokens=steps + 8, ignore_eos=True, seed=1
        )
        for p in prompts:
            engine.add_request(p, sp)
        while any(
            len(r.seqs) < args.n_samples or r.seqs[0].num_output_tokens < 2 for r in engine.requests.values()
        ):
            engine.step()  # prefill + fork, then a couple of decode steps so every row decodes
        times: dict[bool, list[float]] = {True: [], False: []}
        backends = _backends(engine)
        for i in range(steps):
            on = i % 2 == 0  # alternate so drift hits both equally
            engine.runner.attention = backends[on]
            t0 = time.perf_counter()
            engine.step()
            times[on].append(time.perf_counter() - t0)
        attn = _attention_only(engine, backends, reps=20)
        engine.abort_request(list(engine.requests))
        name, layers = _dtype_name(llm), engine.model_config.num_layers
        for on in (False, True):
            metrics = {
                "decode_step_ms": median(times[on]) * 1e3,
                "attention_ms_per_step": attn[on] * layers * 1e3,
            }
            label = "shared-prefix attention" if on else "per-sequence attention"
            rows.append(Row("forkllm", name, metrics, note=f"{label}, {n_prompts * args.n_samples} rows"))
        print(
            f"{name}: decode step {median(times[False]) * 1e3:.1f} ms per-sequence vs "
            f"{median(times[True]) * 1e3:.1f} ms shared ({median(times[False]) / median(times[True]):.2f}x); "
            f"attention alone {attn[False] * layers * 1e3:.1f} vs {attn[True] * layers * 1e3:.1f} ms per step "
            f"({attn[False] / attn[True]:.2f}x)",
            flush=True,
        )
        del llm, engine
        gc.collect()
    md = (
        f"## Shared-prefix attention: {n_prompts} prompts of {plen} tokens x n={args.n_samples}; decode step time "
        f"(median over {steps // 2} steps each, alternating) and decode attention time per step (one layer timed "
        f"on the same pages and queries, x layers)\n"
    )
    md += "\n" + table(
        rows,
        [("decode_step_ms", "decode step ms"), ("attention_ms_per_step", "attention ms per step")],
        None,
        "decode_step_ms",
    )
    print("\n" + md)
    print(f"\nsaved {save(args.out_dir, 'shared-attention', md, rows, {})}")
    return 0
