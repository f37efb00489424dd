"""Change capture as it is now, read-only: whether each captured table still has its triggers (on every partition)
and the columns its function names, what ``status`` shows of it, and the registry of what each phase captures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .capture_sql import EVENTS, PARTITIONS_SQL, SCHEMA, TRIGGERED_SQL, function_name, triggers_ok_sql
from .db import Executor


async def partitions(db: Executor, relation: str) -> list[str]:
    """The partitions of ``relation`` at every level (none for a plain table), as regclass text: a statement fires
    the statement-level triggers of the table it names only, a partition that is partitioned itself too."""
    if not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", relation):
        return []
    return [r["part"] for r in await db.fetch(PARTITIONS_SQL, relation)]


async def partition_problem(db: Executor, phase: str, name: str, relation: str) -> str | None:
    """Why the triggers of a captured partitioned table are not on exactly its partitions (one attached since has none,
    one detached still has them: its rows came or went without a write), or None."""
    want = set(await partitions(db, relation))
    have = {r["rel"]: r["enabled"] for r in await db.fetch(TRIGGERED_SQL, function_name(phase, name), relation)}
    missing = sorted(x for x in want if have.get(x) != len(EVENTS))
    stale = sorted(set(have) - want)
    parts = [f"partition {', '.join(missing)} of {name} has no capture (attached since?)"] if missing else []
    parts += [f"{', '.join(stale)} is no longer a partition of {name} (detached?)"] if stale else []
    return "; ".join(parts) or None


async def triggers_ok(db: Executor, phase: str) -> list[Any]:
    """``TRIGGERS_OK`` of ``phase``'s captured tables, from a registry of this release or of one before it."""
    recorded = await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'atttypes')",
        f"{SCHEMA}.capture",
    )
    return list(await db.fetch(triggers_ok_sql(bool(recorded)), phase))


# -- what status shows --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptureState:
    phase: str
    state: str  # "on" | "off" | "BROKEN" (a trigger missing or disabled) | "COLUMN GONE" | "COLUMN MOVED" |
    # "tables dropped"
    waiting: int = 0  # changes logged and not applied yet
    oldest_seconds: float | None = None  # age of the oldest of them
    tables: tuple[str, ...] = ()
    problem: str | None = None


async def state(db: Executor, phase: str) -> CaptureState:
    """Is capture on for ``phase`` (every trigger in place and enabled), and how far behind is sync."""
    if not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.capture"):
        return CaptureState(phase, "off")
    rows = await triggers_ok(db, phase)
    lag = await db.fetchrow(
        f"SELECT count(*) AS n, extract(epoch FROM clock_timestamp() - min(at))::float8 AS age "
        f"FROM {SCHEMA}.changes WHERE phase = $1",
        phase,
    )
    waiting, age = (lag["n"], lag["age"]) if lag is not None else (0, None)
    tables = tuple(r["source"] for r in rows)
    if not rows:
        return CaptureState(phase, "off", waiting, age)
    if not any(r["table_exists"] for r in rows):
        return CaptureState(phase, "tables dropped", waiting, age, tables)
    bad = [r["source"] for r in rows if r["enabled"] != len(EVENTS)]
    if bad:
        why = f"triggers missing or disabled on {', '.join(bad)}"
        return CaptureState(phase, "BROKEN", waiting, age, tables, why)
    gone = _columns(rows, "missing")
    if gone:
        why = (
            f"column {'; '.join(gone)} renamed, dropped or replaced by another under its name since capture started: "
            "writes are still logged, without their keys; sync re-derives every row that reads the table once the "
            "column is back (or the phase is rolled back and run again with its mapping changed)"
        )
        return CaptureState(phase, "COLUMN GONE", waiting, age, tables, why)
    for r in rows:
        problem = await partition_problem(db, phase, r["source"], r["relation"])
        if problem:
            return CaptureState(phase, "BROKEN", waiting, age, tables, problem)
    moved = _columns(rows, "moved")
    if moved:
        why = (
            f"column {'; '.join(moved)} dropped and added again, or of another type, since capture started: writes "
            "are logged without their keys until the next sync captures the table again (and re-derives it)"
        )
        return CaptureState(phase, "COLUMN MOVED", waiting, age, tables, why)
    return CaptureState(phase, "on", waiting, age, tables)


def _columns(rows: list[Any], field: str) -> list[str]:
    """``a, b of public.t`` for each existing table whose ``field`` (of ``triggers_ok``) lists columns."""
    return [f"{', '.join(r[field])} of {r['source']}" for r in rows if r["table_exists"] and r[field]]


async def registry(db: Executor, phase: str) -> dict[str, tuple[str, ...]]:
    """The captured tables of ``phase`` and the columns their log rows carry, as installed."""
    if not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.capture"):
        return {}
    return {
        r["source"]: tuple(r["columns"])
        for r in await db.fetch(f"SELECT source, columns FROM {SCHEMA}.capture WHERE phase = $1", phase)
    }


async def relations(db: Executor, phase: str) -> dict[str, str]:
    """The captured tables of ``phase``: name -> quoted relation."""
    if not await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.capture"):
        return {}
    rows = await db.fetch(f"SELECT source, relation FROM {SCHEMA}.capture WHERE phase = $1", phase)
    return {r["source"]: r["relation"] for r in rows}
