"""OpenAI response shapes: completion / chat choices, stream chunks, logprobs, usage."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from forkllm.engine.outputs import PositionLogprobs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def finish_reason(reason: str | None) -> str | None:
    """Engine reasons -> OpenAI's {stop, length} (a pruned or aborted sample simply stopped)."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_str(lp: Any, token_id: int, decode: Any) -> str:
    return lp.decoded_token if lp.decoded_token is not None else decode(token_id)


def completion_logprobs(
    token_ids: list[int], positions: list[PositionLogprobs | None], k: int, decode: Any, text_offset: int = 0
) -> dict[str, Any]:
    """Legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    for tid, pos in zip(token_ids, positions):
        if pos is None:  # the first prompt token has no logprob
            tok = decode(tid)
            tokens.append(tok)
            token_lps.append(None)
            tops.append(None)
        else:
            tok = _token_str(pos[tid], tid, decode)
            tokens.append(tok)
            token_lps.append(pos[tid].logprob)
            ranked = sorted(pos.items(), key=lambda kv: kv[1].rank)[:k]
            tops.append({_token_str(lp, t, decode): lp.logprob for t, lp in ranked})
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(
    token_ids: list[int], positions: list[PositionLogprobs], k: int, decode: Any
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
