"""Compare what a phase should have produced with what the target holds."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import asyncpg

from . import ledger
from .catalog import Table, read_table, sequences
from .check_sql import orphans_sql, reject_causes_sql
from .compile import CompiledTable
from .db import fetch_all, fetch_one, fetch_val
from .deep import deep_one_database, deep_two_databases
from .sql import qi, qname

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableValidation:
    source: str
    target: str
    source_rows: int
    target_rows: int
    rejected: int
    status: str  # "ok" | "failed"
    problems: tuple[str, ...] = ()
    missing: int = 0
    extra: int = 0
    differs: int = 0
    samples: tuple[dict[str, Any], ...] = ()  # {"kind", "key", "columns"}


@dataclass(frozen=True)
class Check:
    name: str  # "foreign_key" | "not_valid" | "sequence" | "lookup"
    target: str
    ok: bool
    message: str
    count: int = 0


@dataclass(frozen=True)
class ValidationResult:
    phase: str
    ok: bool
    tables: tuple[TableValidation, ...]
    checks: tuple[Check, ...]
    deep: bool
    started_at: str
    seconds: float
    database: str = ""
    revision: str | None = None
    operator: str = ""
    host: str = ""
    rejects: tuple[dict[str, Any], ...] = ()  # the first quarantined rows
    # every quarantined row counted by cause: {"target", "sqlstate", "cause", "n", "example_key", "message", "detail"}
    reject_causes: tuple[dict[str, Any], ...] = ()
    run_seconds: float | None = None  # the whole phase run this validation ended, when there was one

    @property
    def quarantined(self) -> int:
        """Rows of the phase's sources that are not in its targets but in migrate_data.rejects."""
        return sum(c["n"] for c in self.reject_causes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "quarantined": self.quarantined}


async def validate_phase(
    phase: str,
    tables: list[tuple[CompiledTable, Table]],
    *,
    target: asyncpg.Pool,
    source: asyncpg.Pool,
    deep: bool = False,
    sample: int = 10,
    allow_rejects: bool = True,
    pre_counts: dict[str, int] | None = None,
    started_snapshot: str | None = None,
    split_rows: int = 200_000,
) -> ValidationResult:
    """Count (and with ``deep`` hash) every table of the phase; check its target's integrity."""
    started = time.monotonic()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    has_ledger = await ledger.exists(target)
    rejected = await ledger.reject_counts(target, phase) if has_ledger else {}
    results: list[TableValidation] = []
    checks: list[Check] = []
    for ct, tgt in tables:
        name = str(ct.target)
        pre = (pre_counts or {}).get(name, 0)
        if pre and started_snapshot:  # rows there before the phase are not the phase's: --deep leaves them out
            ct = replace(ct, before_snapshot=started_snapshot)
        table = await _counted(ct, source, target, rejected=rejected.get(name, 0), pre=pre, allow_rejects=allow_rejects)
        if deep:
            ledger_phase = phase if has_ledger else None
            table = await _compared(table, ct, source, target, ledger_phase, sample=sample, split_rows=split_rows)
        results.append(table)
        checks += await integrity(ct, tgt, target)
    reject_rows = [dict(r) for r in await ledger.rejects(target, phase, limit=50)] if has_ledger else []
    causes = [dict(r) for r in await fetch_all(target, reject_causes_sql(), phase)] if has_ledger else []
    ok = all(t.status == "ok" for t in results) and all(c.ok for c in checks)
    return ValidationResult(
        phase=phase,
        ok=ok,
        tables=tuple(results),
        checks=tuple(checks),
        deep=deep,
        started_at=started_at,
        seconds=round(time.monotonic() - started, 3),
        rejects=tuple(reject_rows),
        reject_causes=tuple(causes),
    )


async def _counted(
    ct: CompiledTable, source: asyncpg.Pool, target: asyncpg.Pool, *, rejected: int, pre: int, allow_rejects: bool
) -> TableValidation:
    """A table's counts: its source rows less the ``rejected`` ones against its target rows beyond the ``pre`` ones
    there before the phase; and that no lookup multiplies rows."""
    name = str(ct.target)
    problems: list[str] = []
    src_rows, tgt_rows = await asyncio.gather(
        fetch_val(source, ct.count_sql()), fetch_val(target, ct.target_count_sql())
    )
    if not await _lookups_unique(ct, source):  # a unique key cannot multiply rows: no join to count
        joined = await fetch_val(source, ct.count_joined_sql())
        if joined != src_rows:
            problems.append(
                f"a lookup multiplies rows: {src_rows} source rows become {joined} when joined "
                f"({', '.join(str(lk.table) for _, lk in ct.lookups)}: key not unique)"
            )
    if tgt_rows - pre != src_rows - rejected:
        problems.append(
            f"{src_rows} source rows - {rejected} rejected = {src_rows - rejected}, "
            f"but {tgt_rows - pre} rows in {name}" + (f" (beyond {pre} there before)" if pre else "")
        )
    if rejected and not allow_rejects:
        problems.append(f"{rejected} rows rejected and rejects are not allowed")
    status = "failed" if problems else "ok"
    return TableValidation(str(ct.source), name, src_rows, tgt_rows, rejected, status, tuple(problems))


async def _compared(
    table: TableValidation,
    ct: CompiledTable,
    source: asyncpg.Pool,
    target: asyncpg.Pool,
    phase: str | None,
    *,
    sample: int,
    split_rows: int,
) -> TableValidation:
    """``table`` with what ``--deep`` finds: the keys missing from the target, those no source row produces, the
    rows that differ, and samples of each.  ``phase`` (None: no ledger) names the rejected rows left out."""
    if source is target:
        missing, extra, differs, samples = await deep_one_database(
            ct, target, sample, phase, table.target_rows, split_rows=split_rows
        )
    else:
        rejected_keys = await ledger.rejected_keys(target, phase, table.target) if phase is not None else []
        missing, extra, differs, samples = await deep_two_databases(
            ct, source, target, sample, rejected_keys, table.target_rows
        )
    name, rej, rows = table.target, table.rejected, "keys" if ct.key else "rows"
    problems = list(table.problems)
    if missing:
        problems.append(f"{missing} {rows} missing from {name}" + (f" (besides {rej} rejected)" if rej else ""))
    if extra:
        problems.append(f"{extra} {rows} in {name} that no source row produces")
    if differs:
        problems.append(f"{differs} rows of {name} differ from what the mapping produces")
    if any(None in s["key"] for s in samples):
        problems.append(
            f"rows with a NULL key ({', '.join(ct.key)}) match no row: ON CONFLICT cannot see them either, "
            "so a re-run copies them again (make the key NOT NULL, or map a value to it)"
        )
    status = "failed" if problems else "ok"
    return replace(
        table,
        status=status,
        problems=tuple(problems),
        missing=missing,
        extra=extra,
        differs=differs,
        samples=tuple(samples),
    )


async def _lookups_unique(ct: CompiledTable, source: asyncpg.Pool) -> bool:
    """True when every lookup joins on a key its table's catalog declares unique."""
    for _, lk in ct.lookups:
        table = await read_table(source, lk.table)
        if table is None or not table.is_unique(lk.key):
            return False
    return True


async def integrity(ct: CompiledTable, tgt: Table, db: asyncpg.Pool) -> list[Check]:
    """Orphans of every foreign key, constraints left NOT VALID, sequences behind their column's max."""
    name = str(ct.target)
    out: list[Check] = []
    for fk in tgt.foreign_keys:
        n = await fetch_val(db, orphans_sql(ct.target, fk))
        out.append(
            Check(
                "foreign_key",
                name,
                n == 0,
                f"{fk.name}: {n} rows reference no row of {fk.ref_table}" if n else f"{fk.name}: no orphans",
                n,
            )
        )
    for r in await fetch_all(
        db,
        "SELECT conname, contype::text FROM pg_constraint WHERE conrelid = to_regclass($1) AND NOT convalidated",
        qname(ct.target),
    ):
        out.append(
            Check(
                "not_valid",
                name,
                False,
                f"constraint {r['conname']} is NOT VALID: existing rows were never "
                f"checked (ALTER TABLE … VALIDATE CONSTRAINT {r['conname']})",
            )
        )
    for column, seq in await sequences(db, tgt):
        row = await fetch_one(
            db,
            f"SELECT (SELECT max({qi(column)}) FROM {qname(ct.target)}) AS m, "
            f"pg_sequence_last_value($1::regclass) AS v",
            seq,
        )
        assert row is not None
        behind = row["m"] is not None and (row["v"] or 0) < row["m"]
        out.append(
            Check(
                "sequence",
                name,
                not behind,
                f"{seq} is at {row['v']} but max({column}) is {row['m']}: new rows would collide"
                if behind
                else f"{seq} is past max({column})",
            )
        )
    return out
