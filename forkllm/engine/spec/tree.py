"""Draft trees: several guesses for what follows a sequence, verified in one forward.

A tree is a list of draft tokens with a parent index each (-1: the sequence's last token, the
root), parents before their children. Node i is computed at position pos + depth(i) and written
to slot pos + 1 + i (the chain of a tree whose every parent is the previous node is the usual
chain draft). Its query attends the context up to the root and its own ancestors' slots: a few
key segments (engine/runner.py builds them from `segments`), the same machinery that reads a
page-joined thread around its holes. Verification walks the tree with the tokens sampled at each
row: from the root, go to the child whose token was drawn, as long as there is one. The kept
nodes' KV moves to the slots a chain would have used (same positions: nothing re-rotated).
"""

from __future__ import annotations

from forkllm.attention.metadata import KeySegment

ROOT = -1


def chain_parents(n: int) -> list[int]:
    return list(range(-1, n - 1))


def is_chain(parents: list[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def depths(parents: list[int]) -> list[int]:
    """Depth of every node (a child of the root is at depth 1)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p == ROOT else out[p] + 1)
    return out


def path_to(parents: list[int], i: int) -> list[int]:
    """The nodes from the root's child down to node i (inclusive); [] for the root."""
    path: list[int] = []
    while i != ROOT:
        path.append(i)
        i = parents[i]
    return path[::-1]


def segments(parents: list[int], pos: int, node: int) -> list[KeySegment]:
    """Key segments of node `node`'s query (ROOT: the root's): the context [0, pos + 1) and the
    runs of its ancestors' (and its own) slots."""
    segs = [KeySegment(0, pos + 1)]
    for i in path_to(parents, node):
        slot = pos + 1 + i
        if segs[-1].end == slot:
            segs[-1] = KeySegment(segs[-1].start, slot + 1)
        else:
            segs.append(KeySegment(slot, slot + 1))
    return segs


def merge(chains: list[list[int]], max_nodes: int) -> tuple[list[int], list[int]]:
    """A tree from chains, best first: common prefixes shared, each chain's new nodes appended in
    order (so the best chain is nodes 0.. as a plain chain draft), at most `max_nodes` nodes."""
    tokens: list[int] = []
    parents: list[int] = []
    children: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for chain in chains:
        at = ROOT
        for token in chain:
            node = children.get((at, token))
            if node is None:
                if len(tokens) >= max_nodes:
                    break
                node = len(tokens)
                tokens.append(token)
                parents.append(at)
                children[(at, token)] = node
            at = node
    return tokens, parents


def walk(draft: list[int], parents: list[int], sampled: list[int]) -> list[int]:
    """The kept path: nodes whose token equals the token drawn at their parent's row (row 0: the
    root, row i + 1: node i). Returns the nodes kept, in order."""
    kids: dict[int, dict[int, int]] = {}
    for i, (t, p) in enumerate(zip(draft, parents)):
        kids.setdefault(p, {}).setdefault(t, i)
    kept: list[int] = []
    at = ROOT
    while True:
        nxt = kids.get(at, {}).get(sampled[at + 1])
        if nxt is None:
            return kept
        kept.append(nxt)
        at = nxt
