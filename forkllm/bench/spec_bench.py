"""`forkllm bench speculative`: W7 and speculation's effect on W1 / W2 (issue 17's targets).

Rows, each measured with and without speculation on engines loaded side by side, the variants
run in turn rep by rep (so a drifting machine shifts both alike), outputs compared token for token:
- W7 single stream: 16 input-grounded prompts (summarize / repeat with edits / code edit / answer
  from a passage), 256 tokens, greedy, one request at a time: decode tokens/s (prompt time
  excluded: each request's first-token time is taken off).
- W7 batch: the same 16 prompts in one batch: output tokens/s over the whole run.
- W2: 8 prompts x n = 16, t = 0.8, 128 tokens (sibling drafts: "suffix").
- W1: 64 prompts x 128 tokens greedy: speculation must back off, not slow it down.
Mean accepted length and acceptance rate per proposer come from the engine's metrics. Outputs
are compared with the run without speculation (the least identical count over reps is reported):
float32 gives the same tokens; bf16 can differ where a draft row is computed in a different
batch shape than its position would have been (shared-prefix groups of siblings), as any change
of batch composition can in bf16.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

from forkllm.bench.report import Row, machine_info, median, save, table
from forkllm.bench.spec_bound import StepRecord, ceiling, record_steps, step_curve
from forkllm.engine.args import engine_kwargs

_PASSAGES = [
    (
        "The Amazon rainforest covers much of the Amazon basin of South America. The basin spans seven "
        "million square kilometres, of which five and a half million are covered by the rainforest. The "
        "region includes territory of nine nations and 3,344 indigenous territories. The majority of the "
        "forest, sixty percent, is in Brazil, followed by Peru with thirteen percent and Colombia with ten "
        "percent. The rainforest likely formed during the Eocene era, after a global reduction of tropical "
        "temperatures when the Atlantic Ocean had widened enough to provide a warm, moist climate."
    ),
    (
        "Photosynthesis is the process by which green plants, algae and some bacteria turn light energy "
        "into chemical energy. During photosynthesis, light energy is captured and used to convert water, "
        "carbon dioxide and minerals into oxygen and energy-rich organic compounds. The light-dependent "
        "reactions take place in the thylakoid membranes of the chloroplasts, while the Calvin cycle takes "
        "place in the stroma. Nearly all life on Earth depends on photosynthesis, directly or indirectly, "
        "as the source of its energy and of the oxygen in the atmosphere."
    ),
    (
        "The meeting opened at nine. Maria presented the quarterly sales report: revenue grew by twelve "
        "percent, driven by the new subscription plan, while hardware sales fell by four percent. Tom "
        "raised concerns about the delayed shipping software, which is now three weeks behind schedule. "
        "The team agreed to move two engineers from the website project to the shipping software until the "
        "end of the month. The next meeting will review the hiring plan and the budget for the second half "
        "of the year."
    ),
    (
        "def load_users(path):\n    users = []\n    with open(path) as f:\n        for line in f:\n"
        "            name, age, city = line.strip().split(',')\n            users.append({'name': name, "
        "'age': int(age), 'city': city})\n    return users\n\n\ndef users_in_city(users, city):\n"
        "    result = []\n    for user in users:\n        if user['city'] == city:\n"
        "            result.append(user)\n    return result\n"
    ),
]

W7_TOKENS = 256  # most output tokens per W7 request (greedy, ends at end-of-sequence)

_TASKS = [
    "Summarize the following text in a few sentences.\n\n{p}",
    "Repeat the following text exactly, but replace every number with the word NUMBER.\n\n{p}",
    "Rewrite the following text, keeping every sentence but putting each sentence on its own line.\n\n{p}",
    "Using only the following text, answer: what is the main subject, and what facts are given about "
    "it? Quote the sentences you use.\n\n{p}",
]


def w7_messages() -> list[list[dict[str, str]]]:
    """16 input-grounded chat prompts: 4 tasks x 4 passages (the code passage gets code edits)."""
    out = []
    for i, p in enumerate(_PASSAGES):
        tasks = _TASKS
        if i == 3:
            tasks = [
                "Add type hints and a docstring to every function in this code. Output the whole code.\n\n{p}",
                "Rename the variable `users` to `people` everywhere in this code. Output the whole code.\n\n{p}",
                "Rewrite this code to use list comprehensions. Output the whole code.\n\n{p}",
                "Explain what this code does, quoting each line you explain.\n\n{p}",
            ]
        out += [[{"role": "user", "content": t.format(p=p)}] for t in tasks]
    return out


def _spec_metrics(engine: Any) -> dict[str, float]:
    return {k: v for k, v in engine.metrics().items() if k.startswith("spec_")}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    d = after.get("spec_draft_tokens", 0) - before.get("spec_draft_tokens", 0)
    a = after.get("spec_accepted_tokens", 0) - before.get("spec_accepted_tokens", 0)
    n = after.get("spec_drafts", 0) - before.get("spec_drafts", 0)
    h = after.get("spec_history_drafts", 0) - before.get("spec_history_drafts", 0)
    return {
        "draft": d,
        "accepted": a,
        "rate": a / d if d else 0.0,
        "mean_len": 1 + a / n if n else 0.0,
        "history_drafts": h,
        "drafts": n,
    }


def _single_stream(llm: Any, prompts: list[list[int]], sp: Any) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of requests run one at a time (time after each first token)."""
    eng = llm.engine
    tokens, seconds, outs = 0, 0.0, []
    for ids in prompts:
        eng.add_request(ids, sp)
        first = None
        done = None
        while eng.has_unfinished_requests():
            for ro in eng.step():
                if first is None and ro.outputs and ro.outputs[0].token_ids:
                    first = time.perf_counter()
                if ro.finished:
                    done = ro
        end = time.perf_counter()
        assert done is not None and first is not None
        out = done.outputs[0].token_ids
        outs.append(out)
        tokens += len(out) - 1
        seconds += end - first
    return tokens / seconds, outs


def _batch(llm: Any, prompts: list[Any], sp: Any) -> tuple[float, list[list[list[int]]]]:
    t0 = time.perf_counter()
    res = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    outs = [[o.token_ids for o in r.outputs] for r in res]
    return sum(len(o) for r in outs for o in r) / dt, outs


def _spec_engine(kw: dict[str, Any], variant: str) -> Any:
    """`suffix`; `suffix-tree3`: draft trees of 3 guesses; `suffix-history0`: no history of
    finished requests (or another size in tokens)."""
    from forkllm import LLM

    name, extra = variant, {}
    fields = {"tree": "speculative_tree_width", "history": "speculative_history_tokens"}
    while True:  # options at the end only: a draft model's path may hold dashes
        head, _, opt = name.rpartition("-")
        key = next((k for k in fields if opt.startswith(k) and opt[len(k) :].isdigit()), None)
        if not head or key is None:
            break
        extra[fields[key]] = int(opt[len(key) :])
        name = head
    return LLM(**{**kw, "speculative": name, **extra})


def _llamacpp_lookup_rows(
    args: argparse.Namespace, prompts: list[list[int]], out_len: int, results: dict[str, Any]
) -> list[Row]:
    """llama.cpp's prompt lookup decoding on the W7 prompts, single stream, in its own interpreter
    (`--peers llamacpp`): a row without and a row with, speedup against its own 'off'."""
    from forkllm.bench.peers import subprocess_peer_rows

    only = argparse.Namespace(**{**vars(args), "peers_list": ["llamacpp"]})
    peer_rows, info = subprocess_peer_rows(only, "lookup", prompts, out_len)
    results["W7 single stream: llama.cpp"] = info.get("llamacpp", {})
    out: list[Row] = []
    for r in peer_rows:
        if "tok_s" not in r.metrics:  # not installed or failed: the row says why
            out.append(Row(f"W7 single stream: {r.system}", r.dtype, {}, note=r.note))
            continue
        runs = info["llamacpp"].get("runs", [])
        same = min((int(x.get("identical", 0)) for x in runs), default=0)
        off = r.metrics["off_tok_s"]
        out.append(
            Row(f"W7 single stream: {r.system} off", r.dtype, {"tok_s": off, "speedup": 1.0}, note=r.note)
        )
        out.append(
            Row(
                f"W7 single stream: {r.system} lookup",
                r.dtype,
                {"tok_s": r.metrics["tok_s"], "speedup": r.metrics["speedup"]},
                note=f"x its own off; {same}/{len(prompts)} outputs identical to its off",
                samples=r.samples,
            )
        )
        print(
            f"W7 single stream: {r.system}: off {off:.1f} tok/s, lookup {r.metrics['tok_s']:.1f} "
            f"({r.metrics['speedup']:.2f}x), {same}/{len(prompts)} identical",
            flush=True,
        )
    return out


def bench_speculative(args: argparse.Namespace) -> int:
    from forkllm import LLM, SamplingParams
    from forkllm.bench.workloads import make_prompts

    kw = engine_kwargs(args)
    kw.pop("speculative", None)
    reps = max(1, args.reps)
    proposers = [p for p in (args.proposers or "ngram,suffix").split(",") if p]
    base = LLM(**kw)
    tok = base.engine.tokenizer
    assert tok is not None
    w7 = [tok.encode(tok.apply_chat_template(m), add_special_tokens=False) for m in w7_messages()]
    if args.limit:
        w7 = w7[: args.limit]
    engines = {"off": base} | {p: _spec_engine(kw, p) for p in proposers}
    label = str(kw.get("dtype") or "auto")  # the rows' dtype column, with a quantization if one is set
    if kw.get("quantization") not in (None, "auto", "none"):
        label += f", {kw['quantization']}"
    rows: list[Row] = []
    results: dict[str, Any] = {}
    greedy = SamplingParams(temperature=0, max_tokens=W7_TOKENS)

    def run(
        name: str, fn: Any, prompts: Any, sp: Any, variants: list[str], with_prompts: bool = True
    ) -> dict[str, tuple[float, dict[str, float]]]:
        speeds: dict[str, list[float]] = {v: [] for v in variants}
        acc: dict[str, dict[str, float]] = {}
        same: dict[str, int] = {}
        ref: Any = None
        off_steps: list[StepRecord] = []  # the first run without speculation, step by step
        for rep in range(reps):
            order = variants if rep % 2 == 0 else variants[::-1]
            for v in order:
                llm = engines[v]
                llm.engine.kv.pool.drop_cached()
                if llm.engine.spec is not None:  # drafts from this run's finished requests only
                    llm.engine.spec.clear_history()
                before = _spec_metrics(llm.engine)
                with record_steps(llm.engine) as steps:
                    speed, outs = fn(llm, prompts, sp)
                if v == "off" and rep == 0:
                    off_steps = steps
                speeds[v].append(speed)
                acc[v] = _delta(_spec_metrics(llm.engine), before)
                if ref is None:
                    ref = outs
                same[v] = min(same.get(v, len(outs)), sum(a == b for a, b in zip(outs, ref)))
        out = {v: (median(speeds[v]), acc[v]) for v in variants}
        off = out["off"][0]
        for v in variants:
            speed, a = out[v]
            note = f"{same[v]}/{len(ref)} outputs identical to off"
            if v != "off":
                note += (
                    f"; accepted {a['rate']:.0%} of {a['draft']:.0f} drafted, mean length {a['mean_len']:.2f}"
                )
                if a["history_drafts"]:
                    note += f"; {a['history_drafts']:.0f} of {a['drafts']:.0f} drafts from earlier requests"
            rows.append(
                Row(
                    f"{name}: {v}",
                    label,
                    {"tok_s": speed, "speedup": speed / off},
                    note=note,
                    samples={"tok_s": speeds[v]},
                )
            )
            print(f"{name}: {v}: {speed:.1f} tok/s ({speed / off:.2f}x) {note}", flush=True)
        results[name] = {v: {"tok_s": s, "identical": same[v], **a} for v, (s, a) in out.items()}
        if curve and len(variants) > 1:
            best = max(out[v][1]["mean_len"] for v in variants[1:])
            bound = ceiling(off_steps, curve, best, prompts=with_prompts)
            ceilings.append(f"{name}: {bound.describe()}")
            results[name]["ceiling"] = {
                "mean_length": bound.at_length,
                "speedup_at_length": bound.speedup_at_length,
                "speedup_unlimited": bound.speedup_unlimited,
                "prompt_seconds": bound.prompt_seconds,
                "off_seconds": bound.off_seconds,
            }
            print(f"{name}: {bound.describe()}", flush=True)
        return out

    variants = ["off", *proposers]
    ceilings: list[str] = []
    curve: dict[int, float] = {}
    if not args.no_bound:
        curve = step_curve(base, w7[0])
        results["step_curve_seconds"] = curve
        print(
            "decode step by rows: " + ", ".join(f"{r}: {t * 1e3:.1f} ms" for r, t in curve.items()),
            flush=True,
        )
    # timed from each first token, so its ceiling leaves the prompt steps out
    run("W7 single stream", _single_stream, w7, greedy, variants, with_prompts=False)
    if "llamacpp" in getattr(args, "peers_list", []):
        rows.extend(_llamacpp_lookup_rows(args, w7, W7_TOKENS, results))
    run("W7 batch of 16", _batch, w7, greedy, variants)
    if not args.skip_throughput:
        w2 = [p.token_ids for p in make_prompts(tok, 8, 96, 160, seed=2)]
        w2_sp = SamplingParams(temperature=0.8, top_p=0.95, n=16, seed=0, max_tokens=128, ignore_eos=True)
        run("W2 8 x n=16", _batch, w2, w2_sp, variants)
        w1 = [p.token_ids for p in make_prompts(tok, 64, 96, 160, seed=1)]
        w1_sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        run("W1 64 x 128", _batch, w1, w1_sp, variants)

    m = machine_info()
    md = (
        f"## W7 speculative decoding ({reps} reps, variants in turn)\n\n"
        f"machine: {m['nproc']} cores, {m['cpu']}, torch {m['torch']} with {m['torch_threads']} threads; "
        f"num_speculative_tokens {kw.get('num_speculative_tokens', 8)}\n\n"
    )
    md += table(rows, [("tok_s", "tok/s"), ("speedup", "x off")], None, "tok_s")
    if curve:
        md += (
            "\nDecode step time by rows (samples of one W7 prompt): "
            + ", ".join(f"{r}: {t * 1e3:.1f} ms" for r, t in curve.items())
            + "\n\n"
            + "\n".join(f"- {c}" for c in ceilings)
            + "\n"
        )
    print("\n" + md)
    path = save(args.out_dir, "speculative", md, rows, {"results": results})
    print(f"\nsaved {path}")
    engines.clear()
    gc.collect()
    return 0
