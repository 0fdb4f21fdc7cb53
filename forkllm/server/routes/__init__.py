"""The HTTP routes, one module per group; create_app mounts every router in ROUTERS."""

from __future__ import annotations

from forkllm.server.routes import chat, completions, plain, ui

ROUTERS = (plain.router, completions.router, chat.router, ui.router)
