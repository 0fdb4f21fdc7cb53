"""Tool calling: tool definitions (spec), the call formats (formats: Hermes, Llama 3 JSON,
pythonic), the one incremental parser for streamed and whole messages (parser), and tools in a
prompt whose chat template knows nothing of them (prompt).

This package's top level imports only those text-level modules, which import nothing else of
forkllm: the tokenizer uses them to render prompts, so importing anything that reaches the engine
from here would make an import cycle (in-engine tool execution lives in tools/runtime*, imported
by its own users)."""

from forkllm.tools.formats import DEFAULT_FORMAT, FORMATS, ToolFormat, get_format
from forkllm.tools.parser import (
    ParsedDelta,
    ParsedMessage,
    ToolCall,
    ToolCallParser,
    new_call_id,
    parse_tool_calls,
)
from forkllm.tools.spec import ToolFieldError, ToolSpec, tool_specs

__all__ = [
    "DEFAULT_FORMAT",
    "FORMATS",
    "ParsedDelta",
    "ParsedMessage",
    "ToolCall",
    "ToolCallParser",
    "ToolFieldError",
    "ToolFormat",
    "ToolSpec",
    "get_format",
    "new_call_id",
    "parse_tool_calls",
    "tool_specs",
]
