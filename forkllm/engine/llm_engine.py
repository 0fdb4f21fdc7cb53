"""LLMEngine: the synchronous step loop (add_request / step / abort_request).

One `step()` = schedule a batch, run the model once, sample every sequence that reached its end,
append tokens, detokenize, check stop conditions, release finished sequences' pages, and return
RequestOutputs for the requests that changed.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from forkllm.engine.config import EngineConfig
from forkllm.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from forkllm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from forkllm.engine.runner import ModelRunner, RunnerOutput
from forkllm.engine.sampler import Sampler, compute_logprobs, derive_seed
from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams
from forkllm.engine.scheduler import Scheduler
from forkllm.engine.sequence import Request, Sequence, SequenceStatus
from forkllm.kv.manager import KVCacheManager, KVCacheSpec
from forkllm.models.loader import load_model
from forkllm.tokenizer import Tokenizer

logger = logging.getLogger("forkllm")

PromptInput = str | list[int] | dict[str, Any]


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    model_seconds: float = 0.0
    forks: int = 0
    prunes: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        self.config = config = config or EngineConfig(**kwargs)
        t0 = time.perf_counter()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        loaded = load_model(
            config.model,
            load_format=config.load_format,
            dtype=self.dtype,
            device=self.device,
            tokenizer=config.tokenizer,
            seed=config.seed,
        )
        self.model_config = mcfg = loaded.config
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.load_info = loaded
        self.kv_spec = self._size_kv_cache()
        self.kv = KVCacheManager(self.kv_spec.num_blocks, config.block_size, config.enable_prefix_caching)
        self.runner = ModelRunner(
            loaded.model,
            mcfg,
            self.kv_spec.num_blocks,
            config.block_size,
            self.dtype,
            self.device,
            shared_prefix_attention=config.enable_shared_prefix_attention,
            min_shared_prefix_tokens=config.min_shared_prefix_tokens,
        )
        self.max_model_len = self._resolve_max_model_len()
        eos = list(mcfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None and not eos:
            eos = [self.tokenizer.eos_token_id]
        self.eos_token_ids = eos
        tok = self.tokenizer
        self.sampler = Sampler(
            eos,
            (lambda t: tok.decode([t], False)) if tok is not None else None,
            kernels=self.runner.kernels,
        )
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill
        )
        self.requests: dict[str, Request] = {}
        self.seqs: dict[str, Sequence] = {}  # live sequences by id (fork / prune address them)
        # Called after every step on the engine's thread: tree policies (forkllm.scaling) fork,
        # prune and pause sequences here, between steps.
        self.step_hooks: list[Callable[[LLMEngine], None]] = []
        self._seed_rng = random.Random(config.seed)
        self._ids = itertools.count()
        self.stats = EngineStats()
        self.startup_seconds = time.perf_counter() - t0
        logger.info("%s", self.describe())

    @classmethod
    def from_args(cls, **kwargs: Any) -> LLMEngine:
        return cls(EngineConfig(**kwargs))

    # ---- start-up -----------------------------------------------------------------------------
    def _size_kv_cache(self) -> KVCacheSpec:
        cfg, mcfg = self.config, self.model_config
        per_block = (
            mcfg.kv_bytes_per_token(torch.tensor([], dtype=self.dtype).element_size()) * cfg.block_size
        )
        if cfg.num_kv_blocks is not None:
            return KVCacheSpec(cfg.num_kv_blocks, cfg.block_size, per_block)
        if self.device.type == "cuda" and cfg.kv_cache_memory is None:
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * cfg.gpu_memory_utilization) - used - (1 << 30)  # 1 GiB for activations
            if budget <= per_block * 2:
                raise RuntimeError(f"no GPU memory left for the KV cache (free {free / 2**30:.1f} GiB)")
        else:
            budget = cfg.kv_bytes()
        num_blocks = budget // per_block
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory={budget} bytes holds fewer than 2 pages of {per_block} bytes")
        return KVCacheSpec(int(num_blocks), cfg.block_size, per_block)

    def _resolve_max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        if self.model_config.sliding_window:
            limit = min(
                limit, self.model_config.sliding_window
            )  # no sliding-window attention: stay inside it
        want = self.config.max_model_len
        if want is not None:
            if want > limit:
                raise ValueError(f"max_model_len={want} exceeds the model's context of {limit} tokens")
            limit = want
        capacity = self.kv_spec.num_tokens
        if capacity < limit:
            if want is not None:
                raise ValueError(
                    f"max_model_len={want} needs {want} KV slots but the cache holds {capacity}; "
                    "raise kv_cache_memory or lower max_model_len"
                )
            limit = capacity  # one sequence must always fit alone, or preemption could not help it
        return limit

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
        """Text, token ids or {"prompt": ...} / {"prompt_token_ids": [...]} -> (text, ids)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer; pass prompts as token id lists")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(list(prompt))
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _check_ids(self, ids: Any) -> list[int]:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if t < 0 or t >= vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range for vocab_size {vocab}")
        return ids

    def add_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request; returns its id (also the id of its first sequence)."""
        req = self.make_request(prompt, params, request_id, arrival_time)
        self.add_prepared(req)
        return req.request_id

    def make_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Validate and tokenize without touching engine state (safe from another thread)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self.tokenize_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                "no room left to generate; shorten the prompt"
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, text, ids, params, RequestMetrics(arrival_time or time.time()))
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        req.base_seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        # n samples = one sequence; when its prompt is done it forks n - 1 children that share
        # the prompt's pages, and all n sample from the same logits (the prompt is prefilled once).
        req.pending_samples = params.n - 1
        req.seqs.append(
            Sequence(
                seq_id=rid,
                request=req,
                index=0,
                token_ids=list(ids),
                num_prompt_tokens=len(ids),
                seed=derive_seed(req.base_seed, 0),
                detok=IncrementalDetokenizer.for_prompt(len(ids)),
                logprobs=[] if params.logprobs is not None else None,
            )
        )
        return req

    def add_prepared(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        for seq in req.seqs:
            self.seqs[seq.seq_id] = seq
            self.scheduler.add(seq)

    # ---- the generation tree ------------------------------------------------------------------
    def fork(self, seq_id: str, k: int, seeds: list[int] | None = None) -> list[str]:
        """Create k children of a live sequence. They share all its pages (copy-on-write: only a
        partially filled last page is copied, on first write) and continue from the same tokens;
        each samples with its own seed (default: derived from the request's). Returns their ids."""
        parent = self.seqs.get(seq_id)
        if parent is None or parent.finished:
            raise ValueError(f"no live sequence {seq_id!r} to fork")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if seeds is not None and len(seeds) != k:
            raise ValueError(f"got {len(seeds)} seeds for {k} children")
        return [c.seq_id for c in self._fork(parent, k, seeds)]

    def _fork(self, parent: Sequence, k: int, seeds: list[int] | None) -> list[Sequence]:
        req = parent.request
        kids: list[Sequence] = []
        for j in range(k):
            idx = len(req.seqs)
            child = Sequence(
                seq_id=f"{req.request_id}:{idx}",
                request=req,
                index=idx,
                token_ids=list(parent.token_ids),
                num_prompt_tokens=parent.num_prompt_tokens,
                seed=seeds[j] if seeds is not None else derive_seed(req.base_seed, idx),
                detok=parent.detok.copy(),
                num_computed_tokens=parent.num_computed_tokens,
                block_table=self.kv.share(parent.block_table),
                cache_nodes=list(parent.cache_nodes),
                num_reused_tokens=parent.num_reused_tokens,
                num_output_at_fork=parent.num_output_tokens,
                cumulative_logprob=parent.cumulative_logprob,
                logprobs=None if parent.logprobs is None else list(parent.logprobs),
                parent=parent,
            )
            req.seqs.append(child)
            self.seqs[child.seq_id] = child
            self.scheduler.add_running(child, after=parent if j == 0 else kids[-1])
            kids.append(child)
        self.stats.forks += k
        return kids

    def pause(self, seq_id: str) -> None:
        """Stop generating for a sequence but keep its pages (to fork or prune it later)."""
        seq = self.seqs.get(seq_id)
        if seq is None or seq.finished:
            raise ValueError(f"no live sequence {seq_id!r} to pause")
        if seq.status is not SequenceStatus.PAUSED:
            self.scheduler.pause(seq)

    def resume(self, seq_id: str) -> None:
        seq = self.seqs.get(seq_id)
        if seq is None or seq.status is not SequenceStatus.PAUSED:
            raise ValueError(f"no paused sequence {seq_id!r} to resume")
        self.scheduler.resume(seq)

    def prune(self, seq_id: str) -> None:
        """Finish a sequence now (finish_reason "pruned") and release the pages only it held."""
        seq = self.seqs.get(seq_id)
        if seq is None or seq.finished:
            raise ValueError(f"no live sequence {seq_id!r} to prune")
        seq.finish_reason = "pruned"
        self._finish(seq)
        self.stats.prunes += 1
        self._retire_if_done(seq.request)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.seqs.pop(seq.seq_id, None)

    def _retire_if_done(self, req: Request) -> None:
        """A request finished outside a step (its last sequence pruned): forget it."""
        if req.finished and self.requests.get(req.request_id) is req:
            req.metrics.finished_time = time.time()
            del self.requests[req.request_id]
            self.stats.requests_finished += 1

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
            "forks": self.stats.forks,
            "prunes": self.stats.prunes,
            "preemptions": sched.num_preemptions,
            "running_seqs": len(sched.running),
            "waiting_seqs": len(sched.waiting),
            "generation_tokens": self.stats.generation_tokens,
            "prompt_tokens_computed": self.stats.prompt_tokens_computed,
        }

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            req.pending_samples = 0
            for seq in req.seqs:
                if not seq.finished:
                    seq.finish_reason = "abort"
                    self._finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._step()
        for hook in list(self.step_hooks):  # even after an empty step: paused trees need decisions
            hook(self)
        return outputs

    def _step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched:
            return []
        self.runner.zero_blocks(self.kv.pool.take_pending_zero())
        t0 = time.perf_counter()
        out = self.runner.execute(sched)
        now = time.time()
        for s in sched.scheduled:
            seq = s.seq
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats.prompt_tokens_computed += min(
                    s.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens
                )
            seq.num_computed_tokens += s.num_new_tokens
            self.kv.register_full_pages(
                seq.token_ids, seq.block_table, seq.cache_nodes, seq.num_computed_tokens
            )
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        sample_seqs, logits = self._fork_pending_samples(out.sample_seqs, out.logits)
        sampled = self.sampler(logits, sample_seqs)
        self.stats.model_seconds += time.perf_counter() - t0
        self.stats.steps += 1
        self._record_prompt_logprobs(out)
        touched: dict[str, Request] = {}
        for seq, token, lp in zip(sample_seqs, sampled.token_ids, sampled.logprobs):
            self._append_token(seq, token, lp, now)
            touched[seq.request.request_id] = seq.request
        self.stats.generation_tokens += len(sampled.token_ids)
        outputs = []
        for req in touched.values():
            ro = self._make_output(req)
            if ro is not None:
                outputs.append(ro)
            if req.finished:
                req.metrics.finished_time = now
                self.requests.pop(req.request_id, None)
                self.stats.requests_finished += 1
        return outputs

    def _fork_pending_samples(
        self, seqs: list[Sequence], logits: torch.Tensor
    ) -> tuple[list[Sequence], torch.Tensor]:
        """n > 1: a request's first sequence just finished its prompt; fork the other samples now
        so all n draw their first token from the same logits row."""
        extra_rows: list[int] = []
        extra: list[Sequence] = []
        for row, seq in enumerate(seqs):
            req = seq.request
            if req.pending_samples and seq.index == 0 and seq.num_output_tokens == 0:
                kids = self._fork(seq, req.pending_samples, None)
                req.pending_samples = 0
                extra += kids
                extra_rows += [row] * len(kids)
        if not extra:
            return seqs, logits
        idx = torch.tensor(extra_rows, dtype=torch.long, device=logits.device)
        return seqs + extra, torch.cat([logits, logits.index_select(0, idx)])

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

    def _append_token(self, seq: Sequence, token: int, lp: Any, now: float) -> None:
        seq.token_ids.append(token)
        if lp is not None and seq.logprobs is not None:
            seq.cumulative_logprob += lp[0]
            seq.logprobs.append(lp[1])
        m = seq.request.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        p = seq.params
        delta = ""
        if self.tokenizer is not None:
            delta = seq.detok.step(self.tokenizer, seq.token_ids, p.skip_special_tokens)
        n_out = seq.num_output_tokens
        reason: str | None = None
        stop_reason: int | str | None = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            elif token in (p.stop_token_ids or ()):
                reason, stop_reason = "stop", token
            elif p.stop_strings and delta:
                hit = find_stop_string(seq.detok.text, len(delta), p.stop_strings)
                if hit is not None:
                    i, stop = hit
                    seq.detok.text = seq.detok.text[: i + (len(stop) if p.include_stop_str_in_output else 0)]
                    reason, stop_reason = "stop", stop
        max_new = p.max_tokens if p.max_tokens is not None else self.max_model_len - seq.num_prompt_tokens
        if reason is None and (n_out >= max_new or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if self.tokenizer is not None and not isinstance(stop_reason, str):
                # Emit bytes still held back for a partial character (not after a stop string cut).
                seq.detok.step(self.tokenizer, seq.token_ids, p.skip_special_tokens, flush=True)
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self._finish(seq)

    def _make_output(self, req: Request) -> RequestOutput | None:
        kind = req.params.output_kind
        finished = req.finished
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        holdback = max((len(s) for s in req.params.stop_strings), default=1) - 1
        outs = []
        for seq in req.seqs:
            text = seq.detok.text
            if not seq.finished and holdback:
                text = text[: max(len(text) - holdback, seq.sent_text_len)]
            out_ids = seq.output_token_ids
            logprobs = seq.logprobs
            if kind is RequestOutputKind.DELTA:
                if seq.sent_tokens == len(out_ids) and (not seq.finished or seq.finish_sent):
                    continue
                seq.finish_sent = seq.finished
                new_text = text[seq.sent_text_len :]
                new_ids = out_ids[seq.sent_tokens :]
                new_lp = None if logprobs is None else logprobs[seq.sent_tokens :]
                seq.sent_text_len, seq.sent_tokens = len(text), len(out_ids)
                text, out_ids, logprobs = new_text, new_ids, new_lp
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=list(out_ids),
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                    logprobs=list(logprobs) if logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        if not outs:
            return None
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=req.prompt_logprobs,
            outputs=outs,
            finished=finished,
            metrics=req.metrics,
        )
