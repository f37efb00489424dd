"""The drop of a phase's legacy tables (its ``backup:`` list), prepared in the transaction that drops them.

In order: writes to the tables blocked (SHARE lock: reads go on), the objects that depend on them saved, pg_dump of
exactly what is dropped (the transaction's exported snapshot); then, after the proof that nothing is lost (proof.py),
their row counts and the dependents dropped one by one.  The tables go with the phase's Alembic revision, in the same
transaction (steps.DropLegacy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from . import backup, dependents
from .catalog import Table, read_table
from .db import Executor
from .findings import Finding
from .mapping import Phase
from .settings import Settings
from .sql import qname


def lock_sql(tables: Sequence[str]) -> str:
    """Block writes to ``tables`` (quoted) until the transaction ends; reads go on."""
    return f"LOCK TABLE {', '.join(tables)} IN SHARE MODE"


async def tables(db: Executor, phase: Phase) -> list[Table]:
    """The tables of the phase's ``backup:`` list that exist."""
    return [t for t in [await read_table(db, n) for n in phase.backup] if t is not None]


class LegacyDrop:
    """What the drop of ``tables`` holds between its steps: the dependents and their saved definitions, the backup,
    the row counts."""

    def __init__(self, settings: Settings, phase: Phase, tables: list[Table]) -> None:
        self.settings, self.phase, self.tables = settings, phase, tables
        self.names = {str(t.qualified) for t in tables}
        self.deps: list[dependents.Dependent] = []
        self.saved: str | None = None  # the file with the dependents' definitions
        self.backup: str | None = None
        self.dropped: dict[str, int] = {}

    async def hold(self, conn: asyncpg.Connection, target: asyncpg.Pool, *, force: bool) -> str:
        """Block writes to the tables, save what depends on them, dump exactly what is dropped; the dump's path."""
        if self.tables:
            await conn.execute(lock_sql([qname(t.qualified) for t in self.tables]))
        self.deps, self.saved = await dependents.before_drop(conn, self.phase, self.settings.backups_dir, force=force)
        snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
        self.backup = await backup.take_backup(self.settings, self.phase, target, snapshot=snapshot)
        return self.backup

    async def drop_dependents(self, conn: asyncpg.Connection) -> None:
        """Count the tables' rows, then drop what depends on them, each on its own (never CASCADE)."""
        self.dropped = {
            str(t.qualified): await conn.fetchval(f"SELECT count(*) FROM {qname(t.qualified)}") for t in self.tables
        }
        await dependents.drop_dependents(conn, self.deps)

    def pre_state(self) -> dict[str, Any]:
        """What the ledger keeps for the rollback: the rows dropped, the dependents' definitions."""
        return {"counts": {}, "sequences": {}, "dropped": self.dropped, **dependents.state(self.deps)}

    def findings(self) -> list[Finding]:
        """Where the dependents' definitions are."""
        return dependents.saved_findings(self.deps, self.saved)
