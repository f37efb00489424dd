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

A batch's log rows are taken (deleted and returned, one statement) at the start of the transaction that applies
them; its target writes, its rejects and that deletion commit together, only while the run holds the lock.  The next
batch takes ids above the last one (ids are not committed in id order, so never "up to id N": a lower id that commits
later is taken by the next pass).  Across two databases the log is in the source: its rows are taken in a source
transaction that commits just after the target's; a kill in between re-applies them, which changes nothing.  The log
rows of a delete that must wait are put back as they were.  The common case, a batch whose rows all go in, is one
upsert per table, without resolving the keys first; only when a row fails are the keys resolved and written by
halves around it.  Every (sub)transaction that writes target rows records it with ``ledger.mark_write`` (a rollback
deletes exactly those rows).

A delete that a later phase's rows still reference (23503) keeps its log rows for a later pass: syncing several
phases at once goes round them until nothing moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import asyncpg

from . import capture, capture_sql, ledger
from .catalog import ForeignKey, Table, read_table
from .compile import CompiledTable
from .copier import advance_sequences
from .db import is_data_error, rowcount
from .errors import MigrationError, RefusedError
from .pipe import pipe
from .sql import qi
from .sync_sql import (
    KEEP_SQL,
    MAX_ID_SQL,
    RETRY_STATES,
    SCHEMA,
    TAKE_SQL,
    LookupUse,
    SyncTable,
    children_sql,
    delete_sql,
    key_columns_args,
    others_sql,
    resolve_all_sql,
    resolve_sql,
    source_rows_sql,
    stage_table_sql,
    stage_upsert_sql,
    target_keys_sql,
    unproduced_sql,
    upsert_sql,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SyncOptions:
    batch_size: int = 1000  # log rows per transaction
    follow: bool = False  # keep going until stopped
    interval: float = 1.0  # --follow: seconds to wait when the log is empty
    report_every: float = 10.0  # --follow: seconds between lag lines when nothing happens


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


@dataclass
class _Work:
    """What a batch re-derives in one table: by batch key, by each lookup's key, by target key."""

    keys: list[list[str]] = field(default_factory=list)
    values: list[list[list[str]]] = field(default_factory=list)
    feeds: list[list[str]] = field(default_factory=list)
    everything: bool = False  # a table its `sql:` or `where` reads changed: every row


@dataclass
class _Batch:
    work: list[_Work]
    counts: dict[str, int] = field(
        default_factory=lambda: {"upserted": 0, "deleted": 0, "rejected": 0, "cleared": 0, "skipped": 0}
    )
    deferred: set[int] = field(default_factory=set)  # log rows kept: their delete waits for referencing rows
    rejected: set[str] = field(default_factory=set)  # target tables with rows in quarantine: rejects to clear
    again: list[tuple[int, list[tuple[list[str], list[str]]]]] = field(default_factory=list)
    taken_out: set[tuple[str, tuple[str, ...]]] = field(default_factory=set)  # quarantined rows deleted from the target


# -- one phase ----------------------------------------------------------------------------------------------------
class _NotAllWritten(Exception):
    """The one-statement upsert left rows as they are: its savepoint rolls back, the batch goes row by row."""


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
        self.snapshot = snapshot  # the phase's start snapshot: which target rows were there before it
        self.tables: list[SyncTable] = []
        self.children: dict[int, list[tuple[int, ForeignKey]]] = {}  # parent index -> (child index, foreign key)
        self.deferred: set[int] = set()

    async def prepare(self) -> None:
        """Check that capture is on and matches the mapping; work out where each key is in the log rows."""
        name = self.phase
        plan = await capture.capture_plan(self.source, name, [ct for ct, _ in self.pairs])
        if not plan.ok:
            raise RefusedError(
                f"{name}: its changes cannot be captured, so there is nothing to sync",
                detail="\n".join(f"{t}: {why}" for t, why in plan.problems),
                hint="map each target key column from a unique source column (a plain rename); until then, re-run "
                "the phase with --recheck in a window, with writes stopped",
            )
        cap = await capture.state(self.source, name)
        if cap.state != "on":
            raise RefusedError(
                f"{name}: change capture is {cap.state}" + (f" ({cap.problem})" if cap.problem else ""),
                hint={
                    "off": "capture starts with the phase's run: roll the phase back and run it again",
                    "COLUMN GONE": "give the column its name back (nothing written meanwhile is lost: sync then "
                    "re-derives the table), or roll the phase back and run it again with its mapping changed",
                }.get(
                    cap.state,
                    "the triggers were dropped or disabled by hand: writes since then were not captured; roll the "
                    "phase back and run it again",
                ),
            )
        registry = await capture.registry(self.source, name)
        for c in plan.tables:
            have = registry.get(c.name, ())
            if not set(c.columns) <= set(have):
                raise RefusedError(
                    f"{name}: the mapping changed since capture started on {c.name} (it logs {', '.join(have)}, "
                    f"the mapping now needs {', '.join(c.columns)})",
                    hint=f"roll {name} back and run it again",
                )
        for ct, target in self.pairs:
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
                uses.append(
                    LookupUse(
                        str(lt.qualified),
                        tuple(lcols.index(k) for k in lk.key),
                        lk.on,
                        tuple(src.column(o).type for o in lk.on),  # type: ignore[union-attr]
                    )
                )
            self.tables.append(
                SyncTable(
                    ct,
                    target,
                    feed,
                    tuple(src.column(f).type for f in feed),  # type: ignore[union-attr]
                    tuple(cols.index(b) for b in ct.batch_by),
                    tuple(cols.index(f) for f in feed),
                    tuple(uses),
                    tuple(r for t, r in plan.reads if t == str(ct.target)),
                )
            )
        index = {t.name: i for i, t in enumerate(self.tables)}
        for j, t in enumerate(self.tables):
            for fk in t.target.foreign_keys:
                i = index.get(str(fk.ref_table))
                if i is not None and i != j:
                    self.children.setdefault(i, []).append((j, fk))

    async def max_id(self) -> int | None:
        return await self.source.fetchval(MAX_ID_SQL, self.phase)

    async def lag(self) -> tuple[int, float | None]:
        st = await capture.state(self.source, self.phase)
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

    async def run_pass(self, *, upto: int | None, stop: asyncio.Event, retry: bool = True) -> PhaseSync:
        """Retry the rows waiting for others (``retry``), then apply the log rows (up to id ``upto``), a batch at a
        time."""
        total = PhaseSync(self.phase)
        waiting = await self.waiting_rejects() if retry else {}
        if waiting:
            total += (await self.apply(waiting))[0]
        last: int | None = 0
        while not stop.is_set():
            done, last = await self.apply({}, after=last, upto=upto)
            if last is None:
                break
            total += done
        return replace(total, deferred=len(self.deferred))

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
        truncated = [r for r in rows if r["op"] == "T"]
        if truncated:
            raise MigrationError(
                f"{truncated[0]['source']} was truncated after {self.phase} copied it: any row may have changed, and "
                "capture cannot say which",
                hint=f"roll {self.phase} back and run it again",
            )
        by_source: dict[str, list[asyncpg.Record]] = {}
        unknown: set[str] = set()  # tables whose changed rows are not known: a column capture names was renamed
        for r in rows:
            if r["key"]:
                by_source.setdefault(r["source"], []).append(r)
            else:
                unknown.add(r["source"])
        if unknown:
            log.warning(
                "%s: %s changed while a column capture reads was renamed or dropped: every row that reads them is "
                "re-derived",
                self.phase,
                ", ".join(sorted(unknown)),
            )
        b = _Batch([_Work() for _ in self.tables])
        for i, st in enumerate(self.tables):
            b.work[i].keys += [[r["key"][p] for p in st.bk_positions] for r in by_source.get(st.source, [])]
            b.work[i].keys += extra.get(st.name, [])
            b.work[i].values = [
                [[r["key"][p] for p in lk.positions] for r in by_source.get(lk.table, [])] for lk in st.lookups
            ]
            b.work[i].everything = any(r in by_source for r in st.reads) or bool(
                unknown & {st.source, *st.reads, *(lk.table for lk in st.lookups)}
            )
        src = conn if self.same_db else self.source
        b.rejected = await ledger.rejected_tables(conn, self.phase)
        for i in reversed(range(len(self.tables))):  # deletes: children first
            await self._deletes(conn, src, i, by_source.get(self.tables[i].source, []), b)
        for i in range(len(self.tables)):  # upserts: parents first
            await self._rederive(conn, src, i, b)
        again, b.again = b.again, []
        for i, items in again:  # refused because of another row: the others are applied now
            b.counts["rejected"] -= len(items)
            await self._upsert(conn, i, items, b, last_try=True)
        for i in range(len(self.tables)):  # the children of rows the last tries quarantined
            await self._rederive(conn, src, i, b, last_try=True)
        if b.counts.get("upserted"):
            for _, tgt in self.pairs:  # an identity or serial written with the source's values
                await advance_sequences(conn, tgt)
        ids = [r["id"] for r in rows if r["id"] not in b.deferred]
        self.deferred = (self.deferred - {r["id"] for r in rows}) | b.deferred
        if self.same_db:
            await keep_deferred(conn, self.phase, [r for r in rows if r["id"] in b.deferred])
        await ledger.mark_synced(conn, self.phase)
        await self.lock.check(conn)  # last before COMMIT: without the lock the batch rolls back
        if rows or any(b.counts.values()):
            log.debug("%s: %d changes applied: %s", self.phase, len(ids), b.counts)
        return PhaseSync(self.phase, changes=len(ids), taken_out=tuple(sorted(b.taken_out, key=repr)), **b.counts)

    async def _rederive(self, conn: asyncpg.Connection, src: Any, i: int, b: _Batch, *, last_try: bool = False) -> None:
        """Re-derive the rows of table ``i`` the batch touched: by batch key, by lookup, by target key."""
        st, w = self.tables[i], b.work[i]
        keys, values, feeds = w.keys, w.values, w.feeds
        b.work[i] = _Work(values=[[] for _ in st.lookups])
        if not keys and not any(values) and not feeds and not w.everything:
            return
        if w.everything:
            resolved = [(list(r["bk"]), list(r["tk"])) for r in await src.fetch(resolve_all_sql(st))]
        else:
            if not any(values) and not feeds and await self._upsert_keys(conn, i, keys, b):
                return
            resolved = await self._resolve(src, st, keys, values, feeds)
        present = {tuple(bk) for bk, _ in resolved}
        gone = [list(k) for k in {tuple(k) for k in keys} - present]  # deleted, or out of the `where`
        b.counts["cleared"] += await ledger.clear_rejects_of(conn, self.phase, st.name, gone)
        await self._upsert(conn, i, resolved, b, last_try=last_try)

    async def _upsert_keys(self, conn: asyncpg.Connection, i: int, keys: list[list[str]], b: _Batch) -> bool:
        """The common case in one statement: re-derive these batch keys of table ``i`` without resolving them first.
        When it works, every key is either written or gone from the source: their rejects, if the table has any, are
        cleared.  False, with nothing written, when a row fails: the caller then resolves the keys and writes them by
        halves around the bad rows."""
        st = self.tables[i]
        args = key_columns_args(keys, len(st.ct.batch_by))
        try:
            async with conn.transaction():
                if self.same_db:
                    n = rowcount(await conn.execute(upsert_sql(st), *args))
                    present = len(await self._resolve(conn, st, keys, [], [])) if n < len(keys) else n
                else:
                    stage = f"migrate_data_sync_{i}"
                    await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{qi(stage)}")
                    await conn.execute(stage_table_sql(st, stage))
                    present = await pipe(self.source, source_rows_sql(st), args, conn, stage)
                    n = rowcount(await conn.execute(stage_upsert_sql(st, stage), list(range(1, present + 1))))
                if n < present:  # rows the upsert left as they are (someone else's): the slow path counts them
                    raise _NotAllWritten
                await ledger.mark_write(conn, self.phase, st.name, self.run_id)
        except _NotAllWritten:
            return False
        except asyncpg.PostgresError as e:
            if not is_data_error(e):
                raise
            log.debug("%s: a row of the batch fails (%s %s): row by row", st.name, e.sqlstate, e)
            return False
        b.counts["upserted"] += n
        if st.name in b.rejected:
            b.counts["cleared"] += await ledger.clear_rejects_of(conn, self.phase, st.name, keys)
        return True

    async def _note_children(self, conn: asyncpg.Connection, i: int, keys: list[Any], b: _Batch) -> None:
        """Before target rows of table ``i`` go, find the rows of the phase's other tables that reference them (a
        foreign key may cascade, or set NULL): they are re-derived after, and quarantined if they fail now."""
        for j, fk in self.children.get(i, []):
            sql = children_sql(self.tables[i], self.tables[j], fk)
            rows = await conn.fetch(sql, *key_columns_args(keys, len(self.tables[i].ct.key)))
            b.work[j].feeds += [list(r["tk"]) for r in rows]

    def _cascaded(self, i: int) -> tuple[str, ...]:
        """The phase's tables whose rows a delete in table ``i`` may change (ON DELETE CASCADE, SET NULL, SET DEFAULT):
        the savepoint that deletes marks them written too, or their rows would no longer be the phase's."""
        return tuple(dict.fromkeys(self.tables[j].name for j, fk in self.children.get(i, [])))

    async def _skipped(self, conn: asyncpg.Connection, i: int, keys: Sequence[Sequence[str]], b: _Batch) -> None:
        """Count the rows of these target keys that sync left as they are, someone else's: never silently."""
        if not keys or self.snapshot is None:
            return
        st = self.tables[i]
        n = await conn.fetchval(others_sql(st), *key_columns_args(keys, len(st.ct.key)), self.snapshot)
        if n:
            b.counts["skipped"] += n
            log.warning(
                "%s: %d changed rows not applied: someone else wrote them in the target since %s started (or a table "
                "rewrite gave every row a new transaction id); validate --deep shows them",
                st.name,
                n,
                self.phase,
            )

    async def _deletes(
        self, conn: asyncpg.Connection, src: Any, i: int, logged: list[asyncpg.Record], b: _Batch
    ) -> None:
        """Delete the target rows of logged target keys that no current source row produces."""
        st = self.tables[i]
        ids: dict[tuple[str, ...], list[int]] = {}
        for r in logged:
            # an INSERT's key was there when it committed; if the row is gone now, a later log row says so
            if r["op"] != "I":
                ids.setdefault(tuple(r["key"][p] for p in st.feed_positions), []).append(r["id"])
        if b.work[i].everything:  # a table the `where` reads changed: any row may have left it
            for r in await conn.fetch(target_keys_sql(st)):
                ids.setdefault(tuple(r["k"]), [])
        if not ids:
            return
        keys = list(ids)
        gone = [tuple(r["k"]) for r in await src.fetch(unproduced_sql(st), *key_columns_args(keys, len(st.feed)))]
        if not gone:
            return
        await self._note_children(conn, i, gone, b)
        sql = delete_sql(st)

        async def attempt(part: list[tuple[str, ...]]) -> int:
            return rowcount(await conn.execute(sql, *key_columns_args(part, len(st.ct.key))))

        async def failed(key: tuple[str, ...], e: asyncpg.PostgresError) -> None:
            b.deferred.update(ids[key])
            log.warning(
                "%s: the row with key (%s)=(%s) is gone from the source but still referenced in the target (%s); its "
                "delete waits: sync the phase whose rows reference it",
                st.name,
                ", ".join(st.ct.key),
                ", ".join(str(v) for v in key),
                e,
            )

        done, _ = await self._bisect(conn, st, gone, attempt, failed, also=self._cascaded(i))
        b.counts["deleted"] += done
        await self._skipped(conn, i, [k for k in gone if not set(ids.get(k, ())) & b.deferred], b)

    async def _resolve(
        self,
        src: Any,
        st: SyncTable,
        keys: list[list[str]],
        values: list[list[list[str]]],
        feeds: list[list[str]],
    ) -> list[tuple[list[str], list[str]]]:
        """The current source rows to re-derive: (batch key, target key)."""
        used = [i for i, v in enumerate(values) if v]
        args: list[Any] = key_columns_args(keys, len(st.ct.batch_by))
        for i in used:
            args += key_columns_args(values[i], len(st.lookups[i].on))
        if feeds:
            args += key_columns_args(feeds, len(st.feed))
        sql = resolve_sql(st, used, by_feed=bool(feeds))
        return [(list(r["bk"]), list(r["tk"])) for r in await src.fetch(sql, *args)]

    async def _upsert(
        self,
        conn: asyncpg.Connection,
        i: int,
        resolved: list[tuple[list[str], list[str]]],
        b: _Batch,
        *,
        last_try: bool = False,
    ) -> None:
        """Upsert the resolved rows, bisecting around bad ones.  A row refused because of another row goes to
        ``b.again`` for one more try after the batch, unless this is the ``last_try``."""
        if not resolved:
            return
        st = self.tables[i]
        again: list[tuple[list[str], list[str]]] = []
        by_n: dict[int, tuple[list[str], list[str]]] = {}
        if self.same_db:
            sql = upsert_sql(st)

            async def attempt(part: list[Any]) -> int:
                return rowcount(await conn.execute(sql, *key_columns_args([bk for bk, _ in part], len(st.ct.batch_by))))

            items: list[Any] = resolved
        else:
            stage = f"migrate_data_sync_{i}"
            await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{qi(stage)}")
            await conn.execute(stage_table_sql(st, stage))
            args = key_columns_args([bk for bk, _ in resolved], len(st.ct.batch_by))
            await pipe(self.source, source_rows_sql(st), args, conn, stage)
            staged = await conn.fetch(f"SELECT __n, __key, __tk FROM {qi(stage)}")
            by_n = {r["__n"]: (list(r["__key"]), list(r["__tk"])) for r in staged}
            sql = stage_upsert_sql(st, stage)

            async def attempt(part: list[Any]) -> int:
                return rowcount(await conn.execute(sql, part))

            items = sorted(by_n)

        def row_of(item: Any) -> tuple[list[str], list[str]]:
            return item if self.same_db else by_n[item]  # type: ignore[no-any-return]

        async def failed(item: Any, e: asyncpg.PostgresError) -> None:
            bk, tk = row_of(item)
            if e.sqlstate in RETRY_STATES and not last_try:
                again.append((bk, tk))
            where = conn if self.same_db else self.source
            row = await where.fetchval(st.ct.source_row_sql(), *bk)
            await ledger.quarantine(
                conn, phase=self.phase, target=st.name, source=st.source, key=bk, error=e, row=row, run_id=self.run_id
            )
            b.rejected.add(st.name)
            b.counts["rejected"] += 1
            await self._note_children(conn, i, [tk], b)
            try:  # a quarantined row is not in the target (as after the copy)
                async with conn.transaction():
                    n = rowcount(await conn.execute(delete_sql(st), *key_columns_args([tk], len(st.ct.key))))
                    for name in (st.name, *self._cascaded(i)):
                        await ledger.mark_write(conn, self.phase, name, self.run_id)
                b.counts["deleted"] += n
                if n:
                    b.taken_out.add((st.name, tuple(bk)))
            except asyncpg.ForeignKeyViolationError as fk:
                log.warning("%s: row %s is quarantined, but its old version stays in the target: %s", st.name, bk, fk)
            log.info("%s: row %s quarantined: %s %s", st.name, bk, e.sqlstate, e)

        done, ok = await self._bisect(conn, st, items, attempt, failed)
        b.counts["upserted"] += done
        b.taken_out -= {(st.name, tuple(row_of(x)[0])) for x in ok}  # a last try put it back
        await self._skipped(conn, i, [row_of(x)[1] for x in ok], b)
        b.counts["cleared"] += await ledger.clear_rejects_of(conn, self.phase, st.name, [row_of(x)[0] for x in ok])
        if again:
            b.again.append((i, again))

    async def _bisect(
        self,
        conn: asyncpg.Connection,
        st: SyncTable,
        items: list[T],
        attempt: Callable[[list[T]], Awaitable[int]],
        failed: Callable[[T, asyncpg.PostgresError], Awaitable[None]],
        *,
        also: Sequence[str] = (),
    ) -> tuple[int, list[T]]:
        """Write ``items`` by halves, each in a savepoint that records the write (in ``st`` and the ``also`` tables,
        which a foreign key's ON DELETE changes); a single item that fails for a data reason goes to ``failed``.
        Returns the rows written and the items that went in."""
        done, ok = 0, []
        stack = [items]
        while stack:
            part = stack.pop()
            try:
                async with conn.transaction():
                    done += await attempt(part)
                    for name in (st.name, *also):
                        await ledger.mark_write(conn, self.phase, name, self.run_id)
            except asyncpg.PostgresError as e:
                if not is_data_error(e):
                    raise
                if len(part) > 1:
                    mid = len(part) // 2
                    stack += [part[mid:], part[:mid]]
                    continue
                await failed(part[0], e)
            else:
                ok += part
        return done, ok


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
    said = time.monotonic()
    moved = True  # rows refused for want of another row are tried again in a round after one that moved something
    while not stop.is_set():
        retry, moved = moved, False
        for s in syncers:
            if stop.is_set():
                break
            done = await s.run_pass(upto=upto[s.phase], stop=stop, retry=retry)
            totals[s.phase] += done
            totals[s.phase] = replace(totals[s.phase], deferred=done.deferred)
            moved = moved or done.progress
            if options.follow and done.progress:
                waiting, age = await s.lag()
                log.info("%s: %s; %s", s.phase, _applied(done), _lag(waiting, age))
                said = time.monotonic()
        if not options.follow:
            if not moved:
                break
            continue
        if not moved:
            if time.monotonic() - said >= options.report_every:
                for s in syncers:
                    log.info("%s: %s", s.phase, _lag(*await s.lag()))
                said = time.monotonic()
            try:
                await asyncio.wait_for(stop.wait(), options.interval)
            except asyncio.TimeoutError:
                pass
    for s in syncers:
        waiting, age = await s.lag()
        totals[s.phase] = replace(totals[s.phase], waiting=waiting, oldest_seconds=age)
    return totals


def _applied(p: PhaseSync) -> str:
    return (
        f"{p.changes:,} changes applied ({p.upserted:,} rows upserted, {p.deleted:,} deleted, {p.rejected:,} "
        f"quarantined, {p.cleared:,} rejects cleared"
        + (f", {p.skipped:,} NOT applied: not the phase's" if p.skipped else "")
        + ")"
    )


def _lag(waiting: int, age: float | None) -> str:
    return f"{waiting:,} changes waiting" + (f", the oldest {age:.1f} s old" if age is not None else "")
