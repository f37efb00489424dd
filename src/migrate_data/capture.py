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
  a key becomes ``text[]`` with ``sql.key_text`` (``::text``, or JSON's ISO form of a date or time), which every
  type has, written the same way whatever the writer's ``DateStyle`` or ``TimeZone``.  It is append-only for
  writers; sync deletes the rows it applied by id, so the writer and sync never wait for each other.
- The triggers are ``ENABLE ALWAYS``: a session with ``session_replication_role = replica`` is captured too.
- A column the function names (a key, a lookup's column) that was renamed or dropped since capture started would
  make the statement naming it fail, and so would a key of another type where its text form calls a function of
  its type (``encode`` of a bytea); a column that took its name (renames in one transaction) would log another
  column's values as keys.  So each call first checks that every column it names is still the one it was: under its
  name at its attribute number (in the catalog as it is now, from the system cache), and of its type where that
  matters (in the rows the statement changed: see ``capture_sql._guard`` and ``_typed``); if not, it logs one row
  with an empty key ("some row of this table changed"), and sync re-derives every row that reads the table.  The
  registry keeps where the columns were and their types: ``status`` shows a column renamed away or replaced as
  ``COLUMN GONE`` (``sync`` refuses until it is back), one dropped and added again or retyped as ``COLUMN MOVED``
  (``sync`` installs capture again where it is now).
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

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import blocking, ledger
from .capture_sql import (
    EVENTS,
    LAYOUT_SQL,
    LOCK_RETRIES,
    LOCK_WAIT,
    ROOT_SQL,
    SCHEMA,
    SHAPE_SQL,
    TRIGGERED_SQL,
    Captured,
    CapturePlan,
    Layout,
    function_name,
    install_sql,
    plan_capture,
    plan_relations,
    remove_sql,
)
from .capture_state import partition_problem, partitions, triggers_ok
from .catalog import Table, read_table
from .compile import CompiledTable
from .db import Executor, open_pool, rowcount
from .errors import MigrationError
from .mapping import QualifiedName
from .preflight import Finding
from .settings import Settings
from .sql import qname

log = logging.getLogger(__name__)


# -- install / remove ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Installing:
    """What turns capture on for one table: the statements, and where the columns the function names are in the
    table and of which type (in ``columns + watched`` order, as the registry keeps them)."""

    statements: list[str]
    attnums: list[int]
    types: list[int]
    shape: str  # capture_sql.SHAPE_SQL
    relations: tuple[str, ...] = ()  # what the statements lock: the table and each of its partitions


async def install_statements(db: Executor, phase: str, c: Captured, *, level: str = "statement") -> Installing:
    """The statements that turn capture on for ``c``: its function knows where the table and each of its partitions
    (at every level: a statement fires the triggers of the table it names only) hold the columns it names.
    ``level``: see ``capture_sql.function_sql``."""
    parts = await partitions(db, c.relation)
    rows = await db.fetch(LAYOUT_SQL, [c.relation, *parts], list(c.names))
    layouts = [
        Layout(r["oid"], tuple(r["attnums"]), tuple(r["types"]))
        for r in rows
        if r["oid"] is not None and None not in r["attnums"]
    ]
    if not layouts or layouts[0].oid != rows[0]["oid"]:
        raise MigrationError(f"{c.name} does not have the columns {', '.join(c.names)} that change capture logs")
    at = dict(zip(c.names, zip(layouts[0].attnums, layouts[0].types, strict=True), strict=True))
    order = [at[x] for x in (*c.columns, *(c.watched or ()))]
    return Installing(
        install_sql(phase, c, layouts, level=level, partitions=parts),
        [n for n, _ in order],
        [t for _, t in order],
        await db.fetchval(SHAPE_SQL, c.relation),
        (c.relation, *parts),
    )


# The table a relation the planner scans belongs to: itself, or the root of the partitioned table it is a leaf of.


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
    only: str | None = None,
) -> tuple[Finding, ...]:
    """Turn capture on for ``phase`` in the source database ``db``: a connection inside the transaction that starts
    the phase (one database), or the source's pool (its own transaction, committed before the phase starts).
    Idempotent: a table whose capture is in place is left alone; one whose capture was on another way (a column
    moved, a partition attached, a trigger dropped, an older release) is captured again, and one row with an empty
    key logged for it, so that sync re-derives what the old capture missed.  Returns the warnings of a phase that
    cannot be captured (then nothing is installed)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            return await install(conn, phase, tables, wait=wait, retries=retries, only=only)
    compiled = [ct for ct, _ in tables]
    if not compiled:
        return ()
    plan = await capture_plan(db, phase, compiled)
    if not plan.ok:
        for target, why in plan.problems:
            log.warning("%s: no change capture: %s", target, why)
        return _findings(plan)
    await ledger.ensure_capture(db)
    have = {  # named, not *: a `SELECT *` prepared before ensure_capture added columns would fail in this transaction
        r["source"]: r
        for r in await db.fetch(
            f"SELECT source, relation, columns, watched, function, attnums, atttypes, shape FROM {SCHEMA}.capture "
            "WHERE phase = $1",
            phase,
        )
    }
    ok = {r["source"] for r in await triggers_ok(db, phase) if r["enabled"] == len(EVENTS)}
    todo = [
        (c, t)
        for c in plan.tables
        if only in (None, c.name) and (t := await _outdated(db, phase, c, have.get(c.name), ok)) is not None
    ]
    gone = sorted(set(have) - {c.name for c in plan.tables}) if only is None else []  # the mapping no longer reads it
    statements, relations = await _removal(db, phase, [(g, have[g]["relation"]) for g in gone])
    statements = [s for _, t in todo for s in t.statements] + statements
    relations = [r for _, t in todo for r in t.relations] + relations
    if statements:  # every table in each short-lock try: one that cannot be locked lets go of the others
        on = f"turn on change capture on {', '.join(c.name for c, _ in todo)}" if todo else ""
        off = f"turn off change capture on {', '.join(gone)}" if gone else ""
        what = " and ".join(filter(None, (on, off)))
        await blocking.ddl_with_short_locks(db, what, statements, wait, retries, relations=relations)
    for c, t in todo:
        await _record(db, phase, c, t, again=c.name in have)
        log.info("%s: change capture on for %s (key %s)", phase, c.name, ", ".join(c.columns))
    for g in gone:
        await db.execute(f"DELETE FROM {SCHEMA}.capture WHERE phase = $1 AND source = $2", phase, g)
    return ()


async def install_again(
    pool: asyncpg.Pool,
    phase: str,
    tables: Sequence[tuple[CompiledTable, Any]],
    names: Sequence[str],
    *,
    wait: str = LOCK_WAIT,
    retries: int = LOCK_RETRIES,
) -> None:
    """Capture installed again on the tables ``names`` of ``phase`` (``outdated``), each in a transaction of its own:
    a busy table's lock is waited for without holding another's."""
    for name in names:
        await install(pool, phase, tables, wait=wait, retries=retries, only=name)


async def _record(db: Executor, phase: str, c: Captured, todo: Installing, *, again: bool) -> None:
    """The registry row of ``c`` as just installed; ``again``: capture was on another way, so one row with an empty
    key is logged, and sync re-derives what the old capture missed or logged without keys."""
    await db.execute(
        f"""INSERT INTO {SCHEMA}.capture (phase, source, relation, columns, watched, function, attnums, atttypes,
                shape)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT (phase, source) DO UPDATE SET relation = EXCLUDED.relation, columns = EXCLUDED.columns,
                watched = EXCLUDED.watched, function = EXCLUDED.function, attnums = EXCLUDED.attnums,
                atttypes = EXCLUDED.atttypes, shape = EXCLUDED.shape, installed_at = clock_timestamp()""",
        phase,
        c.name,
        c.relation,
        list(c.columns),
        None if c.watched is None else list(c.watched),
        function_name(phase, c.name),
        todo.attnums,
        todo.types,
        todo.shape,
    )
    if again:
        await db.execute(
            f"INSERT INTO {SCHEMA}.changes (phase, source, key, op) VALUES ($1, $2, '{{}}', 'U')", phase, c.name
        )


async def _outdated(db: Executor, phase: str, c: Captured, r: Any, ok: set[str]) -> Installing | None:
    """What installs capture on ``c`` again, or None when it is on as this release would install it now: its
    triggers on the table and on every partition, its registry row (``r``) and its function written for the
    columns where they are now (``ok``: the tables whose triggers are all enabled)."""
    todo = await install_statements(db, phase, c)
    if (
        r is not None
        and c.name in ok
        and await partition_problem(db, phase, c.name, c.relation) is None
        and tuple(r["columns"]) == c.columns
        and (None if r["watched"] is None else tuple(r["watched"])) == c.watched
        and r.get("shape") == todo.shape  # DDL since (columns moved, retyped, rewritten): it fired no trigger; NULL or
        # absent: a release whose triggers checked names only
        and await db.fetchval("SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure($1 || '()')", r["function"])
        == todo.statements[0].split("$capture$")[1]  # the body: it knows each partition's column numbers
    ):
        return None
    return todo


async def outdated(db: Executor, phase: str, tables: Sequence[tuple[CompiledTable, Any]]) -> list[str]:
    """The tables of ``phase`` whose capture, as installed (the registry's columns, whatever the mapping says now),
    is not what this release would install for them now: a column moved or retyped, a partition attached again, a
    trigger gone.  Read-only."""
    plan = await capture_plan(db, phase, [ct for ct, _ in tables])
    if not plan.ok or not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.capture"):
        return []
    have = {r["source"]: r for r in await db.fetch(f"SELECT * FROM {SCHEMA}.capture WHERE phase = $1", phase)}
    ok = {r["source"] for r in await triggers_ok(db, phase) if r["enabled"] == len(EVENTS)}
    out = []
    for c in plan.tables:
        r, live = have.get(c.name), await read_table(db, c.table)
        if r is None or live is None:
            out += [c.name]
            continue
        columns, watched = tuple(r["columns"]), None if r["watched"] is None else tuple(r["watched"])
        if any(live.column(x) is None for x in (*columns, *(watched or ()))):
            continue  # a column gone: not a matter of installing again (status says COLUMN GONE)
        types = tuple(live.column(x).key_type for x in columns)  # type: ignore[union-attr]
        if await _outdated(db, phase, Captured(c.table, columns, watched, types), r, ok) is not None:
            out.append(c.name)
    return out


async def _removal(db: Executor, phase: str, tables: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The statements that turn capture off for these tables of ``phase`` ((table, quoted relation)), wherever their
    triggers are now, and the relations they lock."""
    statements: list[str] = []
    relations: list[str] = []
    for table, relation in tables:
        exists = bool(await db.fetchval("SELECT to_regclass($1) IS NOT NULL", relation))
        others = [r["rel"] for r in await db.fetch(TRIGGERED_SQL, function_name(phase, table), relation)]
        statements += remove_sql(phase, table, relation, exists=exists, others=others)
        relations += [relation] * exists + others
    return statements, relations


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
    """Turn capture off for ``phase`` in the source database: every table's triggers, the registry and the log in
    one transaction (in one database it commits only while ``lock`` is held), so an application transaction is
    logged whole or not at all, and a kill leaves capture all on.  All the tables' DDL goes in each short-lock try
    (``blocking.ddl_with_short_locks``): a try that cannot lock one table lets go of the others too, so no table is
    held longer than one try while another is waited for.  Idempotent.  The log is forgotten (a rollback), or with
    ``keep_log`` (a cutover) kept: a row still there was logged after the cutover's last sync, a write nobody
    applied, which is never deleted.  Returns the number of log rows dropped, or with ``keep_log`` kept."""
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
        rows = await conn.fetch(
            f"SELECT source, relation FROM {SCHEMA}.capture WHERE phase = $1 ORDER BY source FOR UPDATE", phase
        )
        statements, relations = await _removal(conn, phase, [(r["source"], r["relation"]) for r in rows])
        if statements:
            what = f"turn off change capture on {', '.join(r['source'] for r in rows)}"
            await blocking.ddl_with_short_locks(conn, what, statements, wait, retries, relations=relations)
        await conn.execute(f"DELETE FROM {SCHEMA}.capture WHERE phase = $1", phase)
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
