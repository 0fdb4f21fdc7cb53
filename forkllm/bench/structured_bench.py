"""`forkllm bench structured`: what a JSON schema costs (issue 16's mask-overhead targets).

- Decode step time with a nested JSON schema vs unconstrained, at batch 1 and batch 64: the
  median wall time of engine steps in which every sequence of the batch decodes one token (no
  prefill in the step, nobody finished). The variants run on two engines of the same model,
  stepped in turn, so the shared machine's busy moments fall on both alike; the engines swap
  variants every rep. The schema's shortest valid object is longer than the
  measured tokens, so constrained sequences never end early; they cross structural states
  (few allowed tokens) and string states (nearly all allowed), as real JSON does.
- Time to first token of a request whose schema the engine has never seen (compiled when the
  request is made) vs an unconstrained request, one at a time; the first structured request of an
  engine also builds llguidance's view of the vocabulary, reported on its own.

TTFT variants run interleaved, rep by rep, so a drifting shared machine shifts both alike.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from typing import Any

import torch

from forkllm.bench.report import Row, machine_info, median, save, table
from forkllm.engine.args import engine_kwargs

# Nested objects, arrays, enums, numbers. Its shortest valid object is ~45 tokens (the summary's
# minLength alone is ~10), so 32 decoded tokens never complete it.
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "geo": {
                    "type": "object",
                    "properties": {
                        "lat": {"type": "number", "minimum": -90, "maximum": 90},
                        "lon": {"type": "number", "minimum": -180, "maximum": 180},
                    },
                    "required": ["lat", "lon"],
                    "additionalProperties": False,
                },
            },
            "required": ["city", "zip", "geo"],
            "additionalProperties": False,
        },
        "summary": {"type": "string", "minLength": 40, "maxLength": 120},
    },
    "required": ["name", "age", "role", "tags", "address", "summary"],
    "additionalProperties": False,
}


def _prompt_ids(tok: Any, i: int) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": f"({i}) Describe user number {i} of our web site as a JSON object."}]
    )
    return tok.encode(text, add_special_tokens=False)


def _paired_decode_steps(
    engines: dict[str, Any],
    prompts: list[list[int]],
    params: dict[str, Any],
    mask_times: dict[str, list[float]],
) -> dict[str, list[float]]:
    """Each variant decodes the same prompts on its own engine, one step of each in turn (the
    order flipping every step), so a busy moment of the shared machine lands on both alike.
    Returns the wall times of the steps in which every request of a variant decoded one token;
    after each such step of a constrained engine its live masks are filled and applied once
    more, outside the timed step, to time those two parts on their own."""
    for name, engine in engines.items():
        engine.kv.pool.drop_cached()
        for p in prompts:
            engine.add_request(p, params[name])
    times: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    turn = 0
    while any(e.has_unfinished_requests() for e in engines.values()):
        turn += 1
        for name in names if turn % 2 else names[::-1]:
            engine = engines[name]
            if not engine.has_unfinished_requests():
                continue
            gen0, pre0 = engine.stats.generation_tokens, engine.stats.prompt_tokens_computed
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            full = engine.stats.generation_tokens - gen0 == len(prompts)
            if full and engine.stats.prompt_tokens_computed == pre0:
                times[name].append(dt)
                if params[name].structured is not None:
                    _time_masks(engine, mask_times)
    return times


def _time_masks(engine: Any, mask_times: dict[str, list[float]]) -> None:
    from forkllm.structured.mask import apply_bitmask, fill_bitmasks

    states = [s.grammar for s in engine.seqs.values() if s.grammar is not None and not s.finished]
    if not states:
        return
    logits = torch.zeros(len(states), engine.model_config.vocab_size)
    pool = engine.sampler._grammar_pool  # the engine's mask pool (made by its first constrained step)
    t0 = time.perf_counter()
    bitmask = fill_bitmasks(states, logits.shape[1], pool)
    t1 = time.perf_counter()
    apply_bitmask(logits, bitmask, None, engine.sampler.ops)
    t2 = time.perf_counter()
    mask_times["fill"].append(t1 - t0)
    mask_times["apply"].append(t2 - t1)


def _ttft(engine: Any, prompt: list[int], params: Any) -> float:
    """Seconds from making the request (grammar compile included) to its first token."""
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, params)
    req = engine.requests[rid]
    while req.metrics.first_token_time is None:
        engine.step()
    t = time.perf_counter() - t0
    engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return t


def _fresh_schema(i: int) -> dict[str, Any]:
    """A schema no earlier request used (a property named after the rep): a cache miss."""
    s = copy.deepcopy(BENCH_SCHEMA)
    s["properties"][f"note_{i}"] = {"type": "string", "maxLength": 16}
    s["required"] = [*s["required"], f"note_{i}"]
    return s


def bench_structured(args: argparse.Namespace) -> int:
    from forkllm import LLM, SamplingParams, StructuredOutputsParams

    reps = args.reps + args.reps % 2  # even: each variant as often on each engine
    out_len = args.output_len or 32
    batches = [int(b) for b in (args.batches or "1,64").split(",")]
    kw = engine_kwargs(args)
    kw["max_num_seqs"] = max(kw.get("max_num_seqs") or 0, max(batches))
    kw["kv_cache_memory"] = kw.get("kv_cache_memory") or "1GiB"  # two engines live side by side
    # Two engines of the same model and settings, one per variant, stepped in turn; they swap
    # variants every rep (two identical engines differed by up to 12% at batch 1 here, memory
    # placement, so each variant runs on each engine equally often).
    pair = [LLM(**kw), LLM(**kw)]
    tok = pair[0].get_tokenizer()
    dtype = str(pair[0].engine.dtype).removeprefix("torch.")
    schema = StructuredOutputsParams(json=BENCH_SCHEMA)
    plain = SamplingParams(temperature=1.0, max_tokens=out_len, ignore_eos=True, seed=0)
    params = {"plain": plain, "json": plain.clone(structured=schema)}

    # Warm-up: kernels, allocator, and the first structured request (it builds the vocabulary).
    vocab_times = []
    for llm in pair:
        grammars = llm.engine.inputs.grammars
        assert grammars is not None, "structured output needs a model with a tokenizer"
        t0 = time.perf_counter()
        _ = grammars.ll_tokenizer
        vocab_times.append(time.perf_counter() - t0)
        for sp in params.values():
            llm.generate([_prompt_ids(tok, -1)], sp.clone(max_tokens=4), use_tqdm=False)
    vocab_seconds = min(vocab_times)

    def engines_for(rep: int) -> dict[str, Any]:
        a, b = (pair[0].engine, pair[1].engine) if rep % 2 == 0 else (pair[1].engine, pair[0].engine)
        return {"plain": a, "json": b}

    rows: list[Row] = []
    results: dict[str, Any] = {"vocab_seconds": vocab_seconds}
    for b in batches:
        prompts = [_prompt_ids(tok, i) for i in range(b)]
        samples: dict[str, list[float]] = {"plain": [], "json": []}
        mask_times: dict[str, list[float]] = {"fill": [], "apply": []}
        for rep in range(reps):
            for name, ts in _paired_decode_steps(engines_for(rep), prompts, params, mask_times).items():
                samples[name] += ts
        p_ms, j_ms = median(samples["plain"]) * 1e3, median(samples["json"]) * 1e3
        fill_ms, apply_ms = median(mask_times["fill"]) * 1e3, median(mask_times["apply"]) * 1e3
        results[f"batch{b}"] = {
            "plain_ms": p_ms,
            "json_ms": j_ms,
            "overhead": j_ms / p_ms - 1,
            "mask_fill_ms": fill_ms,
            "mask_apply_ms": apply_ms,
        }
        note = (
            f"{len(samples['json'])} / {len(samples['plain'])} full decode steps; masks alone: "
            f"fill {fill_ms:.2f} ms + apply {apply_ms:.2f} ms per step"
        )
        rows.append(
            Row(f"unconstrained, batch {b}", dtype, {"step_ms": p_ms}, samples={"step": samples["plain"]})
        )
        rows.append(
            Row(
                f"JSON schema, batch {b}",
                dtype,
                {"step_ms": j_ms, "overhead_pct": 100 * (j_ms / p_ms - 1)},
                note=note,
                samples={"step": samples["json"]},
            )
        )
        print(
            f"batch {b}: step {p_ms:.2f} ms unconstrained, {j_ms:.2f} ms JSON "
            f"({100 * (j_ms / p_ms - 1):+.1f}%); {note}",
            flush=True,
        )

    ttft: dict[str, list[float]] = {"plain": [], "json": []}
    for rep in range(max(reps, 6)):
        prompt = _prompt_ids(tok, 1000 + rep)
        first = plain.clone(max_tokens=2)
        fresh = first.clone(structured=StructuredOutputsParams(json=_fresh_schema(rep)))
        order = [("plain", first), ("json", fresh)]
        engines = engines_for(rep // 2)
        for name, sp in order if rep % 2 == 0 else order[::-1]:
            engines[name].kv.pool.drop_cached()
            ttft[name].append(_ttft(engines[name], prompt, sp))
    p_t, j_t = median(ttft["plain"]) * 1e3, median(ttft["json"]) * 1e3
    results["ttft"] = {"plain_ms": p_t, "json_never_seen_ms": j_t, "delta_ms": j_t - p_t}
    rows.append(Row("TTFT unconstrained", dtype, {"ttft_ms": p_t}, samples={"ttft": ttft["plain"]}))
    rows.append(
        Row(
            "TTFT never-seen JSON schema",
            dtype,
            {"ttft_ms": j_t, "delta_ms": j_t - p_t},
            note="schema compiled when the request is made",
            samples={"ttft": ttft["json"]},
        )
    )
    print(
        f"TTFT: {p_t:.1f} ms unconstrained, {j_t:.1f} ms never-seen schema ({j_t - p_t:+.1f} ms)", flush=True
    )

    m = machine_info()
    md = (
        f"## structured output: JSON-schema masks ({reps} reps; engines stepped in turn)\n\n"
        f"machine: {m['nproc']} cores, {m['cpu']}, torch {m['torch']} with {m['torch_threads']} threads; "
        f"temperature 1.0, {out_len} decoded tokens per sequence; llguidance vocabulary built once per "
        f"engine in {vocab_seconds * 1e3:.0f} ms (first structured request)\n\n"
    )
    md += table(
        rows,
        [
            ("step_ms", "decode step ms"),
            ("overhead_pct", "overhead %"),
            ("ttft_ms", "TTFT ms"),
            ("delta_ms", "+ms"),
        ],
        None,
        "step_ms",
    )
    print("\n" + md)
    path = save(args.out_dir, "structured", md, rows, {"results": results})
    print(f"\nsaved {path}")
    pair.clear()  # free both engines before the caller goes on
    gc.collect()
    return 0
