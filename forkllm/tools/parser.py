"""One incremental tool-call parser for streamed and whole messages.

`ToolCallParser.feed(delta)` takes generated text as it arrives and returns what is now certain:
content text and complete tool calls. `finish()` settles what was held back. A whole message is
parsed by feeding it once (`parse_tool_calls`), so the non-streamed result is, by construction,
the concatenation of the streamed deltas, whatever the split: every decision (is this a call? where
does its markup end?) depends only on the text, never on where a delta boundary fell.

How it decides:
- Text streams out as content except a tail that could still be the start of a call marker
  (`<tool_cal` ...) and the whitespace before it, which wait for the next delta.
- At a marker (`<tool_call>`, `{`, `[`, depending on the format) a format-specific *candidate*
  reads on until it knows: a complete, well-formed call of a known tool (emitted whole, with a new
  `call_...` id), or not a call (the marker becomes content and reading resumes after it).
  Calls are emitted only when complete, so a streamed call is never retracted; their arguments
  are the JSON text of the arguments object.
- Whitespace around a call (and the format's separators between calls, e.g. `;`) belongs to the
  call's markup and is not content.
- A call to a tool that is not in `tools` is not a call: it stays content (the client can see
  what the model wrote, and nothing calls a function the client never offered).
- `max_calls`: after that many calls the parser is `done` and ignores the rest, so the caller can
  stop generating (parallel_tool_calls=false) without dropping a call it has already seen.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """`call_` and 24 random letters and digits, as OpenAI's ids look."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    """One complete call: the tool's name and its arguments as JSON text of an object."""

    id: str
    name: str
    arguments: str

    def arguments_dict(self) -> dict[str, Any]:
        value = json.loads(self.arguments)
        assert isinstance(value, dict)
        return value

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ParsedDelta:
    """What one `feed` or `finish` made certain: content text, then any calls completed."""

    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


@dataclass
class ParsedMessage:
    content: str
    calls: list[ToolCall]


@dataclass(frozen=True)
class Accept:
    """The candidate is `end` characters of markup holding these (name, arguments object) calls."""

    end: int
    calls: list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Reject:
    """Not a call: the first `skip` characters (at least the marker) are content."""

    skip: int


class Candidate(Protocol):
    """A format's reader for one possible call starting at a marker. `advance(text, final)` gets
    the text from the marker on (the same text, longer each time) and returns None while it cannot
    tell yet; with `final` (no more text will come) it must decide."""

    def advance(self, text: str, final: bool) -> Accept | Reject | None: ...


class Markup(Protocol):
    """What the driver needs from a format (forkllm.tools.formats has the three)."""

    name: str
    markers: tuple[str, ...]  # text that may start a call
    separators: str  # characters after a call that are markup too (besides whitespace)

    def candidate(self, tools: frozenset[str] | None, quota: int | None) -> Candidate: ...


class ToolCallParser:
    """Incremental parser of one generated message (one choice). See the module docstring."""

    def __init__(
        self,
        fmt: Markup,
        tools: Iterable[str] | None = None,
        max_calls: int | None = None,
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        if max_calls is not None and max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        self.format = fmt
        self.tools = frozenset(tools) if tools is not None else None
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self._new_id = new_id
        self._buf = ""  # text not yet settled
        self._held_ws = ""  # whitespace just before the current candidate
        self._candidate: Candidate | None = None
        self._after_call = False  # skipping whitespace/separators after a call
        self._finished = False

    @property
    def done(self) -> bool:
        """max_calls calls seen: nothing more will be parsed (stop generating)."""
        return self.max_calls is not None and len(self.calls) >= self.max_calls

    def feed(self, text: str) -> ParsedDelta:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        out = ParsedDelta()
        if text and not self.done:
            self._buf += text
            self._run(out, final=False)
        return out

    def finish(self) -> ParsedDelta:
        """The end of the message: settle held text and any call left open."""
        out = ParsedDelta()
        if not self._finished:
            self._finished = True
            if not self.done:
                self._run(out, final=True)
        return out

    # ---- the driver ----------------------------------------------------------------------------
    def _run(self, out: ParsedDelta, final: bool) -> None:
        while not self.done:
            if self._after_call:
                rest = self._buf.lstrip(" \t\r\n" + self.format.separators)
                self._buf = rest
                if not rest:
                    return
                self._after_call = False
            if self._candidate is None:
                if not self._scan_text(out, final):
                    return
                continue
            verdict = self._candidate.advance(self._buf, final)
            if verdict is None:
                assert not final, f"{type(self._candidate).__name__} did not decide at the end"
                return
            self._candidate = None
            if isinstance(verdict, Reject):
                skip = max(1, verdict.skip)
                out.content += self._held_ws + self._buf[:skip]
                self._held_ws, self._buf = "", self._buf[skip:]
                continue
            self._held_ws, self._buf = "", self._buf[verdict.end :]
            self._after_call = True
            for name, arguments in verdict.calls:
                if self.done:
                    break
                call = ToolCall(self._new_id(), name, json.dumps(arguments, ensure_ascii=False))
                self.calls.append(call)
                out.calls.append(call)
        self._buf = ""

    def _scan_text(self, out: ParsedDelta, final: bool) -> bool:
        """Emit content up to the next marker and start a candidate there (True), or emit what is
        certain and wait for more text (False)."""
        buf = self._buf
        at = _first_marker(buf, self.format.markers)
        if at is None:
            if final:
                out.content += buf
                self._buf = ""
                return False
            keep = len(buf) - _partial_marker_len(buf, self.format.markers)
            keep = len(buf[:keep].rstrip(" \t\r\n"))
            out.content += buf[:keep]
            self._buf = buf[keep:]
            return False
        before = buf[:at]
        head = before.rstrip(" \t\r\n")
        out.content += head
        self._held_ws = before[len(head) :]
        self._buf = buf[at:]
        quota = None if self.max_calls is None else self.max_calls - len(self.calls)
        self._candidate = self.format.candidate(self.tools, quota)
        return True


def _first_marker(text: str, markers: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(m) for m in markers) if i >= 0]
    return min(found) if found else None


def _partial_marker_len(text: str, markers: tuple[str, ...]) -> int:
    """The longest tail of `text` that is a proper beginning of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return best


def parse_tool_calls(
    text: str,
    fmt: Markup,
    tools: Iterable[str] | None = None,
    max_calls: int | None = None,
    new_id: Callable[[], str] = new_call_id,
) -> ParsedMessage:
    """Parse a whole message: the same parser, fed once."""
    parser = ToolCallParser(fmt, tools, max_calls, new_id)
    first, last = parser.feed(text), parser.finish()
    return ParsedMessage(first.content + last.content, first.calls + last.calls)
