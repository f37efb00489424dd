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
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import asyncpg

from . import backup as backups
from . import ledger, report, schema
from . import rollback as undo_phase
from .catalog import Table, read_table, sequences
from .compile import CompiledTable
from .copier import Copier, CopyEvent, CopyOptions, TableResult
from .db import Executor, fetch_val, open_pool
from .errors import BadInput, MigrationError, RefusedError, Stopped
from .mapping import Phase, QualifiedName, load_phases
from .preflight import Finding, PhasePlan, compile_phase, preflight
from .rollback import RollbackResult
from .settings import Settings, redact
from .sql import qname
from .validate import ValidationResult, validate_phase

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def database_errors(fn: F) -> F:
    """Turn a driver error escaping a verb into a MigrationError that carries SQLSTATE, detail and hint."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except asyncpg.PostgresError as e:
            raise MigrationError(
                f"{fn.__name__}: {e.__class__.__name__}: {e}",
                detail=f"SQLSTATE {e.sqlstate}" + (f"; {e.detail}" if getattr(e, "detail", None) else ""),
                hint=getattr(e, "hint", None),
            ) from e
        except (OSError, asyncpg.InterfaceError) as e:
            raise MigrationError(
                f"{fn.__name__}: lost the database: {e}", hint="every batch is checkpointed; run the same command again"
            ) from e

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class RunOptions(CopyOptions):
    """The copier's options, and what a whole run adds to them."""

    backup: bool = True
    deep: bool = True  # validate with checksums after the copy (counts only when False)
    dry_run: bool = False


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
class PhaseStatus:
    phase: str
    state: str  # applied | partial | rolling_back | rolled_back | pending
    revision: str | None
    last_run: str | None
    rows: int
    validation: str
    resume: str | None = None
    predicted_seconds: float | None = None
    actual_seconds: float | None = None


# -- project and connections ----------------------------------------------------------------------
def project_phases(settings: Settings) -> dict[str, Phase]:
    """Load the project's phase files (raises MappingError with file:line on bad input)."""
    return load_phases(settings.mappings_dir)


def get_phase(settings: Settings, name: str) -> tuple[dict[str, Phase], Phase]:
    phases = project_phases(settings)
    if name not in phases:
        raise BadInput(f"no phase {name!r} in {settings.mappings_dir}", hint=f"phases: {', '.join(phases) or 'none'}")
    phase = phases[name]
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
        backup_path, the_plan = await _drop_with_proof(settings, phase, target, source, run_id, lock)
    else:
        if options.backup and not backup_path:
            backup_path = str(await _backup(settings, phase, target))
            await ledger.update_run(target, run_id, backup_path=backup_path)
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
            await lock.check(conn)
    if not resuming:
        await ledger.clear_rejects(target, name)
    if options.recheck:
        await ledger.clear_rejects(target, name)
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
    validation = await validate_phase(
        name, list(the_plan.tables), target=target, source=source, deep=options.deep, pre_counts=pre_counts
    )
    validation = replace(
        await _describe(settings, target, validation, phase), run_seconds=round(time.monotonic() - started, 3)
    )
    paths = report.save(validation, settings.reports_dir)
    rows = {t.target: t.rows_written for t in tables}
    async with target.acquire() as conn, conn.transaction():
        await ledger.set_phase(
            conn, name, state="applied", revision=phase.revision, run_id=run_id, validated=validation.ok
        )
        await lock.check(conn)
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
    settings: Settings, phase: Phase, target: asyncpg.Pool, source: asyncpg.Pool, run_id: int, lock: ledger.LockSession
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
        await _prove_nothing_lost(settings, phase, {str(t.qualified) for t in tables}, target, source)
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


async def _prove_nothing_lost(
    settings: Settings, phase: Phase, dropped: set[str], target: asyncpg.Pool, source: asyncpg.Pool
) -> None:
    """Refuse unless every data phase is applied and, validated now with checksums, has every source row of the
    dropped tables in its target or quarantined."""
    phases = project_phases(settings)
    states = await ledger.phase_states(target)
    pending = [p for p, ph in phases.items() if ph.tables and (states.get(p) or {}).get("state") != "applied"]
    if pending:
        raise RefusedError(
            f"{phase.name} drops data; every data phase must be applied first",
            detail=f"not applied: {', '.join(pending)}",
            hint=f"run {pending[0]} first",
        )
    problems: list[str] = []
    for p, ph in phases.items():
        if not ph.tables or p == phase.name:
            continue
        tables, findings = await compile_phase(ph, source=source, target=target)
        PhasePlan(ph, tuple(tables), tuple(findings)).raise_for_errors()
        reading = [(ct, t) for ct, t in tables if str(ct.source) in dropped]
        if not reading:
            continue
        pre = json.loads(states[p]["pre_state"] or "{}").get("counts", {})
        result = await validate_phase(p, reading, target=target, source=source, deep=True, pre_counts=pre)
        problems += [f"{p}: {t.target}: {'; '.join(t.problems)}" for t in result.tables if t.problems]
    if problems:
        raise RefusedError(
            f"{phase.name} would drop rows that are not in the Spanish tables; nothing was dropped",
            detail="\n".join(problems),
            hint="bring the data phases up to date (`migrate-data PHASE --recheck`, or sync), validate them, "
            "and run again",
        )


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
        if await ledger.exists(target):
            st = (await ledger.phase_states(target)).get(name)
            if st is not None and st["pre_state"]:
                pre_counts = json.loads(st["pre_state"]).get("counts", {})
        result = await validate_phase(
            name,
            tables,
            target=target,
            source=source,
            deep=deep,
            sample=sample,
            allow_rejects=allow_rejects,
            pre_counts=pre_counts,
        )
        result = await _describe(settings, target, result, phase)
        if await ledger.exists(target):
            run_id = await ledger.start_run(target, kind="validate", phase=name)
            await ledger.update_run(target, run_id, status="done" if result.ok else "invalid", validation_ok=result.ok)
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
async def status(settings: Settings) -> list[PhaseStatus]:
    """One line per phase: applied / partial (with the resume point) / rolled back / pending."""
    phases = project_phases(settings)
    async with connect(settings) as (target, _):
        if not await ledger.exists(target):
            return [PhaseStatus(p, "pending", ph.revision, None, 0, "-") for p, ph in phases.items()]
        states = await ledger.phase_states(target)
        out = []
        for p, ph in phases.items():
            st = states.get(p)
            runs = await ledger.runs(target, phase=p, limit=1)
            last = runs[0] if runs else None
            cps = await ledger.checkpoints(target, p)
            rows = sum(c["rows_written"] for c in cps)
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
            last_run = None
            if last is not None:
                last_run = f"{last['kind']} {last['status']} {last['started_at']:%Y-%m-%d %H:%M}"
            validation = "-" if st is None or st["validated"] is None else ("passed" if st["validated"] else "FAILED")
            actual = None
            if last is not None and last["finished_at"] is not None:
                actual = (last["finished_at"] - last["started_at"]).total_seconds()
            out.append(
                PhaseStatus(
                    p,
                    st["state"] if st else "pending",
                    ph.revision,
                    last_run,
                    rows,
                    validation,
                    resume,
                    last["predicted_seconds"] if last else None,
                    actual,
                )
            )
        return out


@database_errors
async def history(settings: Settings, *, phase: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    async with connect(settings) as (target, _):
        if not await ledger.exists(target):
            return []
        return [
            {
                "id": r["id"],
                "kind": r["kind"],
                "phase": r["phase"],
                "status": r["status"],
                "started": f"{r['started_at']:%Y-%m-%d %H:%M:%S}",
                "seconds": round((r["finished_at"] - r["started_at"]).total_seconds(), 1) if r["finished_at"] else None,
                "operator": f"{r['operator']}@{r['host']}",
                "rows": sum(json.loads(r["rows"]).values()),
                "rejects": r["rejects"],
                "valid": r["validation_ok"],
                "report": r["report_path"],
            }
            for r in await ledger.runs(target, phase=phase, limit=limit)
        ]
