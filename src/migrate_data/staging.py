"""The staging database a rehearsal runs on, built from production and never production itself.

On the same server it is a TEMPLATE copy of production; elsewhere (or while production is in use) an empty database
with the tables the phases read restored from pg_dump.  Whatever the spelling of the URLs, the servers and databases are
compared by what they say they are (identity.py) before anything is dropped or written.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import asyncpg

from . import backup
from .catalog import Table, parents_first, read_table
from .db import fetch_val, open_pool
from .errors import BadInput, MigrationError
from .identity import (
    DatabaseIdentity,
    database_identity,
    refuse_if_it_reaches_production,
    refuse_if_production,
    server_identity,
)
from .mapping import Phase, QualifiedName
from .settings import DatabaseURL, Settings, redact
from .sql import qi

log = logging.getLogger(__name__)


@asynccontextmanager
async def _maintenance_pool(url: DatabaseURL, staging_name: str) -> AsyncIterator[asyncpg.Pool]:
    """A one-connection pool on the staging server's maintenance database (postgres, else template1)."""
    names = [n for n in ("postgres", "template1") if n != staging_name]
    async with AsyncExitStack() as stack:
        for name in names:
            try:
                pool = await stack.enter_async_context(open_pool(url.maintenance(name), max_size=1))
            except MigrationError as e:
                if name == names[-1] or not isinstance(e.__cause__, asyncpg.InvalidCatalogNameError):
                    raise
                continue
            yield pool
            return


async def build_staging(
    production: Settings, staging_url: str, tables: list[QualifiedName], *, rebuild: bool, use_existing: bool
) -> str:
    """Create the staging database: TEMPLATE on the same server, else pg_dump | pg_restore of ``tables``.

    Whatever the spelling of the URLs, nothing is dropped or written on a database that resolves to production
    (or to its source database): the servers and databases are compared by what they say they are.
    """
    staging = DatabaseURL.parse(staging_url)
    prods: dict[str, DatabaseIdentity] = {}
    for url in dict.fromkeys(u for u in (production.database_url, production.source_url) if u):
        async with open_pool(url, max_size=1) as pool:
            prods[redact(url)] = await database_identity(pool)
    prod = prods[redact(production.database_url)]
    if use_existing:
        await refuse_if_it_reaches_production(staging, prods)
        return "existing"
    name = staging.database
    if not name:
        raise BadInput(f"the staging URL {staging} names no database", hint="end it with /the_staging_database")
    async with _maintenance_pool(staging, name) as admin:
        server = await server_identity(admin)
        oid = await fetch_val(admin, "SELECT oid FROM pg_database WHERE datname = $1", name)
        refuse_if_production(DatabaseIdentity(server, name, oid), staging, prods)
        if oid is not None:
            if not rebuild:
                raise BadInput(
                    f"the staging database {name} exists",
                    hint="pass --rebuild to replace it, or --use-existing to rehearse on it as it is",
                )
            log.info("dropping the staging database %s (oid %s) on %s", name, oid, staging)
            await admin.execute(f"DROP DATABASE {qi(name)} WITH (FORCE)")
        if server.same_as(prod.server):
            try:
                await admin.execute(f"CREATE DATABASE {qi(name)} TEMPLATE {qi(prod.name)}")
                await refuse_if_it_reaches_production(staging, prods)
                return "template"
            except asyncpg.ObjectInUseError:
                log.info("production is in use; copying its tables with pg_dump instead of TEMPLATE")
        await admin.execute(f"CREATE DATABASE {qi(name)}")
    await refuse_if_it_reaches_production(staging, prods)
    async with open_pool(production.database_url, max_size=1) as prod_pool:
        major = int(await fetch_val(prod_pool, "SHOW server_version_num")) // 10000
    dump = production.backups_dir / f"staging-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}.dump"
    await backup.dump(production.database_url, tables, dump, server_major=major)
    async with open_pool(staging_url, max_size=1) as stag:  # pg_dump -t dumps no schema, not even a table's own
        for schema in dict.fromkeys(t.schema for t in tables if t.schema):
            await stag.execute(f"CREATE SCHEMA IF NOT EXISTS {qi(schema)}")
    try:
        await backup.restore_all(staging_url, dump, server_major=major, leave_out=r" TRIGGER \S+ \S+ md_capture_")
    finally:
        dump.unlink(missing_ok=True)
    return "dump"


async def source_tables(phases: list[Phase], db: asyncpg.Pool) -> list[QualifiedName]:
    """Every table the phases read (sources, lookups), and what their foreign keys need, parents first."""
    found: dict[str, Table] = {}
    todo = [
        n
        for phase in phases
        for tm in phase.tables
        for n in (tm.source, *(c.lookup.table for c in tm.columns if c.lookup))
    ]
    while todo:
        t = await read_table(db, todo.pop())
        if t is not None and str(t.qualified) not in found:
            found[str(t.qualified)] = t
            todo += [fk.ref_table for fk in t.foreign_keys]
    return [t.qualified for t in parents_first(list(found.values()))]
