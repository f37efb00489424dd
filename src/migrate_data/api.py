"""The verbs of migrate-data as functions: they return results and never print."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg

from . import capture, dependents, ledger, rehearsal, schema, steps
from . import rollback as undo_phase
from .capture_sql import LOCK_RETRIES, LOCK_WAIT
from .copier import CopyEvent, CopyOptions, TableResult
from .errors import RefusedError
from .live import CutoverResult, cutover, stray_capture, sync
from .mapping import Phase
from .preflight import Finding, PhasePlan, preflight
from .rollback import RollbackResult
from .runtime import (
    connect,
    database_errors,
    exclusive,
    get_phase,
    project_phases,
    recorded,
)
from .settings import Settings, check_patience
from .status import LiveProgress, PhaseStatus, history, row_counts, status, validate
from .steps import RunOptions
from .validate import ValidationResult

# api is the library's one entry point: the verbs of live.py and status.py are here too
__all__ = [
    "CutoverResult", "LiveProgress", "PhasePlan", "PhaseStatus", "PlanResult", "RollbackResult", "RunOptions",
    "RunResult", "cutover", "get_phase", "history", "plan", "plan_sql", "project_phases", "rollback", "row_counts",
    "run_phase", "status", "sync", "validate",
]  # fmt: skip

log = logging.getLogger(__name__)


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
    steps: tuple[steps.StepPlan, ...] = ()  # what each step runs, in order: the statements a run executes
    dependents: tuple[dependents.Dependent, ...] = ()  # views, functions... on the tables it reads or drops

    def to_dict(self) -> dict[str, Any]:
        return {
            "dependents": [d.to_dict() for d in self.dependents],
            "phase": self.plan.phase.name,
            "ok": not self.plan.errors,
            "revision": self.plan.phase.revision,
            "ddl": self.ddl,
            "order": [str(ct.target) for ct, _ in self.plan.tables],
            "findings": [
                {"level": f.level, "table": f.table, "message": f.message, "count": f.count} for f in self.plan.findings
            ],
            "steps": [s.to_dict() for s in self.steps],
            "tables": [
                {
                    "source": str(ct.source),
                    "target": str(ct.target),
                    "copy": ct.insert_sql(lower=True, upper=True),
                    "count": ct.count_sql(),
                    "preview": self.plan.previews.get(str(ct.target)),
                }
                for ct, _ in self.plan.tables
            ],
        }


# -- plan -----------------------------------------------------------------------------------------
@database_errors
async def plan(settings: Settings, name: str, *, sql: bool = False, preview_rows: int = 5) -> PlanResult:
    """Pre-flight a phase and render what it would run; never writes (DDL is applied and rolled back)."""
    phases, phase = get_phase(settings, name)
    async with connect(settings) as (target, source):
        deps, about = await dependents.for_plan(target, source, phase)  # views, functions... on what it reads, drops
        dropping = await steps.drop_preview(target, phase)
        async with _compiled(settings, phase, target, source, coverage=True, preview_rows=preview_rows) as (conn, p):
            src = conn if settings.same_database else source
            found = await capture.check(src, name, p.tables)  # can the writes between nights be captured?
            p = replace(p, findings=(*p.findings, *found))
            described = (  # what it runs, with the decision on its dependents made (`dependents:` or --force)
                ()
                if p.errors
                else await steps.describe(steps.Describing(settings, phase, p, conn, src, dropping=dropping))
            )
            the_plan = replace(p, findings=(*p.findings, *about))
    ddl = schema.offline_sql(settings, phase.revision) if (sql and phase.revision) else None
    return PlanResult(the_plan, ddl, described, tuple(deps))


@asynccontextmanager
async def _compiled(
    settings: Settings,
    phase: Phase,
    target: asyncpg.Pool,
    source: asyncpg.Pool,
    *,
    coverage: bool,
    preview_rows: int = 0,
) -> AsyncIterator[tuple[asyncpg.Connection, PhasePlan]]:
    """The phase compiled and checked inside a transaction that has its DDL applied (and what a drop of its tables
    would refuse over dropped first), rolled back when the block ends."""
    out_of_the_way = dependents.dropped_first(phase)
    async with schema.schema_transaction(
        settings, target, upgrade_to=phase.revision, commit=False, before=out_of_the_way
    ) as conn:
        yield (
            conn,
            await preflight(
                phase,
                source=conn if settings.same_database else source,
                target=conn,
                same_db=settings.same_database,
                coverage=coverage,
                preview_rows=preview_rows,
            ),
        )


# -- run ------------------------------------------------------------------------------------------
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
    check_patience(options.lock_wait, options.lock_retries)
    phases, phase = get_phase(settings, name)
    async with exclusive(settings, phases, name, what=f"phase {name}", jobs=options.jobs) as (
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
        if on_event is not None:
            on_event(CopyEvent.step("preflight", f"{len(phase.tables)} tables against the live catalogs"))
        await dependents.check(target, phase, force=options.force)  # refused here: nothing is written
        async with _compiled(settings, phase, target, source, coverage=options.dry_run) as (_, the_plan):
            the_plan.raise_for_errors()
        if options.dry_run:
            return RunResult(
                name, "dry-run", findings=the_plan.findings, revision=phase.revision, seconds=time.monotonic() - started
            )
        async with recorded(target, lock, kind="run", phase=name) as run_id:
            predicted = rehearsal.predicted_seconds(settings, name)
            if predicted is not None:
                await ledger.update_run(lock, run_id, predicted_seconds=predicted)
            result = await _run(
                settings,
                phases,
                phase,
                options,
                target,
                source,
                lock,
                run_id,
                states.get(name),
                on_event=on_event,
                stop=stop,
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
    phases: dict[str, Phase],
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
    """The phase's steps applied in order (steps.py), after the checks that need the lock."""
    if (d := options.deadline) is not None and d - dt.datetime.now(dt.timezone.utc) < dt.timedelta(minutes=1):
        # no batch could run: no backup, no schema step (the CLI refuses this too, before its confirmation)
        zone = getattr(d.tzinfo, "key", None) or d.tzname()
        raise RefusedError(f"--until: the window closes at {d:%H:%M} {zone}, too soon for a batch; nothing was done")
    r = steps.PhaseRun(
        settings, phase, options, target, source, lock, run_id, state, phases=phases, on_event=on_event, stop=stop
    )
    await steps.run(steps.phase_steps(phase), r)
    assert r.plan is not None
    return RunResult(
        phase=phase.name,
        status="done" if r.validation is None or r.validation.ok else "invalid",
        tables=tuple(r.tables),
        validation=r.validation,
        reports=r.reports,
        backup_path=r.backup_path,
        findings=r.plan.findings,
        revision=phase.revision,
    )


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
    lock_wait: str = LOCK_WAIT,
    retries: int = LOCK_RETRIES,
) -> RollbackResult:
    """Undo a phase: delete exactly what it wrote (children first), downgrade its revision, restore what it dropped.

    Refuses, before writing anything, when the phase's tables hold rows it did not write or that were changed
    since; ``force`` saves those rows to a file and deletes them too.  ``dry_run`` only says what it would do.
    ``lock_wait`` and ``retries``: the patience of removing change capture from a table the application keeps busy."""
    started = time.monotonic()
    check_patience(lock_wait, retries)
    phases, phase = get_phase(settings, name)
    async with exclusive(settings, phases, name, what=f"rollback of {name}") as (target, source, lock, states):
        st = states.get(name)
        if st is None or st["state"] not in ("applied", "partial", "rolling_back"):
            if stray := await stray_capture(
                settings, target, source, name, lock, dry_run=dry_run, wait=lock_wait, retries=retries
            ):
                return stray
            raise RefusedError(f"{name} is not applied ({st['state'] if st else 'pending'}); nothing to roll back")
        plan = await undo_phase.inspect(settings, phase, st, target)
        if dry_run:
            return RollbackResult(
                name, {}, None, plan.downgrade_to, (), time.monotonic() - started, plan=plan, dry_run=True
            )
        if plan.at_risk and not force:
            raise plan.refusal()
        async with recorded(target, lock, kind="rollback", phase=name) as run_id:
            u = steps.PhaseUndo(
                settings, phase, st, plan, target, lock, force, batch_size, stop or asyncio.Event(), lock_wait, retries
            )
            await steps.undo(steps.phase_steps(phase), u)
        kept = {t.table: t.before for t in plan.tables if t.before and not t.dropped}
        result = RollbackResult(name, u.deleted, u.dump, plan.downgrade_to, u.restored, 0.0, kept, plan)
        await ledger.update_run(target, run_id, status="done", rows={k: -v for k, v in result.deleted.items()})
        return replace(result, seconds=time.monotonic() - started)


def plan_sql(settings: Settings, name: str) -> str | None:
    """The DDL of the phase's Alembic revision, rendered offline: no database is needed.  None: it has no revision."""
    _, phase = get_phase(settings, name)
    return schema.offline_sql(settings, phase.revision) if phase.revision else None
