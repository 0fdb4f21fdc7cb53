"""Proposers: where draft tokens come from. Each drafts a chain of tokens for one sequence from
text its request already holds, so a draft costs a few dictionary lookups and no model run.

- `NgramProposer` ("ngram", prompt lookup): the continuation of the latest earlier occurrence of
  the sequence's last n tokens in its own prompt and output (longest n first).
- `SuffixProposer` ("suffix"): one n-gram table per request, fed by the prompt and by the output
  of every sequence of the request (n > 1 samples, beams, particles, forks), counting what
  followed each context; a draft follows the most frequent continuation of the longest context
  seen. Siblings write nearly the same text, so each one's output drafts for the others. Behind
  it, a bounded table of the outputs of recent finished requests (SuffixDecoding's global tree):
  repeated tasks (agents, templated jobs) write what earlier requests wrote.
- `SelfDraftProposer` ("self"): the model's own first layers, final norm and LM head (an early
  exit, Draft & Verify / LayerSkip style) draft greedily, one pass per draft position over every
  drafting sequence at once; no second model, and no KV of its own (the early layers' KV at a
  position is what the full model writes there).

State is per request (and per sequence for prompt lookup), made on first use and dropped when the
request ends. The only thing carried from one request to the next is the suffix proposer's history
of finished outputs: bounded in tokens (the oldest output leaves first and its counts are taken
back), consulted only where the request's own table knows no longer context, and never fed by
aborted or pruned sequences. `clear_history()` empties it (benchmarks' repetitions start cold).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from forkllm.engine.sequence import Request, Sequence
from forkllm.engine.spec import tree as draft_tree


class Proposer(Protocol):
    name: str
    # What drafting one token costs, as a fraction of a decode step (0: dictionary lookups).
    draft_cost: float

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """Up to ks[i] draft tokens to follow each seqs[i].token_ids (empty: no guess). The
        pages for them are allocated."""
        ...

    def drop(self, request: Request) -> None:
        """Forget a request's state (it finished or was aborted)."""
        ...

    def clear_history(self) -> None:
        """Forget what was learnt from earlier requests (nothing, for most proposers)."""
        ...

    def metrics(self) -> dict[str, float]:
        """The proposer's own gauges (`spec_*` names; none for most proposers)."""
        ...


@dataclass
class _Index:
    """Latest continuation of every n-gram (n in orders) ending at positions [start, upto)."""

    table: dict[tuple[int, ...], int] = field(default_factory=dict)
    upto: int = 0


class _LookupProposer:
    """A proposer that drafts each sequence on its own by dictionary lookups (no model run)."""

    draft_cost = 0.0

    def propose(self, seq: Sequence, k: int) -> list[int]:
        raise NotImplementedError

    def clear_history(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self.propose(s, k) for s, k in zip(seqs, ks)]

    def candidates(self, seq: Sequence, k: int, width: int) -> list[list[int]]:
        """Up to `width` guesses of up to k tokens each, best first (the first is `propose`'s)."""
        raise NotImplementedError

    def propose_trees(
        self, seqs: list[Sequence], ks: list[int], width: int, caps: list[int]
    ) -> list[tuple[list[int], list[int]]]:
        """Draft trees (tokens, parents): each sequence's guesses merged, at most caps[i] nodes."""
        return [draft_tree.merge(self.candidates(s, k, width), cap) for s, k, cap in zip(seqs, ks, caps)]


class NgramProposer(_LookupProposer):
    """Prompt lookup over the sequence's own tokens."""

    name = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        self.orders = range(max_n, min_n - 1, -1)
        self._prompts: dict[str, _Index] = {}  # request id -> n-grams inside the prompt
        self._outputs: dict[str, _Index] = {}  # sequence id -> n-grams reaching into its output
        self._seq_ids: dict[str, list[str]] = {}  # request id -> its sequences with state

    def _index(self, index: _Index, tokens: list[int], start: int, end: int) -> None:
        """Record the n-grams ending at positions [max(start, index.upto), end) with the position
        of the token that followed each (later occurrences replace earlier ones)."""
        table = index.table
        for i in range(max(start, index.upto), end):
            for n in self.orders:
                if i + 1 >= n:
                    table[tuple(tokens[i + 1 - n : i + 1])] = i + 1
        index.upto = max(index.upto, end)

    def propose(self, seq: Sequence, k: int) -> list[int]:
        tokens, ats = self._lookup(seq)
        return tokens[ats[0] : ats[0] + k] if ats else []

    def candidates(self, seq: Sequence, k: int, width: int) -> list[list[int]]:
        """The continuations of the latest occurrences of the last 4..1 tokens, in the output and
        in the prompt: longest context first."""
        tokens, ats = self._lookup(seq)
        out: list[list[int]] = []
        for at in ats:
            chain = tokens[at : at + k]
            if chain and chain not in out:
                out.append(chain)
                if len(out) == width:
                    break
        return out

    def _lookup(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """The sequence's tokens and where its last n tokens occurred before (the position after
        each occurrence), longest n first, the output's occurrence before the prompt's."""
        tokens, p = seq.token_ids, seq.num_prompt_tokens
        rid = seq.request.request_id
        prompt = self._prompts.get(rid)
        if prompt is None:
            prompt = self._prompts[rid] = _Index()
            self._index(prompt, tokens, 0, p - 1)
        out = self._outputs.get(seq.seq_id)
        if out is None:
            out = self._outputs[seq.seq_id] = _Index(upto=p - 1)
            self._seq_ids.setdefault(rid, []).append(seq.seq_id)
        # n-grams ending before the last token (their continuation is known)
        self._index(out, tokens, p - 1, len(tokens) - 1)
        ats: list[int] = []
        for n in self.orders:
            if n > len(tokens):
                continue
            key = tuple(tokens[-n:])
            for table in (out.table, prompt.table):
                at = table.get(key)
                if at is not None and at not in ats:
                    ats.append(at)
        return tokens, ats

    def drop(self, request: Request) -> None:
        self._prompts.pop(request.request_id, None)
        for sid in self._seq_ids.pop(request.request_id, ()):
            self._outputs.pop(sid, None)


Table = dict[tuple[int, ...], dict[int, int]]  # context -> {next token: count}


def _count(table: Table, orders: range, tokens: list[int], start: int, end: int, delta: int = 1) -> None:
    """Add `delta` to the count of the token at i + 1 after each context (of every order) ending at
    i, for i in [start, end); a count that reaches 0 is removed, and a context left with none."""
    for i in range(start, end):
        nxt = tokens[i + 1]
        for n in orders:
            if i + 1 < n:
                continue
            ctx = tuple(tokens[i + 1 - n : i + 1])
            after = table.setdefault(ctx, {})
            c = after.get(nxt, 0) + delta
            if c > 0:
                after[nxt] = c
            else:
                after.pop(nxt, None)
                if not after:
                    del table[ctx]


@dataclass
class _Counts:
    """One request's n-gram table, and how far each of its sequences has been read into it."""

    table: Table = field(default_factory=dict)
    read: dict[str, int] = field(default_factory=dict)  # sequence id -> positions counted up to


class _History:
    """The outputs of the latest finished sequences, counted as in a request's table, at most
    `max_tokens` of them: the oldest leaves first and its counts are subtracted, so the table
    always describes exactly the outputs held."""

    def __init__(self, orders: range, max_tokens: int) -> None:
        self.orders, self.max_tokens = orders, max_tokens
        self.table: Table = {}
        self._held: deque[tuple[list[int], int]] = deque()  # (tokens, first counted position)
        self.num_tokens = 0

    def add(self, tokens: list[int], num_prompt: int) -> None:
        """Count an output; the prompt's last tokens are kept as context for its first tokens."""
        keep = tokens[max(0, num_prompt - max(self.orders)) :]
        start = len(keep) - (len(tokens) - num_prompt) - 1  # predicts the first output token
        if len(keep) - 1 - start > self.max_tokens:  # longer than the whole history: its end
            keep, start = keep[-self.max_tokens - max(self.orders) :], max(self.orders) - 1
        n = len(keep) - 1 - start
        if n <= 0:
            return
        while self._held and self.num_tokens + n > self.max_tokens:
            old, old_start = self._held.popleft()
            _count(self.table, self.orders, old, old_start, len(old) - 1, -1)
            self.num_tokens -= len(old) - 1 - old_start
        _count(self.table, self.orders, keep, start, len(keep) - 1)
        self._held.append((keep, start))
        self.num_tokens += n

    def clear(self) -> None:
        self.table.clear()
        self._held.clear()
        self.num_tokens = 0


# Finish reasons of outputs worth remembering (not aborted, not pruned by a policy).
_COMPLETE = ("stop", "length")


class SuffixProposer(_LookupProposer):
    """Most frequent continuation over the request's prompt and all its sequences' outputs, then
    over the outputs of recent finished requests (`history_tokens` of them; 0: none)."""

    name = "suffix"

    def __init__(self, min_n: int = 1, max_n: int = 6, history_tokens: int = 0) -> None:
        self.orders = range(max_n, min_n - 1, -1)
        self._requests: dict[str, _Counts] = {}
        self.history = _History(self.orders, history_tokens) if history_tokens > 0 else None
        self.history_drafts = 0  # chain drafts whose first token came from the history

    def _feed(self, seq: Sequence) -> _Counts:
        """Bring the request's table up to date with this sequence's tokens (every sequence feeds
        its own as it drafts, so siblings see each other's text one step later)."""
        req = seq.request
        counts = self._requests.get(req.request_id)
        if counts is None:
            counts = self._requests[req.request_id] = _Counts()
            _count(counts.table, self.orders, seq.token_ids, 0, seq.num_prompt_tokens - 1)
        # A fork's tokens before its fork point were its parent's: counted there.
        start = counts.read.get(seq.seq_id, seq.num_prompt_tokens + seq.num_output_at_fork - 1)
        end = len(seq.token_ids) - 1
        if end > start:
            _count(counts.table, self.orders, seq.token_ids, start, end)
        counts.read[seq.seq_id] = max(start, end)
        return counts

    def _tables(self, seq: Sequence) -> list[Table]:
        own = self._feed(seq).table
        return [own] if self.history is None else [own, self.history.table]

    def propose(self, seq: Sequence, k: int) -> list[int]:
        tables = self._tables(seq)
        ctx = seq.token_ids[-max(self.orders) :]
        draft = self._greedy(tables, ctx, k)
        if draft and self.history is not None and self._longest(tables, ctx)[1] > 0:
            self.history_drafts += 1
        return draft

    def candidates(self, seq: Sequence, k: int, width: int) -> list[list[int]]:
        """The `width` most frequent next tokens after the longest known context, each followed
        by its most frequent continuation."""
        tables = self._tables(seq)
        ctx = seq.token_ids[-max(self.orders) :]
        after = self._after(tables, ctx)
        if not after or k <= 0:
            return []
        firsts = sorted(after, key=after.__getitem__, reverse=True)[:width]
        return [[t, *self._greedy(tables, [*ctx, t], k - 1)] for t in firsts]

    def _after(self, tables: list[Table], ctx: list[int]) -> dict[int, int] | None:
        """Counts of what followed the longest context of `ctx` seen (the request's own table
        first at each length)."""
        return self._longest(tables, ctx)[0]

    def _longest(self, tables: list[Table], ctx: list[int]) -> tuple[dict[int, int] | None, int]:
        """`_after`'s counts and the index of the table they came from (1: the history)."""
        for n in self.orders:
            if n <= len(ctx):
                key = tuple(ctx[-n:])
                for i, table in enumerate(tables):
                    after = table.get(key)
                    if after:
                        return after, i
        return None, -1

    def _greedy(self, tables: list[Table], ctx: list[int], k: int) -> list[int]:
        ctx = list(ctx)
        draft: list[int] = []
        while len(draft) < k:
            after = self._after(tables, ctx)
            if not after:
                break
            nxt = max(after, key=after.__getitem__)
            draft.append(nxt)
            ctx.append(nxt)
        return draft

    def drop(self, request: Request) -> None:
        self._requests.pop(request.request_id, None)
        if self.history is not None:
            for seq in request.seqs:
                if seq.finish_reason in _COMPLETE:
                    self.history.add(seq.token_ids, seq.num_prompt_tokens)

    def clear_history(self) -> None:
        if self.history is not None:
            self.history.clear()

    def metrics(self) -> dict[str, float]:
        if self.history is None:
            return {}
        return {"spec_history_drafts": self.history_drafts, "spec_history_tokens": self.history.num_tokens}


DraftPass = Callable[[list[tuple[Sequence, int, int]]], list[int]]


class SelfDraftProposer:
    """Early-exit drafts: `draft_pass` (ModelRunner.draft_greedy bound to the exit layer) maps
    rows (sequence, position, token there) to each row's most likely next token."""

    name = "self"

    def __init__(self, draft_pass: DraftPass, num_layers: int, total_layers: int, head_share: float) -> None:
        self.draft_pass = draft_pass
        self.num_layers = num_layers
        # A draft position runs num_layers of total_layers plus the LM head (head_share of the
        # model's weights): a step of a bandwidth-bound decode costs about its share of them.
        self.draft_cost = head_share + (1.0 - head_share) * num_layers / total_layers

    def propose_batch(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        for j in range(max(ks, default=0)):
            live = [i for i, k in enumerate(ks) if k > j]
            rows = [
                (seqs[i], seqs[i].num_tokens - 1 + j, drafts[i][-1] if j else seqs[i].token_ids[-1])
                for i in live
            ]
            for i, token in zip(live, self.draft_pass(rows)):
                drafts[i].append(token)
        return drafts

    def drop(self, request: Request) -> None:
        pass

    def clear_history(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


PROPOSERS = ("ngram", "suffix", "self")


def make_proposer(
    name: str, draft_pass: DraftPass | None = None, history_tokens: int = 0, **shape: float
) -> Proposer:
    """The proposer for `--speculative NAME` ("self" needs the runner's draft pass and the
    model's shape: num_layers, total_layers, head_share; "suffix" keeps `history_tokens` of
    finished outputs)."""
    if name == "ngram":
        return NgramProposer()
    if name == "suffix":
        return SuffixProposer(history_tokens=history_tokens)
    if name == "self":
        assert draft_pass is not None
        return SelfDraftProposer(
            draft_pass, int(shape["num_layers"]), int(shape["total_layers"]), float(shape["head_share"])
        )
    raise ValueError(f"speculative must be one of {list(PROPOSERS)}, got {name!r}")
