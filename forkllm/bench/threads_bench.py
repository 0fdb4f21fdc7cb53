"""W8 (`forkllm bench threads`): map-reduce reasoning threads, four ways.

8 documents x 4 chunks of ~256 tokens (sentences of the W7 passages, seeded). Per document: each
chunk summarized in a thread (`chunk\\n\\nMAP\\n`, `--output-len` tokens, default 64), then one reduce
(`\\nREDUCE\\n`, the same length) that sees every chunk and summary. Greedy, ignore_eos, so every
driver writes exactly as many tokens; all 8 documents run at once; raw text (no chat template).

- (a) in-engine, kv_concat: `LLM.threads_batch(docs, MapReduce(join="kv_concat"))`: the threads
  share the context's pages and are joined by page reference (nothing recomputed);
- (b) in-engine, reprefill: the same, joined by appending the threads' tokens and computing them
  again (what a client loop does, without its round trips);
- (c) client loop: forkllm's own OpenAI server (`forkllm serve`, a fresh process per run, the same
  engine flags); per document, one /v1/completions request per thread (concurrently), then a
  continuation that re-sends the joined text (ThreadWeaver's client); the server's prefix cache
  is on, as it would be; its prefill tokens come from its /metrics, peak pages polled there;
- (d) sequential: one generation per document that writes the four summaries one after another
  and then the reduce (each chunk appended to the sequence's own KV after the previous summary).

Then the long-horizon part: one task of 16 sequential subtasks of 200 tokens each (`Subtasks`),
with each subtask's working KV pruned after it concludes (its prompt and last 32 tokens kept,
keys re-rotated) and without pruning (every token kept): peak KV pages of the tree.

Reported: wall time (median of --reps; the drivers take turns within each repetition), tokens
computed in prefill chunks (multi-token chunks: prompts, thread prompts, rejoined text), decode
rows, critical-path tokens (sampled tokens on the longest chain of sequential steps), and the
peak KV pages in use. The prefix cache is emptied before every run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from forkllm.bench.report import machine_info, median, save
from forkllm.bench.serve_process import ServeProcess
from forkllm.bench.spec_bench import _PASSAGES
from forkllm.engine.args import engine_kwargs
from forkllm.engine.policy import TreeRun, run_policies
from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import SequenceStatus

if TYPE_CHECKING:
    from forkllm.engine.llm_engine import LLMEngine

CONTEXT = "You will read a document in parts. Summarize each part, then the whole document.\n\n"
MAP = "Summarize the part above in two sentences."
REDUCE = "Now combine the summaries above into one summary of the whole document."


def make_documents(tok: Any, num_docs: int, num_chunks: int, chunk_tokens: int, seed: int) -> list[list[str]]:
    """Chunks of ~chunk_tokens tokens, each sentences drawn (seeded) from the prose passages."""
    sentences = [s.strip() + "." for p in _PASSAGES[:3] for s in p.split(". ") if s.strip()]
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        chunks = []
        for _ in range(num_chunks):
            text = ""
            while len(tok.encode(text, add_special_tokens=False)) < chunk_tokens:
                text += (" " if text else "") + rng.choice(sentences).rstrip(".") + "."
            chunks.append(text)
        docs.append(chunks)
    return docs


def thread_prompt(chunk: str) -> str:
    return f"{chunk}\n\n{MAP}\n"  # MapReduce.fanout's thread text


class StepMeter:
    """Wraps an engine's runner: tokens computed in multi-token chunks, single-token rows, and the
    most pages in use at any step."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine, self.inner = engine, engine.runner.execute
        self.prefill = self.decode = self.peak = 0

        def execute(sched: Any) -> Any:
            for s in sched.scheduled:
                if s.num_new_tokens > 1:
                    self.prefill += s.num_new_tokens
                else:
                    self.decode += 1
            self.peak = max(self.peak, engine.kv.pool.num_used)
            return self.inner(sched)

        engine.runner.execute = execute  # type: ignore[method-assign]

    def reset(self) -> None:
        self.prefill = self.decode = self.peak = 0

    def restore(self) -> None:
        self.engine.runner.execute = self.inner  # type: ignore[method-assign]


class SequentialMapReduce:
    """(d): one sequence per document: chunk 1 + MAP, its summary, chunk 2 + MAP, ... then REDUCE
    and its answer; each piece appended to the sequence's own KV (a TreePolicy)."""

    def __init__(self, chunks: list[str], max_tokens: int) -> None:
        self.chunks, self.max_tokens = chunks, max_tokens
        self.part = 0
        self.done = False
        self.tree: TreeRun | None = None
        self.engine: LLMEngine | None = None

    def _ids(self, text: str) -> list[int]:
        assert self.engine is not None and self.engine.tokenizer is not None
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    def start(self, engine: LLMEngine, prompt_ids: list[int], question: str) -> None:
        self.engine = engine
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=engine.max_model_len)
        self.tree = TreeRun(engine, prompt_ids + self._ids(thread_prompt(self.chunks[0])), params, None)
        seq = self.tree.seqs[0]
        seq.token_limit = seq.num_tokens + self.max_tokens + 1
        self.tree.park_on_stop(lambda s: self.part < len(self.chunks))

    def on_step(self, engine: LLMEngine) -> None:
        assert self.tree is not None
        seq = self.tree.seqs[0]
        if seq.finished:
            self.done = True
            return
        if seq.status is not SequenceStatus.PAUSED:
            return
        engine.tree.truncate(seq, seq.num_computed_tokens)  # the summary as computed (max_tokens)
        self.part += 1
        last = self.part == len(self.chunks)
        text = f"\n{REDUCE}\n" if last else thread_prompt(self.chunks[self.part])
        self.tree.extend(seq, self._ids(text))
        seq.token_limit = seq.num_tokens + self.max_tokens + (0 if last else 1)
        self.tree.resume(seq)

    def stop(self) -> None:
        if self.tree is not None:
            self.tree.abort()

    def result(self) -> str:
        assert self.tree is not None
        return self.tree.seqs[0].text


def run_threads(llm: Any, docs: list[list[str]], join: str, max_tokens: int) -> dict[str, Any]:
    from forkllm.threads import MapReduce

    spec = MapReduce(
        MAP, REDUCE, join=join, max_tokens=max_tokens, final_max_tokens=max_tokens, context=CONTEXT
    )
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    results = llm.threads_batch(docs, [spec] * len(docs), params, chat=False)
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "critical": max(r.critical_path_tokens for r in results),
        "answer": results[0].text,
    }


def run_sequential(llm: Any, docs: list[list[str]], max_tokens: int) -> dict[str, Any]:
    ids = llm.get_tokenizer().encode(CONTEXT)
    t0 = time.perf_counter()
    answers = run_policies(llm.engine, [(SequentialMapReduce(d, max_tokens), ids, "") for d in docs])
    return {
        "wall": time.perf_counter() - t0,
        "critical": max_tokens * (len(docs[0]) + 1),
        "answer": answers[0],
    }


def run_client(url: str, docs: list[list[str]], max_tokens: int) -> dict[str, Any]:
    """(c): per document, the threads as concurrent requests, then the continuation re-sending
    the joined text; all documents at once."""
    import httpx

    model = httpx.get(url.replace("/completions", "/models")).json()["data"][0]["id"]
    body = {"model": model, "temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}

    async def complete(client: httpx.AsyncClient, prompt: str) -> str:
        r = await client.post(url, json={**body, "prompt": prompt})
        r.raise_for_status()
        return str(r.json()["choices"][0]["text"])

    async def document(client: httpx.AsyncClient, chunks: list[str]) -> str:
        summaries = await asyncio.gather(*(complete(client, CONTEXT + thread_prompt(c)) for c in chunks))
        joined = CONTEXT + "".join(thread_prompt(c) + s for c, s in zip(chunks, summaries))
        return await complete(client, joined + f"\n{REDUCE}\n")

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=600) as client:
            return list(await asyncio.gather(*(document(client, d) for d in docs)))

    t0 = time.perf_counter()
    answers = asyncio.run(main())
    return {"wall": time.perf_counter() - t0, "critical": 2 * max_tokens, "answer": answers[0]}


def run_client_process(kw: dict[str, Any], docs: list[list[str]], max_tokens: int) -> dict[str, Any]:
    """(c) against a fresh `forkllm serve` process: warmed on two small documents, then timed;
    prefill tokens from its /metrics, peak pages polled there every 0.2 s."""
    import threading

    srv = ServeProcess(kw)
    try:
        run_client(srv.url, [d[:2] for d in docs[:2]], 4)
        before = srv.gauge("forkllm_prompt_tokens_computed")
        peak = [0.0]
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], srv.gauge("forkllm_kv_cache_pages_used"))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        r = run_client(srv.url, docs, max_tokens)
        done.set()
        poller.join()
        r.update(
            prefill=int(srv.gauge("forkllm_prompt_tokens_computed") - before), decode=None, peak=int(peak[0])
        )
        return r
    finally:
        srv.stop()


SUBTASKS, SUBTASK_TOKENS, CONCLUSION_TOKENS = 16, 200, 32


def bench_subtasks(llm: Any, seed: int) -> list[dict[str, Any]]:
    """A long task as 16 sequential subtasks of 200 tokens (greedy, ignore_eos): peak KV pages
    of the tree with the subtasks' working KV pruned (TIMRUN) and kept."""
    from forkllm.threads import Subtasks

    rng = random.Random(seed)
    sentences = [s.strip() for p in _PASSAGES[:3] for s in p.split(". ") if s.strip()]
    prompts = [f"\nStep {i + 1}: explain: {rng.choice(sentences)}.\n" for i in range(SUBTASKS)]
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    out = []
    for prune in (True, False):
        spec = Subtasks(
            prompts,
            prune=prune,
            max_tokens=SUBTASK_TOKENS,
            conclusion_tokens=CONCLUSION_TOKENS,
            final_max_tokens=64,
        )
        llm.engine.kv.pool.drop_cached()
        r = llm.threads(CONTEXT, spec, params, chat=False)
        out.append(
            {
                "run": "pruned (TIMRUN)" if prune else "kept (no pruning)",
                "peak_kv_pages": r.peak_kv_pages,
                "context_pages": r.pages_after_subtasks[-1],
                "seconds": r.seconds,
                "prefill_tokens": r.prefill_tokens,
            }
        )
        print(f"subtasks {out[-1]}", flush=True)
    return out


def bench_threads(args: argparse.Namespace) -> int:
    from forkllm import LLM

    kw = engine_kwargs(args)
    max_tokens = args.output_len or 64
    chunk_tokens = int(args.prompt_len or 256)
    llm = LLM(**kw)
    tok = llm.get_tokenizer()
    docs = make_documents(tok, args.num_prompts or 8, 4, chunk_tokens, args.workload_seed)
    meter = StepMeter(llm.engine)
    drivers: dict[str, Callable[[], dict[str, Any]]] = {
        "(a) in-engine, kv_concat join": lambda: run_threads(llm, docs, "kv_concat", max_tokens),
        "(b) in-engine, reprefill join": lambda: run_threads(llm, docs, "reprefill", max_tokens),
        "(c) client loop through the server": lambda: run_client_process(kw, docs, max_tokens),
        "(d) one sequential generation": lambda: run_sequential(llm, docs, max_tokens),
    }
    reps: dict[str, list[dict[str, Any]]] = {name: [] for name in drivers}
    try:
        small = [d[:2] for d in docs[:2]]  # warm-up: kernels ready, every in-engine path run once
        run_threads(llm, small, "kv_concat", 4)
        run_threads(llm, small, "reprefill", 4)
        run_sequential(llm, small, 4)
        for rep in range(args.reps):
            for name, run in drivers.items():
                llm.engine.kv.pool.drop_cached()  # idle between runs
                meter.reset()
                r = run()
                if "prefill" not in r:
                    r.update(prefill=meter.prefill, decode=meter.decode, peak=meter.peak)
                reps[name].append(r)
                print(
                    f"rep {rep + 1} {name}: {r['wall']:.2f}s prefill {r['prefill']} peak {r['peak']}",
                    flush=True,
                )
    finally:
        meter.restore()
    rows = []
    for name, rs in reps.items():
        mid = sorted(rs, key=lambda r: r["wall"])[len(rs) // 2]
        rows.append(
            {
                "driver": name,
                "seconds": median([r["wall"] for r in rs]),
                "runs": [r["wall"] for r in rs],
                "prefill_tokens": mid["prefill"],
                "decode_rows": mid["decode"],
                "critical_path_tokens": mid["critical"],
                "peak_kv_pages": mid["peak"],
                "answer_example": mid["answer"][:160],
            }
        )
    sub_rows = bench_subtasks(llm, args.workload_seed)
    m = machine_info()
    a = rows[0]  # (a)
    md = (
        f"## W8 threads: {len(docs)} documents x 4 chunks of ~{chunk_tokens} tokens, {max_tokens}-token "
        f"summaries and reduce, greedy; median of {args.reps}; {kw.get('dtype', 'default dtype')}, "
        f"quantization {kw.get('quantization', 'auto')}; "
        f"{m['nproc']} cores, {m['cpu']}\n\n"
        "| driver | wall s | (a) faster by | prefill tokens computed | (a) prefill / this | decode rows | "
        "critical-path tokens | peak KV pages |\n|---|---|---|---|---|---|---|---|\n"
    )
    for r in rows:
        md += (
            f"| {r['driver']} | {r['seconds']:.2f} | {r['seconds'] / a['seconds']:.2f}x | {r['prefill_tokens']} | "
            f"{a['prefill_tokens'] / max(r['prefill_tokens'], 1):.2f} | {r['decode_rows'] or '-'} | "
            f"{r['critical_path_tokens']} | {r['peak_kv_pages']} |\n"
        )
    md += "\nruns: " + "; ".join(f"{r['driver']} {[round(x, 2) for x in r['runs']]}" for r in rows) + "\n"
    md += (
        f"\n### Subtask pruning: {SUBTASKS} sequential subtasks x {SUBTASK_TOKENS} tokens, "
        f"{CONCLUSION_TOKENS}-token conclusions kept\n\n"
        "| run | peak KV pages (this tree) | context pages at the end | wall s | prefill tokens |\n|---|---|---|---|---|\n"
    )
    for r in sub_rows:
        md += f"| {r['run']} | {r['peak_kv_pages']} | {r['context_pages']} | {r['seconds']:.2f} | {r['prefill_tokens']} |\n"
    md += f"\npeak pages, pruned / kept: {sub_rows[0]['peak_kv_pages'] / sub_rows[1]['peak_kv_pages']:.2f}\n"
    print("\n" + md)
    print(f"saved {save(args.out_dir, 'w8-threads', md, [], {'rows': rows, 'subtasks': sub_rows})}")
    return 0
