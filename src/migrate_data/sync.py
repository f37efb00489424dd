"""Apply the changes capture logged (see capture.py) through a phase's own compiled mapping; block writes for a cutover.

A batch is up to ``batch_size`` log rows of one phase, read in id order.  Nothing in a log row is applied as such: its
key says which rows to re-derive from the CURRENT source rows, so applying a change twice, or late, or out of order,
gives the same target:

- every logged source key whose row exists now (and passes the mapping's ``where``) is upserted with the mapping's
  own expressions (``INSERT … SELECT … ON CONFLICT (key) DO UPDATE SET …``, only rows whose values differ);
- every logged target key that no current source row produces is deleted (a deleted row, a key that changed, a row
  that left the ``where``);
- a change in a lookup's table re-derives every row that reads the looked-up row;
- a row that fails now goes to ``migrate_data.rejects`` (and out of the target), like the copier's; a quarantined row
  that works now is copied and its reject cleared.  Rows refused because another row was not there yet (a foreign
  key, 23503) or was still in the way (a unique value, 23505) are tried again after the batch and at every pass.

A batch's log rows are taken (deleted and returned, one statement) at the start of the transaction that applies them
(sync_batch.py applies one); its target writes, its rejects and that deletion commit together, only while the run holds
the lock. The next batch takes ids above the last one (ids are not committed in id order, so never "up to id N": a lower
id that commits later is taken by the next pass). Across two databases the log is in the source: its rows are taken in a
source transaction that commits just after the target's; a kill in between re-applies them, which changes nothing. The
log rows of a delete that must wait are put back as they were. The common case, a batch whose rows all go in, is one
upsert per table, without resolving the keys first; only when a row fails are the keys resolved and written by halves
around it. Every (sub)transaction that writes target rows records it with ``ledger.mark_write`` (a rollback deletes
exactly those rows).

A delete that a later phase's rows still reference (23503) keeps its log rows for a later pass: syncing several
phases at once goes round them until nothing moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

import asyncpg

from . import capture, capture_sql, capture_state, ledger
from .catalog import ForeignKey, Table, read_table
from .compile import CompiledTable
from .db import is_transient_error
from .errors import RefusedError
from .sync_batch import BatchApplier
from .sync_sql import KEEP_SQL, MAX_ID_SQL, RETRY_STATES, SCHEMA, TAKE_SQL, LookupUse, SyncTable

log = logging.getLogger(__name__)
FOLLOW_RETRIES = 10  # --follow: passes in a row that may lose a session (about 4 min of pauses) before it gives up


@dataclass(frozen=True)
class SyncOptions:
    batch_size: int = 1000  # log rows per transaction
    follow: bool = False  # keep going until stopped
    interval: float = 1.0  # --follow: seconds to wait when the log is empty
    report_every: float = 10.0  # --follow: seconds between lag lines when nothing happens
    recheck_every: float = 60.0  # --follow: seconds between checks of capture (DDL since: see PhaseSyncer.prepare)
    lock_wait: str = capture_sql.LOCK_WAIT  # capture installed again on a busy table: how long one try may wait
    retries: int = capture_sql.LOCK_RETRIES  # … and how many tries after the first


@dataclass(frozen=True)
class PhaseSync:
    """What a sync did for one phase, and what is left."""

    phase: str
    changes: int = 0  # log rows applied and deleted
    upserted: int = 0  # target rows inserted or changed
    deleted: int = 0  # target rows deleted
    rejected: int = 0  # rows quarantined
    cleared: int = 0  # rejects cleared: the row is copied now, or gone from the source
    deferred: int = 0  # log rows kept for later: their delete waits for rows that reference them
    waiting: int = 0  # log rows waiting at the end
    oldest_seconds: float | None = None  # age of the oldest of them
    taken_out: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (target, source key): quarantined rows that were there
    skipped: int = 0  # changed rows left as they are: someone else wrote them in the target since the phase started

    def __add__(self, other: PhaseSync) -> PhaseSync:
        return replace(
            self,
            changes=self.changes + other.changes,
            upserted=self.upserted + other.upserted,
            deleted=self.deleted + other.deleted,
            rejected=self.rejected + other.rejected,
            cleared=self.cleared + other.cleared,
            taken_out=tuple(sorted({*self.taken_out, *other.taken_out}, key=repr)),
            skipped=self.skipped + other.skipped,
        )

    @property
    def progress(self) -> bool:
        return bool(self.changes or self.cleared)


@dataclass(frozen=True)
class SyncResult:
    phases: tuple[PhaseSync, ...]
    seconds: float


# -- one phase ----------------------------------------------------------------------------------------------------
class PhaseSyncer:
    """Apply one phase's captured changes, batch by batch."""

    def __init__(
        self,
        *,
        phase: str,
        tables: Sequence[tuple[CompiledTable, Table]],
        target: asyncpg.Pool,
        source: asyncpg.Pool,
        lock: ledger.LockSession,
        run_id: int | None = None,
        batch_size: int = SyncOptions.batch_size,
        lock_wait: str = SyncOptions.lock_wait,
        retries: int = SyncOptions.retries,
        snapshot: str | None = None,
    ) -> None:
        self.phase = phase
        self.pairs = list(tables)  # parents first
        self.target = target
        self.source = source
        self.same_db = source is target
        self.lock = lock
        self.run_id = run_id
        self.batch_size = batch_size
        self.lock_wait, self.retries = lock_wait, retries
        self.snapshot = snapshot  # the phase's start snapshot: which target rows were there before it
        self.applier: BatchApplier | None = None  # once prepared
        self.deferred: set[int] = set()

    async def prepare(self) -> None:
        """Check that capture is on and matches the mapping; work out where each key is in the log rows."""
        plan = await capture.capture_plan(self.source, self.phase, [ct for ct, _ in self.pairs])
        registry = await self._check_capture(plan)
        tables = [
            await self._sync_table(ct, target, registry, tuple(r for t, r in plan.reads if t == str(ct.target)))
            for ct, target in self.pairs
        ]
        index = {t.name: i for i, t in enumerate(tables)}
        children: dict[int, list[tuple[int, ForeignKey]]] = {}
        for j, t in enumerate(tables):
            for fk in t.target.foreign_keys:
                i = index.get(str(fk.ref_table))
                if i is not None and i != j:
                    children.setdefault(i, []).append((j, fk))
        self.applier = BatchApplier(
            self.phase, tables, children, self.source, self.same_db, run_id=self.run_id, snapshot=self.snapshot
        )

    @property
    def tables(self) -> list[SyncTable]:
        """The phase's tables as sync sees them (parents first); empty until prepared."""
        return self.applier.tables if self.applier is not None else []

    async def _check_capture(self, plan: capture_sql.CapturePlan) -> dict[str, tuple[str, ...]]:
        """Refuse unless the phase's changes can be captured, capture is on, and it logs what the mapping needs now;
        returns what it logs per table."""
        name = self.phase
        if not plan.ok:
            raise RefusedError(
                f"{name}: its changes cannot be captured, so there is nothing to sync",
                detail="\n".join(f"{t}: {why}" for t, why in plan.problems),
                hint="map each target key column from a unique source column (a plain rename); until then, re-run "
                "the phase with --recheck in a window, with writes stopped",
            )
        cap = await capture_state.state(self.source, name)
        if cap.state in ("on", "COLUMN MOVED"):
            await self._capture_again(plan, cap)
            cap = await capture_state.state(self.source, name)
        if cap.state != "on":
            raise RefusedError(
                f"{name}: change capture is {cap.state}" + (f" ({cap.problem})" if cap.problem else ""),
                hint={
                    "off": "capture starts with the phase's run: roll the phase back and run it again",
                    "COLUMN GONE": "give each column back its own name (nothing written meanwhile is lost: sync then "
                    "re-derives the table), or roll the phase back and run it again with its mapping changed",
                }.get(
                    cap.state,
                    "the triggers were dropped or disabled by hand: writes since then were not captured; roll the "
                    "phase back and run it again",
                ),
            )
        registry = await capture_state.registry(self.source, name)
        for c in plan.tables:
            have = registry.get(c.name, ())
            if not set(c.columns) <= set(have):
                raise RefusedError(
                    f"{name}: the mapping changed since capture started on {c.name} (it logs {', '.join(have)}, "
                    f"the mapping now needs {', '.join(c.columns)})",
                    hint=f"roll {name} back and run it again",
                )
        return registry

    async def _capture_again(self, plan: capture_sql.CapturePlan, cap: capture_state.CaptureState) -> None:
        """Install capture again on the tables whose function no longer looks where their columns are (a column
        dropped and added again or retyped, a partition attached again), with a row that makes this sync re-derive
        each: what the DDL rewrote fired no trigger.  Only as the mapping was: the log's rows hold its keys."""
        stale = await capture.outdated(self.source, self.phase, self.pairs)
        truncated = f"SELECT EXISTS (SELECT 1 FROM {SCHEMA}.changes WHERE phase = $1 AND op = 'T')"
        if not stale or await self.source.fetchval(truncated, self.phase):  # a TRUNCATE: sync refuses below
            return
        registry = await capture_state.registry(self.source, self.phase)
        if registry != {c.name: c.columns for c in plan.tables}:
            raise RefusedError(
                f"{self.phase}: change capture on {', '.join(stale)} must be installed again "
                f"({cap.problem or 'its function does not match the columns as they are now'}), but the mapping "
                "changed since capture started: the logged keys are the old mapping's",
                hint=f"roll {self.phase} back and run it again",
            )
        log.warning("%s: capturing %s again (%s)", self.phase, ", ".join(stale), cap.problem or "its function")
        await capture.install_again(
            self.source, self.phase, self.pairs, stale, wait=self.lock_wait, retries=self.retries
        )

    async def _sync_table(
        self, ct: CompiledTable, target: Table, registry: dict[str, tuple[str, ...]], reads: tuple[str, ...]
    ) -> SyncTable:
        """One table's view of its mapping for sync: where its batch key, target key and lookups' keys are in the
        log rows."""
        src = await read_table(self.source, ct.source)
        assert src is not None
        feed, _ = capture_sql.key_feed(ct, src)
        assert feed is not None
        cols = registry[str(src.qualified)]
        uses = []
        for _, lk in ct.lookups:
            lt = await read_table(self.source, lk.table)
            assert lt is not None
            lcols = registry[str(lt.qualified)]
            on_types = tuple(src.column(o).key_type for o in lk.on)  # type: ignore[union-attr]
            uses.append(LookupUse(str(lt.qualified), tuple(lcols.index(k) for k in lk.key), lk.on, on_types))
        return SyncTable(
            ct,
            target,
            feed,
            tuple(src.column(f).key_type for f in feed),  # type: ignore[union-attr]
            tuple(cols.index(b) for b in ct.batch_by),
            tuple(cols.index(f) for f in feed),
            tuple(uses),
            reads,
        )

    async def max_id(self) -> int | None:
        return await self.source.fetchval(MAX_ID_SQL, self.phase)

    async def lag(self) -> tuple[int, float | None]:
        st = await capture_state.state(self.source, self.phase)
        return st.waiting, st.oldest_seconds

    async def waiting_rejects(self) -> dict[str, list[list[str]]]:
        """The phase's rows refused because of another row (a parent not there yet, a unique value in the way)."""
        rows = await self.target.fetch(
            f"SELECT target, source_key FROM {SCHEMA}.rejects WHERE phase = $1 AND sqlstate = ANY($2::text[])",
            self.phase,
            list(RETRY_STATES),
        )
        out: dict[str, list[list[str]]] = {}
        for r in rows:
            out.setdefault(r["target"], []).append(list(r["source_key"]))
        return out

    async def batches(self, *, upto: int | None, stop: asyncio.Event, retry: bool = True) -> AsyncIterator[PhaseSync]:
        """Retry the rows waiting for others (``retry``), then apply the log rows (up to id ``upto``), a batch at a
        time: what each batch did, once it has committed."""
        waiting = await self.waiting_rejects() if retry else {}
        if waiting:
            yield (await self.apply(waiting))[0]
        last: int | None = 0
        while not stop.is_set():
            done, last = await self.apply({}, after=last, upto=upto)
            if last is None:
                break
            yield done

    # -- one batch ------------------------------------------------------------------------------------------------
    async def apply(
        self, extra: dict[str, list[list[str]]], *, after: int | None = None, upto: int | None = None
    ) -> tuple[PhaseSync, int | None]:
        """Take the next batch of log rows (ids above ``after``, up to ``upto``; none if ``after`` is None), apply it
        and re-derive the ``extra`` batch keys per target table, in one transaction.  Returns what it did and the
        batch's last id (None: nothing was left to take).  Across two databases the log rows are taken in a
        transaction of the source that commits just after the target's: a kill in between re-applies them, which
        changes nothing."""
        if self.same_db:
            async with self.target.acquire() as conn, conn.transaction():
                rows = await take(conn, self.phase, after, upto, self.batch_size)
                done = await self._apply(conn, rows, extra, after)
            return done, (max(r["id"] for r in rows) if rows else None)
        async with self.source.acquire() as log_conn, log_conn.transaction():
            async with self.target.acquire() as conn, conn.transaction():
                rows = await take(log_conn, self.phase, after, upto, self.batch_size)
                done = await self._apply(conn, rows, extra, after)
            await keep_deferred(log_conn, self.phase, [r for r in rows if r["id"] in self.deferred])
        return done, (max(r["id"] for r in rows) if rows else None)

    async def _apply(
        self,
        conn: asyncpg.Connection,
        rows: Sequence[asyncpg.Record],
        extra: dict[str, list[list[str]]],
        after: int | None,
    ) -> PhaseSync:
        if after is not None and not rows:
            return PhaseSync(self.phase)
        assert self.applier is not None, "prepare() first"
        b = await self.applier.apply(conn, rows, extra)
        ids = [r["id"] for r in rows if r["id"] not in b.deferred]
        self.deferred = (self.deferred - {r["id"] for r in rows}) | b.deferred
        if self.same_db:
            await keep_deferred(conn, self.phase, [r for r in rows if r["id"] in b.deferred])
        await ledger.mark_synced(conn, self.phase)
        await self.lock.check(conn)  # last before COMMIT: without the lock the batch rolls back
        if rows or any(b.counts.values()):
            log.debug("%s: %d changes applied: %s", self.phase, len(ids), b.counts)
        return PhaseSync(self.phase, changes=len(ids), taken_out=tuple(sorted(b.taken_out, key=repr)), **b.counts)


async def take(
    conn: asyncpg.Connection, phase: str, after: int | None, upto: int | None, limit: int
) -> list[asyncpg.Record]:
    """Delete and return the next ``limit`` log rows of ``phase`` with ids above ``after`` (and up to ``upto``), in
    the caller's transaction: they are gone only if it commits.  Ids above ``after``, never "up to id N" alone: ids
    are not committed in id order, and a lower one that commits later is taken by the next pass."""
    if after is None:
        return []
    return sorted(await conn.fetch(TAKE_SQL, phase, after, upto, limit), key=lambda r: r["id"])


async def keep_deferred(conn: asyncpg.Connection, phase: str, rows: list[asyncpg.Record]) -> None:
    """Put back, as they were (same id and time), the taken log rows whose changes wait for a later pass."""
    if rows:
        await conn.executemany(KEEP_SQL, [(r["id"], phase, r["source"], r["key"], r["op"], r["at"]) for r in rows])


# -- several phases -------------------------------------------------------------------------------------------------
async def sync(
    syncers: Sequence[PhaseSyncer], options: SyncOptions, *, stop: asyncio.Event, bounded: bool = True
) -> dict[str, PhaseSync]:
    """Apply the phases' changes.  Without ``follow``: what is logged now (``bounded``: up to each phase's last id at
    the start), going round the phases until a round moves nothing (a delete that waited for a later phase, a row
    that waited for an earlier one).  With ``follow``: until ``stop``, logging the lag."""
    totals = {s.phase: PhaseSync(s.phase) for s in syncers}
    upto = {s.phase: ((await s.max_id() or 0) if bounded and not options.follow else None) for s in syncers}
    said = checked = time.monotonic()
    moved = True  # rows refused for want of another row are tried again in a round after one that moved something
    failed = 0  # --follow: passes in a row that failed for a lost session, a deadlock or a lock timeout
    while not stop.is_set():
        retry, moved = moved, False
        done = {s.phase: PhaseSync(s.phase) for s in syncers}  # this pass's committed batches, not yet said
        try:
            if options.follow and time.monotonic() - checked >= options.recheck_every:
                for s in syncers:  # a column moved, a table rewritten since the follower started: capture it again
                    await s.prepare()
                checked = time.monotonic()
            for s in syncers:
                if stop.is_set():
                    break
                async for batch in s.batches(upto=upto[s.phase], stop=stop, retry=retry):
                    done[s.phase] += batch
                    totals[s.phase] += batch
                totals[s.phase] = replace(totals[s.phase], deferred=len(s.deferred))
                moved = moved or done[s.phase].progress
                if options.follow and done[s.phase].progress:
                    waiting, age = await s.lag()
                    log.info("%s: %s; %s", s.phase, _applied(done.pop(s.phase)), _lag(waiting, age))
                    said = time.monotonic()
        except Exception as e:
            # a follower outlives a session of its pool that ended (a DBA, idle_session_timeout, the network), a
            # deadlock or a lock timeout: the failed batch rolled back (two databases: or its log rows came back, and
            # applying them again changes nothing), and the pool opens new sessions.  A restart or a failover ends
            # the lock's session too, which sets ``stop``: the caller raises LockLost, and the same command resumes
            if not (options.follow and _worth_another_pass(e)) or failed >= FOLLOW_RETRIES:
                raise
            for p in done.values():
                if p.progress:
                    log.info("%s: %s before the failure", p.phase, _applied(p))
            failed, moved = failed + 1, True
            pause = min(options.interval * 2 ** min(failed, 8), 30.0)
            log.warning("a batch failed (%s); its log rows stay in the log; trying again in %.1f s", e, pause)
            await _pause(stop, pause)
            continue
        failed = 0
        if not options.follow:
            if not moved:
                break
            continue
        if not moved:
            if time.monotonic() - said >= options.report_every:
                for s in syncers:
                    log.info("%s: %s", s.phase, _lag(*await s.lag()))
                said = time.monotonic()
            await _pause(stop, options.interval)
    if stop.is_set():  # stopped (a signal, the lock lost): the caller says so; its sessions may be gone
        return totals
    for s in syncers:
        waiting, age = await s.lag()
        totals[s.phase] = replace(totals[s.phase], waiting=waiting, oldest_seconds=age)
    return totals


# asyncpg's own errors that no new try changes: a query argument it cannot encode (its client-side DataError is a
# ValueError), a feature or setting it does not support, a broken protocol
_CLIENT_SIDE = (
    ValueError,
    asyncpg.ClientConfigurationError,
    asyncpg.UnsupportedClientFeatureError,
    asyncpg.UnsupportedServerFeatureError,
    asyncpg.ProtocolError,
)


def _worth_another_pass(e: BaseException) -> bool:
    """A session lost (also as a driver left mid-operation by it), a deadlock, a lock timeout: not what asyncpg
    itself refuses."""
    return (is_transient_error(e) or isinstance(e, asyncpg.InternalClientError)) and not isinstance(e, _CLIENT_SIDE)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _applied(p: PhaseSync) -> str:
    return (
        f"{p.changes:,} changes applied ({p.upserted:,} rows upserted, {p.deleted:,} deleted, {p.rejected:,} "
        f"quarantined, {p.cleared:,} rejects cleared"
        + (f", {p.skipped:,} NOT applied: not the phase's" if p.skipped else "")
        + ")"
    )


def _lag(waiting: int, age: float | None) -> str:
    return f"{waiting:,} changes waiting" + (f", the oldest {age:.1f} s old" if age is not None else "")
