"""Batched sampler: grammar masks, logit bias, penalties, temperature, min-p, top-k, top-p, logprobs,
per-sequence seeds.

Structured output: rows whose sequence has a grammar state get the tokens their grammar disallows
set to -inf first, in one batched op over those rows (forkllm/structured/mask.py), so bias,
penalties and every sampling path (greedy, PyTorch, the fused C++ kernel) only ever see allowed
tokens. Without a constrained row the logits are not touched (no copy).

Determinism: a sequence's sample depends only on its own logits, its seed and its step. Sampling
is by inverse CDF with one uniform number per row, drawn from a counter-based hash of
(seed, step): nothing depends on batch composition or on how many numbers other rows consumed.
Logprobs are those of the raw model distribution (temperature 1, before any processing), as in
vLLM.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import llguidance
import torch

from forkllm.engine.outputs import Logprob, PositionLogprobs
from forkllm.engine.sampling_params import SamplingParams
from forkllm.kernels import KernelOps, Kernels
from forkllm.structured.mask import apply_bitmask, fill_bitmasks
from forkllm.structured.state import GrammarState

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step)."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 11) * (1.0 / (1 << 53))


def derive_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of a request seeded with `seed`."""
    return _splitmix64((seed & _MASK64) ^ _splitmix64(index + 0x5EED)) if index else seed


class SampleRow(Protocol):
    """What the sampler reads of a row's sequence: a Sequence, or a speculative draft position
    (engine.spec.decoder.DraftRow)."""

    @property
    def params(self) -> SamplingParams: ...
    @property
    def seed(self) -> int: ...
    @property
    def grammar(self) -> GrammarState | None: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_output_tokens(self) -> int: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def output_token_ids(self) -> list[int]: ...


# Temperatures above this sample as this one (already uniform over the allowed tokens to float32
# precision): the kernel's 1 / T of a larger one (the API allows up to 3.4e38) is a denormal that
# flush-to-zero makes 0, and 0 x -inf (a grammar-masked logit) is NaN: the draw then ran off the
# vocabulary's end (found by the server fuzz test).
MAX_TEMPERATURE = 1e30


def _temperature(p: SamplingParams) -> float:
    return min(p.temperature, MAX_TEMPERATURE)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: (chosen token logprob, top-k dict) when that row asked for logprobs.
    logprobs: list[tuple[float, PositionLogprobs] | None]


class Sampler:
    def __init__(
        self, eos_token_ids: list[int], decode_token: object = None, kernels: Kernels | None = None
    ) -> None:
        self.eos_token_ids = eos_token_ids
        self.decode_token = decode_token  # callable(token_id) -> str, for Logprob.decoded_token
        # The engine's C++ CPU kernels (resolved for its device, so logits are on the CPU when
        # set): fused temperature / min-p / top-k / top-p sampling. None: PyTorch only.
        self.ops: KernelOps | None = kernels.ops if kernels is not None else None
        # llguidance's thread pool for the batch's grammar masks (made on the first constrained row).
        self._grammar_pool: llguidance.LLExecutor | None = None

    def __call__(self, logits: torch.Tensor, seqs: Seq[SampleRow]) -> SamplerOutput:
        """One token per row. `logits` is consumed: with the C++ kernels and no row asking for
        logprobs, constrained rows are masked in place (the engine never reads them again)."""
        n = len(seqs)
        if n == 0:
            return SamplerOutput([], [])
        raw = logits
        params = [s.params for s in seqs]
        want_lp = [p.logprobs is not None for p in params]
        logits = self._apply_grammars(logits, seqs, in_place=not any(want_lp))
        logits = _apply_logit_bias(logits, params)
        logits = self._apply_penalties_and_bans(logits, seqs)

        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        elif not any(greedy):
            tokens = self._sample_random(logits, seqs)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=logits.device)
            g_idx = [i for i in range(n) if greedy[i]]
            r_idx = [i for i in range(n) if not greedy[i]]
            if g_idx:
                gi = torch.tensor(g_idx, device=logits.device)
                tokens[gi] = logits[gi].argmax(dim=-1)
            ri = torch.tensor(r_idx, device=logits.device)
            tokens[ri] = self._sample_random(logits[ri], [seqs[i] for i in r_idx])
        token_list = tokens.tolist()

        out_lp: list[tuple[float, PositionLogprobs] | None] = [None] * n
        if any(want_lp):
            rows = [i for i in range(n) if want_lp[i]]
            ks = [params[i].logprobs or 0 for i in rows]
            lp_rows = compute_logprobs(raw[torch.tensor(rows)], tokens[torch.tensor(rows)], max(ks))
            for j, i in enumerate(rows):
                out_lp[i] = self._position(lp_rows, j, token_list[i], ks[j])
        return SamplerOutput(token_list, out_lp)

    # ---- processing ---------------------------------------------------------------------------
    def _apply_grammars(
        self, logits: torch.Tensor, seqs: Seq[SampleRow], in_place: bool = False
    ) -> torch.Tensor:
        """Disallowed tokens of every constrained row to -inf (a copy unless `in_place` and the
        kernels run); untouched without a constrained row."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return logits
        if self._grammar_pool is None:
            self._grammar_pool = llguidance.LLExecutor(num_threads=os.cpu_count() or 1)
        width, pool, ops = logits.shape[1], self._grammar_pool, self.ops
        if ops is None and 2 * len(rows) >= len(seqs):
            # mostly constrained, PyTorch ops: every row in two ops, the rest with all-ones masks
            return apply_bitmask(logits, fill_bitmasks([s.grammar for s in seqs], width, pool))
        bitmask = fill_bitmasks([seqs[i].grammar for i in rows], width, pool)
        return apply_bitmask(logits, bitmask, None if len(rows) == len(seqs) else rows, ops, in_place)

    def _apply_penalties_and_bans(self, logits: torch.Tensor, seqs: Seq[SampleRow]) -> torch.Tensor:
        pen = [i for i, s in enumerate(seqs) if s.params.needs_penalties]
        ban = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if not pen and not ban:
            return logits
        logits = logits.clone()
        dev = logits.device
        vocab = logits.shape[1]
        for i in ban:  # min_tokens: EOS and stop tokens cannot end the text yet
            p = seqs[i].params
            stop_ids = [
                t
                for t in ([] if p.ignore_eos else self.eos_token_ids) + (p.stop_token_ids or [])
                if t < vocab
            ]
            if stop_ids:
                kept = logits[i, stop_ids]
                logits[i, stop_ids] = float("-inf")
                # A grammar that allows nothing but a stop token here wins over min_tokens (the
                # row would have no token left to draw).
                if seqs[i].grammar is not None and bool(torch.isneginf(logits[i]).all()):
                    logits[i, stop_ids] = kept
        if pen:
            rows = torch.tensor(pen, device=dev)
            sub = logits[rows]
            out_counts = _token_counts([seqs[i].output_token_ids for i in pen], vocab, dev)
            rep = torch.tensor([seqs[i].params.repetition_penalty for i in pen], device=dev)[:, None]
            if (rep != 1.0).any():
                seen = out_counts > 0
                seen |= (
                    _token_counts([seqs[i].token_ids[: seqs[i].num_prompt_tokens] for i in pen], vocab, dev)
                    > 0
                )
                penalised = torch.where(sub > 0, sub / rep, sub * rep)
                sub = torch.where(seen, penalised, sub)
            freq = torch.tensor([seqs[i].params.frequency_penalty for i in pen], device=dev)[:, None]
            pres = torch.tensor([seqs[i].params.presence_penalty for i in pen], device=dev)[:, None]
            sub = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)
            logits[rows] = sub
        return logits

    @staticmethod
    def _fused(
        ops: KernelOps, logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor
    ) -> torch.Tensor:
        """The C++ kernel does temperature, min-p, top-k/top-p and the draw for every row."""
        return ops.sample_filtered(
            logits.float().contiguous(),
            torch.tensor([_temperature(p) for p in params], dtype=torch.float32),
            torch.tensor([p.top_k for p in params], dtype=torch.long),
            torch.tensor([p.top_p for p in params], dtype=torch.float32),
            torch.tensor([p.min_p for p in params], dtype=torch.float32),
            u,
        )

    def _sample_random(self, logits: torch.Tensor, seqs: Seq[SampleRow]) -> torch.Tensor:
        dev = logits.device
        params = [s.params for s in seqs]
        if self.ops is not None:
            # One pass per row in C++: filtered rows draw in rank order, unfiltered rows in
            # vocabulary order (as _inverse_cdf), no [rows, vocab] probability matrix.
            u = torch.tensor([uniform(s.seed, s.num_output_tokens) for s in seqs], dtype=torch.float64)
            return self._fused(self.ops, logits, params, u)
        temps = torch.tensor([_temperature(p) for p in params], device=dev)[:, None]
        probs = torch.softmax(logits / temps, dim=-1)
        min_p = [p.min_p for p in params]
        if any(min_p):
            mp = torch.tensor(min_p, device=dev)[:, None]
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        u = torch.tensor(
            [uniform(s.seed, s.num_output_tokens) for s in seqs], device=dev, dtype=torch.float64
        )
        filtered = [bool(p.top_k) or p.top_p < 1.0 for p in params]
        if not any(filtered):
            return _inverse_cdf(probs, u)
        if all(filtered):
            return _sample_top_k_top_p(probs, [p.top_k for p in params], [p.top_p for p in params], u)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=dev)
        f_idx = [i for i, f in enumerate(filtered) if f]
        p_idx = [i for i, f in enumerate(filtered) if not f]
        fi = torch.tensor(f_idx, device=dev)
        tokens[fi] = _sample_top_k_top_p(
            probs[fi], [params[i].top_k for i in f_idx], [params[i].top_p for i in f_idx], u[fi]
        )
        if p_idx:
            pi = torch.tensor(p_idx, device=dev)
            tokens[pi] = _inverse_cdf(probs[pi], u[pi])
        return tokens

    def _position(self, lp: LogprobRows, j: int, chosen: int, k: int) -> tuple[float, PositionLogprobs]:
        dec = self.decode_token
        pos: PositionLogprobs = {}
        for r in range(k):
            tid = lp.top_ids[j][r]
            pos[tid] = Logprob(lp.top_values[j][r], r + 1, dec(tid) if callable(dec) else None)
        if chosen not in pos:
            pos[chosen] = Logprob(lp.chosen[j], lp.chosen_rank[j], dec(chosen) if callable(dec) else None)
        return lp.chosen[j], pos


def _apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Add every row's logit_bias to its logits in one scatter (OpenAI semantics: before any
    other processing). Without a bias the tensor is returned untouched, so the fused kernel
    path sees exactly the model's logits."""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for i, p in enumerate(params):
        if p.logit_bias:
            rows.extend([i] * len(p.logit_bias))
            cols.extend(p.logit_bias)
            values.extend(p.logit_bias.values())
    if not rows:
        return logits
    dev = logits.device
    biased = logits.clone()
    biased.index_put_(
        (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
        torch.tensor(values, device=dev, dtype=logits.dtype),
        accumulate=True,
    )
    return biased


@dataclass
class LogprobRows:
    chosen: list[float]
    chosen_rank: list[int]
    top_ids: list[list[int]]
    top_values: list[list[float]]


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobRows:
    """log_softmax of raw logits: the chosen tokens' logprobs and ranks, and the top-k per row."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, token_ids[:, None])[:, 0]
    rank = (lp > chosen[:, None]).sum(dim=-1) + 1
    if k > 0:
        top = lp.topk(k, dim=-1)
        top_ids, top_vals = top.indices.tolist(), top.values.tolist()
    else:
        top_ids = top_vals = [[] for _ in range(lp.shape[0])]
    return LogprobRows(chosen.tolist(), rank.tolist(), top_ids, top_vals)


# Top-p looks at the best 256 tokens first; rows whose 256 best fall short of top_p retry with
# 4096, then with the whole vocabulary. Measured on W2 (SmolLM2, temperature 0.8, top_p 0.95):
# 91% of rows resolve at 256 and 99.98% at 4096.
TOP_P_TIERS = (256, 4096)


def _sample_top_k_top_p(
    probs: torch.Tensor, top_k: list[int], top_p: list[float], u: torch.Tensor
) -> torch.Tensor:
    """Sample rows restricted to their top-k / top-p set, drawing in rank order.

    A partial sort (topk) of each row's candidates replaces a full vocabulary sort: top-k needs
    only k of them, and top-p only enough to reach p of the mass. Everything is per row, so a
    row's token never depends on the other rows (nor on which tier resolved them)."""
    dev, vocab = probs.device, probs.shape[1]
    pick = torch.empty(probs.shape[0], dtype=torch.long, device=dev)
    top_k_on = torch.tensor([bool(k) for k in top_k], device=dev)
    tp = torch.tensor(top_p, device=dev, dtype=probs.dtype)
    rows = torch.arange(probs.shape[0], device=dev)
    full_mass = probs.sum(dim=-1)
    sub = probs
    for tier in (*TOP_P_TIERS, vocab):
        k_row = torch.tensor(
            [min(top_k[r], vocab) if top_k[r] else min(tier, vocab) for r in rows.tolist()], device=dev
        )
        vals, idx = sub.topk(int(k_row.max()), dim=-1)
        keep = torch.arange(vals.shape[1], device=dev)[None, :] < k_row[:, None]
        vals = vals * keep
        # top-p is relative to the mass left after top-k (all of it when top-k is off).
        mass = torch.where(top_k_on[rows], vals.sum(dim=-1), full_mass[rows])
        need = tp[rows] * mass
        keep &= (vals.cumsum(dim=-1) - vals) < need[:, None]
        done = top_k_on[rows] | (vals.sum(dim=-1) >= need) | (tier >= vocab)
        chosen = idx.gather(1, _inverse_cdf(vals * keep, u[rows])[:, None])[:, 0]
        pick[rows[done]] = chosen[done]
        rows = rows[~done]
        if rows.numel() == 0:
            break
        sub = probs.index_select(0, rows)
    return pick


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = probs.double().cumsum(dim=-1)
    target = (u * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    return idx.clamp_(max=probs.shape[1] - 1)


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    counts = torch.zeros(len(token_lists), vocab, device=device)
    for i, toks in enumerate(token_lists):
        if toks:
            t = torch.tensor(toks, device=device)
            counts[i].index_add_(0, t, torch.ones(len(toks), device=device))
    return counts
