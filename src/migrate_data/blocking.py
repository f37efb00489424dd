"""Locks on the application's tables, each try with a short ``lock_timeout`` so that it never queues the application
behind a long transaction for long: a cutover's SHARE locks on the source tables (reads go on), and who was in the
way; DDL on a busy table (change capture's triggers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg

from .errors import MigrationError
from .settings import duration_ms

log = logging.getLogger(__name__)


@dataclass
class Blocked:
    """Writes to ``tables`` are blocked from ``since`` until the block ends; ``seconds`` is then how long."""

    tables: tuple[str, ...]
    since: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    attempts: int = 1
    release_only: bool = False  # end with ROLLBACK (a failed cutover); the transaction wrote nothing either way


# A try that holds one table while it waits for another can close a lock cycle with an application transaction that
# holds the other and then wants the first: PostgreSQL then aborts whoever checks first, deadlock_timeout after it
# began to wait, which could be the application.  Such a try waits less than deadlock_timeout, so its own lock_timeout
# ends it before anyone's check (the application began to wait after it); a deadlock found anyway is retried too.
DEADLOCK_SHARE = 0.8
RETRIED = (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError)


async def _try_wait(conn: asyncpg.Connection, wait: str, several: bool) -> str:
    """The lock_timeout of one try: ``wait``; if the try locks several tables, at most 80 % of deadlock_timeout."""
    if not several:
        return wait
    deadlock = duration_ms(await conn.fetchval("SELECT current_setting('deadlock_timeout')")) or 1000
    asked = duration_ms(wait) or 0
    limit = max(int(deadlock * DEADLOCK_SHARE), 1)
    return wait if 0 < asked <= limit else f"{limit}ms"


BLOCKERS_SQL = """SELECT a.pid, a.usename, a.state, now() - a.xact_start AS age, left(a.query, 120) AS query
FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid() AND a.pid IN (
  SELECT l.pid FROM pg_locks l WHERE l.relation = ANY (SELECT to_regclass(t) FROM unnest($1::text[]) AS t) AND l.granted
   AND l.mode IN ('RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock',
                  'AccessExclusiveLock'))
ORDER BY a.xact_start"""


@asynccontextmanager
async def writes_blocked(
    source: asyncpg.Pool, tables: dict[str, str], *, wait: str = "2s", retries: int = 5
) -> AsyncIterator[Blocked]:
    """Block writes to ``tables`` (name -> quoted relation; ``LOCK … IN SHARE MODE``: reads go on) for the block, in a
    transaction of the source database.  Each attempt waits at most ``wait`` for the writers in flight (a long transaction would
    otherwise queue every new writer behind us), then lets go and tries again, ``retries`` times."""
    names = ", ".join(tables.values())
    async with source.acquire() as conn:
        each = await _try_wait(conn, wait, len(tables) > 1)
        for attempt in range(retries + 1):
            tr = conn.transaction()
            await tr.start()
            try:
                await conn.execute("SELECT set_config('lock_timeout', $1, true)", each)
                await conn.execute(f"LOCK TABLE {names} IN SHARE MODE")
                break
            except RETRIED as e:
                await tr.rollback()
                if attempt == retries:
                    who = await conn.fetch(BLOCKERS_SQL, list(tables.values()))
                    raise MigrationError(
                        f"could not block writes to {', '.join(tables)}: writers kept them through {retries + 1} "
                        f"attempts of {each} each; nothing was changed",
                        detail="\n".join(
                            f"backend pid {r['pid']} ({r['usename']}, {r['state']}, transaction open for {r['age']}): "
                            f"{r['query']}"
                            for r in who
                        )
                        or str(e),
                        hint="wait for the long transaction or end it (SELECT pg_terminate_backend(pid)), then run the "
                        "same command again; --lock-wait and --retries set the patience",
                    ) from e
                log.info("cutover: writers still busy on %s (%s); trying again", ", ".join(tables), e)
                await asyncio.sleep(min(0.5 * 2 ** min(attempt, 4), 5.0))
            except BaseException:
                with contextlib.suppress(Exception):  # not left to the pool's reset: the connection goes back clean
                    await tr.rollback()
                raise
        blocked = Blocked(tuple(tables), attempts=attempt + 1)
        log.info("writes to %s blocked", ", ".join(tables))
        try:
            yield blocked
        except BaseException:
            await tr.rollback()
            blocked.seconds = time.monotonic() - blocked.since
            raise
        if blocked.release_only:
            await tr.rollback()
        else:
            await tr.commit()
        blocked.seconds = time.monotonic() - blocked.since
        log.info("writes to %s released after %.2f s", ", ".join(tables), blocked.seconds)


async def ddl_with_short_locks(
    conn: asyncpg.Connection, what: str, statements: list[str], wait: str, retries: int, *, relations: Sequence[str]
) -> None:
    """Run DDL that locks busy tables (``relations``) in a savepoint with a short lock_timeout, retried a few times: a
    writer's long transaction makes it wait at most ``wait`` per attempt (and the writers queued behind it as long),
    never longer.  A try that cannot lock one table rolls back to its savepoint, which lets go of the tables it had
    locked."""
    old = await conn.fetchval("SELECT current_setting('lock_timeout')")
    each = await _try_wait(conn, wait, len(set(relations)) > 1)
    waiting = ""
    try:
        for attempt in range(retries + 1):
            try:
                async with conn.transaction():
                    await conn.execute("SELECT set_config('lock_timeout', $1, true)", each)
                    for sql in statements:
                        waiting = sql
                        await conn.execute(sql)
                return
            except RETRIED as e:
                if attempt == retries:
                    raise MigrationError(
                        f"could not {what}: a transaction kept the table locked through {retries + 1} attempts of "
                        f"{each} each",
                        detail=f"{e}, at: {waiting}",
                        hint="find the long transaction (pg_stat_activity, pg_locks) and end it or wait for it, then "
                        "run the same command again (--lock-wait and --retries set the patience)",
                    ) from e
                log.info("%s: the table is busy (%s); trying again", what, e)
                await asyncio.sleep(min(0.25 * 2 ** min(attempt, 4), 4.0))
    finally:
        if conn.is_in_transaction():
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", old)
