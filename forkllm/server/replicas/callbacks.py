"""A streamed policy's front-end callbacks across the replica boundary.

A policy reports as it runs through callbacks it holds: its tree watcher (`watch`: a scaling
strategy's or a thread tree's tree events), a thread tree's `log.on_event` (its thread events;
n trees: each of `policies[i]`), a tool run's `on_event` (tools mode). They are closures over the HTTP
stream's event loop and cannot travel to a replica: the client strips them while the policy is
pickled (`stripped`), the replica puts a collector in each place (`install`) and streams the
calls back in batches (`PolicyEvents`, in the order the engine made them) before the result
(`PolicyResult`), and the client replays each call to the callback it stripped (`replay`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

Path = tuple[str | int, ...]  # attribute names and list indices from the policy to a callback
Callback = Callable[[Any], None]

# Where a policy (or each tree of ThreadTrees' `policies`) keeps a callback.
_PLACES: tuple[Path, ...] = (("watch",), ("on_event",), ("log", "on_event"))


@dataclass(frozen=True)
class PolicyEvents:
    """Callback calls made on the replica since the last batch: (index into the paths, event)."""

    calls: list[tuple[int, Any]]


@dataclass(frozen=True)
class PolicyResult:
    """The policy's result: the last item of its stream."""

    value: Any


def find(policy: object) -> list[tuple[Path, Callback]]:
    """The callbacks the policy holds now, with where it holds them."""
    owners: list[tuple[Path, object]] = [((), policy)]
    trees = getattr(policy, "policies", None)
    if isinstance(trees, list):
        owners += [(("policies", i), p) for i, p in enumerate(trees)]
    found = []
    for prefix, owner in owners:
        for place in _PLACES:
            fn = _get(owner, place)
            if callable(fn):
                found.append((prefix + place, fn))
    return found


@contextlib.contextmanager
def stripped(policy: object, paths: Sequence[Path]) -> Iterator[None]:
    """The policy without the callbacks at `paths` for the time of the block (its pickling),
    then with them again."""
    held = [_get(policy, p) for p in paths]
    try:
        for p in paths:
            _set(policy, p, None)
        yield
    finally:
        for p, fn in zip(paths, held):
            _set(policy, p, fn)


def install(policy: object, paths: Sequence[Path], sink: Callable[[int, Any], None]) -> None:
    """On the replica: the callback at `paths[k]` becomes `sink(k, event)`. One object per place,
    set once: the engine ends a policy's watch by its identity."""
    for k, p in enumerate(paths):
        _set(policy, p, partial(sink, k))


def replay(batch: PolicyEvents, callbacks: Sequence[Callback]) -> None:
    for k, event in batch.calls:
        callbacks[k](event)


def _get(obj: Any, path: Path) -> Any:
    for step in path:
        obj = obj[step] if isinstance(step, int) else getattr(obj, step, None)
        if obj is None:
            return None
    return obj


def _set(obj: Any, path: Path, value: Any) -> None:
    owner = _get(obj, path[:-1])
    name = path[-1]
    assert isinstance(name, str)
    setattr(owner, name, value)
