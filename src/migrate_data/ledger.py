"""The tool's own tables (schema ``migrate_data`` in the target): runs, phases, checkpoints, rejects.

Also the advisory lock that lets one migrate-data run at a time write to a database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from .compile import LEDGER_SCHEMA as SCHEMA
from .db import Executor, execute, fetch_all, fetch_one, fetch_val
from .errors import LockHeld, LockLost, MigrationError
from .settings import APPLICATION_NAME, DatabaseURL, redact_text

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
-- What a phase wrote: one row per (sub)transaction that wrote target rows, inserted in that same
-- (sub)transaction, so the row's own xmin is the xid those target rows carry.  A target row whose xmin is
-- one of these was written by the phase and has not been changed since (an UPDATE gives it a new xmin).
CREATE TABLE IF NOT EXISTS {SCHEMA}.writes (
    phase   text NOT NULL,
    target  text NOT NULL,
    run_id  bigint,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS writes_phase_target ON {SCHEMA}.writes (phase, target);
-- A table is finished only once its sequences are set and it is analyzed, after its last batch.
CREATE TABLE IF NOT EXISTS {SCHEMA}.finished (
    phase        text NOT NULL,
    target       text NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (phase, target)
);
ALTER TABLE {SCHEMA}.phases ADD COLUMN IF NOT EXISTS started_snapshot text;
ALTER TABLE {SCHEMA}.phases ADD COLUMN IF NOT EXISTS rollback_dumps text[] NOT NULL DEFAULT '{{}}';
-- The leaf partition a checkpoint's key range is in (NULL: the source table itself is not partitioned).
ALTER TABLE {SCHEMA}.checkpoints ADD COLUMN IF NOT EXISTS source text;
-- Live sync between nights (sync.py): when the phase's captured changes were last applied, and when the phase was
-- cut over (its source tables' writes blocked, the last changes applied, validated, capture removed).
ALTER TABLE {SCHEMA}.phases ADD COLUMN IF NOT EXISTS last_sync_at timestamptz;
ALTER TABLE {SCHEMA}.phases ADD COLUMN IF NOT EXISTS cut_over_at timestamptz;
-- The 64-bit id of a row's 32-bit xmin (valid for transactions less than 2^32 xids old); the frozen and
-- bootstrap xids (< 3) are older than anything.
CREATE OR REPLACE FUNCTION {SCHEMA}.full_xid(x xid) RETURNS xid8 LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN x::text::bigint < 3 THEN '3'::xid8 ELSE
        ((((c >> 32) - CASE WHEN x::text::bigint > (c & 4294967295) THEN 1 ELSE 0 END) << 32)
         | x::text::bigint)::text::xid8 END
    FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS c) s
$$;
"""


# Change capture (capture.py) lives in the SOURCE database, beside the tables it watches: the registry of what each
# phase captures, and the change log its triggers write.  The log has no constraint an insert could violate (no
# unique key: ids come from a sequence; no foreign key, no CHECK), so logging can never be what fails a write.
CAPTURE_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.changes (
    id      bigserial NOT NULL,
    phase   text NOT NULL,
    source  text NOT NULL,
    key     text[] NOT NULL,
    op      "char" NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS changes_phase_id ON {SCHEMA}.changes (phase, id);
CREATE TABLE IF NOT EXISTS {SCHEMA}.capture (
    phase         text NOT NULL,
    source        text NOT NULL,
    relation      text NOT NULL,
    columns       text[] NOT NULL,
    watched       text[],
    function      text NOT NULL,
    installed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (phase, source)
);
"""


async def ensure_capture(conn: asyncpg.Connection) -> None:
    """Create the change log and the capture registry if missing (in the source database; inside a transaction)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY - 1)
    await conn.execute(CAPTURE_DDL)


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
    error: asyncpg.PostgresError,
    row: str | None,
    run_id: int | None,
) -> None:
    """Put one source row in migrate_data.rejects (or refresh its entry), as the copier does."""
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
        error.sqlstate,
        str(error),
        getattr(error, "detail", None),
        row,
        run_id,
    )


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


# -- the lock: one migrate-data run at a time per database -------------------------------------
# The run's lock lives on a session of its own (LockSession).  Every batch checks, inside its transaction and just
# before its COMMIT, that this session still holds the lock on this database; the check also takes FENCE_KEY in
# shared mode until that COMMIT, and a new holder takes FENCE_KEY exclusively once before it starts, so it waits for
# every batch of an earlier holder that passed its check and has not committed yet.
FENCE_KEY = LOCK_KEY + 1
LOCK_SESSION_SETTINGS = {  # applied where the server knows them (idle_session_timeout is PostgreSQL 14+)
    "idle_session_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
    "statement_timeout": "0",
    "tcp_keepalives_idle": "30",  # the server probes an idle lock session, so no firewall forgets the connection,
    "tcp_keepalives_interval": "10",  # and a client that vanished releases the lock within about a minute
    "tcp_keepalives_count": "3",
}
FENCE_WAIT = "30s"  # how long a new holder waits for an earlier holder's batches to commit
WATCH_EVERY = 2.0  # seconds between the watchdog's looks at pg_locks


def lock_held_sql(*, fence: bool) -> str:
    """A query: does backend $2 hold the advisory lock $1 on this database?  With ``fence``, it first takes the
    fence key $3 shared for the rest of the transaction (the lock is looked up after the fence is granted)."""
    held = f"""EXISTS (SELECT 1 FROM pg_locks l WHERE {_our_lock("l")} AND l.granted AND l.pid = $2)"""
    if not fence:
        return f"SELECT {held}"
    return f"SELECT {held} FROM (SELECT pg_advisory_xact_lock_shared($3::bigint)) AS fence"


def _our_lock(alias: str) -> str:
    """The condition on pg_locks for the advisory lock whose bigint key is $1, on the current database only."""
    return (
        f"{alias}.locktype = 'advisory' AND {alias}.database = "
        f"(SELECT oid FROM pg_database WHERE datname = current_database()) "
        f"AND {alias}.classid = ($1::bigint >> 32)::oid AND {alias}.objid = ($1::bigint & 4294967295)::oid "
        f"AND {alias}.objsubid = 1"
    )


class LockSession(asyncpg.Connection):  # type: ignore[misc]
    """The session that holds the database's migrate-data lock for one run; ``exclusive()`` opens it.

    It is an ordinary connection (the run's ledger record is written on it, so the holder can be named) that also
    knows whether the lock is still held:

    - ``await lock.check(conn)``: run it inside each batch's transaction, as its last statement before COMMIT; it
      raises LockLost (and the transaction rolls back) unless this session still holds the lock on this database;
    - ``lock.watch(event)``: ``event`` is set as soon as the lock is known lost (at once when the session closes,
      within ``WATCH_EVERY`` seconds otherwise); then stop between batches and ``lock.raise_if_lost()``;
    - ``lock.lost`` is that event for this session, ``lock.error()`` the LockLost to raise.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.what = "a run"
        self.lost = asyncio.Event()
        self._why = ""
        self._watchers: list[asyncio.Event] = []
        self._releasing = False

    @property
    def pid(self) -> int:
        """The backend pid of the lock's session (known even after the session died)."""
        return self.get_server_pid()

    async def check(self, conn: asyncpg.Connection) -> None:
        """Raise LockLost unless this session still holds the lock; call inside a batch's transaction, last
        before its COMMIT, on the connection of that transaction."""
        if self.lost.is_set():
            raise self.error()
        if not await conn.fetchval(lock_held_sql(fence=True), LOCK_KEY, self.pid, FENCE_KEY):
            self._lose("the server no longer lists it as the holder")
            raise self.error()

    def watch(self, event: asyncio.Event) -> None:
        """Set ``event`` when the lock is lost (now, if it already is)."""
        self._watchers.append(event)
        if self.lost.is_set():
            event.set()

    def raise_if_lost(self) -> None:
        if self.lost.is_set():
            raise self.error()

    def error(self) -> LockLost:
        return LockLost(
            f"lost the migrate-data lock on this database during {self.what}; stopped at the last checkpoint",
            detail=f"the lock's session (backend pid {self.pid}) {self._why or 'is gone'}; "
            "no batch commits without the lock",
            hint="run the same command again: it resumes after the last committed batch",
        )

    def _lose(self, why: str) -> None:
        if self.lost.is_set() or self._releasing:
            return
        self._why = why
        log.error("the migrate-data lock was lost: its session (backend pid %s) %s", self.pid, why)
        self.lost.set()
        for event in self._watchers:
            event.set()

    def _on_closed(self, _conn: asyncpg.Connection) -> None:
        self._lose("ended (terminated by a DBA or a timeout, a server restart, or the network)")

    async def _watchdog(self, pool: asyncpg.Pool, every: float) -> None:
        """Look every ``every`` seconds, from another session, whether this one still holds the lock.  A closed
        session is noticed at once (``_on_closed``); this finds a session the server ended while its socket
        looks open here.  When the server cannot be asked, the batches' own checks decide."""
        while not self.lost.is_set():
            await asyncio.sleep(every)
            if self.is_closed():
                self._on_closed(self)
                return
            try:
                held = await pool.fetchval(lock_held_sql(fence=False), LOCK_KEY, self.pid, timeout=max(every, 5.0))
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError) as e:
                log.debug("lock watchdog: cannot ask the server: %s", e)
                continue
            if not held:
                self._lose("no longer holds the lock")


async def _open_lock_session(url: str | DatabaseURL) -> LockSession:
    parsed = DatabaseURL.parse(url)
    try:
        session: LockSession = await asyncpg.connect(
            **parsed.asyncpg_connect_args(),
            connection_class=LockSession,
            server_settings={"application_name": APPLICATION_NAME},
        )
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as e:
        raise MigrationError(
            f"cannot connect to {parsed}",
            detail=redact_text(str(e), parsed),
            hint="check DATABASE_URL / --database-url and that the server is running",
        ) from e
    await session.execute(
        "SELECT set_config(s.name, v.setting, false) FROM pg_settings s JOIN unnest($1::text[], $2::text[]) "
        "AS v(name, setting) USING (name)",
        list(LOCK_SESSION_SETTINGS),
        list(LOCK_SESSION_SETTINGS.values()),
    )
    return session


@asynccontextmanager
async def exclusive(
    pool: asyncpg.Pool, *, url: str | DatabaseURL, what: str, watch_every: float = WATCH_EVERY
) -> AsyncIterator[LockSession]:
    """Hold the database's migrate-data advisory lock for the block, on a session of its own, or raise LockHeld
    naming the holder.  ``pool`` (on the same database) is what the watchdog asks from."""
    session = await _open_lock_session(url)
    session.what = what
    try:
        if not await session.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
            raise LockHeld(
                f"another migrate-data run holds the lock on this database; not starting {what}",
                detail=await holder_of_lock(session),
                hint="wait for it to finish, or check it with `migrate-data status`",
            )
        async with session.transaction():  # an earlier holder's batches that passed their check commit first
            await session.execute(f"SET LOCAL lock_timeout = '{FENCE_WAIT}'")
            try:
                await session.execute("SELECT pg_advisory_xact_lock($1)", FENCE_KEY)
            except asyncpg.LockNotAvailableError as e:
                raise LockHeld(
                    f"a batch of an earlier migrate-data run is still committing; not starting {what}",
                    detail=f"it has held the lock fence for more than {FENCE_WAIT}",
                    hint="find it in pg_locks (advisory, objid "
                    f"{FENCE_KEY & 0xFFFFFFFF}) and end it, then run the same command again",
                ) from e
        session.add_termination_listener(session._on_closed)
        watchdog = asyncio.create_task(session._watchdog(pool, watch_every), name="migrate-data lock watchdog")
        try:
            yield session
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
    finally:
        session._releasing = True
        try:
            if not session.is_closed():  # unlock first: closing returns before the server has ended the session
                await session.execute("SELECT pg_advisory_unlock_all()")
            await asyncio.wait_for(session.close(), timeout=10)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError):
            session.terminate()


async def holder_of_lock(db: Executor) -> str:
    """Who holds the migrate-data lock on this database (the lock of another database is another lock)."""
    row = await fetch_one(
        db,
        f"""SELECT a.pid, a.usename, COALESCE(a.client_hostname, host(a.client_addr), 'local socket') AS client,
                   a.backend_start, r.kind, r.phase, r.host, r.started_at
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            LEFT JOIN LATERAL (SELECT kind, phase, host, started_at FROM {SCHEMA}.runs
                               WHERE pid = l.pid AND status = 'running' ORDER BY id DESC LIMIT 1) r ON to_regclass('{SCHEMA}.runs') IS NOT NULL
            WHERE {_our_lock("l")} AND l.granted""",
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


@asynccontextmanager
async def committed_under(pool: asyncpg.Pool, lock: LockSession | None) -> AsyncIterator[asyncpg.Connection]:
    """A transaction on ``pool`` that commits only while ``lock`` still holds the run's lock (its check is the last
    statement before COMMIT; without the lock it raises LockLost and everything rolls back)."""
    async with pool.acquire() as conn, conn.transaction():
        yield conn
        if lock is not None:
            await lock.check(conn)
