"""What sync re-derives a changed row with: each table's view of its mapping (``SyncTable``) and the SQL, pure:
the log taken by a batch, the source rows of changed keys, the rows a lookup or a ``where`` change touches, the target
rows no source row produces any more, the upsert that only ever overwrites the phase's own rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .catalog import ForeignKey, Table
from .compile import CompiledTable
from .sql import LEDGER_SCHEMA, key_text_array, qcols, qi

SCHEMA = LEDGER_SCHEMA
RETRY_STATES = ("23503", "23505")  # refused because of another row: worth another try once the others are applied
# A batch's log rows are taken (deleted, returned) in the transaction that applies them: found by the index, deleted
# by ctid (a log row is never updated, and the two are one statement's snapshot), so no second index probe per row.
TAKE_SQL = (
    f"DELETE FROM {SCHEMA}.changes AS c WHERE c.ctid = ANY (ARRAY(SELECT x.ctid FROM {SCHEMA}.changes AS x "
    f"WHERE x.phase = $1 AND x.id > $2 AND ($3::bigint IS NULL OR x.id <= $3) ORDER BY x.id LIMIT $4)) "
    f"AND c.phase = $1 RETURNING c.id, c.source, c.key, c.op::text AS op, c.at"
)  # op as text: asyncpg gives a "char" as bytes
KEEP_SQL = f'INSERT INTO {SCHEMA}.changes (id, phase, source, key, op, at) VALUES ($1, $2, $3, $4, CAST($5::text AS "char"), $6)'
MAX_ID_SQL = f"SELECT max(id) FROM {SCHEMA}.changes WHERE phase = $1"


# -- what a table needs to re-derive its rows ---------------------------------------------------------------------
@dataclass(frozen=True)
class LookupUse:
    table: str  # the lookup's table, schema-qualified: the log's ``source``
    positions: tuple[int, ...]  # where its lookup key is in the logged key
    on: tuple[str, ...]  # the source columns that join it
    on_types: tuple[str, ...]


@dataclass(frozen=True)
class SyncTable:
    ct: CompiledTable
    target: Table
    feed: tuple[str, ...]  # the source columns the target key is a rename of, in key order
    feed_types: tuple[str, ...]
    bk_positions: tuple[int, ...]  # where batch_by is in the logged key of ct.source
    feed_positions: tuple[int, ...]
    lookups: tuple[LookupUse, ...] = ()
    reads: tuple[str, ...] = ()  # other tables its `sql:` or `where` reads: a change there re-derives every row

    @property
    def name(self) -> str:
        return str(self.ct.target)

    @property
    def source(self) -> str:
        return str(self.ct.source)


# -- the SQL (pure) -------------------------------------------------------------------------------------------------
def _unnest(first: int, n: int) -> tuple[str, list[str]]:
    names = [f"c{i}" for i in range(n)]
    arrays = ", ".join(f"${first + i}::text[]" for i in range(n))
    return f"unnest({arrays}) AS u({', '.join(qi(c) for c in names)})", names


def _tuple(columns: Sequence[str], alias: str) -> str:
    cols = qcols(tuple(columns), alias)
    return f"({cols})" if len(columns) > 1 else cols


def _in_keys(columns: Sequence[str], types: Sequence[str], alias: str, first: int) -> str:
    """``(alias.c0, …) IN (SELECT CAST(u.c0 AS t0), … FROM unnest($first::text[], …) AS u(c0, …))``."""
    unnest, names = _unnest(first, len(columns))
    casts = ", ".join(f"CAST(u.{qi(n)} AS {t})" for n, t in zip(names, types, strict=True))
    return f"{_tuple(columns, alias)} IN (SELECT {casts} FROM {unnest})"


def _text_array(columns: Sequence[str], types: Sequence[str], alias: str) -> str:
    return key_text_array([f"{qi(alias)}.{qi(c)}" for c in columns], types)


def _where(st: SyncTable) -> list[str]:
    return [f"({st.ct.mapping.where})"] if st.ct.mapping.where else []


def resolve_sql(st: SyncTable, lookups: Sequence[int], *, by_feed: bool = False) -> str:
    """The current source rows (in the ``where``) to re-derive: batch key and target key (text[]) of the rows whose
    batch key is in ``$1…`` (one text[] per batch_by column), or, for each lookup index in ``lookups``, whose ``on``
    columns are in the next parameters, or (``by_feed``) whose target key is in the last ones.  One SELECT per part,
    so each can use its index."""
    ct, a = st.ct, st.ct.alias
    head = f"SELECT {_text_array(ct.batch_by, ct.batch_types, a)} AS bk, {_text_array(st.feed, st.feed_types, a)} AS tk FROM {ct.src} WHERE "
    parts = [_of_batch_keys(st)]
    n = 1 + len(ct.batch_by)
    for i in lookups:
        lk = st.lookups[i]
        parts.append(" AND ".join([*_where(st), _in_keys(lk.on, lk.on_types, a, n)]))
        n += len(lk.on)
    if by_feed:
        parts.append(" AND ".join([*_where(st), _in_keys(st.feed, st.feed_types, a, n)]))
    return " UNION ".join(head + p for p in parts)


def resolve_all_sql(st: SyncTable) -> str:
    """Every current source row (in the ``where``) to re-derive: batch key and target key (text[])."""
    ct, a = st.ct, st.ct.alias
    where = f" WHERE {_where(st)[0]}" if ct.mapping.where else ""
    return f"SELECT {_text_array(ct.batch_by, ct.batch_types, a)} AS bk, {_text_array(st.feed, st.feed_types, a)} AS tk FROM {ct.src}{where}"


def target_keys_sql(st: SyncTable) -> str:
    """The target keys (text[]) of every row of the table the phase wrote."""
    return f"SELECT {_text_array(st.ct.key, st.ct.key_types, 't')} AS k FROM {st.ct.tgt} AS t WHERE {st.ct.written_by_phase('t')}"


def children_sql(parent: SyncTable, child: SyncTable, fk: ForeignKey) -> str:
    """The target keys (text[]) of ``child``'s rows that reference, through ``fk``, the ``parent`` rows whose keys
    are given (``$1…``, one text[] per key column)."""
    unnest, names = _unnest(1, len(parent.ct.key))
    match = " AND ".join(
        f"p.{qi(k)} = CAST(u.{qi(n)} AS {t})" for k, n, t in zip(parent.ct.key, names, parent.ct.key_types, strict=True)
    )
    join = " AND ".join(f"c.{qi(x)} = p.{qi(y)}" for x, y in zip(fk.columns, fk.ref_columns, strict=True))
    return (
        f"SELECT DISTINCT {_text_array(child.ct.key, child.ct.key_types, 'c')} AS tk FROM {child.ct.tgt} AS c "
        f"JOIN {parent.ct.tgt} AS p ON {join} JOIN {unnest} ON {match}"
    )


def unproduced_sql(st: SyncTable) -> str:
    """Of the target keys given (``$1…``, one text[] per key column), those no current source row produces."""
    ct, a = st.ct, st.ct.alias
    unnest, names = _unnest(1, len(st.feed))
    match = " AND ".join(
        f"{qi(a)}.{qi(f)} = CAST(u.{qi(n)} AS {t})" for f, n, t in zip(st.feed, names, st.feed_types, strict=True)
    )
    arr = "ARRAY[" + ", ".join(f"u.{qi(n)}" for n in names) + "]"
    return f"SELECT {arr} AS k FROM {unnest} WHERE NOT EXISTS (SELECT 1 FROM {ct.src} WHERE {' AND '.join([match, *_where(st)])})"


def others_sql(st: SyncTable) -> str:
    """How many of the target rows whose keys are given (``$1…``, one text[] per key column) someone else wrote:
    neither the phase's (its write marks) nor there before it started (in its start snapshot, the last parameter).
    Sync leaves them as they are; a table rewrite (ALTER TABLE … SET DATA TYPE, a volatile DEFAULT, pg_repack) makes
    every row so."""
    ct = st.ct
    unnest, names = _unnest(1, len(ct.key))
    on = " AND ".join(
        f"t.{qi(k)} = CAST(u.{qi(n)} AS {t})" for k, n, t in zip(ct.key, names, ct.key_types, strict=True)
    )
    before = f"pg_visible_in_snapshot({qi(SCHEMA)}.full_xid(t.xmin), ${1 + len(ct.key)}::text::pg_snapshot)"
    return (
        f"SELECT count(*) FROM {ct.tgt} AS t JOIN {unnest} ON {on} "
        f"WHERE NOT ({ct.written_by_phase('t')}) AND NOT COALESCE({before}, false)"
    )


def delete_sql(st: SyncTable) -> str:
    """Delete the target rows whose keys are given (``$1…``, one text[] per key column)."""
    ct = st.ct
    unnest, names = _unnest(1, len(ct.key))
    on = " AND ".join(
        f"t.{qi(k)} = CAST(u.{qi(n)} AS {t})" for k, n, t in zip(ct.key, names, ct.key_types, strict=True)
    )
    return f"DELETE FROM {ct.tgt} AS t USING {unnest} WHERE {on} AND {ct.written_by_phase('t')}"


def _head(st: SyncTable) -> str:
    over = " OVERRIDING SYSTEM VALUE" if st.ct.overriding else ""
    return f"INSERT INTO {st.ct.tgt} AS {qi('__target')} ({qcols(tuple(c.target for c in st.ct.columns))}){over}"


# Types whose equality holds only between values that ``::text`` writes the same way (in one session): compared as
# they are, which is cheaper.  Not numeric (1.0 = 1.00), floats (-0 = 0), interval ('1 day' = '24 hours'), jsonb (its
# numbers), json (no equality), citext, arrays and the rest: compared as text.
_EQUAL_IS_SAME = ("smallint", "integer", "bigint", "text", "uuid", "boolean", "date", "bytea")
_EQUAL_IS_SAME_PREFIX = ("character varying", "timestamp", "character(")


def _equal_means_same_text(type_: str) -> bool:
    t = type_.lower()
    return t in _EQUAL_IS_SAME or (t.startswith(_EQUAL_IS_SAME_PREFIX) and not t.endswith("[]"))


def _differs(
    st: SyncTable, columns: Sequence[str], old_row: str = qi("__target"), new_row: str = "EXCLUDED"
) -> list[str]:
    """``the target row's value IS DISTINCT FROM the new one`` for ``columns`` (of the rows ``old_row`` and
    ``new_row``): a row of the ones compared as they are (text bytewise, in the "C" collation: a nondeterministic
    collation's equality is not the text's), and a row of the others compared as text."""
    types = {c: getattr(st.target.column(c), "type", "").lower() for c in columns}
    typed = [c for c in columns if _equal_means_same_text(types[c])]
    texts = [c for c in columns if c not in typed]

    def value(alias: str, c: str) -> str:
        exact = types[c] == "text" or types[c].startswith("character")
        return f'{alias}.{qi(c)} COLLATE "C"' if exact else f"{alias}.{qi(c)}"

    out = []
    if typed:
        old, new = (", ".join(value(a, c) for c in typed) for a in (old_row, new_row))
        out.append(f"ROW({old}) IS DISTINCT FROM ROW({new})")
    if texts:
        old, new = (", ".join(f"{a}.{qi(c)}" for c in texts) for a in (old_row, new_row))
        out.append(f"ROW({old})::text IS DISTINCT FROM ROW({new})::text")
    return out


def _updated(st: SyncTable) -> list[str]:
    """The target columns an upsert brings up to date: all but the key and a GENERATED ALWAYS identity."""
    ct = st.ct
    return [
        c.target
        for c in ct.columns
        if c.target not in ct.key and getattr(st.target.column(c.target), "identity", "") != "a"
    ]


def _conflict(st: SyncTable) -> str:
    """``ON CONFLICT (key) DO UPDATE`` every other mapped column, only where a value differs (``_differs``)."""
    ct = st.ct
    rest = _updated(st)
    if not rest:
        return f" ON CONFLICT ({qcols(ct.key)}) DO NOTHING"
    sets = ", ".join(f"{qi(c)} = EXCLUDED.{qi(c)}" for c in rest)
    differs = " OR ".join(_differs(st, rest))
    # only a row the phase wrote (its copy or an earlier sync) is updated: one the application wrote, or that was
    # there before the phase, is left as it is (validation shows it), never overwritten
    return (
        f" ON CONFLICT ({qcols(ct.key)}) DO UPDATE SET {sets} WHERE ({differs}) AND {ct.written_by_phase('__target')}"
    )


def _of_batch_keys(st: SyncTable) -> str:
    """The source rows (in the ``where``) whose batch keys are given (``$1…``, one text[] per batch_by column)."""
    ct = st.ct
    return " AND ".join([*_where(st), _in_keys(ct.batch_by, ct.batch_types, ct.alias, 1)])


def upsert_sql(st: SyncTable) -> str:
    """One database: re-derive the source rows whose batch keys are given (``$1…``) with the mapping's expressions."""
    return f"{_head(st)} {_derived(st, None)}{_conflict(st)}"


def source_rows_sql(st: SyncTable) -> str:
    """Two databases, on the source: the rows whose batch keys are given, numbered, as text (like the copier's)."""
    ct = st.ct
    cols = ", ".join(f"({c.pre_cast})::text AS {qi(c.target)}" for c in ct.columns)
    return (
        f"SELECT (row_number() OVER ())::integer AS __n, {_text_array(ct.batch_by, ct.batch_types, ct.alias)} AS __key, "
        f"{_text_array(st.feed, st.feed_types, ct.alias)} AS __tk, {cols} FROM {ct.from_} WHERE {_of_batch_keys(st)}"
    )


def stage_table_sql(st: SyncTable, stage: str) -> str:
    cols = ", ".join(f"{qi(c.target)} text" for c in st.ct.columns)
    return f"CREATE TEMP TABLE {qi(stage)} (__n integer, __key text[], __tk text[], {cols}) ON COMMIT DROP"


def stage_upsert_sql(st: SyncTable, stage: str) -> str:
    """Two databases, on the target: upsert the staged rows numbered ``$1`` (int[])."""
    return f"{_head(st)} {_derived(st, stage, numbered=True)}{_conflict(st)}"


def _derived(st: SyncTable, stage: str | None, *, numbered: bool = False) -> str:
    """The re-derived rows, under the target's column names: of the batch keys ``$1…`` (one database), or the rows of
    ``stage`` (two; their text made the target's): every one, or (``numbered``) those numbered ``$1`` (int[])."""
    ct = st.ct
    if stage is None:
        exprs = ", ".join(f"{c.expr} AS {qi(c.target)}" for c in ct.columns)
        return f"SELECT {exprs} FROM {ct.from_} WHERE {_of_batch_keys(st)}"
    staged = (
        c.convert(f"s.{qi(c.target)}") if c.steps else f"CAST(s.{qi(c.target)} AS {c.cast_type})" for c in ct.columns
    )
    exprs = ", ".join(f"{e} AS {qi(c.target)}" for e, c in zip(staged, ct.columns, strict=True))
    return f"SELECT {exprs} FROM {qi(stage)} AS s" + (" WHERE s.__n = ANY($1::integer[])" if numbered else "")


def counted_upsert_sql(st: SyncTable, stage: str | None = None) -> str:
    """The upsert of a whole batch (``_derived``) as one statement that says how many rows it derived and how many it
    wrote (inserted, or updated because a value differed): ``derived``, ``written``."""
    return (
        f"WITH d AS MATERIALIZED ({_derived(st, stage)}), w AS ({_head(st)} SELECT * FROM d{_conflict(st)} RETURNING 1) "
        "SELECT (SELECT count(*) FROM d) AS derived, (SELECT count(*) FROM w) AS written"
    )


def unwritten_sql(st: SyncTable, stage: str | None = None, *, others: bool = False) -> str:
    """After an upsert, in its transaction: how many of the re-derived rows (``_derived``) are not in the target as
    derived, the rows it left as they were; a row it left because it already was as derived (every mapped column,
    the key's and a GENERATED ALWAYS identity's too, the same as text) is not counted.  With ``others``, only the rows
    someone else wrote, as ``others_sql`` says (the phase's start snapshot is the parameter after the keys;
    ``stage``: its rows numbered ``$1``).  Each derived value is first cast to its target column's type, as the
    upsert's assignment did; the source is read again, so a row changed since may fail that cast (a data error)."""
    ct = st.ct
    typed = ", ".join(f"CAST(d.{qi(c.target)} AS {st.target.column(c.target).type}) AS {qi(c.target)}"  # type: ignore[union-attr]
                      for c in ct.columns)  # fmt: skip
    on = " AND ".join(f"t.{qi(k)} = n.{qi(k)}" for k in ct.key)
    differs = " OR ".join(_differs(st, [c.target for c in ct.columns], "t", "n"))
    where = f"t.ctid IS NULL OR {differs}"
    if others:
        snapshot = f"${2 if stage else 1 + len(ct.batch_by)}::text::pg_snapshot"
        before = f"pg_visible_in_snapshot({qi(SCHEMA)}.full_xid(t.xmin), {snapshot})"
        where = f"({differs}) AND NOT ({ct.written_by_phase('t')}) AND NOT COALESCE({before}, false)"
    return (
        f"SELECT count(*) FROM (SELECT {typed} FROM ({_derived(st, stage, numbered=others)}) AS d) AS n "
        f"LEFT JOIN {ct.tgt} AS t ON {on} WHERE {where}"
    )


def key_columns_args(keys: Sequence[Sequence[str | None]], n: int) -> list[list[str | None]]:
    """Keys (rows) as one list per key column: the ``unnest($1::text[], …)`` parameters."""
    return [[k[i] for k in keys] for i in range(n)]
