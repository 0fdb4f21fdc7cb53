"""Reasoning threads: spawn / join by page (kv_concat) or by recomputation (reprefill)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_tree import assert_no_leaks

from forkllm import SamplingParams
from forkllm.kv.concat import JoinBranch, join_pages
from forkllm.threads import Fanout, MapReduce, ThreadPolicy
from tests.conftest import tiny_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=10_000)


# ---- the page join (kv layer) -------------------------------------------------------------------
def test_join_pages_layout_holes_and_positions():
    # base 6 slots, block 4: the parent holds pages [1, 2] (page 2 half full)
    parent = JoinBranch([1, 2], 6, [], 6)
    a = JoinBranch([1, 3, 4], 11, [], 11)  # copied page 2 -> 3, wrote slots 6..10
    b = JoinBranch([1, 5], 8, [], 8)  # copied page 2 -> 5, wrote slots 6..7
    c = JoinBranch([1, 2], 6, [], 6)  # wrote nothing: still shares page 2
    j = join_pages(parent, [a, b, c], 4)
    assert j.block_table == [1, 3, 4, 5]
    # a: slots 6..10 in place; its page 4 ends at slot 12 (hole 11..12); b's page 5 starts at 12,
    # its first two slots repeat the parent's tail (hole 12..14), its tokens sit at 14..15
    assert j.regions == [(6, 5), (14, 2), (16, 0)]
    assert j.holes == [(11, 14)]
    assert j.num_slots == 16
    assert j.position_shift == 16 - 11  # continues at a's next position (the largest)
    assert sorted(j.released) == sorted(
        [1, 1, 1, 2, 2]
    )  # children's prefix refs, c's page 2, the parent's page 2


def test_join_pages_aligned_base_has_no_head_holes():
    parent = JoinBranch([1, 2], 8, [], 8)
    a = JoinBranch([1, 2, 3], 10, [], 10)
    b = JoinBranch([1, 2, 4, 5], 13, [], 13)
    j = join_pages(parent, [a, b], 4)
    assert j.block_table == [1, 2, 3, 4, 5]
    assert j.holes == [(10, 12)]
    assert j.regions == [(8, 2), (12, 5)]
    assert j.num_slots == 17 and j.position_shift == 17 - 13
    with pytest.raises(ValueError, match="extend its parent"):
        join_pages(parent, [JoinBranch([7, 2, 3], 10, [], 10)], 4)


# ---- helpers: drive a spawn / join by hand --------------------------------------------------------
def _prefilled_root(engine, prompt):
    rid = engine.add_request(prompt, GREEDY)
    root = engine.requests[rid].seqs[0]
    while root.num_output_tokens == 0:
        engine.step()
    engine.tree.pause(root)
    engine.tree.truncate(root, len(prompt))
    return rid, root


def _run_children(engine, rid, root, suffixes, lengths):
    limits = [len(root.token_ids) + len(s) + n + 1 for s, n in zip(suffixes, lengths)]
    kids = engine.tree.spawn(root, suffixes, limits)
    engine.tree.park_on_stop(rid, lambda s: s is not root)
    while not all(k.status.value == "paused" for k in kids):
        engine.step()
    return kids


class DenseContext:
    """Reference attention: every layer's keys and values in one dense tensor per layer (no
    pages), queries attend to all of the prefix and causally to themselves."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None, num_layers: int):
        self.prefix = prefix
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = [None] * num_layers  # type: ignore[list-item]

    def paged_rows(self):
        return None  # dense keys: never the fused paged pass

    def attend(self, layer, q, k, v):
        if self.prefix is not None:
            pk, pv = self.prefix[layer]
            k, v = torch.cat([pk, k]), torch.cat([pv, v])
        self.kv[layer] = (k, v)
        t, p = q.shape[0], k.shape[0] - q.shape[0]
        mask = torch.arange(k.shape[0])[None, :] <= torch.arange(p, p + t)[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask,
            enable_gqa=True,
            scale=q.shape[-1] ** -0.5,
        )
        return out[0].transpose(0, 1)


def _dense(model, ids, positions, prefix, num_layers):
    ctx = DenseContext(prefix, num_layers)
    hidden = model(torch.tensor(ids), torch.tensor(positions), ctx)
    return model.compute_logits(hidden), ctx.kv


# ---- kv_concat: same keys, values and positions as a dense reference ------------------------------
@pytest.mark.parametrize("block_size", [4, 16])
def test_kv_concat_join_matches_dense_reference_attention(block_size):
    llm = tiny_llm(block_size=block_size)
    engine, model = llm.engine, llm.engine.runner.model
    layers = engine.runner.config.num_layers
    prompt = list(range(300, 323))  # 23 tokens: a partial last page for both block sizes
    suffixes = [[500, 501], [600, 601, 602, 603, 604], [700]]
    rid, root = _prefilled_root(engine, prompt)
    kids = _run_children(engine, rid, root, suffixes, [5, 9, 3])
    regions = [k.token_ids[len(prompt) : k.num_computed_tokens] for k in kids]
    next_pos = max(k.num_computed_tokens for k in kids)

    held = {b for s in [root, *kids] for b in s.block_table}
    assert engine.kv.pool.num_used == len(held)
    plan = engine.tree.join_pages(root, kids)
    # refcounts exact: the joined table is every page still held, each held once
    assert engine.kv.pool.num_used == len(root.block_table) == len(set(root.block_table))
    assert all(engine.kv.pool.ref_counts[b] == 1 for b in root.block_table)
    assert root.num_computed_tokens == plan.num_slots
    assert root.position_shift == plan.num_slots - next_pos

    # the reference: parent and each thread computed densely at their own positions
    with torch.inference_mode():
        _, base_kv = _dense(model, prompt, list(range(len(prompt))), None, layers)
        joined = [list(kv) for kv in base_kv]
        for region in regions:
            ids = prompt + region
            _, kv = _dense(model, ids, list(range(len(ids))), None, layers)
            for li in range(layers):
                joined[li][0] = torch.cat([joined[li][0], kv[li][0][len(prompt) :]])
                joined[li][1] = torch.cat([joined[li][1], kv[li][1][len(prompt) :]])
        # the engine's pages hold exactly these keys and values at the valid slots
        valid = torch.ones(plan.num_slots, dtype=torch.bool)
        for a, b in plan.holes:
            valid[a:b] = False
        bs = block_size
        slots = torch.tensor([root.block_table[i // bs] * bs + i % bs for i in range(plan.num_slots)])[valid]
        for li in range(layers):
            cache = engine.runner.kv_caches[li]
            torch.testing.assert_close(
                cache[0][:, slots].transpose(0, 1), joined[li][0], rtol=1e-4, atol=1e-4
            )
            torch.testing.assert_close(
                cache[1][:, slots].transpose(0, 1), joined[li][1], rtol=1e-4, atol=1e-4
            )

        # the engine continues after `then` exactly as the dense reference does
        then = [42, 43]
        engine.tree.extend(root, then)
        root.token_limit = root.num_tokens + 6
        engine.tree.park_on_stop(rid, None)
        engine.tree.resume(root)
        while not root.finished:
            engine.step()
        got = root.token_ids[plan.num_slots + len(then) :]
        prefix = [tuple(kv) for kv in joined]
        ids, pos, want = then, list(range(next_pos, next_pos + len(then))), []
        while len(want) < len(got):
            logits, kv = _dense(model, ids, pos, prefix, layers)
            want.append(int(logits[-1].argmax()))
            prefix = kv  # type: ignore[assignment]
            pos = [pos[-1] + 1]
            ids = [want[-1]]
        assert got == want
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)


# ---- reprefill: the same as one plain sequence fed the joined text --------------------------------
def test_reprefill_join_equals_one_plain_sequence():
    llm = tiny_llm()
    engine = llm.engine
    spec = Fanout(
        ["one two", "three four five"], join="reprefill", then="\nso:", max_tokens=6, final_max_tokens=8
    )
    result = llm.threads("a question", spec, chat=False)
    assert result.join == "reprefill" and len(result.threads) == 3
    tok = engine.tokenizer
    prompt = tok.encode("a question")
    # the joined text: each thread's prompt and its computed tokens (max_tokens each), then `then`
    policy_prompts = [tok.encode(p, add_special_tokens=False) for p in spec.prompts]
    threads = []
    for p in policy_prompts:
        out = llm.generate([prompt + p], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        threads.append(p + list(out[0].outputs[0].token_ids))
    ids = prompt + [t for th in threads for t in th] + tok.encode("\nso:", add_special_tokens=False)
    plain = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    assert result.text == plain.text
    # the prompt, each thread's prompt, then all of the joined text once more
    assert result.prefill_tokens == len(ids) + sum(len(p) for p in policy_prompts)
    assert_no_leaks(engine)


def test_fanout_counts_events_and_frees_everything():
    llm = tiny_llm()
    spec = Fanout(["a", "bb", "ccc", "dddd"], join="kv_concat", max_tokens=5, final_max_tokens=7)
    r = llm.threads("question", spec, chat=False)
    assert [t.parent for t in r.threads] == [None, 0, 0, 0, 0]
    assert [t.generated_tokens for t in r.threads] == [7, 6, 6, 6, 6]  # max_tokens + the dropped one
    assert r.generated_tokens == 31 and r.critical_path_tokens == 13
    assert [e.event for e in r.events] == ["spawn", "end", "end", "end", "end", "join", "end"]
    assert r.events[0].children == [1, 2, 3, 4] and r.events[-2].join == "kv_concat"
    assert r.tree["threads"][1]["prompt"] == "a"
    assert_no_leaks(llm.engine)


def test_nested_fanout_and_map_reduce():
    llm = tiny_llm(block_size=4)
    inner = Fanout(["x", "y"], prefix="inner:", max_tokens=3, final_max_tokens=4)
    r = llm.threads("q", Fanout([inner, "z"], max_tokens=4, final_max_tokens=5), chat=False)
    assert [t.parent for t in r.threads] == [None, 0, 0, 1, 1]
    assert r.threads[1].generated_tokens == 5  # the nested context's answer (+ the dropped token)
    assert r.critical_path_tokens == 5 + 5 + 4  # context, then the nested context, then its thread
    mr = llm.threads(
        ["chunk one", "chunk two", "chunk three"], MapReduce("Summarize:", "Combine:", max_tokens=4)
    )
    assert len(mr.threads) == 4 and mr.threads[2].prompt == "chunk two\n\nSummarize:\n"
    assert_no_leaks(llm.engine)


# ---- bad input, aborts --------------------------------------------------------------------------
def test_bad_thread_input_is_refused_and_engine_keeps_serving():
    llm = tiny_llm(max_num_seqs=4)
    with pytest.raises(ValueError, match="Fanout.join: 'glue'"):
        Fanout(["a"], join="glue")
    with pytest.raises(ValueError, match=r"Fanout.prompts\[1\]"):
        Fanout(["a", ""])
    with pytest.raises(ValueError, match="exceed max_num_seqs"):
        llm.threads("q", Fanout(["a"] * 5), chat=False)
    deep = Fanout(["a"], prefix="p")
    for _ in range(4):
        deep = Fanout([deep], prefix="p")
    with pytest.raises(ValueError, match="5 levels deep; max_depth is 4"):
        llm.threads("q", deep, chat=False)
    with pytest.raises(ValueError, match="list of chunks"):
        llm.threads("one string", MapReduce("m", "r"))
    with pytest.raises(ValueError, match="n must be 1"):
        ThreadPolicy(Fanout(["a"]), SamplingParams(n=2))
    engine = llm.engine
    rid, root = _prefilled_root(engine, list(range(100, 110)))
    kids = _run_children(engine, rid, root, [[5], [6]], [2, 2])
    other_rid, other = _prefilled_root(engine, list(range(200, 205)))
    with pytest.raises(ValueError, match="is not a live child"):
        engine.tree.join_pages(root, [kids[0], other])
    engine.tree.end(kids[1], "stop")
    with pytest.raises(ValueError, match="is not a live child"):
        engine.tree.join_pages(root, kids)
    with pytest.raises(ValueError, match="tokens not computed"):
        engine.tree.resume(kids[0])
        engine.step()
        engine.tree.pause(kids[0])
        engine.tree.spawn(kids[0], [[1]])
    engine.abort_request([rid, other_rid])
    assert_no_leaks(engine)
    assert llm.generate(["still serving"], SamplingParams(max_tokens=3))[0].outputs[0].token_ids


def test_abort_mid_tree_frees_every_page():
    llm = tiny_llm(block_size=4)
    engine = llm.engine
    policy = ThreadPolicy(Fanout(["a", "b", "c"], max_tokens=50))
    from forkllm.engine.policy import drive

    outcome = []
    handle = drive(engine, policy, engine.tokenizer.encode("q"), "q", outcome.append)
    for _ in range(6):
        engine.step()
    assert len(policy.nodes) == 4 and engine.kv.pool.num_used > 0
    handle.cancel(engine)
    assert_no_leaks(engine)


# ---- subtask pruning (TIMRUN) and re-rotated keys ------------------------------------------------
def test_rerotated_keys_equal_keys_computed_at_the_new_positions():
    from forkllm.models.rope import RotaryEmbedding, apply_rotary, rerotate

    rotary = RotaryEmbedding(
        64, 4096, 100000.0, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 1024}
    )
    torch.manual_seed(0)
    raw = torch.randn(50, 3, 64)
    old = torch.randint(0, 2000, (50,))
    new = torch.randint(0, 2000, (50,))
    at_old = apply_rotary(raw, *rotary(old, torch.float32))
    want = apply_rotary(raw, *rotary(new, torch.float32))
    torch.testing.assert_close(rerotate(at_old, new - old, rotary), want, rtol=0, atol=2e-5)


def test_conclude_moves_the_conclusion_with_rerotated_keys_and_frees_the_work():
    llm = tiny_llm(block_size=4)
    engine, model = llm.engine, llm.engine.runner.model
    layers = engine.runner.config.num_layers
    prompt = list(range(300, 310))
    rid, root = _prefilled_root(engine, prompt)
    (kid,) = _run_children(engine, rid, root, [[500, 501, 502]], [12])
    base, end = len(prompt), kid.num_computed_tokens
    keep = [(base, base + 3), (end - 4, end)]  # its prompt and its last 4 tokens
    kept_pos = [j for a, b in keep for j in range(a, b)]
    n = engine.tree.conclude(root, kid, keep)
    assert n == 7 and kid.finished and root.num_tokens == base + 7
    assert root.position_shift == 0 and root.kv_pinned  # contiguous; not prefix-cacheable
    # pages: the context's own, nothing of the thread's work
    assert engine.kv.pool.num_used == len(root.block_table) == -(-(base + 7) // 4)
    with torch.inference_mode():
        ids = kid.token_ids[:end]
        _, kv = _dense(model, ids, list(range(len(ids))), None, layers)
        from forkllm.models.rope import rerotate

        bs = 4
        slots = torch.tensor([root.block_table[i // bs] * bs + i % bs for i in range(base, base + 7)])
        delta = torch.tensor([base + i - j for i, j in enumerate(kept_pos)])
        for li in range(layers):
            cache = engine.runner.kv_caches[li]
            want_k = rerotate(kv[li][0][kept_pos], delta, model.rotary)
            torch.testing.assert_close(cache[0][:, slots].transpose(0, 1), want_k, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(
                cache[1][:, slots].transpose(0, 1), kv[li][1][kept_pos], rtol=1e-4, atol=1e-4
            )
    engine.abort_request(rid)
    assert_no_leaks(engine)


def test_subtasks_prune_keeps_the_context_bounded():
    from forkllm.threads import Subtasks

    llm = tiny_llm(block_size=4)
    tok = llm.get_tokenizer()
    prompts = [f"step {i}:" for i in range(5)]
    pruned = llm.threads(
        "task", Subtasks(prompts, max_tokens=20, conclusion_tokens=3, final_max_tokens=4), chat=False
    )
    kept = llm.threads(
        "task",
        Subtasks(prompts, prune=False, max_tokens=20, conclusion_tokens=3, final_max_tokens=4),
        chat=False,
    )
    base = len(tok.encode("task"))
    sizes = [len(tok.encode(p, add_special_tokens=False)) for p in prompts]
    want, held = [], base
    for s in sizes:  # after each subtask: the context's tokens plus the prompt and 3 conclusion tokens
        held += s + 3
        want.append(-(-held // 4))
    assert pruned.pages_after_subtasks == want
    assert [e.event for e in pruned.events].count("prune") == 5
    assert kept.pages_after_subtasks[-1] > 2 * pruned.pages_after_subtasks[-1]
    assert pruned.peak_kv_pages < kept.peak_kv_pages
    assert [t.generated_tokens for t in pruned.threads[1:]] == [21] * 5
    assert_no_leaks(llm.engine)


# ---- model-driven protocol (Multiverse tags) ----------------------------------------------------
@pytest.mark.parametrize(
    "join, name", [("kv_concat", "multiverse"), ("reprefill", "multiverse"), ("kv_concat", "threadweaver")]
)
def test_protocol_tags_in_the_output_spawn_and_join_paths(join, name):
    from forkllm.threads import Protocol

    llm = tiny_llm()
    spec = Protocol(name, join=join, outline=["alpha", "beta", "gamma"], max_tokens=5, final_max_tokens=6)
    r = llm.threads("q", spec, chat=False)
    assert [e.event for e in r.events][:1] == ["spawn"] and r.events[0].children == [1, 2, 3]
    assert [t.prompt for t in r.threads[1:]] == ["1: alpha", "2: beta", "3: gamma"]
    assert "join" in [e.event for e in r.events]
    # every path ran to its max_tokens (+1) unless it closed its own </Path>
    assert all(t.generated_tokens <= 6 for t in r.threads[1:])
    assert r.threads[0].generated_tokens >= 6  # the forced block, then the answer after <Conclusion>
    assert_no_leaks(llm.engine)


def test_multiverse_joined_context_holds_every_tag():
    from forkllm.engine.policy import drive
    from forkllm.threads import Protocol, ProtocolPolicy

    llm = tiny_llm()
    engine, tok = llm.engine, llm.get_tokenizer()
    policy = ProtocolPolicy(
        Protocol("multiverse", join="reprefill", outline=["a", "b"], max_tokens=3, final_max_tokens=2)
    )
    joined: list[str] = []
    done: list = []
    drive(engine, policy, tok.encode("q"), "q", done.append)
    while not done:
        engine.step()
        ctx = policy.ctx
        if ctx.state == "free" and ctx.blocks == 1 and not joined:
            joined.append(tok.decode(ctx.seq.token_ids))
    text = joined[0]
    assert text.count("<Path>") == 2 and text.count("</Path>") == 2
    assert "</Goal>\n<Path>\n1:" in text and text.endswith("\n<Conclusion>\n")
    assert "<Outline>1: a</Outline>" in text
    assert_no_leaks(engine)
    weaver = Protocol("threadweaver", outline=["a", "b"], max_tokens=3, final_max_tokens=2)
    policy = ProtocolPolicy(weaver)
    joined.clear()
    drive(engine, policy, tok.encode("q"), "q", done.append)
    while len(done) < 2:
        engine.step()
        ctx = policy.ctx
        if ctx.state == "free" and ctx.blocks == 1 and not joined:
            joined.append(tok.decode(ctx.seq.token_ids[-10:]))
    assert joined[0].endswith("\n</Parallel>\n")
    assert [t.prompt for t in done[1].threads[1:]] == ["1: a", "2: b"]
    assert_no_leaks(engine)


def test_unknown_protocol_is_refused():
    from forkllm.threads import Protocol

    with pytest.raises(ValueError, match="unknown protocol 'nope'"):
        Protocol("nope")
    with pytest.raises(ValueError, match="3 paths exceed max_paths"):
        Protocol("multiverse", outline=["a", "b", "c"], max_paths=2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_segmented_decode_skips_holes_exactly(dtype):
    from forkllm.attention.metadata import AttentionBatch
    from forkllm.engine.runner import key_segments

    llm = tiny_llm(dtype=dtype, block_size=4)
    runner = llm.engine.runner
    backend, cache = runner.attention, runner.kv_caches[0]
    torch.manual_seed(0)
    cache.normal_()
    d = cache.shape[3]
    hq = runner.config.num_heads
    tables = [[3, 4, 5, 6, 7], [8, 9, 10], [3, 4, 11]]
    ctx = [19, 10, 12]
    holes = [[(5, 8), (13, 15)], [], [(2, 4)]]
    batch = AttentionBatch(
        torch.zeros(3, dtype=torch.long), tables, ctx, [], [key_segments(h, c) for h, c in zip(holes, ctx)]
    )
    meta = backend.build_metadata(batch)
    q = torch.randn(3, hq, d, dtype=cache.dtype)
    got = backend.decode_segments(cache, q, meta)
    for i, (table, n, hs) in enumerate(zip(tables, ctx, holes)):
        slots = torch.tensor(
            [table[j // 4] * 4 + j % 4 for j in range(n) if not any(a <= j < b for a, b in hs)]
        )
        k, v = cache[0][:, slots].float(), cache[1][:, slots].float()
        want = F.scaled_dot_product_attention(
            q[i].float()[None, :, None], k[None], v[None], enable_gqa=True, scale=d**-0.5
        )[0, :, 0]
        tol = 1e-5 if dtype == "float32" else 2e-2
        torch.testing.assert_close(got[i].float(), want, rtol=tol, atol=tol)


def test_threads_of_a_joined_or_concluded_context_keep_its_layout_and_stay_out_of_the_cache():
    llm = tiny_llm(block_size=4)
    engine = llm.engine
    prompt = list(range(300, 311))
    rid, root = _prefilled_root(engine, prompt)
    kids = _run_children(engine, rid, root, [[5, 6], [7]], [3, 6])
    engine.tree.join_pages(root, kids)
    (kid,) = engine.tree.spawn(root, [[9]])
    assert (kid.position_shift, kid.kv_holes) == (root.position_shift, root.kv_holes) and kid.kv_pinned
    cached = engine.kv.cache.num_cached
    for _ in range(8):
        engine.step()
    assert engine.kv.cache.num_cached == cached  # nothing of a joined layout is prefix-cached
    engine.abort_request(rid)
    assert_no_leaks(engine)


# ---- shared-cache workers (Hogwild!) ------------------------------------------------------------
def _worker_reference(engine, model, layers, w, view, bs):
    """The next greedy token of worker `w` computed densely over its view: the context, the other
    workers' computed tokens, its own; keys taken from the cache and re-rotated to their view
    positions, the current token at its view position."""
    from forkllm.models.rope import rerotate

    base = view.base
    slots, deltas = [], []

    def take(seq, a, b, view_start):
        for j in range(a, b):
            slots.append(seq.block_table[j // bs] * bs + j % bs)
            deltas.append(view_start + (j - a) - j)

    take(w, 0, base, 0)
    at = base
    for o in view.workers:
        if o is not w:
            n = o.num_computed_tokens - base
            take(o, base, base + n, at)
            at += n
    p = w.num_computed_tokens
    take(w, base, p, at)
    slot_t, delta_t = torch.tensor(slots), torch.tensor(deltas)
    prefix = []
    for li in range(layers):
        cache = engine.runner.kv_caches[li]
        k = rerotate(cache[0][:, slot_t].transpose(0, 1), delta_t, model.rotary)
        prefix.append((k, cache[1][:, slot_t].transpose(0, 1)))
    logits, _ = _dense(model, [w.token_ids[p]], [at + (p - base)], prefix, layers)
    return int(logits[-1].argmax())


def test_shared_cache_workers_attend_to_each_other_as_written():
    from forkllm.engine.sequence import SharedView

    llm = tiny_llm(block_size=4)
    engine, model = llm.engine, llm.engine.runner.model
    layers = engine.runner.config.num_layers
    prompt = list(range(300, 310))
    rid, root = _prefilled_root(engine, prompt)
    workers = engine.tree.spawn(root, [[500, 501], [600], [700, 701, 702]])
    view = SharedView(root.num_tokens, workers)
    for w in workers:
        w.view = view
    engine.step()  # each computes its prompt and samples (no peers in view yet)
    for _ in range(6):
        want = [_worker_reference(engine, model, layers, w, view, 4) for w in workers]
        engine.step()
        got = [w.token_ids[-1] for w in workers]
        assert got == want
    # a worker's output depends on the others: the same worker alone writes something else
    alone = tiny_llm(block_size=4)
    rid2, root2 = _prefilled_root(alone.engine, prompt)
    (solo,) = alone.engine.tree.spawn(root2, [[500, 501]])
    for _ in range(7):
        alone.engine.step()
    assert solo.token_ids[len(prompt) + 2 :] != workers[0].token_ids[len(prompt) + 2 :]
    engine.abort_request(rid)
    assert_no_leaks(engine)


def test_shared_cache_fanout_runs_and_joins():
    llm = tiny_llm(block_size=4)
    r = llm.threads(
        "q", Fanout(["a", "bb", "ccc"], shared_cache=True, max_tokens=6, final_max_tokens=4), chat=False
    )
    assert [t.generated_tokens for t in r.threads] == [4, 7, 7, 7]
    assert [e.event for e in r.events].count("join") == 1
    with pytest.raises(ValueError, match="workers cannot fan out again"):
        Fanout([Fanout(["x"], prefix="p")], shared_cache=True)
    assert_no_leaks(llm.engine)


def test_a_joined_context_out_of_pages_fails_its_tree_cleanly():
    # two joined contexts both decoding, pages for one: the scheduler cannot recompute a joined
    # context, so the one it must preempt fails its tree (the other finishes)
    llm = tiny_llm(block_size=4, num_kv_blocks=24)
    spec = Fanout(["a", "b"], max_tokens=8, final_max_tokens=200)
    with pytest.raises(RuntimeError, match="ran out of pages for a page-joined thread"):
        llm.threads_batch(
            ["q", "r"], [spec, spec], SamplingParams(temperature=0.0, ignore_eos=True), chat=False
        )
    assert_no_leaks(llm.engine)
    assert llm.generate(["still serving"], SamplingParams(max_tokens=3))[0].outputs[0].token_ids
