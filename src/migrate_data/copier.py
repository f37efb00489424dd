"""Move the rows of one phase: keyset batches, one transaction each with its checkpoint.

A batch is a key range ``(last, hi]`` of the source's ``batch_by`` columns.  In one database it is a
single ``INSERT … SELECT … ON CONFLICT``; across databases the source ships the transformed values as
text, binary-COPYed into a temporary table that the same ``INSERT … ON CONFLICT`` reads.  Either way
the checkpoint row is updated in the batch's own transaction, so a kill -9 at any instant loses or
doubles nothing.  A batch that fails for a data reason is bisected until the bad rows are isolated;
they go to ``migrate_data.rejects`` and the rest is copied.

A table's batches go through its parts, key ranges copied concurrently (parts.py); the tables of a foreign-key
cycle, and those with ``target_triggers: skip``, are written in replica mode (replica.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from . import ledger, replica
from .batch import BatchWriter
from .catalog import Table, fk_cycles, sequences
from .compile import CompiledTable
from .copy_sql import analyze_sql, setval_sql
from .db import fetch_val, is_transient_error
from .errors import MigrationError, Stopped
from .parts import PartOptions, Parts, part_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyOptions(PartOptions):
    """How tables are cut into parts (parts.py), and what the copy adds to that."""

    max_rejects: int | None = None  # rows quarantined in the phase before it fails
    max_reject_share: float | None = 0.10  # share of a table's source rows quarantined before the phase fails
    deadline: dt.datetime | None = None
    retries: int = 3


async def advance_sequences(conn: asyncpg.Connection, table: Table) -> None:
    """Move the serial and identity sequences of ``table`` past the highest value its column holds (rows written
    with their own values, by the copy or by sync, must not collide with the application's next row)."""
    for column, seq in await sequences(conn, table):
        await conn.execute(setval_sql(table.qualified, column), seq)


@dataclass(frozen=True)
class CopyEvent:
    """What a progress display needs; sent after every batch and at each table's start and end, and (kind "step",
    from ``api.run_phase``) as each step of a run starts: ``target`` is then the step's name, one of ``STEPS``."""

    kind: str  # "start" | "batch" | "done" | "skip" | "step"
    target: str
    rows: int  # rows read so far, this table
    total: int  # source rows expected, this table
    written: int = 0
    rejected: int = 0
    seconds: float = 0.0
    note: str = ""  # a step's detail for people, e.g. "pg_dump of 4 tables"

    @classmethod
    def step(cls, name: str, note: str = "") -> CopyEvent:
        return cls("step", name, 0, 0, note=note)


STEPS = ("preflight", "backup", "schema", "copy", "validate")


@dataclass(frozen=True)
class TableResult:
    source: str
    target: str
    rows_read: int
    rows_written: int
    rejected: int
    seconds: float
    skipped: bool = False


@dataclass
class _Unit:
    ct: CompiledTable
    target_table: Table
    cyclic: bool
    depends: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    total: int = 0
    rows: int = 0
    written: int = 0
    rejected: int = 0
    seconds: float = 0.0
    skipped: bool = False
    direct: bool = True  # cross-database: try COPY straight into the target (see BatchWriter.direct)
    step: int | None = None  # batch_by: ctid: blocks per batch (about batch_size rows)
    gate: asyncio.Semaphore | None = None  # a partitioned source: at most --jobs leaves (or ranges of one) at a time


class Copier:
    """Copy the compiled tables of one phase; ``run()`` returns a TableResult per table."""

    def __init__(
        self,
        *,
        phase: str,
        tables: list[tuple[CompiledTable, Table]],
        target_pool: asyncpg.Pool,
        source_pool: asyncpg.Pool,
        run_id: int | None = None,
        options: CopyOptions = CopyOptions(),
        stop: asyncio.Event | None = None,
        on_event: Callable[[CopyEvent], None] | None = None,
        lock: ledger.LockSession | None = None,
    ) -> None:
        self.phase = phase
        self.lock = lock  # when given, no batch commits unless this session still holds the lock
        self.target_pool = target_pool
        self.source_pool = source_pool
        self.same_db = source_pool is target_pool
        self.run_id = run_id
        self.writer = BatchWriter(phase, run_id, source_pool)
        self.parts = Parts(phase, target_pool, source_pool, lock, options)
        self.options = options
        self.stop = stop or asyncio.Event()
        self.on_event = on_event or (lambda e: None)
        self.sem = asyncio.Semaphore(max(1, options.jobs))
        self._halt = asyncio.Event()  # set when any worker stops or fails: the others finish their batch
        self._stopped_reason: str | None = None
        names = {str(ct.target) for ct, _ in tables}
        groups = fk_cycles([t for _, t in tables])
        self.units: dict[str, _Unit] = {}
        for ct, tt in tables:
            name = str(ct.target)
            group = next((g for g in groups if name in g), {name})
            deps = {str(fk.ref_table) for fk in tt.foreign_keys} & names
            self.units[name] = _Unit(ct, tt, cyclic=len(group) > 1, depends=deps - group)
            if ct.leaves:
                self.units[name].gate = asyncio.Semaphore(max(1, options.jobs))

    # -- scheduling ----------------------------------------------------------------------------
    async def run(self) -> list[TableResult]:
        cyclic = [u for u in self.units.values() if u.cyclic]
        skipped = [n for n, u in self.units.items() if u.ct.replica]
        await replica.check_allowed(self.target_pool, cyclic=[str(u.ct.target) for u in cyclic], skipped=skipped)
        if self.lock is not None:
            self.lock.watch(self._halt)  # a lost lock stops every worker after its batch
        tasks = [asyncio.create_task(self._table(u), name=n) for n, u in self.units.items()]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        failures = [e for e in errors if not isinstance(e, (Stopped, asyncio.CancelledError))]
        if self.lock is not None and self.lock.lost.is_set():
            raise self.lock.error() from (failures[0] if failures else None)
        if failures:
            raise failures[0]
        if errors:
            raise Stopped(f"stopped cleanly at a checkpoint: {self._stopped_reason or 'interrupted'}")
        await replica.check_orphans(self.target_pool, [(u.ct, u.target_table) for u in cyclic])
        return [
            TableResult(str(u.ct.source), n, u.rows, u.written, u.rejected, u.seconds, u.skipped)
            for n, u in self.units.items()
        ]

    def _should_stop(self, estimate: float) -> str | None:
        if self.stop.is_set():
            return "interrupted by a signal"
        if self._halt.is_set():
            return self._stopped_reason or "another table stopped"
        d = self.options.deadline
        if d is not None and dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=estimate) > d:
            return (
                f"the window closes at {d.isoformat(timespec='minutes')} (--until) before the next batch could finish"
            )
        return None

    async def _table(self, u: _Unit) -> None:
        name = str(u.ct.target)
        try:
            for dep in u.depends:
                await self.units[dep].done.wait()
            if self._halt.is_set() or self.stop.is_set():
                raise Stopped(self._stopped_reason or "stopped")
            parts = await self.parts.recorded(u.ct)  # made on the table's first run (parts.py)
            copied = bool(parts) and all(p["done"] for p in parts) and not self.options.recheck
            if not copied:  # a table copied before is skipped without reading its source
                u.total = await fetch_val(self.source_pool, u.ct.count_sql())
                parts = await self.parts.ready(u.ct, parts, u.total)
            finished = name in await ledger.finished_tables(self.target_pool, self.phase)
            if all(p["done"] for p in parts) and finished and not self.options.recheck:
                u.skipped = True
                u.rows = sum(p["rows_read"] for p in parts)
                u.written = sum(p["rows_written"] for p in parts)
                u.rejected = sum(p["rejected"] for p in parts)
                self.on_event(CopyEvent("skip", name, u.rows, u.rows, u.written, u.rejected))
                log.info("%s: already copied, skipped (use --recheck for a full idempotent pass)", name)
                return
            u.rows = sum(p["rows_read"] for p in parts)
            self.on_event(CopyEvent("start", name, u.rows, u.total))
            started = time.monotonic()
            await asyncio.gather(*(self._gated(u, p) for p in parts if not p["done"]))
            u.seconds += time.monotonic() - started
            # A table is finished only once its sequences are past the copied values: a kill before this line
            # leaves it unfinished, and the next run sets them without copying again.
            async with ledger.committed_under(self.target_pool, self.lock) as conn:
                await self._fix_sequences(u, conn)
                if u.written or not finished:  # a new table has no statistics: the application's queries need them
                    await conn.execute(analyze_sql(u.ct))
                await ledger.mark_finished(conn, self.phase, name)
            final = await ledger.checkpoints(self.target_pool, self.phase, name)
            u.rows = sum(p["rows_read"] for p in final)
            u.written = sum(p["rows_written"] for p in final)
            u.rejected = sum(p["rejected"] for p in final)
            self.on_event(CopyEvent("done", name, u.rows, u.total, u.written, u.rejected, u.seconds))
        except BaseException as e:
            if not isinstance(e, Stopped) and self._stopped_reason is None:
                self._stopped_reason = f"{name} failed"
            self._halt.set()
            raise
        finally:
            u.done.set()

    async def _gated(self, u: _Unit, part: asyncpg.Record) -> None:
        """Copy one part; a partitioned table's parts wait for one of its ``--jobs`` turns, so its leaves are copied
        a few at a time, each to its end, rather than all at once a batch each."""
        if u.gate is None:
            await self._part(u, part)
            return
        async with u.gate:
            await self._part(u, part)

    # -- one key range ---------------------------------------------------------------------------
    async def _part(self, u: _Unit, part: asyncpg.Record) -> None:
        name = str(u.ct.target)
        ct = part_table(u.ct, part)
        last: list[str] | None = part["last_key"] or part["lo"]
        hi: list[str] | None = part["hi"]
        estimate = 0.0
        while True:
            reason = self._should_stop(estimate)
            if reason:
                self._stopped_reason = self._stopped_reason or reason
                self._halt.set()
                raise Stopped(reason)
            async with self.sem:
                started = time.monotonic()
                n, new_last, written, rejected, done = await self._batch_with_retries(u, ct, part["part"], last, hi)
                took = time.monotonic() - started
            estimate = took if estimate == 0 else 0.7 * estimate + 0.3 * took
            u.rows += n
            u.written += written
            u.rejected += rejected
            log.info(
                "%s part %d%s: %d rows read, %d written, %d rejected in %.2fs (last key %s)",
                name,
                part["part"],
                f" ({ct.leaf})" if ct.leaf is not None else "",
                n,
                written,
                rejected,
                took,
                new_last,
            )
            self.on_event(CopyEvent("batch", name, u.rows, u.total, u.written, u.rejected, took))
            await self._check_max_rejects()
            if done:
                return
            last = new_last

    async def _batch_with_retries(
        self, u: _Unit, ct: CompiledTable, part: int, last: list[str] | None, hi: list[str] | None
    ) -> tuple[int, list[str] | None, int, int, bool]:
        for attempt in range(self.options.retries + 1):
            try:
                return await self._batch(u, ct, part, last, hi)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as e:
                if is_transient_error(e) and attempt < self.options.retries:
                    wait = 2**attempt
                    log.warning("%s: %s; retrying the batch in %ds", u.ct.target, e, wait)
                    await asyncio.sleep(wait)
                    continue
                raise MigrationError(
                    f"copy of {u.ct.target} stopped after key {last}"
                    + (f" of partition {ct.leaf}" if ct.leaf is not None else "")
                    + f": {e}",
                    detail=getattr(e, "detail", None) or f"SQLSTATE {getattr(e, 'sqlstate', None) or '-'}",
                    hint="nothing after the last checkpoint was kept; fix the cause and run the same command again",
                ) from e
        raise AssertionError("unreachable")

    async def _batch(
        self, u: _Unit, ct: CompiledTable, part: int, last: list[str] | None, hi: list[str] | None
    ) -> tuple[int, list[str] | None, int, int, bool]:
        """Copy the next batch of a part, in one transaction with its checkpoint: rows read, the new last key,
        rows written, rows rejected, and whether the part is done."""
        lower, upper = last is not None, hi is not None
        if ct.by_blocks:
            if u.step is None:
                u.step = await self.parts.blocks_per_batch(ct, u.total)
            n, new_last, done = await self.parts.next_blocks(ct, last, hi, u.step)
        else:
            bound_args = [*(last or []), *(hi or []), self.options.batch_size]
            bound = await self.source_pool.fetchrow(ct.bound_sql(lower=lower, upper=upper), *bound_args)
            n, new_last, done = bound["n"], bound["last"], bound["n"] < self.options.batch_size
        if n == 0:  # by blocks: empty blocks are passed over, the checkpoint moves on
            upto = new_last if ct.by_blocks else last
            async with ledger.committed_under(self.target_pool, self.lock) as conn:
                await self._checkpoint(conn, u, part, upto, 0, 0, 0, done=done or not ct.by_blocks)
            return 0, upto, 0, 0, done or not ct.by_blocks
        rng = [*(last or []), *new_last]
        async with self.target_pool.acquire() as conn, conn.transaction():
            if u.cyclic or ct.replica:
                await conn.execute(replica.REPLICA)
            writer = self.writer
            if self.same_db:
                written, rejected = await writer.same_db(conn, ct, last, new_last, rng)
            else:
                direct = await writer.direct(conn, ct, lower, rng) if u.direct and ct.direct_copy_ok else None
                if direct is False:  # a key that is there already: this table stays on the staged path
                    u.direct, direct = False, None
                written, rejected = (direct, 0) if direct is not None else await writer.staged(conn, ct, lower, rng)
            await self._checkpoint(conn, u, part, new_last, n, written, rejected, done=done)
            if self.lock is not None:
                await self.lock.check(conn)  # last before COMMIT: without the lock the batch rolls back
        return n, new_last, written, rejected, done

    async def _checkpoint(
        self,
        db: asyncpg.Pool | asyncpg.Connection,
        u: _Unit,
        part: int,
        last: list[str] | None,
        n: int,
        written: int,
        rejected: int,
        *,
        done: bool,
    ) -> None:
        await ledger.advance_checkpoint(db, self.phase, str(u.ct.target), part, last, n, written, rejected, done=done)

    async def _check_max_rejects(self) -> None:
        """Fail the run when more rows are quarantined than ``max_rejects`` allows: a count for the phase, or a
        share of each table's source rows (default 10 %: a mapping that refuses that much is wrong)."""
        limit, share = self.options.max_rejects, self.options.max_reject_share
        if limit is None and share is None:
            return
        counts = await ledger.reject_counts(self.target_pool, self.phase)
        total = sum(counts.values())
        too_many = None
        if limit is not None and total > limit:
            too_many = f"{total:,} rows rejected in phase {self.phase}, more than --max-rejects {limit:,}"
        elif share is not None:
            for name, n in counts.items():
                u = self.units.get(name)
                if u is not None and u.total and n > share * u.total:
                    too_many = (
                        f"{n:,} of the {u.total:,} source rows of {name} rejected ({n / u.total:.1%}), more than "
                        f"--max-rejects {share:.0%}"
                    )
                    break
        if too_many:
            self._stopped_reason = "too many rejects"
            self._halt.set()
            raise MigrationError(
                too_many,
                hint="read them with `migrate-data validate` or in migrate_data.rejects; fix the data or the mapping "
                "and run again (copied rows are kept and not copied twice); --max-rejects N or N% raises the limit",
            )

    # -- after the copy ----------------------------------------------------------------------------
    async def _fix_sequences(self, u: _Unit, conn: asyncpg.Connection) -> None:  # a named step (tests/killer.py)
        await advance_sequences(conn, u.target_table)
