"""The tokens of a tool turn: what follows an assistant message with tool calls, rendered by the
chat template itself, so a sequence resumed in-engine holds exactly the tokens a client loop that
sends the history back would have."""

from __future__ import annotations

from typing import Any

from forkllm.tokenizer import Tokenizer
from forkllm.tools.formats import ToolFormat
from forkllm.tools.prompt import render_chat


class ToolTurnRenderer:
    """The tokens that follow an assistant message with tool calls: its end, one tool message per
    call with the call's result, and the header of the next assistant message, exactly as the
    chat template renders them for a client that sends the history back (with the tool format's
    wrapping, `<tool_response>` for Hermes, where the template knows no tools): the difference
    between a probe conversation with and without the tool messages."""

    def __init__(self, tokenizer: Tokenizer, fmt: ToolFormat, chat_template: str | None = None) -> None:
        self.tokenizer, self.format, self.chat_template = tokenizer, fmt, chat_template
        probe = "\x00probe\x00"
        base: list[dict[str, Any]] = [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": probe},
        ]
        text = render_chat(tokenizer, base, add_generation_prompt=False, chat_template=chat_template)
        at = text.rfind(probe)
        if at < 0:
            raise ValueError(
                "the chat template does not render assistant messages; tools cannot run in-engine"
            )
        self._base_len = len(text)
        self._base = base
        self.message_end = text[at + len(probe) :]  # e.g. "<|im_end|>\n"

    def suffix(self, results: list[str], ended_by_eos_text: str | None) -> str:
        """Text after the message's last sampled token. `ended_by_eos_text`: the text of the EOS
        token that ended it (the template's end marker then starts with it), None when the message
        ended without one (its grammar completed)."""
        msgs = self._base + [{"role": "tool", "content": r} for r in results]
        full = render_chat(
            self.tokenizer, msgs, tool_format=self.format.name, chat_template=self.chat_template
        )
        turn = full[self._base_len :]
        end = self.message_end
        if ended_by_eos_text and end.startswith(ended_by_eos_text):
            end = end[len(ended_by_eos_text) :]
        return end + turn

    def tokens(self, results: list[str], ended_by_eos_text: str | None) -> list[int]:
        return self.tokenizer.encode(self.suffix(results, ended_by_eos_text), add_special_tokens=False)
