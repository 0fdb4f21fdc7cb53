"""A `forkllm serve` process for benchmarks whose peer is a client talking to the server.

Two engines in one process (an in-process server beside the in-engine driver) run torch on two
threads, and whichever ran last slows the other: 26.9 s vs 36.9 s measured for the same W8
in-engine run. A benchmark's server therefore runs in its own process, fresh per run (so no run
finds another's prefix cache), with the run's engine flags.
"""

from __future__ import annotations

import time
from typing import Any


class ServeProcess:
    """`forkllm serve` on a free local port with the engine flags `kw` (EngineConfig fields) and
    `extra` command-line flags; ready when constructed."""

    def __init__(self, kw: dict[str, Any], extra: list[str] | None = None) -> None:
        import dataclasses
        import socket
        import subprocess
        import sys

        import httpx

        from forkllm.engine.config import EngineConfig

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        flags: list[str] = []
        for f in dataclasses.fields(EngineConfig):
            value = kw.get(f.name, f.default)
            if f.name == "model" or value == f.default or value is None:
                continue
            name = f.name.replace("_", "-")
            flags += (
                [f"--{name}" if value else f"--no-{name}"]
                if isinstance(value, bool)
                else [f"--{name}", str(value)]
            )
        model = [str(kw["model"])] if kw.get("model") else []
        cmd = [
            sys.executable,
            "-m",
            "forkllm.cli",
            "serve",
            *model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *flags,
            *(extra or []),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        self.url = self.base + "/v1/completions"
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"forkllm serve did not start: {' '.join(cmd)}")
            time.sleep(0.5)

    def gauge(self, name: str) -> float:
        import httpx

        for line in httpx.get(self.base + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
