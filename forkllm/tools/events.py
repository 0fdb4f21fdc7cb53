"""What a tool-running chat reports as it goes (for streaming it): a message's new text, each call
as it is dispatched, each result as it settles, each resume with the tool turn appended.

Events are made on the engine's thread, in the order things happened there, and handed to the
policy's `on_event` callback; the server turns them into SSE chunks
(forkllm/server/tools_mode.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

ToolEventKind = Literal["content", "call", "result", "resume"]


@dataclass(frozen=True)
class ToolEvent:
    """One thing that happened to sample `index` in assistant message `round` (0-based):
    - content: `text` is new content of the message (text outside its tool calls);
    - call: `call` = {id, name, arguments}, dispatched to the executor now;
    - result: `call` = the call's record (ToolCallRecord.as_dict(): result, error, seconds...);
    - resume: the tool turn (`prefill_tokens` tokens) was appended; message `round` begins."""

    event: ToolEventKind
    index: int
    round: int
    text: str = ""
    call: dict[str, Any] = field(default_factory=dict)
    prefill_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.event, "index": self.index, "round": self.round}
        if self.event == "content":
            out["text"] = self.text
        elif self.event in ("call", "result"):
            out["call"] = self.call
        else:
            out["prefill_tokens"] = self.prefill_tokens
        return out


OnToolEvent = Callable[[ToolEvent], None]
