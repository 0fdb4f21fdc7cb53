"""Logprobs in OpenAI's two shapes: the legacy completions table and chat's per-token list."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from forkllm.engine.outputs import Logprob, PositionLogprobs

Decode = Callable[[int], str]


def _token_str(lp: Logprob, token_id: int, decode: Decode) -> str:
    return lp.decoded_token if lp.decoded_token is not None else decode(token_id)


def completion_logprobs(
    token_ids: Sequence[int],
    positions: Sequence[PositionLogprobs | None],
    k: int,
    decode: Decode,
    text_offset: int = 0,
) -> dict[str, Any]:
    """Legacy completions format: tokens, token_logprobs, top_logprobs, text_offset (where each
    token starts in the choice's text, so a stream passes what it has sent so far)."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = text_offset
    for tid, pos in zip(token_ids, positions):
        if pos is None:  # the first prompt token has no logprob
            tok = decode(tid)
            token_lps.append(None)
            tops.append(None)
        else:
            tok = _token_str(pos[tid], tid, decode)
            token_lps.append(pos[tid].logprob)
            ranked = sorted(pos.items(), key=lambda kv: kv[1].rank)[:k]
            tops.append({_token_str(lp, t, decode): lp.logprob for t, lp in ranked})
        tokens.append(tok)
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(
    token_ids: Sequence[int], positions: Sequence[PositionLogprobs], k: int, decode: Decode
) -> dict[str, Any]:
    """Chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    content = []
    for tid, pos in zip(token_ids, positions):
        tok = _token_str(pos[tid], tid, decode)
        ranked = sorted(pos.items(), key=lambda kv: kv[1].rank)[:k]
        content.append(
            {
                "token": tok,
                "logprob": pos[tid].logprob,
                "bytes": list(tok.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (s := _token_str(lp, t, decode)),
                        "logprob": lp.logprob,
                        "bytes": list(s.encode("utf-8")),
                    }
                    for t, lp in ranked
                ],
            }
        )
    return {"content": content}
