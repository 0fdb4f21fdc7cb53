"""Tool calling on /v1/chat/completions: the request's tools and tool_choice checked into a
`ToolPlan`, and the engine's deltas turned into content and tool calls by one parser per choice.

- `tool_choice`: `none` (no tools in the prompt, nothing parsed), `auto` (the default with tools:
  calls parsed from free text), `required` or `{"type": "function", "function": {"name": ...}}`
  (a grammar makes the output one or more calls of those tools, arguments valid against their
  schemas).
- `parallel_tool_calls=false`: generation stops after the first complete call. The format's
  end-of-call stop string (`</tool_call>`) ends that choice in the engine; the parser's
  `max_calls=1` ends it on the server side for formats without one (the request is aborted once
  every choice has its call). No call that was generated is dropped.
- Streamed and whole responses come from the same events (`choice_events`), parsed by the same
  parser, so a whole response equals its stream's deltas put together.
- finish_reason is `tool_calls` for a choice with at least one call (as vLLM does, even when the
  token limit ended it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from forkllm.engine.outputs import PositionLogprobs, RequestOutput
from forkllm.server.errors import APIError
from forkllm.server.protocol import ChatCompletionRequest
from forkllm.server.responses import finish_reason
from forkllm.server.structured import lark_error
from forkllm.structured.params import StructuredOutputsParams
from forkllm.tools.formats import ToolFormat
from forkllm.tools.formats.base import json_rule
from forkllm.tools.parser import ParsedDelta, ToolCall, ToolCallParser
from forkllm.tools.spec import ToolFieldError, ToolSpec, tool_specs

_CHOICE_HELP = '\'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}'


@dataclass(frozen=True)
class ToolPlan:
    specs: list[ToolSpec]
    format: ToolFormat
    choice: str  # "auto", "required" or "function"
    function: str | None  # the named function when choice is "function"
    parallel: bool

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self.format, self.names, max_calls=None if self.parallel else 1)

    @property
    def forced(self) -> list[ToolSpec]:
        """The tools a grammar restricts the output to (none for auto)."""
        if self.choice == "required":
            return self.specs
        if self.choice == "function":
            return [s for s in self.specs if s.name == self.function]
        return []

    def grammar(self) -> str | None:
        forced = self.forced
        return self.format.grammar(forced, self.parallel) if forced else None

    def structured(self) -> StructuredOutputsParams | None:
        grammar = self.grammar()
        return StructuredOutputsParams(grammar=grammar) if grammar is not None else None

    def stop(self) -> list[str]:
        end = self.format.call_end
        return [end] if end is not None and not self.parallel else []


def tool_plan(req: ChatCompletionRequest, fmt: ToolFormat) -> ToolPlan | None:
    """The request's tool calling, checked (400s name the field); None when there is none to do."""
    choice, function = _tool_choice(req.tool_choice)
    if not req.tools:  # left out, or [] (some clients send an empty list): no tools
        if req.tool_choice is not None and choice != "none":
            raise APIError(
                400, f"tool_choice {req.tool_choice!r} needs tools; none were given", param="tool_choice"
            )
        return None
    try:
        specs = tool_specs(req.tools)
    except ToolFieldError as e:
        raise APIError(400, str(e), param=e.param) from e
    if function is not None and function not in {s.name for s in specs}:
        raise APIError(
            400,
            f"tool_choice names function {function!r}, which is not among the tools",
            param="tool_choice.function.name",
        )
    if choice == "none":
        return None
    return ToolPlan(specs, fmt, choice, function, req.parallel_tool_calls is not False)


def _tool_choice(value: object) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "function", the named function)."""
    if value is None:
        return "auto", None
    if isinstance(value, str):
        if value in ("none", "auto", "required"):
            return value, None
        raise APIError(400, f"tool_choice must be {_CHOICE_HELP}, got {value!r}", param="tool_choice")
    if isinstance(value, dict) and value.get("type") == "function" and set(value) <= {"type", "function"}:
        function = value.get("function")
        if isinstance(function, dict) and set(function) == {"name"} and isinstance(function["name"], str):
            return "function", function["name"]
    raise APIError(400, f"tool_choice must be {_CHOICE_HELP}", param="tool_choice")


def check_grammar(plan: ToolPlan) -> None:
    """The forcing grammar must compile; if it does not, name the tool whose parameters broke it.
    (Off the event loop: large schemas take milliseconds.)"""
    grammar = plan.grammar()
    if grammar is None or not (error := lark_error(grammar)):
        return
    for i, spec in enumerate(plan.specs):
        if spec in plan.forced and (own := lark_error(f"start: {json_rule(spec.parameters)}")):
            raise APIError(
                400,
                f"tools.{i}.function.parameters: the grammar library cannot use this schema: {own}",
                param=f"tools.{i}.function.parameters",
            )
    raise APIError(400, f"tools: the grammar library cannot force these tools: {error}", param="tools")


# ---- generation ---------------------------------------------------------------------------------
@dataclass
class ChoiceEvent:
    """One engine delta of one choice, parsed. `finish_reason` (OpenAI's) is set on its last."""

    index: int
    parsed: ParsedDelta
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None


async def choice_events(
    outputs: AsyncIterator[tuple[int, RequestOutput]], plan: ToolPlan, n: int
) -> AsyncIterator[ChoiceEvent]:
    """Parse each choice's deltas. A choice ends when the engine ends it or when its parser has
    its one call (parallel_tool_calls=false); once all have ended the engine request is closed,
    which aborts what is still running."""
    parsers = [plan.parser() for _ in range(n)]
    running = set(range(n))
    try:
        async for _, out in outputs:
            for c in out.outputs:
                if c.index not in running:
                    continue  # ended by its parser; the engine is still finishing the others
                parser = parsers[c.index]
                parsed = parser.feed(c.text)
                reason = None
                if c.finish_reason is not None or parser.done:
                    tail = parser.finish()
                    parsed.content += tail.content
                    parsed.calls += tail.calls
                    reason = "tool_calls" if parser.calls else finish_reason(c.finish_reason)
                    running.discard(c.index)
                yield ChoiceEvent(c.index, parsed, list(c.token_ids), c.logprobs, reason)
            if not running:
                return
    finally:
        close = getattr(outputs, "aclose", None)
        if close is not None:
            await close()  # cancels the producers, which abort the engine request


def call_deltas(calls: list[ToolCall], first_index: int) -> list[dict[str, Any]]:
    """Stream deltas for complete calls: id, type and name first (arguments ""), then arguments."""
    deltas: list[dict[str, Any]] = []
    for i, call in enumerate(calls, start=first_index):
        head = {
            "index": i,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        deltas.append({"tool_calls": [head]})
        deltas.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})
    return deltas


@dataclass
class ChoiceResult:
    """A whole choice, gathered from its events."""

    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: ChoiceEvent) -> None:
        self.content += event.parsed.content
        self.calls.extend(event.parsed.calls)
        self.token_ids.extend(event.token_ids)
        self.logprobs.extend(event.logprobs or ())
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
