"""Quarantine the source rows that produce a target key another source row produces.

``INSERT … ON CONFLICT DO NOTHING`` keeps the first row of a key and skips the others without a word; a copy
that lost a row that way would look like a re-run.  This module tells them apart, after a batch that wrote fewer
rows than it read (the normal batch pays nothing):

- a key is a *duplicate* only when two different source rows (batch keys) produce it;
- of the rows of such a key, the one the target holds is kept: the first, in batch-key order, whose expected
  values are the target row's values (or, when none is, the first); every other is quarantined with SQLSTATE
  23505;
- so a re-run or ``--recheck`` over rows already copied quarantines nothing (they conflict with themselves), and
  it quarantines the same duplicates again.

Tables whose key is a plain copy of unique source columns (``CompiledTable.key_injective``) cannot have duplicates
and are never looked at.
"""

from __future__ import annotations

import logging

import asyncpg

from . import ledger
from .compile import CompiledTable

log = logging.getLogger(__name__)

DUPLICATE_STATE = "23505"


async def quarantine(
    conn: asyncpg.Connection,
    source: asyncpg.Pool | asyncpg.Connection,
    ct: CompiledTable,
    *,
    phase: str,
    run_id: int | None,
    lower: bool,
    rng: list[str],
    done: int,
    read: int | None = None,
) -> int:
    """After a batch (``rng``: its key range's parameters) wrote or rejected ``done`` of its ``read`` rows (None:
    count them), quarantine the rows of the batch that duplicate another source row's target key; return how many.

    ``conn`` is the batch's transaction on the target; ``source`` the source database (``conn`` itself when it is
    the same).  Runs in a savepoint: when the source cannot be read this way (an expression that fails on some
    row), it logs a warning and quarantines nothing; the validation's counts still see the lost row."""
    if ct.key_injective or ct.mapping.on_conflict != "nothing":
        return 0
    same = source is conn
    if read is None:
        read = await source.fetchval(ct.range_count_sql(lower=lower), *rng)
    if done >= read:
        return 0
    try:
        async with conn.transaction():
            if same:
                members = await conn.fetch(ct.duplicates_sql(lower=lower), *rng)
            else:
                members = await source.fetch(ct.duplicates_sql(lower=lower), *rng)
            if not any(m["in_batch"] for m in members):
                return 0
            return await _quarantine(conn, source, ct, members, phase=phase, run_id=run_id)
    except asyncpg.PostgresError as e:
        log.warning("%s: could not look for duplicate target keys in a batch: %s %s", ct.target, e.sqlstate, e)
        return 0


async def _quarantine(
    conn: asyncpg.Connection,
    source: asyncpg.Pool | asyncpg.Connection,
    ct: CompiledTable,
    members: list[asyncpg.Record],
    *,
    phase: str,
    run_id: int | None,
) -> int:
    groups: dict[tuple[str, ...], list[asyncpg.Record]] = {}
    for m in members:
        groups.setdefault(tuple(m["k"]), []).append(m)
    rejected = await ledger.rejected_among(conn, phase, str(ct.target), [list(m["bk"]) for m in members])
    out = 0
    for key, rows in groups.items():
        if not any(r["in_batch"] for r in rows):
            continue
        candidates = sorted((r for r in rows if tuple(r["bk"]) not in rejected), key=lambda r: r["r"])
        actual = await conn.fetchval(ct.actual_row_sql(), *key)
        kept = None
        for r in candidates:
            try:
                expected = await source.fetchval(ct.expected_row_by_batch_key_sql(), *r["bk"])
            except asyncpg.PostgresError:  # a value that does not convert: not the row the target holds
                continue
            if actual is not None and list(expected) == list(actual):
                kept = r
                break
        if kept is None and candidates:
            kept = candidates[0]
        for r in candidates:
            if r is kept or not r["in_batch"]:
                continue
            assert kept is not None
            await ledger.quarantine(
                conn,
                phase=phase,
                target=str(ct.target),
                source=str(ct.source),
                key=list(r["bk"]),
                sqlstate=DUPLICATE_STATE,
                message=f"duplicate target key ({', '.join(ct.key)}) of {ct.target}: another source row produces it",
                detail=f"Key ({', '.join(ct.key)})=({', '.join(_text(k) for k in key)}) is produced by source rows "
                f"({', '.join(ct.batch_by)})=({', '.join(_text(k) for k in kept['bk'])}), which is kept, and "
                f"({', '.join(_text(k) for k in r['bk'])}).",
                row=await source.fetchval(ct.source_row_sql(), *r["bk"]),
                run_id=run_id,
            )
            out += 1
            log.debug("%s: row %s quarantined: duplicate target key %s", ct.target, list(r["bk"]), list(key))
    return out


def _text(v: str | None) -> str:
    return "NULL" if v is None else v
