"""Token bitmasks for a batch: filled per sequence by llguidance, applied to the logits at once.

A bitmask is int32 [rows, ceil(vocab / 32)], bit i of word w allowing token 32 * w + i. It is
applied in two tensor ops over the constrained rows: each mask byte indexes a 256-entry table of
8 packed booleans ("disallowed", one int64 per byte value), which unpacks the whole bitmask into a
[rows, vocab] bool tensor in one `index_select`, then one `masked_fill` writes -inf. When most
of the batch is constrained, unconstrained rows ride along with all-ones masks (two ops in all,
no row gather / scatter); otherwise only the constrained rows are gathered, masked and put back. Measured on
this 2-core CPU for 64 rows of 49,152 tokens at real JSON positions: 1.7-2.9 ms. Shifting and
masking bits takes 3-20 ms, a word-level scatter (skip all-one words, fill all-zero ones) was
4 ms on one thread but 130 ms with two threads on a busy machine (five small indexing ops, each
paying OpenMP's contention), and llguidance's torch.compile'd apply took 779 ms.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import torch

from forkllm.structured.state import GrammarState

assert sys.byteorder == "little", "token bitmasks are unpacked as little-endian bytes"


def words_for(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_bitmasks(states: Sequence[GrammarState | None], width: int = 0) -> torch.Tensor:
    """One bitmask row per entry (int32 [len(states), words]) covering max(vocab, width) tokens:
    a None entry allows every token; a state allows what its grammar does and no token past its
    vocabulary (logits wider than the tokenizer). llguidance releases the GIL while it fills."""
    vocab = next(s.vocab_size for s in states if s is not None)
    vocab_words = words_for(vocab)
    words = max(vocab_words, words_for(width))
    bitmask = torch.full((len(states), words), -1, dtype=torch.int32)
    for i, state in enumerate(states):
        if state is not None:
            if words > vocab_words:
                bitmask[i, vocab_words:] = 0
            state.fill_mask(bitmask[i, :vocab_words])
    return bitmask


@functools.cache
def _disallowed_table(device: torch.device) -> torch.Tensor:
    """int64 [256]: entry v holds 8 bytes, byte k = 1 when bit k of v is 0 (token disallowed)."""
    values = []
    for v in range(256):
        packed = 0
        for k in range(8):
            if not (v >> k) & 1:
                packed |= 1 << (8 * k)
        values.append(packed)
    return torch.tensor(values, dtype=torch.int64, device=device)


def disallowed(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """bool [rows, width]: True where the bitmask (covering at least `width` tokens) disallows."""
    rows, words = bitmask.shape
    if words * 32 < width:
        raise ValueError(f"a bitmask of {words * 32} tokens cannot cover logits of {width}")
    table = _disallowed_table(bitmask.device)
    flat = table.index_select(0, bitmask.contiguous().view(torch.uint8).reshape(-1).int())
    return flat.view(torch.bool).view(rows, words * 32)[:, :width]


def apply_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None
) -> torch.Tensor:
    """A copy of `logits` [n, V] with every token its bitmask row disallows set to -inf. Bitmask
    row j belongs to logits row rows[j] (default: row j, every row); other rows are unchanged."""
    n, width = logits.shape
    banned = disallowed(bitmask.to(logits.device, non_blocking=True), width)
    if rows is None:
        return logits.masked_fill(banned, float("-inf"))
    # Indexing, not index_select / index_copy_: on a busy 2-core machine those paid one OpenMP
    # wake-up per row (170 ms for 32 rows, against 8 ms).
    out = logits.clone()
    idx = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    out[idx] = logits[idx].masked_fill_(banned, float("-inf"))
    return out
