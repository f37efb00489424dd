"""Rehearse phases on a staging copy, time every step, and predict the production night."""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from dataclasses import dataclass, field, replace

import asyncpg

from . import api, ledger
from .catalog import read_table
from .compile import CompiledTable
from .copier import CopyEvent, CopyOptions
from .db import fetch_all, fetch_val, open_pool
from .errors import BadInput
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
from .settings import Settings, redact
from .sql import qname
from .staging import build_staging, source_tables

log = logging.getLogger(__name__)


def parse_window(text: str) -> tuple[dt.time, dt.time, float]:
    """``02:00-06:00 [zone]`` -> (start, end, length in seconds); a window may cross midnight."""
    try:
        a, b = (dt.time.fromisoformat(p.strip()) for p in text.split()[0].split("-", 1))
    except ValueError as e:
        raise BadInput(f"--window {text}: expected HH:MM-HH:MM") from e
    length = (dt.datetime.combine(dt.date.min, b) - dt.datetime.combine(dt.date.min, a)).total_seconds()
    return a, b, length if length > 0 else length + 86400


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
    upto = list(phases_all)[: max(list(phases_all).index(n) for n in wanted) + 1]  # the last wanted and before
    window_seconds = parse_window(window)[2] if window else None
    started = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    async with open_pool(production.database_url, max_size=1) as prod:
        sources = await source_tables([phases_all[n] for n in upto], prod)
    # no session of ours on production while it serves as a TEMPLATE
    built = await build_staging(production, staging_url, sources, rebuild=rebuild, use_existing=use_existing)
    async with open_pool(production.database_url, max_size=2) as prod:
        staging = production.with_(database_url=staging_url, source_url=None)
        async with open_pool(staging_url, max_size=2) as stag:
            r = _Rehearsal(staging, stag, prod, started, window_seconds)
            states = await ledger.phase_states(stag) if await ledger.exists(stag) else {}
            for name in upto:
                applied = states.get(name) is not None and states[name]["state"] == "applied"
                options = api.RunOptions(backup=False, jobs=jobs, batch_size=batch_size)
                if name in wanted:
                    await r.phase(name, phases_all[name], options)
                elif not applied and not phases_all[name].backup:  # what the wanted phases need, set up
                    await r.timed_run(name, "setup", options)
    result = RehearsalResult(
        phases=tuple(wanted),
        staging=redact(staging_url),
        production=redact(production.database_url),
        built=built,
        steps=tuple(r.steps),
        tables=tuple(r.tables),
        predictions=tuple(r.predictions),
        drift=tuple(r.drifts),
        window=window,
        window_seconds=window_seconds,
        started_at=started_at,
        seconds=round(time.monotonic() - started, 3),
        validations_ok=r.valid,
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


@dataclass
class _Rehearsal:
    """One rehearsal as it runs the phases on staging (``staging``, the pool ``stag``) and compares with production
    (``prod``): every step timed from ``t0``, the predictions, the drift, whether every validation passed."""

    staging: Settings
    stag: asyncpg.Pool
    prod: asyncpg.Pool
    t0: float
    window_seconds: float | None
    steps: list[Step] = field(default_factory=list)
    tables: list[TablePrediction] = field(default_factory=list)
    predictions: list[PhasePrediction] = field(default_factory=list)
    drifts: list[Drift] = field(default_factory=list)
    valid: bool = True

    async def phase(self, name: str, phase: Phase, options: api.RunOptions) -> None:
        """Run the phase, roll it back, run it again and recheck it; predict production; find the drift."""
        # Rehearse the production night in miniature: as many batches as production will run, and the same
        # tables split into concurrent key ranges, whatever the size of staging.  Per-batch costs (a
        # lookup's join, the checkpoint) then scale with the rows like the rest.
        ratio = await _size_ratio(phase, self.stag, self.prod)
        options = replace(
            options,
            split_rows=max(1, int(options.split_rows / ratio)),
            batch_size=max(100, int(options.batch_size / ratio)),
        )
        run1 = await self.timed_run(name, "run", options)
        t = time.monotonic()
        rb = await api.rollback(self.staging, name)
        self.steps.append(Step(name, "rollback", None, t - self.t0, time.monotonic() - t, sum(rb.deleted.values())))
        run2 = await self.timed_run(name, "rerun", options)
        recheck = await self.timed_run(name, "recheck", replace(options, recheck=True))
        self.valid = self.valid and all(r.validation is not None and r.validation.ok for r in (run1, run2, recheck))
        phase_tables, pred = await self._predict(name, run1, recheck, options.jobs)
        self.tables += phase_tables
        self.predictions.append(pred)
        compiled, _ = await compile_phase(phase, source=self.stag, target=self.stag)
        self.drifts += await drift([ct for ct, _ in compiled], self.stag, self.prod)
        self.drifts += [
            Drift(
                "rows",
                t.target,
                f"production has {t.production_rows / t.staging_rows:.1f}× the "
                f"rows of staging ({t.production_rows:,} vs {t.staging_rows:,})",
            )
            for t in phase_tables
            if t.staging_rows and abs(t.production_rows / t.staging_rows - 1) > 0.05
        ]

    async def timed_run(self, name: str, step: str, options: api.RunOptions) -> api.RunResult:
        """Run the phase on staging, timing the copy of each table (or the whole step, for a schema-only phase)."""
        began: dict[str, float] = {}
        before = len(self.steps)

        def on_event(e: CopyEvent) -> None:
            now = time.monotonic()
            if e.kind == "start":
                began[e.target] = now
            elif e.kind == "done":
                start = began.get(e.target, now - e.seconds)
                self.steps.append(Step(name, step, e.target, start - self.t0, now - start, e.rows))

        t = time.monotonic()
        result = await api.run_phase(self.staging, name, options, on_event=on_event)
        if len(self.steps) == before:  # a schema-only phase: one bar for the whole step
            self.steps.append(Step(name, step, None, t - self.t0, time.monotonic() - t))
        return result

    async def _predict(
        self, name: str, run1: api.RunResult, recheck: api.RunResult, jobs: int
    ) -> tuple[list[TablePrediction], PhasePrediction]:
        """Scale what staging measured to production's row counts; fixed costs are not scaled."""
        copy_steps = [s for s in self.steps if s.phase == name and s.step == "run" and s.table]
        out: list[TablePrediction] = []
        for t in run1.tables:
            s = next((x for x in copy_steps if x.table == t.target), None)
            seconds = s.seconds if s else t.seconds
            src = QualifiedName.parse(t.source)
            ratio = await _estimate_rows(self.prod, src) / max(await _estimate_rows(self.stag, src), 1.0)
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
        copy_wall = (
            (max(s.start + s.seconds for s in copy_steps) - min(s.start for s in copy_steps)) if copy_steps else 0.0
        )
        staged_copy = sum(t.staging_seconds for t in out)
        scale = (sum(t.predicted_seconds for t in out) / staged_copy) if staged_copy else 1.0
        validation = run1.validation.seconds if run1.validation else 0.0
        fixed = max(run1.seconds - copy_wall - validation, 0.0)
        predicted = fixed + (copy_wall + validation) * scale
        catch_up = max(recheck.seconds - fixed, 0.0) * scale + fixed
        low, high = predicted * (1 - MARGIN), predicted * (1 + MARGIN)
        window = self.window_seconds
        fits = None if window is None else high <= window
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
