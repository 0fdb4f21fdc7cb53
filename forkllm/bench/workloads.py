"""Seeded synthetic prompts for the workloads of shared/BENCHMARKS.md (W1...W5).

Every run sees the same tokens: prompts are chat-formatted with the model's template and grown word
by word from a fixed vocabulary until they reach a length drawn from the workload's range.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from forkllm.tokenizer import Tokenizer

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "it",
    "at",
    "from",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "has",
    "had",
    "not",
    "but",
    "have",
    "one",
    "their",
    "its",
    "first",
    "new",
    "after",
    "also",
    "other",
    "been",
    "more",
    "two",
    "who",
    "they",
    "into",
    "time",
    "all",
    "most",
    "when",
    "there",
    "would",
    "only",
    "over",
    "may",
    "many",
    "about",
    "some",
    "these",
    "than",
    "between",
    "during",
    "system",
    "model",
    "memory",
    "page",
    "cache",
    "token",
    "river",
    "mountain",
    "city",
    "people",
    "music",
    "history",
    "science",
    "number",
    "water",
    "light",
    "paper",
    "story",
    "field",
    "world",
    "small",
    "large",
    "early",
    "later",
    "under",
    "north",
    "south",
    "east",
    "west",
    "market",
    "school",
    "house",
    "garden",
    "window",
    "road",
    "energy",
    "process",
    "result",
    "method",
    "design",
    "network",
    "signal",
    "engine",
    "value",
    "table",
    "order",
    "color",
    "season",
    "island",
]

_TASKS = (
    "Summarize the following notes in one paragraph:",
    "Continue this story with a surprising twist:",
    "Explain the main idea of this text to a student:",
    "List three questions a reader might ask about this:",
    "Rewrite the following passage in plain language:",
)


@dataclass
class Prompt:
    text: str  # the chat-formatted prompt
    token_ids: list[int]


def chat_prompt(tok: Tokenizer, rng: random.Random, target_len: int) -> Prompt:
    """A chat-formatted prompt of about `target_len` tokens (within a couple of tokens)."""
    words = [rng.choice(_TASKS)]
    lo, hi = 0, 4 * target_len
    # Binary search on the number of filler words: each template render is cheap.
    filler = [rng.choice(_WORDS) for _ in range(hi)]

    def render(k: int) -> tuple[str, list[int]]:
        content = " ".join(words + filler[:k])
        text = (
            tok.apply_chat_template([{"role": "user", "content": content}]) if tok.chat_template else content
        )
        return text, tok.encode(text, add_special_tokens=not tok.chat_template)

    while lo < hi:
        mid = (lo + hi) // 2
        if len(render(mid)[1]) < target_len:
            lo = mid + 1
        else:
            hi = mid
    text, ids = render(lo)
    return Prompt(text, ids)


def make_prompts(tok: Tokenizer, count: int, min_len: int, max_len: int, seed: int = 0) -> list[Prompt]:
    rng = random.Random(seed)
    return [chat_prompt(tok, rng, rng.randint(min_len, max_len)) for _ in range(count)]


def shared_prefix_prompts(
    tok: Tokenizer, count: int, prefix_len: int, question_len: int, seed: int = 0
) -> list[Prompt]:
    """W3: one long system prompt shared by all requests, then a distinct short question each."""
    rng = random.Random(seed)
    system_words: list[str] = []
    while len(tok.encode(" ".join(system_words), add_special_tokens=False)) < prefix_len:
        system_words.extend(rng.choice(_WORDS) for _ in range(16))
    system = " ".join(system_words)
    out = []
    for _ in range(count):
        q_words = [rng.choice(_WORDS) for _ in range(question_len)]
        while len(tok.encode(" ".join(q_words), add_special_tokens=False)) > question_len:
            q_words.pop()
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": " ".join(q_words) + "?"}]
        text = tok.apply_chat_template(msgs)
        out.append(Prompt(text, tok.encode(text, add_special_tokens=False)))
    return out
