"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}.

Every error the server sends has this shape: ours (APIError), pydantic's validation errors,
Starlette's own (404 unknown route, 405 wrong method, 400 unparseable body) and a 500.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The error body, as the OpenAPI schema documents it."""

    error: ErrorDetail


# What the OpenAPI schema lists for every route: the statuses this server sends, all with the
# error body above (FastAPI would otherwise promise a 422 the server never sends).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request; `error.param` names the field"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model or route"},
    413: {"model": ErrorResponse, "description": "Request body over the server's limit"},
    503: {"model": ErrorResponse, "description": "Loading, overloaded or shutting down"},
    "default": {"model": ErrorResponse, "description": "Any other error, in the same shape"},
}


def from_http_exception(status: int, detail: str, method: str, path: str) -> APIError:
    """Starlette's own errors (no route, wrong method, a body it could not parse) in our shape."""
    if status == 404:
        return APIError(404, f"Invalid URL ({method} {path})", code="not_found")
    if status == 405:
        return APIError(405, f"Method {method} is not allowed for {path}", code="method_not_allowed")
    if status == 400:
        return APIError(
            400,
            f"Invalid JSON body: {detail} (malformed, or nested too deeply)",
            code="invalid_json",
        )
    return APIError(status, detail)


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
