"""What a project's ``alembic/env.py`` runs: the async template plus connection sharing.

When migrate-data runs Alembic it passes its own connection in ``config.attributes["connection"]``
and the revisions run on it, in migrate-data's transaction.  pytest-alembic passes an AsyncEngine.
Run by hand (``alembic upgrade head``), the URL comes from ``sqlalchemy.url`` or ``DATABASE_URL``.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_engine_from_config

from alembic import context

from .settings import sqlalchemy_url


def _database_url() -> str:
    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL", "")
    if not url:
        raise SystemExit("DATABASE_URL is not set")
    return sqlalchemy_url(url)


def _run_on(connection: Connection) -> None:
    # migrate-data says where the version table is (schema.version_schema), so that the search_path does not
    schema = context.config.attributes.get("version_table_schema")
    context.configure(connection=connection, target_metadata=None, version_table_schema=schema)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(engine: AsyncEngine | None) -> None:
    owned = engine is None
    if engine is None:
        section = context.config.get_section(context.config.config_ini_section, {})
        section["sqlalchemy.url"] = _database_url()
        engine = async_engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    async with engine.begin() as connection:
        await connection.run_sync(_run_on)
    if owned:
        await engine.dispose()


def run() -> None:
    """Run the migrations Alembic asked for, offline (SQL script) or online."""
    config = context.config
    shared = config.attributes.get("connection")
    if context.is_offline_mode():
        context.configure(
            url=_database_url(), target_metadata=None, literal_binds=True, dialect_opts={"paramstyle": "named"}
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    if shared is None and config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    if shared is None or isinstance(shared, AsyncEngine):
        asyncio.run(_run_async(shared))
    else:
        _run_on(shared)
