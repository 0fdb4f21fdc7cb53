"""Generation as a tree: prefix cache, fork / prune with copy-on-write, shared-prefix attention."""

from __future__ import annotations

import random

import pytest
from conftest import tiny_llm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkllm import SamplingParams
from forkllm.engine.sampling_params import RequestOutputKind
from forkllm.kv.block_pool import BlockPool
from forkllm.kv.prefix_cache import PrefixCache

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _ids(llm, prompts, params=GREEDY):
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]


def _shared_prompts(rng: random.Random, n: int, prefix_len: int, tail: tuple[int, int]) -> list[list[int]]:
    prefix = [rng.randrange(100, 40000) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(100, 40000) for _ in range(rng.randint(*tail))] for _ in range(n)]


def assert_no_leaks(engine):
    """Every page is free or idle in the prefix cache once nothing runs; refcounts agree."""
    pool = engine.kv.pool
    assert not engine.has_unfinished_requests() and not engine.seqs
    assert pool.num_free == pool.num_usable
    assert sum(1 for rc in pool.ref_counts[1:] if rc) == 0
    cached = engine.kv.cache.num_cached if engine.kv.cache else 0
    assert len(pool._free) + cached == pool.num_usable


# ---- prefix cache ------------------------------------------------------------------------------
def test_prefix_cache_reuses_pages_and_matches_uncached():
    rng = random.Random(0)
    prompts = _shared_prompts(rng, 6, 70, (3, 20))
    cold = _ids(tiny_llm(enable_prefix_caching=False), prompts)
    llm = tiny_llm()
    first = _ids(llm, prompts[:1])
    rest = _ids(llm, prompts[1:])
    assert first + rest == cold
    m = llm.engine.metrics()
    # 70 shared tokens = 4 full pages reused by each of the 5 later requests
    assert m["prefix_cache_reused_tokens"] == 5 * 64
    assert m["prefix_cache_hit_rate"] == pytest.approx(5 * 64 / sum(len(p) for p in prompts))
    assert_no_leaks(llm.engine)


def test_full_hit_recomputes_last_token_without_writing():
    prompt = list(range(1000, 1064))  # exactly 4 pages
    ref = _ids(tiny_llm(enable_prefix_caching=False), [prompt])
    llm = tiny_llm()
    assert _ids(llm, [prompt]) == ref
    assert _ids(llm, [prompt]) == ref  # second time: every page cached, only the logits recomputed
    assert llm.engine.metrics()["prefix_cache_reused_tokens"] == 64
    assert_no_leaks(llm.engine)


def test_prompt_logprobs_bypass_the_cache():
    prompt = list(range(2000, 2050))
    llm = tiny_llm()
    llm.generate([prompt], GREEDY, use_tqdm=False)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    assert all(p is not None for p in out.prompt_logprobs[1:])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    block_size=st.sampled_from([4, 8, 16, 32]),
    pool_pages=st.sampled_from([None, 24, 40]),
    prefix_len=st.integers(0, 50),
    n_prompts=st.integers(1, 6),
)
def test_cache_and_shared_attention_do_not_change_outputs(
    seed, block_size, pool_pages, prefix_len, n_prompts
):
    rng = random.Random(seed)
    prompts = _shared_prompts(rng, n_prompts, prefix_len, (1, 25))
    pages = None if pool_pages is None else pool_pages * 16 // block_size
    kw = dict(block_size=block_size, num_kv_blocks=pages, max_num_batched_tokens=rng.choice([16, 64, 2048]))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, n=rng.choice([1, 2]))
    ref = _ids(
        tiny_llm(enable_prefix_caching=False, enable_shared_prefix_attention=False, **kw), prompts, params
    )
    llm = tiny_llm(min_shared_prefix_tokens=block_size, **kw)
    assert _ids(llm, prompts, params) == ref
    assert _ids(llm, prompts[::-1], params) == ref[::-1]  # again, now hitting the cache
    assert_no_leaks(llm.engine)


def test_eviction_is_leaf_first_lru():
    cache = PrefixCache(block_size=2)
    pool = BlockPool(8, cache)
    a = pool.allocate(3)
    nodes = []
    for i, b in enumerate(a):  # one chain: a0 -> a1 -> a2
        nodes.append(cache.insert(nodes[-1] if nodes else None, (i, i), b))
    c = pool.allocate(1)
    cache.insert(nodes[0], (9, 9), c[0])  # a0 -> c0 (a sibling branch)
    pool.decref(a + c)
    assert pool.num_free == 7 and cache.num_idle == 4
    cache.match([0, 0, 9, 9], 2)  # touch the branch: a2 is now least recent
    assert pool.allocate(4 + 1)  # 3 truly free + 2 evicted: a2, then a1 (now the oldest leaf)
    assert cache.contains(a[0]) and cache.contains(c[0])
    assert not cache.contains(a[1]) and not cache.contains(a[2])


@pytest.mark.parametrize(("eviction", "evicted"), [("lru", "t0 s1"), ("lfu", "t0 u0")])
def test_lfu_eviction_keeps_the_pages_requests_reuse(eviction, evicted):
    """A "system prompt" s0 -> s1 matched three times, one request's own page t0 under it, then an
    unrelated page u0, all idle. Two pages must go: LRU takes t0, then s1 (matched longest ago);
    LFU takes the two pages nobody reused, t0 then u0, and keeps the system prompt whole."""
    cache = PrefixCache(block_size=2, eviction=eviction)
    pool = BlockPool(8, cache)
    s0, s1, t0, u0 = pool.allocate(4)
    n0 = cache.insert(None, (1, 1), s0)
    n1 = cache.insert(n0, (2, 2), s1)
    for _ in range(3):
        assert [n.block_id for n in cache.match([1, 1, 2, 2], 2)] == [s0, s1]
    cache.match([9, 9], 1)  # a miss: the clock ticks
    cache.insert(n1, (3, 3), t0)
    cache.match([9, 9], 1)
    cache.insert(None, (4, 4), u0)
    pool.decref([s0, s1, t0, u0])
    assert pool.allocate(3 + 2)  # 3 never used + 2 evicted
    pages = {"s0": s0, "s1": s1, "t0": t0, "u0": u0}
    assert {k for k, b in pages.items() if not cache.contains(b)} == set(evicted.split())


def test_unknown_eviction_policy_is_named():
    from forkllm.engine.config import EngineConfig

    with pytest.raises(ValueError, match="prefix_cache_eviction must be 'lru' or 'lfu'; got 'fifo'"):
        EngineConfig(prefix_cache_eviction="fifo")
    with pytest.raises(ValueError, match="prefix_cache_eviction must be one of"):
        PrefixCache(16, eviction="mru")


def test_engine_with_lfu_eviction_serves_from_its_cache():
    """The flag reaches the engine's cache: a repeated prompt is a hit, tokens unchanged."""
    prompt = [[(17 * j) % 30_000 + 100 for j in range(64)]]
    lru, lfu = tiny_llm(), tiny_llm(prefix_cache_eviction="lfu")
    assert lfu.engine.kv.cache is not None and lfu.engine.kv.cache.lfu
    ref = _ids(lru, prompt)
    assert _ids(lfu, prompt) == ref and _ids(lfu, prompt) == ref
    assert lfu.engine.metrics()["prefix_cache_hit_rate"] > 0.4


# ---- fork, prune, n --------------------------------------------------------------------------
def test_n_samples_prefill_once_and_share_pages():
    llm = tiny_llm(kv_cache_memory="256MiB", enable_prefix_caching=False)
    engine = llm.engine
    prompt = [random.Random(1).randrange(100, 40000) for _ in range(512)]
    engine.add_request(prompt, SamplingParams(n=16, temperature=0.8, seed=3, max_tokens=16, ignore_eos=True))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.kv.pool.num_used)
    assert engine.stats.prompt_tokens_computed == 512  # one prefill, not 16
    assert engine.tree.num_forks == 15
    unshared = 16 * -(-(512 + 16) // 16)
    assert peak <= unshared / 8, (peak, unshared)
    assert_no_leaks(engine)


def test_n_samples_same_as_before_forking():
    """Forked samples draw exactly what independent sequences with the same seeds would."""
    prompt = list(range(300, 337))
    sp = SamplingParams(n=4, temperature=1.0, seed=99, max_tokens=14, ignore_eos=True)
    forked = tiny_llm().generate([prompt], sp, use_tqdm=False)[0]
    from forkllm.engine.sampler import derive_seed

    singles = [
        tiny_llm().generate([prompt], sp.clone(n=1, seed=derive_seed(99, i)), use_tqdm=False)[0]
        for i in range(4)
    ]
    assert [c.token_ids for c in forked.outputs] == [s.outputs[0].token_ids for s in singles]


@pytest.mark.parametrize("fork_after", [1, 5, 16])
def test_fork_mid_decode_children_continue_like_parent(fork_after):
    prompt = list(range(500, 541))
    sp = SamplingParams(temperature=1.0, seed=7, max_tokens=30, ignore_eos=True)
    ref = tiny_llm().generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    llm = tiny_llm()
    engine = llm.engine
    rid = engine.add_request(prompt, sp.clone(output_kind=RequestOutputKind.FINAL_ONLY))
    while engine.seqs[rid].num_output_tokens < fork_after:
        engine.step()
    seed = engine.seqs[rid].seed
    kids = engine.fork(rid, 3, seeds=[seed, seed, 12345])
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    final = {c.index: c.token_ids for c in outs[-1].outputs}
    assert final[0] == ref
    assert final[1] == ref and final[2] == ref  # same seed, same prefix: same continuation
    assert final[3][:fork_after] == ref[:fork_after] and final[3] != ref
    assert [int(k.split(":")[1]) for k in kids] == [1, 2, 3]
    assert_no_leaks(engine)


def test_prune_releases_private_pages():
    llm = tiny_llm(enable_prefix_caching=False)
    engine = llm.engine
    rid = engine.add_request(
        list(range(700, 740)), SamplingParams(temperature=1.0, seed=1, max_tokens=40, ignore_eos=True)
    )
    for _ in range(3):
        engine.step()
    kids = engine.fork(rid, 2)
    for _ in range(20):
        engine.step()
    used = engine.kv.pool.num_used
    private = [b for b in engine.seqs[kids[0]].block_table if engine.kv.pool.ref_counts[b] == 1]
    engine.prune(kids[0])
    assert engine.kv.pool.num_used == used - len(private)
    with pytest.raises(ValueError, match="no live sequence"):
        engine.prune(kids[0])
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    reasons = {c.index: c.finish_reason for c in outs[-1].outputs}
    assert reasons == {0: "length", 1: "pruned", 2: "length"}
    assert_no_leaks(engine)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 100_000))
def test_random_tree_operations_keep_refcounts_consistent(seed):
    rng = random.Random(seed)
    llm = tiny_llm(
        num_kv_blocks=rng.choice([30, 60, 200]),
        block_size=rng.choice([4, 16]),
        max_num_batched_tokens=rng.choice([16, 128]),
    )
    engine = llm.engine
    pool = engine.kv.pool
    for _ in range(rng.randint(1, 4)):
        engine.add_request(
            [rng.randrange(100, 4000) for _ in range(rng.randint(1, 40))],
            SamplingParams(temperature=1.0, max_tokens=rng.randint(1, 30), n=rng.choice([1, 3])),
        )
    for _ in range(60):
        live = [s for s in engine.seqs.values() if not s.finished]
        op = rng.random()
        if live and op < 0.15:
            engine.fork(rng.choice(live).seq_id, rng.randint(1, 3))
        elif live and op < 0.25:
            engine.prune(rng.choice(live).seq_id)
        elif op < 0.3 and engine.requests:
            engine.abort_request(rng.choice(list(engine.requests)))
        engine.step()
        # invariant: each page's refcount = number of live sequences holding it
        holders = [0] * pool.num_blocks
        for s in engine.seqs.values():
            for b in s.block_table:
                holders[b] += 1
        assert holders[1:] == pool.ref_counts[1:]
        assert pool.num_used == sum(1 for h in holders[1:] if h)
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)


def test_pruning_an_n_request_before_its_first_sample_ends_it():
    # found by the random tree test (seed 37886): the pending samples fork from the first
    # sequence's first sample; pruned before it, the request used to stay unfinished forever
    llm = tiny_llm()
    engine = llm.engine
    rid = engine.add_request(list(range(100, 140)), SamplingParams(temperature=1.0, max_tokens=5, n=3))
    engine.prune(engine.requests[rid].seqs[0].seq_id)
    assert not engine.has_unfinished_requests()
    assert_no_leaks(engine)


def test_fork_errors():
    engine = tiny_llm().engine
    with pytest.raises(ValueError, match="no live sequence"):
        engine.fork("nope", 2)
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="k must be"):
        engine.fork(rid, 0)
    with pytest.raises(ValueError, match="seeds"):
        engine.fork(rid, 2, seeds=[1])
    engine.abort_request(rid)


# ---- shared-prefix attention --------------------------------------------------------------------
def _spy_groups(backend) -> list[int]:
    """Members grouped at each step where the backend formed shared-prefix groups."""
    seen: list[int] = []
    orig = backend.build_metadata

    def spy(batch):
        meta = orig(batch)
        if meta.shared is not None:
            seen.append(len(meta.shared.member_rows))
        return meta

    backend.build_metadata = spy
    return seen


def test_shared_prefix_attention_groups_and_matches():
    rng = random.Random(5)
    prompts = _shared_prompts(rng, 5, 100, (2, 9))
    sp = SamplingParams(n=3, temperature=0.9, seed=4, max_tokens=16, ignore_eos=True)
    ref = _ids(tiny_llm(enable_shared_prefix_attention=False), prompts, sp)
    llm = tiny_llm(min_shared_prefix_tokens=32)
    seen = _spy_groups(llm.engine.runner.attention)
    assert _ids(llm, prompts, sp) == ref
    assert seen and max(seen) == 15  # all 5 x 3 decode rows share the 100-token system prompt


def test_shared_prefix_attention_torch_path_matches():
    """The PyTorch shared-prefix path (own keys by gather + matmul, softmax and merge in PyTorch)
    gives the per-sequence path's greedy tokens, and it did run: rows were grouped."""
    from forkllm.attention.paged import TorchAttention
    from forkllm.attention.shared_prefix import SharedPrefixAttention

    rng = random.Random(6)
    prompts = _shared_prompts(rng, 3, 64, (1, 5))
    sp = SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True)
    ref = _ids(tiny_llm(enable_shared_prefix_attention=False), prompts, sp)
    llm = tiny_llm(min_shared_prefix_tokens=32)
    runner = llm.engine.runner
    runner.attention = SharedPrefixAttention(
        TorchAttention(runner.block_size, runner.scale), runner.attention.min_shared_pages
    )
    seen = _spy_groups(runner.attention)
    assert _ids(llm, prompts, sp) == ref
    assert seen and max(seen) == 6  # all 3 x 2 decode rows share the 64-token prompt prefix


def test_shared_prefix_attention_fused_bf16_matches():
    """bf16 engine: at every decode step, the fused kernel's shared-prefix attention (merged with
    each row's own keys) equals per-sequence attention over the same pages, to bf16 rounding."""
    import dataclasses

    from forkllm.attention.cpu import CpuKernelAttention
    from forkllm.attention.shared_prefix import FusedSharedPrefixAttention

    llm = tiny_llm(dtype="bfloat16", min_shared_prefix_tokens=32)
    runner = llm.engine.runner
    if not runner.kernels.shared_prefix_fused:
        pytest.skip("no AVX512-BF16 kernel on this CPU")
    backend = runner.attention
    assert isinstance(backend, FusedSharedPrefixAttention)
    assert runner.kernels.ops is not None
    per_row = CpuKernelAttention(runner.kernels.ops, runner.block_size, runner.scale)
    orig = backend.decode
    diffs = []

    def checked(cache, q, meta):
        out = orig(cache, q, meta)
        if meta.shared is not None:
            plain = dataclasses.replace(meta, shared=None, decode_starts=None)
            ref = per_row.decode(cache, q, plain)
            diffs.append(((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
        return out

    backend.decode = checked
    rng = random.Random(7)
    prompts = _shared_prompts(rng, 4, 96, (1, 6))
    llm.generate(
        prompts, SamplingParams(n=3, temperature=0.8, seed=2, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    assert diffs
    assert max(diffs) < 2e-2
