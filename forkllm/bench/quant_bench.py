"""`forkllm bench quality`: what keeping the GGUF's blocks costs in quality, against llama.cpp.

On one fixed English text (CPython's own help topics, shipped with every interpreter: the same
token ids into every engine) each system's perplexity, and on chat prompts the greedy tokens:
forkllm with the file's blocks (`quantization="gguf"`), forkllm dequantized (`"none"`), and
llama.cpp on the same GGUF (`--peers llamacpp`). The issue's bar: the kept-quantized perplexity
within 1% of llama.cpp's, and greedy tokens equal to llama.cpp's for the first 16 on most prompts.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from typing import Any

from forkllm.bench.peers import agreement, model_for, peer_python, run_peer
from forkllm.bench.report import save
from forkllm.bench.workloads import make_prompts

TOPICS = ("assignment", "for", "if", "while", "try", "with", "function", "class", "lambda", "import")


def fixed_text() -> str:
    """English prose that ships with CPython (pydoc's help topics), the same on every machine
    running one Python version."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[t] for t in TOPICS if t in topics)


def forkllm_quality(
    kwargs: dict[str, Any], text: list[int], prompts: list[list[int]], out_len: int
) -> dict[str, Any]:
    from forkllm import LLM, SamplingParams

    llm = LLM(**kwargs)
    t0 = time.perf_counter()
    out = llm.generate([text], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    lps = out.prompt_logprobs or []
    nll = -sum(pos[tok].logprob for pos, tok in zip(lps[1:], text[1:], strict=True) if pos is not None)
    greedy = [
        list(o.outputs[0].token_ids)
        for o in llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True), use_tqdm=False
        )
    ]
    info = llm.engine.load_info
    label = f"{str(llm.engine.dtype).removeprefix('torch.')}, quantization={info.quantization}"
    res = {
        "label": label,
        "nll": nll,
        "scored": len(text) - 1,
        "greedy": greedy,
        "seconds": time.perf_counter() - t0,
    }
    del llm
    gc.collect()
    return res


def bench_quality(args: argparse.Namespace) -> int:
    from forkllm.bench.run import _engine_kwargs
    from forkllm.models.loader import default_tokenizer

    n_text = int(args.prompt_len or 1024)
    out_len = int(args.output_len or 16)
    tok = default_tokenizer() if args.model is None else None
    if tok is None:
        from forkllm import LLM

        tok = LLM(**{**_engine_kwargs(args, args.dtype), "quantization": "none"}).get_tokenizer()
    text = tok.encode(fixed_text(), add_special_tokens=False)[:n_text]
    prompts = [
        p.token_ids for p in make_prompts(tok, int(args.num_prompts or 16), 32, 128, args.workload_seed)
    ]
    systems: list[dict[str, Any]] = []
    for q in (args.quantizations or "gguf,none").split(","):
        kw = _engine_kwargs(args, args.dtype)
        kw["quantization"] = q
        r = forkllm_quality(kw, text, prompts, out_len)
        r["system"] = "forkllm"
        systems.append(r)
        print(f"forkllm {r['label']}: perplexity {math.exp(r['nll'] / r['scored']):.4f}", flush=True)
    if "llamacpp" in args.peers_list:
        request = {
            "engine": "llamacpp",
            "workload": "quality",
            "model": model_for("llamacpp", args.model),
            "prompts": prompts,
            "text": text,
            "output_len": out_len,
            "reps": 1,
            "threads": args.num_threads,
        }
        res = run_peer(peer_python("llamacpp", getattr(args, "llamacpp_python", None)), request)
        if res.ok:
            run = res.data["runs"][0]
            systems.append(
                {
                    "system": f"llama.cpp {res.data.get('version', '')}",
                    "label": str(res.data.get("dtype")),
                    "nll": run["nll"],
                    "scored": run["scored"],
                    "greedy": res.data["greedy"],
                }
            )
            print(f"llama.cpp: perplexity {math.exp(run['nll'] / run['scored']):.4f}", flush=True)
        else:
            print(f"llama.cpp: {'not installed' if res.not_installed else 'failed'}: {res.error}", flush=True)
    ref = next((s for s in systems if s["system"].startswith("llama.cpp")), None)
    lines = [
        f"## Quality of kept-quantized weights: perplexity on {len(text)} tokens of CPython's help text; "
        f"greedy agreement over {len(prompts)} chat prompts x {out_len} tokens\n",
        "| system | weights | perplexity | vs llama.cpp | prompts whose first "
        f"{out_len} greedy tokens equal llama.cpp's | mean leading tokens equal |",
        "|---|---|---|---|---|---|",
    ]
    for s in systems:
        ppl = math.exp(s["nll"] / s["scored"])
        s["perplexity"] = ppl
        if ref is None or s is ref:
            lines.append(f"| {s['system']} | {s['label']} | {ppl:.4f} | | | |")
            continue
        rppl = math.exp(ref["nll"] / ref["scored"])
        agree = [agreement(a, b) for a, b in zip(s["greedy"], ref["greedy"], strict=True)]
        full = sum(a >= out_len for a in agree)
        s["agreement"] = agree
        lines.append(
            f"| {s['system']} | {s['label']} | {ppl:.4f} | {100 * (ppl / rppl - 1):+.2f}% | {full}/{len(agree)} "
            f"| {sum(agree) / len(agree):.1f} |"
        )
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    path = save(args.out_dir, "quality", md, [], {"systems": systems, "text_tokens": len(text)})
    print(f"saved {path}")
    return 0
