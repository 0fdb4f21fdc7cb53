"""Checks on a request body as parsed from JSON, before its fields are validated.

Python's JSON parser accepts what no model field should see: lone surrogates ("\\ud800" is valid
JSON but not valid Unicode, and the tokenizer, the template engine and the response encoder all
fail on it), NaN / Infinity / 1e309 (every range check passes NaN), and nesting deep enough to
exhaust the recursion of anything that walks it later. These are refused here, once, for every
value in the body (typed fields and free-form objects such as `scaling` alike), with a 400 naming
the field as the client spelled it. Lone surrogates are refused rather than replaced: OpenAI
answers them with a 400 too, and replacing would silently change what the model is asked.

`merge_extra_body` folds a literal `extra_body` object into the request: the official client's
`extra_body=` argument is merged client-side, but clients that forward it verbatim (its_hub's
OpenAICompatibleLanguageModel) send it as a field (repeating its fields at the top level), and
vLLM tolerates that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from forkllm.server.errors import APIError

# Deeper than any real request (a chat message's content part is 4 levels down).
MAX_DEPTH = 32


def check_json_values(body: object) -> None:
    """Raise a 400 naming the first lone surrogate, non-finite number or over-deep nesting.
    Iterative, and cheap on the common case (ASCII strings, integers): a body of a million token
    ids is walked in a fraction of a second."""
    stack: list[tuple[object, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        items: Iterable[tuple[object, object]]
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            _check_scalar(value, path)
            continue
        if depth >= MAX_DEPTH:
            raise APIError(
                400, f"{path or 'body'}: nested more than {MAX_DEPTH} levels deep", param=path or None
            )
        for key, item in items:
            if isinstance(key, str) and not key.isascii():
                _check_scalar(key, path)
            if isinstance(item, (dict, list)):
                stack.append((item, _join(path, key), depth + 1))
            elif isinstance(item, (str, float)):
                _check_scalar(item, _join(path, key))


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_scalar(value: object, path: str) -> None:
    where = path or "body"
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"{where}: must be a finite number, got {value}", param=path or None)
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(
                400,
                f"{where}: contains a lone surrogate ({value[e.start]!r} at character {e.start}), "
                "which is not valid Unicode; send the text as UTF-8",
                param=path or None,
                code="invalid_unicode",
            ) from None


def merge_extra_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body with a literal `extra_body` object's fields moved to the top level. its_hub sends
    each field both inside and outside, with the same value: that is accepted; a field given
    twice with different values is ambiguous, so it is refused by name."""
    if "extra_body" not in body:
        return body
    extra = body["extra_body"]
    merged = {k: v for k, v in body.items() if k != "extra_body"}
    if extra is None:
        return merged
    if not isinstance(extra, dict):
        raise APIError(400, "extra_body must be an object of request fields", param="extra_body")
    for key, value in extra.items():
        if key in merged and (merged[key] != value or type(merged[key]) is not type(value)):
            raise APIError(
                400,
                f"{key} is given both at the top level and inside extra_body, with different "
                "values; send it once",
                param=key,
            )
        merged[key] = value
    return merged
