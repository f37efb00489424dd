"""Compare what a phase should have produced with what the target holds."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
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
    same_db = source is target
    for ct, tgt in tables:
        name = str(ct.target)
        problems: list[str] = []
        src_rows, tgt_rows = await asyncio.gather(
            fetch_val(source, ct.count_sql()), fetch_val(target, ct.target_count_sql())
        )
        rej = rejected.get(name, 0)
        pre = (pre_counts or {}).get(name, 0)
        if pre and started_snapshot:  # rows there before the phase are not the phase's: --deep leaves them out
            ct = replace(ct, before_snapshot=started_snapshot)
        if not await _lookups_unique(ct, source):  # a unique key cannot multiply rows: no join to count
            joined = await fetch_val(source, ct.count_joined_sql())
            if joined != src_rows:
                problems.append(
                    f"a lookup multiplies rows: {src_rows} source rows become {joined} when joined "
                    f"({', '.join(str(lk.table) for _, lk in ct.lookups)}: key not unique)"
                )
        if tgt_rows - pre != src_rows - rej:
            problems.append(
                f"{src_rows} source rows - {rej} rejected = {src_rows - rej}, "
                f"but {tgt_rows - pre} rows in {name}" + (f" (beyond {pre} there before)" if pre else "")
            )
        if rej and not allow_rejects:
            problems.append(f"{rej} rows rejected and rejects are not allowed")
        missing = extra = differs = 0
        samples: list[dict[str, Any]] = []
        if deep:
            if same_db:
                missing, extra, differs, samples = await _deep(
                    ct, target, sample, phase if has_ledger else None, tgt_rows, split_rows=split_rows
                )
            else:
                rejected_keys = await ledger.rejected_keys(target, phase, name) if has_ledger else []
                missing, extra, differs, samples = await _deep_two_databases(
                    ct, source, target, sample, rejected_keys, tgt_rows
                )
            if missing:
                problems.append(
                    f"{missing} {'keys' if ct.key else 'rows'} missing from {name}"
                    + (f" (besides {rej} rejected)" if rej else "")
                )
            if extra:
                problems.append(f"{extra} {'keys' if ct.key else 'rows'} in {name} that no source row produces")
            if differs:
                problems.append(f"{differs} rows of {name} differ from what the mapping produces")
            if any(None in s["key"] for s in samples):
                problems.append(
                    f"rows with a NULL key ({', '.join(ct.key)}) match no row: ON CONFLICT cannot see them either, "
                    "so a re-run copies them again (make the key NOT NULL, or map a value to it)"
                )
        results.append(
            TableValidation(
                str(ct.source),
                name,
                src_rows,
                tgt_rows,
                rej,
                "failed" if problems else "ok",
                tuple(problems),
                missing,
                extra,
                differs,
                tuple(samples),
            )
        )
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


async def _lookups_unique(ct: CompiledTable, source: asyncpg.Pool) -> bool:
    """True when every lookup joins on a key its table's catalog declares unique."""
    for _, lk in ct.lookups:
        table = await read_table(source, lk.table)
        if table is None or not table.is_unique(lk.key):
            return False
    return True


async def _deep(
    ct: CompiledTable,
    db: asyncpg.Pool,
    sample: int,
    phase: str | None,
    rows_n: int,
    *,
    jobs: int = 2,
    split_rows: int = 200_000,
) -> tuple[int, int, int, list[dict[str, Any]]]:
    """Compare hashes of expected and actual rows, set-based in the database, in ``jobs`` concurrent key ranges
    for a big table; rejected rows are left out."""
    if not ct.key:  # copied by blocks into a table without a key: nothing to match rows by
        return await _deep_multiset(ct, db, db, phase)
    bounds: list[list[str] | None] = [None]
    if jobs > 1 and rows_n >= split_rows:
        percent = min(100.0, 100.0 * 20_000 / rows_n)  # about 20,000 sampled keys
        bounds += [r["k"] for r in await fetch_all(db, ct.key_split_sql(), jobs, percent)]
    bounds.append(None)
    skip = [phase, str(ct.target)] if phase is not None else []

    async def one(c: CompiledTable, lo: list[str] | None, hi: list[str] | None) -> list[asyncpg.Record]:
        sql = c.diff_sql(skip_rejected=phase is not None, lower=lo is not None, upper=hi is not None)
        return await fetch_all(db, sql, sample, *skip, *(lo or []), *(hi or []))

    async def compare(c: CompiledTable) -> list[list[asyncpg.Record]]:
        return await asyncio.gather(*(one(c, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)))

    try:
        parts = await compare(ct)
    except (asyncpg.UndefinedFunctionError, asyncpg.FeatureNotSupportedError):
        # a column type without a hash function (json, point, ...), or PostgreSQL before 14: hash the row's text
        parts = await compare(replace(ct, hash_rows_by="text"))
    totals: dict[str, int] = {}
    found: dict[str, list[list[str]]] = {"missing": [], "extra": [], "differs": []}
    for rows in parts:
        for kind, total in {r["kind"]: r["total"] for r in rows}.items():
            totals[kind] = totals.get(kind, 0) + total
        for r in rows:
            found[r["kind"]].append(list(r["key"]))
    samples = await _samples(ct, found, sample, db, db)
    return totals.get("missing", 0), totals.get("extra", 0), totals.get("differs", 0), samples


async def _samples(
    ct: CompiledTable, found: dict[str, list[list[str]]], sample: int, source: asyncpg.Pool, target: asyncpg.Pool
) -> list[dict[str, Any]]:
    """The first ``sample`` keys of each kind; for a differing row, the columns that differ."""
    samples: list[dict[str, Any]] = []
    for kind in ("differs", "extra", "missing"):
        for key in sorted(found[kind], key=_key_order)[:sample]:
            item: dict[str, Any] = {"kind": kind, "key": key}
            if kind == "differs":
                exp = await fetch_val(source, ct.expected_row_sql(), *key)
                act = await fetch_val(target, ct.actual_row_sql(), *key)
                item["columns"] = _differing_columns(ct, exp, act)
            samples.append(item)
    return samples


def _key_order(key: list[str]) -> list[tuple[bool, str]]:
    """Keys in text order, a NULL part (a source row that produces no key) last."""
    return [(v is None, v or "") for v in key]  # asyncpg gives None for a NULL element of the text[]


LEAF_ROWS = 2000  # a differing key range this small is compared row by row


async def _deep_multiset(
    ct: CompiledTable,
    source: asyncpg.Pool,
    target: asyncpg.Pool,
    phase: str | None,
    rejected_keys: list[list[str]] | None = None,
) -> tuple[int, int, int, list[dict[str, Any]]]:
    """A table without a key: the expected and actual rows compared as multisets of row hashes.  In one database,
    the rows the target lacks and has beyond them; across two, each side's count and sum of hashes (a difference
    that keeps the count is one ``differs``, nameless)."""
    for c in (ct, replace(ct, hash_rows_by="text")):  # a column type without a hash function: the rows' text
        try:
            if source is target:
                skip = [phase, str(ct.target)] if phase is not None else []
                row = await fetch_one(target, c.multiset_diff_sql(skip_rejected=phase is not None), *skip)
                assert row is not None
                return row["missing"], row["extra"], 0, []
            rejected = json.dumps(rejected_keys or [])
            e = await fetch_one(source, c.range_summary_sql("expected", lower=False, upper=False), rejected)
            a = await fetch_one(target, c.range_summary_sql("actual", lower=False, upper=False))
            assert e is not None and a is not None
            if (e["n"], e["s"]) == (a["n"], a["s"]):
                return 0, 0, 0, []
            return max(e["n"] - a["n"], 0), max(a["n"] - e["n"], 0), int(e["n"] == a["n"]), []
        except (asyncpg.UndefinedFunctionError, asyncpg.FeatureNotSupportedError):
            if c is not ct:
                raise
    raise AssertionError("unreachable")


async def _deep_two_databases(
    ct: CompiledTable,
    source: asyncpg.Pool,
    target: asyncpg.Pool,
    sample: int,
    rejected_keys: list[list[str]],
    rows_n: int,
) -> tuple[int, int, int, list[dict[str, Any]]]:
    """``--deep`` across two databases: the keys that differ, and samples with the columns that differ."""
    ct = ct.portable()  # the source database may not have the target's own types (enums, domains)
    if not ct.key:
        return await _deep_multiset(ct, source, target, None, rejected_keys)
    found = await compare_two_databases(ct, source, target, rejected_keys, rows_n)
    samples = await _samples(ct, found, sample, source, target)
    return len(found["missing"]), len(found["extra"]), len(found["differs"]), samples


async def compare_two_databases(
    ct: CompiledTable,
    source: asyncpg.Pool,
    target: asyncpg.Pool,
    rejected_keys: list[list[str]],
    rows_n: int,
    *,
    ranges: int = 16,
) -> dict[str, list[list[str]]]:
    """Compare a table across two databases without moving it: count and hash-sum each key range on both sides,
    bisect the ranges that differ until they are small, then compare those row by row (key and hash only).
    Returns the missing, extra and differing target keys."""
    rejected = json.dumps(rejected_keys)
    majors = await asyncio.gather(*(fetch_val(db, "SHOW server_version_num") for db in (source, target)))
    if int(majors[0]) // 10000 != int(majors[1]) // 10000:
        ct = replace(ct, hash_rows_by="text")  # per-type hash functions are only known to agree within a version
    db = {"expected": source, "actual": target}
    found: dict[str, list[list[str]]] = {"missing": [], "extra": [], "differs": []}
    gate = asyncio.Semaphore(2)

    def args(side: str, lo: list[str] | None, hi: list[str] | None) -> list[Any]:
        return ([rejected] if side == "expected" else []) + (lo or []) + (hi or [])

    async def summary(side: str, lo: list[str] | None, hi: list[str] | None) -> tuple[int, Any]:
        sql = ct.range_summary_sql(side, lower=lo is not None, upper=hi is not None)
        row = await fetch_one(db[side], sql, *args(side, lo, hi))
        assert row is not None
        return row["n"], row["s"]

    async def compare(lo: list[str] | None, hi: list[str] | None) -> None:
        async with gate:
            (en, es), (an, as_) = await asyncio.gather(summary("expected", lo, hi), summary("actual", lo, hi))
        if (en, es) == (an, as_):
            return
        if max(en, an) <= LEAF_ROWS:
            rows = {}
            for side in ("expected", "actual"):
                sql = ct.range_rows_sql(side, lower=lo is not None, upper=hi is not None)
                rows[side] = {tuple(r["key"]): r["h"] for r in await fetch_all(db[side], sql, *args(side, lo, hi))}
            e, a = rows["expected"], rows["actual"]
            found["missing"] += [list(k) for k in e.keys() - a.keys()]
            found["extra"] += [list(k) for k in a.keys() - e.keys()]
            found["differs"] += [list(k) for k in e.keys() & a.keys() if e[k] != a[k]]
            return
        side = "actual" if an >= en else "expected"
        sql = ct.range_median_sql(side, lower=lo is not None, upper=hi is not None)
        mid = await fetch_val(db[side], sql, *args(side, lo, hi), max(an, en) // 2)
        await asyncio.gather(compare(lo, mid), compare(mid, hi))

    bounds: list[list[str] | None] = [None]
    if rows_n > LEAF_ROWS:
        percent = min(100.0, 100.0 * 20_000 / rows_n)
        bounds += [r["k"] for r in await fetch_all(target, ct.key_split_sql(), ranges, percent)]
    bounds.append(None)
    try:
        await asyncio.gather(*(compare(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)))
    except (asyncpg.UndefinedFunctionError, asyncpg.FeatureNotSupportedError):
        # a column type without a hash function: compare hashes of the rows' text instead
        return await compare_two_databases(
            replace(ct, hash_rows_by="text"), source, target, rejected_keys, rows_n, ranges=ranges
        )
    return found


def _differing_columns(
    ct: CompiledTable, expected: list[str | None] | None, actual: list[str | None] | None
) -> list[dict[str, Any]]:
    """The columns whose expected and actual text differ (a row that is missing on one side: every column)."""
    n = len(ct.columns)
    return [
        {"column": c.target, "expected": e, "actual": a}
        for c, e, a in zip(ct.columns, expected or [None] * n, actual or [None] * n, strict=True)
        if e != a
    ]


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
