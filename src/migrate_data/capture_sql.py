"""Change capture, pure: what a phase captures (``plan_capture``) and the SQL of its trigger functions and triggers
(see capture.py for why they are written as they are)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .catalog import Table
from .compile import CompiledTable
from .mapping import QualifiedName
from .sql import LEDGER_SCHEMA, key_text_array, key_text_typed, qi, ql, qname

SCHEMA = LEDGER_SCHEMA
NEW, OLD = "migrate_data_new", "migrate_data_old"  # the transition tables' names inside the trigger function
EVENTS = {"i": "INSERT", "u": "UPDATE", "d": "DELETE", "t": "TRUNCATE"}
LOCK_WAIT = "1s"  # lock_timeout of one attempt to create or drop triggers
LOCK_RETRIES = 5


@dataclass(frozen=True)
class Captured:
    """One table a phase captures: which columns its log rows carry as the key."""

    table: QualifiedName  # schema-qualified
    columns: tuple[str, ...]  # the logged key, in this order
    watched: tuple[str, ...] | None = None  # only a lookup's table: an UPDATE is logged when a key or these change
    types: tuple[str, ...] = ()  # of ``columns``: how their text is written (sql.key_text); none given: ``::text``

    @property
    def name(self) -> str:
        """As the log's ``source`` says it: ``public.customers``."""
        return str(self.table)

    @property
    def names(self) -> tuple[str, ...]:
        """Every column the trigger function names: the key's, then a lookup's watched ones."""
        return tuple(dict.fromkeys((*self.columns, *(self.watched or ()))))

    @property
    def relation(self) -> str:
        """Quoted, for SQL and ``to_regclass``: ``"public"."customers"``."""
        return qname(self.table)


@dataclass(frozen=True)
class CapturePlan:
    phase: str
    tables: tuple[Captured, ...]
    problems: tuple[tuple[str, str], ...] = ()  # (target table, why its changes cannot be captured)
    reads: tuple[tuple[str, str], ...] = ()  # (target table, a table its `sql:` or `where` reads): a change there
    # re-derives every row of the target table

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_table(self) -> dict[str, Captured]:
        return {c.name: c for c in self.tables}


# -- what to capture (pure) -------------------------------------------------------------------------------------
def key_feed(ct: CompiledTable, source: Table) -> tuple[tuple[str, ...] | None, str | None]:
    """The source columns the target key is a plain rename of (in key order), or None and why it is not."""
    feed: list[str] = []
    for c in ct.key_columns:
        spec = c.spec
        why = None
        if spec.kind != "column" or not spec.column:
            why = f"is computed ({spec.kind}:)"
        elif spec.map or spec.has_default:
            why = "is translated (map/default)"
        elif c.zone_conversion or any(s.check is not None for s in c.steps):
            why = "is converted in a way that can change it (a cut, a rounding or a time zone)"
        if why:
            return None, (
                f"target key column {c.target} {why}, not a plain rename of a source column: the target key of a "
                "deleted source row cannot be known"
            )
        feed.append(spec.column)  # type: ignore[arg-type]
    if not source.is_unique(tuple(feed)):
        return None, f"the source columns {', '.join(feed)} that the target key copies are not unique in {source.name}"
    return tuple(feed), None


def plan_capture(
    phase: str,
    compiled: Sequence[CompiledTable],
    sources: Mapping[str, Table],
    lookups: Mapping[str, Table],
    reads: Mapping[str, Sequence[Table]] | None = None,
) -> CapturePlan:
    """What a phase captures: each source table (its ``batch_by`` and target-key columns), each lookup's table (its
    lookup key) and each other table a ``sql:`` or ``where`` reads (``reads``, by ``str(ct.target)``: any key, every
    UPDATE).  ``sources`` maps ``str(ct.source)``, ``lookups`` ``str(lookup.table)`` to the live tables."""
    columns: dict[str, list[str]] = {}
    read_by: list[tuple[str, str]] = []
    names: dict[str, QualifiedName] = {}
    live: dict[str, Table] = {}
    watched: dict[str, list[str] | None] = {}
    problems: list[tuple[str, str]] = []
    for ct in compiled:
        src = sources[str(ct.source)]
        feed, why = key_feed(ct, src)
        if why:
            problems.append((str(ct.target), why))
            continue
        name = str(src.qualified)
        names[name], live[name] = src.qualified, src
        cols = columns.setdefault(name, [])
        for col in (*ct.batch_by, *(feed or ())):
            if col not in cols:
                cols.append(col)
        watched[name] = None  # a source table: every UPDATE counts (a `sql:` or `where` may read any column)
        for _, lk in ct.lookups:
            table = lookups[str(lk.table)]
            lname = str(table.qualified)
            names[lname], live[lname] = table.qualified, table
            lcols = columns.setdefault(lname, [])
            for k in lk.key:
                if k not in lcols:
                    lcols.append(k)
            if lname not in watched or watched[lname] is not None:
                w = watched.setdefault(lname, [])
                assert w is not None
                w += [lk.column] if lk.column not in w else []
        for table in (reads or {}).get(str(ct.target), ()):
            rname = str(table.qualified)
            names[rname], live[rname] = table.qualified, table
            rcols = columns.setdefault(rname, [])
            rcols += [] if rcols else list(table.primary_key or next(iter(table.unique_keys), (table.columns[0].name,)))
            watched[rname] = None  # any column may be read
            read_by.append((str(ct.target), rname))
    tables = tuple(
        Captured(
            names[n],
            tuple(cols),
            None if watched[n] is None else tuple(watched[n] or ()),
            tuple(live[n].column(col).key_type for col in cols),  # type: ignore[union-attr]
        )
        for n, cols in columns.items()
    )
    return CapturePlan(phase, tables if not problems else (), tuple(problems), tuple(read_by))


def plan_relations(plan: Any) -> set[tuple[str, str]]:
    """The (schema, table) of every relation an ``EXPLAIN (VERBOSE, FORMAT JSON)`` plan scans, subplans included."""
    out: set[tuple[str, str]] = set()
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "Relation Name" in node:
                out.add((node.get("Schema", ""), node["Relation Name"]))
            stack += list(node.values())
        elif isinstance(node, list):
            stack += node
    return out


# -- the SQL (pure) ---------------------------------------------------------------------------------------------
def _digest(phase: str, table: str) -> str:
    return hashlib.sha1(f"{phase}\0{table}".encode()).hexdigest()[:10]


def function_name(phase: str, table: str) -> str:
    """The trigger function of one phase on one table (schema-qualified, quoted)."""
    return f"{qi(SCHEMA)}.{qi('capture_' + _digest(phase, table))}"


def trigger_name(phase: str, table: str, event: str) -> str:
    """``md_capture_<phase>_<digest>_<i|u|d|t>``: one per event, unique per phase and table."""
    return f"md_capture_{phase[:30]}_{_digest(phase, table)[:6]}_{event}"


TEXT = "pg_catalog.text"  # never the writer's ``text``: see the module's docstring
EMPTY = f"SELECT '{{}}'::{TEXT}[]"  # the key of "some row of this table changed": sync re-derives the table
EQ = "OPERATOR(pg_catalog.=)"
NE = "OPERATOR(pg_catalog.<>)"


def _key(alias: str, c: Captured) -> str:
    """The logged key of a row: its text as checkpoints and rejects hold it, whatever the writer's settings."""
    return key_text_array([f"{alias}.{qi(col)}" for col in c.columns], c.types or ("text",) * len(c.columns))


@dataclass(frozen=True)
class Layout:
    """Where one relation a function's triggers are on (the captured table, or one of its partitions, whose
    attribute numbers may differ) holds the columns the function names: its oid and, in ``Captured.names`` order,
    their attribute numbers and type oids, as they were when capture was installed."""

    oid: int
    attnums: tuple[int, ...]
    types: tuple[int, ...]


def _guard(c: Captured, layouts: Sequence[Layout]) -> str:
    """True while every column the function names is the one it was at install: still at its attribute number under
    its name.  A column renamed or dropped would make the statement that names it fail, and the writer's statement
    with it; a column that took the name of another (renames in one transaction) would log the other column's
    values as keys.

    The names are read with ``pg_identify_object_as_address``: the catalog as it is now, as the statement that names
    them will be planned (a REPEATABLE READ writer's snapshot may be older than a rename), from the system cache,
    without a query (about 0.7 µs a column; the query on ``pg_attribute`` it replaces cost 10 µs).  A relation the
    layouts do not know (attached or restored since) is not trusted (false), nor a number past its last column (NULL)."""
    by_layout: dict[tuple[int, ...], list[int]] = {}
    for layout in layouts:
        by_layout.setdefault(layout.attnums, []).append(layout.oid)
    branches = []
    for attnums, oids in by_layout.items():
        checks = [
            f"(pg_catalog.pg_identify_object_as_address(1259::pg_catalog.oid, TG_RELID, {n}::pg_catalog.int4))"
            f".object_names[3] {EQ} {ql(name)}::{TEXT}"  # 1259: pg_class, whose rows the columns are sub-objects of
            for name, n in zip(c.names, attnums, strict=True)
        ]
        listed = ", ".join(str(o) for o in sorted(oids))
        branches.append(f"WHEN TG_RELID {EQ} ANY ('{{{listed}}}'::pg_catalog.oid[]) THEN {' AND '.join(checks)}")
    return f"(CASE {' '.join(branches)} ELSE false END)" if branches else "false"


def _same_types(c: Captured, layouts: Sequence[Layout], row: str) -> str | None:
    """True while each key column whose text form is its type's own (``sql.key_text_typed``: a date, a bytea…) is of
    the type it had at install, read from ``row`` (a transition table's row, or NEW / OLD): the type the statement
    that names it will be planned with, whatever the writer's snapshot; None when no key needs it.  (A partition's
    columns are of its parent's types.)"""
    types = dict(zip(c.names, layouts[0].types, strict=True)) if layouts else {}
    typed = [
        f"pg_catalog.pg_typeof({row}.{qi(col)})::pg_catalog.oid {EQ} {types.get(col, 0)}::pg_catalog.oid"
        for col, t in zip(c.columns, c.types or ("text",) * len(c.columns), strict=True)
        if key_text_typed(t)
    ]
    return " AND ".join(typed) or None


def _typed(phase: str, c: Captured, layouts: Sequence[Layout], row: str, table: str | None = None) -> str:
    """Before a branch logs the keys of ``row`` (NEW / OLD), or of the rows of transition table ``table``: nothing
    when it is empty, one row with an empty key when a typed key is of another type now (see ``_same_types``)."""
    same = _same_types(c, layouts, row)
    if same is None:
        return ""
    value = f"(SELECT {same} FROM {table} AS {row} LIMIT 1)" if table else f"({same})"
    return (
        f"md_typed := {value};\n        IF md_typed IS NULL THEN RETURN NULL; END IF;\n"
        f"        IF NOT md_typed THEN {_log(phase, c, 'U', EMPTY)}; RETURN NULL; END IF;\n        "
    )


def _log(phase: str, c: Captured, op: str, select: str) -> str:
    return (
        f"INSERT INTO {qi(SCHEMA)}.changes (phase, source, key, op) "
        f"SELECT {ql(phase)}, {ql(c.name)}, k, {ql(op)} FROM ({select}) AS x(k)"
    )


def _same(a: str, b: str, columns: tuple[str, ...]) -> str:
    """``a.col IS NOT DISTINCT FROM b.col`` for every column, compared as text, with pg_catalog's ``=`` by name (NULL
    when only one side is NULL: only ever used where NULL counts as not the same)."""
    out = []
    for col in columns:
        x, y = f"{a}.{qi(col)}::{TEXT}", f"{b}.{qi(col)}::{TEXT}"
        out.append(f"({x} {EQ} {y} OR ({x} IS NULL AND {y} IS NULL))")
    return " AND ".join(out)


def _body(phase: str, c: Captured, layouts: Sequence[Layout], insert: str, update: str, delete: str) -> str:
    """A trigger function's body: a TRUNCATE's marker; one row with an empty key when a column it names is not the
    one it was (see ``_guard``); else what the statement's ``insert``, ``update`` or ``delete`` branch logs (each
    checks a typed key's type first: ``_typed``)."""
    return f"""    IF TG_OP {EQ} 'TRUNCATE' THEN
        {_log(phase, c, "T", EMPTY)};
    ELSIF {_guard(c, layouts)} IS NOT TRUE THEN
        {_log(phase, c, "U", EMPTY)};
    ELSIF TG_OP {EQ} 'INSERT' THEN
        {insert};
    ELSIF TG_OP {EQ} 'UPDATE' THEN
        {update};
    ELSE
        {delete};
    END IF;
    RETURN NULL;"""


def function_sql(phase: str, c: Captured, layouts: Sequence[Layout], *, level: str = "statement") -> str:
    """The trigger function that logs one table's changed keys, on the relations of ``layouts``; ``level="row"``
    builds the row-level equivalent (for the benchmark: scripts/bench_capture.py)."""
    n, o = qi(NEW), qi(OLD)
    if level == "statement":
        if c.watched is None:
            update = f"SELECT {_key('n', c)} FROM {n} AS n UNION SELECT {_key('o', c)} FROM {o} AS o"
        else:  # a lookup's table: only rows whose key or looked-up columns changed
            keep = (*c.columns, *c.watched)
            update = (
                f"SELECT {_key('n', c)} FROM {n} AS n WHERE NOT EXISTS (SELECT 1 FROM {o} AS o WHERE "
                f"{_same('o', 'n', keep)}) UNION SELECT {_key('o', c)} FROM {o} AS o WHERE NOT EXISTS "
                f"(SELECT 1 FROM {n} AS n WHERE {_same('n', 'o', keep)})"
            )
        body = _body(
            phase,
            c,
            layouts,
            _typed(phase, c, layouts, "r", n) + _log(phase, c, "I", f"SELECT {_key('n', c)} FROM {n} AS n"),
            _typed(phase, c, layouts, "r", n) + _log(phase, c, "U", update),
            _typed(phase, c, layouts, "r", o) + _log(phase, c, "D", f"SELECT {_key('o', c)} FROM {o} AS o"),
        )
    elif level == "row":
        new, old = _key("NEW", c), _key("OLD", c)
        changed = "true"
        if c.watched is not None:
            keep = (*c.columns, *c.watched)
            changed = f"({_same('NEW', 'OLD', keep)}) IS NOT TRUE"
        body = _body(
            phase,
            c,
            layouts,
            _typed(phase, c, layouts, "NEW") + _log(phase, c, "I", f"SELECT {new}"),
            _typed(phase, c, layouts, "NEW")
            + f"IF {changed} THEN {_log(phase, c, 'U', f'SELECT {new} UNION SELECT {old}')}; END IF",
            _typed(phase, c, layouts, "OLD") + _log(phase, c, "D", f"SELECT {old}"),
        )
    else:
        raise ValueError(f"level: {level!r}")
    return (
        f"CREATE OR REPLACE FUNCTION {function_name(phase, c.name)}() RETURNS trigger LANGUAGE plpgsql "
        f"SECURITY DEFINER AS $capture$\nDECLARE\n    md_typed boolean;\nBEGIN\n{body}\nEND\n$capture$"
    )


def install_sql(
    phase: str,
    c: Captured,
    layouts: Sequence[Layout],
    *,
    level: str = "statement",
    partitions: Sequence[str] = (),
) -> list[str]:
    """Every statement that turns capture on for one table of a phase (idempotent); a partitioned table's triggers
    go on each of its ``partitions`` (regclass text, every level) too, with the same function: a statement that names
    a partition fires that partition's statement-level triggers only.  ``layouts``: the table's and its partitions'
    (``LAYOUT_SQL``)."""
    fn = function_name(phase, c.name)
    out = [function_sql(phase, c, layouts, level=level), f"REVOKE ALL ON FUNCTION {fn}() FROM PUBLIC"]
    for table in (qname(c.table), *partitions):
        out += triggers_sql(phase, c, table, level=level)
    return out


def triggers_sql(phase: str, c: Captured, table: str, *, level: str = "statement") -> list[str]:
    """The triggers of one captured table of a phase on ``table`` (quoted: the table, or one of its partitions)."""
    fn = function_name(phase, c.name)
    out = [f"DROP TRIGGER IF EXISTS {qi(trigger_name(phase, c.name, e))} ON {table}" for e in EVENTS]
    for e, event in EVENTS.items():
        name = qi(trigger_name(phase, c.name, e))
        if level == "row" and e != "t":
            out.append(f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW EXECUTE FUNCTION {fn}()")
            continue
        ref = {
            "i": f" REFERENCING NEW TABLE AS {qi(NEW)}",
            "u": f" REFERENCING OLD TABLE AS {qi(OLD)} NEW TABLE AS {qi(NEW)}",
            "d": f" REFERENCING OLD TABLE AS {qi(OLD)}",
            "t": "",
        }[e]
        out.append(f"CREATE TRIGGER {name} AFTER {event} ON {table}{ref} FOR EACH STATEMENT EXECUTE FUNCTION {fn}()")
    enable = ", ".join(f"ENABLE ALWAYS TRIGGER {qi(trigger_name(phase, c.name, e))}" for e in EVENTS)
    out.append(f"ALTER TABLE {table} {enable}")
    return out


def remove_sql(phase: str, table: str, relation: str, *, exists: bool, others: Sequence[str] = ()) -> list[str]:
    """The statements that turn capture off for one table (``relation``: quoted) of a phase (idempotent);
    ``exists``: the table is there; ``others``: the other tables its triggers are on (its partitions, and tables
    that were)."""
    out = []
    for rel in ([relation] if exists else []) + list(others):
        out += [f"DROP TRIGGER IF EXISTS {qi(trigger_name(phase, table, e))} ON {rel}" for e in EVENTS]
    return out + [f"DROP FUNCTION IF EXISTS {function_name(phase, table)}()"]


# The partitions of a table at every level (a partition that is partitioned too, and its own; $1: quoted relation),
# and every table a function's triggers are on ($1: function).
PARTITIONS_SQL = """SELECT relid::regclass::text AS part FROM pg_partition_tree(to_regclass($1))
WHERE relid <> to_regclass($1) ORDER BY level, 1"""
TRIGGERED_SQL = """SELECT t.tgrelid::regclass::text AS rel, count(*) FILTER (WHERE t.tgenabled = 'A') AS enabled
FROM pg_trigger t WHERE t.tgfoid = to_regprocedure($1 || '()') AND t.tgrelid IS DISTINCT FROM to_regclass($2)
GROUP BY t.tgrelid ORDER BY 1"""


# Where each of a relation's columns ($2: names) is (NULL: not there) and of which type; $1: the relations (regclass
# text), whose order the rows keep.
LAYOUT_SQL = """SELECT to_regclass(r.rel)::oid::int8 AS oid,
       array_agg(a.attnum::int4 ORDER BY u.i) AS attnums, array_agg(a.atttypid::int8 ORDER BY u.i) AS types
FROM unnest($1::text[]) WITH ORDINALITY AS r(rel, o) CROSS JOIN unnest($2::text[]) WITH ORDINALITY AS u(name, i)
LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(r.rel) AND a.attname = u.name AND NOT a.attisdropped
GROUP BY r.rel, r.o ORDER BY r.o"""

# A digest of what DDL changes without firing a trigger ($1: quoted relation): every column of the table and of its
# partitions (number, name, type, typmod) and the file of each partition that has one (an ALTER TYPE, a VACUUM FULL
# or a TRUNCATE gives it another).
SHAPE_SQL = """WITH rel AS (SELECT to_regclass($1) AS relid UNION SELECT relid FROM pg_partition_tree(to_regclass($1)))
SELECT md5(string_agg(x, ',' ORDER BY x)) FROM (
    SELECT 'f' || c.oid::text || ':' || pg_relation_filenode(c.oid)::text AS x
    FROM rel JOIN pg_class c ON c.oid = rel.relid WHERE c.relkind = 'r'
    UNION ALL
    SELECT 'a' || a.attrelid::text || ':' || a.attnum || ':' || a.attname || ':' || a.atttypid || ':' || a.atttypmod
    FROM pg_attribute a WHERE a.attrelid IN (SELECT relid FROM rel) AND a.attnum > 0 AND NOT a.attisdropped) s"""

# Per captured table of a phase ($1): is it there, how many of its triggers are enabled, which columns its function
# names are not the ones they were at install (``missing``: gone, or another live column is where it was), and which
# are still there but elsewhere or of another type (``moved``: dropped and added again, retyped; capturing them again
# puts things right).  ``attnums`` and ``atttypes`` are in the order of ``columns || watched``; a registry written
# before they were recorded has no such columns (``triggers_ok_sql(recorded=False)``) or NULL in them.
_TRIGGERS_OK = f"""SELECT c.source, c.relation,
       to_regclass(c.relation) IS NOT NULL AS table_exists,
       (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = to_regclass(c.relation)
          AND t.tgfoid = to_regprocedure(c.function || '()') AND t.tgenabled = 'A') AS enabled,
       ARRAY(SELECT DISTINCT u.x FROM unnest(c.columns || COALESCE(c.watched, '{{}}')) WITH ORDINALITY AS u(x, i)
          WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = to_regclass(c.relation)
                            AND a.attname = u.x AND NOT a.attisdropped)
             OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = to_regclass(c.relation)
                        AND a.attnum = __ATTNUMS__[u.i] AND a.attname <> u.x AND NOT a.attisdropped)) AS missing,
       ARRAY(SELECT DISTINCT u.x FROM unnest(c.columns || COALESCE(c.watched, '{{}}')) WITH ORDINALITY AS u(x, i)
          JOIN pg_attribute a ON a.attrelid = to_regclass(c.relation) AND a.attname = u.x AND NOT a.attisdropped
          WHERE a.attnum <> __ATTNUMS__[u.i] OR a.atttypid <> __ATTTYPES__[u.i]) AS moved
FROM {SCHEMA}.capture AS c WHERE c.phase = $1 ORDER BY c.source"""


def triggers_ok_sql(recorded: bool) -> str:
    """``_TRIGGERS_OK`` for a registry that has (``recorded``) or has not the columns of the install's layout."""
    attnums, atttypes = ("c.attnums", "c.atttypes") if recorded else ("(NULL::int2[])", "(NULL::oid[])")
    return _TRIGGERS_OK.replace("__ATTNUMS__", attnums).replace("__ATTTYPES__", atttypes)


ROOT_SQL = """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = COALESCE(pg_partition_root(to_regclass($1)), to_regclass($1))"""
