"""Is "the other database" really another one?  A server is identified by what it says (system identifier, port,
start time, data directory), never by the URL that reached it; a database by its server, name and oid.  A rehearsal
refuses a staging URL that names, or would create, a production database, checked again through the staging URL
itself (a pooler alias can send a name to another database)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import asyncpg

from .db import fetch_one, fetch_val, open_pool
from .errors import RefusedError
from .settings import DatabaseURL


@dataclass(frozen=True)
class ServerIdentity:
    """What identifies a running PostgreSQL server, whatever the URL that reached it.

    ``system_identifier`` names the cluster (a copy made by pg_basebackup shares it), so the start time, port
    and data directory must agree as well: two URLs reach the same server only if all that is readable agrees.
    """

    system_identifier: int | None
    port: str
    started: dt.datetime
    data_directory: str | None

    def same_as(self, other: ServerIdentity) -> bool:
        known = [(self.port, other.port), (self.started, other.started)]
        if self.system_identifier is not None and other.system_identifier is not None:
            known.append((self.system_identifier, other.system_identifier))
        if self.data_directory is not None and other.data_directory is not None:
            known.append((self.data_directory, other.data_directory))
        return all(a == b for a, b in known)

    def describe(self) -> str:
        parts = [f"system identifier {self.system_identifier}"] if self.system_identifier is not None else []
        parts += [f"port {self.port}", f"started {self.started.isoformat(sep=' ', timespec='seconds')}"]
        if self.data_directory:
            parts.append(f"data directory {self.data_directory}")
        return ", ".join(parts)


@dataclass(frozen=True)
class DatabaseIdentity:
    server: ServerIdentity
    name: str
    oid: int | None  # None: the database does not exist (yet)


async def _optional(db: asyncpg.Pool, query: str) -> Any:
    """A value only some roles may read (pg_control_system, data_directory): None when refused."""
    try:
        return await fetch_val(db, query)
    except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedFunctionError):
        return None


async def server_identity(db: asyncpg.Pool) -> ServerIdentity:
    """Identify the server ``db`` is connected to (by what it says, not by how it was reached)."""
    row = await fetch_one(db, "SELECT current_setting('port') AS port, pg_postmaster_start_time() AS started")
    assert row is not None
    return ServerIdentity(
        system_identifier=await _optional(db, "SELECT system_identifier FROM pg_control_system()"),
        port=row["port"],
        started=row["started"],
        data_directory=await _optional(db, "SELECT current_setting('data_directory')"),
    )


async def database_identity(db: asyncpg.Pool) -> DatabaseIdentity:
    """Identify the database ``db`` is connected to: its server, name and oid."""
    row = await fetch_one(
        db, "SELECT current_database() AS name, (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    assert row is not None
    return DatabaseIdentity(await server_identity(db), row["name"], row["oid"])


def refuse_if_production(
    staging: DatabaseIdentity, staging_url: DatabaseURL, production: dict[str, DatabaseIdentity]
) -> None:
    """Raise RefusedError when the staging database is, or would be, one of production's databases."""
    for prod_url, prod in production.items():
        if not staging.server.same_as(prod.server):
            continue
        if staging.oid is not None and staging.oid == prod.oid:
            matched = f"database oid {prod.oid} ({prod.name})"
        elif staging.name == prod.name:
            matched = f"database name {prod.name}" + (
                " (the staging database does not exist yet)" if staging.oid is None else ""
            )
        else:
            continue
        raise RefusedError(
            f"refusing to rehearse: the staging URL {staging_url} names the production database {prod_url}",
            detail=f"both reach the same server ({prod.server.describe()}) and the same {matched}",
            hint="give --staging-url a database of its own: another name, or another server",
        )


async def refuse_if_it_reaches_production(staging: DatabaseURL, prods: dict[str, DatabaseIdentity]) -> None:
    """Connect through the staging URL itself and refuse when it lands on production: a pooler or proxy alias can
    send a database name to another database than the server's catalog says."""
    async with open_pool(staging, max_size=1) as stag:
        refuse_if_production(await database_identity(stag), staging, prods)
