"""The C++ CPU kernels agree with plain PyTorch, and the engine gives the same tokens with or without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from forkllm.kernels import Kernels

# The compiled module itself (None when it cannot be built or FORKLLM_KERNELS=0).
kernels = Kernels.resolve(True, torch.device("cpu"), torch.float32).ops
pytestmark = pytest.mark.skipif(kernels is None, reason="C++ kernels could not be built here")


def _resolved(dtype: torch.dtype = torch.float32) -> Kernels:
    """What an engine with a 64-wide head, 3 query heads per KV head and `dtype` would use."""
    from types import SimpleNamespace

    return Kernels.resolve(
        True, torch.device("cpu"), dtype, SimpleNamespace(head_dim=64, num_heads=9, num_kv_heads=3)
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n, k", [(960, 576), (7, 576), (5, 33), (1000, 1536)])
def test_small_linear_matches_torch(dtype, tol, m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    ref = F.linear(x.float(), w.float(), b.float())
    out = kernels.small_linear(x, w, b)
    assert out.dtype == dtype and out.shape == (m, n)
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < tol
    assert torch.allclose(
        kernels.small_linear(x, w, None).float(), ref - b.float(), atol=tol * ref.abs().max().item()
    )


packed = pytest.mark.skipif(
    kernels is None or not kernels.packed_linear_supported(), reason="no packed bf16 GEMM on this CPU"
)


@packed
@pytest.mark.parametrize("m", [1, 3, 8, 9, 13, 31, 100])
@pytest.mark.parametrize("n, k", [(960, 576), (7, 576), (40, 34), (1000, 1536), (48, 2), (64, 40)])
def test_packed_linear_matches_float32(m, n, k):
    """The packed bf16 GEMM (8-row x 48-output tiles, lone 16-output blocks, N padded to 16, row
    remainders) against float32 on the same bf16 inputs; only the output's bf16 rounding differs."""
    from forkllm.kernels import pack_weight, unpack_weight

    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    p = pack_weight(w)
    assert p.shape == (-(-n // 16), k // 2, 16, 2) and torch.equal(unpack_weight(p, n), w)
    for bias in (b, None):
        ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        out = kernels.packed_linear(x, p, n, bias)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        assert torch.allclose(out.float(), ref, rtol=2**-8, atol=1e-3 * ref.abs().max().item())
        # float_out (the logits) keeps the accumulators: the bf16 result is exactly its rounding.
        out32 = kernels.packed_linear(x, p, n, bias, True)
        assert out32.dtype == torch.float32 and torch.equal(out32.to(torch.bfloat16), out)
        assert torch.allclose(out32, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


packed_f32 = pytest.mark.skipif(
    kernels is None or not kernels.packed_f32_supported(), reason="no packed float32 GEMM on this CPU"
)


@packed_f32
@pytest.mark.parametrize("m", [1, 2, 3, 6, 7, 13, 64])
@pytest.mark.parametrize("n, k", [(960, 576), (7, 576), (40, 33), (1000, 1536), (80, 5), (64, 40)])
def test_packed_f32_linear_matches_float64_and_is_batch_invariant(m, n, k):
    """The packed float32 GEMM (one row x 4 blocks, two rows x 3, 6-row tiles and remainders, N
    padded to 16) against float64, with and without bias; every row equals the same row computed
    alone (one FMA chain per output, in k order, whatever the rows)."""
    from forkllm.kernels import pack_weight, unpack_weight

    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    p = pack_weight(w)
    assert p.shape == (-(-n // 16), k, 16) and torch.equal(unpack_weight(p, n), w)
    for bias in (b, None):
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        out = kernels.packed_linear(x, p, n, bias)
        assert out.dtype == torch.float32 and out.shape == (m, n)
        assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
        for i in (0, m - 1):
            assert torch.equal(kernels.packed_linear(x[i : i + 1].contiguous(), p, n, bias)[0], out[i])


@packed_f32
@pytest.mark.parametrize("rows", [1, 2, 3, 7])
def test_packed_f32_silu_linear_matches_reference(rows):
    from forkllm.kernels import pack_gate_up, unpack_gate_up

    g = torch.Generator().manual_seed(rows)
    k, i = 96, 64
    w = torch.randn(2 * i, k, generator=g) * 0.3  # gates past +-10: the sigmoid's both branches
    x = torch.randn(rows, k, generator=g)
    p = pack_gate_up(w, i)
    assert torch.equal(unpack_gate_up(p, i), w)
    gate, up = x.double() @ w[:i].double().T, x.double() @ w[i:].double().T
    ref = F.silu(gate) * up
    out = kernels.packed_silu_linear(x, p, i)
    assert out.dtype == torch.float32 and out.shape == (rows, i)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="pack_gate_up"):
        kernels.packed_silu_linear(x, p, i + 16)


@packed_f32
def test_packed_f32_linear_rejects_mismatched_shapes():
    from forkllm.kernels import pack_weight

    p = pack_weight(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="packed .* weight for x's K and N"):
        kernels.packed_linear(torch.randn(2, 62), p, 32, None)
    with pytest.raises(RuntimeError, match="packed .* weight for x's K and N"):
        kernels.packed_linear(torch.randn(2, 64), p, 33, None)


@packed
def test_packed_linear_rejects_mismatched_shapes():
    from forkllm.kernels import pack_weight

    p = pack_weight(torch.randn(32, 64).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="packed .* weight for x's K and N"):
        kernels.packed_linear(torch.randn(2, 62).to(torch.bfloat16), p, 32, None)
    with pytest.raises(RuntimeError, match="packed .* weight for x's K and N"):
        kernels.packed_linear(torch.randn(2, 64).to(torch.bfloat16), p, 33, None)
    with pytest.raises(ValueError, match="even input size"):
        pack_weight(torch.randn(4, 5))


@packed
def test_linear_packs_bf16_and_restores_without_kernels():
    """A bf16 Linear drops its row-major weight when packed, computes the same as F.linear, and
    gets the exact weight back when the kernels are turned off."""
    from forkllm.models.llama import Linear

    torch.manual_seed(0)
    lin = Linear(96, 50, bias=True).to(torch.bfloat16)
    w = lin.weight.detach().clone()
    x = torch.randn(20, 96).to(torch.bfloat16)
    ref = F.linear(x.float(), w.float(), lin.bias.float())
    lin.set_kernels(_resolved(torch.bfloat16))
    assert lin.packed is not None and lin.weight.numel() == 0
    assert torch.allclose(lin(x).float(), ref, rtol=2**-8, atol=1e-3 * ref.abs().max().item())
    lin.set_kernels(Kernels.disabled())
    assert lin.packed is None and torch.equal(lin.weight, w)


def test_small_linear_rejects_too_many_rows():
    x, w = torch.randn(9, 16), torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="M must be 1..8"):
        kernels.small_linear(x, w, None)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("d, hkv, group", [(64, 3, 3), (64, 2, 2), (16, 2, 2), (128, 1, 4)])
@pytest.mark.parametrize("with_starts", [False, True])
def test_paged_decode_matches_reference(dtype, tol, d, hkv, group, with_starts):
    g = torch.Generator().manual_seed(d + hkv + group)
    bs, nblocks = 16, 64
    kc = torch.randn(hkv, nblocks * bs, d, generator=g).to(dtype)
    vc = torch.randn(hkv, nblocks * bs, d, generator=g).to(dtype)
    lens = torch.tensor([1, 16, 17, 100, 160])
    starts = torch.tensor([0, 0, 16, 32, 144]) if with_starts else None
    tables = torch.stack([torch.randperm(nblocks, generator=g)[:10] for _ in lens])
    q = torch.randn(len(lens), hkv * group, d, generator=g).to(dtype)
    out, lse = kernels.paged_decode(q, kc, vc, tables, starts, lens, bs, d**-0.5, True)
    for i, n in enumerate(lens.tolist()):
        s0 = 0 if starts is None else starts[i].item()
        slots = (tables[i][:, None] * bs + torch.arange(bs)).reshape(-1)[s0:n]
        k, v = kc[:, slots].float(), vc[:, slots].float()
        qq = q[i].float().view(hkv, group, d)
        scores = qq @ k.transpose(-1, -2) * d**-0.5
        ref = torch.softmax(scores, dim=-1) @ v
        assert (out[i].float().view(hkv, group, d) - ref).abs().max().item() < tol
        assert torch.allclose(lse[i].view(hkv, group), torch.logsumexp(scores, -1), atol=tol * 10)


def test_engine_same_tokens_without_kernels():
    from conftest import tiny_llm

    from forkllm import SamplingParams

    prompts = [[100 + i, 7, 8, 9] * (i + 1) for i in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    from forkllm.attention.paged import TorchAttention
    from forkllm.attention.shared_prefix import CpuSharedPrefixAttention, SharedPrefixAttention

    with_k = tiny_llm()
    assert with_k.engine.runner.kernels.paged_decode
    assert type(with_k.engine.runner.attention) is CpuSharedPrefixAttention  # float32: not the fused kernel
    plain = tiny_llm(enable_cpu_kernels=False)
    assert plain.engine.runner.kernels == Kernels.disabled() and plain.engine.sampler.ops is None
    attention = plain.engine.runner.attention
    assert type(attention) is SharedPrefixAttention and type(attention.rows) is TorchAttention
    a = [o.outputs[0].token_ids for o in with_k.generate(prompts, sp, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in plain.generate(prompts, sp, use_tqdm=False)]
    assert a == b


@pytest.mark.skipif(
    kernels is None or not kernels.shared_prefix_supported(64), reason="no AVX512-BF16 on this CPU"
)
@pytest.mark.parametrize("d, hkv, group", [(64, 3, 3), (32, 2, 2), (128, 1, 4), (16, 2, 2)])
@pytest.mark.parametrize("bs", [16, 5])
def test_shared_prefix_attention_bf16_matches_reference(d, hkv, group, bs):
    """The fused bf16 kernel against fp32 softmax attention over each group's shared pages: groups
    of 1, 5 and 23 members (23 x group rows spans several 64-row tasks), lengths off the 16-key
    chunk, pages of 16 and of 5 tokens (the kernel walks page boundaries inside a chunk)."""
    g = torch.Generator().manual_seed(d * hkv)
    nblocks = 64
    kc = torch.randn(hkv, nblocks * bs, d, generator=g).to(torch.bfloat16)
    vc = torch.randn(hkv, nblocks * bs, d, generator=g).to(torch.bfloat16)
    members = [1, 5, 23]
    lens = torch.tensor([16, 37, 200])
    pages = torch.stack([torch.randperm(nblocks, generator=g)[: -(-200 // bs)] for _ in members])
    n = sum(members) + 3  # three decode rows belong to no group
    rows = torch.randperm(n, generator=g)[: sum(members)]
    offsets = torch.tensor([0, 1, 6, 29])
    q = (torch.randn(n, hkv * group, d, generator=g) * 3).to(torch.bfloat16)
    out, lse = kernels.shared_prefix_attention(q, kc, vc, pages, lens, rows, offsets, bs, d**-0.5)
    assert out.shape == (sum(members), hkv * group, d) and lse.dtype == torch.float32
    for gi in range(len(members)):
        slots = (pages[gi][:, None] * bs + torch.arange(bs)).reshape(-1)[: lens[gi]]
        k, v = kc[:, slots].float(), vc[:, slots].float()
        for i in range(offsets[gi].item(), offsets[gi + 1].item()):
            qq = q[rows[i]].float().view(hkv, group, d)
            scores = qq @ k.transpose(-1, -2) * d**-0.5
            ref = torch.softmax(scores, dim=-1) @ v
            assert (out[i].float().view(hkv, group, d) - ref).abs().max().item() < 2e-2
            assert torch.allclose(lse[i].view(hkv, group), torch.logsumexp(scores, -1), atol=1e-3)


@packed
def test_bf16_engine_with_packed_gemm_matches_pytorch_path():
    """A bf16 engine whose matmuls go through the packed GEMM (tied logits included) scores the
    prompt like the same engine on oneDNN/PyTorch ops, to bf16 rounding; turning the kernels off
    restores every row-major weight exactly."""
    from conftest import tiny_llm

    from forkllm import SamplingParams

    prompts = [[100 + i, 7, 8, 9] * (3 * i + 1) for i in range(4)]  # 4..40 tokens: several row counts
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    fast = tiny_llm(dtype="bfloat16")
    model = fast.engine.runner.model
    assert model.packed_logits is not None
    assert all(
        layer.qkv_proj.packed is not None and layer.qkv_proj.weight.numel() == 0 for layer in model.layers
    )
    plain = tiny_llm(dtype="bfloat16")
    plain.engine.runner.model.use_cpu_kernels(Kernels.disabled())
    a = fast.generate(prompts, sp, use_tqdm=False)
    b = plain.generate(prompts, sp, use_tqdm=False)
    for x, y in zip(a, b):
        lx = [next(iter(p.values())).logprob for p in x.prompt_logprobs[1:]]
        ly = [next(iter(p.values())).logprob for p in y.prompt_logprobs[1:]]
        assert max(abs(u - v) for u, v in zip(lx, ly)) < 0.02  # seen: <= 0.0044
    model.use_cpu_kernels(Kernels.disabled())
    ref = plain.engine.runner.model
    assert model.packed_logits is None
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@packed_f32
def test_float32_engine_with_packed_gemm_matches_pytorch_path():
    """A float32 engine on an AVX2 CPU: every matmul (fused gate/up and tied logits included) on
    packed weights scores prompts like the PyTorch path to float32 rounding; greedy tokens agree;
    turning the kernels off restores every row-major weight exactly."""
    from conftest import tiny_llm

    from forkllm import SamplingParams

    prompts = [[100 + i, 7, 8, 9] * (3 * i + 1) for i in range(4)]
    sp = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0, ignore_eos=True)
    fast = tiny_llm(dtype="float32")
    model = fast.engine.runner.model
    assert model.packed_logits is not None
    assert all(
        layer.gate_up_proj.interleaved and layer.qkv_proj.weight.numel() == 0 for layer in model.layers
    )
    plain = tiny_llm(dtype="float32")
    plain.engine.runner.model.use_cpu_kernels(Kernels.disabled())
    a = fast.generate(prompts, sp, use_tqdm=False)
    b = plain.generate(prompts, sp, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        lx = [next(iter(p.values())).logprob for p in x.prompt_logprobs[1:]]
        ly = [next(iter(p.values())).logprob for p in y.prompt_logprobs[1:]]
        assert max(abs(u - v) for u, v in zip(lx, ly)) < 1e-4
    model.use_cpu_kernels(Kernels.disabled())
    assert model.packed_logits is None
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), plain.engine.runner.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.skipif(kernels is None, reason="C++ kernels could not be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_matches_index_copy(dtype):
    """The cache write kernel stores strided k / v head vectors (views of a fused qkv output)
    exactly where index_copy_ does, and rejects slots outside the cache."""
    g = torch.Generator().manual_seed(5)
    t, hq, hkv, d, slots_total = 37, 6, 2, 32, 200
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    slots = torch.randperm(slots_total, generator=g)[:t]
    ref = torch.zeros(2, hkv, slots_total, d, dtype=dtype)
    ref[0].index_copy_(1, slots, k.transpose(0, 1))
    ref[1].index_copy_(1, slots, v.transpose(0, 1))
    out = torch.zeros_like(ref)
    kernels.kv_write_(out, slots, k, v)
    assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.kv_write_(out, torch.full((t,), slots_total), k, v)


@pytest.mark.skipif(
    kernels is None or not kernels.shared_prefix_supported(64), reason="no AVX512-BF16 on this CPU"
)
@pytest.mark.parametrize("d, hkv, group", [(64, 3, 3), (16, 2, 2), (128, 1, 4)])
@pytest.mark.parametrize("bs", [16, 5])
def test_shared_prefix_decode_complete_matches_reference(d, hkv, group, bs):
    """The in-place variant: each grouped row attends to its group's shared pages and then to its
    own pages (0 to 40 own keys, ending mid-page), and gets the full softmax attention written to
    its decode row; rows outside every group are left untouched."""
    g = torch.Generator().manual_seed(d + bs)
    nblocks = 200
    kc = torch.randn(hkv, nblocks * bs, d, generator=g).to(torch.bfloat16)
    vc = torch.randn(hkv, nblocks * bs, d, generator=g).to(torch.bfloat16)
    members, shared_pages = [2, 23], [3, -(-70 // bs)]
    n = sum(members) + 2
    perm = torch.randperm(nblocks, generator=g).tolist()
    shared = [perm[:3], perm[3 : 3 + shared_pages[1]]]
    free = perm[3 + shared_pages[1] :]
    rows = torch.randperm(n, generator=g)[: sum(members)]
    own_len = torch.randint(0, 41, (n,), generator=g)
    npages = max(shared_pages) + -(-40 // bs) + 1
    tables = torch.zeros(n, npages, dtype=torch.long)
    ctx = torch.zeros(n, dtype=torch.long)
    offsets = [0, members[0], sum(members)]
    for gi in range(2):
        for i in range(offsets[gi], offsets[gi + 1]):
            r = rows[i].item()
            own_pages = [free.pop() for _ in range(-(-own_len[r].item() // bs))]
            tables[r, : shared_pages[gi] + len(own_pages)] = torch.tensor(shared[gi] + own_pages)
            ctx[r] = shared_pages[gi] * bs + own_len[r]
    pages = torch.zeros(2, max(shared_pages), dtype=torch.long)
    for gi in range(2):
        pages[gi, : shared_pages[gi]] = torch.tensor(shared[gi])
    lens = torch.tensor([sp * bs for sp in shared_pages])
    q = (torch.randn(n, hkv * group, d, generator=g) * 3).to(torch.bfloat16)
    out = torch.full_like(q, 7.0)
    kernels.shared_prefix_decode_(
        out, q, kc, vc, pages, lens, rows, torch.tensor(offsets), tables, ctx, bs, d**-0.5
    )
    grouped = set(rows.tolist())
    for r in range(n):
        if r not in grouped:
            assert (out[r] == 7.0).all()
            continue
        slots = (tables[r][:, None] * bs + torch.arange(bs)).reshape(-1)[: ctx[r]]
        k, v = kc[:, slots].float(), vc[:, slots].float()
        qq = q[r].float().view(hkv, group, d)
        ref = torch.softmax(qq @ k.transpose(-1, -2) * d**-0.5, dim=-1) @ v
        assert (out[r].float().view(hkv, group, d) - ref).abs().max().item() < 2e-2


@pytest.mark.skipif(
    kernels is None or not kernels.shared_prefix_supported(64), reason="no AVX512-BF16 on this CPU"
)
@pytest.mark.parametrize("bs", [16, 5])
def test_shared_prefix_kernel_exact_when_scores_keep_rising(bs):
    """The fused kernel keeps a reference max per row that moves only when a score passes it by a
    margin: scores that climb in steps through the shared run (and drop back) must move it in the
    middle of a 16-key chunk, after probabilities are buffered but before their P.V ran, and in
    both tiles of a chunk, and in a member's own keys after the shared pages; the results stay those
    of fp32 softmax attention."""
    g = torch.Generator().manual_seed(11 + bs)
    d, hkv, group, length, members = 64, 1, 3, 320, 7  # whole pages of 16 and of 5
    nblocks = -(-length // bs) + 4 + members
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    steps = torch.zeros(nblocks * bs)
    steps[:length] = torch.cat([torch.linspace(0, 12, 160), torch.linspace(12, 3, 160)])
    steps[[21, 77, 140]] += torch.tensor([9.0, 14.0, 30.0])  # sudden peaks mid-chunk
    k = torch.randn(hkv, nblocks * bs, d, generator=g) * 0.3 + steps[None, :, None] * u
    kc = k.to(torch.bfloat16)
    vc = torch.randn(hkv, nblocks * bs, d, generator=g).to(torch.bfloat16)
    pages = torch.arange(-(-length // bs))[None]
    q = (torch.randn(members, hkv * group, d, generator=g) * 0.5 + 2.5 * u).to(torch.bfloat16)
    rows, offsets, lens = torch.arange(members), torch.tensor([0, members]), torch.tensor([length])
    out, lse = kernels.shared_prefix_attention(q, kc, vc, pages, lens, rows, offsets, bs, d**-0.5 * 8)
    kk, vv = kc[0, :length].float(), vc[0, :length].float()
    scores = q.float() @ kk.T * d**-0.5 * 8  # [members, heads, keys]: spans ~300 log2 units
    assert (scores.amax(-1) - scores[..., :16].amax(-1)).min() > 20  # the max moves well past the margin
    ref = torch.softmax(scores, -1) @ vv
    assert (out.float() - ref).abs().max().item() < 2e-2
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-3)
    # Complete variant: each member also has 1-5 own keys on a private page, half of them far above
    # the shared maximum (the own pass moves the reference too).
    n_shared_pages = pages.shape[1]
    own_len = [m % 5 + 1 for m in range(members)]
    tables = torch.zeros(members, n_shared_pages + 1, dtype=torch.long)
    ctx = torch.tensor([length + n for n in own_len])
    own_k = k.clone()
    for m in range(members):
        own_page = -(-length // bs) + m  # past the shared pages (nblocks has room for 4 + members)
        tables[m, :n_shared_pages] = pages[0]
        tables[m, n_shared_pages] = own_page
        for t in range(own_len[m]):
            own_k[0, own_page * bs + t] = torch.randn(d, generator=g) * 0.3 + (60.0 if m % 2 else 2.0) * u
    kc2 = own_k.to(torch.bfloat16)
    complete = torch.empty_like(q)
    kernels.shared_prefix_decode_(
        complete, q, kc2, vc, pages, lens, rows, offsets, tables, ctx, bs, d**-0.5 * 8
    )
    for m in range(members):
        slots = torch.cat([torch.arange(length), tables[m, n_shared_pages] * bs + torch.arange(own_len[m])])
        s_m = q[m].float() @ kc2[0, slots].float().T * d**-0.5 * 8
        ref_m = torch.softmax(s_m, -1) @ vc[0, slots].float()
        assert (complete[m].float() - ref_m).abs().max().item() < 2e-2


@packed
@pytest.mark.parametrize("rows", [1, 7, 12, 13, 40])
def test_packed_silu_linear_matches_reference(rows):
    """silu(x @ Wg.T) * (x @ Wu.T) from the gate/up-interleaved packing: within bf16 rounding of the
    float32 result (one rounding, no bf16 gate_up intermediate), for row counts on and off the
    12-row tile; the interleaved packing unpacks to the original weight exactly."""
    from forkllm.kernels import pack_gate_up, unpack_gate_up

    g = torch.Generator().manual_seed(rows)
    k, i = 96, 64
    w = (torch.randn(2 * i, k, generator=g) * 0.2).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    p = pack_gate_up(w, i)
    assert torch.equal(unpack_gate_up(p, i), w)
    ref = F.silu(x.float() @ w[:i].float().T) * (x.float() @ w[i:].float().T)
    out = kernels.packed_silu_linear(x, p, i)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, i)
    assert torch.allclose(out.float(), ref, rtol=8e-3, atol=1e-3)
    with pytest.raises(RuntimeError, match="pack_gate_up"):
        kernels.packed_silu_linear(x, p, i + 16)


def test_kernel_build_directory_is_per_checkout_under_the_env_folder(monkeypatch, tmp_path):
    """One build folder per checkout and source content (torch's build names the source paths, so
    two checkouts sharing a folder rebuilt it in turn and could leave a lock that hung startup)."""
    from forkllm.kernels import build_directory

    monkeypatch.setenv("FORKLLM_KERNELS_DIR", str(tmp_path))
    d = build_directory()
    assert d.parent == tmp_path and len(d.name) == 16
    assert build_directory() == d
