"""LLMEngine: the synchronous step loop (add_request / step / abort_request) and its wiring.

One `step()` = schedule a batch, run the model once, sample every sequence that reached its end,
hand the tokens to the output processor (append, detokenize, stop), fork the deferred samples of
n > 1 requests into the room their finished sequences left, and return RequestOutputs for the
requests that changed; then run the step hooks, where tree policies fork, prune and pause.
Start-up lives in engine/startup.py, input validation in engine/inputs.py, tree operations in
engine/tree.py, token append and outputs in engine/output_processor.py.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from forkllm.engine.config import EngineConfig
from forkllm.engine.events import TreeWatcher
from forkllm.engine.inputs import InputProcessor, PromptInput
from forkllm.engine.output_processor import OutputProcessor, TokenLogprob
from forkllm.engine.outputs import RequestOutput
from forkllm.engine.runner import ModelRunner, RunnerOutput
from forkllm.engine.sampler import Sampler, compute_logprobs, derive_seed
from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from forkllm.engine.sequence import DeferredSamples, Request, Sequence
from forkllm.engine.spec import SpeculativeDecoder, make_proposer
from forkllm.engine.spec.draft_model import DraftModelProposer, check_same_vocabulary
from forkllm.engine.spec.proposers import PROPOSERS
from forkllm.engine.startup import resolve_max_model_len, resolve_placement, size_kv_cache
from forkllm.engine.step_cost import FirstTokenLoad, LinearFit
from forkllm.engine.tree import StepHook, TreeOps
from forkllm.kernels import Kernels
from forkllm.kv.manager import KVCacheManager
from forkllm.models.loader import load_model
from forkllm.tokenizer import Tokenizer

logger = logging.getLogger("forkllm")

# A CPU's attention kernels run at a fraction of its GEMMs' FLOP rate (measured on a 2-core Xeon:
# 10 query tokens at 8,000 context cost 120 ms, ~2.8x their FLOPs at the GEMM rate; 128-512-token
# chunks 1.1-1.7x), so the scheduler weighs context at twice its FLOPs there.
CPU_ATTENTION_SLOWDOWN = 2


def attention_cost_tokens(flop_parity: int, device: torch.device) -> int:
    """The context length at which a token's attention costs as much time as its matmuls."""
    return max(1, flop_parity // CPU_ATTENTION_SLOWDOWN) if device.type == "cpu" else flop_parity


__all__ = ["EngineStats", "LLMEngine", "PromptInput"]


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    model_seconds: float = 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        self.config = config = config or EngineConfig(**kwargs)
        t0 = time.perf_counter()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        place = resolve_placement(config)
        self.device, self.dtype = place.device, place.dtype
        loaded = load_model(
            config.model,
            load_format=config.load_format,
            quantization=config.quantization,
            dtype=self.dtype,
            device=self.device,
            tokenizer=config.tokenizer,
            seed=config.seed,
        )
        self.model_config = mcfg = loaded.config
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.load_info = loaded
        self.kv_spec = size_kv_cache(config, mcfg, place)
        self.kv = KVCacheManager(
            self.kv_spec.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            config.prefix_cache_eviction,
        )
        kernels = Kernels.resolve(config.enable_cpu_kernels, self.device, self.dtype, mcfg)
        if config.deterministic:
            if not kernels.paged_decode:
                raise ValueError(
                    "deterministic=True needs the C++ CPU kernels with paged attention for this model "
                    "(enable_cpu_kernels, a CPU device, FORKLLM_KERNELS not 0)"
                )
            kernels = dataclasses.replace(kernels, batch_invariant=True)
        self.runner = ModelRunner(
            loaded.model,
            mcfg,
            self.kv_spec.num_blocks,
            config.block_size,
            self.dtype,
            self.device,
            kernels,
            shared_prefix_attention=config.enable_shared_prefix_attention and not config.deterministic,
            min_shared_prefix_tokens=config.min_shared_prefix_tokens,
        )
        self.max_model_len = resolve_max_model_len(config, mcfg, self.kv_spec)
        eos = list(mcfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None and not eos:
            eos = [self.tokenizer.eos_token_id]
        self.eos_token_ids = eos
        tok = self.tokenizer
        self.sampler = Sampler(
            eos,
            (lambda t: tok.decode([t], False)) if tok is not None else None,
            kernels=kernels,
        )
        self.scheduler = Scheduler(
            self.kv,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.enable_chunked_prefill,
            long_prefill_token_threshold=config.prefill_chunk_cut(),
            max_seq_share=config.max_seq_share,
            fair_step_tokens=config.fair_step_budget(),
            attention_cost_tokens=attention_cost_tokens(mcfg.attention_cost_tokens, self.device),
        )
        # Speculative decoding (engine/spec): drafts verified in the batch's forward.
        self.spec: SpeculativeDecoder | None = None
        self._plan_start = 0.0  # when the current step began drafting (speculation's step cost)
        self.draft_engine: LLMEngine | None = None  # a draft model's own engine (spec/draft_model.py)
        if config.speculative and config.speculative not in PROPOSERS:
            self.draft_engine = self._draft_engine(config.speculative)
            draft_params = self.draft_engine.model_config.num_params
            cost = draft_params / max(1, mcfg.num_params)
            self.spec = SpeculativeDecoder(
                DraftModelProposer(self.draft_engine, cost), config.num_speculative_tokens, self.max_model_len
            )
        elif config.speculative:
            exit_layer = min(mcfg.num_layers, config.speculative_draft_layers or max(1, mcfg.num_layers // 4))
            runner = self.runner
            proposer = make_proposer(
                config.speculative,
                lambda rows: runner.draft_greedy(rows, exit_layer),
                history_tokens=config.speculative_history_tokens,
                num_layers=exit_layer,
                total_layers=mcfg.num_layers,
                head_share=mcfg.vocab_size * mcfg.hidden_size / max(1, mcfg.num_params),
            )
            self.spec = SpeculativeDecoder(
                proposer, config.num_speculative_tokens, self.max_model_len, config.speculative_tree_width
            )
        self.requests: dict[str, Request] = {}
        self.seqs: dict[str, Sequence] = {}  # live sequences by id (fork / prune address them)
        self.tree = TreeOps(self.kv, self.scheduler, self.seqs)
        self.tree.copy_pages, self.tree.move_kv = self.runner.copy_blocks, self.runner.move_slots
        self.inputs = InputProcessor(tok, mcfg.vocab_size, self.max_model_len, eos)
        self.outputs = OutputProcessor(tok, eos, self.max_model_len, self.tree.finish)
        self._step_hooks: list[StepHook] = []
        # Called once a step's batch is scheduled, before the model runs (the async engine
        # publishes its metrics snapshot here, so a long step is visible while it runs).
        self.on_batch_scheduled: Callable[[LLMEngine], None] | None = None
        self._seed_rng = random.Random(config.seed)
        self.stats = EngineStats()
        # Seconds per step as base + slope x work units, from the steps run (first_token_load).
        self.step_seconds = LinearFit()
        self.startup_seconds = time.perf_counter() - t0
        logger.info("%s", self.describe())

    def _draft_engine(self, model: str) -> LLMEngine:
        """The draft model's engine: the model's placement, dtype, load format and limits, a KV
        cache of --speculative-draft-kv-memory (default a quarter of the model's), no speculation
        of its own. Its vocabulary must be the model's."""
        c = self.config
        kv = c.speculative_draft_kv_memory
        if kv is None:
            kv = max(self.kv_spec.total_bytes // 4, 64 << 20)
        draft_config = dataclasses.replace(
            c,
            model=model,
            tokenizer=None,
            speculative=None,
            speculative_draft_kv_memory=None,
            kv_cache_memory=kv,
            num_kv_blocks=None,
            gpu_memory_utilization=c.gpu_memory_utilization,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            max_model_len=None,
        )
        try:
            draft = LLMEngine(draft_config)
        except (OSError, ValueError) as e:
            raise ValueError(f"speculative: the draft model {model!r} could not be loaded: {e}") from e
        check_same_vocabulary(
            (self.model_config.vocab_size, self.tokenizer),
            (draft.model_config.vocab_size, draft.tokenizer),
            model,
        )
        return draft

    def describe(self) -> str:
        s, m = self.kv_spec, self.model_config
        return (
            f"forkllm engine ready in {self.startup_seconds:.2f}s: model {self.load_info.source} "
            f"({m.architecture}, {m.num_params / 1e6:.0f}M params, weights cache {self.load_info.cache}, "
            f"load {self.load_info.seconds:.2f}s) dtype {str(self.dtype).removeprefix('torch.')} on {self.device}; "
            f"KV cache {s.num_blocks - 1} pages x {s.block_size} tokens = {s.num_tokens} tokens, "
            f"{s.total_bytes / 2**30:.2f} GiB; max_model_len {self.max_model_len}; "
            f"max_num_seqs {self.config.max_num_seqs}, max_num_batched_tokens {self.config.max_num_batched_tokens}"
        )

    # ---- requests -----------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        return self.inputs.tokenize_prompt(prompt)

    def make_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> Request:
        """Validate and tokenize without touching engine state (safe from another thread).
        `priority`: lower is scheduled sooner (vLLM's convention)."""
        return self.inputs.make_request(prompt, params, request_id, arrival_time, priority)

    def add_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a request; returns its id (also the id of its first sequence)."""
        req = self.make_request(prompt, params, request_id, arrival_time, priority)
        self.add_prepared(req)
        return req.request_id

    def add_prepared(self, req: Request) -> None:
        """Admit a request made by make_request. Unseeded requests draw their seed here, on the
        engine's thread, in admission order."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        seed = req.params.seed
        req.base_seed = seed if seed is not None else self._seed_rng.getrandbits(63)
        self.requests[req.request_id] = req
        for seq in req.seqs:
            seq.seed = derive_seed(req.base_seed, seq.index)
            self.seqs[seq.seq_id] = seq
            self.scheduler.add(seq)
        if self.tree.events.watching(req.request_id):
            self.tree.events.added(req)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.requests.pop(rid, None)
            if req is None:
                self.tree.events.unwatch(rid)  # watched, but never added (or gone already)
                continue
            req.pending_samples = 0
            self._drop_deferred(req)
            self.tree.events.progress([req], force=True)
            for seq in req.seqs:
                if not seq.finished:
                    seq.finish_reason = "abort"
                    self.tree.finish(seq)
            self.tree.events.close(rid)
            if self.spec is not None:
                self.spec.drop(req)

    def cancel_pending_samples(self, request_id: str) -> None:
        """Give up the samples of an n > 1 request not forked yet (a policy that has decided);
        the request ends when its forked sequences do (now, if they all have)."""
        req = self.requests.get(request_id)
        if req is None or not req.pending_samples:
            return
        req.pending_samples = 0
        self._drop_deferred(req)
        if req.finished:
            self._retire(req, time.time())

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the generation tree (by sequence id; engine/tree.py has the operations) ---------------
    def fork(self, seq_id: str, k: int, seeds: list[int] | None = None) -> list[str]:
        """Create k children of a live sequence. They share all its pages (copy-on-write: only a
        partially filled last page is copied, on first write) and continue from the same tokens;
        each samples with its own seed (default: derived from the request's). Returns their ids."""
        return [c.seq_id for c in self.tree.fork(self._live(seq_id, "fork"), k, seeds)]

    def pause(self, seq_id: str) -> None:
        """Stop generating for a sequence but keep its pages (to fork or prune it later)."""
        self.tree.pause(self._live(seq_id, "pause"))

    def resume(self, seq_id: str) -> None:
        seq = self.seqs.get(seq_id)
        if seq is None:
            raise ValueError(f"no paused sequence {seq_id!r} to resume")
        self.tree.resume(seq)

    def prune(self, seq_id: str) -> None:
        """Finish a sequence now (finish_reason "pruned") and release the pages only it held."""
        seq = self._live(seq_id, "prune")
        self.tree.prune(seq)
        req = seq.request
        if req.pending_samples and req.deferred is None and seq.index == 0 and seq.num_output_tokens == 0:
            req.pending_samples = 0  # they fork from this sequence's first sample, which will never come
        if req.finished and self.requests.get(req.request_id) is req:  # its last sequence went
            self._retire(req, time.time())

    def watch(self, request_id: str, fn: TreeWatcher, hold: bool = False) -> None:
        """Report the request's tree operations to `fn` as they happen (engine/events.py), from
        now until it leaves the engine (`hold`: until `tree.events.release(fn)`); it may be
        added later. Call on the engine's thread."""
        self.tree.events.watch(request_id, fn, self.requests.get(request_id), hold)

    def _live(self, seq_id: str, what: str) -> Sequence:
        seq = self.seqs.get(seq_id)
        if seq is None or seq.finished:
            raise ValueError(f"no live sequence {seq_id!r} to {what}")
        return seq

    def add_step_hook(self, hook: StepHook) -> None:
        """Call hook(engine) after every step, on the engine's thread (tree policies live here)."""
        self._step_hooks.append(hook)

    def remove_step_hook(self, hook: StepHook) -> None:
        if hook in self._step_hooks:
            self._step_hooks.remove(hook)

    @property
    def step_hooks(self) -> tuple[StepHook, ...]:
        return tuple(self._step_hooks)

    def first_token_load(self) -> FirstTokenLoad:
        """What a new request's first token waits for now, with this machine's step speed."""
        sched = self.scheduler
        ahead, per_step = sched.first_token_work()
        base, slope = self.step_seconds.fit() or (0.0, 0.0)
        return FirstTokenLoad(ahead, per_step, sched.fair_step_cost, base, slope)

    def metrics(self) -> dict[str, float]:
        """Gauges and counters for monitoring (the server exports them)."""
        pool, sched = self.kv.pool, self.scheduler
        return {
            "prefix_cache_hit_rate": sched.prefix_stats.hit_rate,
            "prefix_cache_reused_tokens": sched.prefix_stats.reused_tokens,
            "prompt_tokens": sched.prefix_stats.prompt_tokens,
            "kv_pages_total": pool.num_usable,
            "kv_pages_in_use": pool.num_used,
            "kv_pages_cached_idle": pool.num_cached_idle,
            "kv_pages_cached": self.kv.cache.num_cached if self.kv.cache else 0,
            "kv_pages_free": pool.num_free,
            "forks": self.tree.num_forks,
            "prunes": self.tree.num_prunes,
            "preemptions": sched.num_preemptions,
            "running_seqs": len(sched.running),
            "waiting_seqs": len(sched.waiting),
            "scheduled_seqs": sched.num_scheduled,
            "deferred_samples": sum(r.pending_samples for r in sched.deferred.values()),
            "generation_tokens": self.stats.generation_tokens,
            "prompt_tokens_computed": self.stats.prompt_tokens_computed,
            **(self.spec.metrics() if self.spec is not None else {}),
        }

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._step()
        for hook in list(self._step_hooks):  # even after an empty step: paused trees need decisions
            hook(self)
        return outputs

    def _step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        touched: dict[str, Request] = {}
        now = time.time()
        for seq in sched.preempted:
            if seq.finished:  # a page-joined sequence the scheduler had to end (it cannot be recomputed)
                self.seqs.pop(seq.seq_id, None)
                touched[seq.request.request_id] = seq.request
        if sched:
            if self.spec is not None:
                self._plan_start = time.perf_counter()  # the step's cost includes drafting and verifying
                self.spec.plan(sched, self.kv, self.config.max_num_batched_tokens - sched.num_batched_tokens)
            if self.on_batch_scheduled is not None:
                self.on_batch_scheduled(self)
            now = self._run_batch(sched, touched)
        if self.scheduler.deferred:  # also after an empty step: the room may have opened outside one
            self._fork_deferred_samples(touched, now)
        self.tree.events.progress(touched.values())
        outputs = []
        for req in touched.values():
            ro = self.outputs.make_output(req)
            if ro is not None:
                outputs.append(ro)
            if req.finished:
                self._retire(req, now)
        return outputs

    def _run_batch(self, sched: SchedulerOutput, touched: dict[str, Request]) -> float:
        """Run the model on a scheduled batch, sample and append; returns the step's time."""
        self.runner.zero_blocks(self.kv.pool.take_pending_zero())
        cost = self.scheduler.cost_at
        work = sum(cost(s.seq.num_computed_tokens, s.num_new_tokens) for s in sched.scheduled)
        t0 = time.perf_counter()
        out = self.runner.execute(sched)
        now = time.time()
        for s in sched.scheduled:
            seq = s.seq
            if s.draft:
                continue  # advanced by what verification keeps (_verify)
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats.prompt_tokens_computed += min(
                    s.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens
                )
            seq.num_computed_tokens += s.num_new_tokens
            if not seq.kv_pinned:  # a page-joined thread's pages are not what its tokens compute to
                self.kv.register_full_pages(
                    seq.token_ids, seq.block_table, seq.cache_nodes, seq.num_computed_tokens
                )
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        num_plain = len(out.sample_seqs)
        sample_seqs, logits = self._fork_pending_samples(out.sample_seqs, out.logits)
        if out.drafted:  # logits rows: plain samples, draft positions, then forked samples
            assert self.spec is not None
            draft_rows = [row for item in out.drafted for row in self.spec.rows(item)]
            sampled = self.sampler(logits, [*sample_seqs[:num_plain], *draft_rows, *sample_seqs[num_plain:]])
            end = num_plain + len(draft_rows)
            tokens, lps = sampled.token_ids, sampled.logprobs
            draft_tokens, draft_lps = tokens[num_plain:end], lps[num_plain:end]
            tokens, lps = tokens[:num_plain] + tokens[end:], lps[:num_plain] + lps[end:]
        else:
            sampled = self.sampler(logits, sample_seqs)
            tokens, lps = sampled.token_ids, sampled.logprobs
        seconds = time.perf_counter() - t0
        self.step_seconds.record(work, seconds)
        self.stats.model_seconds += seconds
        self.stats.steps += 1
        self._record_prompt_logprobs(out)
        for seq, token, lp in zip(sample_seqs, tokens, lps):
            self.stats.generation_tokens += self.outputs.append_tokens(seq, (token,), (lp,), now)
            touched[seq.request.request_id] = seq.request
        if self.spec is not None:
            if out.drafted:
                self._verify(out.drafted, draft_tokens, draft_lps, now, touched)
            if all(s.draft or s.num_new_tokens == 1 for s in sched.scheduled):  # decode-only step
                self.spec.cost.record(sched.num_batched_tokens, time.perf_counter() - self._plan_start)
        return now

    def _verify(
        self,
        drafted: list[ScheduledSequence],
        tokens: list[int],
        lps: list[TokenLogprob],
        now: float,
        touched: dict[str, Request],
    ) -> None:
        """Keep each drafted sequence's sampled tokens along the draft's path that passed, and the
        one drawn after it. A chain's kept KV is in place; a tree's kept nodes move to the slots
        a chain would have used (same positions). The rejected positions' pages beyond the kept
        tokens go back to the pool (a later fork must not share a page holding a rejected
        draft's KV)."""
        assert self.spec is not None
        bs = self.kv.block_size
        row = 0
        for item in drafted:
            seq = item.seq
            n = 1 + len(item.draft)
            sampled = tokens[row : row + n]
            nodes = self.spec.accept(item, sampled)
            rows = [0, *(i + 1 for i in nodes)]  # the rows whose draws are kept
            kept = [sampled[r] for r in rows]
            keep_lp = [lps[row + r] for r in rows]
            row += n
            c, table = seq.num_computed_tokens, seq.block_table
            moved = [(c + 1 + i, c + 1 + j) for j, i in enumerate(nodes) if i != j]
            if moved:
                slot = [table[x // bs] * bs + x % bs for pair in moved for x in pair]
                self.runner.move_slots(slot[0::2], slot[1::2], [0] * len(moved))
            seq.num_computed_tokens += len(rows)
            self.kv.trim(seq.block_table, seq.num_tokens + len(kept))
            self.kv.register_full_pages(
                seq.token_ids + kept, seq.block_table, seq.cache_nodes, seq.num_computed_tokens
            )
            self.stats.generation_tokens += self.outputs.append_tokens(seq, kept, keep_lp, now)
            touched[seq.request.request_id] = seq.request

    def _retire(self, req: Request, now: float) -> None:
        req.metrics.finished_time = now
        self.requests.pop(req.request_id, None)
        if self.tree.events.watching(req.request_id):
            self.tree.events.progress([req], force=True)
            self.tree.events.close(req.request_id)
        self.stats.requests_finished += 1
        if self.spec is not None:
            self.spec.drop(req)

    def _fork_pending_samples(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[Sequence], torch.Tensor]:
        """n > 1: a request's first sequence just finished its prompt; fork the other samples now
        so all n draw their first token from the same logits row. Only as many as the request's
        share of the batch has room for: the rest are deferred (a paused anchor keeps the prompt's
        pages, the logits row is kept) and forked as room opens (_fork_deferred_samples)."""
        firsts = [
            (row, seq)
            for row, seq in enumerate(seqs)
            if seq.request.pending_samples and seq.index == 0 and seq.num_output_tokens == 0
        ]
        if not firsts:
            return seqs, logits
        room = self.scheduler.room(seq.request for _, seq in firsts)
        extra_rows: list[int] = []
        extra: list[Sequence] = []
        for row, seq in firsts:
            req = seq.request
            k = min(req.pending_samples, room[req])
            if k < req.pending_samples:
                req.deferred = DeferredSamples(self.tree.hold(seq), logits[row : row + 1].clone())
                self.scheduler.deferred[req.request_id] = req
            if k:
                extra += self.tree.fork(seq, k)
                extra_rows += [row] * k
                req.pending_samples -= k
        if not extra:
            return seqs, logits
        idx = torch.tensor(extra_rows, dtype=torch.long, device=logits.device)
        return seqs + extra, torch.cat([logits, logits.index_select(0, idx)])

    def _fork_deferred_samples(self, touched: dict[str, Request], now: float) -> None:
        """Fork deferred samples into the room their requests have now and sample their first
        token from the kept logits row (no model run: exactly the tokens they would have drawn
        when forked at once). Bounded by the share, so one step never forks more than a batch."""
        reqs = list(self.scheduler.deferred.values())
        room = self.scheduler.room(reqs)
        kids: list[Sequence] = []
        rows: list[torch.Tensor] = []
        for req in reqs:
            deferred = req.deferred
            k = min(req.pending_samples, room[req])
            if deferred is None or k <= 0:
                continue
            kids += self.tree.fork_from_anchor(deferred.anchor, k)
            rows.append(deferred.logits.expand(k, -1))
            req.pending_samples -= k
            if not req.pending_samples:
                self._drop_deferred(req)
        if not kids:
            return
        sampled = self.sampler(torch.cat(rows), kids)
        for seq, token, lp in zip(kids, sampled.token_ids, sampled.logprobs):
            self.stats.generation_tokens += self.outputs.append_tokens(seq, (token,), (lp,), now)
            touched[seq.request.request_id] = seq.request

    def _drop_deferred(self, req: Request) -> None:
        """Release a request's anchor (its hold on the prompt's pages) and forget its deferral."""
        if req.deferred is not None:
            self.tree.release(req.deferred.anchor)
            req.deferred = None
        self.scheduler.deferred.pop(req.request_id, None)

    def _record_prompt_logprobs(self, out: RunnerOutput) -> None:
        for chunk in out.prompt_logits:
            seq = chunk.seq
            req = seq.request
            assert req.prompt_logprobs is not None and req.params.prompt_logprobs is not None
            rows = chunk.logits.shape[0]
            targets = seq.token_ids[chunk.start + 1 : chunk.start + 1 + rows]
            lp = compute_logprobs(
                chunk.logits, torch.tensor(targets, device=chunk.logits.device), req.params.prompt_logprobs
            )
            for j, tok in enumerate(targets):
                req.prompt_logprobs.append(self.sampler._position(lp, j, tok, req.params.prompt_logprobs)[1])
