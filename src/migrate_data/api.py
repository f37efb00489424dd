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
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from . import backup as backups
from . import ledger, report, schema
from .catalog import Table, parents_first, read_table, sequences
from .compile import CompiledTable
from .copier import Copier, CopyEvent, CopyOptions, TableResult
from .db import Executor, fetch_all, fetch_val, open_pool, rowcount
from .errors import BadInput, MigrationError, RefusedError, Stopped
from .mapping import Phase, QualifiedName, load_phases
from .preflight import Finding, PhasePlan, compile_phase, preflight
from .settings import Settings, redact
from .sql import qname
from .validate import ValidationResult, extra_keys, validate_phase

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
class RunOptions:
    batch_size: int = CopyOptions.batch_size
    jobs: int = 2
    recheck: bool = False
    max_rejects: int | None = None
    deadline: dt.datetime | None = None
    backup: bool = True
    deep: bool = False
    dry_run: bool = False
    split_rows: int = 200_000  # tables with more source rows are copied in `jobs` concurrent key ranges


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
class RollbackResult:
    phase: str
    deleted: dict[str, int]
    foreign_rows_dump: str | None
    downgraded_to: str | None
    restored: tuple[str, ...]
    seconds: float


@dataclass(frozen=True)
class PhaseStatus:
    phase: str
    state: str  # applied | partial | rolled_back | pending
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
    expected = None
    for name, phase in phases.items():
        st = states.get(name)
        if phase.revision and st is not None and st["state"] in ("applied", "partial"):
            expected = phase.revision
    current = await schema.current_revision(db)
    if current != expected:
        raise RefusedError(
            f"the database's Alembic revision is {current or 'base'} but the ledger says {expected or 'base'}",
            detail="someone changed the schema outside migrate-data (alembic upgrade/downgrade/stamp by hand)",
            hint=f"bring the database back to {expected or 'base'} (`alembic upgrade` or `alembic downgrade "
            f"{expected or 'base'}`), or see `migrate-data status`, then run the command again",
        )


def later_applied(phases: dict[str, Phase], states: dict[str, asyncpg.Record], name: str) -> list[str]:
    order = list(phases)
    return [
        p
        for p in order[order.index(name) + 1 :]
        if states.get(p) is not None and states[p]["state"] in ("applied", "partial")
    ]


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
) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool, asyncpg.Connection, dict[str, asyncpg.Record]]]:
    """Connect and hold the database's lock, after the checks every writing verb makes: no later phase is applied,
    and Alembic's revision is what the ledger says.  Yields the pools, the lock's connection and the phase states."""
    async with connect(settings, jobs=jobs) as (target, source):
        await ledger.ensure(target)
        async with ledger.exclusive(target, what=what) as lock:
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
async def _recorded(target: asyncpg.Pool, lock: asyncpg.Connection, *, kind: str, phase: str) -> AsyncIterator[int]:
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
    lock: asyncpg.Connection,
    run_id: int,
    state: asyncpg.Record | None,
    *,
    on_event: Callable[[CopyEvent], None] | None,
    stop: asyncio.Event | None,
) -> RunResult:
    name = phase.name
    started = time.monotonic()
    backup_path = None
    resuming = state is not None and state["state"] in ("partial", "applied")
    earlier_backup = state["backup_path"] if (state is not None and resuming) else None
    if options.backup and not earlier_backup:
        backup_path = str(await _backup(settings, phase, target))
        await ledger.update_run(target, run_id, backup_path=backup_path)
    else:
        backup_path = earlier_backup
    if phase.backup and not backup_path:
        raise RefusedError(f"{name} drops data and needs a verified backup; not running it with --no-backup")
    if phase.backup:
        await _check_all_data_phases_valid(settings, target, name)
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
        )
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
        options=CopyOptions(
            batch_size=options.batch_size,
            jobs=options.jobs,
            recheck=options.recheck,
            max_rejects=options.max_rejects,
            deadline=options.deadline,
            split_rows=options.split_rows,
        ),
        stop=stop,
        on_event=on_event,
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
    await ledger.set_phase(
        target, name, state="applied", revision=phase.revision, run_id=run_id, validated=validation.ok
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


async def _backup(settings: Settings, phase: Phase, target: asyncpg.Pool) -> str:
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
    return str(await backups.dump(settings.database_url, tables, path, server_major=await _server_major(target)))


async def _check_all_data_phases_valid(settings: Settings, target: asyncpg.Pool, name: str) -> None:
    phases = project_phases(settings)
    states = await ledger.phase_states(target)
    bad = [
        p
        for p, ph in phases.items()
        if ph.tables
        and p != name
        and (states.get(p) is None or states[p]["state"] != "applied" or not states[p]["validated"])
    ]
    if bad:
        raise RefusedError(
            f"{name} drops data; every data phase must be applied and validated first",
            detail=f"not applied or not validated: {', '.join(bad)}",
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
    batch_size: int = CopyOptions.batch_size,
    stop: asyncio.Event | None = None,
) -> RollbackResult:
    """Undo a phase: delete what it wrote (children first), downgrade its revision, restore what it dropped."""
    started = time.monotonic()
    phases, phase = get_phase(settings, name)
    async with _exclusive(settings, phases, name, what=f"rollback of {name}") as (target, source, lock, states):
        st = states.get(name)
        if st is None or st["state"] not in ("applied", "partial"):
            raise RefusedError(f"{name} is not applied ({st['state'] if st else 'pending'}); nothing to roll back")
        async with _recorded(target, lock, kind="rollback", phase=name) as run_id:
            result = await _rollback(
                settings, phase, st, target, source, force=force, batch_size=batch_size, stop=stop or asyncio.Event()
            )
        await ledger.update_run(target, run_id, status="done", rows={k: -v for k, v in result.deleted.items()})
        return replace(result, seconds=time.monotonic() - started)


async def _rollback(
    settings: Settings,
    phase: Phase,
    st: asyncpg.Record,
    target: asyncpg.Pool,
    source: asyncpg.Pool,
    *,
    force: bool,
    batch_size: int,
    stop: asyncio.Event,
) -> RollbackResult:
    name = phase.name
    pre = json.loads(st["pre_state"]) if st["pre_state"] else {"counts": {}, "sequences": {}}
    the_plan = await preflight(phase, source=source, target=target, same_db=settings.same_database, coverage=False)
    the_plan.raise_for_errors()
    tables = list(the_plan.tables)
    dump_path = None
    foreign: dict[str, list[list[str]]] = {}
    for ct, _ in tables:
        keys = await extra_keys(ct, source, target, phase=name)
        if keys:
            foreign[str(ct.target)] = keys
    if foreign and not force:
        what = ", ".join(f"{k}: {len(v)} rows" for k, v in foreign.items())
        raise RefusedError(
            f"the target tables of {name} hold rows that did not come from the source ({what})",
            detail="the application wrote them after the phase; a rollback would lose them",
            hint="pass --force to dump them to a file under backups/ and roll back anyway",
        )
    by_name = {str(ct.target): ct for ct, _ in tables}
    if foreign:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = settings.backups_dir / f"{name}-rollback-foreign-rows-{stamp}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for table, keys in foreign.items():
                for r in await fetch_all(target, by_name[table].rows_by_keys_sql(), *_by_column(keys)):
                    f.write(json.dumps({"table": table, "row": json.loads(r["row"])}, ensure_ascii=False) + "\n")
        dump_path = str(path)
    deleted: dict[str, int] = {}
    for ct, _ in reversed(tables):  # children first
        deleted[str(ct.target)] = await _delete_copied(ct, target, source, batch_size, stop)
        written_by_app = foreign.get(str(ct.target))
        if written_by_app:  # --force: the rows the application wrote are in the dump file; they go too
            deleted[str(ct.target)] += rowcount(await target.execute(ct.delete_keys_sql(), *_by_column(written_by_app)))
    for ct, _ in tables:
        now = await fetch_val(target, ct.target_count_sql())
        want = pre.get("counts", {}).get(str(ct.target), 0)
        if now != want:
            raise MigrationError(
                f"after deleting what {name} copied, {ct.target} has {now} rows; it had {want} before the phase",
                hint="inspect the table; run the rollback again once resolved",
            )
    async with target.acquire() as conn, conn.transaction():
        for seq, (value, called) in pre.get("sequences", {}).items():
            await conn.execute("SELECT setval($1::regclass, $2, $3)", seq, value, called)
    await ledger.reset_checkpoints(target, name)
    await ledger.clear_rejects(target, name)
    downgraded = None
    if phase.revision:
        downgraded = schema.predecessor(settings, phase.revision)
    async with schema.schema_transaction(settings, target, downgrade_to=downgraded, commit=True) as conn:
        await ledger.set_phase(conn, name, state="rolled_back", validated=None)
    restored: tuple[str, ...] = ()
    if phase.backup:
        if not st["backup_path"]:
            raise MigrationError(f"{name} has no backup to restore the dropped tables from")
        recreated = [t for t in [await read_table(target, name) for name in phase.backup] if t is not None]
        await backups.restore_data(
            settings.database_url,
            Path(st["backup_path"]),
            [t.qualified for t in parents_first(recreated)],
            server_major=await _server_major(target),
        )
        restored = tuple(str(t) for t in phase.backup)
    return RollbackResult(name, deleted, dump_path, downgraded, restored, 0.0)


async def _delete_copied(
    ct: CompiledTable, target: asyncpg.Pool, source: asyncpg.Pool, batch_size: int, stop: asyncio.Event
) -> int:
    """Delete, in batches of source keys, the target rows those source rows produce (a batch per transaction)."""
    total = 0
    last: list[str] | None = None
    while True:
        if stop.is_set():
            raise Stopped(f"rollback stopped cleanly in {ct.target} after {total:,} rows")
        rows = await source.fetch(ct.expected_keys_sql(lower=last is not None), *(last or []), batch_size)
        if not rows:
            return total
        async with target.acquire() as conn, conn.transaction():
            total += rowcount(await conn.execute(ct.delete_keys_sql(), *_by_column([r["tk"] for r in rows])))
        last = list(rows[-1]["bk"])
        if len(rows) < batch_size:
            return total


def _by_column(keys: list[list[str]]) -> list[list[str]]:
    """Keys as rows (one list per key) -> one list per key column: the parameters of ``unnest``."""
    return [list(col) for col in zip(*keys, strict=True)] if keys else []


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
