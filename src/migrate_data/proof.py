"""Proof, before a phase drops tables, that nothing in them is lost.

Run inside the transaction that drops them, after writes to them are blocked: every data phase is applied, every
source row of the dropped tables is in its target or quarantined (validated now, with checksums, not a stored flag),
and what no mapping keeps at all (a table no phase copies, rows a ``where`` leaves out, columns no mapping reads) is
either nothing or accepted by the DBA (they stay in the phase's backup only).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import asyncpg

from . import ledger, pre_state
from .catalog import Table, read_table
from .compile import CompiledTable
from .errors import RefusedError
from .mapping import Phase, QualifiedName
from .preflight import PhasePlan, compile_phase
from .sql import qi, qname
from .validate import validate_phase

log = logging.getLogger(__name__)
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


async def prove_nothing_lost(
    phase: Phase,
    phases: dict[str, Phase],
    dropped: set[str],
    target: asyncpg.Pool,
    source: asyncpg.Pool,
    *,
    accept_unkept: bool,
) -> None:
    """Refuse (nothing dropped) unless the dropped tables' rows are all in the Spanish tables."""
    states = await ledger.phase_states(target)
    pending = [p for p, ph in phases.items() if ph.tables and (states.get(p) or {}).get("state") != "applied"]
    if pending:
        raise RefusedError(
            f"{phase.name} drops data; every data phase must be applied first",
            detail=f"not applied: {', '.join(pending)}",
            hint=f"run {pending[0]} first",
        )
    problems: list[str] = []
    read = _Read({name: set() for name in dropped})
    unkept: list[str] = []
    for p, ph in phases.items():
        if not ph.tables or p == phase.name:
            continue
        tables, findings = await compile_phase(ph, source=source, target=target)
        PhasePlan(ph, tuple(tables), tuple(findings)).raise_for_errors()
        for ct, _ in tables:
            unkept += await read.add(p, ct, source)
        reading = [(ct, t) for ct, t in tables if str(ct.source) in dropped]
        if reading:
            problems += await _not_in_targets(p, reading, states[p], target, source)
    if problems:
        raise RefusedError(
            f"{phase.name} would drop rows that are not in the Spanish tables; nothing was dropped",
            detail="\n".join(problems),
            hint="bring the data phases up to date (`migrate-data sync PHASE`, or roll back and run the phase again), "
            "validate them, and run again",
        )
    unkept += await read.unread(source)
    if unkept and not accept_unkept:
        raise RefusedError(
            f"{phase.name} would drop data that no mapping copies; nothing was dropped",
            detail="\n".join(unkept),
            hint="map it in a data phase, or pass --accept-unmapped to drop it anyway (it is kept in the phase's "
            "backup, and `rollback` restores it)",
        )
    for line in unkept:
        log.warning("dropped without a copy (accepted; it stays in the backup): %s", line)


async def _not_in_targets(
    p: str,
    reading: list[tuple[CompiledTable, Table]],
    state: asyncpg.Record,
    target: asyncpg.Pool,
    source: asyncpg.Pool,
) -> list[str]:
    """What validation with checksums, now, finds wrong in the tables of phase ``p`` that copy dropped tables."""
    result = await validate_phase(
        p,
        reading,
        target=target,
        source=source,
        deep=True,
        pre_counts=pre_state.counts(state),
        started_snapshot=state["started_snapshot"],
    )
    return [f"{p}: {t.target}: {'; '.join(t.problems)}" for t in result.tables if t.problems]


@dataclass
class _Read:
    """What the data phases' mappings read of the dropped tables: the columns of each (by the dropped table's name),
    and which of them some mapping copies (its source)."""

    columns: dict[str, set[str]]
    copied: set[str] = field(default_factory=set)

    async def add(self, p: str, ct: CompiledTable, source: asyncpg.Pool) -> list[str]:
        """Add what the table mapping ``ct`` of phase ``p`` reads; the rows of a dropped table its ``where`` leaves
        out."""
        tm = ct.mapping
        words = set(WORD.findall(" ".join(filter(None, [tm.where, *(c.sql for c in tm.columns)]))))
        for c in tm.columns:
            if c.lookup is not None:
                lt = await read_table(source, c.lookup.table)
                if lt is not None and str(lt.qualified) in self.columns:
                    self.columns[str(lt.qualified)] |= {*c.lookup.key, c.lookup.column} | words
        name = str(ct.source)
        if name not in self.columns:
            return []
        self.copied.add(name)
        self.columns[name] |= {c.column for c in tm.columns if c.column} | words | set(ct.batch_by)
        self.columns[name] |= {o for c in tm.columns if c.lookup for o in c.lookup.on}
        if tm.where:
            n = await source.fetchval(
                f"SELECT count(*) FROM {qname(ct.source)} AS {qi(ct.alias)} WHERE NOT COALESCE(({tm.where}), false)"
            )
            if n:
                return [f"{name}: {n:,} rows that the `where` of {p} leaves out"]
        return []

    async def unread(self, source: asyncpg.Pool) -> list[str]:
        """Tables no phase copies, and columns with values that no mapping reads."""
        out: list[str] = []
        for name in sorted(self.columns):
            table = await read_table(source, QualifiedName.parse(name))
            if table is None:
                continue
            if name not in self.copied:
                n = await source.fetchval(f"SELECT count(*) FROM {qname(table.qualified)}")
                if n:
                    out.append(f"{name}: {n:,} rows, and no phase copies this table")
                continue
            for col in table.columns:
                if col.name in self.columns[name] or col.generated:
                    continue
                n = await source.fetchval(
                    f"SELECT count(*) FROM {qname(table.qualified)} WHERE {qi(col.name)} IS NOT NULL"
                )
                if n:
                    out.append(f"{name}.{col.name}: {n:,} rows with a value, and no mapping reads this column")
        return out
