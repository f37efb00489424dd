"""The verbs that only look: validate, status, history, row counts (a read-only role may run them; validate records
its result in the ledger when it can)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import capture_state, ledger, pre_state, steps
from .db import fetch_val
from .mapping import Phase, Phases, QualifiedName
from .preflight import PhasePlan, compile_phase
from .runtime import connect, database_errors, get_phase, project_phases
from .settings import Settings
from .sql import qname
from .validate import ValidationResult, validate_phase

log = logging.getLogger(__name__)


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
                pre_counts = pre_state.counts(st)
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
        result = await steps.signed(settings, target, result, phase)
        if await ledger.exists(target):
            try:  # best-effort: a read-only role validates too, it only leaves no record
                run_id = await ledger.start_run(target, kind="validate", phase=name)
                await ledger.update_run(
                    target, run_id, status="done" if result.ok else "invalid", validation_ok=result.ok
                )
            except asyncpg.InsufficientPrivilegeError as e:
                log.warning("validation of %s not recorded in the ledger: %s", name, e)
        return result


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
        return [
            unloaded(p)
            if p in broken
            else await _phase_status(target, source, phases[p], states.get(p), sample_seconds)
            for p in every
        ]


async def _phase_status(
    target: asyncpg.Pool, source: asyncpg.Pool, ph: Phase, st: asyncpg.Record | None, sample_seconds: float
) -> PhaseStatus:
    """The line of one phase (its ledger row ``st``, None when pending)."""
    p = ph.name
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
    return PhaseStatus(
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


async def _sync_status(source: asyncpg.Pool, phase: Phase, st: asyncpg.Record | None) -> dict[str, Any]:
    """What status shows of live sync: is capture on, how many changes wait and how old the oldest is, the last
    sync, the cutover."""
    if not phase.tables:
        return {}
    cap = await capture_state.state(source, phase.name)
    if st is None and cap.state == "off" and not cap.waiting:
        return {}  # pending; but capture a killed start left on the source (two databases) shows
    cut_over_at = st.get("cut_over_at") if st is not None else None
    return {
        "capture": "cut over" if cut_over_at and cap.state == "off" else cap.state,
        "changes_waiting": cap.waiting if cap.state != "off" or cap.waiting else None,
        "oldest_change_seconds": cap.oldest_seconds,
        "last_sync_at": st.get("last_sync_at") if st is not None else None,
        "cut_over_at": cut_over_at,
    }


async def _live_progress(
    target: asyncpg.Pool, source: asyncpg.Pool, phase: Phase, run: asyncpg.Record, sample_seconds: float
) -> LiveProgress | None:
    """The progress of a run under way, from its checkpoints read twice, ``sample_seconds`` apart; None when the
    run's session is gone (it died: the next run marks it interrupted)."""
    if not await fetch_val(target, "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", run["pid"]):
        return None
    first = await ledger.progress_by_table(target, phase.name)
    await asyncio.sleep(sample_seconds)
    now = {r["target"]: r for r in await ledger.progress_by_table(target, phase.name)}
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
        latest = await ledger.latest_runs(target)
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
