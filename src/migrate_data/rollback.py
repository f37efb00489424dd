"""Undo a phase: remove exactly what it wrote, downgrade its revision, restore what it dropped.

The steps run in the reverse order of the phase's own (copy, schema, backup), each idempotent, and the ledger says
``rolled_back`` only once the data is back: a rollback killed at any point finishes when run again.

1. inspect (no writes): per target table, the rows the phase wrote and nobody changed since, the rows that were there
   before it, and someone else's (see ``undo.py``); the tables the revision's downgrade would drop, found by running
   it in a transaction that is rolled back.  Someone else's rows, and any row of a table the downgrade drops that
   the phase did not write, make the rollback refuse unless ``force``, which saves every such row to a file first;
2. ``rolling_back`` is recorded: from now on the phase cannot be run, only rolled back;
3. delete, children first, in batches of one transaction each;
4. sequences back to their values before the phase;
5. the schema downgrade (Alembic), in one transaction with the ledger when nothing is left to restore;
6. the dropped tables' rows restored from the phase's backup (pg_restore in one transaction), checked against the
   row counts recorded when they were dropped; then ``rolled_back``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from . import backup as backups
from . import capture, dependents, ledger, schema, undo
from .catalog import Table, parents_first, read_table
from .db import fetch_all, fetch_one, fetch_val, rowcount
from .errors import MigrationError, RefusedError, Stopped
from .files import open_private, private_dir
from .mapping import Phase, QualifiedName
from .settings import Settings
from .sql import qname

log = logging.getLogger(__name__)
SAMPLE = 10  # keys named per table in a refusal


@dataclass(frozen=True)
class TableUndo:
    """What a rollback finds in one table before it writes anything."""

    table: str
    qualified: QualifiedName
    ours: int  # written by the phase, unchanged since: deleted
    before: int  # there before the phase: kept
    others: int  # written or changed by someone else since the phase started: refused, or saved and deleted
    dropped: bool = False  # the downgrade drops this table: every row not ours is at risk
    at_risk_keys: tuple[tuple[str, ...], ...] = ()

    @property
    def at_risk(self) -> int:
        return self.others + (self.before if self.dropped else 0)


@dataclass(frozen=True)
class RollbackPlan:
    phase: str
    tables: tuple[TableUndo, ...]  # children first: the order of the deletes
    downgrade_to: str | None
    restore: tuple[str, ...]  # tables restored from the phase's backup

    @property
    def at_risk(self) -> list[TableUndo]:
        return [t for t in self.tables if t.at_risk]

    def refusal(self) -> RefusedError:
        what = ", ".join(f"{t.table}: {t.at_risk:,} rows" for t in self.at_risk)
        lines = []
        for t in self.at_risk:
            why = (
                "in a table the downgrade drops" if t.dropped else "written or changed by someone else since the phase"
            )
            keys = "; ".join(", ".join(k) for k in t.at_risk_keys)
            lines.append(f"{t.table}: {t.at_risk:,} rows {why} (first keys: {keys})")
        return RefusedError(
            f"the tables of {self.phase} hold rows the phase did not write, or that were changed after it wrote them "
            f"({what}); a rollback would lose them",
            detail="\n".join(lines),
            hint="pass --force to save them to a file under backups/ and roll back anyway; nothing was changed",
        )


@dataclass(frozen=True)
class RollbackResult:
    phase: str
    deleted: dict[str, int]
    foreign_rows_dump: str | None
    downgraded_to: str | None
    restored: tuple[str, ...]
    seconds: float
    kept: dict[str, int] = field(default_factory=dict)  # rows that were there before the phase, untouched
    plan: RollbackPlan | None = None
    dry_run: bool = False


async def inspect(settings: Settings, phase: Phase, st: asyncpg.Record, target: asyncpg.Pool) -> RollbackPlan:
    """What a rollback of ``phase`` would delete, keep and refuse; writes nothing."""
    snapshot = st["started_snapshot"]
    downgrade_to = None
    if phase.revision and await schema.current_revision(target) == phase.revision:
        downgrade_to = schema.predecessor(settings, phase.revision)
    dropped = await _dropped_by_downgrade(settings, target, downgrade_to) if downgrade_to else set()
    tables: list[Table] = [t for t in [await read_table(target, tm.target) for tm in phase.tables] if t is not None]
    names = {str(t.qualified) for t in tables}
    for qn in sorted(dropped, key=str):  # tables the downgrade drops that the phase does not copy into
        if str(qn) not in names and (t := await read_table(target, qn)) is not None:
            tables.append(t)
    out: list[TableUndo] = []
    for t in reversed(parents_first(tables)):  # children first
        name = str(t.qualified)
        args = [phase.name, name, snapshot]
        row = await fetch_one(target, undo.count_sql(t.qualified), *args)
        assert row is not None
        is_dropped = t.qualified in dropped
        which = "not_ours" if is_dropped else "others"
        keys: tuple[tuple[str, ...], ...] = ()
        if row["others"] or (is_dropped and row["before"]):
            key = t.primary_key or (t.unique_keys[0] if t.unique_keys else ())
            keys = tuple(
                tuple(r["key"])
                for r in await fetch_all(target, undo.sample_sql(t.qualified, key, which), *args, SAMPLE)
            )
        out.append(TableUndo(name, t.qualified, row["ours"], row["before"], row["others"], is_dropped, keys))
    restore = tuple(str(t) for t in phase.backup)
    return RollbackPlan(phase.name, tuple(out), downgrade_to, restore)


async def _dropped_by_downgrade(settings: Settings, target: asyncpg.Pool, to: str) -> set[QualifiedName]:
    """The tables the downgrade to ``to`` drops: it runs in a transaction that is rolled back."""
    before = {QualifiedName(r["name"], r["schema"]) for r in await fetch_all(target, undo.user_tables_sql())}
    async with schema.schema_transaction(settings, target, downgrade_to=to, commit=False) as conn:
        after = {QualifiedName(r["name"], r["schema"]) for r in await conn.fetch(undo.user_tables_sql())}
    return before - after


async def execute(
    settings: Settings,
    phase: Phase,
    st: asyncpg.Record,
    plan: RollbackPlan,
    target: asyncpg.Pool,
    *,
    lock: ledger.LockSession,
    force: bool,
    batch_size: int,
    stop: asyncio.Event,
) -> RollbackResult:
    """Carry out a rollback ``plan`` (already checked: nothing at risk, or ``force``).  Every transaction commits
    only while ``lock`` is held; a lost lock stops the rollback, and the same command finishes it."""
    name = phase.name
    lock.watch(stop)
    async with ledger.committed_under(target, lock) as conn:
        await ledger.set_phase(conn, name, state="rolling_back", validated=None)
    await capture.remove(settings, target, name, lock=lock)  # its triggers and its change log (capture.py)
    saver = _Saver(settings, name, target) if (force and plan.at_risk) else None
    deleted: dict[str, int] = {}
    try:
        for t in plan.tables:  # children first
            args = [name, t.table, st["started_snapshot"]]
            deleted[t.table] = await _delete(target, lock, t.qualified, "ours", args, batch_size, stop)
            if saver is not None and t.at_risk:  # each deleted row is in the file before its batch commits
                which = "not_ours" if t.dropped else "others"
                deleted[t.table] += await _delete(target, lock, t.qualified, which, args, batch_size, stop, saver)
    finally:
        if saver is not None:
            saver.close()
    dump = saver.path if saver is not None else None
    pre = json.loads(st["pre_state"]) if st["pre_state"] else {}
    async with ledger.committed_under(target, lock) as conn:
        for seq, (value, called) in pre.get("sequences", {}).items():
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", seq):
                await conn.execute("SELECT setval($1::regclass, $2, $3)", seq, value, called)
    restore = bool(phase.backup)
    if plan.downgrade_to:
        await _downgrade(settings, plan, target, lock, finish=not restore)
    restored: tuple[str, ...] = ()
    if restore:
        lock.raise_if_lost()
        restored = await _restore_dropped(settings, phase, st, pre, target, lock)
        await dependents.replay(target, lock, pre.get("dependents"))  # what depended on them and is not in the backup
        async with ledger.committed_under(target, lock) as conn:
            await _finish(conn, name)
    elif not plan.downgrade_to:
        async with ledger.committed_under(target, lock) as conn:
            await _finish(conn, name)
    kept = {t.table: t.before for t in plan.tables if t.before and not t.dropped}
    return RollbackResult(name, deleted, dump, plan.downgrade_to, restored, 0.0, kept, plan)


async def _downgrade(
    settings: Settings, plan: RollbackPlan, target: asyncpg.Pool, lock: ledger.LockSession, *, finish: bool
) -> None:
    """The revision's downgrade; when nothing is left to restore, the ledger's last step commits with it.  The tables
    it drops are checked again in its own transaction, writes to them blocked: a row written since the rollback
    looked makes it refuse."""
    dropped = [t for t in plan.tables if t.dropped]

    async def nothing_left(conn: asyncpg.Connection) -> None:
        for t in dropped:
            await conn.execute(f"LOCK TABLE {qname(t.qualified)} IN SHARE MODE")
            n = await conn.fetchval(f"SELECT count(*) FROM {qname(t.qualified)}")
            if n:
                raise RefusedError(
                    f"{t.table} holds {n:,} rows written since the rollback looked; not dropping it",
                    hint="see them, save them if they matter, and run the rollback again (with --force to save them)",
                )

    async with schema.schema_transaction(
        settings, target, downgrade_to=plan.downgrade_to, commit=True, before=nothing_left
    ) as conn:
        if finish:
            await _finish(conn, plan.phase)
        await lock.check(conn)


async def _finish(conn: asyncpg.Connection, phase: str) -> None:
    """The last step: the phase is rolled back and what the ledger kept of its writes is forgotten."""
    await ledger.set_phase(conn, phase, state="rolled_back", validated=None)
    await ledger.forget_phase_writes(conn, phase)


class _Saver:
    """The file that keeps the rows a forced rollback deletes: created on the first such row (0600, never an
    existing file), recorded in the ledger, and flushed to disk before the batch that deletes them commits."""

    def __init__(self, settings: Settings, phase: str, target: asyncpg.Pool) -> None:
        self.dir, self.phase, self.target = settings.backups_dir, phase, target
        self.path: str | None = None
        self.file: Any = None

    async def write(self, table: str, rows: list[asyncpg.Record]) -> None:
        if not rows:
            return
        if self.file is None:
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            path = private_dir(self.dir) / f"{self.phase}-rollback-foreign-rows-{stamp}.jsonl"
            self.file = open_private(path, "w")
            self.path = str(path)
            await ledger.add_rollback_dump(self.target, self.phase, self.path)
            log.info("rows the phase did not write are saved to %s", path)
        for r in rows:
            self.file.write(json.dumps({"table": table, "row": json.loads(r["row"])}, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


async def _delete(
    target: asyncpg.Pool,
    lock: ledger.LockSession,
    table: QualifiedName,
    which: str,
    args: list[Any],
    batch_size: int,
    stop: asyncio.Event,
    saver: _Saver | None = None,
) -> int:
    """Delete the rows of a class in batches, one transaction each; a signal or a lost lock stops between them.

    A batch never cascades: rows of other tables that a foreign key with ON DELETE CASCADE / SET NULL / SET DEFAULT
    would change make the rollback refuse (those tables are locked against writes for the check and the delete)."""
    total = 0
    cascades = await fetch_all(target, undo.CASCADES_SQL, qname(table))
    pick, delete = undo.batch_sql(table, which), undo.delete_sql(table, which, returning=saver is not None)
    while True:
        if stop.is_set():
            lock.raise_if_lost()
            raise Stopped(f"rollback stopped cleanly in {table} after {total:,} rows")
        async with ledger.committed_under(target, lock) as conn:
            ctids = await conn.fetchval(pick, *args, batch_size)
            if not ctids:
                return total
            for c in cascades:
                await conn.execute(f"LOCK TABLE {c['child']} IN SHARE MODE")
                n = await conn.fetchval(undo.referencing_sql(c["child"], c["cols"], table, c["ref_cols"]), ctids)
                if n:
                    raise RefusedError(
                        f"{n:,} rows of {c['child']} reference rows of {table} that the rollback deletes, and "
                        f"foreign key {c['conname']} would change them (ON DELETE)",
                        detail=f"{total:,} rows of {table} deleted so far; nothing of {c['child']} was changed",
                        hint="those rows were written after the phase: save or move them, then run the rollback again",
                    )
            if saver is not None:
                rows = await conn.fetch(delete, *args, ctids)
                await saver.write(str(table), rows)
                n = len(rows)
            else:
                n = rowcount(await conn.execute(delete, *args, ctids))
        total += n
        if len(ctids) < batch_size:
            return total


async def _restore_dropped(
    settings: Settings,
    phase: Phase,
    st: asyncpg.Record,
    pre: dict[str, Any],
    target: asyncpg.Pool,
    lock: ledger.LockSession,
) -> tuple[str, ...]:
    """Bring back the tables the phase dropped as its backup has them: their definitions (columns, indexes,
    constraints, triggers, grants: not the revision's idea of them) and their rows, in one pg_restore transaction.

    The tables the downgrade recreated are dropped first, only when empty.  A rollback killed between that and the
    restore finds them missing and restores; one killed after the restore committed finds the rows counted when the
    phase dropped them, and stops there."""
    if not st["backup_path"]:
        raise MigrationError(f"{phase.name} has no backup to restore the dropped tables from")
    want: dict[str, int] = pre.get("dropped", {})
    names = [QualifiedName.parse(n) for n in want] if want else list(phase.backup)
    present = [t for t in [await read_table(target, n) for n in names] if t is not None]
    counts = {str(t.qualified): await fetch_val(target, f"SELECT count(*) FROM {qname(t.qualified)}") for t in present}
    if want and counts == want:
        log.info("the dropped tables hold their rows already (an earlier rollback restored them)")
        return tuple(want)
    if any(counts.values()):
        raise MigrationError(
            f"the tables {phase.name} dropped were recreated but hold rows that are not the backup's",
            detail=", ".join(f"{k}: {v:,} rows (dropped with {want.get(k, '?')})" for k, v in counts.items()),
            hint="someone wrote to them after the downgrade; save those rows, empty the tables, and run the rollback "
            "again",
        )
    if present:
        async with ledger.committed_under(target, lock) as conn:
            await conn.execute(f"DROP TABLE {', '.join(qname(t.qualified) for t in present)}")
    lock.raise_if_lost()
    major = int(await fetch_val(target, "SHOW server_version_num")) // 10000
    await backups.restore_all(settings.database_url, Path(st["backup_path"]), server_major=major, keep_owner=True)
    if want:
        after = {n: await fetch_val(target, f"SELECT count(*) FROM {qname(QualifiedName.parse(n))}") for n in want}
        if after != want:
            raise MigrationError(
                f"the restore of {phase.name}'s backup gave other row counts than the tables had when dropped",
                detail=", ".join(f"{k}: {after[k]:,} restored, {want[k]:,} dropped" for k in want),
            )
    return tuple(want) or tuple(str(n) for n in names)
