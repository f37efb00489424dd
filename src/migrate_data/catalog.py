"""Read what a live database has: tables, columns, keys, foreign keys, sequences."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from . import graph
from .db import Executor, fetch_all, fetch_one
from .mapping import QualifiedName
from .sql import qname


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(), e.g. "character varying(20)"
    not_null: bool
    has_default: bool
    identity: str  # "" | "a" (ALWAYS) | "d" (BY DEFAULT)
    generated: bool  # GENERATED ALWAYS AS (expr) STORED: cannot be written
    type_kind: str = ""  # pg_type.typtype: "b" base, "e" enum, "d" domain, "r" range, "c" composite, "m" multirange
    labels: tuple[str, ...] = ()  # the labels of an enum type (of the enum under a domain, of an array's), in order
    expression: str = ""  # a generated column's expression
    base_type: str = ""  # a domain over a built-in type: that type (casts are checked against it)
    # A type of this database (an enum, a domain, …): the built-in type both databases know, to compare its values
    # across two databases (its base type, else text or text[]); "" for a built-in type.
    portable: str = ""

    @property
    def key_type(self) -> str:
        """The type a key of this column is written as text and read back with (sql.key_text): a domain's base type."""
        return self.base_type or self.type

    @property
    def is_enum(self) -> bool:
        """An enum, or a domain over one: only its labels are values."""
        return bool(self.labels) and not self.is_array

    @property
    def is_array(self) -> bool:
        return self.type.endswith("]")


@dataclass(frozen=True)
class ForeignKey:
    name: str
    columns: tuple[str, ...]
    ref_table: QualifiedName
    ref_columns: tuple[str, ...]
    deferrable: bool
    validated: bool


@dataclass(frozen=True)
class Leaf:
    """A leaf partition of a partitioned table: where its rows are, and what identifies them there."""

    name: QualifiedName
    parent: QualifiedName  # the partitioned table it is attached to (a sub-partitioned one for a sub-partition)
    bound: str  # pg_get_expr(relpartbound): "FOR VALUES FROM (…) TO (…)", "DEFAULT", …
    kind: str  # "r" an ordinary table, "f" a foreign table
    primary_key: tuple[str, ...]
    unique_keys: tuple[tuple[str, ...], ...]  # its own unique indexes (inherited ones included), non-partial
    not_null: tuple[str, ...]

    def keys(self) -> list[tuple[str, ...]]:
        """Column sets that identify a row of this partition: unique and NOT NULL (the primary key first)."""
        return [k for k in self.unique_keys if all(c in self.not_null for c in k)]

    def is_key(self, columns: tuple[str, ...]) -> bool:
        """True when ``columns`` identify one row here and none of them is nullable (what a keyset needs)."""
        return all(c in self.not_null for c in columns) and any(set(k) <= set(columns) for k in self.unique_keys)


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    unique_keys: tuple[tuple[str, ...], ...]  # primary key, unique constraints and non-partial unique indexes
    foreign_keys: tuple[ForeignKey, ...]
    # A partitioned table (relkind 'p') holds no rows itself: they are in its leaf partitions.
    partitioned: bool = False
    partition_key: str = ""  # pg_get_partkeydef(), e.g. "RANGE (created_at)" (sub-partitions: their own keys)
    partition_columns: tuple[str, ...] = ()  # the columns of every level's partition key (expressions left out)
    partition_expressions: bool = False  # some level partitions by an expression
    leaves: tuple[Leaf, ...] = ()  # the leaf partitions, in name order (sub-partitions and DEFAULT included)

    @property
    def qualified(self) -> QualifiedName:
        return QualifiedName(name=self.name, schema=self.schema)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    def is_unique(self, columns: tuple[str, ...]) -> bool:
        """True when some unique key is a subset of ``columns`` (so ``columns`` identify one row)."""
        return any(set(k) <= set(columns) for k in self.unique_keys)

    def has_exact_unique(self, columns: tuple[str, ...]) -> bool:
        """True when a unique key has exactly ``columns`` (what ON CONFLICT (...) needs)."""
        return any(set(k) == set(columns) for k in self.unique_keys)


# A column's type as the session names it (format_type: schema-qualified when the search_path does not show it), its
# kind, the labels of an enum (or of the enum a domain is over), a generated column's expression, and for a type of
# the database itself (oid 16384 and up: FirstNormalObjectId) what it is compared as across two databases.
COLUMNS_SQL = """SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull, a.atthasdef,
       a.attidentity::text, a.attgenerated::text <> '' AS generated, t.typtype::text AS type_kind,
       array(SELECT e.enumlabel::text FROM pg_enum e
             WHERE e.enumtypid = CASE WHEN t.typtype = 'd' THEN t.typbasetype WHEN t.typcategory = 'A' THEN t.typelem
                                      ELSE t.oid END
             ORDER BY e.enumsortorder) AS labels,
       CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END AS expression,
       CASE WHEN t.typtype = 'd' AND t.typbasetype < 16384 THEN format_type(t.typbasetype, t.typtypmod) ELSE '' END
           AS base_type,
       CASE WHEN t.oid < 16384 THEN '' WHEN t.typtype = 'd' AND t.typbasetype < 16384
            THEN format_type(t.typbasetype, t.typtypmod) WHEN t.typcategory = 'A' THEN 'text[]' ELSE 'text' END
           AS portable
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"""


TABLE_SQL = """SELECT c.oid, n.nspname, c.relname, c.relkind = 'p' AS partitioned FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')"""

KEYS_SQL = """SELECT i.indisprimary AS pk,
                  array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord) AS cols
           FROM pg_index i WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
                 AND i.indisvalid
           ORDER BY NOT i.indisprimary, i.indexrelid"""

FOREIGN_KEYS_SQL = """SELECT con.conname, con.condeferrable, con.convalidated, rn.nspname AS ref_schema, rc.relname AS ref_table,
                  array(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
                        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord) AS cols,
                  array(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
                        JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord) AS ref_cols
           FROM pg_constraint con JOIN pg_class rc ON rc.oid = con.confrelid JOIN pg_namespace rn ON rn.oid = rc.relnamespace
           WHERE con.conrelid = $1 AND con.contype = 'f' ORDER BY con.conname"""


async def read_table(db: Executor, name: QualifiedName) -> Table | None:
    """Return the table ``name`` (schema from search_path when unqualified), or None if it does not exist."""
    row = await fetch_one(db, TABLE_SQL, qname(name))
    if row is None:
        return None
    oid = row["oid"]
    cols = await fetch_all(db, COLUMNS_SQL, oid)
    keys = await fetch_all(db, KEYS_SQL, oid)
    fks = await fetch_all(db, FOREIGN_KEYS_SQL, oid)
    parts: dict[str, object] = {}
    if row["partitioned"]:
        parts = await _partitioning(db, oid)
    return Table(
        schema=row["nspname"],
        name=row["relname"],
        columns=tuple(_column(c) for c in cols),
        primary_key=next((tuple(k["cols"]) for k in keys if k["pk"]), ()),
        unique_keys=tuple(tuple(k["cols"]) for k in keys),
        foreign_keys=tuple(_foreign_key(f) for f in fks),
        partitioned=row["partitioned"],
        **parts,  # type: ignore[arg-type]
    )


def _column(c: asyncpg.Record) -> Column:
    return Column(
        c["attname"],
        c["type"],
        c["attnotnull"],
        c["atthasdef"],
        c["attidentity"],
        c["generated"],
        c["type_kind"],
        tuple(c["labels"]),
        c["expression"] or "",
        c["base_type"],
        c["portable"],
    )


def _foreign_key(f: asyncpg.Record) -> ForeignKey:
    return ForeignKey(
        f["conname"],
        tuple(f["cols"]),
        QualifiedName(f["ref_table"], f["ref_schema"]),
        tuple(f["ref_cols"]),
        f["condeferrable"],
        f["convalidated"],
    )


PARTITION_KEYS_SQL = """SELECT pg_get_partkeydef(pt.partrelid) AS def, 0 = ANY (pt.partattrs::int2[]) AS has_expr,
       array(SELECT a.attname FROM unnest(pt.partattrs::int2[]) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = k.attnum ORDER BY k.ord) AS cols
FROM pg_partition_tree($1::oid::regclass) t JOIN pg_partitioned_table pt ON pt.partrelid = t.relid
ORDER BY t.level, t.relid"""

LEAVES_SQL = """SELECT c.oid, n.nspname, c.relname, c.relkind::text AS kind, pn.nspname AS parent_schema,
       pc.relname AS parent_name, COALESCE(pg_get_expr(c.relpartbound, c.oid), '') AS bound
FROM pg_partition_tree($1::oid::regclass) t JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class pc ON pc.oid = t.parentrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
WHERE t.isleaf ORDER BY n.nspname, c.relname"""

LEAF_KEYS_SQL = """SELECT i.indrelid AS oid, i.indisprimary AS pk,
       array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord) AS cols
FROM pg_index i WHERE i.indrelid = ANY ($1::oid[]) AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
  AND i.indisvalid
ORDER BY i.indrelid, NOT i.indisprimary, i.indexrelid"""

LEAF_NOT_NULL_SQL = """SELECT attrelid AS oid, array_agg(attname::text ORDER BY attnum) AS cols FROM pg_attribute
WHERE attrelid = ANY ($1::oid[]) AND attnum > 0 AND NOT attisdropped AND attnotnull GROUP BY attrelid"""


async def _partitioning(db: Executor, oid: int) -> dict[str, object]:
    """The partition keys of a partitioned table (every level) and its leaf partitions with their keys."""
    levels = await fetch_all(db, PARTITION_KEYS_SQL, oid)
    leaves = await fetch_all(db, LEAVES_SQL, oid)
    oids = [r["oid"] for r in leaves]
    keys: dict[int, list[tuple[bool, tuple[str, ...]]]] = {}
    for k in await fetch_all(db, LEAF_KEYS_SQL, oids):
        keys.setdefault(k["oid"], []).append((k["pk"], tuple(k["cols"])))
    not_null = {r["oid"]: tuple(r["cols"]) for r in await fetch_all(db, LEAF_NOT_NULL_SQL, oids)}
    columns: list[str] = []
    for level in levels:
        columns += [c for c in level["cols"] if c not in columns]
    return {
        "partition_key": levels[0]["def"] if levels else "",
        "partition_columns": tuple(columns),
        "partition_expressions": any(level["has_expr"] for level in levels),
        "leaves": tuple(
            Leaf(
                name=QualifiedName(r["relname"], r["nspname"]),
                parent=QualifiedName(r["parent_name"], r["parent_schema"]),
                bound=r["bound"],
                kind=r["kind"],
                primary_key=next((cols for pk, cols in keys.get(r["oid"], []) if pk), ()),
                unique_keys=tuple(cols for _, cols in keys.get(r["oid"], [])),
                not_null=not_null.get(r["oid"], ()),
            )
            for r in leaves
        ),
    }


@dataclass(frozen=True)
class Trigger:
    """A user trigger of a table (internal ones, such as those of foreign keys, are not listed)."""

    name: str
    timing: str  # "BEFORE" | "AFTER" | "INSTEAD OF"
    events: tuple[str, ...]  # "INSERT", "UPDATE", "DELETE", "TRUNCATE"
    level: str  # "ROW" | "STATEMENT"
    enabled: str  # "O" origin and local (the default), "D" disabled, "R" replica only, "A" always
    function: str


TRIGGERS_SQL = """SELECT t.tgname, t.tgtype::int AS type, t.tgenabled::text AS enabled, t.tgfoid::regprocedure::text AS fn
FROM pg_trigger t WHERE t.tgrelid = to_regclass($1) AND NOT t.tgisinternal ORDER BY t.tgname"""


async def user_triggers(db: Executor, table: QualifiedName) -> list[Trigger]:
    """The user triggers of ``table`` (on a partitioned table: its own, which its partitions get too)."""
    out = []
    for r in await fetch_all(db, TRIGGERS_SQL, qname(table)):
        t = r["type"]  # pg_trigger.tgtype bits: 1 row, 2 before, 4 insert, 8 delete, 16 update, 32 truncate, 64 instead
        timing = "INSTEAD OF" if t & 64 else ("BEFORE" if t & 2 else "AFTER")
        events = tuple(e for bit, e in ((4, "INSERT"), (16, "UPDATE"), (8, "DELETE"), (32, "TRUNCATE")) if t & bit)
        out.append(Trigger(r["tgname"], timing, events, "ROW" if t & 1 else "STATEMENT", r["enabled"], r["fn"]))
    return out


async def sequences(db: Executor, table: Table) -> list[tuple[str, str]]:
    """Return ``(column, sequence)`` for every serial or identity column of ``table``."""
    rows = await fetch_all(
        db,
        "SELECT c AS column, pg_get_serial_sequence($1, c) AS seq FROM unnest($2::text[]) AS c",
        qname(table.qualified),
        [c.name for c in table.columns],
    )
    return [(r["column"], r["seq"]) for r in rows if r["seq"]]


def parents_first(tables: list[Table]) -> list[Table]:
    """Order ``tables`` so that a table comes after the tables its foreign keys reference (cycles: as given)."""
    by_name = {str(t.qualified): t for t in tables}
    edges = {n: {str(fk.ref_table) for fk in t.foreign_keys} for n, t in by_name.items()}
    return [by_name[n] for n in graph.parents_first(list(by_name), edges)]


def fk_cycles(tables: list[Table]) -> list[set[str]]:
    """Groups of ``tables`` that reference each other in a cycle (or a table referencing itself), by name."""
    names = {str(t.qualified) for t in tables}
    return graph.cycles({str(t.qualified): {str(fk.ref_table) for fk in t.foreign_keys} & names for t in tables})
