"""The one ASGI middleware around every HTTP request, in order:

1. `x-request-id` on every response: the client's own if it sent one, else the route's (the
   completion id), else a new one.
2. The API key, when one is set, on every route but /health and the API docs; a 401 carries
   `WWW-Authenticate: Bearer`.
3. The body size limit, before anything parses the body: a declared Content-Length over the
   limit is refused at once, and a body streamed without one is counted as it arrives; 413.
4. The request runs under the shutdown drain (server/shutdown.py): at the deadline it is stopped
   and answered 503, or its stream ends with an error event and [DONE].
5. An unexpected exception becomes an OpenAI-shaped 500 sent as a normal response (Starlette's
   own handler re-raises, and uvicorn then drops the keep-alive connection); in a stream that
   already started, an error event and [DONE].
6. A count by route and status for /metrics (by route template, so unknown paths cannot grow
   the label set).

A pure ASGI middleware, not BaseHTTPMiddleware: it must replay the buffered body and see the
response's start and end, and it adds no task per streamed chunk.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forkllm.server.errors import APIError
from forkllm.server.responses import sse
from forkllm.server.state import ServerState

logger = logging.getLogger("forkllm.server")

# Routes open without the API key: probes and the schema.
# The web page (routes/ui.py: "/" and its files under /ui/) loads without a key; it asks for one.
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_REQUEST_ID = b"x-request-id"


class ServerMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        response = _TrackedResponse(send, _client_request_id(headers))
        try:
            await self._handle(scope, receive, response, headers)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.state.metrics.requests.labels(endpoint, str(response.status)).inc()

    async def _handle(
        self, scope: Scope, receive: Receive, response: _TrackedResponse, headers: Headers
    ) -> None:
        limit = self.state.config.limits.max_request_bytes
        try:
            self._check_key(scope["path"], headers)
            if scope["method"] in _BODY_METHODS:
                _check_declared_size(headers, limit)
                receive = await _buffered_body(receive, limit)
        except APIError as e:
            await e.response()(scope, receive, response.send)
            return
        try:
            finished = await self.state.drain.run(self.app(scope, receive, response.send))
            if not finished:
                await response.cut_short(
                    scope,
                    receive,
                    APIError(
                        503, "the server is shutting down; this request was stopped", code="shutting_down"
                    ),
                )
        except Exception as e:
            logger.exception("internal error in %s %s", scope["method"], scope["path"])
            error = APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
            await response.cut_short(scope, receive, error)

    def _check_key(self, path: str, headers: Headers) -> None:
        key = self.state.config.api_key
        if key is None or path in OPEN_PATHS or path.startswith("/ui/"):
            return
        sent = headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, f"Bearer {key}".encode()):
            raise APIError(
                401,
                "invalid or missing API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )


class _TrackedResponse:
    """Forwards the app's messages, adding the request id, and remembers how far the response
    got so that it can be ended properly whatever happens."""

    def __init__(self, send: Send, client_request_id: bytes | None) -> None:
        self._send = send
        self.client_request_id = client_request_id
        self.status = 500  # until a response starts: a request that never answers counts as failed
        self.started = False
        self.finished = False
        self.event_stream = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            raw = list(message.get("headers", []))
            message = {**message, "headers": _with_request_id(raw, self.client_request_id)}
            self.status = message["status"]
            self.started = True
            content_type = Headers(raw=raw).get("content-type", "")
            self.event_stream = content_type.startswith("text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    async def cut_short(self, scope: Scope, receive: Receive, error: APIError) -> None:
        """End the response with `error`: as the whole response if none started; as a last
        event and [DONE] in a stream; otherwise by ending the body."""
        if self.finished:
            return
        if not self.started:
            await error.response()(scope, receive, self.send)
            return
        body = (sse(error.body()) + sse("[DONE]")).encode() if self.event_stream else b""
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


def _client_request_id(headers: Headers) -> bytes | None:
    """The client's x-request-id, if it is a sane one (printable, at most 256 characters)."""
    value = headers.get("x-request-id")
    if value and len(value) <= 256 and value.isprintable():
        return value.encode("latin-1")
    return None


def _with_request_id(raw: list[tuple[bytes, bytes]], client_id: bytes | None) -> list[tuple[bytes, bytes]]:
    ours = [v for k, v in raw if k.lower() == _REQUEST_ID]
    rest = [(k, v) for k, v in raw if k.lower() != _REQUEST_ID]
    request_id = client_id or (ours[0] if ours else uuid.uuid4().hex.encode())
    return [*rest, (_REQUEST_ID, request_id)]


def _check_declared_size(headers: Headers, limit: int) -> None:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)


async def _buffered_body(receive: Receive, limit: int) -> Receive:
    """Read the whole body, refusing it once it passes `limit`; the app then reads it from a
    replay, and later receives (disconnect polling) go to the server as before."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left mid-body: let the app see it
            return _replay([message], receive)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _replay(messages: Iterable[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is over {limit} bytes, this server's limit (--max-request-body)",
        code="request_too_large",
    )
