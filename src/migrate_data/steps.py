"""A phase as steps: each knows how to describe, apply and undo itself, and one runner drives them.

A data phase is ``Backup → Start → Copy → Validate``; a phase that drops tables is ``DropLegacy → Copy → Validate``
(its Copy has no tables).  ``run`` applies them in order, ``undo`` undoes them in reverse and ``describe`` renders them
for ``plan`` and the rehearsal: the SQL a step describes is the SQL it runs (tests/test_steps.py captures both).

Each ``apply`` is idempotent, and a step records what it did in the ledger only once that is committed, so a run killed
in any step is finished by the same command; each ``undo`` likewise, so a rollback killed in any step is finished by
``migrate-data rollback``.  The ledger says ``applied`` / ``rolled_back`` only after the last step (``finish``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg

from . import backup as backups
from . import capture, copy_sql, dependents, ledger, legacy, pre_state, report, schema
from . import rollback as undoing
from .capture_sql import LOCK_RETRIES, LOCK_WAIT
from .catalog import sequences
from .copier import Copier, CopyEvent, CopyOptions, TableResult
from .db import Executor, fetch_val
from .errors import RefusedError
from .mapping import Phase
from .preflight import PhasePlan, preflight
from .proof import prove_nothing_lost
from .settings import Settings, redact
from .sql import qname
from .validate import ValidationResult, validate_phase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions(CopyOptions):
    """The copier's options, and what a whole run adds to them."""

    backup: bool = True
    deep: bool = True  # validate with checksums after the copy (counts only when False)
    dry_run: bool = False
    accept_unmapped: bool = False  # a phase that drops tables may drop data no mapping copies (kept in its backup)
    force: bool = False  # ... and the objects that depend on them, with no `dependents:` decision (saved first)
    lock_wait: str = LOCK_WAIT  # how long one try to install change capture on a busy table may wait
    lock_retries: int = LOCK_RETRIES  # ... and how many tries after the first


@dataclass(frozen=True)
class StepPlan:
    """What a step would do, as ``plan`` prints it: its SQL (parameters as ``$n``), the commands it runs, its undo."""

    step: str
    summary: str
    statements: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    undo: str = ""
    parts: tuple[tuple[str, tuple[str, ...]], ...] = ()  # the statements by table (``source -> target``), when so

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "summary": self.summary, "statements": list(self.statements),
                "commands": list(self.commands), "undo": self.undo}  # fmt: skip


@dataclass
class PhaseRun:
    """What the steps of one run share: connections, the lock, the options, and what earlier steps produced."""

    settings: Settings
    phase: Phase
    options: RunOptions
    target: asyncpg.Pool
    source: asyncpg.Pool
    lock: ledger.LockSession
    run_id: int
    state: asyncpg.Record | None
    phases: dict[str, Phase] = field(default_factory=dict)  # the project's phases (a drop proves against them)
    on_event: Callable[[CopyEvent], None] | None = None
    stop: asyncio.Event | None = None
    started: float = field(default_factory=time.monotonic)
    backup_path: str | None = None
    plan: PhasePlan | None = None
    tables: list[TableResult] = field(default_factory=list)
    validation: ValidationResult | None = None
    reports: dict[str, str] = field(default_factory=dict)

    @property
    def resuming(self) -> bool:
        return self.state is not None and self.state["state"] in ("partial", "applied")

    def step(self, name: str, note: str = "") -> None:
        """Tell the progress display that a step starts (``CopyEvent.step``)."""
        log.debug("step %s: %s", name, note)
        if self.on_event is not None:
            self.on_event(CopyEvent.step(name, note))


@dataclass
class PhaseUndo:
    """What the undo of each step shares during one rollback."""

    settings: Settings
    phase: Phase
    state: asyncpg.Record
    plan: undoing.RollbackPlan
    target: asyncpg.Pool
    lock: ledger.LockSession
    force: bool
    batch_size: int
    stop: asyncio.Event
    lock_wait: str = LOCK_WAIT  # how long one try to remove change capture from a busy table may wait
    retries: int = LOCK_RETRIES  # ... and how many tries after the first
    deleted: dict[str, int] = field(default_factory=dict)
    dump: str | None = None
    restored: tuple[str, ...] = ()

    @property
    def pre(self) -> dict[str, Any]:
        return pre_state.recorded(self.state)


@dataclass(frozen=True)
class Describing:
    """What ``describe`` reads: the phase compiled against the live catalogs, and the databases (never written)."""

    settings: Settings
    phase: Phase
    plan: PhasePlan
    target: Executor  # inside the rolled-back transaction that has the phase's DDL applied
    source: Executor
    dropping: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # what a drop finds before its DDL (drop_preview)


class Step:
    """One step of a phase.  ``describe`` never writes; ``apply`` and ``undo`` are idempotent."""

    name = "step"

    async def describe(self, d: Describing) -> StepPlan:
        raise NotImplementedError

    async def apply(self, run: PhaseRun) -> None:
        raise NotImplementedError

    async def undo(self, u: PhaseUndo) -> None:
        """Nothing to undo (the default)."""


class Backup(Step):
    """pg_dump of the tables the phase reads and writes, verified; kept after a rollback."""

    name = "backup"

    async def describe(self, d: Describing) -> StepPlan:
        return StepPlan(self.name, "pg_dump of the tables it reads and writes, verified with pg_restore --list",
                        commands=(backups.pg_dump_line(d.phase),), undo="none: the backup is kept")  # fmt: skip

    async def apply(self, run: PhaseRun) -> None:
        if run.resuming and run.state is not None:
            run.backup_path = run.state["backup_path"]
        if not run.options.backup or run.backup_path:
            return
        run.step(self.name, "pg_dump of the tables it reads and writes")
        run.backup_path = await backups.take_backup(run.settings, run.phase, run.target)
        await ledger.update_run(run.target, run.run_id, backup_path=run.backup_path)


async def _capture_statements(phase: Phase, plan: PhasePlan, source: Executor) -> tuple[str, ...]:
    cp = await capture.capture_plan(source, phase.name, [ct for ct, _ in plan.tables])
    out: list[str] = []
    for c in cp.tables if cp.ok else ():
        out += (await capture.install_statements(source, phase.name, c)).statements
    return tuple(out)


class Start(Step):
    """The Alembic upgrade, the phase's start (the snapshot that tells later which rows were already there) and change
    capture on its source tables, in one transaction; undone by removing capture and downgrading."""

    name = "schema"

    async def describe(self, d: Describing) -> StepPlan:
        rev = d.phase.revision
        what = f"alembic upgrade {rev}" if rev else "no revision"
        ddl = (schema.offline_sql(d.settings, rev),) if rev else ()
        return StepPlan(self.name, f"{what}; the phase's start and change capture, in one transaction",
                        (*ddl, *await _capture_statements(d.phase, d.plan, d.source)),
                        undo="change capture removed; alembic downgrade to the revision before")  # fmt: skip

    async def apply(self, run: PhaseRun) -> None:
        settings, phase = run.settings, run.phase
        run.step(self.name, f"alembic upgrade {phase.revision}" if phase.revision else "no revision")
        async with schema.schema_transaction(settings, run.target, upgrade_to=phase.revision, commit=True) as conn:
            run.plan = await preflight(
                phase, source=conn if settings.same_database else run.source, target=conn,
                same_db=settings.same_database, coverage=False,
            )  # fmt: skip
            run.plan.raise_for_errors()
            before = None if run.resuming else await pre_state.taken(conn, run.plan.tables)
            await ledger.set_phase(
                conn, phase.name, state="partial", revision=phase.revision, run_id=run.run_id,
                backup_path=run.backup_path, pre_state=before, start=not run.resuming,
            )  # fmt: skip
            # Change capture starts in this same transaction (one database), or commits just before it (two): every
            # write to the phase's source and lookup tables from now on is logged for `sync` (capture.py).
            found = await capture.install(
                conn if settings.same_database else run.source, phase.name, run.plan.tables,
                wait=run.options.lock_wait, retries=run.options.lock_retries,
            )  # fmt: skip
            run.plan = replace(run.plan, findings=(*run.plan.findings, *found))
            await run.lock.check(conn)

    async def undo(self, u: PhaseUndo) -> None:
        # its triggers and its change log
        await capture.remove(u.settings, u.target, u.phase.name, lock=u.lock, wait=u.lock_wait, retries=u.retries)
        if u.plan.downgrade_to:
            await undoing.downgrade(u.settings, u.plan, u.target, u.lock)


class DropLegacy(Step):
    """Drop the tables of the phase's ``backup:`` list only with proof that nothing is lost, in one transaction:
    writes to them blocked (SHARE lock: reads go on), pg_dump of exactly what is dropped (the transaction's exported
    snapshot), every data phase that reads them validated live with checksums, their row counts recorded, the drop."""

    name = "backup"

    async def describe(self, d: Describing) -> StepPlan:
        tables, drops = d.dropping
        lock = (legacy.lock_sql(tables),) if tables else ()
        ddl = (schema.offline_sql(d.settings, d.phase.revision),) if d.phase.revision else ()
        return StepPlan(self.name, "writes blocked, pg_dump of exactly what is dropped, proof that every row is in its "
                        "target, the objects that depend on the tables saved and dropped, then the drop: one "
                        "transaction", (*lock, "SELECT pg_export_snapshot()", *drops, *ddl),
                        (backups.pg_dump_line(d.phase, snapshot=True),),
                        "alembic downgrade, the backup restored whole (pg_restore in one transaction), the dependents "
                        "recreated")  # fmt: skip

    async def apply(self, run: PhaseRun) -> None:
        if run.resuming:  # the drop committed (the phase's start is in its transaction): nothing is left to do
            run.backup_path = run.state["backup_path"] if run.state is not None else None
            run.plan = PhasePlan(run.phase, (), ())
            return
        if not run.options.backup:
            raise RefusedError(
                f"{run.phase.name} drops data and needs a verified backup; not running it with --no-backup"
            )
        settings, phase, target = run.settings, run.phase, run.target
        run.step(self.name, f"pg_dump of {len(phase.backup)} tables, proof that nothing is lost, then the drop")
        drop = legacy.LegacyDrop(settings, phase, await legacy.tables(target, phase))

        async def prove(conn: asyncpg.Connection) -> None:
            backup_path = await drop.hold(conn, target, force=run.options.force)
            await ledger.update_run(target, run.run_id, backup_path=backup_path)
            await prove_nothing_lost(phase, run.phases, drop.names, target, run.source,
                                     accept_unkept=run.options.accept_unmapped)  # fmt: skip
            await drop.drop_dependents(conn)

        async with schema.schema_transaction(
            settings, target, upgrade_to=phase.revision, commit=True, before=prove
        ) as c:
            await ledger.set_phase(c, phase.name, state="partial", revision=phase.revision, run_id=run.run_id,
                                   backup_path=drop.backup, pre_state=drop.pre_state(), start=True)  # fmt: skip
            await run.lock.check(c)
        run.backup_path = drop.backup
        run.plan = PhasePlan(phase, (), tuple(drop.findings()))

    async def undo(self, u: PhaseUndo) -> None:
        if u.plan.downgrade_to:
            await undoing.downgrade(u.settings, u.plan, u.target, u.lock)
        u.lock.raise_if_lost()
        u.restored = await undoing.restore_dropped(u.settings, u.phase, u.state, u.pre, u.target, u.lock)
        await dependents.replay(u.target, u.lock, u.pre.get("dependents"))  # what depended on them, not in the backup


class Copy(Step):
    """The batch copy of every table (copier.py); undone by deleting exactly the rows it wrote, children first, and
    setting the sequences back."""

    name = "copy"

    async def describe(self, d: Describing) -> StepPlan:
        parts = []
        for ct, tgt in d.plan.tables:
            serials = [c for c, _ in await sequences(d.target, tgt)]
            parts.append(
                (
                    f"{ct.source} -> {ct.target}",
                    tuple(copy_sql.statements(ct, serials, same_db=d.settings.same_database)),
                )
            )
        return StepPlan(self.name, f"{len(d.plan.tables)} tables in keyset batches, one transaction each with its "
                        "checkpoint", tuple(x for _, sqls in parts for x in sqls),
                        undo="delete exactly the rows the phase wrote, children first; sequences set back",
                        parts=tuple(parts))  # fmt: skip

    async def apply(self, run: PhaseRun) -> None:
        assert run.plan is not None
        if not run.resuming or run.options.recheck:
            await ledger.clear_rejects(run.target, run.phase.name)
        run.step(self.name, f"{len(run.plan.tables)} tables")
        run.tables = await Copier(
            phase=run.phase.name, tables=list(run.plan.tables), target_pool=run.target, source_pool=run.source,
            run_id=run.run_id, options=run.options, stop=run.stop, on_event=run.on_event, lock=run.lock,
        ).run()  # fmt: skip

    async def undo(self, u: PhaseUndo) -> None:
        u.deleted, u.dump = await undoing.delete_written(u.settings, u.phase.name, u.state, u.plan, u.target,
                                                         lock=u.lock, force=u.force, batch_size=u.batch_size,
                                                         stop=u.stop)  # fmt: skip
        await undoing.restore_sequences(u.target, u.lock, u.pre)


class Validate(Step):
    """Counts and checksums of every table, and the reports; nothing to undo."""

    name = "validate"

    async def describe(self, d: Describing) -> StepPlan:
        return StepPlan(self.name, "counts and checksums (read only), reports under reports/",
                        tuple(s for ct, _ in d.plan.tables for s in (ct.count_sql(), ct.target_count_sql())))  # fmt: skip

    async def apply(self, run: PhaseRun) -> None:
        assert run.plan is not None
        name = run.phase.name
        states = await ledger.phase_states(run.target)
        run.step(self.name, "counts and checksums" if run.options.deep else "counts")
        v = await validate_phase(
            name, list(run.plan.tables), target=run.target, source=run.source, deep=run.options.deep,
            pre_counts=pre_state.counts(states[name]), started_snapshot=states[name]["started_snapshot"],
        )  # fmt: skip
        v = await signed(run.settings, run.target, v, run.phase)
        run.validation = replace(v, run_seconds=round(time.monotonic() - run.started, 3))
        run.reports = {k: str(p) for k, p in report.save(run.validation, run.settings.reports_dir).items()}


async def signed(settings: Settings, db: Executor, v: ValidationResult, phase: Phase) -> ValidationResult:
    """A validation with who, where and against what it ran, as its report shows it."""
    who = await fetch_val(db, "SELECT current_user")
    return replace(
        v, database=redact(settings.database_url), revision=phase.revision, operator=who, host=socket.gethostname()
    )


async def drop_preview(db: Executor, phase: Phase) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the drop of ``phase`` would lock (the tables of its ``backup:`` that exist, quoted) and the statements
    that drop the objects depending on them, read before any DDL of the phase (``Describing.dropping``)."""
    tables = [t.qualified for t in await legacy.tables(db, phase)]
    drops = tuple(x.drop for x in dependents.drop_order(await dependents.find(db, tables)) if x.drop)
    return tuple(qname(t) for t in tables), drops


def phase_steps(phase: Phase) -> list[Step]:
    """The steps of a phase, in the order a run applies them."""
    if phase.backup:
        return [DropLegacy(), Copy(), Validate()]
    return [Backup(), Start(), Copy(), Validate()]


async def run(steps: Sequence[Step], r: PhaseRun) -> None:
    """Apply the steps in order, then record the phase as applied (with its validation) and the run as done."""
    for s in steps:
        await s.apply(r)
    ok = r.validation is None or r.validation.ok
    async with ledger.committed_under(r.target, r.lock) as conn:
        await ledger.set_phase(conn, r.phase.name, state="applied", revision=r.phase.revision, run_id=r.run_id,
                               validated=ok)  # fmt: skip
    await ledger.update_run(
        r.target, r.run_id, status="done" if ok else "invalid", rows={t.target: t.rows_written for t in r.tables},
        rejects=sum(t.rejected for t in r.tables), validation_ok=ok, report_path=r.reports.get("html"),
    )  # fmt: skip


async def undo(steps: Sequence[Step], u: PhaseUndo) -> None:
    """Record ``rolling_back``, undo the steps in reverse order, then record ``rolled_back``: the ledger says the
    phase is rolled back only once every step's undo is committed."""
    u.lock.watch(u.stop)
    async with ledger.committed_under(u.target, u.lock) as conn:
        await ledger.set_phase(conn, u.phase.name, state="rolling_back", validated=None)
    for s in reversed(steps):
        await s.undo(u)
    async with ledger.committed_under(u.target, u.lock) as conn:
        await undoing.finish(conn, u.phase.name)


async def describe(d: Describing) -> tuple[StepPlan, ...]:
    """What each step of the phase would do, in order (``plan`` prints it)."""
    return tuple([await s.describe(d) for s in phase_steps(d.phase)])
