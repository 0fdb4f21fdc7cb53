"""OpenAI response envelopes, built in one place: the id/object/created/model every body and
stream chunk of a request shares, the choices, usage, and the SSE framing of a stream (with
stream_options: a running usage on every chunk, a final usage-only chunk, then [DONE])."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from forkllm.server.protocol import StreamOptions


def finish_reason(reason: str | None) -> str | None:
    """Engine reasons -> OpenAI's {stop, length} (a pruned or aborted sample simply stopped);
    `tool_calls`, which the server decides, passes through."""
    if reason is None:
        return None
    return reason if reason in ("length", "tool_calls") else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def completion_choice(
    index: int, text: str, logprobs: dict[str, Any] | None, reason: str | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(reason)}


def chat_choice(
    index: int,
    content: str,
    logprobs: dict[str, Any] | None,
    reason: str | None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A whole chat choice; with tool calls, content is null when the model wrote none."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["content"] = content or None
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason(reason)}


def chat_delta(
    index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None, reason: str | None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason(reason)}


@dataclass(frozen=True)
class Envelope:
    """The fields shared by a response and all its stream chunks; one per HTTP request."""

    id: str
    object: str
    chunk_object: str
    created: int
    model: str

    @classmethod
    def completion(cls, model: str) -> Envelope:
        return cls(_new_id("cmpl"), "text_completion", "text_completion", int(time.time()), model)

    @classmethod
    def chat(cls, model: str) -> Envelope:
        return cls(_new_id("chatcmpl"), "chat.completion", "chat.completion.chunk", int(time.time()), model)

    def body(
        self, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int, **extra: Any
    ) -> dict[str, Any]:
        """A whole (non-streamed) response."""
        return {
            **self.head(self.object),
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
            **extra,
        }

    def stream(self, prompt_tokens: int, options: StreamOptions | None) -> ChunkStream:
        return ChunkStream(self, prompt_tokens, options or StreamOptions())

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


class ChunkStream:
    """One response's SSE events. Counts completion tokens as they stream, so that
    `continuous_usage_stats` can put the running usage on every chunk (as vLLM does) and
    `include_usage` can end with a usage-only chunk."""

    def __init__(self, envelope: Envelope, prompt_tokens: int, options: StreamOptions) -> None:
        self.envelope = envelope
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.options = options

    def chunk(self, choices: list[dict[str, Any]], new_tokens: int = 0) -> str:
        """An SSE event carrying `choices`, which hold `new_tokens` generated tokens."""
        self.completion_tokens += new_tokens
        payload = {**self.envelope.head(self.envelope.chunk_object), "choices": choices}
        if self.options.continuous_usage_stats:
            payload["usage"] = usage(self.prompt_tokens, self.completion_tokens)
        return sse(payload)

    def count(self, new_tokens: int) -> None:
        """Tokens generated that no chunk carries (text a parser holds back, or ignores)."""
        self.completion_tokens += new_tokens

    def end(self) -> list[str]:
        """The closing events: the usage-only chunk if asked for, then [DONE]."""
        events = []
        if self.options.include_usage:
            payload = {
                **self.envelope.head(self.envelope.chunk_object),
                "choices": [],
                "usage": usage(self.prompt_tokens, self.completion_tokens),
            }
            events.append(sse(payload))
        return [*events, sse("[DONE]")]


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
