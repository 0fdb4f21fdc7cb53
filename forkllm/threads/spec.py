"""What a user asks of the thread runtime: the shapes of thread trees.

- `Fanout(prompts, join=...)`: the context spawns one thread per prompt (each continues from the
  context's pages with the prompt appended, then generates), the threads are joined back, `then`
  is appended and the context generates the answer. A prompt may itself be a `Fanout` (a
  thread that fans out again).
- `MapReduce(map, reduce)`: over a list of chunks, one thread per chunk (`chunk + map`), joined,
  then `reduce`: a Fanout.

Joins: `kv_concat` (the context takes the threads' pages after its own: nothing recomputed;
kv/concat.py) or `reprefill` (the threads' tokens are appended to the context and computed again,
what ThreadWeaver and APR do through an API).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forkllm.engine.sampling_params import SamplingParams
    from forkllm.threads.trees import ThreadTrees

JOINS = ("kv_concat", "reprefill")


class TreeSpec:
    """A spec that runs from a prompt alone (not MapReduce, whose prompt is its chunks)."""

    def trees(self, params: SamplingParams) -> ThreadTrees:
        """`params.n` trees of this spec from one prompt (threads/trees.py): what a scaling
        strategy given `threads=spec` runs as its candidates (scaling/threaded.py)."""
        from forkllm.threads.factory import make_trees

        return make_trees(self, params)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Fanout(TreeSpec):
    prompts: Sequence[str | Fanout]
    join: str = "kv_concat"
    then: str = "\n"  # appended after the join, before the context goes on
    max_tokens: int = 128  # each thread's own tokens (its prompt not counted)
    final_max_tokens: int = 256  # what the context generates after the join
    prefix: str = ""  # for a nested Fanout: the text its thread starts with
    # Hogwild!: the threads are workers sharing a cache; each decode step attends to the other
    # workers' tokens as they are written (positions as in its own view: context, others, itself).
    shared_cache: bool = False

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("Fanout.prompts: needs at least one thread")
        if self.join not in JOINS:
            raise ValueError(f"Fanout.join: {self.join!r} is not one of {', '.join(JOINS)}")
        if not self.then:
            raise ValueError("Fanout.then: needs at least one character (the context samples after it)")
        for name in ("max_tokens", "final_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"Fanout.{name} must be >= 1, got {getattr(self, name)}")
        if self.shared_cache and any(isinstance(p, Fanout) for p in self.prompts):
            raise ValueError("Fanout.shared_cache: workers cannot fan out again (give plain prompts)")
        for i, p in enumerate(self.prompts):
            if isinstance(p, Fanout):
                if not p.prefix:
                    raise ValueError(
                        f"Fanout.prompts[{i}]: a nested Fanout needs a prefix (its thread's text)"
                    )
            elif not isinstance(p, str) or not p:
                raise ValueError(f"Fanout.prompts[{i}]: a thread's prompt must be a non-empty string")

    @property
    def depth(self) -> int:
        """Levels of threads below the context (1 for a flat fan-out)."""
        return 1 + max((p.depth for p in self.prompts if isinstance(p, Fanout)), default=0)

    @property
    def num_threads(self) -> int:
        """Threads alive at once at most (a nested fan-out's threads replace its own)."""
        return sum(p.num_threads if isinstance(p, Fanout) else 1 for p in self.prompts)


@dataclass(frozen=True)
class MapReduce:
    """A map over chunks (each `chunk\\n\\nmap\\n` in its own thread), joined, then `reduce`."""

    map: str
    reduce: str
    join: str = "kv_concat"
    max_tokens: int = 128
    final_max_tokens: int = 256
    context: str = "Read the document one part at a time, then answer."  # the tree's prompt

    def __post_init__(self) -> None:
        if self.join not in JOINS:
            raise ValueError(f"MapReduce.join: {self.join!r} is not one of {', '.join(JOINS)}")

    def fanout(self, chunks: Sequence[str]) -> Fanout:
        if not chunks:
            raise ValueError("MapReduce: needs at least one chunk")
        return Fanout(
            [f"{c}\n\n{self.map}\n" for c in chunks],
            join=self.join,
            then=f"\n{self.reduce}\n",
            max_tokens=self.max_tokens,
            final_max_tokens=self.final_max_tokens,
        )


@dataclass(frozen=True)
class Subtasks(TreeSpec):
    """A long task as subtasks run one after another (TIMRUN): each in its own thread from the
    context; when it ends, its working tokens' KV is released and only its prompt and its
    conclusion (its last `conclusion_tokens` tokens) stay in the context, their KV moved in with
    re-rotated keys, so the next subtask reuses the positions. `prune=False` keeps every token
    (the thread joined whole by page): the same task without pruning."""

    prompts: Sequence[str]
    prune: bool = True
    max_tokens: int = 200  # each subtask's own tokens
    conclusion_tokens: int = 32
    then: str = "\n"
    final_max_tokens: int = 128

    def __post_init__(self) -> None:
        if not self.prompts or any(not isinstance(p, str) or not p for p in self.prompts):
            raise ValueError("Subtasks.prompts: needs at least one non-empty prompt")
        if not self.then:
            raise ValueError("Subtasks.then: needs at least one character (the context samples after it)")
        for name in ("max_tokens", "conclusion_tokens", "final_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"Subtasks.{name} must be >= 1, got {getattr(self, name)}")


_KINDS = {
    "fanout": (Fanout, {"join", "then", "max_tokens", "final_max_tokens", "shared_cache"}),
    "map_reduce": (MapReduce, {"map", "reduce", "join", "max_tokens", "final_max_tokens"}),
    "subtasks": (Subtasks, {"prune", "max_tokens", "conclusion_tokens", "then", "final_max_tokens"}),
    "protocol": (
        None,
        {"join", "max_tokens", "final_max_tokens", "outline", "max_paths", "max_blocks", "returns"},
    ),
}


def spec_from_dict(d: object) -> tuple[Any, list[str]]:
    """HTTP `"threads": {...}` -> (spec, map-reduce chunks). One of the keys `fanout` (a list of
    thread prompts), `map_reduce` (a list of chunks, with `map` and `reduce`), `subtasks` (a
    list of subtask prompts) or `protocol` (a protocol's name: threads the model opens itself)
    says the shape; the others are that shape's parameters. ValueError names the offending key
    as `threads.<key>`."""
    if not isinstance(d, dict):
        raise ValueError('threads must be an object like {"fanout": ["List the facts.", "Guess."]}')
    kinds = [k for k in _KINDS if k in d]
    if len(kinds) != 1:
        raise ValueError(f"threads: give exactly one of {', '.join(_KINDS)}; got {kinds or 'none'}")
    kind = kinds[0]
    cls, allowed = _KINDS[kind]
    unknown = sorted(set(d) - allowed - {kind})
    if unknown:
        raise ValueError(
            f"threads.{unknown[0]}: not a parameter of {kind} (known: {', '.join(sorted(allowed))})"
        )
    items = d[kind]
    if kind == "protocol":
        if not isinstance(items, str):
            raise ValueError(f"threads.protocol: must be a protocol's name, got {items!r}")
        outline = d.get("outline", [])
        if not isinstance(outline, list) or not all(isinstance(o, str) and o for o in outline):
            raise ValueError("threads.outline: must be a list of non-empty strings")
    elif not isinstance(items, list) or not items or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"threads.{kind}: must be a non-empty list of non-empty strings")
    for key in ("max_tokens", "final_max_tokens", "conclusion_tokens", "max_paths", "max_blocks"):
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 1):
            raise ValueError(f"threads.{key}: must be a positive integer, got {d[key]!r}")
    for key in ("join", "then", "map", "reduce", "returns"):
        if key in d and not isinstance(d[key], str):
            raise ValueError(f"threads.{key}: must be a string, got {d[key]!r}")
    for key in ("prune", "shared_cache"):
        if key in d and not isinstance(d[key], bool):
            raise ValueError(f"threads.{key}: must be true or false, got {d[key]!r}")
    if kind == "map_reduce" and not ("map" in d and "reduce" in d):
        raise ValueError("threads.map_reduce: needs `map` and `reduce` (the instructions)")
    params = {k: v for k, v in d.items() if k != kind}
    try:
        if kind == "fanout":
            return Fanout(items, **params), []
        if kind == "subtasks":
            return Subtasks(items, **params), []
        if kind == "protocol":
            from forkllm.threads.protocols import Protocol

            return Protocol(items, **params), []
        return MapReduce(**params), list(items)
    except ValueError as e:
        msg = str(e).replace("Protocol: unknown", "threads.protocol: unknown")
        for name in ("Fanout.", "MapReduce.", "Subtasks.", "Protocol."):
            msg = msg.replace(name, "threads.")
        raise ValueError(msg) from e
