"""Alembic environment (async template + connection sharing).

When migrate-data runs Alembic it passes its own connection in ``config.attributes["connection"]``
and the revisions run on it; run by hand (``alembic upgrade head``), the URL comes from DATABASE_URL.
"""
from __future__ import annotations

import asyncio
import os
import re
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_engine_from_config

config = context.config
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = None


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL", "")
    if not url:
        raise SystemExit("DATABASE_URL is not set")
    return re.sub(r"^postgres(?:ql)?(\+\w+)?://", "postgresql+asyncpg://", url)


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(engine: AsyncEngine | None) -> None:
    owned = engine is None
    if engine is None:
        section = config.get_section(config.config_ini_section, {})
        section["sqlalchemy.url"] = database_url()
        engine = async_engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    async with engine.begin() as connection:
        await connection.run_sync(do_run_migrations)
    if owned:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")  # a Connection (migrate-data) or an AsyncEngine (tests)
    if connection is None or isinstance(connection, AsyncEngine):
        asyncio.run(run_async_migrations(connection))
    else:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
