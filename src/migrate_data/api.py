"""The verbs of migrate-data as functions: they return results and never print."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import asyncpg

from . import backup as backups
from . import capture, ledger, report, schema
from . import rollback as undo_phase
from . import sync as syncing
from .catalog import Table, read_table, sequences
from .compile import CompiledTable
from .copier import Copier, CopyEvent, CopyOptions, TableResult
from .db import Executor, fetch_val, open_pool
from .errors import BadInput, MigrationError, PrivilegeMissing, RefusedError, Stopped, database_error, postgres_error
from .mapping import Phase, Phases, QualifiedName, load_phases
from .preflight import Finding, PhasePlan, compile_phase, preflight
from .proof import prove_nothing_lost
from .rollback import RollbackResult
from .settings import Settings, redact
from .sql import qname
from .validate import ValidationResult, validate_phase

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _wrapped_driver_errors() -> tuple[type[BaseException], ...]:
    """SQLAlchemy's wrapper of a driver error (the Alembic step runs through SQLAlchemy)."""
    try:
        from sqlalchemy.exc import DBAPIError
    except ImportError:  # pragma: no cover
        return ()
    return (DBAPIError,)


_WRAPPED_DRIVER_ERRORS = _wrapped_driver_errors()


def database_errors(fn: F) -> F:
    """Turn a driver error escaping a verb into a MigrationError shaped like psql's (message, DETAIL, HINT, SQLSTATE;
    never a Python class name).  A missing privilege becomes PrivilegeMissing (exit 2), naming what to grant."""
    verb = {"run_phase": "{}", "plan": "plan {}", "validate": "validate {}", "rollback": "rollback {}"}.get(
        fn.__name__, fn.__name__
    )

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        settings = next((a for a in args if isinstance(a, Settings)), None)
        name = next((a for a in args if isinstance(a, str)), "")
        doing = "migrate-data " + verb.format(name).strip()
        try:
            role = settings.url.user if settings is not None else None
        except MigrationError:
            role = None
        try:
            return await fn(*args, **kwargs)
        except MigrationError as e:
            pg = postgres_error(e.__cause__)
            if pg is not None and pg.sqlstate == "42501" and not isinstance(e, PrivilegeMissing):
                better = database_error(pg, doing=doing, role=role)
                raise PrivilegeMissing(
                    e.message, detail=e.detail or better.message, hint=better.hint, sqlstate="42501"
                ) from e
            raise
        except (asyncpg.PostgresError, *_WRAPPED_DRIVER_ERRORS) as e:
            if postgres_error(e) is None:
                raise
            raise database_error(e, doing=doing, role=role) from e
        except (OSError, asyncpg.InterfaceError) as e:
            raise MigrationError(
                f"lost the connection to the database during {doing}: {e}",
                hint="every batch is checkpointed; run the same command again",
            ) from e

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class RunOptions(CopyOptions):
    """The copier's options, and what a whole run adds to them."""

    backup: bool = True
    deep: bool = True  # validate with checksums after the copy (counts only when False)
    dry_run: bool = False
    accept_unmapped: bool = False  # a phase that drops tables may drop data no mapping copies (kept in its backup)


@dataclass(frozen=True)
class RunResult:
    phase: str
    status: str  # "done" | "invalid" | "dry-run"
    tables: tuple[TableResult, ...] = ()
    validation: ValidationResult | None = None
    reports: dict[str, str] = field(default_factory=dict)
    backup_path: str | None = None
    findings: tuple[Finding, ...] = ()
    seconds: float = 0.0
    revision: str | None = None


@dataclass(frozen=True)
class PlanResult:
    plan: PhasePlan
    ddl: str | None
    statements: dict[str, dict[str, str]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.plan.phase.name,
            "ok": not self.plan.errors,
            "revision": self.plan.phase.revision,
            "ddl": self.ddl,
            "order": [str(ct.target) for ct, _ in self.plan.tables],
            "findings": [
                {"level": f.level, "table": f.table, "message": f.message, "count": f.count} for f in self.plan.findings
            ],
            "tables": [
                {
                    "source": str(ct.source),
                    "target": str(ct.target),
                    **self.statements[str(ct.target)],
                    "preview": self.plan.previews.get(str(ct.target)),
                }
                for ct, _ in self.plan.tables
            ],
        }


@dataclass(frozen=True)
class LiveProgress:
    """A phase being run right now, as another session sees it in the checkpoints."""

    run_id: int
    started_at: dt.datetime
    operator: str
    stage: str  # "before the copy" (backup, schema) | "copying" | "after the copy" (validation, report)
    rows: int  # source rows read so far, every table of the phase
    total: int | None  # source rows to read: exact for finished tables, the planner's estimate for the others
    rate: float | None  # rows/s over the sample (None: no batch committed during it)
    eta_seconds: float | None
    tables: tuple[str, ...] = ()  # the tables being copied now


@dataclass(frozen=True)
class PhaseStatus:
    phase: str
    state: str  # applied | partial | rolling_back | rolled_back | pending | running | error (its file does not load)
    revision: str | None
    last_run: str | None  # "<kind> <status>", e.g. "run done"
    rows: int  # source rows the phase has accounted for: copied, or there already (read - quarantined)
    validation: str
    resume: str | None = None
    predicted_seconds: float | None = None
    actual_seconds: float | None = None
    last_run_at: dt.datetime | None = None
    quarantined: int = 0
    description: str = ""
    error: str | None = None  # the phase file's error, when it does not load
    progress: LiveProgress | None = None  # when a run of the phase is under way
    capture: str = "-"  # change capture between nights (capture.py): on | off | BROKEN | tables dropped | -
    changes_waiting: int | None = None  # captured changes not synced yet
    oldest_change_seconds: float | None = None  # the age of the oldest of them
    last_sync_at: dt.datetime | None = None
    cut_over_at: dt.datetime | None = None


# -- project and connections ----------------------------------------------------------------------
def project_phases(settings: Settings) -> Phases:
    """Load the project's phase files; a file with an error is in ``.broken`` (MappingError with file:line:column)."""
    return load_phases(settings.mappings_dir)


def get_phase(settings: Settings, name: str) -> tuple[dict[str, Phase], Phase]:
    phases = project_phases(settings)
    phase = phases.require(name)  # the file's own error, or the phases there are; other phases' errors do not block
    if phase.revision:
        schema.check_revision(settings, phase.revision)
    return phases, phase


@asynccontextmanager
async def connect(settings: Settings, *, jobs: int = 2) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool]]:
    """One pool for the target and, when the source is another database, one for the source."""
    size = max(2, jobs + 2)
    st, lt = settings.statement_timeout, settings.lock_timeout
    async with open_pool(settings.database_url, max_size=size, statement_timeout=st, lock_timeout=lt) as target:
        if settings.same_database:
            yield target, target
        else:
            async with open_pool(
                settings.effective_source_url, max_size=size, statement_timeout=st, lock_timeout=lt
            ) as source:
                yield target, source


async def _server_major(db: Executor) -> int:
    return int(await fetch_val(db, "SHOW server_version_num")) // 10000


async def check_schema_agrees(
    settings: Settings, db: Executor, phases: dict[str, Phase], states: dict[str, asyncpg.Record]
) -> None:
    """Refuse when alembic_version is not what the ledger's applied phases imply (Alembic run by hand)."""
    expected: str | None = None
    acceptable: set[str | None] = {None}
    for name, phase in phases.items():
        st = states.get(name)
        if phase.revision and st is not None and st["state"] in APPLIED:
            # a rollback stopped midway may or may not have downgraded its revision yet
            acceptable = {phase.revision, expected} if st["state"] == "rolling_back" else {phase.revision}
            expected = phase.revision
    current = await schema.current_revision(db)
    if current not in acceptable:
        raise RefusedError(
            f"the database's Alembic revision is {current or 'base'} but the ledger says {expected or 'base'}",
            detail="someone changed the schema outside migrate-data (alembic upgrade/downgrade/stamp by hand)",
            hint=f"bring the database back to {expected or 'base'} (`alembic upgrade` or `alembic downgrade "
            f"{expected or 'base'}`), or see `migrate-data status`, then run the command again",
        )


APPLIED = ("applied", "partial", "rolling_back")  # states in which a phase's effects are (partly) in the database


def later_applied(phases: dict[str, Phase], states: dict[str, asyncpg.Record], name: str) -> list[str]:
    order = list(phases)
    return [p for p in order[order.index(name) + 1 :] if states.get(p) is not None and states[p]["state"] in APPLIED]


# -- plan -----------------------------------------------------------------------------------------
@database_errors
async def plan(settings: Settings, name: str, *, sql: bool = False, preview_rows: int = 5) -> PlanResult:
    """Pre-flight a phase and render what it would run; never writes (DDL is applied and rolled back)."""
    phases, phase = get_phase(settings, name)
    async with connect(settings) as (target, source):
        the_plan = await _preflight(settings, phase, target, source, coverage=True, preview_rows=preview_rows)
        found = await capture.check(source, name, the_plan.tables)  # can the writes between nights be captured?
        the_plan = replace(the_plan, findings=(*the_plan.findings, *found))
    ddl = schema.offline_sql(settings, phase.revision) if (sql and phase.revision) else None
    statements = {
        str(ct.target): {
            "copy": ct.insert_sql(lower=True, upper=True)
            if settings.same_database
            else ct.source_text_sql(lower=True, upper=True),
            "count": ct.count_sql(),
        }
        for ct, _ in the_plan.tables
    }
    return PlanResult(the_plan, ddl, statements)


async def _preflight(
    settings: Settings,
    phase: Phase,
    target: asyncpg.Pool,
    source: asyncpg.Pool,
    *,
    coverage: bool,
    preview_rows: int = 0,
) -> PhasePlan:
    async with schema.schema_transaction(settings, target, upgrade_to=phase.revision, commit=False) as conn:
        return await preflight(
            phase,
            source=conn if settings.same_database else source,
            target=conn,
            same_db=settings.same_database,
            coverage=coverage,
            preview_rows=preview_rows,
        )


# -- run ------------------------------------------------------------------------------------------
@asynccontextmanager
async def _exclusive(
    settings: Settings, phases: dict[str, Phase], name: str, *, what: str, jobs: int = 2
) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool, ledger.LockSession, dict[str, asyncpg.Record]]]:
    """Connect and hold the database's lock, after the checks every writing verb makes: no later phase is applied,
    and Alembic's revision is what the ledger says.  Yields the pools, the lock's session and the phase states;
    every batch that writes calls ``lock.check(conn)`` in its transaction before it commits."""
    async with connect(settings, jobs=jobs) as (target, source):
        await ledger.ensure(target)
        async with ledger.exclusive(target, url=settings.database_url, what=what) as lock:
            await ledger.close_abandoned_runs(target)
            states = await ledger.phase_states(target)
            later = later_applied(phases, states, name)
            if later:
                raise RefusedError(
                    f"{', '.join(later)} is applied after {name}",
                    hint=f"roll back {later[-1]} first (`migrate-data rollback {later[-1]}`)",
                )
            broken = [p for p in getattr(phases, "broken", {}) if (states.get(p) or {}).get("state") in APPLIED]
            if broken:  # its place in the order is unknown: it may depend on what this would change
                raise RefusedError(
                    f"{', '.join(broken)} is applied, and its phase file has an error; not changing {name}",
                    detail=phases.broken[broken[0]].message,  # type: ignore[attr-defined]
                    hint="fix the phase file first (`migrate-data status` lists the phases that do not load)",
                )
            await check_schema_agrees(settings, target, phases, states)
            yield target, source, lock, states


@asynccontextmanager
async def _recorded(target: asyncpg.Pool, lock: ledger.LockSession, *, kind: str, phase: str) -> AsyncIterator[int]:
    """A run in the ledger: started here, marked stopped or failed when the block raises."""
    run_id = await ledger.start_run(lock, kind=kind, phase=phase)
    try:
        yield run_id
    except Stopped as e:
        await ledger.update_run(target, run_id, status="stopped", error=str(e))
        raise
    except BaseException as e:
        error = redact(str(e)) or type(e).__name__
        await asyncio.shield(ledger.update_run(target, run_id, status="failed", error=error))
        raise


@database_errors
async def run_phase(
    settings: Settings,
    name: str,
    options: RunOptions = RunOptions(),
    *,
    on_event: Callable[[CopyEvent], None] | None = None,
    stop: asyncio.Event | None = None,
) -> RunResult:
    """Pre-flight, check requirements, back up, upgrade the schema, copy, validate, record."""
    started = time.monotonic()
    phases, phase = get_phase(settings, name)
    async with _exclusive(settings, phases, name, what=f"phase {name}", jobs=options.jobs) as (
        target,
        source,
        lock,
        states,
    ):
        _check_requires(phases, phase, states)
        if (states.get(name) or {}).get("state") == "rolling_back":
            raise RefusedError(
                f"a rollback of {name} was stopped before it finished; not running {name} over it",
                hint=f"finish it first: `migrate-data rollback {name}`",
            )
        _step(on_event, "preflight", f"{len(phase.tables)} tables against the live catalogs")
        the_plan = await _preflight(settings, phase, target, source, coverage=options.dry_run)
        the_plan.raise_for_errors()
        if options.dry_run:
            return RunResult(
                name, "dry-run", findings=the_plan.findings, revision=phase.revision, seconds=time.monotonic() - started
            )
        async with _recorded(target, lock, kind="run", phase=name) as run_id:
            predicted = report.predicted_seconds(settings, name)
            if predicted is not None:
                await ledger.update_run(lock, run_id, predicted_seconds=predicted)
            result = await _run(
                settings, phase, options, target, source, lock, run_id, states.get(name), on_event=on_event, stop=stop
            )
        return replace(result, seconds=time.monotonic() - started)


def _step(on_event: Callable[[CopyEvent], None] | None, name: str, note: str = "") -> None:
    """Tell the progress display that a step starts (``CopyEvent.step``)."""
    log.debug("step %s: %s", name, note)
    if on_event is not None:
        on_event(CopyEvent.step(name, note))


def _check_requires(phases: dict[str, Phase], phase: Phase, states: dict[str, asyncpg.Record]) -> None:
    for r in phase.requires:
        st = states.get(r)
        if st is None or st["state"] != "applied":
            raise RefusedError(
                f"{phase.name} requires {r}, which is {st['state'] if st else 'pending'}",
                hint=f"run `migrate-data {r}` first",
            )
        if phases[r].tables and st["validated"] is False:
            raise RefusedError(
                f"{phase.name} requires {r}, whose last validation failed", hint=f"see `migrate-data validate {r}`"
            )


async def _run(
    settings: Settings,
    phase: Phase,
    options: RunOptions,
    target: asyncpg.Pool,
    source: asyncpg.Pool,
    lock: ledger.LockSession,
    run_id: int,
    state: asyncpg.Record | None,
    *,
    on_event: Callable[[CopyEvent], None] | None,
    stop: asyncio.Event | None,
) -> RunResult:
    name = phase.name
    started = time.monotonic()
    resuming = state is not None and state["state"] in ("partial", "applied")
    backup_path = state["backup_path"] if (state is not None and resuming) else None
    if (d := options.deadline) is not None and d - dt.datetime.now(dt.timezone.utc) < dt.timedelta(minutes=1):
        # no batch could run: no backup, no schema step (the CLI refuses this too, before its confirmation)
        zone = getattr(d.tzinfo, "key", None) or d.tzname()
        raise RefusedError(f"--until: the window closes at {d:%H:%M} {zone}, too soon for a batch; nothing was done")
    if phase.backup and not options.backup:
        raise RefusedError(f"{name} drops data and needs a verified backup; not running it with --no-backup")
    if phase.backup and not resuming:
        # A phase that drops tables: writes to them blocked, a backup of exactly what is dropped, proof that
        # every row is in its target, and the drop, all in one transaction.
        _step(on_event, "backup", f"pg_dump of {len(phase.backup)} tables, proof that nothing is lost, then the drop")
        backup_path, the_plan = await _drop_with_proof(
            settings, phase, target, source, run_id, lock, accept_unkept=options.accept_unmapped
        )
    else:
        if options.backup and not backup_path:
            _step(on_event, "backup", "pg_dump of the tables it reads and writes")
            backup_path = str(await _backup(settings, phase, target))
            await ledger.update_run(target, run_id, backup_path=backup_path)
        _step(on_event, "schema", f"alembic upgrade {phase.revision}" if phase.revision else "no revision")
        # The schema step and the ledger's record of it commit together.
        async with schema.schema_transaction(settings, target, upgrade_to=phase.revision, commit=True) as conn:
            the_plan = await preflight(
                phase,
                source=conn if settings.same_database else source,
                target=conn,
                same_db=settings.same_database,
                coverage=False,
            )
            the_plan.raise_for_errors()
            pre_state = None if resuming else await _pre_state(conn, the_plan.tables)
            await ledger.set_phase(
                conn,
                name,
                state="partial",
                revision=phase.revision,
                run_id=run_id,
                backup_path=backup_path,
                pre_state=pre_state,
                start=not resuming,
            )
            # Change capture starts in this same transaction (one database), or commits just before it (two): every
            # write to the phase's source and lookup tables from now on is logged for `sync` (capture.py).
            found = await capture.install(conn if settings.same_database else source, name, the_plan.tables)
            the_plan = replace(the_plan, findings=(*the_plan.findings, *found))
            await lock.check(conn)
    if not resuming:
        await ledger.clear_rejects(target, name)
    if options.recheck:
        await ledger.clear_rejects(target, name)
    _step(on_event, "copy", f"{len(the_plan.tables)} tables")
    copier = Copier(
        phase=name,
        tables=list(the_plan.tables),
        target_pool=target,
        source_pool=source,
        run_id=run_id,
        options=options,
        stop=stop,
        on_event=on_event,
        lock=lock,
    )
    tables = await copier.run()
    states = await ledger.phase_states(target)
    pre_counts = (states[name]["pre_state"] and json.loads(states[name]["pre_state"]).get("counts")) or {}
    _step(on_event, "validate", "counts and checksums" if options.deep else "counts")
    validation = await validate_phase(
        name,
        list(the_plan.tables),
        target=target,
        source=source,
        deep=options.deep,
        pre_counts=pre_counts,
        started_snapshot=states[name]["started_snapshot"],
    )
    validation = replace(
        await _describe(settings, target, validation, phase), run_seconds=round(time.monotonic() - started, 3)
    )
    paths = report.save(validation, settings.reports_dir)
    rows = {t.target: t.rows_written for t in tables}
    async with ledger.committed_under(target, lock) as conn:
        await ledger.set_phase(
            conn, name, state="applied", revision=phase.revision, run_id=run_id, validated=validation.ok
        )
    await ledger.update_run(
        target,
        run_id,
        status="done" if validation.ok else "invalid",
        rows=rows,
        rejects=sum(t.rejected for t in tables),
        validation_ok=validation.ok,
        report_path=str(paths["html"]),
    )
    return RunResult(
        phase=name,
        status="done" if validation.ok else "invalid",
        tables=tuple(tables),
        validation=validation,
        reports={k: str(v) for k, v in paths.items()},
        backup_path=backup_path,
        findings=the_plan.findings,
        revision=phase.revision,
    )


async def _describe(settings: Settings, db: Executor, v: ValidationResult, phase: Phase) -> ValidationResult:
    who = await fetch_val(db, "SELECT current_user")
    return replace(
        v, database=redact(settings.database_url), revision=phase.revision, operator=who, host=socket.gethostname()
    )


async def _pre_state(conn: asyncpg.Connection, tables: tuple[tuple[CompiledTable, Table], ...]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    seqs: dict[str, list[Any]] = {}
    for ct, tgt in tables:
        counts[str(ct.target)] = await conn.fetchval(ct.target_count_sql())
        for _, seq in await sequences(conn, tgt):
            row = await conn.fetchrow(f"SELECT last_value, is_called FROM {seq}")
            seqs[seq] = [row["last_value"], row["is_called"]]
    return {"counts": counts, "sequences": seqs}


async def _backup(settings: Settings, phase: Phase, target: asyncpg.Pool, *, snapshot: str | None = None) -> str:
    tables: list[QualifiedName] = []
    for t in [*(tm.source for tm in phase.tables), *(tm.target for tm in phase.tables), *phase.backup]:
        if await fetch_val(target, "SELECT to_regclass($1) IS NOT NULL", qname(t)) and t not in tables:
            tables.append(t)
    if not settings.same_database and phase.tables:
        log.info("source tables live in another database; backing up the target tables only")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = settings.backups_dir / f"{phase.name}-{stamp}.dump"
    if not tables:
        return ""
    major = await _server_major(target)
    need = await backups.estimate_bytes(target, tables)  # refused before pg_dump starts when the disk is short
    return str(
        await backups.dump(settings.database_url, tables, path, server_major=major, snapshot=snapshot, need_bytes=need)
    )


async def _drop_with_proof(
    settings: Settings,
    phase: Phase,
    target: asyncpg.Pool,
    source: asyncpg.Pool,
    run_id: int,
    lock: ledger.LockSession,
    *,
    accept_unkept: bool,
) -> tuple[str, PhasePlan]:
    """Drop the tables of a phase's ``backup:`` list only with proof that nothing is lost: in the transaction that
    drops them, writes to them are blocked first (SHARE lock: reads go on), pg_dump takes exactly what is dropped
    (the transaction's exported snapshot), every data phase that reads them is validated live with checksums, and
    their row counts are recorded for the restore to check."""
    tables = [t for t in [await read_table(target, n) for n in phase.backup] if t is not None]
    holder: dict[str, Any] = {}

    async def prove(conn: asyncpg.Connection) -> None:
        names = ", ".join(qname(t.qualified) for t in tables)
        if names:
            await conn.execute(f"LOCK TABLE {names} IN SHARE MODE")
        snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
        holder["backup"] = str(await _backup(settings, phase, target, snapshot=snapshot))
        await ledger.update_run(target, run_id, backup_path=holder["backup"])
        await prove_nothing_lost(
            phase,
            project_phases(settings),
            {str(t.qualified) for t in tables},
            target,
            source,
            accept_unkept=accept_unkept,
        )
        holder["dropped"] = {
            str(t.qualified): await conn.fetchval(f"SELECT count(*) FROM {qname(t.qualified)}") for t in tables
        }

    async with schema.schema_transaction(
        settings, target, upgrade_to=phase.revision, commit=True, before=prove
    ) as conn:
        the_plan = PhasePlan(phase, (), ())
        await ledger.set_phase(
            conn,
            phase.name,
            state="partial",
            revision=phase.revision,
            run_id=run_id,
            backup_path=holder["backup"],
            pre_state={"counts": {}, "sequences": {}, "dropped": holder["dropped"]},
            start=True,
        )
        await lock.check(conn)
    return holder["backup"], the_plan


# -- validate -------------------------------------------------------------------------------------
@database_errors
async def validate(
    settings: Settings, name: str, *, deep: bool = False, sample: int = 10, allow_rejects: bool = True
) -> ValidationResult:
    """Validate a phase's tables now; record the result in the ledger when there is one."""
    phases, phase = get_phase(settings, name)
    async with connect(settings) as (target, source):
        tables, findings = await compile_phase(phase, source=source, target=target)
        PhasePlan(phase, tuple(tables), tuple(findings)).raise_for_errors()
        pre_counts: dict[str, int] = {}
        snapshot = None
        if await ledger.exists(target):
            st = (await ledger.phase_states(target)).get(name)
            if st is not None and st["pre_state"]:
                pre_counts = json.loads(st["pre_state"]).get("counts", {})
                snapshot = st["started_snapshot"]
        result = await validate_phase(
            name,
            tables,
            target=target,
            source=source,
            deep=deep,
            sample=sample,
            allow_rejects=allow_rejects,
            pre_counts=pre_counts,
            started_snapshot=snapshot,
        )
        result = await _describe(settings, target, result, phase)
        if await ledger.exists(target):
            try:  # best-effort: a read-only role validates too, it only leaves no record
                run_id = await ledger.start_run(target, kind="validate", phase=name)
                await ledger.update_run(
                    target, run_id, status="done" if result.ok else "invalid", validation_ok=result.ok
                )
            except asyncpg.InsufficientPrivilegeError as e:
                log.warning("validation of %s not recorded in the ledger: %s", name, e)
        return result


# -- rollback -------------------------------------------------------------------------------------
@database_errors
async def rollback(
    settings: Settings,
    name: str,
    *,
    force: bool = False,
    dry_run: bool = False,
    batch_size: int = CopyOptions.batch_size,
    stop: asyncio.Event | None = None,
) -> RollbackResult:
    """Undo a phase: delete exactly what it wrote (children first), downgrade its revision, restore what it dropped.

    Refuses, before writing anything, when the phase's tables hold rows it did not write or that were changed
    since; ``force`` saves those rows to a file and deletes them too.  ``dry_run`` only says what it would do."""
    started = time.monotonic()
    phases, phase = get_phase(settings, name)
    async with _exclusive(settings, phases, name, what=f"rollback of {name}") as (target, _source, lock, states):
        st = states.get(name)
        if st is None or st["state"] not in ("applied", "partial", "rolling_back"):
            raise RefusedError(f"{name} is not applied ({st['state'] if st else 'pending'}); nothing to roll back")
        plan = await undo_phase.inspect(settings, phase, st, target)
        if dry_run:
            return RollbackResult(
                name, {}, None, plan.downgrade_to, (), time.monotonic() - started, plan=plan, dry_run=True
            )
        if plan.at_risk and not force:
            raise plan.refusal()
        async with _recorded(target, lock, kind="rollback", phase=name) as run_id:
            result = await undo_phase.execute(
                settings,
                phase,
                st,
                plan,
                target,
                lock=lock,
                force=force,
                batch_size=batch_size,
                stop=stop or asyncio.Event(),
            )
        await ledger.update_run(target, run_id, status="done", rows={k: -v for k, v in result.deleted.items()})
        return replace(result, seconds=time.monotonic() - started)


# -- status and history ---------------------------------------------------------------------------
@database_errors
async def status(settings: Settings, *, sample_seconds: float = 1.0) -> list[PhaseStatus]:
    """One line per phase: applied / partial (with the resume point) / rolled back / pending / running (with its live
    progress, sampled over ``sample_seconds``) / error (its file does not load)."""
    phases = project_phases(settings)
    every = phases.names() if isinstance(phases, Phases) else list(phases)
    broken = getattr(phases, "broken", {})

    def unloaded(p: str) -> PhaseStatus:
        return PhaseStatus(p, "error", None, None, 0, "-", error=broken[p].message, resume=broken[p].detail)

    async with connect(settings) as (target, source):
        if not await ledger.exists(target):
            return [
                unloaded(p)
                if p in broken
                else PhaseStatus(p, "pending", phases[p].revision, None, 0, "-", description=phases[p].description)
                for p in every
            ]
        states = await ledger.phase_states(target)
        out = []
        for p in every:
            if p in broken:
                out.append(unloaded(p))
                continue
            ph = phases[p]
            st = states.get(p)
            runs = await ledger.runs(target, phase=p, limit=1)
            last = runs[0] if runs else None
            cps = await ledger.checkpoints(target, p)
            quarantined = sum(c["rejected"] for c in cps)
            rows = sum(c["rows_read"] for c in cps) - quarantined  # a --recheck pass writes ~0 but accounts for all
            resume = None
            if st is not None and st["state"] == "partial":
                pending = sorted({c["target"] for c in cps if not c["done"]})
                resume = (
                    f"resumes at {', '.join(pending)} after {sum(c['rows_read'] for c in cps):,} rows read"
                    if pending
                    else "copy finished; validation pending"
                )
            if st is not None and st["state"] == "rolling_back":
                resume = f"a rollback stopped midway; finish it with `migrate-data rollback {p}`"
            progress = None
            if last is not None and last["status"] == "running" and last["kind"] == "run":
                progress = await _live_progress(target, source, ph, last, sample_seconds)
                if progress is not None:
                    resume, rows = None, progress.rows - quarantined
            validation = "-" if st is None or st["validated"] is None else ("passed" if st["validated"] else "FAILED")
            actual = None
            if last is not None and last["finished_at"] is not None:
                actual = (last["finished_at"] - last["started_at"]).total_seconds()
            out.append(
                PhaseStatus(
                    p,
                    "running" if progress is not None else st["state"] if st else "pending",
                    ph.revision,
                    f"{last['kind']} {last['status']}" if last is not None else None,
                    rows,
                    validation,
                    resume,
                    last["predicted_seconds"] if last else None,
                    actual,
                    last_run_at=last["started_at"] if last is not None else None,
                    quarantined=quarantined,
                    description=ph.description,
                    progress=progress,
                    **await _sync_status(source, ph, st),
                )
            )
        return out


async def _sync_status(source: asyncpg.Pool, phase: Phase, st: asyncpg.Record | None) -> dict[str, Any]:
    """What status shows of live sync: is capture on, how many changes wait and how old the oldest is, the last
    sync, the cutover."""
    if st is None or not phase.tables:
        return {}
    cap = await capture.state(source, phase.name)
    return {
        "capture": "cut over" if st.get("cut_over_at") and cap.state == "off" else cap.state,
        "changes_waiting": cap.waiting if cap.state != "off" or cap.waiting else None,
        "oldest_change_seconds": cap.oldest_seconds,
        "last_sync_at": st.get("last_sync_at"),
        "cut_over_at": st.get("cut_over_at"),
    }


async def _live_progress(
    target: asyncpg.Pool, source: asyncpg.Pool, phase: Phase, run: asyncpg.Record, sample_seconds: float
) -> LiveProgress | None:
    """The progress of a run under way, from its checkpoints read twice, ``sample_seconds`` apart; None when the
    run's session is gone (it died: the next run marks it interrupted)."""
    if not await fetch_val(target, "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", run["pid"]):
        return None
    by_table = f"""SELECT target, sum(rows_read)::bigint AS rows, bool_and(done) AS done, clock_timestamp() AS at
                   FROM {ledger.SCHEMA}.checkpoints WHERE phase = $1 GROUP BY target"""
    first = await target.fetch(by_table, phase.name)
    await asyncio.sleep(sample_seconds)
    now = {r["target"]: r for r in await target.fetch(by_table, phase.name)}
    finished = await ledger.finished_tables(target, phase.name)
    rows = sum(r["rows"] for r in now.values())
    before = sum(r["rows"] for r in first)
    took = (max(r["at"] for r in now.values()) - min(r["at"] for r in first)).total_seconds() if first and now else 0
    rate = (rows - before) / took if took > 0 and rows > before else None
    total: int | None = 0
    for t in phase.tables:
        done = now.get(str(t.target)) or next(  # an unqualified target: the search_path's, named by its table
            (r for n, r in now.items() if t.target.schema is None and n.rpartition(".")[2] == t.target.name), None
        )
        if done is not None and done["done"]:
            total = (total or 0) + done["rows"]
            continue
        estimate = await fetch_val(
            source, "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)", qname(t.source)
        )
        if estimate is not None and estimate < 0:  # never analyzed: no estimate, count it (a new, small table)
            estimate = await fetch_val(source, f"SELECT count(*) FROM {qname(t.source)}")
        if estimate is None:
            total = None
            break
        total = (total or 0) + max(int(estimate), done["rows"] if done is not None else 0)
    all_done = bool(phase.tables) and len(finished) >= len(phase.tables)
    stage = "after the copy" if all_done else "copying" if now else "before the copy"
    eta = (max(total - rows, 0) / rate) if (rate and total is not None and stage == "copying") else None
    return LiveProgress(
        run_id=run["id"],
        started_at=run["started_at"],
        operator=f"{run['operator']}@{run['host']}",
        stage=stage,
        rows=rows,
        total=total,
        rate=rate,
        eta_seconds=eta,
        tables=tuple(sorted(n for n, r in now.items() if not r["done"] and n not in finished)),
    )


@database_errors
async def history(settings: Settings, *, phase: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The ledger's runs, newest first.  A run that stopped, failed or was interrupted records no rows; for the last
    run of its phase they are read from the checkpoints (what it had copied when it ended)."""
    async with connect(settings) as (target, _):
        if not await ledger.exists(target):
            return []
        records = await ledger.runs(target, phase=phase, limit=limit)
        latest: dict[str, int] = {}
        for r in await target.fetch(
            f"SELECT phase, max(id) AS id FROM {ledger.SCHEMA}.runs WHERE kind = 'run' GROUP BY phase"
        ):
            latest[r["phase"]] = r["id"]
        out = []
        for r in records:
            rows: int | None = sum(json.loads(r["rows"]).values())
            if r["kind"] == "run" and r["status"] in ("stopped", "failed", "interrupted", "running") and not rows:
                if latest.get(r["phase"]) == r["id"]:
                    cps = await ledger.checkpoints(target, r["phase"])
                    rows = sum(c["rows_written"] for c in cps)
                else:
                    rows = None  # a later run of the phase has moved the checkpoints on
            out.append(
                {
                    "id": r["id"],
                    "kind": r["kind"],
                    "phase": r["phase"],
                    "status": r["status"],
                    "started": r["started_at"],
                    "seconds": round((r["finished_at"] - r["started_at"]).total_seconds(), 1)
                    if r["finished_at"]
                    else None,
                    "operator": f"{r['operator']}@{r['host']}",
                    "rows": rows,
                    "rejects": r["rejects"],
                    "valid": r["validation_ok"],
                    "report": r["report_path"],
                    "error": r["error"],
                }
            )
        return out


@database_errors
async def row_counts(settings: Settings, tables: list[str]) -> dict[str, int | None]:
    """Exact row counts of ``tables`` in the target (None: no such table), for a confirmation that says what a phase
    destroys."""
    async with connect(settings) as (target, _):
        out: dict[str, int | None] = {}
        for name in tables:
            table = qname(QualifiedName.parse(name))
            exists = await fetch_val(target, "SELECT to_regclass($1) IS NOT NULL", table)
            out[name] = await fetch_val(target, f"SELECT count(*) FROM {table}") if exists else None
        return out


def plan_sql(settings: Settings, name: str) -> str | None:
    """The DDL of the phase's Alembic revision, rendered offline: no database is needed.  None: it has no revision."""
    _, phase = get_phase(settings, name)
    return schema.offline_sql(settings, phase.revision) if phase.revision else None


# -- live sync between nights (capture.py, sync.py) ---------------------------------------------------------------
@dataclass(frozen=True)
class CutoverResult:
    phases: tuple[str, ...]
    ok: bool  # validated with checksums while writes were blocked
    validations: tuple[ValidationResult, ...] = ()
    synced: tuple[syncing.PhaseSync, ...] = ()  # the last changes, applied while writes were blocked
    blocked_tables: tuple[str, ...] = ()
    blocked_seconds: float = 0.0
    attempts: int = 0  # tries it took to block writes
    capture_removed: bool = False
    already: tuple[str, ...] = ()  # phases that were cut over before
    seconds: float = 0.0


def _in_order(settings: Settings, names: list[str]) -> list[str]:
    """The named phases (each checked), in the project's order: an earlier phase's parents are synced first."""
    if not names:
        raise BadInput("name at least one phase")
    for n in names:
        get_phase(settings, n)
    order = list(project_phases(settings))
    return sorted(dict.fromkeys(names), key=order.index)


async def _syncers(
    settings: Settings,
    names: list[str],
    target: asyncpg.Pool,
    source: asyncpg.Pool,
    lock: ledger.LockSession,
    states: dict[str, asyncpg.Record],
    *,
    batch_size: int,
) -> list[syncing.PhaseSyncer]:
    out = []
    for name in names:
        _, phase = get_phase(settings, name)
        st = states.get(name)
        if st is None or st["state"] != "applied":
            now = st["state"] if st else "pending"
            raise RefusedError(
                f"{name} is {now}: its changes are applied once its copy is done",
                hint=f"run `migrate-data {name}` first" if now in ("pending", "partial", "rolled_back") else None,
            )
        if st["cut_over_at"] is not None:
            raise RefusedError(
                f"{name} was cut over at {st['cut_over_at']:%Y-%m-%d %H:%M}: nothing is captured any more"
            )
        tables, findings = await compile_phase(phase, source=source, target=target)
        PhasePlan(phase, tuple(tables), tuple(findings)).raise_for_errors()
        s = syncing.PhaseSyncer(
            phase=name,
            tables=tables,
            target=target,
            source=source,
            lock=lock,
            batch_size=batch_size,
        )
        await s.prepare()
        out.append(s)
    return out


@database_errors
async def sync(
    settings: Settings,
    names: list[str],
    options: syncing.SyncOptions | None = None,
    *,
    stop: asyncio.Event | None = None,
) -> syncing.SyncResult:
    """Apply the changes captured since the phases' copies to their target tables, through their own mappings.

    An earlier phase can be synced while later ones are applied.  With ``options.follow`` it keeps going until
    ``stop`` is set (then raises Stopped: the same command goes on where it stopped)."""
    started = time.monotonic()
    names = _in_order(settings, names)
    options = options or syncing.SyncOptions()
    stop = stop or asyncio.Event()
    async with connect(settings) as (target, source):
        await ledger.ensure(target)
        async with ledger.exclusive(target, url=settings.database_url, what=f"sync of {', '.join(names)}") as lock:
            lock.watch(stop)
            await ledger.close_abandoned_runs(target)
            states = await ledger.phase_states(target)
            await check_schema_agrees(settings, target, project_phases(settings), states)
            syncers = await _syncers(settings, names, target, source, lock, states, batch_size=options.batch_size)
            async with AsyncExitStack() as runs:
                for s in syncers:  # a refusal above leaves no run behind
                    s.run_id = await runs.enter_async_context(_recorded(target, lock, kind="sync", phase=s.phase))
                totals = await syncing.sync(syncers, options, stop=stop)
                lock.raise_if_lost()
                if stop.is_set():
                    applied = sum(t.changes for t in totals.values())
                    raise Stopped(f"sync stopped cleanly after {applied:,} changes; what is left is still in the log")
                for s in syncers:
                    t = totals[s.phase]
                    assert s.run_id is not None
                    await ledger.update_run(
                        target, s.run_id, status="done", rows={"changes": t.changes}, rejects=t.rejected
                    )
    return syncing.SyncResult(tuple(totals[n] for n in names), time.monotonic() - started)


@database_errors
async def cutover(
    settings: Settings,
    names: list[str],
    *,
    lock_wait: str = "2s",
    retries: int = 5,
    batch_size: int = syncing.SyncOptions.batch_size,
    on_blocked: Callable[[], Awaitable[None]] | None = None,
) -> CutoverResult:
    """Cut phases over: block writes to their source (and lookup) tables, apply the last captured changes, validate
    with checksums, then record the cutover, release the writes and remove the capture.  When validation fails,
    writes are released and capture stays on (``ok`` False).  ``on_blocked`` runs while writes are blocked."""
    started = time.monotonic()
    names = _in_order(settings, names)
    async with connect(settings) as (target, source):
        await ledger.ensure(target)
        async with ledger.exclusive(target, url=settings.database_url, what=f"cutover of {', '.join(names)}") as lock:
            await ledger.close_abandoned_runs(target)
            states = await ledger.phase_states(target)
            await check_schema_agrees(settings, target, project_phases(settings), states)
            already = tuple(n for n in names if (states.get(n) or {}).get("cut_over_at") is not None)
            todo = [n for n in names if n not in already]
            for n in already:  # a cutover killed after it recorded the phase: finish removing the capture
                await capture.remove(settings, target, n, lock=lock)
            if not todo:
                return CutoverResult(tuple(names), True, capture_removed=True, already=already)
            syncers = await _syncers(settings, todo, target, source, lock, states, batch_size=batch_size)
            async with AsyncExitStack() as runs:
                run_ids = {}
                for s in syncers:
                    s.run_id = run_ids[s.phase] = await runs.enter_async_context(
                        _recorded(target, lock, kind="cutover", phase=s.phase)
                    )
                tables = {n: r for s in syncers for n, r in (await capture.relations(source, s.phase)).items()}
                tables = dict(sorted(tables.items()))
                async with syncing.writes_blocked(source, tables, wait=lock_wait, retries=retries) as blocked:
                    if on_blocked is not None:
                        await on_blocked()
                    totals = await syncing.sync(
                        syncers, syncing.SyncOptions(batch_size=batch_size), stop=asyncio.Event(), bounded=False
                    )
                    validations = tuple([await validate(settings, n, deep=True) for n in todo])
                    ok = all(v.ok for v in validations) and not any(t.waiting for t in totals.values())
                    if ok:
                        async with ledger.committed_under(target, lock) as conn:
                            for n in todo:
                                await ledger.mark_cut_over(conn, n)
                    else:
                        blocked.release_only = True
                for n in todo:
                    changes = {"changes": totals[n].changes}
                    status = "done" if ok else "invalid"
                    await ledger.update_run(target, run_ids[n], status=status, rows=changes, validation_ok=ok)
            removed = False
            if ok:
                try:
                    for n in todo:
                        await capture.remove(settings, target, n, lock=lock)
                    removed = True
                except MigrationError as e:  # the phase is cut over: the triggers only log what nobody reads
                    log.warning("capture of %s not removed yet: %s; `migrate-data cutover` again removes it", todo, e)
            return CutoverResult(
                tuple(names),
                ok,
                validations,
                tuple(totals[n] for n in todo),
                blocked.tables,
                blocked.seconds or 0.0,
                blocked.attempts,
                removed,
                already,
                time.monotonic() - started,
            )
