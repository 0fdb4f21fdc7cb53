"""The Scheduler on its own: a real KVCacheManager, hand-made Sequences, no model and no engine.

`Sim` plays the engine's part around `schedule()` the way LLMEngine._step does: after each step
every scheduled sequence advances `num_computed_tokens` by its chunk, registers the pages it filled
in the prefix cache, and each chunk that reached the end of its sequence gets one sampled token.
Pages are 4 tokens (`BS`), so page counts in the asserts are easy to follow.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass, replace

import pytest

from forkllm.engine.config import EngineConfig
from forkllm.engine.detokenizer import IncrementalDetokenizer
from forkllm.engine.outputs import RequestMetrics
from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.scheduler import Scheduler, SchedulerOutput, fair_shares
from forkllm.engine.sequence import Request, Sequence, SequenceStatus
from forkllm.engine.startup import resolve_max_model_len
from forkllm.kv.manager import KVCacheManager, KVCacheSpec, PageCopy
from forkllm.models.config import preset_config

BS = 4
_sampled_ids = itertools.count(90_000)  # every sampled token is new: output pages never dedupe


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def make_seq(
    seq_id: str, token_ids: list[int], params: SamplingParams | None = None, priority: int = 0
) -> Sequence:
    """A request's first sequence, as LLMEngine.make_request builds it."""
    req = Request(
        seq_id, None, list(token_ids), params or SamplingParams(), RequestMetrics(0.0), priority=priority
    )
    seq = Sequence(
        seq_id=seq_id,
        request=req,
        index=0,
        token_ids=list(token_ids),
        num_prompt_tokens=len(token_ids),
        seed=0,
        detok=IncrementalDetokenizer.for_prompt(len(token_ids)),
    )
    req.seqs.append(seq)
    return seq


def fork(sched: Scheduler, parent: Sequence, after: Sequence | None = None) -> Sequence:
    """A child sharing every page of its parent, placed by add_running (what the engine's fork does)."""
    req = parent.request
    idx = len(req.seqs)
    child = Sequence(
        seq_id=f"{req.request_id}:{idx}",
        request=req,
        index=idx,
        token_ids=list(parent.token_ids),
        num_prompt_tokens=parent.num_prompt_tokens,
        seed=idx,
        detok=parent.detok.copy(),
        num_computed_tokens=parent.num_computed_tokens,
        block_table=sched.kv.share(parent.block_table),
        cache_nodes=list(parent.cache_nodes),
        num_reused_tokens=parent.num_reused_tokens,
        num_output_at_fork=parent.num_output_tokens,
        parent=parent,
    )
    req.seqs.append(child)
    sched.add_running(child, after=after or parent)
    return child


@dataclass
class Step:
    out: SchedulerOutput
    plan: list[tuple[str, int]]  # (seq_id, num_new_tokens) in scheduled order
    sampled: list[str]  # seq_ids whose chunk reached the end (one token appended each)


class Sim:
    def __init__(
        self,
        num_blocks: int = 64,
        budget: int = 100,
        max_num_seqs: int = 256,
        chunked: bool = True,
        caching: bool = True,
        token=None,
        threshold: int = 0,
        share: float = 1.0,
    ) -> None:
        self.kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=caching)
        self.sched = Scheduler(
            self.kv,
            max_num_seqs,
            budget,
            enable_chunked_prefill=chunked,
            long_prefill_token_threshold=threshold,
            max_seq_share=share,
        )
        self.pool = self.kv.pool
        self.token = token or (lambda seq: next(_sampled_ids))

    def add(self, *seqs: Sequence) -> None:
        for s in seqs:
            self.sched.add(s)

    def commit(self, out: SchedulerOutput) -> Step:
        """The engine's bookkeeping after the forward pass (LLMEngine._step)."""
        plan = [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]
        sampled = [s.seq for s in out.scheduled if s.samples]  # decided before the counters move
        for s in out.scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            self.kv.register_full_pages(
                seq.token_ids, seq.block_table, seq.cache_nodes, seq.num_computed_tokens
            )
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = 1.0
        for seq in sampled:
            seq.token_ids.append(self.token(seq))
        return Step(out, plan, [s.seq_id for s in sampled])

    def step(self) -> Step:
        return self.commit(self.sched.schedule())

    def ids(self, seqs) -> list[str]:
        return [s.seq_id for s in seqs]

    def assert_empty(self) -> None:
        """Nothing held: every page is on the free list or idle in the prefix cache."""
        pool, cache = self.pool, self.kv.cache
        assert pool.num_used == 0
        assert pool.num_free == pool.num_usable
        assert all(rc == 0 for rc in pool.ref_counts[1:])
        idle = cache.num_idle if cache else 0
        assert idle == (cache.num_cached if cache else 0)  # every cached page is idle
        assert len(pool._free) + idle == pool.num_usable
        assert len(set(pool._free)) == len(pool._free)


# ---- the token budget --------------------------------------------------------------------------


def test_budget_decodes_then_running_chunks_then_waiting_fcfs():
    sim = Sim(budget=10, caching=False)
    a, b, c, d = (make_seq(n, toks(100 * i, k)) for i, (n, k) in enumerate(zip("ABCD", (3, 12, 5, 4))))
    sim.add(a, b, c, d)

    s1 = sim.step()
    assert s1.plan == [("A", 3), ("B", 7)]  # B takes exactly what A left; C and D wait
    assert s1.sampled == ["A"]
    assert sim.ids(sim.sched.waiting) == ["C", "D"]
    assert s1.out.num_batched_tokens == 10

    s2 = sim.step()  # A's decode, then B's last 5 prompt tokens, then C gets the 4 left
    assert s2.plan == [("A", 1), ("B", 5), ("C", 4)]
    assert s2.sampled == ["A", "B"]
    assert sim.ids(sim.sched.waiting) == ["D"]

    s3 = sim.step()  # C's last prompt token counts as a 1-token "decode"
    assert s3.plan == [("A", 1), ("B", 1), ("C", 1), ("D", 4)]
    assert s3.sampled == ["A", "B", "C", "D"]
    assert s3.out.num_batched_tokens == 7
    assert [s.num_computed_tokens for s in (a, b, c, d)] == [5, 13, 5, 4]
    assert [len(s.block_table) for s in (a, b, c, d)] == [2, 4, 2, 1]
    assert sim.pool.num_used == 9
    assert list(sim.sched.waiting) == [] and sim.sched.running == [a, b, c, d]


def test_decodes_go_before_an_earlier_running_chunk():
    sim = Sim(budget=8, caching=False)
    b, a = make_seq("B", toks(0, 3)), make_seq("A", toks(100, 20))
    sim.add(b, a)
    assert sim.step().plan == [("B", 3), ("A", 5)]
    sim.sched.pause(b)
    sim.sched.resume(b)  # B now sits behind A in the running list
    assert sim.ids(sim.sched.running) == ["A", "B"]
    s2 = sim.step()
    assert s2.plan == [("B", 1), ("A", 7)]  # the decode first, the chunk gets what is left
    assert s2.sampled == ["B"]
    assert a.num_computed_tokens == 12


def test_decodes_can_use_up_the_budget():
    sim = Sim(budget=2, caching=False)
    x, y, z = make_seq("X", [1]), make_seq("Y", [2]), make_seq("Z", [3])
    sim.add(x, y, z)
    assert sim.step().plan == [("X", 1), ("Y", 1)]
    for _ in range(3):
        assert sim.step().plan == [("X", 1), ("Y", 1)]  # Z waits while the decodes fill the budget
    assert sim.ids(sim.sched.waiting) == ["Z"]
    sim.sched.finish(x)
    assert sim.step().plan == [("Y", 1), ("Z", 1)]


@pytest.mark.parametrize("chunked", [True, False])
def test_chunked_prefill_on_and_off(chunked):
    sim = Sim(budget=8, chunked=chunked, caching=False)
    sim.add(make_seq("A", toks(0, 5)), make_seq("B", toks(100, 5)), make_seq("C", toks(200, 2)))
    s1 = sim.step()
    if chunked:
        assert s1.plan == [("A", 5), ("B", 3)]
        assert sim.step().plan == [("A", 1), ("B", 2), ("C", 2)]
    else:
        # B does not fit whole in the 3 tokens left, and C (which would) does not jump the queue.
        assert s1.plan == [("A", 5)]
        assert sim.ids(sim.sched.waiting) == ["B", "C"]
        assert sim.step().plan == [("A", 1), ("B", 5), ("C", 2)]
    assert list(sim.sched.waiting) == []


def test_max_num_seqs():
    sim = Sim(max_num_seqs=2, caching=False)
    a, b, c = make_seq("A", toks(0, 3)), make_seq("B", toks(10, 3)), make_seq("C", toks(20, 3))
    sim.add(a, b, c)
    assert sim.step().plan == [("A", 3), ("B", 3)]
    assert sim.step().plan == [("A", 1), ("B", 1)]
    assert sim.ids(sim.sched.waiting) == ["C"] and len(sim.sched.running) == 2
    sim.sched.finish(a)
    assert sim.step().plan == [("B", 1), ("C", 3)]
    assert sim.ids(sim.sched.running) == ["B", "C"]


# ---- the prefix cache --------------------------------------------------------------------------


def test_prefix_reuse_of_leading_full_pages():
    sim = Sim()
    a = make_seq("A", toks(0, 10))  # pages [0..3] [4..7] [8 9 _ _]
    sim.add(a)
    assert sim.step().plan == [("A", 10)]
    assert len(a.cache_nodes) == 2 and sim.kv.cache.num_cached == 2

    b = make_seq("B", toks(0, 8) + [500, 501, 502])  # same two full pages, then its own
    sim.add(b)
    out = sim.sched.schedule()
    assert (b.num_reused_tokens, b.num_computed_tokens, b.first_write) == (8, 8, 8)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table
    assert [sim.pool.ref_counts[p] for p in b.block_table] == [2, 2, 1]
    assert out.copies == []
    step = sim.commit(out)
    assert step.plan == [("A", 1), ("B", 3)]  # only the 3 uncached tokens are computed
    assert step.sampled == ["A", "B"]
    assert sim.pool.num_used == 4  # A's 3 pages + B's own third page
    st = sim.sched.prefix_stats
    assert (st.prompt_tokens, st.reused_tokens) == (21, 8)
    assert st.hit_rate == pytest.approx(8 / 21)

    sim.sched.finish(a)
    sim.sched.finish(b)
    sim.assert_empty()
    assert sim.pool.num_cached_idle == 2  # the shared pages stay cached, idle


def test_prompts_sharing_a_prefix_in_one_step_compute_it_once():
    """Three prompts with a 10-page prefix arrive together: one computes it, the others wait a
    step and revive it from the cache (SHARE_MIN_PAGES)."""
    sim = Sim(budget=200)
    prefix = toks(0, 40)
    a, b, c = (
        make_seq(n, prefix + tail) for n, tail in (("A", [500, 501]), ("B", [600, 601, 602]), ("C", [700]))
    )
    sim.add(a, b, c)
    assert sim.step().plan == [("A", 42)]
    assert sim.step().plan == [("A", 1), ("B", 3), ("C", 1)]
    assert b.num_reused_tokens == c.num_reused_tokens == 40
    st = sim.sched.prefix_stats
    assert (st.prompt_tokens, st.reused_tokens) == (42 + 43 + 41, 80)


def test_a_prompt_follows_a_chunked_leader_until_the_shared_part_is_done():
    sim = Sim(budget=20)
    prefix = toks(0, 40)
    a, b = make_seq("A", prefix + [500, 501]), make_seq("B", prefix + [600, 601, 602])
    sim.add(a, b)
    plans = [sim.step().plan for _ in range(3)]
    # B waits while A computes the shared pages, then starts after them as A finishes its own
    assert plans == [[("A", 20)], [("A", 20)], [("A", 2), ("B", 3)]]
    assert b.num_reused_tokens == 40


@pytest.mark.parametrize("prefix_len", [8, 12])
def test_a_short_shared_prefix_is_not_waited_for(prefix_len):
    """Under SHARE_MIN_PAGES (4 pages) shared, both prompts start in the same step (waiting would
    cost a step to save little), as they do when the shared part is a small part of the prompt."""
    sim = Sim(budget=200)
    a, b = make_seq("A", toks(0, prefix_len) + [500] * 30), make_seq("B", toks(0, prefix_len) + [600] * 30)
    sim.add(a, b)
    assert sim.step().plan == [("A", prefix_len + 30), ("B", prefix_len + 30)]


def test_full_prefix_hit_recomputes_only_the_last_token():
    sim = Sim()
    a = make_seq("A", toks(0, 8))
    sim.add(a)
    assert sim.step().plan == [("A", 8)]
    pages = list(a.block_table)
    sim.sched.finish(a)
    assert (sim.pool.num_used, sim.pool.num_cached_idle) == (0, 2)

    b = make_seq("B", toks(0, 8))
    sim.add(b)
    out = sim.sched.schedule()
    assert b.block_table == pages  # both idle pages revived
    assert (b.num_reused_tokens, b.num_computed_tokens, b.first_write) == (8, 7, 8)
    assert out.copies == []  # the last token's KV is already there: nothing to write, nothing to copy
    assert (sim.pool.num_used, sim.pool.num_cached_idle) == (2, 0)
    step = sim.commit(out)
    assert step.plan == [("B", 1)] and step.sampled == ["B"]
    st = sim.sched.prefix_stats
    assert (st.prompt_tokens, st.reused_tokens) == (16, 8)

    # prompt_logprobs need every position's logits: no reuse, the prompt is computed in full
    # and its pages are swapped for the identical cached ones when registered.
    c = make_seq("C", toks(0, 8), SamplingParams(prompt_logprobs=1))
    sim.add(c)
    out = sim.sched.schedule()
    assert c.num_reused_tokens == 0 and c.num_computed_tokens == 0
    assert set(c.block_table).isdisjoint(pages)
    assert sim.pool.num_used == 5  # the 2 cached pages, B's third page (position 8), C's own 2
    assert sim.commit(out).plan == [("B", 1), ("C", 8)]
    assert c.block_table == pages and c.cache_nodes == b.cache_nodes
    assert sim.pool.num_used == 3  # C's own two pages went back; B's third page (position 8)
    assert (st.prompt_tokens, st.reused_tokens) == (24, 8)

    for s in (b, c):
        sim.sched.finish(s)
    sim.assert_empty()


# ---- preemption --------------------------------------------------------------------------------


def test_preemption_releases_the_newest_and_requeues_it_first():
    sim = Sim(num_blocks=5, caching=False)  # 4 usable pages = 16 tokens
    a, b, c = make_seq("A", toks(0, 7)), make_seq("B", toks(100, 7)), make_seq("C", toks(200, 3))
    sim.add(a, b, c)
    assert sim.step().plan == [("A", 7), ("B", 7)]  # 4 pages: C does not fit
    assert sim.ids(sim.sched.waiting) == ["C"]
    assert sim.step().plan == [("A", 1), ("B", 1)]  # position 7 still in the second page

    s3 = sim.step()  # A's position 8 needs a third page: B (newest) goes
    assert s3.plan == [("A", 1)]
    assert s3.out.preempted == [b]
    assert sim.ids(sim.sched.waiting) == ["B", "C"]
    assert b.status is SequenceStatus.WAITING
    assert (b.block_table, b.num_computed_tokens, b.num_tokens) == ([], 0, 9)
    assert sim.sched.num_preemptions == 1 and b.request.metrics.num_preemptions == 1
    assert sim.pool.num_used == 3  # C was not admitted into the free page in the same step

    s4 = sim.step()  # B needs 3 pages, 1 is free; C would fit but stays behind B
    assert s4.plan == [("A", 1)] and s4.out.preempted == []
    assert sim.ids(sim.sched.waiting) == ["B", "C"]

    sim.sched.finish(a)
    s5 = sim.step()
    assert s5.plan == [("B", 9), ("C", 3)]  # B recomputes prompt + its output token, then samples
    assert s5.sampled == ["B", "C"]
    assert sim.pool.num_used == 4
    assert sim.sched.num_preemptions == 1
    assert sim.sched.prefix_stats.prompt_tokens == 17  # B's re-admission is not counted again
    sim.sched.finish(b)
    sim.sched.finish(c)
    sim.assert_empty()


def test_preempted_sequence_revives_its_cached_pages():
    sim = Sim(num_blocks=5)
    a, b = make_seq("A", toks(0, 8)), make_seq("B", toks(100, 6))
    sim.add(a, b)
    assert sim.step().plan == [("A", 8), ("B", 6)]
    b0, b1 = b.block_table
    assert sim.kv.cache.num_cached == 3  # A's two pages, B's first

    s2 = sim.step()  # A needs a page: B goes; its partial page is freed, its full page stays cached
    assert s2.plan == [("A", 1)] and s2.out.preempted == [b]
    assert a.block_table[2] == b1
    assert (sim.pool.num_used, sim.pool.num_cached_idle) == (3, 1)

    s3 = sim.step()  # B revives b0 but the rest does not fit: b0 is given back, still cached
    assert s3.plan == [("A", 1)]
    assert (b.block_table, b.num_computed_tokens, b.num_reused_tokens) == ([], 0, 0)
    assert (sim.pool.num_used, sim.pool.num_cached_idle) == (3, 1)

    sim.sched.finish(a)
    out = sim.sched.schedule()
    assert b.block_table[0] == b0 and (b.num_reused_tokens, b.num_computed_tokens) == (4, 4)
    step = sim.commit(out)
    assert step.plan == [("B", 3)] and step.sampled == ["B"]  # 7 tokens, 4 from the cache
    assert (sim.pool.num_used, sim.pool.num_cached_idle, sim.kv.cache.num_cached) == (2, 2, 3)
    st = sim.sched.prefix_stats
    assert (st.prompt_tokens, st.reused_tokens) == (14, 0)  # re-admission is not a new prompt
    sim.sched.finish(b)
    sim.assert_empty()


def test_preempting_an_already_scheduled_sequence_unschedules_it():
    sim = Sim(num_blocks=4, budget=8, caching=False)  # 3 usable pages
    b, a = make_seq("B", toks(0, 3)), make_seq("A", toks(100, 11))
    sim.add(b, a)
    assert sim.step().plan == [("B", 3), ("A", 5)]
    sim.sched.pause(b)
    sim.sched.resume(b)  # running: [A, B]
    s2 = sim.step()  # B's decode is planned first; A's chunk then needs a page: B (newest) goes
    assert s2.plan == [("A", 6)] and s2.out.preempted == [b]
    assert s2.out.num_batched_tokens == 6
    assert sim.ids(sim.sched.waiting) == ["B"] and sim.ids(sim.sched.running) == ["A"]
    assert sim.pool.num_used == 3
    assert sim.step().plan == [("A", 1)]  # no page for B yet
    sim.sched.finish(a)
    assert sim.step().plan == [("B", 4)]
    sim.sched.finish(b)
    sim.assert_empty()


def test_a_sequence_that_cannot_grow_preempts_itself_when_newest():
    sim = Sim(num_blocks=5, caching=False)  # 4 usable pages
    a, b = make_seq("A", toks(0, 3)), make_seq("B", toks(100, 7))
    sim.add(a, b)
    assert sim.step().plan == [("A", 3), ("B", 7)]  # 1 + 2 pages, one left
    assert sim.step().plan == [("A", 1), ("B", 1)]  # positions 3 and 7: no new page
    s3 = sim.step()  # A (older) takes the last page; B then needs one: B is the newest, B goes
    assert s3.plan == [("A", 1)] and s3.out.preempted == [b]
    assert len(a.block_table) == 2 and sim.pool.num_used == 2
    assert sim.sched.running == [a] and sim.ids(sim.sched.waiting) == ["B"]
    assert sim.sched.num_preemptions == 1
    sim.sched.finish(a)
    assert sim.step().plan == [("B", 9)]
    sim.sched.finish(b)
    sim.assert_empty()


# ---- pause, resume, finish ---------------------------------------------------------------------


def test_pause_keeps_pages_resume_requeues_finish_releases():
    sim = Sim(caching=False)
    a = make_seq("A", toks(0, 5))
    sim.add(a)
    sim.step()
    pages = list(a.block_table)
    sim.sched.pause(a)
    assert a.status is SequenceStatus.PAUSED and a.block_table == pages
    assert sim.sched.running == [] and sim.pool.num_used == 2
    assert not sim.sched.has_unfinished()

    b = make_seq("B", toks(100, 3))
    sim.add(b)
    assert sim.step().plan == [("B", 3)]  # the paused A is not scheduled
    assert sim.step().plan == [("B", 1)]
    sim.sched.resume(a)  # it has pages: straight back to running, behind B
    assert a.status is SequenceStatus.RUNNING and sim.ids(sim.sched.running) == ["B", "A"]
    assert sim.step().plan == [("B", 1), ("A", 1)]
    assert a.block_table == pages and sim.pool.num_used == 4

    # A waiting sequence paused before it ever ran has no pages: resumed, it goes to the front.
    c, d = make_seq("C", toks(200, 2)), make_seq("D", toks(300, 2))
    sim.add(c, d)
    sim.sched.pause(d)
    assert sim.ids(sim.sched.waiting) == ["C"]
    sim.sched.resume(d)
    assert d.status is SequenceStatus.WAITING and sim.ids(sim.sched.waiting) == ["D", "C"]

    sim.sched.finish(a)  # running: its 2 pages go back
    assert a.status is SequenceStatus.FINISHED and a.block_table == []
    assert sim.pool.num_used == 2 and sim.ids(sim.sched.running) == ["B"]
    sim.sched.pause(b)
    sim.sched.finish(b)  # paused: pages go back too
    assert sim.pool.num_used == 0 and sim.sched.running == []
    sim.sched.finish(d)  # waiting: leaves the queue
    assert sim.ids(sim.sched.waiting) == ["C"] and sim.sched.has_unfinished()
    sim.sched.finish(c)
    assert not sim.sched.has_unfinished()
    sim.assert_empty()


# ---- forks and copy-on-write -------------------------------------------------------------------


def test_fork_placement_follows_the_parent():
    sim = Sim(caching=False)
    p, q = make_seq("P", toks(0, 3)), make_seq("Q", toks(100, 2))
    sim.add(p, q)
    c1 = fork(sim.sched, p)
    c2 = fork(sim.sched, p, after=c1)
    assert sim.ids(sim.sched.waiting) == ["P", "P:1", "P:2", "Q"]
    assert c1.status is c2.status is SequenceStatus.WAITING and c2.block_table == []
    assert sim.step().plan == [("P", 3), ("P:1", 3), ("P:2", 3), ("Q", 2)]
    st = sim.sched.prefix_stats
    assert (st.prompt_tokens, st.reused_tokens) == (5, 0)  # forks are not new prompts

    c3 = fork(sim.sched, p)  # running parent: the child runs, sharing its pages
    assert c3.status is SequenceStatus.RUNNING and sim.sched.running[-1] is c3
    assert c3.block_table == p.block_table and sim.pool.ref_counts[p.block_table[0]] == 2
    sim.sched.pause(q)
    c4 = fork(sim.sched, q)  # paused parent: the child runs on the parent's pages
    assert c4.status is SequenceStatus.RUNNING and c4.block_table == q.block_table
    assert sim.step().plan == [("P", 1), ("P:1", 1), ("P:2", 1), ("P:3", 1), ("Q:1", 1)]


def test_forks_copy_a_shared_partial_page_on_first_write():
    sim = Sim()
    p = make_seq("P", toks(0, 6))
    sim.add(p)
    assert sim.step().plan == [("P", 6)]
    p0, p1 = p.block_table  # p1 holds positions 4, 5 and is half empty
    c1 = fork(sim.sched, p)
    c2 = fork(sim.sched, p, after=c1)
    assert [sim.pool.ref_counts[x] for x in (p0, p1)] == [3, 3]
    assert sim.pool.num_used == 2

    out = sim.sched.schedule()
    n1, n2 = p.block_table[1], c1.block_table[1]
    assert out.copies == [PageCopy(p1, n1), PageCopy(p1, n2)]  # the last sharer writes in place
    assert (p.block_table, c1.block_table, c2.block_table) == ([p0, n1], [p0, n2], [p0, p1])
    assert [sim.pool.ref_counts[x] for x in (p0, p1, n1, n2)] == [3, 1, 1, 1]
    assert sim.pool.num_used == 4
    assert sim.commit(out).plan == [("P", 1), ("P:1", 1), ("P:2", 1)]

    s3 = sim.step()  # every page written now is private: no more copies
    assert s3.out.copies == [] and sim.pool.num_used == 4
    assert sim.kv.cache.num_cached == 4  # p0 plus each sequence's own (different) second page
    for s in (p, c1, c2):
        sim.sched.finish(s)
    sim.assert_empty()


def test_forks_of_a_full_last_page_copy_nothing():
    sim = Sim()
    p = make_seq("P", toks(0, 8))
    sim.add(p)
    sim.step()
    c1 = fork(sim.sched, p)
    c2 = fork(sim.sched, p, after=c1)
    s2 = sim.step()
    assert s2.plan == [("P", 1), ("P:1", 1), ("P:2", 1)]
    assert s2.out.copies == []
    assert sim.pool.num_used == 2 + 3  # the shared full pages + one new page each
    for s in (p, c1, c2):
        sim.sched.finish(s)
    sim.assert_empty()


@pytest.mark.parametrize("num_blocks", [5, 6])
def test_a_planned_copy_is_dropped_when_its_sequence_is_preempted(num_blocks):
    sim = Sim(num_blocks=num_blocks, budget=7, caching=False)
    p, q = make_seq("P", toks(0, 6)), make_seq("Q", toks(100, 10))
    sim.add(p, q)
    assert sim.step().plan == [("P", 6), ("Q", 1)]
    p0, p1 = p.block_table
    sim.sched.pause(p)
    c = fork(sim.sched, p)  # runs on the paused parent's pages: running [Q, C]
    assert sim.ids(sim.sched.running) == ["Q", "P:1"]

    out = sim.sched.schedule()  # C's decode copies p1; Q's chunk (6 tokens) then needs one page
    if num_blocks == 6:  # room for both
        assert out.copies == [PageCopy(p1, c.block_table[1])] and out.preempted == []
        assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("P:1", 1), ("Q", 6)]
    else:  # no room: C (newest) is preempted, and its copy with it
        assert out.copies == [] and out.preempted == [c]
        assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("Q", 6)]
        assert c.block_table == [] and sim.ids(sim.sched.waiting) == ["P:1"]
        assert p.block_table == [p0, p1] and [sim.pool.ref_counts[x] for x in (p0, p1)] == [1, 1]
        assert sim.pool.num_used == 4
    sim.commit(out)
    for s in (p, q, c):
        sim.sched.finish(s)
    sim.assert_empty()


# ---- fairness: long prompts, shares of the batch, priorities, who is preempted ---------------------


def test_a_long_prompt_is_cut_so_a_short_one_gets_its_chunk_in_the_same_step():
    sim = Sim(budget=16, threshold=4, caching=False)
    a = make_seq("A", toks(0, 60))
    sim.add(a)
    assert sim.step().plan == [("A", 16)]  # alone: cut to 4, then extended by the leftover 12
    b, c, d = make_seq("B", toks(100, 3)), make_seq("C", toks(200, 30)), make_seq("D", toks(300, 2))
    sim.add(b, c, d)
    s2 = sim.step()
    # A is cut to 4; B (short) takes its whole prompt; C (long) is passed over while A is cut,
    # D (short, behind C) is not; the 7 tokens left go back to A.
    assert s2.plan == [("A", 11), ("B", 3), ("D", 2)]
    assert s2.sampled == ["B", "D"]
    assert sim.ids(sim.sched.waiting) == ["C"]
    s3 = sim.step()
    assert s3.plan == [("B", 1), ("D", 1), ("A", 14)]
    assert sim.step().plan == [("B", 1), ("D", 1), ("A", 14)]
    # A's last 5 tokens: cut to 4 (C passed over), extended to 5; A's prompt is done, so C, the
    # next long prompt, takes what is left
    s5 = sim.step()
    assert s5.plan == [("B", 1), ("D", 1), ("A", 5), ("C", 9)]
    assert a.num_computed_tokens == 60 and s5.sampled == ["B", "D", "A"]
    s6 = sim.step()  # C, the only prompt left: cut to 4, extended by the leftover 9
    assert s6.plan == [("A", 1), ("B", 1), ("D", 1), ("C", 13)]


def test_without_the_threshold_a_long_prompt_takes_the_whole_budget():
    sim = Sim(budget=16, caching=False)
    sim.add(make_seq("A", toks(0, 60)))
    sim.step()
    sim.add(make_seq("B", toks(100, 3)))
    assert sim.step().plan == [("A", 16)]  # B waits for A's whole prompt
    assert sim.ids(sim.sched.waiting) == ["B"]


def test_fair_shares_by_hand():
    reqs = [make_seq(n, [1]).request for n in "ABCD"]
    a, b, c, d = reqs
    assert fair_shares({a: 8, b: 1}, 4, 2) == {b: 1, a: 2}  # A capped at its share, a slot idles
    assert fair_shares({a: 8, b: 1}, 4, 4) == {b: 1, a: 3}
    assert fair_shares({a: 256, b: 256, c: 1}, 256, 128) == {c: 1, a: 128, b: 127}
    # more requests than slots: the first served (oldest) get one each
    assert fair_shares({a: 1, b: 1, c: 1, d: 1}, 2, 2) == {a: 1, b: 1, c: 0, d: 0}
    a.priority = 1  # served last
    assert fair_shares({a: 1, b: 1, c: 1}, 2, 2) == {b: 1, c: 1, a: 0}


def test_a_wide_request_keeps_to_its_share_while_another_waits():
    sim = Sim(max_num_seqs=4, share=0.5, caching=False)
    p = make_seq("P", toks(0, 5))
    sim.add(p)
    assert sim.step().plan == [("P", 5)]
    kids = [fork(sim.sched, p) for _ in range(3)]  # the engine's n = 4 forks at the first sample
    assert sim.step().plan == [("P", 1), ("P:1", 1), ("P:2", 1), ("P:3", 1)]  # alone: all 4 slots
    q = make_seq("Q", toks(100, 3))
    sim.add(q)
    s3 = sim.step()  # P holds 2 of the 4 slots (its share), Q is admitted; P:2, P:3 keep their pages
    assert s3.plan == [("P", 1), ("P:1", 1), ("Q", 3)]
    assert all(s.status is SequenceStatus.RUNNING and s.block_table for s in kids)
    for _ in range(3):
        assert sim.step().plan == [("P", 1), ("P:1", 1), ("Q", 1)]
    # demand counts samples not forked yet: a request with 10 pending samples is wide already
    r = make_seq("R", toks(200, 3))
    r.request.pending_samples = 10
    sim.sched.finish(q)
    sim.add(r)
    assert sim.sched.room([p.request, r.request]) == {p.request: 0, r.request: 1}
    s7 = sim.step()
    assert s7.plan == [("P", 1), ("P:1", 1), ("R", 3)]
    sim.sched.finish(r)
    assert sim.step().plan == [("P", 1), ("P:1", 1), ("P:2", 1), ("P:3", 1)]  # alone again
    for s in [p, *kids]:
        sim.sched.finish(s)
    sim.assert_empty()


def test_priority_orders_the_waiting_queue():
    sim = Sim(max_num_seqs=1, caching=False)
    a, b, c, d = (
        make_seq("A", toks(0, 3), priority=0),
        make_seq("B", toks(10, 3), priority=5),
        make_seq("C", toks(20, 3), priority=-1),
        make_seq("D", toks(30, 3), priority=0),
    )
    sim.add(a, b, c, d)
    assert sim.ids(sim.sched.waiting) == ["C", "A", "D", "B"]  # lower first, FCFS among equals
    assert sim.step().plan == [("C", 3)]
    sim.sched.pause(c)
    sim.sched.finish(c)
    assert sim.step().plan == [("A", 3)]
    e = make_seq("E", toks(40, 3), priority=0)
    sim.add(e)
    assert sim.ids(sim.sched.waiting) == ["D", "E", "B"]
    sim.sched.pause(e)
    sim.sched.resume(e)  # it waited already: back first among its priority (as if preempted)
    assert sim.ids(sim.sched.waiting) == ["E", "D", "B"]
    for s in (a, b, d, e):
        sim.sched.finish(s)
    sim.assert_empty()


def test_preemption_takes_from_the_request_running_the_most_sequences():
    sim = Sim(num_blocks=7, caching=False)  # 6 usable pages
    p = make_seq("P", toks(0, 4))
    sim.add(p)
    sim.step()
    kids = [fork(sim.sched, p) for _ in range(3)]  # 4 sequences sharing one full page
    q = make_seq("Q", toks(100, 3))
    sim.add(q)
    s2 = sim.step()  # P's 4 each need a page for position 4 (4 pages), Q one: 6 of 6
    assert s2.plan == [("P", 1), ("P:1", 1), ("P:2", 1), ("P:3", 1), ("Q", 3)]
    for _ in range(3):
        sim.step()  # positions 5-7 and Q's 3-5: Q needs a second page at position 4 ...
    # ... Q is the newest, but P runs 4 sequences: P's newest (P:3) is preempted, not Q
    assert sim.sched.num_preemptions >= 1
    assert q.status is SequenceStatus.RUNNING and q.request.metrics.num_preemptions == 0
    assert kids[-1].status is SequenceStatus.WAITING
    for s in (p, q, *kids):
        sim.sched.finish(s)
    sim.assert_empty()


def test_pages_held_by_sequences_idle_over_their_share_go_to_a_newcomer():
    sim = Sim(num_blocks=7, max_num_seqs=4, share=0.5, caching=False)  # 6 usable pages
    p = make_seq("P", toks(0, 4))
    sim.add(p)
    sim.step()
    kids = [fork(sim.sched, p) for _ in range(3)]
    assert len(sim.step().plan) == 4  # position 4: a page each, 5 pages in use
    q = make_seq("Q", toks(100, 8))  # needs 2 pages, 1 is free
    sim.add(q)
    s3 = sim.step()  # P runs its share (2); its idle P:3 gives its page up for Q
    assert s3.plan == [("P", 1), ("P:1", 1), ("Q", 8)]
    assert s3.out.preempted == [kids[2]] and kids[2].status is SequenceStatus.WAITING
    assert kids[1].status is SequenceStatus.RUNNING and kids[1].block_table  # not needed: kept
    for s in (p, q, *kids):
        sim.sched.finish(s)
    sim.assert_empty()


# ---- a long random workload: invariants every step, nothing leaked at the end ----------------------


def _check_step(sim: Sim, out: SchedulerOutput) -> None:
    """Before the forward: every position a chunk writes lands in a page only that sequence holds
    and the prefix cache does not; each copy fills the page its sequence writes first."""
    pool, cache, kv = sim.pool, sim.kv.cache, sim.kv
    seqs = [s.seq for s in out.scheduled]
    assert len(set(map(id, seqs))) == len(seqs)
    assert out.num_batched_tokens <= sim.sched.max_num_batched_tokens
    assert not any(p in seqs for p in out.preempted)
    dsts = {}
    for s in out.scheduled:
        seq, end = s.seq, s.seq.num_computed_tokens + s.num_new_tokens
        assert s.num_new_tokens >= 1 and end <= seq.num_tokens
        assert len(seq.block_table) >= kv.blocks_for(end)
        for pos in range(seq.first_write, end):
            page = seq.block_table[pos // BS]
            assert pool.ref_counts[page] == 1, (seq.seq_id, pos, page)
            assert cache is None or not cache.contains(page)
        if seq.first_write < end:
            dsts[seq.block_table[seq.first_write // BS]] = seq
    for c in out.copies:
        assert c.src != c.dst and c.dst in dsts


def _check_pool(sim: Sim, live: list[Sequence]) -> None:
    """Refcounts are exactly the holders' table entries; every page is held, free or idle-cached."""
    pool, cache = sim.pool, sim.kv.cache
    held = Counter(p for s in live for p in s.block_table)
    for page in range(1, pool.num_blocks):
        assert pool.ref_counts[page] == held[page], page
    free = set(pool._free)
    idle = {p for p in range(1, pool.num_blocks) if cache is not None and p in cache._idle}
    assert len(free) == len(pool._free)
    assert free.isdisjoint(idle) and free.isdisjoint(held) and idle.isdisjoint(held)
    assert len(free) + len(idle) + len(held) == pool.num_usable
    assert pool.num_used == len(held)
    for s in live:
        assert s.status is not SequenceStatus.FINISHED
        if s.status is SequenceStatus.WAITING:
            assert s.block_table == [] and s.num_computed_tokens == 0


@pytest.mark.parametrize(
    "caching,chunked,budget", [(True, True, 16), (False, True, 16), (True, False, 64), (False, False, 64)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_workload_keeps_the_books_and_leaks_nothing(caching, chunked, budget, seed):
    rng = random.Random(seed)
    # A small vocabulary for sampled tokens: forks often produce identical pages (dedupe path).
    sim = Sim(
        num_blocks=17, budget=budget, max_num_seqs=6, chunked=chunked, caching=caching,
        token=lambda seq: rng.randrange(3),
    )  # fmt: skip
    bases = [toks(1000 * i, 8) for i in range(3)]
    max_new: dict[str, int] = {}
    live: list[Sequence] = []
    paused: Sequence | None = None
    num_requests = forks = 0
    preempted = copies = 0
    for _ in range(3000):
        if num_requests < 30 and rng.random() < 0.4:
            tail = [rng.randrange(5000, 5003) for _ in range(rng.randint(0, 9))]
            seq = make_seq(f"r{num_requests}", rng.choice(bases) + tail)
            num_requests += 1
            max_new[seq.seq_id] = rng.randint(1, 12)
            sim.add(seq)
            live.append(seq)
        if forks < 15 and live and rng.random() < 0.15:
            parent = rng.choice(live)
            if parent.num_output_tokens < max_new[parent.seq_id]:
                child = fork(sim.sched, parent)
                max_new[child.seq_id] = max_new[parent.seq_id]
                live.append(child)
                forks += 1
        if paused is None and sim.sched.running and rng.random() < 0.1:
            paused = rng.choice(sim.sched.running)
            sim.sched.pause(paused)
        elif paused is not None and rng.random() < 0.3:
            sim.sched.resume(paused)
            paused = None
        if live and rng.random() < 0.03:  # prune one
            victim = rng.choice(live)
            sim.sched.finish(victim)
            live.remove(victim)
            if victim is paused:
                paused = None

        out = sim.sched.schedule()
        _check_step(sim, out)
        preempted += len(out.preempted)
        copies += len(out.copies)
        step = sim.commit(out)
        for seq_id in step.sampled:
            seq = next(s for s in live if s.seq_id == seq_id)
            if seq.num_output_tokens >= max_new[seq_id]:
                sim.sched.finish(seq)
                live.remove(seq)
        _check_pool(sim, live)
        if num_requests == 30 and not live:
            break
    assert not live and not sim.sched.has_unfinished()
    assert sim.sched.num_preemptions == preempted > 0
    assert copies > 0
    assert (sim.sched.prefix_stats.reused_tokens > 0) == caching
    sim.assert_empty()


# ---- known bug -----------------------------------------------------------------------------------


def test_chunking_off_needs_a_budget_of_max_model_len():
    """Unchunked, the scheduler takes a sequence whole: one longer than the budget (here B, preempted
    after it grew to 8 tokens) is never admitted again. The engine therefore refuses a budget below
    max_model_len when chunked prefill is off (engine/startup.py)."""
    sim = Sim(num_blocks=5, budget=7, chunked=False, caching=False)  # 4 usable pages
    a, b = make_seq("A", toks(0, 6)), make_seq("B", toks(100, 6))
    sim.add(a, b)
    assert sim.step().plan == [("A", 6)]  # B (6) does not fit the 1 token left
    assert sim.step().plan == [("A", 1), ("B", 6)]
    assert sim.step().plan == [("A", 1), ("B", 1)]
    s4 = sim.step()  # A needs a third page: B (now 8 tokens) is preempted
    assert s4.plan == [("A", 1)] and s4.out.preempted == [b] and b.num_tokens == 8
    sim.sched.finish(a)
    assert sim.step().plan == []  # stalled: why the engine validates the budget

    model, kv = preset_config("tiny"), KVCacheSpec(num_blocks=65, block_size=16, bytes_per_block=1)
    off = EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=511, max_model_len=512)
    with pytest.raises(ValueError, match="max_num_batched_tokens=511 is below max_model_len=512"):
        resolve_max_model_len(off, model, kv)
    assert resolve_max_model_len(replace(off, max_num_batched_tokens=512), model, kv) == 512
    assert resolve_max_model_len(replace(off, enable_chunked_prefill=True), model, kv) == 512
