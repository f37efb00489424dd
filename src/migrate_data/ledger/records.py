"""The ledger's records: runs, phase states, checkpoints, rejects, what a phase wrote, the tables it finished."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import asyncpg

from ..db import Executor, execute, fetch_all, fetch_val
from ..sql import LEDGER_SCHEMA as SCHEMA

__all__ = [
    "mark_synced",
    "mark_cut_over",
    "quarantine",
    "rejected_among",
    "clear_rejects_of",
    "start_run",
    "RUN_FIELDS",
    "update_run",
    "runs",
    "close_abandoned_runs",
    "phase_states",
    "set_phase",
    "checkpoints",
    "reset_checkpoints",
    "restart_checkpoints",
    "add_checkpoints",
    "advance_checkpoint",
    "progress_by_table",
    "latest_runs",
    "reject_counts",
    "rejects",
    "rejected_keys",
    "rejected_tables",
    "clear_rejects",
    "mark_write",
    "finished_tables",
    "mark_finished",
    "unmark_finished",
    "forget_phase_writes",
    "add_rollback_dump",
]

log = logging.getLogger(__name__)


async def mark_synced(conn: asyncpg.Connection, phase: str) -> None:
    """Stamp the phase's last sync, in the transaction that applied its changes."""
    await conn.execute(f"UPDATE {SCHEMA}.phases SET last_sync_at = clock_timestamp() WHERE phase = $1", phase)


async def mark_cut_over(conn: asyncpg.Connection, phase: str) -> None:
    await conn.execute(f"UPDATE {SCHEMA}.phases SET cut_over_at = clock_timestamp() WHERE phase = $1", phase)


async def quarantine(
    conn: asyncpg.Connection,
    *,
    phase: str,
    target: str,
    source: str,
    key: list[str],
    error: asyncpg.PostgresError | None = None,
    row: str | None,
    run_id: int | None,
    sqlstate: str | None = None,
    message: str | None = None,
    detail: str | None = None,
) -> None:
    """Put one source row in migrate_data.rejects (or refresh its entry): the error that refused it, or the
    ``sqlstate``, ``message`` and ``detail`` given."""
    if error is not None:
        sqlstate, message, detail = error.sqlstate, str(error), getattr(error, "detail", None)
    await conn.execute(
        f"""INSERT INTO {SCHEMA}.rejects (phase, target, source, source_key, sqlstate, message, detail, row, run_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9)
            ON CONFLICT (phase, target, source_key) DO UPDATE SET sqlstate = EXCLUDED.sqlstate,
                message = EXCLUDED.message, detail = EXCLUDED.detail, row = EXCLUDED.row,
                run_id = EXCLUDED.run_id, created_at = clock_timestamp()""",
        phase,
        target,
        source,
        key,
        sqlstate,
        message,
        detail,
        row,
        run_id,
    )


async def rejected_among(
    conn: asyncpg.Connection, phase: str, target: str, keys: list[list[str]]
) -> set[tuple[str, ...]]:
    """Which of these source keys are quarantined for ``target``."""
    rows = await conn.fetch(
        f"""SELECT source_key FROM {SCHEMA}.rejects WHERE phase = $1 AND target = $2 AND source_key IN
            (SELECT ARRAY(SELECT jsonb_array_elements_text(k)) FROM jsonb_array_elements($3::jsonb) AS k)""",
        phase,
        target,
        json.dumps(keys),
    )
    return {tuple(r["source_key"]) for r in rows}


async def clear_rejects_of(conn: asyncpg.Connection, phase: str, target: str, keys: list[list[str]]) -> int:
    """Forget the rejects of these source keys (rows copied now, or gone from the source)."""
    if not keys:
        return 0
    status = await conn.execute(
        f"""DELETE FROM {SCHEMA}.rejects WHERE phase = $1 AND target = $2 AND source_key IN
            (SELECT ARRAY(SELECT jsonb_array_elements_text(k)) FROM jsonb_array_elements($3::jsonb) AS k)""",
        phase,
        target,
        json.dumps(keys),
    )
    return int(status.rsplit(" ", 1)[-1])


# -- runs -----------------------------------------------------------------------------------
async def start_run(db: Executor, *, kind: str, phase: str | None) -> int:
    return await fetch_val(
        db,
        f"INSERT INTO {SCHEMA}.runs (kind, phase, host) VALUES ($1, $2, $3) RETURNING id",
        kind,
        phase,
        socket.gethostname(),
    )


RUN_FIELDS = ("rows", "rejects", "validation_ok", "report_path", "backup_path", "error", "predicted_seconds")


async def update_run(db: Executor, run_id: int, *, status: str | None = None, **fields: Any) -> None:
    """Record fields of a run; a ``status`` other than running also stamps its end."""
    sets: list[str] = []
    args: list[Any] = [run_id]
    if status is not None:
        args.append(status)
        sets += [f"status = ${len(args)}", "finished_at = clock_timestamp()"]
    for name, value in fields.items():
        if name not in RUN_FIELDS:
            raise ValueError(f"not a run field: {name}")
        args.append(json.dumps(value) if name == "rows" else value)
        sets.append(f"{name} = ${len(args)}" + ("::jsonb" if name == "rows" else ""))
    if sets:
        await execute(db, f"UPDATE {SCHEMA}.runs SET {', '.join(sets)} WHERE id = $1", *args)


async def runs(db: Executor, *, phase: str | None = None, limit: int = 50) -> list[asyncpg.Record]:
    return await fetch_all(
        db, f"SELECT * FROM {SCHEMA}.runs WHERE $1::text IS NULL OR phase = $1 ORDER BY id DESC LIMIT $2", phase, limit
    )


async def close_abandoned_runs(db: Executor) -> None:
    """Mark runs left 'running' by a process that died (its backend is gone) as 'interrupted'."""
    await execute(
        db,
        f"""UPDATE {SCHEMA}.runs SET status = 'interrupted', finished_at = clock_timestamp()
                          WHERE status = 'running' AND pid <> pg_backend_pid()
                            AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = runs.pid)""",
    )


# -- phases ---------------------------------------------------------------------------------
async def phase_states(db: Executor) -> dict[str, asyncpg.Record]:
    return {r["phase"]: r for r in await fetch_all(db, f"SELECT * FROM {SCHEMA}.phases")}


async def set_phase(
    db: Executor,
    phase: str,
    *,
    state: str,
    revision: str | None = None,
    run_id: int | None = None,
    validated: bool | None = None,
    backup_path: str | None = None,
    pre_state: dict[str, Any] | None = None,
    start: bool = False,
) -> None:
    """Record a phase's state; ``start`` marks a new start: the snapshot taken now tells, at rollback, which target
    rows were there before the phase (committed before this transaction) from those written after it."""
    await execute(
        db,
        f"""INSERT INTO {SCHEMA}.phases AS p (phase, state, revision, run_id, validated, backup_path, pre_state,
                                              started_snapshot)
            VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, CASE WHEN $8 THEN pg_current_snapshot()::text END)
            ON CONFLICT (phase) DO UPDATE SET state = EXCLUDED.state,
                revision = COALESCE(EXCLUDED.revision, p.revision), run_id = COALESCE(EXCLUDED.run_id, p.run_id),
                validated = EXCLUDED.validated, backup_path = COALESCE(EXCLUDED.backup_path, p.backup_path),
                pre_state = COALESCE(EXCLUDED.pre_state, p.pre_state),
                started_snapshot = CASE WHEN $8 THEN EXCLUDED.started_snapshot ELSE p.started_snapshot END,
                rollback_dumps = CASE WHEN $8 THEN '{{}}' ELSE p.rollback_dumps END,
                updated_at = clock_timestamp()""",
        phase,
        state,
        revision,
        run_id,
        validated,
        backup_path,
        json.dumps(pre_state) if pre_state is not None else None,
        start,
    )


# -- checkpoints and rejects ------------------------------------------------------------------
async def checkpoints(db: Executor, phase: str, target: str | None = None) -> list[asyncpg.Record]:
    return await fetch_all(
        db,
        f"SELECT * FROM {SCHEMA}.checkpoints WHERE phase = $1 AND ($2::text IS NULL OR target = $2) ORDER BY target, part",
        phase,
        target,
    )


async def reset_checkpoints(db: Executor, phase: str, target: str | None = None) -> None:
    """Forget the key ranges of a phase (of one of its tables): the next run makes them anew."""
    await execute(
        db, f"DELETE FROM {SCHEMA}.checkpoints WHERE phase = $1 AND ($2::text IS NULL OR target = $2)", phase, target
    )


async def restart_checkpoints(db: Executor, phase: str, target: str) -> None:
    """Keep a table's key ranges but start each one again from its beginning (``--recheck``)."""
    await execute(
        db,
        f"UPDATE {SCHEMA}.checkpoints SET done = false, last_key = NULL, rows_read = 0, rows_written = 0, rejected = 0, "
        "seconds = 0 WHERE phase = $1 AND target = $2",
        phase,
        target,
    )


async def add_checkpoints(
    conn: asyncpg.Connection, phase: str, target: str, parts: list[tuple[str | None, Any, Any]]
) -> None:
    """A table's key ranges, ``(leaf partition or None, lo, hi)`` each, numbered in order; existing ones are kept."""
    await conn.executemany(
        f"INSERT INTO {SCHEMA}.checkpoints (phase, target, part, lo, hi, source) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        [(phase, target, i, lo, hi, leaf) for i, (leaf, lo, hi) in enumerate(parts)],
    )


async def advance_checkpoint(
    db: Executor, phase: str, target: str, part: int, last: Any, read: int, written: int, rejected: int, *, done: bool
) -> None:
    """One batch of a key range committed (in the batch's own transaction): where the range is now, and its counts."""
    await execute(
        db,
        f"""UPDATE {SCHEMA}.checkpoints SET last_key = $4, rows_read = rows_read + $5,
                rows_written = rows_written + $6, rejected = rejected + $7, done = $8, updated_at = clock_timestamp()
            WHERE phase = $1 AND target = $2 AND part = $3""",
        phase,
        target,
        part,
        last,
        read,
        written,
        rejected,
        done,
    )


async def progress_by_table(db: Executor, phase: str) -> list[asyncpg.Record]:
    """Rows read so far per table of a phase, whether all its ranges are done, and the time of the reading."""
    return await fetch_all(
        db,
        f"""SELECT target, sum(rows_read)::bigint AS rows, bool_and(done) AS done, clock_timestamp() AS at
            FROM {SCHEMA}.checkpoints WHERE phase = $1 GROUP BY target""",
        phase,
    )


async def latest_runs(db: Executor) -> dict[str, int]:
    """The id of the latest run (kind ``run``) of each phase."""
    rows = await fetch_all(db, f"SELECT phase, max(id) AS id FROM {SCHEMA}.runs WHERE kind = 'run' GROUP BY phase")
    return {r["phase"]: r["id"] for r in rows}


async def reject_counts(db: Executor, phase: str) -> dict[str, int]:
    rows = await fetch_all(
        db, f"SELECT target, count(*) AS n FROM {SCHEMA}.rejects WHERE phase = $1 GROUP BY target", phase
    )
    return {r["target"]: r["n"] for r in rows}


async def rejects(db: Executor, phase: str, *, limit: int = 100) -> list[asyncpg.Record]:
    return await fetch_all(
        db,
        f"SELECT target, source, source_key, sqlstate, message, detail, row FROM {SCHEMA}.rejects "
        f"WHERE phase = $1 ORDER BY target, id LIMIT $2",
        phase,
        limit,
    )


async def rejected_keys(db: Executor, phase: str, target: str) -> list[list[str]]:
    """The source keys of the rows quarantined for one target table."""
    rows = await fetch_all(
        db, f"SELECT source_key FROM {SCHEMA}.rejects WHERE phase = $1 AND target = $2", phase, target
    )
    return [list(r["source_key"]) for r in rows]


async def rejected_tables(db: Executor, phase: str) -> set[str]:
    """The target tables of ``phase`` with rows in quarantine."""
    rows = await fetch_all(db, f"SELECT DISTINCT target FROM {SCHEMA}.rejects WHERE phase = $1", phase)
    return {r["target"] for r in rows}


async def clear_rejects(db: Executor, phase: str) -> None:
    await execute(db, f"DELETE FROM {SCHEMA}.rejects WHERE phase = $1", phase)


# -- what a phase wrote ------------------------------------------------------------------------
async def mark_write(conn: asyncpg.Connection, phase: str, target: str, run_id: int | None) -> None:
    """Record, inside the (sub)transaction that writes target rows, that this phase wrote them."""
    await conn.execute(
        f"INSERT INTO {SCHEMA}.writes (phase, target, run_id) VALUES ($1, $2, $3)", phase, target, run_id
    )


async def finished_tables(db: Executor, phase: str) -> set[str]:
    return {r["target"] for r in await fetch_all(db, f"SELECT target FROM {SCHEMA}.finished WHERE phase = $1", phase)}


async def mark_finished(db: Executor, phase: str, target: str) -> None:
    await execute(
        db, f"INSERT INTO {SCHEMA}.finished (phase, target) VALUES ($1, $2) ON CONFLICT DO NOTHING", phase, target
    )


async def unmark_finished(db: Executor, phase: str, target: str) -> None:
    await execute(db, f"DELETE FROM {SCHEMA}.finished WHERE phase = $1 AND target = $2", phase, target)


async def forget_phase_writes(db: Executor, phase: str) -> None:
    """Once a phase is rolled back: its checkpoints, rejects, write marks and finished tables go."""
    for table in ("checkpoints", "rejects", "writes", "finished"):
        await execute(db, f"DELETE FROM {SCHEMA}.{table} WHERE phase = $1", phase)
    await execute(db, f"UPDATE {SCHEMA}.phases SET last_sync_at = NULL, cut_over_at = NULL WHERE phase = $1", phase)


async def add_rollback_dump(db: Executor, phase: str, path: str) -> None:
    await execute(
        db,
        f"UPDATE {SCHEMA}.phases SET rollback_dumps = array_append(rollback_dumps, $2) WHERE phase = $1",
        phase,
        path,
    )
