"""The web page (forkllm/server/ui/): chat and a live view of the generation tree, served at `/`.

Static files shipped inside the package (no CDN, no build step: plain HTML, CSS and JavaScript);
the page needs no API key to load and asks for one when the API answers 401. What it draws comes
from the chat route's `tree_event` chunks (server/tree_events.py).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from forkllm.server.errors import APIError

router = APIRouter()

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
_FILES = {
    f.name: f
    for f in resources.files("forkllm.server").joinpath("ui").iterdir()
    if any(f.name.endswith(ext) for ext in _TYPES)
}


def _file(name: str) -> Response:
    f = _FILES.get(name)
    if f is None:
        raise APIError(404, f"no page file {name!r}", code="not_found")
    ext = name[name.rfind(".") :]
    return Response(f.read_bytes(), media_type=_TYPES[ext], headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return _file("index.html")


@router.get("/ui/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    return _file(name)
