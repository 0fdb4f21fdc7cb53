"""OpenAI request bodies (plus vLLM's extra sampling fields) and their mapping to SamplingParams.

Unknown fields are rejected rather than ignored (except `user`, which the spec says is for
abuse tracking only), so a client never silently gets behaviour it did not ask for. Every body
first passes `json_checks` (valid Unicode, finite numbers, bounded nesting); the two generating
routes also take a literal `extra_body` object, merged into the body.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams
from forkllm.server.json_checks import check_json_values, merge_extra_body
from forkllm.structured.params import StructuredOutputsParams


class RequestBody(BaseModel):
    """Base of every request body: checks the raw JSON before any field is validated, so the
    400 names the field as sent (pydantic's own errors would name a union branch)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    accepts_extra_body: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def check_raw_json(cls, data: object) -> object:
        check_json_values(data)
        if cls.accepts_extra_body and isinstance(data, dict):
            return merge_extra_body(data)
        return data


class StreamOptions(BaseModel):
    """include_usage: a final usage-only chunk; continuous_usage_stats: the running usage on every
    chunk (vLLM's extension). Only allowed with stream=true."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: OpenAI's structured outputs (always enforced, strict or not)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format, plus vLLM's `structural_tag` type (`structures`, `triggers`)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    structures: list[Any] | None = None
    triggers: list[Any] | None = None


class StructuredOutputsField(BaseModel):
    """vLLM's `structured_outputs` object (the newer spelling of its guided_* fields)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None
    disable_any_whitespace: bool = False


class SamplingRequest(RequestBody):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    accepts_extra_body: ClassVar[bool] = True

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    user: str | None = None  # accepted and ignored, as the OpenAI spec allows
    logit_bias: dict[str, float] | None = None  # token id (as a string, as JSON keys are) -> bias
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0  # vLLM's: lower is scheduled sooner (orders the engine's waiting queue)
    # In-engine inference-time scaling (forkllm extension); validated by the scaling layer.
    scaling: dict[str, Any] | None = None
    # In-engine reasoning threads (forkllm extension; server/routes/threads.py).
    threads: dict[str, Any] | None = None
    # Structured output: OpenAI's response_format, vLLM's guided_* fields and their newer
    # structured_outputs object (at most one of them; server/structured.py maps them).
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsField | None = None

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        n: int | None = None,
        structured: StructuredOutputsParams | None = None,
        extra_stop: list[str] | None = None,
    ) -> SamplingParams:
        """Raises ValueError naming the field (the caller turns it into a 400). `structured`: the
        grammar the output must follow; `extra_stop`: stop strings the server adds (a tool
        call's end when parallel_tool_calls is false)."""
        stop = self.stop
        if extra_stop:
            stop = [*([stop] if isinstance(stop, str) else stop or []), *extra_stop]
        return SamplingParams(
            n=n if n is not None else self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=stop,
            stop_token_ids=self.stop_token_ids,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=self._token_bias(),
            structured=structured,
            output_kind=RequestOutputKind.DELTA,
        )

    def _token_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
            bias[token] = value
        return bias


CompletionPrompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: CompletionPrompt
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: str = "function"
    function: FunctionCall


# The roles a chat template is given (tokenizer.VALID_ROLES; a test keeps the two equal).
Role = Literal["system", "user", "assistant", "tool", "developer"]


class ChatMessage(BaseModel):
    """One message. Extra keys are kept for the chat template (vLLM does the same); an
    assistant turn that called tools may have null content, and `tool` turns answer a call."""

    model_config = ConfigDict(extra="allow")
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: content always present (null renders as
        empty), and tool-call arguments parsed into objects when they are JSON objects (HF
        templates write them with `tojson`, as vLLM passes them)."""
        message = self.model_dump(exclude_none=True)
        message["content"] = "" if self.content is None else message["content"]
        for call in message.get("tool_calls", ()):
            arguments = call["function"]["arguments"]
            try:
                parsed = json.loads(arguments)
            except ValueError:
                continue  # not JSON: the template gets the text as the model wrote it
            if isinstance(parsed, dict):
                call["function"]["arguments"] = parsed
        return message


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Tool calling; checked by server/tool_calls.py (forkllm.tools.spec), which names the field.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat extensions (its_hub sends these when it continues a partial answer)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    # Stream the generation tree's operations as `tree_event` chunks (server/tree_events.py).
    tree_events: bool = False


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # None: the input kind's default (a prompt gets special tokens, rendered messages do not;
    # add_generation_prompt applies to messages only, True by default).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]
