"""Change capture between nights: triggers that log which rows of a phase's source tables change.

From the transaction that starts a phase (steps.Start) until its cutover, statement-level ``AFTER INSERT / UPDATE /
DELETE`` triggers with transition tables, on every source table of the phase and on every table one of its lookups
reads, write the keys of the rows each statement changed to ``migrate_data.changes`` in the SOURCE database, inside the
writer's own transaction: a write that rolls back leaves no log row, one that commits commits its log row with it.
Only keys are logged (the mapping's ``batch_by`` columns, plus the source columns its target key is a rename of; for a
lookup table its lookup key), never whole rows: ``sync.py`` re-derives every logged key from the current source rows.
An UPDATE logs the keys before and after it (both, when it changes a key).  A TRUNCATE logs one marker row.

Why capture cannot make an application write fail, and why nothing is caught:

- No privilege is needed: the trigger function is ``SECURITY DEFINER``, owned by the role that ran the phase (which
  owns the log).  ``EXECUTE`` is revoked from PUBLIC: a trigger function is not checked for the writer's ``EXECUTE``
  when it fires.  Nothing in its body is looked up through the writer's ``search_path``: the log is
  ``"migrate_data".changes``, every type is ``pg_catalog.``-qualified and every operator is
  ``OPERATOR(pg_catalog.=)`` (``IS [NOT] DISTINCT FROM`` is spelled out with it), so a writer's schema cannot put its
  own function, operator or type in the definer's way.  That is what a pinned ``SET search_path`` would ensure too,
  but a ``SET`` clause makes every call save and restore the setting: about 2.5 µs of the ~14 µs capture added to a
  one-row statement (BENCHMARKS.md).
- The log has nothing an insert could violate: no unique key (ids come from a sequence), no foreign key, no CHECK;
  a key becomes ``text[]`` with ``::text``, which every type has.  It is append-only for writers; sync deletes the
  rows it applied by id, so the writer and sync never wait for each other.
- The triggers are ``ENABLE ALWAYS``: a session with ``session_replication_role = replica`` is captured too.
- There is no ``EXCEPTION`` block.  Catching an error would have to swallow it (the change is lost and nobody
  knows until ``validate --deep``: the very failure capture exists to prevent) and would open a subtransaction per
  statement (past 64 in one transaction, every snapshot in the server gets slower).  What can still fail is what
  fails the writer's own statement anyway (disk full, out of memory, a cancel or timeout), and then the write and
  its log row roll back together: nothing is lost, nothing half-done.
- Installing and removing triggers takes a lock on the table for a moment (``SHARE ROW EXCLUSIVE`` to create,
  ``ACCESS EXCLUSIVE`` to drop); both run with a short ``lock_timeout`` and a few retries, so they never queue
  writers behind a long transaction for longer than that.

Capture needs the target key of a deleted source row, which the log does not keep: every target key column must be a
plain rename of a unique source column (no ``sql:``, ``map``, ``default``, cut or time zone).  For a phase where that
is not so, capture is not installed; the run says why, and ``sync`` refuses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import ledger
from .catalog import Table, read_table
from .compile import CompiledTable
from .db import Executor, open_pool, rowcount
from .errors import MigrationError
from .mapping import QualifiedName
from .preflight import Finding
from .settings import Settings
from .sql import qi, ql, qname

log = logging.getLogger(__name__)

SCHEMA = ledger.SCHEMA
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

    @property
    def name(self) -> str:
        """As the log's ``source`` says it: ``public.customers``."""
        return str(self.table)

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
    watched: dict[str, list[str] | None] = {}
    problems: list[tuple[str, str]] = []
    for ct in compiled:
        src = sources[str(ct.source)]
        feed, why = key_feed(ct, src)
        if why:
            problems.append((str(ct.target), why))
            continue
        name = str(src.qualified)
        names[name] = src.qualified
        cols = columns.setdefault(name, [])
        for col in (*ct.batch_by, *(feed or ())):
            if col not in cols:
                cols.append(col)
        watched[name] = None  # a source table: every UPDATE counts (a `sql:` or `where` may read any column)
        for _, lk in ct.lookups:
            table = lookups[str(lk.table)]
            lname = str(table.qualified)
            names[lname] = table.qualified
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
            names[rname] = table.qualified
            rcols = columns.setdefault(rname, [])
            rcols += [] if rcols else list(table.primary_key or next(iter(table.unique_keys), (table.columns[0].name,)))
            watched[rname] = None  # any column may be read
            read_by.append((str(ct.target), rname))
    tables = tuple(
        Captured(names[n], tuple(cols), None if watched[n] is None else tuple(watched[n] or ()))
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
EQ = "OPERATOR(pg_catalog.=)"


def _key(alias: str, columns: tuple[str, ...]) -> str:
    return "ARRAY[" + ", ".join(f"{alias}.{qi(c)}::{TEXT}" for c in columns) + "]"


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


def function_sql(phase: str, c: Captured, *, level: str = "statement") -> str:
    """The trigger function that logs one table's changed keys; ``level="row"`` builds the row-level equivalent
    (for the benchmark: scripts/bench_capture.py)."""
    n, o = qi(NEW), qi(OLD)
    if level == "statement":
        if c.watched is None:
            update = f"SELECT {_key('n', c.columns)} FROM {n} AS n UNION SELECT {_key('o', c.columns)} FROM {o} AS o"
        else:  # a lookup's table: only rows whose key or looked-up columns changed
            keep = (*c.columns, *c.watched)
            update = (
                f"SELECT {_key('n', c.columns)} FROM {n} AS n WHERE NOT EXISTS (SELECT 1 FROM {o} AS o WHERE "
                f"{_same('o', 'n', keep)}) UNION SELECT {_key('o', c.columns)} FROM {o} AS o WHERE NOT EXISTS "
                f"(SELECT 1 FROM {n} AS n WHERE {_same('n', 'o', keep)})"
            )
        body = f"""    IF TG_OP {EQ} 'INSERT' THEN
        {_log(phase, c, "I", f"SELECT {_key('n', c.columns)} FROM {n} AS n")};
    ELSIF TG_OP {EQ} 'UPDATE' THEN
        {_log(phase, c, "U", update)};
    ELSIF TG_OP {EQ} 'DELETE' THEN
        {_log(phase, c, "D", f"SELECT {_key('o', c.columns)} FROM {o} AS o")};
    ELSE
        {_log(phase, c, "T", f"SELECT '{{}}'::{TEXT}[]")};
    END IF;
    RETURN NULL;"""
    elif level == "row":
        new, old = _key("NEW", c.columns), _key("OLD", c.columns)
        changed = "true"
        if c.watched is not None:
            keep = (*c.columns, *c.watched)
            changed = f"({_same('NEW', 'OLD', keep)}) IS NOT TRUE"
        body = f"""    IF TG_OP {EQ} 'INSERT' THEN
        {_log(phase, c, "I", f"SELECT {new}")};
    ELSIF TG_OP {EQ} 'UPDATE' THEN
        IF {changed} THEN
            {_log(phase, c, "U", f"SELECT {new} UNION SELECT {old}")};
        END IF;
    ELSIF TG_OP {EQ} 'DELETE' THEN
        {_log(phase, c, "D", f"SELECT {old}")};
    ELSE
        {_log(phase, c, "T", f"SELECT '{{}}'::{TEXT}[]")};
    END IF;
    RETURN NULL;"""
    else:
        raise ValueError(f"level: {level!r}")
    return (
        f"CREATE OR REPLACE FUNCTION {function_name(phase, c.name)}() RETURNS trigger LANGUAGE plpgsql "
        f"SECURITY DEFINER AS $capture$\nBEGIN\n{body}\nEND\n$capture$"
    )


def install_sql(phase: str, c: Captured, *, level: str = "statement", leaves: Sequence[str] = ()) -> list[str]:
    """Every statement that turns capture on for one table of a phase (idempotent); a partitioned table's triggers
    go on each of its ``leaves`` (regclass text) too, with the same function: a statement that names a partition
    fires that partition's statement-level triggers only."""
    fn = function_name(phase, c.name)
    out = [function_sql(phase, c, level=level), f"REVOKE ALL ON FUNCTION {fn}() FROM PUBLIC"]
    for table in (qname(c.table), *leaves):
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


# The leaf partitions of a table ($1: quoted relation), and every table a function's triggers are on ($1: function).
LEAVES_SQL = """SELECT relid::regclass::text AS leaf FROM pg_partition_tree(to_regclass($1))
WHERE isleaf AND relid <> to_regclass($1) ORDER BY 1"""
TRIGGERED_SQL = """SELECT t.tgrelid::regclass::text AS rel, count(*) FILTER (WHERE t.tgenabled = 'A') AS enabled
FROM pg_trigger t WHERE t.tgfoid = to_regprocedure($1 || '()') AND t.tgrelid IS DISTINCT FROM to_regclass($2)
GROUP BY t.tgrelid ORDER BY 1"""


async def leaves(db: Executor, relation: str) -> list[str]:
    """The leaf partitions of ``relation`` (none for a plain table), as regclass text."""
    if not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", relation):
        return []
    return [r["leaf"] for r in await db.fetch(LEAVES_SQL, relation)]


async def partition_problem(db: Executor, phase: str, name: str, relation: str) -> str | None:
    """Why the triggers of a captured partitioned table are not on exactly its leaves (one attached since has none,
    one detached still has them: its rows came or went without a write), or None."""
    want = set(await leaves(db, relation))
    have = {r["rel"]: r["enabled"] for r in await db.fetch(TRIGGERED_SQL, function_name(phase, name), relation)}
    missing = sorted(x for x in want if have.get(x) != len(EVENTS))
    stale = sorted(set(have) - want)
    parts = [f"partition {', '.join(missing)} of {name} has no capture (attached since?)"] if missing else []
    parts += [f"{', '.join(stale)} is no longer a partition of {name} (detached?)"] if stale else []
    return "; ".join(parts) or None


TRIGGERS_OK_SQL = f"""SELECT c.source, c.relation,
       to_regclass(c.relation) IS NOT NULL AS table_exists,
       (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = to_regclass(c.relation)
          AND t.tgfoid = to_regprocedure(c.function || '()') AND t.tgenabled = 'A') AS enabled
FROM {SCHEMA}.capture AS c WHERE c.phase = $1 ORDER BY c.source"""


# -- install / remove ---------------------------------------------------------------------------------------------
# The table a relation the planner scans belongs to: itself, or the root of the partitioned table it is a leaf of.
ROOT_SQL = """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = COALESCE(pg_partition_root(to_regclass($1)), to_regclass($1))"""


async def _reads(db: Executor, ct: CompiledTable) -> list[Table]:
    """The tables other than its source (and leaves) and lookups that a ``sql:`` column or the ``where`` of ``ct``
    reads, from the planner (a function's body is not seen)."""
    if not ct.mapping.where and not any(c.spec.kind == "sql" for c in ct.columns):
        return []
    where = f" WHERE ({ct.mapping.where})" if ct.mapping.where else ""
    query = f"SELECT {', '.join(c.pre_cast for c in ct.columns)} FROM {ct.whole.from_}{where}"
    plan = json.loads(await db.fetchval(f"EXPLAIN (VERBOSE, FORMAT JSON) {query}"))
    skip = {str(ct.source)}
    for _, lk in ct.lookups:
        lt = await read_table(db, lk.table)
        skip |= {str(lt.qualified)} if lt is not None else set()
    out: list[Table] = []
    for relation in sorted(plan_relations(plan)):
        root = await db.fetchrow(ROOT_SQL, qname(QualifiedName(relation[1], relation[0] or None)))
        if root is None or root["nspname"] in ("pg_catalog", "information_schema"):
            continue
        t = await read_table(db, QualifiedName(root["relname"], root["nspname"]))
        if t is not None and str(t.qualified) not in skip | {str(x.qualified) for x in out}:
            out.append(t)
    return out


async def _relations(db: Executor, compiled: Sequence[CompiledTable]) -> tuple[dict[str, Table], dict[str, Table]]:
    sources: dict[str, Table] = {}
    lookups: dict[str, Table] = {}
    for ct in compiled:
        t = await read_table(db, ct.source)
        if t is None:
            raise MigrationError(f"source table {ct.source} does not exist")
        sources[str(ct.source)] = t
        for _, lk in ct.lookups:
            lt = await read_table(db, lk.table)
            if lt is None:
                raise MigrationError(f"lookup table {lk.table} does not exist")
            lookups[str(lk.table)] = lt
    return sources, lookups


async def capture_plan(db: Executor, phase: str, compiled: Sequence[CompiledTable]) -> CapturePlan:
    """What ``phase`` captures, against the live source catalogs."""
    sources, lookups = await _relations(db, compiled)
    reads = {str(ct.target): await _reads(db, ct) for ct in compiled}
    return plan_capture(phase, compiled, sources, lookups, reads)


def _findings(plan: CapturePlan) -> tuple[Finding, ...]:
    return tuple(
        Finding(
            "warning",
            target,
            f"changes to the source between the copy and the cutover cannot be captured: {why}; `sync` and "
            "`cutover` will refuse this phase",
        )
        for target, why in plan.problems
    )


async def check(db: Executor, phase: str, tables: Sequence[tuple[CompiledTable, Any]]) -> tuple[Finding, ...]:
    """What ``plan`` says about capture: a warning per table whose changes cannot be captured.  Writes nothing."""
    compiled = [ct for ct, _ in tables]
    return _findings(await capture_plan(db, phase, compiled)) if compiled else ()


async def install(
    db: Executor,
    phase: str,
    tables: Sequence[tuple[CompiledTable, Any]],
    *,
    wait: str = LOCK_WAIT,
    retries: int = LOCK_RETRIES,
) -> tuple[Finding, ...]:
    """Turn capture on for ``phase`` in the source database ``db``: a connection inside the transaction that starts
    the phase (one database), or the source's pool (its own transaction, committed before the phase starts).
    Idempotent: a table whose triggers are in place is left alone.  Returns the warnings of a phase that cannot be
    captured (then nothing is installed)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            return await install(conn, phase, tables, wait=wait, retries=retries)
    compiled = [ct for ct, _ in tables]
    if not compiled:
        return ()
    plan = await capture_plan(db, phase, compiled)
    if not plan.ok:
        for target, why in plan.problems:
            log.warning("%s: no change capture: %s", target, why)
        return _findings(plan)
    await ledger.ensure_capture(db)
    have = {r["source"]: r for r in await db.fetch(f"SELECT * FROM {SCHEMA}.capture WHERE phase = $1", phase)}
    ok = {r["source"] for r in await db.fetch(TRIGGERS_OK_SQL, phase) if r["enabled"] == len(EVENTS)}
    for c in plan.tables:
        r = have.get(c.name)
        if (
            r is not None
            and c.name in ok
            and await partition_problem(db, phase, c.name, c.relation) is None
            and tuple(r["columns"]) == c.columns
            and (None if r["watched"] is None else tuple(r["watched"])) == c.watched
        ):
            continue
        statements = install_sql(phase, c, leaves=await leaves(db, c.relation))
        await _with_short_locks(db, f"turn on change capture on {c.name}", statements, wait, retries)
        await db.execute(
            f"""INSERT INTO {SCHEMA}.capture (phase, source, relation, columns, watched, function)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT (phase, source) DO UPDATE SET relation = EXCLUDED.relation, columns = EXCLUDED.columns,
                    watched = EXCLUDED.watched, function = EXCLUDED.function, installed_at = clock_timestamp()""",
            phase,
            c.name,
            c.relation,
            list(c.columns),
            None if c.watched is None else list(c.watched),
            function_name(phase, c.name),
        )
        log.info("%s: change capture on for %s (key %s)", phase, c.name, ", ".join(c.columns))
    for gone in set(have) - {c.name for c in plan.tables}:  # the mapping no longer reads it
        await _remove_table(db, phase, gone, have[gone]["relation"], wait, retries)
    return ()


async def _remove_table(
    conn: asyncpg.Connection, phase: str, table: str, relation: str, wait: str, retries: int
) -> None:
    exists = bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", relation))
    others = [r["rel"] for r in await conn.fetch(TRIGGERED_SQL, function_name(phase, table), relation)]
    statements = remove_sql(phase, table, relation, exists=exists, others=others)
    await _with_short_locks(conn, f"turn off change capture on {table}", statements, wait, retries)
    await conn.execute(f"DELETE FROM {SCHEMA}.capture WHERE phase = $1 AND source = $2", phase, table)


async def remove(
    settings: Settings,
    target: asyncpg.Pool,
    phase: str,
    *,
    lock: ledger.LockSession | None = None,
    keep_log: bool = False,
    wait: str = LOCK_WAIT,
    retries: int = LOCK_RETRIES,
) -> int:
    """Turn capture off for ``phase`` in the source database (one transaction; in one database it commits only while
    ``lock`` is held).  Idempotent.  Its change log is forgotten (a rollback), or with ``keep_log`` (a cutover) kept:
    a row still there was logged after the cutover's last sync, a write nobody applied, which is never deleted.
    Returns the number of log rows dropped, or with ``keep_log`` kept."""
    if settings.same_database:
        return await _remove(target, phase, lock, wait, retries, keep_log)
    async with open_pool(settings.effective_source_url, max_size=1, lock_timeout=settings.lock_timeout) as source:
        return await _remove(source, phase, None, wait, retries, keep_log)


async def _remove(
    db: asyncpg.Pool, phase: str, lock: ledger.LockSession | None, wait: str, retries: int, keep_log: bool
) -> int:
    async with db.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.capture"):
            return 0
        rows = await conn.fetch(f"SELECT source, relation FROM {SCHEMA}.capture WHERE phase = $1 FOR UPDATE", phase)
        for r in rows:
            await _remove_table(conn, phase, r["source"], r["relation"], wait, retries)
        if keep_log:  # the triggers are gone (their locks waited for the writers in flight): the log is complete
            n = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.changes WHERE phase = $1", phase)
        else:
            n = rowcount(await conn.execute(f"DELETE FROM {SCHEMA}.changes WHERE phase = $1", phase))
        if lock is not None:
            await lock.check(conn)
    if keep_log and n:
        log.warning("%s: change capture off; %d changes logged after the cutover's last sync are kept", phase, n)
    else:
        log.info("%s: change capture off, %d logged changes %s", phase, n, "kept" if keep_log else "dropped")
    return int(n)


async def _with_short_locks(
    conn: asyncpg.Connection, what: str, statements: list[str], wait: str, retries: int
) -> None:
    """Run DDL that locks a busy table in a savepoint with a short lock_timeout, retried a few times: a writer's long
    transaction makes it wait at most ``wait`` per attempt (and the writers queued behind it as long), never longer."""
    old = await conn.fetchval("SELECT current_setting('lock_timeout')")
    try:
        for attempt in range(retries + 1):
            try:
                async with conn.transaction():
                    await conn.execute("SELECT set_config('lock_timeout', $1, true)", wait)
                    for sql in statements:
                        await conn.execute(sql)
                return
            except asyncpg.LockNotAvailableError as e:
                if attempt == retries:
                    raise MigrationError(
                        f"could not {what}: a transaction kept the table locked through {retries + 1} attempts of "
                        f"{wait} each",
                        detail=str(e),
                        hint="find the long transaction (pg_stat_activity, pg_locks) and end it or wait for it, then "
                        "run the same command again",
                    ) from e
                log.info("%s: the table is busy (%s); trying again", what, e)
                await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
    finally:
        if conn.is_in_transaction():
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", old)


# -- what status shows --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptureState:
    phase: str
    state: str  # "on" | "off" | "BROKEN" (a trigger missing or disabled) | "tables dropped"
    waiting: int = 0  # changes logged and not applied yet
    oldest_seconds: float | None = None  # age of the oldest of them
    tables: tuple[str, ...] = ()
    problem: str | None = None


async def state(db: Executor, phase: str) -> CaptureState:
    """Is capture on for ``phase`` (every trigger in place and enabled), and how far behind is sync."""
    if not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.capture"):
        return CaptureState(phase, "off")
    rows = await db.fetch(TRIGGERS_OK_SQL, phase)
    lag = await db.fetchrow(
        f"SELECT count(*) AS n, extract(epoch FROM clock_timestamp() - min(at))::float8 AS age "
        f"FROM {SCHEMA}.changes WHERE phase = $1",
        phase,
    )
    waiting, age = (lag["n"], lag["age"]) if lag is not None else (0, None)
    tables = tuple(r["source"] for r in rows)
    if not rows:
        return CaptureState(phase, "off", waiting, age)
    if not any(r["table_exists"] for r in rows):
        return CaptureState(phase, "tables dropped", waiting, age, tables)
    bad = [r["source"] for r in rows if r["enabled"] != len(EVENTS)]
    if bad:
        why = f"triggers missing or disabled on {', '.join(bad)}"
        return CaptureState(phase, "BROKEN", waiting, age, tables, why)
    for r in rows:
        problem = await partition_problem(db, phase, r["source"], r["relation"])
        if problem:
            return CaptureState(phase, "BROKEN", waiting, age, tables, problem)
    return CaptureState(phase, "on", waiting, age, tables)


async def registry(db: Executor, phase: str) -> dict[str, tuple[str, ...]]:
    """The captured tables of ``phase`` and the columns their log rows carry, as installed."""
    if not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.capture"):
        return {}
    return {
        r["source"]: tuple(r["columns"])
        for r in await db.fetch(f"SELECT source, columns FROM {SCHEMA}.capture WHERE phase = $1", phase)
    }


async def relations(db: Executor, phase: str) -> dict[str, str]:
    """The captured tables of ``phase``: name -> quoted relation."""
    if not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.capture"):
        return {}
    rows = await db.fetch(f"SELECT source, relation FROM {SCHEMA}.capture WHERE phase = $1", phase)
    return {r["source"]: r["relation"] for r in rows}
