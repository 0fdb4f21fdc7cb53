"""Starting (or joining) the Ray cluster from whatever thread builds the replicas.

A local cluster's daemons (GCS, raylet, dashboard and log helpers) are started by `ray.init` with
kernel fate-sharing: each is spawned with `prctl(PR_SET_PDEATHSIG, SIGKILL)`, and Linux sends
that signal when the *thread* that spawned the process exits, not when the process does.
`forkllm serve` builds its engine client in a short-lived loading thread (so /health answers
while the model loads); a `ray.init` there had the cluster SIGKILLed, without a log line, the
moment loading finished. The actors kept answering over their direct connections, so nothing
showed until the driver's GCS client gave up 60 s later ("Failed to connect to GCS within 60
seconds") and the process exited. `init_ray` therefore calls `ray.init` on the main thread, or
else on a thread that lives as long as the process: the daemons still die with the process (the
point of fate-sharing), never with a thread that had finished its work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")
LASTING_THREAD = "forkllm-ray-parent"


def init_ray(kwargs: dict[str, Any], until: threading.Event) -> None:
    """`ray.init(**kwargs)` so that the daemons it starts outlive the calling thread (until
    `until` is set, after `ray.shutdown()`)."""
    import ray

    call_in_lasting_thread(lambda: ray.init(**kwargs), until)


def call_in_lasting_thread(fn: Callable[[], R], until: threading.Event | None = None) -> R:
    """`fn()`, run on the main thread if this is it, else on a new daemon thread that parks after
    `fn` returns until `until` is set (for ever without one), so processes `fn` spawns with a
    parent-death signal live until then, or as long as this process. Returns `fn`'s value or
    raises its exception."""
    if threading.current_thread() is threading.main_thread():
        return fn()
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e
        done.set()
        (until or threading.Event()).wait()  # park: this thread is the spawned processes' parent

    threading.Thread(target=run, name=LASTING_THREAD, daemon=True).start()
    done.wait()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]
