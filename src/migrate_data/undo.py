"""The SQL a rollback runs, by who wrote a target row.  Pure: no I/O.

A phase's copier records, in every (sub)transaction that writes target rows, a row of ``migrate_data.writes``;
that row's ``xmin`` is the transaction id the target rows it wrote carry.  So a target row is

- **ours**: its ``xmin`` is one of the phase's write marks; the phase wrote it and nobody changed it since (any
  ``UPDATE`` gives a row a new ``xmin``);
- **there before**: its ``xmin`` was committed before the phase started (visible in the snapshot recorded in the
  transaction that started the phase);
- **someone else's**: anything else: written, or changed, by somebody else since the phase started.

A rollback deletes only ours; it never touches rows that were there before, and it refuses while someone else's
rows exist unless told to save them to a file and delete them too.  The comparison is exact as long as fewer than
2^31 transactions separate the phase from its rollback (transaction ids are 32 bits in a row).
"""

from __future__ import annotations

from .mapping import QualifiedName
from .sql import qcols, qi, qname

SCHEMA = "migrate_data"

# Every statement binds the same parameters: $1 phase, $2 target table (text), $3 the phase's start snapshot.
PARAMS = "WITH p AS (SELECT $1::text AS phase, $2::text AS target, $3::text::pg_snapshot AS snap) "


def written_by(alias: str, target: str, phase: str | None) -> str:
    """True for a row (``alias``, already quoted) that the phase wrote and nobody changed since: its xmin is one of
    the phase's write marks.  ``target`` and ``phase`` are SQL expressions (a literal or a parameter)."""
    which = f"w.phase = {phase} AND w.target = {target}" if phase else f"w.target = {target}"
    return f"{alias}.xmin IN (SELECT w.xmin FROM {qi(SCHEMA)}.writes AS w WHERE {which})"


OURS = written_by("t", "p.target", "p.phase")
BEFORE = f"COALESCE(pg_visible_in_snapshot({qi(SCHEMA)}.full_xid(t.xmin), p.snap), false)"
CLASS = {
    "ours": OURS,
    "others": f"NOT ({OURS}) AND NOT {BEFORE}",
    "not_ours": f"NOT ({OURS})",  # a table the downgrade drops: everything that is not ours would be lost
}


def count_sql(table: QualifiedName) -> str:
    """Rows of ``table`` by class: ours, there before, someone else's."""
    return (
        f"{PARAMS}SELECT count(*) FILTER (WHERE {OURS}) AS ours, "
        f"count(*) FILTER (WHERE NOT ({OURS}) AND {BEFORE}) AS before, "
        f"count(*) FILTER (WHERE {CLASS['others']}) AS others FROM {qname(table)} AS t, p"
    )


def sample_sql(table: QualifiedName, key: tuple[str, ...], which: str) -> str:
    """The first keys (as text) of the rows of a class, to name them ($4 = how many)."""
    cols = ", ".join(f"t.{qi(k)}::text" for k in key) if key else "t::text"
    order = qcols(key, "t") if key else "1"
    return (
        f"{PARAMS}SELECT ARRAY[{cols}] AS key FROM {qname(table)} AS t, p WHERE {CLASS[which]} "
        f"ORDER BY {order} LIMIT $4"
    )


def rows_sql(table: QualifiedName, which: str) -> str:
    """Every row of a class as jsonb: what ``--force`` saves before deleting."""
    return f"{PARAMS}SELECT to_jsonb(t) AS row FROM {qname(table)} AS t, p WHERE {CLASS[which]}"


def batch_sql(table: QualifiedName, which: str) -> str:
    """The ctids of up to $4 rows of a class: the next batch to delete."""
    return (
        f"{PARAMS}SELECT COALESCE(array_agg(x.ctid), '{{}}') FROM (SELECT t.ctid FROM {qname(table)} AS t, p "
        f"WHERE {CLASS[which]} LIMIT $4) x"
    )


def delete_sql(table: QualifiedName, which: str, *, returning: bool) -> str:
    """Delete the rows of a batch ($4 = their ctids) that are still of their class: a row somebody updated meanwhile
    has another ctid and stays.  ``returning``: each deleted row as jsonb, for the file that keeps it."""
    back = " RETURNING to_jsonb(t) AS row" if returning else ""
    return f"{PARAMS}DELETE FROM {qname(table)} AS t USING p WHERE t.ctid = ANY ($4::tid[]) AND {CLASS[which]}{back}"


# The foreign keys whose ON DELETE would change other tables' rows (CASCADE, SET NULL, SET DEFAULT): $1 = the
# referenced table.
# ``child`` is quoted and schema-qualified whatever the search_path (``conrelid::regclass::text`` would drop the schema
# of a table the search_path shows, and a DBA with another search_path would read another table).
CASCADES_SQL = """SELECT format('%I.%I', cn.nspname, cc.relname) AS child, c.conname,
       ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o) AS cols,
       ARRAY(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o) AS ref_cols
FROM pg_constraint c JOIN pg_class cc ON cc.oid = c.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
WHERE c.contype = 'f' AND c.confrelid = $1::regclass AND c.confdeltype IN ('c', 'n', 'd')"""


def referencing_sql(child: str, cols: list[str], table: QualifiedName, ref_cols: list[str]) -> str:
    """Rows of ``child`` (a regclass text, already quoted) that reference the rows of ``table`` with ctids $1."""
    return (
        f"SELECT count(*) FROM {child} AS c WHERE ({qcols(cols, 'c')}) IN "
        f"(SELECT {qcols(ref_cols, 't')} FROM {qname(table)} AS t WHERE t.ctid = ANY ($1::tid[]))"
    )


def user_tables_sql() -> str:
    """The ordinary and partitioned tables outside the system schemas and ours (what a downgrade may drop)."""
    return (
        "SELECT n.nspname AS schema, c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname NOT IN ('pg_catalog', "
        f"'information_schema', '{SCHEMA}') AND n.nspname NOT LIKE 'pg\\_%' AND c.relname <> 'alembic_version'"
    )
