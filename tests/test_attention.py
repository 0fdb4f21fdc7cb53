"""Attention backends without an engine: shared-prefix grouping on hand-made page tables, the
start-up choice of backend and kernels, and every backend's decode against per-row PyTorch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from forkllm.attention.backend import select_backend
from forkllm.attention.cpu import CpuKernelAttention
from forkllm.attention.grouping import PrefixGroup, group_shared_prefixes, pack_groups
from forkllm.attention.metadata import AttentionBatch, PrefillChunk
from forkllm.attention.paged import TorchAttention
from forkllm.attention.shared_prefix import (
    CpuSharedPrefixAttention,
    FusedSharedPrefixAttention,
    SharedPrefixAttention,
)
from forkllm.kernels import Kernels

CPU = torch.device("cpu")
HEADS = SimpleNamespace(head_dim=16, num_heads=4, num_kv_heads=2)


# ---- grouping -----------------------------------------------------------------------------------
def test_forks_share_their_whole_prefix():
    """Forked rows (same pages up to their own last page) form one group over every page wholly
    before their newest token; row order is page-id order."""
    tables = [[1, 2, 3, 12], [1, 2, 3, 10], [1, 2, 3, 11]]
    assert group_shared_prefixes(tables, [15, 15, 14], block_size=4, min_pages=2) == [
        PrefixGroup([1, 2, 0], 3)
    ]


def test_only_pages_before_the_newest_token_are_shared():
    # ctx 12 with 4-token pages: the newest token sits on page 2, which stays the row's own.
    assert group_shared_prefixes([[1, 2, 3], [1, 2, 4]], [12, 12], 4, 2) == [PrefixGroup([0, 1], 2)]
    assert group_shared_prefixes([[1, 2, 3], [1, 2, 4]], [13, 12], 4, 2) == [PrefixGroup([0, 1], 2)]


def test_rows_of_one_drafted_sequence_group_through_their_first_row_only():
    """Speculative drafts are verified one row per position with the sequence's own table: only
    the first (shortest context) may join a group, so draft rows attend as they would alone."""
    seq, sibling = [1, 2, 3, 9], [1, 2, 3, 8]
    groups = group_shared_prefixes([seq, seq, seq, sibling], [14, 15, 16, 14], 4, 2)
    assert groups == [PrefixGroup([3, 0], 3)]
    assert group_shared_prefixes([seq, seq, seq], [14, 15, 16], 4, 2) == []


def test_a_rise_moves_the_previous_row_into_a_deeper_run():
    w, x = [1, 2, 5, 5, 29], [1, 2, 7, 8, 30]
    y, z = [1, 2, 9, 9, 31], [1, 2, 9, 9, 32]
    ctx = [20] * 4
    # w, x, y share 2 pages; y and z share 4: y leaves the shallow run for the deep one.
    assert group_shared_prefixes([z, y, x, w], ctx, 4, 2) == [PrefixGroup([3, 2], 2), PrefixGroup([1, 0], 4)]
    # A shallow run of two loses its second row to the deeper run and is dropped (one row left).
    assert group_shared_prefixes([x, y, z], ctx, 4, 2) == [PrefixGroup([1, 2], 4)]


def test_a_drop_ends_the_run():
    a, b = [1, 2, 3, 4, 40], [1, 2, 3, 4, 41]
    c, d = [1, 2, 3, 5, 42], [1, 2, 3, 5, 43]
    groups = group_shared_prefixes([a, b, c, d], [20] * 4, 4, 2)
    assert groups == [PrefixGroup([0, 1], 4), PrefixGroup([2, 3], 4)]
    e = [1, 2, 3, 6, 44]  # shares 3 pages with d: a drop after c-d's 4, so e stays alone
    assert group_shared_prefixes([a, b, c, d, e], [20] * 5, 4, 2)[-1] == PrefixGroup([2, 3], 4)
    assert all(4 not in g.rows for g in group_shared_prefixes([a, b, c, d, e], [20] * 5, 4, 2))


def test_rows_under_min_pages_stay_out():
    tables = [[1, 2, 3, 9], [1, 2, 3, 8], [1, 2, 3, 7], [1, 5, 6, 7]]
    # row 2 has only one whole page before its newest token; row 3 shares one page with the rest.
    groups = group_shared_prefixes(tables, [14, 14, 5, 14], block_size=4, min_pages=2)
    assert groups == [PrefixGroup([1, 0], 3)]
    assert group_shared_prefixes(tables, [14, 14, 5, 14], 4, min_pages=4) == []
    assert group_shared_prefixes([[1, 2], [3, 4]], [8, 8], 4, 1) == []


def test_pack_groups_pads_to_one_shape():
    tables = [[7, 8, 9, 1], [4, 5, 2, 2], [7, 8, 9, 3], [4, 5, 6, 6], [4, 5, 6, 7]]
    groups = [PrefixGroup([0, 2], 3), PrefixGroup([1, 3, 4], 2)]
    g = pack_groups(groups, tables, block_size=4, num_rows=6)
    assert g.pages.tolist() == [[7, 8, 9], [4, 5, 0]]
    assert g.lens.tolist() == [12, 8]
    assert g.key_mask[:, 0].tolist() == [[False] * 12, [False] * 8 + [True] * 4]
    assert g.rows.tolist() == [[0, 2, 6], [1, 3, 4]]
    assert g.member_index.tolist() == [0, 1, 3, 4, 5]
    assert g.member_rows.tolist() == [0, 2, 1, 3, 4]
    assert g.offsets.tolist() == [0, 2, 5]
    assert not g.all_rows and pack_groups(groups, tables, 4, 5).all_rows


# ---- start-up choices ---------------------------------------------------------------------------
def test_kernels_resolve_off_switches():
    off = Kernels.disabled()
    assert off.ops is None and not (off.paged_decode or off.shared_prefix_fused or off.packed_gemm)
    assert Kernels.resolve(False, CPU, torch.float32, HEADS) == off
    assert Kernels.resolve(True, torch.device("cuda"), torch.float32, HEADS) == off
    assert Kernels.resolve(True, CPU, torch.float32, HEADS, environ={"FORKLLM_KERNELS": "0"}) == off


def test_backend_choice_without_kernels():
    off = Kernels.disabled()
    plain = select_backend(off, 16, 0.25, CPU, shared_prefix=False, min_shared_prefix_tokens=256)
    assert type(plain) is TorchAttention
    shared = select_backend(off, 16, 0.25, CPU, shared_prefix=True, min_shared_prefix_tokens=40)
    assert type(shared) is SharedPrefixAttention and shared.min_shared_pages == 3
    assert type(shared.rows) is TorchAttention


kernels = Kernels.resolve(True, CPU, torch.float32, HEADS)
needs_kernels = pytest.mark.skipif(kernels.ops is None, reason="C++ kernels could not be built here")


@needs_kernels
def test_backend_choice_with_kernels():
    assert kernels.paged_decode and not kernels.shared_prefix_fused  # float32: no fused kernel
    assert type(select_backend(kernels, 16, 0.25, CPU, False, 256)) is CpuKernelAttention
    assert type(select_backend(kernels, 16, 0.25, CPU, True, 256)) is CpuSharedPrefixAttention
    bf16 = Kernels.resolve(True, CPU, torch.bfloat16, HEADS)
    if bf16.shared_prefix_fused:
        assert type(select_backend(bf16, 16, 0.25, CPU, True, 256)) is FusedSharedPrefixAttention
    odd = Kernels.resolve(True, CPU, torch.float32, SimpleNamespace(head_dim=24, num_heads=4, num_kv_heads=2))
    assert odd.ops is not None and not odd.paged_decode  # head size not compiled in: PyTorch rows
    rows = select_backend(odd, 16, 0.25, CPU, False, 256)
    assert type(rows) is TorchAttention and rows.write_kv == odd.ops.kv_write_


# ---- decode against per-row PyTorch -------------------------------------------------------------
def _decode_case(dtype: torch.dtype, bs: int = 4):
    """Seven decode rows: two fork families over a common 3-page prompt and one loner."""
    g = torch.Generator().manual_seed(0)
    hkv, d, nblocks = HEADS.num_kv_heads, HEADS.head_dim, 64
    cache = torch.randn(2, hkv, nblocks * bs, d, generator=g).to(dtype)
    prompt = [1, 2, 3]
    tables = [prompt + [10, 11, 20 + i] for i in range(3)]  # 5 shared pages, then one own page
    tables += [prompt + [12, 30 + i] for i in range(3)]  # 4 shared pages, then one own page
    tables += [[40, 41, 42, 43]]
    ctx = [5 * bs + 1, 5 * bs + 3, 6 * bs, 4 * bs + 2, 4 * bs + 1, 5 * bs, 3 * bs + 2]
    q = torch.randn(len(tables), HEADS.num_heads, d, generator=g).to(dtype)
    return cache, q, AttentionBatch(torch.empty(0, dtype=torch.long), tables, ctx)


def _backends(dtype: torch.dtype, bs: int = 4) -> list:
    scale = HEADS.head_dim**-0.5
    out = [SharedPrefixAttention(TorchAttention(bs, scale), min_shared_pages=2)]
    k = Kernels.resolve(True, CPU, dtype, HEADS)
    if k.ops is not None and k.paged_decode:
        out += [CpuKernelAttention(k.ops, bs, scale), select_backend(k, bs, scale, CPU, True, 2 * bs)]
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_every_backend_decodes_like_per_row_pytorch(dtype, tol):
    cache, q, batch = _decode_case(dtype)
    ref_backend = TorchAttention(4, HEADS.head_dim**-0.5)
    ref = ref_backend.decode(cache, q, ref_backend.build_metadata(batch)).float()
    for backend in _backends(dtype):
        meta = backend.build_metadata(batch)
        if isinstance(backend, SharedPrefixAttention | FusedSharedPrefixAttention):
            assert meta.shared is not None and meta.shared.member_rows.tolist() == [0, 1, 2, 3, 4, 5]
        out = backend.decode(cache, q.clone(), meta).float()
        assert (out - ref).abs().max().item() < tol * ref.abs().max().item(), type(backend).__name__


def test_build_metadata_packs_decodes_then_chunks():
    backend = TorchAttention(4, 0.25)
    chunk = PrefillChunk(num_cached=5, num_new=3, block_ids=torch.tensor([7, 8]))
    batch = AttentionBatch(
        torch.arange(10), [[1, 2, 3], [4]], [9, 2], [PrefillChunk(0, 5, torch.tensor([9, 10])), chunk]
    )
    meta = backend.build_metadata(batch)
    assert meta.num_decode == 2 and meta.shared is None and meta.decode_starts is None
    assert meta.decode_tables is not None and meta.decode_tables.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert [(p.q_start, p.q_len, p.ctx_len) for p in meta.prefills] == [(2, 5, 0), (7, 3, 5)]
    assert meta.prefills[0].mask is None and meta.prefills[1].mask is not None
    assert meta.prefills[1].mask.tolist()[0] == [True] * 6 + [False] * 2
