"""Batches written with ``session_replication_role = replica``: no trigger of the target fires, foreign keys included.

The copier writes so the tables of a foreign-key cycle (each needs rows of the other first) and the tables mapped with
``target_triggers: skip``.  A role that may not set it is refused before the first batch; after the copy, the rows
of a cycle are checked for the references nothing checked while they were written.
"""

from __future__ import annotations

import asyncpg

from .catalog import Table
from .check_sql import orphans_sql
from .compile import CompiledTable
from .db import fetch_val
from .errors import MigrationError

REPLICA = "SET LOCAL session_replication_role = replica"


async def check_allowed(target: asyncpg.Pool, *, cyclic: list[str], skipped: list[str]) -> None:
    """Refuse when the tables of a cycle (``cyclic``) or with ``target_triggers: skip`` (``skipped``) need replica
    mode and this role may not set it."""
    if not cyclic and not skipped:
        return
    async with target.acquire() as conn, conn.transaction():
        try:
            await conn.execute(REPLICA)
        except asyncpg.InsufficientPrivilegeError as e:
            if not cyclic:
                raise MigrationError(
                    f"target_triggers: skip for {', '.join(skipped)} needs session_replication_role = replica, which "
                    "this role may not set",
                    hint="run this phase as a superuser, or (PostgreSQL 15+) GRANT SET ON PARAMETER "
                    "session_replication_role TO the role; or let the triggers fire (target_triggers: fire)",
                ) from e
            raise MigrationError(
                f"the target tables {', '.join(cyclic)} reference each other in a cycle, and this role may not defer "
                "their foreign keys (session_replication_role needs superuser)",
                hint="run this phase as a superuser, or drop one foreign key of the cycle in the phase's revision "
                "and add it back (NOT VALID + VALIDATE) in a later one",
            ) from e


async def check_orphans(target: asyncpg.Pool, cyclic: list[tuple[CompiledTable, Table]]) -> None:
    """After a copy with the foreign keys deferred (a cycle), no row may reference a missing parent.  (With
    target_triggers: skip, and no cycle, each insert checks them itself: see CompiledTable._checked.)"""
    for ct, table in cyclic:
        for fk in table.foreign_keys:
            n = await fetch_val(target, orphans_sql(ct.target, fk))
            if n:
                raise MigrationError(
                    f"{ct.target}: {n} rows violate foreign key {fk.name} after the cyclic copy",
                    hint="the rows were copied with the foreign keys deferred; fix the mapping so every "
                    "reference has its parent, then run again",
                )
