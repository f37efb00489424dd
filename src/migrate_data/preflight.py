"""Compile a phase against the live catalogs and check it before a single row moves."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import asyncpg

from .catalog import Table, Trigger, fk_cycles, parents_first, read_table, user_triggers
from .compile import DEFAULT_TARGET_TRIGGERS, CompiledTable, compile_table
from .conversions import HELPERS_EXIST_SQL, HELPERS_SQL
from .datachecks import coverage_findings, preview_of
from .db import Executor, fetch_val, rolled_back
from .enums import label_problems
from .errors import PreflightError
from .findings import Finding, PhasePlan
from .keychecks import key_findings
from .mapping import Phase, TableMapping, display_path
from .names import namesakes_warning

log = logging.getLogger(__name__)


def fk_order(tables: list[tuple[CompiledTable, Table]]) -> list[tuple[CompiledTable, Table]]:
    """Parents first (tables of a cycle together), otherwise in the mapping's order."""
    by_table = {str(t.qualified): (ct, t) for ct, t in tables}
    return [by_table[str(t.qualified)] for t in parents_first([t for _, t in tables])]


async def _prepare(db: Executor, sql: str, *, setup: str | None = None) -> str | None:
    """PREPARE ``sql`` (after ``setup``) in a rolled-back transaction; return the error or None."""
    try:
        async with rolled_back(db) as conn:
            if setup:
                await conn.execute(setup)
            await conn.prepare(sql)
    except asyncpg.PostgresError as e:
        return f"{e.sqlstate}: {e}"
    return None


async def compile_phase(
    phase: Phase, *, source: Executor, target: Executor
) -> tuple[list[tuple[CompiledTable, Table]], list[Finding]]:
    """Read the catalogs and compile each table mapping, in foreign-key order; what cannot compile becomes an
    error finding."""
    compiled, findings = await _compile(phase, source=source, target=target)
    return fk_order([(ct, tgt) for ct, _, tgt in compiled]), findings


async def _compile(
    phase: Phase, *, source: Executor, target: Executor
) -> tuple[list[tuple[CompiledTable, Table, Table]], list[Finding]]:
    """Each table mapping compiled, with the source and target catalogs it was compiled against."""
    compiled: list[tuple[CompiledTable, Table, Table]] = []
    findings: list[Finding] = []
    for i, tm in enumerate(phase.tables):
        name = str(tm.target)
        src = await read_table(source, tm.source)
        tgt = await read_table(target, tm.target)
        if src is None:
            findings.append(
                Finding("error", name, f"source table {tm.source} does not exist (mappings line {tm.line})")
            )
        if tgt is None:
            findings.append(
                Finding("error", name, f"target table {tm.target} does not exist (mappings line {tm.line})")
            )
        if src is None or tgt is None:
            continue
        for db, written, table, what in ((source, tm.source, src, "source"), (target, tm.target, tgt, "target")):
            warning = await namesakes_warning(db, written, table, what)
            if warning:
                findings.append(Finding("warning", name, f"mappings line {tm.line}: {warning}"))
        try:
            lookups = {lk.table: await read_table(source, lk.table) for lk in _lookups(tm)}
            known = {k: v for k, v in lookups.items() if v is not None}
            ct = compile_table(tm, src, tgt, known)
            types = await _sql_types(ct, source)
            if types:
                ct = compile_table(tm, src, tgt, known, value_types=types)
            ct = replace(ct, phase=phase.name)
        except PreflightError as e:
            findings.append(Finding("error", name, e.message + (f" ({e.hint})" if e.hint else "")))
            continue
        compiled.append((ct, src, tgt))
        for c in ct.columns:
            if c.zone_conversion and c.zone is None:
                findings.append(
                    Finding(
                        "error",
                        name,
                        f"{display_path(phase.path)}:{c.spec.line} tables[{i}].columns.{c.target}: "
                        f"{c.value_type} -> {c.cast_type} needs a time zone: the server session's TimeZone would "
                        "decide the instants; give `timezone:` (e.g. UTC) for the phase or the column",
                    )
                )
        for p in label_problems(ct, src, tgt):
            findings.append(
                Finding(
                    "error",
                    name,
                    f"{display_path(phase.path)}:{p.line} tables[{i}].columns.{p.column}: {p.message()}; fix the "
                    f"mapping, or add the label to {p.enum} (ALTER TYPE … ADD VALUE) in the phase's revision",
                )
            )
    return compiled, findings


def _lookups(tm: TableMapping) -> list:  # type: ignore[type-arg]
    return [c.lookup for c in tm.columns if c.lookup is not None]


async def _sql_types(ct: CompiledTable, source: Executor) -> dict[str, str]:
    """The types PostgreSQL gives the mapping's ``sql:`` expressions (by target column); empty when there are none
    or they do not prepare (the pre-flight reports that)."""
    cols = [c for c in ct.columns if c.spec.kind == "sql"]
    if not cols:
        return {}
    try:
        async with rolled_back(source) as conn:
            stmt = await conn.prepare(f"SELECT {', '.join(c.base for c in cols)} FROM {ct.from_} LIMIT 0")
            return {c.target: a.type.name for c, a in zip(cols, stmt.get_attributes(), strict=True)}
    except asyncpg.PostgresError:
        return {}


async def preflight(
    phase: Phase, *, source: Executor, target: Executor, same_db: bool, coverage: bool = True, preview_rows: int = 0
) -> PhasePlan:
    """Compile ``phase`` and check it against the live databases; never writes."""
    compiled, findings = await _compile(phase, source=source, target=target)
    sources = {str(ct.target): src for ct, src, _ in compiled}
    tables = fk_order([(ct, tgt) for ct, _, tgt in compiled])
    previews: dict[str, Any] = {}
    for ct, tgt in tables:
        findings += await _check_table(ct, sources[str(ct.target)], tgt, source=source, target=target, same_db=same_db)
    if coverage:
        for ct, _ in tables:
            findings += await coverage_findings(ct, source, target)
    for group in fk_cycles([t for _, t in tables]):
        findings.append(
            Finding(
                "warning",
                None,
                f"target tables reference each other in a cycle: {', '.join(sorted(group))}; "
                "they are copied with foreign keys deferred and checked for orphans afterwards",
            )
        )
    if preview_rows:
        for ct, _ in tables:
            # across two databases the source may lack the target's own types: their values are shown as built-in ones
            previews[str(ct.target)] = await preview_of(ct if same_db else ct.portable(), source, preview_rows)
    return PhasePlan(phase=phase, tables=tuple(tables), findings=tuple(findings), previews=previews)


async def _check_table(
    ct: CompiledTable, src: Table, tgt: Table, *, source: Executor, target: Executor, same_db: bool
) -> list[Finding]:
    name = str(ct.mapping.target)
    out = key_findings(ct, src, tgt)
    out += await _trigger_findings(ct, tgt, target)
    if ct.by_blocks:
        version = await fetch_val(source, "SHOW server_version_num")
        if int(version) < 140000:
            out.append(
                Finding(
                    "error",
                    name,
                    f"batch_by: ctid needs PostgreSQL 14 or later on the source (TID range scans); this one is "
                    f"{int(version) // 10000}: each batch would read the whole table",
                )
            )
    out += await _lookup_findings(ct, source)
    mapped = {c.target for c in ct.columns}
    for col in tgt.columns:
        if col.not_null and not col.has_default and not col.identity and not col.generated and col.name not in mapped:
            out.append(Finding("error", name, f"{tgt.name}.{col.name} is NOT NULL without a default and gets no value"))
    out += await _zone_findings(ct, target)
    if any(c.checked for c in ct.columns) or ct.insert_counts:
        await ensure_helpers(target)
    err = await _copy_prepares(ct, source=source, target=target, same_db=same_db)
    if err:
        out.append(Finding("error", name, f"the copy statement does not prepare: {err}"))
    return out


async def _lookup_findings(ct: CompiledTable, source: Executor) -> list[Finding]:
    """Each lookup's table and columns exist, and its key is unique (else it would multiply rows)."""
    name = str(ct.mapping.target)
    out: list[Finding] = []
    for _, lk in ct.lookups:
        lt = await read_table(source, lk.table)
        if lt is None:
            out.append(Finding("error", name, f"lookup table {lk.table} does not exist"))
            continue
        missing = [c for c in (*lk.key, lk.column) if lt.column(c) is None]
        if missing:
            out.append(Finding("error", name, f"lookup columns {', '.join(missing)} do not exist in {lk.table}"))
            continue
        if not lt.is_unique(lk.key):
            out.append(
                Finding(
                    "error",
                    name,
                    f"lookup key {lk.table}({', '.join(lk.key)}) is not unique: "
                    "rows would multiply (give a unique key, or use `sql:` with a subquery)",
                )
            )
    return out


async def _zone_findings(ct: CompiledTable, target: Executor) -> list[Finding]:
    """The time zones of the conversions are known to the server; each conversion, said."""
    name = str(ct.mapping.target)
    out: list[Finding] = []
    for zone in sorted({c.zone for c in ct.columns if c.zone}):
        try:
            async with rolled_back(target) as conn:
                await conn.fetchval("SELECT now() AT TIME ZONE $1", zone)
        except asyncpg.PostgresError:
            out.append(Finding("error", name, f"time zone {zone!r} is not known to the server (see pg_timezone_names)"))
    for c in ct.columns:
        if c.zone:
            out.append(
                Finding("info", name, f"{c.target}: {c.value_type} converted as {c.cast_type}, in time zone {c.zone}")
            )
    return out


async def _copy_prepares(ct: CompiledTable, *, source: Executor, target: Executor, same_db: bool) -> str | None:
    """PREPARE the copy's statements (across two databases: the source's SELECT, the target's staged INSERT); return
    the error or None."""
    if same_db:
        return await _prepare(target, ct.insert_sql(lower=True, upper=True))
    err = await _prepare(source, ct.source_text_sql(lower=True, upper=True))
    if err is None:
        stage = "migrate_data_preflight"
        err = await _prepare(target, ct.stage_insert_sql(stage, sub=False), setup=ct.stage_table_sql(stage))
    return err


async def _trigger_findings(ct: CompiledTable, tgt: Table, target: Executor) -> list[Finding]:
    """Which of the target's user triggers fire on the copied rows (``target_triggers``), and whether this role may
    silence them."""
    name = str(ct.mapping.target)
    events = {"INSERT", "UPDATE"} if ct.mapping.on_conflict == "update" else {"INSERT"}
    triggers = [t for t in await user_triggers(target, tgt.qualified) if set(t.events) & events and t.enabled != "D"]
    mode = ct.mapping.target_triggers or DEFAULT_TARGET_TRIGGERS
    out: list[Finding] = []
    if ct.replica:
        try:
            async with rolled_back(target) as conn:
                await conn.execute("SET LOCAL session_replication_role = replica")
        except asyncpg.InsufficientPrivilegeError:
            out.append(
                Finding(
                    "error",
                    name,
                    "target_triggers: skip needs session_replication_role = replica, which this role may not set: "
                    "run as a superuser, or (PostgreSQL 15+) `GRANT SET ON PARAMETER session_replication_role TO "
                    "<role>`; or let the triggers fire (target_triggers: fire)",
                )
            )
        fired = [t for t in triggers if t.enabled in ("A", "R")]
        silenced = [t for t in triggers if t.enabled == "O"]
        if silenced:
            out.append(
                Finding(
                    "info",
                    name,
                    f"target_triggers: skip: {_triggers(silenced)} do not fire on the copied rows "
                    "(session_replication_role = replica in each batch); foreign keys are checked by the insert itself",
                )
            )
        if fired:
            out.append(
                Finding(
                    "warning",
                    name,
                    f"target_triggers: skip, but {_triggers(fired)} fire all the same (ENABLE ALWAYS / ENABLE REPLICA): "
                    "they may change copied values, and --deep would report them",
                )
            )
        return out
    fired = [t for t in triggers if t.enabled in ("O", "A")]
    if fired:
        level = "info" if ct.mapping.target_triggers else "warning"
        said = "" if ct.mapping.target_triggers else " (the default)"
        out.append(
            Finding(
                level,
                name,
                f"target_triggers: {mode}{said}: {_triggers(fired)} fire on every copied row; a trigger that changes "
                "values makes --deep report differences"
                + ("" if ct.mapping.target_triggers else "; say `target_triggers: fire` or `skip` in the mapping"),
            )
        )
    return out


def _triggers(triggers: list[Trigger]) -> str:
    return ", ".join(
        f"{t.name} ({t.timing} {' OR '.join(t.events)} FOR EACH {t.level}, {t.function})" for t in triggers
    )


async def ensure_helpers(db: Executor) -> None:
    """Create the function that lets a copy refuse a value that would be cut or rounded, when it is missing."""
    if not await fetch_val(db, HELPERS_EXIST_SQL):
        await db.execute(HELPERS_SQL)
