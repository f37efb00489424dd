"""The bridge to Alembic: upgrade and downgrade on a connection migrate-data owns."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import asyncpg

from .db import Executor, fetch_all, fetch_val
from .errors import BadInput, MigrationError
from .settings import APPLICATION_NAME, Settings, redact, redact_text
from .sql import qi

if TYPE_CHECKING:  # Alembic and SQLAlchemy are imported only when a schema step runs (a quicker start)
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)


def alembic_config(settings: Settings, *, buffer: io.StringIO | None = None) -> Config:
    from alembic.config import Config

    ini = settings.project_dir / "alembic.ini"
    if not ini.is_file():
        raise BadInput(
            f"{ini}: no alembic.ini in the project", hint="run `migrate-data init DIR` or pass --project DIR"
        )
    cfg = Config(str(ini), output_buffer=buffer)
    cfg.set_main_option("script_location", str(settings.project_dir / "alembic"))
    return cfg


def script_directory(settings: Settings) -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(settings))


def predecessor(settings: Settings, revision: str) -> str:
    """The revision a downgrade of ``revision`` goes back to (``base`` for the first one)."""
    rev = script_directory(settings).get_revision(revision)
    if rev is None:
        raise BadInput(
            f"Alembic revision {revision!r} does not exist in {settings.project_dir / 'alembic' / 'versions'}"
        )
    down = rev.down_revision
    if isinstance(down, (tuple, list)):
        raise BadInput(f"revision {revision} merges several branches; roll it back with alembic by hand")
    return down or "base"


def check_revision(settings: Settings, revision: str) -> None:
    predecessor(settings, revision)


# Where Alembic's version table is, whatever the session's search_path: in public unless it is somewhere else already
# (Alembic alone would create it in, and look for it in, the first schema of the search_path: a DBA with another
# search_path would see no revision at all).
VERSION_SCHEMAS_SQL = """SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = 'alembic_version' AND c.relkind IN ('r', 'p') ORDER BY n.nspname <> 'public', n.nspname"""


async def version_schema(db: Executor) -> str:
    """The schema of the Alembic version table: public, or the one schema that has it; BadInput when several do."""
    found = [r[0] for r in await fetch_all(db, VERSION_SCHEMAS_SQL)]
    if len(found) > 1 and found[0] != "public":
        raise BadInput(
            f"alembic_version is in {len(found)} schemas ({', '.join(found)}): which one is this project's is unclear",
            hint="drop the stale one, or move this project's to public",
        )
    return found[0] if found else "public"


async def current_revision(db: Executor) -> str | None:
    table = f"{qi(await version_schema(db))}.alembic_version"
    if not await fetch_val(db, "SELECT to_regclass($1) IS NOT NULL", table):
        return None
    return await fetch_val(db, f"SELECT version_num FROM {table} LIMIT 1")


def _engine(settings: Settings) -> Any:
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    # idle in its transaction while change capture waits for the application's locks, or the other database works:
    # never ended for it by the server (as db.open_pool's sessions)
    server_settings = {"application_name": APPLICATION_NAME, "idle_in_transaction_session_timeout": "0"}
    if settings.lock_timeout:
        server_settings["lock_timeout"] = settings.lock_timeout
    if settings.statement_timeout:
        server_settings["statement_timeout"] = settings.statement_timeout
    # asyncpg gets the same DSN and password as open_pool: one parse, whatever the URL's spelling
    return create_async_engine(
        "postgresql+asyncpg://",
        poolclass=NullPool,
        connect_args={**settings.url.asyncpg_connect_args(), "server_settings": server_settings},
    )


def _run(connection: Connection, cfg: Config, verb: str, revision: str, version_schema: str) -> None:
    from alembic import command

    cfg.attributes["connection"] = connection
    cfg.attributes["version_table_schema"] = version_schema  # read by alembic_env.run
    getattr(command, verb)(cfg, revision)


@asynccontextmanager
async def _ending(transaction: Any, *, commit: bool) -> AsyncIterator[None]:
    """End a started transaction (asyncpg's or SQLAlchemy's): rolled back on error, else committed if ``commit``."""
    try:
        yield
    except BaseException:
        await transaction.rollback()
        raise
    await (transaction.commit() if commit else transaction.rollback())


@asynccontextmanager
async def schema_transaction(
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    upgrade_to: str | None = None,
    downgrade_to: str | None = None,
    commit: bool,
    before: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> AsyncIterator[asyncpg.Connection]:
    """Open one transaction, run the Alembic step in it, yield its asyncpg connection; commit or roll back.

    Checks run inside the block see the new schema; with ``commit=False`` nothing is kept.  ``before`` runs in the
    same transaction before the Alembic step (e.g. to lock and check what the step drops).  Without an Alembic step
    it is a plain transaction on a connection of ``pool``.
    """
    if not (upgrade_to or downgrade_to):
        async with pool.acquire() as conn:
            tr = conn.transaction()
            await tr.start()
            async with _ending(tr, commit=commit):
                if before is not None:
                    await before(conn)
                yield conn
        return
    cfg = alembic_config(settings)
    versions = await version_schema(pool)
    engine = _engine(settings)
    try:
        async with engine.connect() as sa_conn:
            async with _ending(await sa_conn.begin(), commit=commit):
                if before is not None:
                    await sa_conn.exec_driver_sql("SELECT 1")  # the driver's transaction starts with a statement
                    await before((await sa_conn.get_raw_connection()).driver_connection)
                if upgrade_to:
                    log.info("alembic upgrade %s", upgrade_to)
                    await sa_conn.run_sync(_run, cfg, "upgrade", upgrade_to, versions)
                if downgrade_to:
                    log.info("alembic downgrade %s", downgrade_to)
                    await sa_conn.run_sync(_run, cfg, "downgrade", downgrade_to, versions)
                raw = await sa_conn.get_raw_connection()
                yield raw.driver_connection
    except (OSError, asyncpg.PostgresError) as e:
        raise MigrationError(
            f"schema step failed on {redact(settings.database_url)}", detail=redact_text(str(e), settings.database_url)
        ) from e
    finally:
        await engine.dispose()


def offline_sql(settings: Settings, revision: str) -> str:
    """The DDL of ``revision`` as a script (Alembic offline mode), for review."""
    from alembic import command

    buf = io.StringIO()
    cfg = alembic_config(settings, buffer=buf)
    cfg.set_main_option("sqlalchemy.url", "postgresql://offline/review")
    start = predecessor(settings, revision)
    command.upgrade(cfg, f"{start}:{revision}" if start != "base" else revision, sql=True)
    return buf.getvalue()
