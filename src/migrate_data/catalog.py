"""Read what a live database has: tables, columns, keys, foreign keys, sequences."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ForeignKey:
    name: str
    columns: tuple[str, ...]
    ref_table: QualifiedName
    ref_columns: tuple[str, ...]
    deferrable: bool
    validated: bool


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    unique_keys: tuple[tuple[str, ...], ...]  # primary key, unique constraints and non-partial unique indexes
    foreign_keys: tuple[ForeignKey, ...]

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


async def read_table(db: Executor, name: QualifiedName) -> Table | None:
    """Return the table ``name`` (schema from search_path when unqualified), or None if it does not exist."""
    row = await fetch_one(
        db,
        """SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')""",
        qname(name),
    )
    if row is None:
        return None
    oid = row["oid"]
    cols = await fetch_all(
        db,
        """SELECT attname, format_type(atttypid, atttypmod) AS type, attnotnull, atthasdef, attidentity::text,
                  attgenerated::text <> '' AS generated
           FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum""",
        oid,
    )
    keys = await fetch_all(
        db,
        """SELECT i.indisprimary AS pk,
                  array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord) AS cols
           FROM pg_index i WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
           ORDER BY NOT i.indisprimary, i.indexrelid""",
        oid,
    )
    fks = await fetch_all(
        db,
        """SELECT con.conname, con.condeferrable, con.convalidated, rn.nspname AS ref_schema, rc.relname AS ref_table,
                  array(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
                        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord) AS cols,
                  array(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
                        JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord) AS ref_cols
           FROM pg_constraint con JOIN pg_class rc ON rc.oid = con.confrelid JOIN pg_namespace rn ON rn.oid = rc.relnamespace
           WHERE con.conrelid = $1 AND con.contype = 'f' ORDER BY con.conname""",
        oid,
    )
    pk = next((tuple(k["cols"]) for k in keys if k["pk"]), ())
    return Table(
        schema=row["nspname"],
        name=row["relname"],
        columns=tuple(
            Column(c["attname"], c["type"], c["attnotnull"], c["atthasdef"], c["attidentity"], c["generated"])
            for c in cols
        ),
        primary_key=pk,
        unique_keys=tuple(tuple(k["cols"]) for k in keys),
        foreign_keys=tuple(
            ForeignKey(
                f["conname"],
                tuple(f["cols"]),
                QualifiedName(f["ref_table"], f["ref_schema"]),
                tuple(f["ref_cols"]),
                f["condeferrable"],
                f["convalidated"],
            )
            for f in fks
        ),
    )


async def sequences(db: Executor, table: Table) -> list[tuple[str, str]]:
    """Return ``(column, sequence)`` for every serial or identity column of ``table``."""
    rows = await fetch_all(
        db,
        "SELECT c AS column, pg_get_serial_sequence($1, c) AS seq FROM unnest($2::text[]) AS c",
        qname(table.qualified),
        [c.name for c in table.columns],
    )
    return [(r["column"], r["seq"]) for r in rows if r["seq"]]


async def table_exists(db: Executor, name: QualifiedName) -> bool:
    return await fetch_one(db, "SELECT 1 FROM pg_class WHERE oid = to_regclass($1)", qname(name)) is not None


def parents_first(tables: list[Table]) -> list[Table]:
    """Order ``tables`` so that a table comes after the tables its foreign keys reference (cycles: as given)."""
    by_name = {str(t.qualified): t for t in tables}
    out: list[str] = []

    def visit(name: str, seen: tuple[str, ...]) -> None:
        if name in out or name in seen:
            return
        for fk in by_name[name].foreign_keys:
            if str(fk.ref_table) in by_name:
                visit(str(fk.ref_table), seen + (name,))
        out.append(name)

    for name in by_name:
        visit(name, ())
    return [by_name[n] for n in out]
