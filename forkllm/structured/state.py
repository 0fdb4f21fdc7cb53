"""GrammarState: one sequence's position in its grammar (an llguidance matcher).

It forks with the sequence (a deep copy: children then diverge independently), advances by the
tokens the sequence appends, and writes the set of tokens allowed next into a bitmask row. EOS is
allowed only where the grammar accepts; once the grammar is complete (`is_finished`) nothing but
EOS could follow, so the engine ends the sequence there (finish_reason "stop").
"""

from __future__ import annotations

from collections.abc import Iterable

import llguidance
import torch


class GrammarViolation(RuntimeError):
    """A token outside the grammar reached a constrained sequence: an engine bug (the sampler
    masks every disallowed token), never a user error."""


class GrammarState:
    __slots__ = ("matcher", "vocab_size", "num_tokens")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, num_tokens: int = 0) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # bits of a mask row (the tokenizer's vocabulary)
        self.num_tokens = num_tokens  # tokens consumed so far

    def fork(self) -> GrammarState:
        """An independent copy at the same position."""
        return GrammarState(self.matcher.deep_copy(), self.vocab_size, self.num_tokens)

    def accepts(self, token: int) -> bool:
        """Whether `token` may come next (nothing is consumed)."""
        return self.matcher.validate_tokens([token]) == 1

    def advance(self, tokens: Iterable[int]) -> None:
        """Consume tokens in order; raises GrammarViolation at the first the grammar rejects (the
        state is then unusable: the sequence must not take that token)."""
        for token in tokens:
            if not self.matcher.consume_token(token):
                raise GrammarViolation(
                    f"token {token} is outside the grammar after {self.num_tokens} tokens: "
                    f"{self.matcher.get_error() or 'rejected'}"
                )
            self.num_tokens += 1

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row`, a contiguous CPU int32 tensor of
        ceil(vocab_size / 32) words (bit i of word w: token 32 * w + i)."""
        assert row.dtype == torch.int32 and row.is_contiguous() and row.device.type == "cpu"
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    @property
    def is_finished(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def is_accepting(self) -> bool:
        """The text so far is a complete match (it may still continue)."""
        return self.matcher.is_accepting()

    @property
    def error(self) -> str:
        return self.matcher.get_error()
