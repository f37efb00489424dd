"""Partitioned tables: which key pages each leaf partition, what changed between runs, what a dump must name.

A partitioned source is copied leaf partition by leaf partition (sub-partitions and the DEFAULT partition
included): a partitioned table has no rows of its own and, usually, no primary key (a unique key on it must contain
the partition key), while each leaf has its own.  The key that pages a leaf must be the same columns in every leaf,
so that the rejects, the checkpoints and ``--deep`` speak of one kind of key for the whole table.

The pure functions here decide; ``leaf_members`` is the one that reads the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import Leaf, Table
from .db import Executor, fetch_all
from .errors import PreflightError
from .mapping import QualifiedName
from .sql import qname


def batch_key(
    source: Table, *, wanted: tuple[str, ...] | None = None, feeders: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """The columns that page every leaf of the partitioned ``source``: the mapping's ``batch_by`` (``wanted``,
    checked by the pre-flight), else the parent's primary key, else the first key of the first leaf (its primary
    key, then a unique NOT NULL index) that is a key of every leaf, else the source columns that feed the target's
    key when they are one.

    Raises PreflightError naming the leaves without such a key, with what to do about it."""
    if wanted:
        return wanted
    if source.primary_key:
        return source.primary_key
    leaves = [leaf for leaf in source.leaves if leaf.kind != "f"]
    candidates = (leaves[0].keys() if leaves else []) + ([feeders] if feeders else [])
    for key in candidates:
        if leaves and all(leaf.is_key(key) for leaf in leaves):
            return key
    # the key most leaves have, to name the leaves that lack it
    keys = [k for leaf in leaves for k in leaf.keys()] + ([feeders] if feeders else [])
    best = max(keys, key=lambda k: sum(leaf.is_key(k) for leaf in leaves), default=())
    lacking = [leaf for leaf in source.leaves if not best or not leaf.is_key(best)]
    raise PreflightError(
        f"{source.name} is partitioned, and no column set is a unique NOT NULL key of every partition"
        + (f": ({', '.join(best)}) is not one of " if best else ": ")
        + "; ".join(f"partition {leaf.name} ({describe_keys(leaf)})" for leaf in lacking)
        if source.leaves
        else f"{source.name} is partitioned and has no partitions: give `batch_by:`",
        hint="give each partition a primary key on the same columns (ALTER TABLE … ADD PRIMARY KEY), or name "
        "`batch_by:` columns that are unique and NOT NULL in every partition",
    )


def describe_keys(leaf: Leaf) -> str:
    if leaf.kind == "f":
        return "a foreign table (no key, no ctid): cannot be paged"
    keys = leaf.keys()
    return "keys " + "; ".join(f"({', '.join(k)})" for k in keys) if keys else "no primary key or unique NOT NULL index"


def key_problems(source: Table, key: tuple[str, ...]) -> list[str]:
    """Why ``key`` cannot page some leaf of ``source``: one line per leaf where it is not unique and NOT NULL."""
    out = []
    for leaf in source.leaves:
        if leaf.kind == "f":
            out.append(f"partition {leaf.name} is a foreign table: it has no key to page on")
        elif not leaf.is_key(key):
            nullable = [c for c in key if c not in leaf.not_null]
            why = f"{', '.join(nullable)} nullable" if nullable else "not unique (no unique index on them)"
            out.append(f"batch_by ({', '.join(key)}) is {why} in partition {leaf.name} ({describe_keys(leaf)})")
    return out


def unique_across(source: Table, key: tuple[str, ...]) -> bool:
    """True when no two rows of the whole partitioned table can share ``key``: a unique key of the parent is part
    of it, or it holds every partition key column (a row's partition key values decide its leaf, and the key is
    unique within each leaf)."""
    if source.is_unique(key):
        return True
    return not source.partition_expressions and set(source.partition_columns) <= set(key)


@dataclass(frozen=True)
class LeafChanges:
    """Leaves attached or detached since a table's checkpoints were made."""

    attached: tuple[str, ...]
    detached: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.attached or self.detached)

    def describe(self, table: str) -> str:
        parts = []
        if self.attached:
            parts.append(
                f"attached to {table} since: {', '.join(self.attached)} (its rows were never copied)"
                if len(self.attached) == 1
                else f"attached to {table} since: {', '.join(self.attached)} (their rows were never copied)"
            )
        if self.detached:
            parts.append(
                f"detached from {table} since: {', '.join(self.detached)} (rows of it may be in the target, "
                "and are no longer in the source)"
            )
        return "; ".join(parts)


def leaf_changes(recorded: set[str], current: list[str]) -> LeafChanges:
    """Compare the leaves named in a table's checkpoints with the leaves it has now."""
    return LeafChanges(
        attached=tuple(n for n in current if n not in recorded),
        detached=tuple(sorted(recorded - set(current))),
    )


MEMBERS_SQL = """SELECT x.name, n.nspname, c.relname, t.isleaf, c.relkind::text AS kind
FROM unnest($1::text[]) WITH ORDINALITY AS x(name, ord)
CROSS JOIN LATERAL pg_partition_tree(to_regclass(x.name)) t JOIN pg_class c ON c.oid = t.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid <> to_regclass(x.name) ORDER BY x.ord, t.level, n.nspname, c.relname"""


async def leaf_members(db: Executor, tables: list[QualifiedName]) -> dict[str, list[tuple[QualifiedName, bool]]]:
    """For each partitioned table of ``tables`` (by ``str(name)``): its partitions, sub-partitioned ones and leaves
    (``True``), each level before the next.  Tables that are not partitioned are not in the result."""
    out: dict[str, list[tuple[QualifiedName, bool]]] = {}
    names = [qname(t) for t in tables]
    by_text = dict(zip(names, tables, strict=True))
    for r in await fetch_all(db, MEMBERS_SQL, names):
        if r["kind"] == "f":  # a foreign table's rows are not in this database: pg_dump has no data for it
            continue
        out.setdefault(str(by_text[r["name"]]), []).append((QualifiedName(r["relname"], r["nspname"]), r["isleaf"]))
    return out
