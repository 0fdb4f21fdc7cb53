"""Incremental detokenization and stop-string matching.

Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding such a prefix yields
U+FFFD. We decode a short window of already-emitted tokens plus the new ones and only emit text
once it no longer ends in a replacement character, so a multi-byte character is never split.
The window starts a few tokens back so tokenizers that drop a leading space (SentencePiece)
still produce the right spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

from forkllm.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5


@dataclass
class IncrementalDetokenizer:
    prefix_offset: int
    read_offset: int
    text: str = ""

    @classmethod
    def for_prompt(cls, num_prompt_tokens: int) -> IncrementalDetokenizer:
        return cls(prefix_offset=max(num_prompt_tokens - _CONTEXT_TOKENS, 0), read_offset=num_prompt_tokens)

    def copy(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.prefix_offset, self.read_offset, self.text)

    def step(
        self, tokenizer: Tokenizer, token_ids: list[int], skip_special: bool, flush: bool = False
    ) -> str:
        """Decode whatever complete text the newest tokens add; return that delta (also appended)."""
        prefix = tokenizer.decode(token_ids[self.prefix_offset : self.read_offset], skip_special)
        full = tokenizer.decode(token_ids[self.prefix_offset :], skip_special)
        if len(full) > len(prefix) and (flush or not full.endswith("\ufffd")):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
            self.text += delta
            return delta
        return ""


def find_stop_string(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last `new_chars` characters: (start index, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        i = text.find(stop, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best
