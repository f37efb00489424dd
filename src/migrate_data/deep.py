"""``--deep``: every row's checksum, the expected values (the mapping's expressions on the source) against the actual
target rows.  In one database, set-based in concurrent key ranges; across two, a count and a hash sum per key range on
each side, only the ranges that differ bisected, compared row by row at the leaves, so no table crosses the network."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Any

import asyncpg

from .compile import CompiledTable
from .db import fetch_all, fetch_one, fetch_val

log = logging.getLogger(__name__)


async def deep_one_database(
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
    key_ranges = await _key_ranges(ct, db, jobs, rows_n) if jobs > 1 and rows_n >= split_rows else [(None, None)]
    skip = [phase, str(ct.target)] if phase is not None else []

    async def one(c: CompiledTable, lo: list[str] | None, hi: list[str] | None) -> list[asyncpg.Record]:
        sql = c.diff_sql(skip_rejected=phase is not None, lower=lo is not None, upper=hi is not None)
        return await fetch_all(db, sql, sample, *skip, *(lo or []), *(hi or []))

    async def compare(c: CompiledTable) -> list[list[asyncpg.Record]]:
        return await asyncio.gather(*(one(c, lo, hi) for lo, hi in key_ranges))

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


Bound = list[str] | None  # a key as text[], None: the range is open on that side


async def _key_ranges(ct: CompiledTable, db: asyncpg.Pool, parts: int, rows_n: int) -> list[tuple[Bound, Bound]]:
    """``parts`` ranges of the target key, consecutive, split at keys sampled from about 20,000 of the ``rows_n``
    rows; the first open below, the last above."""
    percent = min(100.0, 100.0 * 20_000 / rows_n)
    bounds: list[Bound] = [None, *[r["k"] for r in await fetch_all(db, ct.key_split_sql(), parts, percent)], None]
    return list(zip(bounds, bounds[1:], strict=False))


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


async def deep_two_databases(
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

    key_ranges = await _key_ranges(ct, target, ranges, rows_n) if rows_n > LEAF_ROWS else [(None, None)]
    try:
        await asyncio.gather(*(compare(lo, hi) for lo, hi in key_ranges))
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
