"""Tools and tool turns in a prompt, for chat templates that know nothing of them.

A template that reads the `tools` variable gets the tool list as HF `apply_chat_template(tools=...)`
passes it; one that does not (SmolLM2's, for one) gets the tools written into the system message
by the tool-call format (Hermes: a `<tools>` block and how to answer with `<tool_call>`).
Likewise a template that mentions `tool_calls` gets the history as sent; one that does not gets
each assistant turn's calls written into its content as the model would have written them, and
each tool result wrapped as the format reads results (`<tool_response>` for Hermes)."""

from __future__ import annotations

from typing import Any

from forkllm.tools.formats import ToolFormat
from forkllm.tools.formats.base import Arguments
from forkllm.tools.spec import ToolSpec


def add_tools_to_system(
    messages: list[dict[str, Any]], specs: list[ToolSpec], fmt: ToolFormat
) -> list[dict[str, Any]]:
    """The tools block appended to the first system message, or a system message of its own."""
    block = fmt.system_prompt(specs)
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        text = first.get("content") or ""
        first["content"] = f"{text}\n\n{block}" if text else block
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def write_tool_turns(messages: list[dict[str, Any]], fmt: ToolFormat) -> list[dict[str, Any]]:
    """Assistant calls and tool results as text in the messages' content."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            text = fmt.render_calls([_call_of(c) for c in calls])
            content = (message.get("content") or "").rstrip()
            message["content"] = f"{content}\n{text}" if content else text
        elif message.get("role") == "tool":
            message = dict(message, content=fmt.render_result(message.get("content") or ""))
        out.append(message)
    return out


def _call_of(call: Any) -> tuple[str, Arguments]:
    """(name, arguments) of one history call, OpenAI-shaped ({"function": {...}}) or flat."""
    if not isinstance(call, dict):
        raise ValueError(f"a tool call must be an object, got {type(call).__name__}")
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError("a tool call needs function.name")
    arguments = function.get("arguments", {})
    if not isinstance(arguments, (dict, str)):
        raise ValueError("a tool call's function.arguments must be JSON text or an object")
    return function["name"], arguments
