"""The only place that creates asyncpg pools, plus small query helpers.

Every connection is acquired with ``async with`` and every transaction is a
``conn.transaction()`` block, so no path returns a connection to the pool inside an
open transaction (the failure in ``shared/seeds/connection-leak-deploy-guide.md``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Union

import asyncpg

from .errors import BadInput, MigrationError
from .settings import APPLICATION_NAME, DatabaseURL, redact_text

log = logging.getLogger(__name__)

Executor = Union[asyncpg.Pool, asyncpg.Connection]


@asynccontextmanager
async def open_pool(
    url: str | DatabaseURL,
    *,
    min_size: int = 1,
    max_size: int = 4,
    statement_timeout: str | None = None,
    lock_timeout: str | None = None,
    interval_style: str | None = None,
) -> AsyncIterator[asyncpg.Pool]:
    """Open one pool for one database and close it on every path.  ``interval_style``: the ``IntervalStyle`` its
    sessions read and write intervals in (the source's, for a target that reads the text the source writes)."""
    parsed = DatabaseURL.parse(url)
    server_settings = {"application_name": APPLICATION_NAME}
    if interval_style:
        server_settings["IntervalStyle"] = interval_style
    if statement_timeout:
        server_settings["statement_timeout"] = statement_timeout
    if lock_timeout:
        server_settings["lock_timeout"] = lock_timeout
    connect_args = parsed.asyncpg_connect_args()
    try:
        pool = await asyncpg.create_pool(
            **connect_args,
            min_size=min(min_size, max_size),
            max_size=max_size,
            server_settings=server_settings,
            command_timeout=None,
            init=_session_init,
            reset=_session_reset,
        )
    except (asyncio.TimeoutError, TimeoutError) as e:
        waited = connect_args.get("timeout", 60.0)
        raise MigrationError(
            f"cannot connect to {parsed}: no answer within {waited:.0f} s",
            detail="the address accepts connections but no PostgreSQL server answered (a firewall, a hung server "
            "or the wrong port)",
            hint="check the host and port; connect_timeout=N in the URL or PGCONNECT_TIMEOUT sets how long to wait",
        ) from e
    except (asyncpg.InvalidParameterValueError, asyncpg.UndefinedObjectError, asyncpg.CantChangeRuntimeParamError) as e:
        raise BadInput(
            f"the server refused a session setting: {redact_text(str(e), parsed)}",
            hint="check --statement-timeout / --lock-timeout (e.g. 30min, 10s) and the URL's options",
            sqlstate=e.sqlstate,
        ) from e
    except (OSError, asyncpg.PostgresError) as e:
        raise MigrationError(
            f"cannot connect to {parsed}",
            detail=redact_text(str(e), parsed),
            hint="check DATABASE_URL / --database-url and that the server is running",
            sqlstate=getattr(e, "sqlstate", None),
        ) from e
    log.debug("pool opened on %s (max %d)", parsed, max_size)
    try:
        yield pool
    finally:
        try:
            await asyncio.wait_for(pool.close(), timeout=30)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - closing must not mask the real error
            pool.terminate()
        log.debug("pool closed on %s", parsed)


# A session of ours may sit idle between batches (another table's turn, a long validation query elsewhere): a server
# or role with idle_session_timeout (PostgreSQL 14+) must not end it under the run.  Across two databases values
# travel as text (COPY, the sync's staged rows): it is written in forms any session reads back the same, whatever the
# database or role set: ISO dates (``DateStyle = ISO`` keeps the session's day/month order for reading input) and
# exact floats.  Intervals are not: ``IntervalStyle`` also decides how text is read (an SQL-standard ``-1 2:03:04`` is
# another span to a ``postgres`` reader), so the target's sessions take the source's instead (runtime.connect).
def _session_settings(conn: asyncpg.Connection) -> str:
    out = "SET idle_in_transaction_session_timeout = 0; SET DateStyle = ISO; SET extra_float_digits = 1;"
    return out + (" SET idle_session_timeout = 0;" if conn.get_server_version() >= (14, 0) else "")


async def _session_init(conn: asyncpg.Connection) -> None:
    await conn.execute(_session_settings(conn))


async def _session_reset(conn: asyncpg.Connection) -> None:
    """What the pool runs when a connection comes back: its own reset, whose ``RESET ALL`` would put a database's or
    role's timeouts back, then ours again, in the same round trip."""
    await conn.execute(conn.get_reset_query() + "\n" + _session_settings(conn))


async def fetch_one(db: Executor, sql: str, *args: Any) -> asyncpg.Record | None:
    """Return the first row of ``sql`` or None."""
    return await db.fetchrow(sql, *args)


async def fetch_all(db: Executor, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Return every row of ``sql``."""
    return await db.fetch(sql, *args)


async def fetch_val(db: Executor, sql: str, *args: Any) -> Any:
    """Return the first column of the first row of ``sql``."""
    return await db.fetchval(sql, *args)


async def execute(db: Executor, sql: str, *args: Any) -> str:
    """Run a statement and return its status tag (``INSERT 0 5``)."""
    return await db.execute(sql, *args)


def rowcount(status: str) -> int:
    """Return the row count of a status tag such as ``INSERT 0 42`` or ``DELETE 3``."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


def is_data_error(e: BaseException) -> bool:
    """True for errors caused by a row's values (SQLSTATE classes 22 and 23)."""
    state = getattr(e, "sqlstate", None) or ""
    return state[:2] in ("22", "23")


def is_transient_error(e: BaseException) -> bool:
    """True for errors worth a retry: lost connections, lock timeouts, serialization, deadlocks."""
    if isinstance(e, (OSError, asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.InterfaceError)):
        return True
    state = getattr(e, "sqlstate", None) or ""
    return state in ("55P03", "40001", "40P01", "57P01", "57P02", "57P03") or state[:2] == "08"


@asynccontextmanager
async def rolled_back(db: Executor) -> AsyncIterator[asyncpg.Connection]:
    """A transaction (a savepoint when nested) that is always rolled back: for checks and previews."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, rolled_back(conn) as inner:
            yield inner
        return
    tr = db.transaction()
    await tr.start()
    try:
        yield db
    finally:
        await tr.rollback()
