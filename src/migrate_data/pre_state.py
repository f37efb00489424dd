"""What a phase's start records for later (the ledger's ``pre_state``), and reading it back.

A data phase records the target's row counts and sequence values before it writes anything: validation leaves the
rows that were there already out of its counts, a rollback sets the sequences back.  A phase that drops tables
records what it dropped instead (legacy.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from .catalog import Table, sequences
from .compile import CompiledTable


async def taken(conn: asyncpg.Connection, tables: Sequence[tuple[CompiledTable, Table]]) -> dict[str, Any]:
    """The target tables' row counts and their sequences' values, now."""
    counts: dict[str, int] = {}
    seqs: dict[str, list[Any]] = {}
    for ct, tgt in tables:
        counts[str(ct.target)] = await conn.fetchval(ct.target_count_sql())
        for _, seq in await sequences(conn, tgt):
            row = await conn.fetchrow(f"SELECT last_value, is_called FROM {seq}")
            seqs[seq] = [row["last_value"], row["is_called"]]
    return {"counts": counts, "sequences": seqs}


def recorded(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``pre_state`` of a phase's ledger row (``ledger.phase_states``); ``{}`` when it has none."""
    return json.loads(state["pre_state"]) if state is not None and state["pre_state"] else {}


def counts(state: Mapping[str, Any] | None) -> dict[str, int]:
    """The target's row counts before the phase, by table; ``{}`` when none were recorded."""
    return recorded(state).get("counts") or {}
