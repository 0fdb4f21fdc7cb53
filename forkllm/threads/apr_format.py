"""APR's serialized spawn/join format (Adaptive Parallel Reasoning, Pan et al. 2025), as its
released code writes and reads it (github.com/Parallel-Reasoning/APR: `src/data/search.py`
writes the traces the model is trained on, `src/eval/parallel_infernce_utils.py` parses them).

The parent's spawn call, one line per child (its input after the `>`):

    <Calling Sub Searches>
    <Start Sub Search 0 at level 1> Moving to Node #1,0
    <Start Sub Search 1 at level 1> Moving to Node #1,1
    <End Calling Sub Searches>

What replaces that call in the parent once the children have returned (their join messages;
`No Solution` for a child that returned none):

    <Sub Searches>
    <Goal Reached in Sub Search 0 at level 1 at Node #1,0>
    ...the child's message...
    <No Solution in Sub Search 1 at level 1 at Node #1,1>
    <End Sub Searches>

APR's Countdown children return the solution path they restate after finding the goal: the text
after the second-to-last "Goal Reached" (`get_search_result`): `returns="goal"`. `returns="text"`
takes a child's whole output as its message (a model whose children write only that).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

CALL_OPEN = "<Calling Sub Searches>"
CALL_END = "<End Calling Sub Searches>"
RESULTS_OPEN = "<Sub Searches>\n"
RESULTS_END = "<End Sub Searches>\n"
GOAL = "Goal Reached"
_ITEM = re.compile(r"<Start Sub Search (\d+) at level (\d+)>[ \t]*(.*)")


@dataclass(frozen=True)
class ChildCall:
    """One `<Start Sub Search i at level l> input` line of a spawn call."""

    index: str
    level: str
    input: str

    @property
    def where(self) -> str:
        """What the results line says the child searched from ("Node #1,0" for APR's inputs)."""
        return self.input.removeprefix("Moving to ")


def spawn_call(inputs: Sequence[str], level: int = 1) -> str:
    """The spawn call a parent at level `level - 1` writes for these child inputs."""
    items = "".join(f"<Start Sub Search {i} at level {level}> {x}\n" for i, x in enumerate(inputs))
    return f"{CALL_OPEN}\n{items}{CALL_END}"


def parse_call(text: str) -> tuple[int, list[ChildCall]]:
    """(where the last spawn call starts in `text`, its children). `text` ends with CALL_END.
    ValueError, saying what is wrong, for a malformed call."""
    end = text.rfind(CALL_END)
    pos = text.rfind(CALL_OPEN, 0, max(end, 0))
    if end < 0 or pos < 0:
        raise ValueError(f"apr: the model closed a spawn call ({CALL_END}) it never opened ({CALL_OPEN})")
    kids: list[ChildCall] = []
    for line in text[pos + len(CALL_OPEN) : end].splitlines():
        if not line.strip():
            continue
        m = _ITEM.fullmatch(line.strip())
        if m is None:
            raise ValueError(
                f"apr: malformed spawn call line {line.strip()!r} "
                "(expected '<Start Sub Search i at level l> input')"
            )
        if not m.group(3).strip():
            raise ValueError(f"apr: spawn call line {line.strip()!r} gives the child no input")
        kids.append(ChildCall(m.group(1), m.group(2), m.group(3).strip()))
    if not kids:
        raise ValueError("apr: the model's spawn call lists no child")
    return pos, kids


def returned_message(text: str, rule: str) -> str | None:
    """A child's join message from its output, None when it returned nothing."""
    if rule == "text":
        return text.strip() or None
    hits = [m.start() for m in re.finditer(GOAL, text)]
    if len(hits) < 2:  # no goal, or found but not restated: APR reads that as no solution
        return None
    return text[hits[-2] + len(GOAL) :].strip()


def results_block(kids: Sequence[ChildCall], messages: Sequence[str | None]) -> str:
    """What the parent continues with in place of its spawn call."""
    out = RESULTS_OPEN
    for k, msg in zip(kids, messages):
        if msg is None:
            out += f"<No Solution in Sub Search {k.index} at level {k.level} at {k.where}>\n"
        else:
            out += f"<Goal Reached in Sub Search {k.index} at level {k.level} at {k.where}>\n{msg}\n"
    return out + RESULTS_END
