"""What the pre-flight counts in the data, inside the rolled-back transaction of ``plan``: values a map lacks, lookups
that find nothing, values a cast would cut or round, rows a CHECK or NOT NULL of the target would refuse, a preview."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from .catalog import read_table
from .check_sql import (
    TARGET_CHECKS_SQL,
    TARGET_DEFAULTS_SQL,
    change_count_sql,
    check_violations_sql,
    coverage_sql,
    null_counts_sql,
    preview_sql,
    unmapped_values_sql,
)
from .compile import CompiledTable
from .db import Executor, fetch_all, fetch_one, rolled_back
from .findings import Finding
from .mapping import QualifiedName
from .sql import qname

log = logging.getLogger(__name__)


async def coverage_findings(ct: CompiledTable, source: Executor, target: Executor | None = None) -> list[Finding]:
    name = str(ct.target)
    out: list[Finding] = []
    out += await change_findings(ct, source)
    if target is not None:
        out += await refusal_findings(ct, source, target)
    for c in ct.columns:
        if c.spec.map and not c.spec.has_else:
            try:
                rows = await fetch_all(source, unmapped_values_sql(ct, c))
            except asyncpg.PostgresError as e:
                out.append(Finding("warning", name, f"{c.target}: coverage not checked: {e}"))
                continue
            for r in rows:
                out.append(
                    Finding(
                        "warning",
                        name,
                        f"{c.target}: value {r['value']!r} is not in the map ({r['n']} rows); "
                        "it passes through unchanged",
                        r["n"],
                    )
                )
    cov = coverage_sql(ct)
    if cov is not None:
        sql, labels = cov
        try:
            row = await fetch_one(source, sql)
        except asyncpg.PostgresError as e:
            return out + [Finding("warning", name, f"coverage not checked: {e}")]
        assert row is not None
        for label, n in zip(labels, row, strict=True):
            if not n:
                continue
            kind, what = label.split(":", 1)
            if kind == "default":
                out.append(Finding("info", name, f"{what}: the default applies to {n} rows (NULL in the source)", n))
            else:
                out.append(
                    Finding("warning", name, f"lookup in {what} finds nothing for {n} rows (the value is NULL)", n)
                )
    return out


async def preview_of(ct: CompiledTable, source: Executor, rows: int) -> dict[str, Any]:
    """The first transformed rows, computed in a transaction that is rolled back."""
    columns = [c.target for c in ct.columns]
    try:
        async with rolled_back(source) as conn:
            recs = await conn.fetch(preview_sql(ct, rows))
    except asyncpg.PostgresError as e:
        return {"columns": columns, "rows": [], "error": f"{e.sqlstate}: {e}"}
    return {"columns": columns, "rows": [dict(r.items()) for r in recs]}


async def change_findings(ct: CompiledTable, source: Executor) -> list[Finding]:
    """Per column whose cast can cut or round a value: the source rows it would happen to."""
    name = str(ct.target)
    out: list[Finding] = []
    for c in ct.columns:
        if not c.changes:
            continue
        kinds = " or ".join(sorted({"cut" if s.check == "cut" else "rounded" for s in c.changes}))
        types = ", ".join(s.type for s in c.changes)
        try:
            async with rolled_back(source) as conn:
                n = await conn.fetchval(change_count_sql(ct, c))
        except asyncpg.PostgresError as e:
            out.append(Finding("warning", name, f"{c.target}: values may be {kinds} by {types}; not counted: {e}"))
            continue
        if not c.checked:
            allowed = " and ".join(f"`{o}: true`" for o in ("truncate", "round") if getattr(c.spec, o))
            out.append(
                Finding(
                    "warning", name, f"{c.target}: {n} rows have values that will be {kinds} to {types} ({allowed})", n
                )
            )
        elif n:
            state = "22001" if any(s.check == "cut" for s in c.changes) else "22003"
            out.append(
                Finding(
                    "warning",
                    name,
                    f"{c.target}: {n} rows have values that {types} would have {kinds}; they will be quarantined "
                    f"({state}); give the column `truncate: true` / `round: true` to accept that",
                    n,
                )
            )
        else:
            out.append(
                Finding(
                    "info",
                    name,
                    f"{c.target}: {c.value_type or 'the value'} -> {types} could be {kinds}: no source row is now; "
                    "a row that would be is quarantined",
                    0,
                )
            )
    return out


async def refusal_findings(ct: CompiledTable, source: Executor, target: Executor) -> list[Finding]:
    """The source rows whose mapped values the target's CHECK constraints and NOT NULL columns refuse (they will
    be quarantined), each constraint evaluated on its own so that one that cannot be evaluated here (a function
    the source lacks, a value that does not convert) does not hide the others."""
    name = str(ct.target)
    out: list[Finding] = []
    table = qname(ct.target)
    defaults = {r["attname"]: (r["type"], r["dflt"]) for r in await fetch_all(target, TARGET_DEFAULTS_SQL, table)}
    for chk in await fetch_all(target, TARGET_CHECKS_SQL, table):
        try:
            async with rolled_back(source) as conn:
                n = await conn.fetchval(check_violations_sql(ct, chk["expr"], list(chk["columns"]), defaults))
        except asyncpg.PostgresError as e:
            out.append(Finding("warning", name, f"CHECK {chk['conname']} not evaluated on the mapped values: {e}"))
            continue
        if n:
            out.append(
                Finding(
                    "warning",
                    name,
                    f"CHECK {chk['conname']} refuses {n} rows: they will be quarantined (23514)",
                    n,
                )
            )
    required = await not_null_columns(target, ct.target)
    not_null = [c for c in ct.columns if c.target in required]
    if not_null:
        try:
            async with rolled_back(source) as conn:
                row = await conn.fetchrow(null_counts_sql(ct, not_null))
        except asyncpg.PostgresError as e:
            return out + [Finding("warning", name, f"NOT NULL columns not evaluated on the mapped values: {e}")]
        for c, n in zip(not_null, row or (), strict=True):
            if n:
                out.append(
                    Finding(
                        "warning",
                        name,
                        f"{c.target}: NULL for {n} rows, and the column is NOT NULL: they will be quarantined (23502)",
                        n,
                    )
                )
    return out


async def not_null_columns(target: Executor, table: QualifiedName) -> set[str]:
    t = await read_table(target, table)
    return {c.name for c in t.columns if c.not_null} if t is not None else set()
