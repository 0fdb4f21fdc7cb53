"""Size limits on what one HTTP request may ask for, each a clear 400 (413 for the body) naming the
field and the flag that raises it.

A single request must not be able to occupy the server: `n`/`best_of` multiply the sequences in
the batch, a scaling strategy's width and token budget multiply its work, and a huge prompt is
tokenized before any context-length check can refuse it. The prompt-token limit is the model's
context (max_model_len), checked where the prompt is tokenized.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forkllm.server.errors import APIError

MiB = 1 << 20


def _api_error(*args: Any, **kwargs: Any) -> APIError:
    """APIError, imported when raised: `forkllm serve --help` builds its flags from Limits, and
    the CLI must load without the server extras (fastapi, pydantic) installed."""
    from forkllm.server.errors import APIError

    return APIError(*args, **kwargs)


@dataclass(frozen=True)
class Limits:
    max_n: int = 128  # --max-n: samples per prompt (`n`)
    max_best_of: int = 128  # --max-best-of: samples ranked per prompt (`best_of`)
    # --max-request-sequences: prompts x samples of one completion request (a list of prompts)
    max_request_sequences: int = 1024
    max_scaling_width: int = 64  # --max-scaling-width: scaling n / particles / width x expand
    max_scaling_budget: int = 65536  # --max-scaling-budget: tokens one scaling run may generate
    max_prompt_bytes: int = 2 * MiB  # --max-prompt-bytes: UTF-8 bytes of a request's prompt text
    max_request_bytes: int = 8 * MiB  # --max-request-body: the HTTP body, before parsing

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_count(value: int, limit: int, field: str, flag: str) -> None:
    """`field` (n, best_of) must be between 1 and `limit`."""
    if value < 1:
        raise _api_error(400, f"{field} must be at least 1, got {value}", param=field)
    if value > limit:
        raise _api_error(
            400, f"{field} must be at most {limit} on this server ({flag}), got {value}", param=field
        )


def check_request_sequences(num_prompts: int, samples: int, limits: Limits) -> None:
    """A list of prompts multiplies the samples: their product is one request's sequences."""
    total = num_prompts * samples
    if total > limits.max_request_sequences:
        raise _api_error(
            400,
            f"this request would run {num_prompts} prompts x {samples} samples = {total} sequences, over "
            f"this server's limit of {limits.max_request_sequences} (--max-request-sequences); send "
            "fewer prompts per request",
            param="prompt",
        )


def check_prompt_bytes(texts: Iterable[str], limits: Limits, field: str) -> None:
    """The request's prompt text, all of it, before it is tokenized: tokenizing megabytes takes
    seconds of CPU, and text this long could never fit the context anyway."""
    size = 0
    for text in texts:
        size += len(text.encode("utf-8"))
        if size > limits.max_prompt_bytes:
            raise _api_error(
                400,
                f"{field} is over {limits.max_prompt_bytes} bytes of text, this server's limit "
                "(--max-prompt-bytes); shorten it",
                param=field,
                code="prompt_too_large",
            )


# The keys of a scaling spec that size a run: how many sequences run side by side, and how many
# tokens they may generate.
_WIDTH_KEYS = ("n", "particles", "width", "expand")
_TOKEN_KEYS = ("budget", "max_tokens", "max_step_tokens")


def check_scaling_spec(spec: Mapping[str, object], limits: Limits) -> None:
    """Refuse a `scaling` object whose size exceeds the server's limits, naming the key as
    `scaling.<key>`. Checks only sizes (and that they are positive integers); everything else is
    for the strategy's own validation. Unset sizes are the strategy's defaults, all within the
    default limits; without a `budget`, width x max_tokens must fit the budget limit."""
    sizes: dict[str, int] = {}
    for key in (*_WIDTH_KEYS, *_TOKEN_KEYS):
        if key in spec and spec[key] is not None:
            sizes[key] = _positive_int(spec[key], f"scaling.{key}")
    for key in _WIDTH_KEYS:
        if key in sizes and sizes[key] > limits.max_scaling_width:
            _too_big(key, sizes[key], limits.max_scaling_width, "--max-scaling-width")
    if "width" in sizes or "expand" in sizes:
        width, expand = sizes.get("width", 1), sizes.get("expand", 1)
        if width * expand > limits.max_scaling_width:
            raise _api_error(
                400,
                f"scaling.width x scaling.expand is {width * expand}, over this server's limit of "
                f"{limits.max_scaling_width} (--max-scaling-width)",
                param="scaling.width",
            )
    for key in _TOKEN_KEYS:
        if key in sizes and sizes[key] > limits.max_scaling_budget:
            _too_big(key, sizes[key], limits.max_scaling_budget, "--max-scaling-budget")
    if "budget" not in sizes and "max_tokens" in sizes:
        width = max(
            sizes.get("n", 1), sizes.get("particles", 1), sizes.get("width", 1) * sizes.get("expand", 1)
        )
        if width * sizes["max_tokens"] > limits.max_scaling_budget:
            raise _api_error(
                400,
                f"scaling could generate {width} x {sizes['max_tokens']} tokens, over this server's "
                f"limit of {limits.max_scaling_budget} (--max-scaling-budget); set scaling.budget "
                "or lower scaling.max_tokens",
                param="scaling.max_tokens",
            )


def _positive_int(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _api_error(400, f"{field} must be a positive integer, got {value!r}", param=field)
    return value


def _too_big(key: str, value: int, limit: int, flag: str) -> None:
    raise _api_error(
        400,
        f"scaling.{key} must be at most {limit} on this server ({flag}), got {value}",
        param=f"scaling.{key}",
    )
