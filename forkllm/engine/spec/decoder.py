"""SpeculativeDecoder: drafts for a scheduled batch, and what verification keeps.

`plan` runs after the scheduler: every decoding sequence may get a draft, as long as it is worth
its cost in this step, and its pages are grown to hold it. `rows` gives the sampler one row per
draft position (the sequence's state as if the draft so far were appended), and `accept` keeps
the sampled tokens up to the first that differs from the draft, plus that one.

Never slower: a draft token costs one more query row in the step and is worth a token only when
accepted. Its value is the probability it is accepted (the request's measured per-token
acceptance to the power of its depth); its cost is the share of a step's time one row adds,
relative to the step time per generated token. At one stream a step is bound by reading the
weights and a row costs ~1% of it, so nearly any draft pays; in a batch of 64 decodes a row is
worth only a good guess. `StepCost` measures the ratio online from the steps themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.scheduler import ScheduledSequence, SchedulerOutput
from forkllm.engine.sequence import Request, Sequence
from forkllm.engine.spec import tree as draft_tree
from forkllm.engine.spec.proposers import Proposer
from forkllm.engine.step_cost import LinearFit
from forkllm.kv.manager import KVCacheManager
from forkllm.structured.state import GrammarState


@dataclass
class SpecStats:
    draft_tokens: int = 0  # draft tokens verified
    accepted_tokens: int = 0  # of those, accepted
    drafts: int = 0  # sequence-steps that carried a draft
    tree_drafts: int = 0  # of those, drafts with more than one branch
    branch_wins: int = 0  # tree drafts whose kept path was not the first (best) guess

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a drafted sequence gained per step: accepted drafts plus the one sampled token."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 0.0


class DraftRow:
    """A sequence as the sampler sees it at one draft position: its tokens followed by the draft
    tokens before that position (penalties, min_tokens and the per-step random number see the
    output exactly as the sequence would have it there), with its grammar advanced as far."""

    __slots__ = ("seq", "extra", "grammar")

    def __init__(self, seq: Sequence, extra: list[int], grammar: GrammarState | None) -> None:
        self.seq, self.extra, self.grammar = seq, extra, grammar

    @property
    def params(self) -> SamplingParams:
        return self.seq.params

    @property
    def seed(self) -> int:
        return self.seq.seed

    @property
    def num_prompt_tokens(self) -> int:
        return self.seq.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.extra)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.extra

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + self.extra


class StepCost(LinearFit):
    """The cost of one more query row as a fraction of a step's fixed cost, fitted over steps made
    of decode rows only: step seconds = base + row x rows. Until the rows vary enough to fit, `prior`."""

    def __init__(self, prior: float = 0.02, decay: float = 0.98) -> None:
        super().__init__(decay)
        self.prior = prior

    def ratio(self) -> float:
        """Seconds per row / seconds of an empty step."""
        fit = self.fit()
        return self.prior if fit is None else max(fit[1] / fit[0], 1e-4)


@dataclass
class _Acceptance:
    """A request's per-token acceptance, counted with decay: accepted tokens and rejections (a
    draft stops at its first rejected token), so the estimate is accepted / (accepted + rejections)
    with a prior of one of each; steps without a draft decay it back towards the prior."""

    accepted: float = 0.0
    rejected: float = 0.0

    @property
    def rate(self) -> float:
        return (self.accepted + 1.0) / (self.accepted + self.rejected + 2.0)

    def update(self, accepted: int, rejected: bool, decay: float = 0.9) -> None:
        self.accepted = self.accepted * decay + accepted
        self.rejected = self.rejected * decay + rejected


@dataclass
class SpeculativeDecoder:
    proposer: Proposer
    num_speculative_tokens: int
    max_model_len: int
    # Branches a draft may hold (1: chains). A tree proposer guesses several continuations; all
    # are verified in the same forward (engine/spec/tree.py), the longest that passes is kept.
    tree_width: int = 1
    stats: SpecStats = field(default_factory=SpecStats)
    cost: StepCost = field(default_factory=StepCost)
    _acceptance: dict[str, _Acceptance] = field(default_factory=dict)

    # ---- planning -----------------------------------------------------------------------------
    def threshold(self, rows: int) -> float:
        """Least acceptance probability that makes a draft token worth its row in a step of
        `rows` query rows, `rows` of them generating."""
        r = self.cost.ratio()
        return min(1.0, r * rows / (1.0 + r * rows))

    def plan(self, sched: SchedulerOutput, kv: KVCacheManager, budget: int) -> int:
        """Give worthwhile drafts to the batch's decoding sequences, growing their pages (never
        preempting: a draft that does not fit is cut to the pages held); returns the draft
        tokens planned. A sequence not worth a draft is not shown to the proposer at all (its
        tables catch up from where they were the next time it drafts)."""
        if budget <= 0:
            return 0
        items = [
            s
            for s in sched.scheduled
            if s.num_new_tokens == 1
            and s.samples
            and s.seq.num_output_tokens
            and not s.seq.kv_holes
            and s.seq.view is None
        ]
        if not items:
            return 0
        # A drafted token must also pay for its drafting (an early-exit pass: a share of a step).
        theta = min(1.0, self.threshold(len(sched.scheduled)) + self.proposer.draft_cost)
        rates = {id(s): self._rate(s.seq.request) for s in items}
        if max(rates.values()) < theta:
            return 0  # a compute-bound step: no draft pays (acceptance estimates wait)
        bs = kv.block_size
        planned = 0
        chosen: list[ScheduledSequence] = []
        ks: list[int] = []
        caps: list[int] = []  # draft tokens each may hold (a tree's nodes; a chain's k)
        for item in sorted(items, key=lambda s: -rates[id(s)]):
            seq = item.seq
            rate = rates[id(item)]
            k = 0
            p = rate
            while k < self.num_speculative_tokens and p >= theta:
                k += 1
                p *= rate
            k = min(k, budget - planned, self._room(seq))
            if k <= 0:
                acc = self._acceptance.get(seq.request.request_id)
                if acc is not None:
                    acc.update(0, False, decay=0.98)  # drift back towards the prior: tried again later
                continue
            c = seq.num_computed_tokens
            nodes = min(self._nodes(k), budget - planned)
            if not kv.allocate(seq.block_table, c + 1 + nodes, seq.first_write, sched.copies):
                nodes = min(nodes, len(seq.block_table) * bs - c - 1)  # what the pages held already fit
                k = min(k, nodes)
                if k <= 0:
                    continue
            chosen.append(item)
            ks.append(k)
            caps.append(nodes)
            planned += nodes
        if not chosen:
            return 0
        planned = 0
        for item, (draft, parents) in zip(chosen, self._propose([s.seq for s in chosen], ks, caps)):
            seq = item.seq
            if draft and seq.grammar is not None:
                draft, parents = _in_grammar(seq.grammar, draft, parents)
            # pages past the draft go back now (a sequence without a draft skips verification)
            kv.trim(seq.block_table, seq.num_computed_tokens + 1 + len(draft))
            acc = self._acceptance.get(seq.request.request_id)
            if not draft:
                if acc is not None:
                    acc.update(0, False)  # decay towards the prior: drafting is tried again
                continue
            item.draft = draft
            item.draft_parents = None if draft_tree.is_chain(parents) else parents
            item.num_new_tokens = 1 + len(draft)
            planned += len(draft)
        return planned

    def _nodes(self, k: int) -> int:
        """Draft tokens (tree nodes) for a draft `k` deep: each extra branch up to half as deep."""
        return k + (self.tree_width - 1) * max(1, k // 2) if self.tree_width > 1 else k

    def _propose(
        self, seqs: list[Sequence], ks: list[int], caps: list[int]
    ) -> list[tuple[list[int], list[int]]]:
        """(draft tokens, parents) per sequence: trees (at most caps[i] nodes) where the proposer
        makes them, else chains."""
        trees = getattr(self.proposer, "propose_trees", None)
        if self.tree_width > 1 and trees is not None:
            out: list[tuple[list[int], list[int]]] = trees(seqs, ks, self.tree_width, caps)
            return out
        return [(d, draft_tree.chain_parents(len(d))) for d in self.proposer.propose_batch(seqs, ks)]

    def _rate(self, req: Request) -> float:
        acc = self._acceptance.get(req.request_id)
        return acc.rate if acc is not None else 0.5

    def _room(self, seq: Sequence) -> int:
        """Most draft tokens that could still be kept: before the sequence's max_tokens and the
        context limit (one sampled token always follows the accepted drafts)."""
        p = seq.params
        left = self.max_model_len - seq.num_tokens
        if p.max_tokens is not None:
            left = min(left, p.max_tokens - seq.num_output_tokens)
        return max(0, left - 1)

    # ---- verification -------------------------------------------------------------------------
    @staticmethod
    def rows(item: ScheduledSequence) -> list[DraftRow]:
        """The sampler's rows for a drafted sequence: one per position, from its last token (a
        tree: the root, then each node as if its path were appended)."""
        seq, draft = item.seq, item.draft
        parents = item.draft_parents or draft_tree.chain_parents(len(draft))
        states: list[GrammarState | None] = []
        for i, p in enumerate(parents):
            g = seq.grammar if p == draft_tree.ROOT else states[p]
            if g is not None:
                g = g.fork()
                g.advance((draft[i],))
            states.append(g)
        return [DraftRow(seq, [], seq.grammar)] + [
            DraftRow(seq, [draft[n] for n in draft_tree.path_to(parents, i)], states[i])
            for i in range(len(draft))
        ]

    def accept(self, item: ScheduledSequence, sampled: list[int]) -> list[int]:
        """The draft nodes that passed, in order: each one's token is the one drawn at its
        parent's row (row 0: the last token; row i + 1: node i). The token drawn at the last kept
        row follows them. For a chain: nodes 0 .. a - 1."""
        draft = item.draft
        parents = item.draft_parents or draft_tree.chain_parents(len(draft))
        kept = draft_tree.walk(draft, parents, sampled)
        last = kept[-1] if kept else draft_tree.ROOT
        rejected = last in parents  # the walk stopped where a guess went on
        if item.draft_parents is not None:
            self.stats.tree_drafts += 1
            self.stats.branch_wins += kept != list(range(len(kept)))
        st = self.stats
        st.draft_tokens += len(draft)
        st.accepted_tokens += len(kept)
        st.drafts += 1
        acc = self._acceptance.setdefault(item.seq.request.request_id, _Acceptance())
        acc.update(len(kept), rejected)
        return kept

    def drop(self, req: Request) -> None:
        self._acceptance.pop(req.request_id, None)
        self.proposer.drop(req)

    def clear_history(self) -> None:
        """Forget what the proposer learnt from finished requests (a benchmark's repetitions)."""
        self.proposer.clear_history()

    def metrics(self) -> dict[str, float]:
        st = self.stats
        return {
            "spec_draft_tokens": st.draft_tokens,
            "spec_accepted_tokens": st.accepted_tokens,
            "spec_drafts": st.drafts,
            "spec_acceptance_rate": st.acceptance_rate,
            "spec_mean_accepted_length": st.mean_accepted_length,
            "spec_tree_drafts": st.tree_drafts,
            "spec_branch_wins": st.branch_wins,
            "spec_row_cost_ratio": self.cost.ratio(),
            **self.proposer.metrics(),
        }


def _in_grammar(grammar: GrammarState, draft: list[int], parents: list[int]) -> tuple[list[int], list[int]]:
    """The draft's nodes whose paths the grammar allows (a node cut drops its subtree)."""
    if draft_tree.is_chain(parents):
        n = grammar.matcher.validate_tokens(draft)
        return draft[:n], parents[:n]
    keep: dict[int, int] = {}  # old node -> new node
    tokens: list[int] = []
    new_parents: list[int] = []
    for i, p in enumerate(parents):
        if p != draft_tree.ROOT and p not in keep:
            continue
        path = [draft[n] for n in draft_tree.path_to(parents, i)]
        if grammar.matcher.validate_tokens(path) == len(path):
            keep[i] = len(tokens)
            tokens.append(draft[i])
            new_parents.append(draft_tree.ROOT if p == draft_tree.ROOT else keep[p])
    return tokens, new_parents
