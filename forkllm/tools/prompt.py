"""Tools and tool turns in a prompt, for chat templates that know nothing of them.

`render_chat` is the one way to render a conversation that may hold tools or tool turns (the
server's chat route and /tokenize use it; so should anything else):
- a template that reads the `tools` variable gets the tool list as HF
  `apply_chat_template(tools=...)` passes it; one that does not (SmolLM2's, for one) gets the
  tools written into the system message by the tool-call format (Hermes: a `<tools>` block and
  how to answer with `<tool_call>`);
- a template that mentions `tool_calls` gets the history as sent; one that does not gets each
  assistant turn's calls written into its content as the model would have written them, and each
  tool result wrapped as the format reads results (`<tool_response>` for Hermes)."""

from __future__ import annotations

import re
from typing import Any

from forkllm.tokenizer import Tokenizer
from forkllm.tools.formats import DEFAULT_FORMAT, ToolFormat, get_format
from forkllm.tools.formats.base import Arguments
from forkllm.tools.spec import ToolSpec, tool_specs

_TOOL_CALLS = re.compile(r"\btool_calls\b")  # a template that mentions them renders past calls


def render_chat(
    tok: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    tool_format: str = DEFAULT_FORMAT,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """`tok.apply_chat_template` with tools (OpenAI function definitions, checked by
    `tool_specs`) and tool turns rendered as the module docstring says. Raises ValueError (a
    ChatTemplateError from the template) naming what is wrong."""
    template = chat_template or tok.chat_template
    if template is not None and (tools is not None or has_tool_turns(messages)):
        fmt = get_format(tool_format)
        if not _TOOL_CALLS.search(template):
            messages = write_tool_turns(messages, fmt)
        if tools is not None:
            if tok.template_reads("tools", chat_template):
                kwargs["tools"] = tools
            else:
                messages = add_tools_to_system(messages, tool_specs(tools), fmt)
    return tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kwargs
    )


def has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages)


def add_tools_to_system(
    messages: list[dict[str, Any]], specs: list[ToolSpec], fmt: ToolFormat
) -> list[dict[str, Any]]:
    """The tools block appended to the first system message, or a system message of its own."""
    block = fmt.system_prompt(specs)
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        text = _text(first.get("content"))
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
            content = _text(message.get("content")).rstrip()
            message["content"] = f"{content}\n{text}" if content else text
        elif message.get("role") == "tool":
            message = dict(message, content=fmt.render_result(_text(message.get("content"))))
        out.append(message)
    return out


def _text(content: Any) -> str:
    """A message's text: a string, or the text of a list of text parts."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ValueError("a tool turn's content must be a string (or a list of text parts)")
        return "".join(str(p.get("text", "")) for p in content)
    return content if isinstance(content, str) else ""


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
