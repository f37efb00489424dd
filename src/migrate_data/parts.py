"""A table's parts: the key ranges the copier copies concurrently, each with its checkpoint in the ledger.

A table of ``split_rows`` source rows or more is cut into ``--jobs`` ranges at sampled keys (at block numbers for
``batch_by: ctid``); a partitioned source has parts per leaf partition, a big leaf ranges of its own.  The parts are
made on a table's first run and reused by every later one, so a run goes on where each range's last batch committed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import asyncpg

from . import ledger, partitions
from .compile import CompiledTable
from .db import fetch_val
from .errors import RefusedError
from .sql import qname

Part = tuple[str | None, list[str] | None, list[str] | None]  # (leaf partition or None, lo, hi), as recorded


@dataclass(frozen=True)
class PartOptions:
    """How a table is cut into parts and its parts into batches."""

    # 20,000 rows: large enough that a lookup's join (a scan of its table per batch) is amortised, small enough
    # that a batch takes a fraction of a second and a signal stops the run quickly (BENCHMARKS.md)
    batch_size: int = 20_000
    jobs: int = 2
    recheck: bool = False  # every part again from its start
    split_rows: int = 200_000  # a table with more source rows is copied in `jobs` concurrent key ranges


def part_table(ct: CompiledTable, part: asyncpg.Record) -> CompiledTable:
    """The table as one part reads it: its leaf partition, or the whole source."""
    if part["source"] is None:
        return ct
    return ct.for_leaf(next(leaf for leaf in ct.leaves if str(leaf) == part["source"]))


class Parts:
    """The parts of one phase's tables: recorded in the target's ledger (committed under ``lock`` when given), cut
    from the source's keys or blocks."""

    def __init__(
        self,
        phase: str,
        target: asyncpg.Pool,
        source: asyncpg.Pool,
        lock: ledger.LockSession | None,
        options: PartOptions,
    ) -> None:
        self.phase, self.target, self.source, self.lock, self.options = phase, target, source, lock, options

    async def recorded(self, ct: CompiledTable) -> list[asyncpg.Record]:
        """The table's parts as an earlier run made them; none the first time, or when a leaf partition was attached
        or detached since (refused, unless ``--recheck``: then they are made anew)."""
        name = str(ct.target)
        parts = await ledger.checkpoints(self.target, self.phase, name)
        if parts and self._partitions_changed(ct, parts):
            async with ledger.committed_under(self.target, self.lock) as conn:
                await ledger.unmark_finished(conn, self.phase, name)
                await ledger.reset_checkpoints(conn, self.phase, name)
            return []
        return parts

    async def ready(self, ct: CompiledTable, parts: list[asyncpg.Record], total: int) -> list[asyncpg.Record]:
        """The parts to copy now: the ``recorded`` ones (with ``--recheck`` each again from its start), else the table
        of ``total`` source rows cut into parts and recorded."""
        name = str(ct.target)
        if parts and not self.options.recheck:
            return parts
        if parts:
            async with ledger.committed_under(self.target, self.lock) as conn:
                await ledger.unmark_finished(conn, self.phase, name)
                await ledger.restart_checkpoints(conn, self.phase, name)
        else:
            cut = await self._cut(ct, total)
            async with ledger.committed_under(self.target, self.lock) as conn:
                await ledger.add_checkpoints(conn, self.phase, name, cut)
        return await ledger.checkpoints(self.target, self.phase, name)

    def _partitions_changed(self, ct: CompiledTable, parts: list[asyncpg.Record]) -> bool:
        """Whether the leaves the parts name are no longer the source's (refused without ``--recheck``); refuse
        ``--recheck`` of a table copied by blocks into a table without a key."""
        name = str(ct.target)
        recorded = {p["source"] for p in parts if p["source"] is not None}
        changes = partitions.leaf_changes(recorded, [str(leaf) for leaf in ct.leaves])
        if changes and not self.options.recheck:
            raise RefusedError(
                f"the partitions of {ct.source} changed since this phase started copying it: "
                f"{changes.describe(str(ct.source))}",
                detail=f"the checkpoints of {name} name the partitions as they were; going on would skip rows "
                "or lose track of rows already copied; nothing was copied in this run",
                hint=f"attach or detach it back and run the same command again; or run it with --recheck to copy "
                f"{ct.source} as it is now (rows copied from a detached partition stay in {name}: validation "
                "reports them, and a rollback of the phase removes them)",
            )
        if self.options.recheck and not ct.key:
            raise RefusedError(
                f"--recheck cannot pass over {name} again: it is copied by blocks (batch_by: ctid) into a table "
                "without a key, so nothing would recognise the rows already copied",
                hint=f"roll the phase back and run it again to copy {ct.source} anew",
            )
        return bool(changes)

    async def _cut(self, ct: CompiledTable, total: int) -> list[Part]:
        """The parts of a table of ``total`` source rows: per leaf partition, or of the whole source."""
        if not ct.leaves:
            bounds = await self._bounds(ct, total)
            return [(None, bounds[i], bounds[i + 1] if i + 1 < len(bounds) else None) for i in range(len(bounds))]
        out: list[Part] = []
        for leaf in ct.leaves:
            leaf_ct = ct.for_leaf(leaf)
            # a leaf is split only when big (none can be while the whole table is small): its size from the
            # statistics, as the split itself is approximate, counted only when it was never analyzed
            rows = 0
            if total >= self.options.split_rows:
                rows = await fetch_val(
                    self.source, "SELECT reltuples::bigint FROM pg_class WHERE oid = $1::regclass", qname(leaf)
                )
                if rows < 0:
                    rows = await fetch_val(self.source, leaf_ct.count_sql())
            bounds = await self._bounds(leaf_ct, rows)
            out += [(str(leaf), bounds[i], bounds[i + 1] if i + 1 < len(bounds) else None) for i in range(len(bounds))]
        return out

    async def _bounds(self, ct: CompiledTable, total: int) -> list[list[str] | None]:
        """Where the concurrent key ranges of a table (or of one leaf) of ``total`` rows start: ``[None]`` for one
        range, ``[None, k1, …]`` for ``--jobs`` ranges of a big one (block numbers for ``batch_by: ctid``)."""
        bounds: list[list[str] | None] = [None]
        n = min(self.options.jobs, math.ceil(total / max(self.options.batch_size, 1)))
        if n > 1 and total >= self.options.split_rows:
            if ct.by_blocks:
                blocks = await self._blocks(ct)
                bounds += [[f"({blocks * i // n},0)"] for i in range(1, n)]
            else:
                percent = min(100.0, 100.0 * 20_000 / total)  # about 20,000 sampled keys
                bounds += [r["k"] for r in await self.source.fetch(ct.split_sql(), n, percent)]
        return bounds

    # -- batch_by: ctid ------------------------------------------------------------------------------
    async def blocks_per_batch(self, ct: CompiledTable, total: int) -> int:
        """How many blocks hold about ``batch_size`` rows of the relation ``ct`` reads (``total``: its table's source
        rows, for a relation never analyzed)."""
        stats = await self.source.fetchrow(
            "SELECT reltuples, relpages FROM pg_class WHERE oid = $1::regclass", qname(ct.leaf or ct.source)
        )
        blocks = await self._blocks(ct)
        if stats is not None and stats["reltuples"] > 0 and stats["relpages"] > 0:
            per_block = stats["reltuples"] / stats["relpages"]
        else:  # never analyzed
            per_block = (total or await fetch_val(self.source, ct.count_sql())) / max(blocks, 1)
        return max(1, int(self.options.batch_size / max(per_block, 1.0)))

    async def next_blocks(
        self, ct: CompiledTable, last: list[str] | None, hi: list[str] | None, step: int
    ) -> tuple[int, list[str], bool]:
        """The next ``step`` blocks after ``last``: the rows in them, the new last key, and whether they reach the
        part's end (``hi``, else the relation's last block)."""
        lo = _block(last[0]) if last else 0
        end = _block(hi[0]) if hi else await self._blocks(ct)
        upto = max(lo, min(lo + step, end))
        new_last = [f"({upto},0)"]
        n = await fetch_val(self.source, ct.range_count_sql(lower=last is not None), *(last or []), *new_last)
        return n, new_last, upto >= end

    async def _blocks(self, ct: CompiledTable) -> int:
        """The source relation's size in blocks, now."""
        return int(
            await fetch_val(
                self.source,
                "SELECT pg_relation_size($1::regclass) / current_setting('block_size')::bigint",
                qname(ct.leaf or ct.source),
            )
        )


def _block(tid: str) -> int:
    """The block number of a tid's text, ``(12,0)`` -> 12."""
    return int(tid.strip("()").split(",")[0])
