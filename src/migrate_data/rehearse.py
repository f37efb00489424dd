"""Rehearse phases on a staging copy, time every step, and predict the production night."""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import asyncpg

from . import api, backup, ledger
from .catalog import Table, parents_first, read_table
from .compile import CompiledTable
from .copier import CopyEvent, CopyOptions
from .db import fetch_all, fetch_val, open_pool
from .errors import BadInput, MigrationError
from .identity import (
    DatabaseIdentity,
    database_identity,
    refuse_if_it_reaches_production,
    refuse_if_production,
    server_identity,
)
from .mapping import Phase, QualifiedName
from .preflight import compile_phase
from .rehearsal import (
    MARGIN,
    Drift,
    PhasePrediction,
    RehearsalResult,
    Step,
    TablePrediction,
    save_predictions,
    save_rehearsal,
)
from .settings import DatabaseURL, Settings, redact
from .sql import qi, qname

log = logging.getLogger(__name__)


def parse_window(text: str) -> tuple[dt.time, dt.time, float]:
    """``02:00-06:00 [zone]`` -> (start, end, length in seconds); a window may cross midnight."""
    try:
        a, b = (dt.time.fromisoformat(p.strip()) for p in text.split()[0].split("-", 1))
    except ValueError as e:
        raise BadInput(f"--window {text}: expected HH:MM-HH:MM") from e
    length = (dt.datetime.combine(dt.date.min, b) - dt.datetime.combine(dt.date.min, a)).total_seconds()
    return a, b, length if length > 0 else length + 86400


@asynccontextmanager
async def _maintenance_pool(url: DatabaseURL, staging_name: str) -> AsyncIterator[asyncpg.Pool]:
    """A one-connection pool on the staging server's maintenance database (postgres, else template1)."""
    names = [n for n in ("postgres", "template1") if n != staging_name]
    async with AsyncExitStack() as stack:
        for name in names:
            try:
                pool = await stack.enter_async_context(open_pool(url.maintenance(name), max_size=1))
            except MigrationError as e:
                if name == names[-1] or not isinstance(e.__cause__, asyncpg.InvalidCatalogNameError):
                    raise
                continue
            yield pool
            return


async def build_staging(
    production: Settings, staging_url: str, tables: list[QualifiedName], *, rebuild: bool, use_existing: bool
) -> str:
    """Create the staging database: TEMPLATE on the same server, else pg_dump | pg_restore of ``tables``.

    Whatever the spelling of the URLs, nothing is dropped or written on a database that resolves to production
    (or to its source database): the servers and databases are compared by what they say they are.
    """
    staging = DatabaseURL.parse(staging_url)
    prods: dict[str, DatabaseIdentity] = {}
    for url in dict.fromkeys(u for u in (production.database_url, production.source_url) if u):
        async with open_pool(url, max_size=1) as pool:
            prods[redact(url)] = await database_identity(pool)
    prod = prods[redact(production.database_url)]
    if use_existing:
        await refuse_if_it_reaches_production(staging, prods)
        return "existing"
    name = staging.database
    if not name:
        raise BadInput(f"the staging URL {staging} names no database", hint="end it with /the_staging_database")
    async with _maintenance_pool(staging, name) as admin:
        server = await server_identity(admin)
        oid = await fetch_val(admin, "SELECT oid FROM pg_database WHERE datname = $1", name)
        refuse_if_production(DatabaseIdentity(server, name, oid), staging, prods)
        if oid is not None:
            if not rebuild:
                raise BadInput(
                    f"the staging database {name} exists",
                    hint="pass --rebuild to replace it, or --use-existing to rehearse on it as it is",
                )
            log.info("dropping the staging database %s (oid %s) on %s", name, oid, staging)
            await admin.execute(f"DROP DATABASE {qi(name)} WITH (FORCE)")
        if server.same_as(prod.server):
            try:
                await admin.execute(f"CREATE DATABASE {qi(name)} TEMPLATE {qi(prod.name)}")
                await refuse_if_it_reaches_production(staging, prods)
                return "template"
            except asyncpg.ObjectInUseError:
                log.info("production is in use; copying its tables with pg_dump instead of TEMPLATE")
        await admin.execute(f"CREATE DATABASE {qi(name)}")
    await refuse_if_it_reaches_production(staging, prods)
    async with open_pool(production.database_url, max_size=1) as prod_pool:
        major = int(await fetch_val(prod_pool, "SHOW server_version_num")) // 10000
    dump = production.backups_dir / f"staging-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}.dump"
    await backup.dump(production.database_url, tables, dump, server_major=major)
    async with open_pool(staging_url, max_size=1) as stag:  # pg_dump -t dumps no schema, not even a table's own
        for schema in dict.fromkeys(t.schema for t in tables if t.schema):
            await stag.execute(f"CREATE SCHEMA IF NOT EXISTS {qi(schema)}")
    try:
        await backup.restore_all(staging_url, dump, server_major=major, leave_out=r" TRIGGER \S+ \S+ md_capture_")
    finally:
        dump.unlink(missing_ok=True)
    return "dump"


async def _source_tables(phases: list[Phase], db: asyncpg.Pool) -> list[QualifiedName]:
    """Every table the phases read (sources, lookups), and what their foreign keys need, parents first."""
    found: dict[str, Table] = {}
    todo = [
        n
        for phase in phases
        for tm in phase.tables
        for n in (tm.source, *(c.lookup.table for c in tm.columns if c.lookup))
    ]
    while todo:
        t = await read_table(db, todo.pop())
        if t is not None and str(t.qualified) not in found:
            found[str(t.qualified)] = t
            todo += [fk.ref_table for fk in t.foreign_keys]
    return [t.qualified for t in parents_first(list(found.values()))]


async def _estimate_rows(db: asyncpg.Pool, table: QualifiedName) -> float:
    """Rows of a table from the catalog (pg_class.reltuples), exact count(*) when never analyzed."""
    est = await fetch_val(db, "SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)", qname(table))
    if est is None or est < 0:
        est = await fetch_val(db, f"SELECT count(*) FROM {qname(table)}")
    return float(est)


async def drift(compiled: list[CompiledTable], staging: asyncpg.Pool, production: asyncpg.Pool) -> list[Drift]:
    """Differences between staging and production that would make the rehearsal's numbers wrong."""
    out: list[Drift] = []
    for ct in compiled:
        s, p = await read_table(staging, ct.source), await read_table(production, ct.source)
        if p is None or s is None:
            out.append(Drift("schema", str(ct.source), "missing in production" if p is None else "missing in staging"))
            continue
        scols = {c.name: c.type for c in s.columns}
        pcols = {c.name: c.type for c in p.columns}
        for name in sorted(set(scols) | set(pcols)):
            if scols.get(name) != pcols.get(name):
                out.append(
                    Drift(
                        "schema",
                        str(ct.source),
                        f"column {name}: staging {scols.get(name) or 'absent'}, "
                        f"production {pcols.get(name) or 'absent'}",
                    )
                )
        for c in ct.columns:
            if c.spec.kind not in ("column", "lookup"):
                continue
            q = f"SELECT DISTINCT ({c.base})::text AS v FROM {ct.from_} LIMIT 1001"
            svals = {r["v"] for r in await fetch_all(staging, q)}
            if len(svals) > 1000:
                continue  # a free-text column, not a set of values
            pvals = {r["v"] for r in await fetch_all(production, q)}
            new = sorted(v for v in pvals - svals if v is not None)
            if new and len(pvals) <= 1000:
                out.append(
                    Drift(
                        "values",
                        f"{ct.target}.{c.target}",
                        f"values in production but not in staging: {', '.join(map(repr, new[:10]))}",
                    )
                )
    return out


async def rehearse(
    production: Settings,
    names: list[str],
    *,
    staging_url: str,
    window: str | None = None,
    rebuild: bool = False,
    use_existing: bool = False,
    jobs: int = 2,
    batch_size: int = CopyOptions.batch_size,
) -> RehearsalResult:
    """Build staging, run each phase there (run, rollback, run again, recheck), predict production."""
    phases_all = api.project_phases(production)
    wanted = names or [p for p, ph in phases_all.items() if ph.tables]
    for n in wanted:
        if n not in phases_all:
            raise BadInput(f"no phase {n!r}", hint=f"phases: {', '.join(phases_all)}")
    last = max(list(phases_all).index(n) for n in wanted)
    window_seconds = parse_window(window)[2] if window else None
    started = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    async with open_pool(production.database_url, max_size=1) as prod:
        sources = await _source_tables([phases_all[n] for n in list(phases_all)[: last + 1]], prod)
    # no session of ours on production while it serves as a TEMPLATE
    built = await build_staging(production, staging_url, sources, rebuild=rebuild, use_existing=use_existing)
    async with open_pool(production.database_url, max_size=2) as prod:
        staging = production.with_(database_url=staging_url, source_url=None)
        steps: list[Step] = []
        tables: list[TablePrediction] = []
        predictions: list[PhasePrediction] = []
        drifts: list[Drift] = []
        valid = True
        async with open_pool(staging_url, max_size=2) as stag:
            states = await ledger.phase_states(stag) if await ledger.exists(stag) else {}
            for name in list(phases_all)[: last + 1]:
                applied = states.get(name) is not None and states[name]["state"] == "applied"
                options = api.RunOptions(backup=False, jobs=jobs, batch_size=batch_size)
                if name not in wanted:
                    if not applied and not phases_all[name].backup:
                        await _timed_run(staging, name, "setup", steps, started, options)
                    continue
                # Rehearse the production night in miniature: as many batches as production will run, and the same
                # tables split into concurrent key ranges, whatever the size of staging.  Per-batch costs (a
                # lookup's join, the checkpoint) then scale with the rows like the rest.
                ratio = await _size_ratio(phases_all[name], stag, prod)
                options = replace(
                    options,
                    split_rows=max(1, int(options.split_rows / ratio)),
                    batch_size=max(100, int(options.batch_size / ratio)),
                )
                run1 = await _timed_run(staging, name, "run", steps, started, options)
                t = time.monotonic()
                rb = await api.rollback(staging, name)
                steps.append(Step(name, "rollback", None, t - started, time.monotonic() - t, sum(rb.deleted.values())))
                run2 = await _timed_run(staging, name, "rerun", steps, started, options)
                recheck = await _timed_run(staging, name, "recheck", steps, started, replace(options, recheck=True))
                valid = valid and all(r.validation is not None and r.validation.ok for r in (run1, run2, recheck))
                phase_tables, pred = await _predict(name, run1, recheck, steps, stag, prod, window_seconds, jobs)
                tables += phase_tables
                predictions.append(pred)
                compiled, _ = await compile_phase(phases_all[name], source=stag, target=stag)
                drifts += await drift([ct for ct, _ in compiled], stag, prod)
                drifts += [
                    Drift(
                        "rows",
                        t.target,
                        f"production has {t.production_rows / t.staging_rows:.1f}× the "
                        f"rows of staging ({t.production_rows:,} vs {t.staging_rows:,})",
                    )
                    for t in phase_tables
                    if t.staging_rows and abs(t.production_rows / t.staging_rows - 1) > 0.05
                ]
    result = RehearsalResult(
        phases=tuple(wanted),
        staging=redact(staging_url),
        production=redact(production.database_url),
        built=built,
        steps=tuple(steps),
        tables=tuple(tables),
        predictions=tuple(predictions),
        drift=tuple(drifts),
        window=window,
        window_seconds=window_seconds,
        started_at=started_at,
        seconds=round(time.monotonic() - started, 3),
        validations_ok=valid,
    )
    paths = save_rehearsal(result, production.reports_dir)
    save_predictions(result, production.reports_dir)
    return RehearsalResult(**{**result.__dict__, "reports": {k: str(v) for k, v in paths.items()}})


async def _size_ratio(phase: Phase, stag: asyncpg.Pool, prod: asyncpg.Pool) -> float:
    """How many times larger production is than staging, for the phase's biggest source table."""
    best, ratio = -1.0, 1.0
    for tm in phase.tables:
        s = await _estimate_rows(stag, tm.source)
        if s > best:
            best, ratio = s, await _estimate_rows(prod, tm.source) / max(s, 1.0)
    return max(ratio, 1e-6)


async def _timed_run(
    settings: Settings, name: str, step: str, steps: list[Step], t0: float, options: api.RunOptions
) -> api.RunResult:
    began: dict[str, float] = {}
    before = len(steps)

    def on_event(e: CopyEvent) -> None:
        now = time.monotonic()
        if e.kind == "start":
            began[e.target] = now
        elif e.kind == "done":
            start = began.get(e.target, now - e.seconds)
            steps.append(Step(name, step, e.target, start - t0, now - start, e.rows))

    t = time.monotonic()
    result = await api.run_phase(settings, name, options, on_event=on_event)
    if len(steps) == before:  # a schema-only phase: one bar for the whole step
        steps.append(Step(name, step, None, t - t0, time.monotonic() - t))
    return result


async def _predict(
    name: str,
    run1: api.RunResult,
    recheck: api.RunResult,
    steps: list[Step],
    stag: asyncpg.Pool,
    prod: asyncpg.Pool,
    window_seconds: float | None,
    jobs: int,
) -> tuple[list[TablePrediction], PhasePrediction]:
    """Scale what staging measured to production's row counts; fixed costs are not scaled."""
    copy_steps = [s for s in steps if s.phase == name and s.step == "run" and s.table]
    out: list[TablePrediction] = []
    for t in run1.tables:
        s = next((x for x in copy_steps if x.table == t.target), None)
        seconds = s.seconds if s else t.seconds
        src = QualifiedName.parse(t.source)
        ratio = await _estimate_rows(prod, src) / max(await _estimate_rows(stag, src), 1.0)
        prod_rows = int(round(t.rows_read * ratio))
        rate = t.rows_read / seconds if seconds > 0 else float("inf")
        out.append(
            TablePrediction(
                name,
                t.target,
                t.source,
                t.rows_read,
                prod_rows,
                round(seconds, 3),
                round(rate, 1),
                round(prod_rows / rate if rate else 0.0, 3),
            )
        )
    copy_wall = (max(s.start + s.seconds for s in copy_steps) - min(s.start for s in copy_steps)) if copy_steps else 0.0
    staged_copy = sum(t.staging_seconds for t in out)
    scale = (sum(t.predicted_seconds for t in out) / staged_copy) if staged_copy else 1.0
    validation = run1.validation.seconds if run1.validation else 0.0
    fixed = max(run1.seconds - copy_wall - validation, 0.0)
    predicted = fixed + (copy_wall + validation) * scale
    catch_up = max(recheck.seconds - fixed, 0.0) * scale + fixed
    low, high = predicted * (1 - MARGIN), predicted * (1 + MARGIN)
    fits = None if window_seconds is None else high <= window_seconds
    advice = advise(out, predicted, catch_up, jobs) if fits is False else []
    return out, PhasePrediction(
        name,
        round(run1.seconds, 3),
        round(predicted, 3),
        round(low, 3),
        round(high, 3),
        round(catch_up, 3),
        fits,
        tuple(advice),
    )


def advise(tables: list[TablePrediction], predicted: float, catch_up: float, jobs: int) -> list[str]:
    """What would make a phase that does not fit the window fit."""
    advice: list[str] = []
    biggest = max(tables, key=lambda t: t.predicted_seconds) if tables else None
    if biggest and predicted and biggest.predicted_seconds > 0.5 * predicted:
        advice.append(
            f"raise --jobs (now {jobs}): {biggest.target} is {biggest.predicted_seconds / predicted:.0%} "
            "of the night and a big table is copied in --jobs concurrent key ranges"
        )
    if len(tables) > 1:
        first: list[str] = []
        acc = 0.0
        for t in sorted(tables, key=lambda t: -t.predicted_seconds):
            if acc < predicted / 2:
                first.append(t.target)
                acc += t.predicted_seconds
        if len(first) < len(tables):
            advice.append(f"split the phase over two nights: {', '.join(first)} first, the rest the night after")
    advice.append(
        f"copy the bulk ahead of the window (the copy is idempotent and resumable), then run the phase "
        f"with --recheck inside the window as a catch-up: about {_hms(catch_up)}"
    )
    return advice


def _hms(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
