"""Which replica a request goes to: by prompt prefix (an approximate radix tree of what each
replica has seen), by load, or in turn. Pure Python, no Ray: the client (replicas/client.py)
asks `pick` and reports `started` / `finished`.

The prefix policy follows SGLang's cache-aware router: while the replicas' loads are balanced, a
request goes where the longest run of its leading pages was sent before (those pages are likely
still in that replica's prefix cache), ties and misses to the least loaded; once the loads drift
apart (the busiest has more than `balance_abs` requests and `balance_rel` times the idlest's),
it goes to the least loaded whatever its prefix. Everything of one request (its n samples, a
strategy's tree, a thread tree) is one engine request, so it stays on one replica by
construction; a multi-turn chat lands where its earlier turns are.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

POLICIES = ("prefix", "least_loaded", "round_robin")


class PrefixIndex:
    """The approximate radix tree of one replica: chained hashes of the page-aligned prefixes of
    the prompts routed to it, the least recently used dropped past `capacity` entries (the
    replica's own cache evicts too; this only has to be right most of the time)."""

    def __init__(self, page: int, capacity: int) -> None:
        self.page, self.capacity = page, capacity
        self._seen: OrderedDict[int, None] = OrderedDict()

    def chain(self, ids: Sequence[int]) -> list[int]:
        """One hash per full page: of the page's tokens and every page before it."""
        out, h = [], 0
        for i in range(0, len(ids) - self.page + 1, self.page):
            h = hash((h, tuple(ids[i : i + self.page])))
            out.append(h)
        return out

    def match(self, chain: Sequence[int]) -> int:
        """Leading pages of `chain` this replica has seen."""
        n = 0
        for h in chain:
            if h not in self._seen:
                break
            n += 1
        return n

    def add(self, chain: Sequence[int]) -> None:
        for h in chain:
            self._seen[h] = None
            self._seen.move_to_end(h)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


@dataclass
class ReplicaLoad:
    requests: int = 0  # in flight
    alive: bool = True
    routed: int = 0
    prefix_pages: int = 0  # pages matched at routing time, summed (the router's own hit count)
    prompt_pages: int = 0


@dataclass
class Router:
    num_replicas: int
    policy: str = "prefix"
    page: int = 16
    capacity: int = 1 << 18  # pages remembered per replica
    balance_abs: int = 32
    balance_rel: float = 1.5
    loads: list[ReplicaLoad] = field(init=False)
    indexes: list[PrefixIndex] = field(init=False)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"router must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.num_replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.num_replicas}")
        self.loads = [ReplicaLoad() for _ in range(self.num_replicas)]
        self.indexes = [PrefixIndex(self.page, self.capacity) for _ in range(self.num_replicas)]
        self._turn = itertools.count()

    def pick(self, ids: Sequence[int], exclude: Sequence[int] = ()) -> int:
        """The replica for a prompt (never one in `exclude` or marked dead); records the routing.
        Raises RuntimeError when no replica is left."""
        live = [i for i, load in enumerate(self.loads) if load.alive and i not in exclude]
        if not live:
            raise RuntimeError("no live replica")
        chain = self.indexes[0].chain(ids)
        least = min(live, key=lambda i: (self.loads[i].requests, self.loads[i].routed))
        if self.policy == "round_robin":
            choice = live[next(self._turn) % len(live)]
        elif self.policy == "least_loaded" or self._imbalanced(live):
            choice = least
        else:
            best = max(live, key=lambda i: (self.indexes[i].match(chain), -self.loads[i].requests))
            choice = best if self.indexes[best].match(chain) > 0 else least
        load = self.loads[choice]
        load.routed += 1
        load.prefix_pages += self.indexes[choice].match(chain)
        load.prompt_pages += len(chain)
        self.indexes[choice].add(chain)
        return choice

    def _imbalanced(self, live: Sequence[int]) -> bool:
        counts = [self.loads[i].requests for i in live]
        hi, lo = max(counts), min(counts)
        return hi - lo > self.balance_abs and hi > self.balance_rel * lo

    def started(self, replica: int) -> None:
        self.loads[replica].requests += 1

    def finished(self, replica: int) -> None:
        self.loads[replica].requests = max(0, self.loads[replica].requests - 1)

    def mark(self, replica: int, alive: bool) -> None:
        """A replica died (its routes are forgotten: a restarted engine has an empty cache) or
        came back."""
        self.loads[replica].alive = alive
        if not alive:
            self.indexes[replica] = PrefixIndex(self.page, self.capacity)
            self.loads[replica].requests = 0
