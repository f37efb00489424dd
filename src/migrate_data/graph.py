"""Orders and cycles of the foreign-key graph between tables.  Pure: no I/O, no project imports.

A graph is ``{node: set of nodes it references}`` (a child references its parents); nodes are table names.
"""

from __future__ import annotations

from collections.abc import Mapping


def parents_first(nodes: list[str], edges: Mapping[str, set[str]]) -> list[str]:
    """``nodes`` ordered so that each comes after the nodes it references, otherwise in the given order; the nodes
    of a cycle keep the given order among themselves."""
    out: list[str] = []
    placed: set[str] = set()
    known = set(nodes)

    def visit(node: str, path: frozenset[str]) -> None:
        if node in placed or node in path:
            return
        for parent in sorted(edges.get(node, set()) & known, key=nodes.index):
            visit(parent, path | {node})
        placed.add(node)
        out.append(node)

    for node in nodes:
        visit(node, frozenset())
    return out


def cycles(edges: Mapping[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups with more than one node, or a node referencing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, set())):
            if w not in edges:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges[v]:
                out.append(group)

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out
