"""The run lock: one migrate-data run at a time writes to a database, and nothing it writes commits without it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from ..db import Executor, fetch_one
from ..errors import LockHeld, LockLost, MigrationError
from ..settings import APPLICATION_NAME, DatabaseURL, redact_text
from ..sql import LEDGER_SCHEMA as SCHEMA
from .schema import LOCK_KEY

__all__ = [
    "FENCE_KEY",
    "LOCK_SESSION_SETTINGS",
    "FENCE_WAIT",
    "WATCH_EVERY",
    "lock_held_sql",
    "LockSession",
    "exclusive",
    "holder_of_lock",
    "committed_under",
]

log = logging.getLogger(__name__)


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


@asynccontextmanager
async def committed_under(pool: asyncpg.Pool, lock: LockSession | None) -> AsyncIterator[asyncpg.Connection]:
    """A transaction on ``pool`` that commits only while ``lock`` still holds the run's lock (its check is the last
    statement before COMMIT; without the lock it raises LockLost and everything rolls back)."""
    async with pool.acquire() as conn, conn.transaction():
        yield conn
        if lock is not None:
            await lock.check(conn)
