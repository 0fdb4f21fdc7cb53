"""Token bitmasks for a batch: filled per sequence by llguidance, applied to the logits at once.

A bitmask is int32 [rows, ceil(vocab / 32)], bit i of word w allowing token 32 * w + i. With the
C++ kernels (CPU) it is applied by `apply_token_bitmask_`: one pass per row over the 32-token
words, skipping all-allowed words and writing -inf only where a token is disallowed, in place
when the caller allows. Otherwise (no kernels, CUDA) it becomes an additive bias built in one
`index_select`: each mask byte picks a row of a [256, 8] table of {0, -inf}, so the whole
[rows, vocab] bias comes out in token order, and one add masks the logits; when most of the batch
is constrained, unconstrained rows ride along with all-ones masks (two tensor ops, no row gather).

Measured on this 2-core CPU, 64 rows of 49,152 tokens: the kernel 0.8 ms with the copy; the
table bias + add 2 ms on one thread; a bool unpack + masked_fill 7 ms (masked_fill alone 5.6);
shifting bits 3-20 ms; a word-level scatter in PyTorch 4 ms on one thread but 130 ms with two on
a busy machine (five small indexing ops, each paying OpenMP's contention); llguidance's
torch.compile'd apply 779 ms.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import llguidance
import torch

from forkllm.kernels import KernelOps
from forkllm.structured.state import GrammarState

assert sys.byteorder == "little", "token bitmasks are unpacked as little-endian bytes"


def words_for(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_bitmasks(
    states: Sequence[GrammarState | None], width: int = 0, executor: llguidance.LLExecutor | None = None
) -> torch.Tensor:
    """One bitmask row per entry (int32 [len(states), words]) covering max(vocab, width) tokens:
    a None entry allows every token; a state allows what its grammar does and no token past its
    vocabulary (logits wider than the tokenizer). With an `executor` the masks are computed in one
    call on llguidance's thread pool, else one matcher at a time. 64 JSON states each one token
    further than at their last mask: ~2 ms either way on this 2-core CPU (a one-thread pool: 4 ms);
    the pool scales with cores. Computing them on a thread beside the model saved nothing here
    (52.4 vs 52.5 ms per batch-64 step: both cores are the model's)."""
    vocab = next(s.vocab_size for s in states if s is not None)
    vocab_words = words_for(vocab)
    words = max(vocab_words, words_for(width))
    bitmask = torch.full((len(states), words), -1, dtype=torch.int32)
    if executor is None:
        for i, state in enumerate(states):
            if state is not None:
                if words > vocab_words:
                    bitmask[i, vocab_words:] = 0
                state.fill_mask(bitmask[i, :vocab_words])
        return bitmask
    first: dict[int, int] = {}  # a state listed twice is computed once (the pool borrows each matcher)
    jobs, copies = [], []
    for i, state in enumerate(states):
        if state is not None:
            j = first.setdefault(id(state), i)
            if j == i:
                jobs.append((state.matcher, i))
            else:
                copies.append((i, j))
    target = bitmask if words == vocab_words else torch.empty((len(states), vocab_words), dtype=torch.int32)
    executor.unsafe_compute_mask_ptr(jobs, target.data_ptr(), vocab_words * 4, len(states))
    for i, j in copies:
        target[i] = target[j]
    if target is not bitmask:
        rows = torch.tensor(sorted(first.values()) + [i for i, _ in copies], dtype=torch.long)
        bitmask[rows, vocab_words:] = 0
        bitmask[rows, :vocab_words] = target[rows]
    return bitmask


@functools.cache
def _bias_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: row v is the additive bias of the 8 tokens of a mask byte v (0 where bit k is
    set, -inf where it is not)."""
    allowed = torch.tensor([[(v >> k) & 1 for k in range(8)] for v in range(256)], dtype=torch.bool)
    return torch.zeros((256, 8), dtype=dtype).masked_fill_(~allowed, float("-inf")).to(device)


def bitmask_bias(bitmask: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, width] additive bias: 0 where the bitmask (covering at least `width` tokens)
    allows the token, -inf where it does not."""
    rows, words = bitmask.shape
    if words * 32 < width:
        raise ValueError(f"a bitmask of {words * 32} tokens cannot cover logits of {width}")
    table = _bias_table(bitmask.device, dtype)
    bias = table.index_select(0, bitmask.contiguous().view(torch.uint8).reshape(-1).int())
    return bias.view(rows, words * 32)[:, :width]


def apply_bitmask(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    rows: Sequence[int] | None = None,
    ops: KernelOps | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """`logits` [n, V] with every token its bitmask row disallows set to -inf. Bitmask row j
    belongs to logits row rows[j] (default: row j, every row); other rows are unchanged. With the
    C++ kernels (`ops`, CPU logits) one pass writing only the disallowed tokens, into a copy or,
    with `in_place`, into `logits` itself; else a copy through the table bias (x + 0 is x: an
    allowed logit keeps its exact value either way)."""
    n, width = logits.shape
    if ops is not None and logits.device.type == "cpu":
        out = logits if in_place else logits.clone()
        idx = None if rows is None else torch.tensor(list(rows), dtype=torch.long)
        ops.apply_token_bitmask_(out, bitmask, idx)
        return out
    bias = bitmask_bias(bitmask.to(logits.device, non_blocking=True), width, logits.dtype)
    if rows is None:
        return logits + bias
    # Indexing, not index_select / index_copy_: on a busy 2-core machine those paid one OpenMP
    # wake-up per row (170 ms for 32 rows, against 8 ms).
    out = logits.clone()
    idx = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    out[idx] = logits[idx] + bias
    return out
