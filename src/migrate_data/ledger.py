"""The tool's own tables (schema ``migrate_data`` in the target): runs, phases, checkpoints, rejects.

Also the advisory lock that lets one migrate-data run at a time write to a database.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from .compile import LEDGER_SCHEMA as SCHEMA
from .db import Executor, execute, fetch_all, fetch_one, fetch_val
from .errors import LockHeld

log = logging.getLogger(__name__)

LOCK_KEY = 0x6D69677261746564  # "migrated"
DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.runs (
    id                bigserial PRIMARY KEY,
    kind              text NOT NULL,
    phase             text,
    status            text NOT NULL DEFAULT 'running',
    started_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at       timestamptz,
    operator          text NOT NULL DEFAULT current_user,
    host              text,
    pid               integer NOT NULL DEFAULT pg_backend_pid(),
    rows              jsonb NOT NULL DEFAULT '{{}}',
    rejects           bigint NOT NULL DEFAULT 0,
    validation_ok     boolean,
    report_path       text,
    backup_path       text,
    error             text,
    predicted_seconds double precision
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.phases (
    phase        text PRIMARY KEY,
    state        text NOT NULL,
    revision     text,
    run_id       bigint,
    validated    boolean,
    backup_path  text,
    pre_state    jsonb,
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.checkpoints (
    phase         text NOT NULL,
    target        text NOT NULL,
    part          integer NOT NULL,
    lo            text[],
    hi            text[],
    last_key      text[],
    rows_read     bigint NOT NULL DEFAULT 0,
    rows_written  bigint NOT NULL DEFAULT 0,
    rejected      bigint NOT NULL DEFAULT 0,
    done          boolean NOT NULL DEFAULT false,
    seconds       double precision NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (phase, target, part)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.rejects (
    id          bigserial PRIMARY KEY,
    phase       text NOT NULL,
    target      text NOT NULL,
    source      text NOT NULL,
    source_key  text[] NOT NULL,
    sqlstate    text NOT NULL,
    message     text NOT NULL,
    detail      text,
    row         jsonb,
    run_id      bigint,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (phase, target, source_key)
);
"""


async def ensure(db: Executor) -> None:
    """Create the ledger schema if missing (serialised, so concurrent first runs do not collide)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            await ensure(conn)
        return
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY - 1)
        await db.execute(DDL)


async def exists(db: Executor) -> bool:
    return bool(await fetch_val(db, "SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.runs"))


@asynccontextmanager
async def exclusive(pool: asyncpg.Pool, *, what: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold the database's migrate-data advisory lock for the block, or raise LockHeld naming the holder."""
    async with pool.acquire() as conn:
        got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY)
        if not got:
            holder = await holder_of_lock(conn)
            raise LockHeld(
                f"another migrate-data run holds the lock on this database; not starting {what}",
                detail=holder,
                hint="wait for it to finish, or check it with `migrate-data status`",
            )
        try:
            yield conn
        finally:
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def holder_of_lock(db: Executor) -> str:
    row = await fetch_one(
        db,
        f"""SELECT a.pid, a.usename, COALESCE(a.client_hostname, host(a.client_addr), 'local socket') AS client,
                   a.backend_start, r.kind, r.phase, r.host, r.started_at
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            LEFT JOIN LATERAL (SELECT kind, phase, host, started_at FROM {SCHEMA}.runs
                               WHERE pid = l.pid AND status = 'running' ORDER BY id DESC LIMIT 1) r ON to_regclass('{SCHEMA}.runs') IS NOT NULL
            WHERE l.locktype = 'advisory' AND l.granted
              AND l.classid = ($1::bigint >> 32)::oid AND l.objid = ($1::bigint & 4294967295)::oid""",
        LOCK_KEY,
    )
    if row is None:
        return "the holder has just gone; try again"
    what = f"{row['kind']} {row['phase'] or ''}".strip() if row["kind"] else "a run"
    since = row["started_at"] or row["backend_start"]
    return (
        f"held by {what} of user {row['usename']} from {row['host'] or row['client']} "
        f"(backend pid {row['pid']}) since {since:%Y-%m-%d %H:%M:%S %Z}"
    )


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
) -> None:
    await execute(
        db,
        f"""INSERT INTO {SCHEMA}.phases AS p (phase, state, revision, run_id, validated, backup_path, pre_state)
            VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
            ON CONFLICT (phase) DO UPDATE SET state = EXCLUDED.state,
                revision = COALESCE(EXCLUDED.revision, p.revision), run_id = COALESCE(EXCLUDED.run_id, p.run_id),
                validated = EXCLUDED.validated, backup_path = COALESCE(EXCLUDED.backup_path, p.backup_path),
                pre_state = COALESCE(EXCLUDED.pre_state, p.pre_state), updated_at = clock_timestamp()""",
        phase,
        state,
        revision,
        run_id,
        validated,
        backup_path,
        json.dumps(pre_state) if pre_state is not None else None,
    )


# -- checkpoints and rejects ------------------------------------------------------------------
async def checkpoints(db: Executor, phase: str, target: str | None = None) -> list[asyncpg.Record]:
    return await fetch_all(
        db,
        f"SELECT * FROM {SCHEMA}.checkpoints WHERE phase = $1 AND ($2::text IS NULL OR target = $2) ORDER BY target, part",
        phase,
        target,
    )


async def reset_checkpoints(db: Executor, phase: str) -> None:
    await execute(db, f"DELETE FROM {SCHEMA}.checkpoints WHERE phase = $1", phase)


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


async def clear_rejects(db: Executor, phase: str) -> None:
    await execute(db, f"DELETE FROM {SCHEMA}.rejects WHERE phase = $1", phase)
