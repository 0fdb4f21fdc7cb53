"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

# OpenAI's error `type` by status; anything else is the client's fault.
_TYPES = {500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.type = _TYPES.get(status, "invalid_request_error")

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body(), headers=self.headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_FIELD = re.compile(r"^([a-z_]+)\b")


def from_value_error(e: ValueError) -> APIError:
    """A ValueError from SamplingParams / the engine names its field first: reuse it as `param`."""
    msg = str(e)
    m = _FIELD.match(msg)
    param = m.group(1) if m and m.group(1) not in ("prompt", "the", "this", "no", "got") else None
    if msg.startswith("prompt"):
        param = "prompt"
    return APIError(400, msg, param=param)


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """Pydantic's errors as one readable line naming the field (never a raw dump)."""
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") in ("json_invalid", "value_error.jsondecode"):
        return APIError(400, f"Invalid JSON body: {first.get('msg', 'could not parse')}", code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # Drop union-branch tags pydantic adds (e.g. 'str', 'list[int]') to keep the path readable.
    path = ".".join(
        x for x in loc if not re.fullmatch(r"[a-z]+\[.*\]|str|int|float|bool|list|dict|function-.*", x)
    )
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field (not supported by this server)"
    if first.get("type") == "missing":
        msg = "field required"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return APIError(400, f"{path or 'body'}: {msg}{more}", param=path or None)
