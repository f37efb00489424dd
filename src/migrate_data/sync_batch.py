"""One batch of a phase's sync, applied in the caller's transaction (see sync.py for the whole): the deletes of the
logged target keys no source row produces (children first), then the re-derivation of the logged keys (parents first),
one upsert per table when every row goes in, by halves around the rows that fail otherwise; a row refused because of
another one gets a last try after the others.  Every (sub)transaction that writes target rows records it with
``ledger.mark_write``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from . import ledger
from .catalog import ForeignKey
from .copier import advance_sequences
from .db import is_data_error, rowcount
from .errors import MigrationError
from .pipe import pipe
from .sql import qi
from .sync_sql import (
    RETRY_STATES,
    SyncTable,
    children_sql,
    counted_upsert_sql,
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
    unwritten_sql,
    upsert_sql,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Work:
    """What a batch re-derives in one table: by batch key, by each lookup's key, by target key."""

    keys: list[list[str]] = field(default_factory=list)
    values: list[list[list[str]]] = field(default_factory=list)
    feeds: list[list[str]] = field(default_factory=list)
    everything: bool = False  # a table its `sql:` or `where` reads changed: every row


@dataclass
class Batch:
    work: list[_Work]
    counts: dict[str, int] = field(
        default_factory=lambda: {"upserted": 0, "deleted": 0, "rejected": 0, "cleared": 0, "skipped": 0}
    )
    deferred: set[int] = field(default_factory=set)  # log rows kept: their delete waits for referencing rows
    rejected: set[str] = field(default_factory=set)  # target tables with rows in quarantine: rejects to clear
    again: list[tuple[int, list[tuple[list[str], list[str]]]]] = field(default_factory=list)
    taken_out: set[tuple[str, tuple[str, ...]]] = field(default_factory=set)  # quarantined rows deleted from the target


class _NotAllWritten(Exception):
    """The one-statement upsert left rows as they are: its savepoint rolls back, the batch goes row by row."""


@dataclass
class BatchApplier:
    """What a phase's batches are applied to: its tables (parents first), how they reference each other, where the
    source rows are read."""

    phase: str
    tables: list[SyncTable]
    children: dict[int, list[tuple[int, ForeignKey]]]  # parent index -> (child index, foreign key)
    source: asyncpg.Pool
    same_db: bool
    run_id: int | None = None
    snapshot: str | None = None  # the phase's start snapshot: which target rows were there before it

    async def apply(
        self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record], extra: dict[str, list[list[str]]]
    ) -> Batch:
        """Apply the log ``rows`` and re-derive the ``extra`` batch keys per target table, on ``conn``."""
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
                "%s: %s changed while a column capture reads was renamed, dropped or of another type: every row that "
                "reads them is re-derived",
                self.phase,
                ", ".join(sorted(unknown)),
            )
        b = Batch([_Work() for _ in self.tables])
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
            for st in self.tables:  # an identity or serial written with the source's values
                await advance_sequences(conn, st.target)
        return b

    async def _rederive(self, conn: asyncpg.Connection, src: Any, i: int, b: Batch, *, last_try: bool = False) -> None:
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

    async def _upsert_keys(self, conn: asyncpg.Connection, i: int, keys: list[list[str]], b: Batch) -> bool:
        """The common case in one statement: re-derive these batch keys of table ``i`` without resolving them first.
        When it works, every key is either written or gone from the source: their rejects, if the table has any, are
        cleared.  False, with nothing written, when a row fails: the caller then resolves the keys and writes them by
        halves around the bad rows."""
        st = self.tables[i]
        args = key_columns_args(keys, len(st.ct.batch_by))
        try:
            async with conn.transaction():
                stage = None
                if not self.same_db:
                    stage = f"migrate_data_sync_{i}"
                    await conn.execute(f"DROP TABLE IF EXISTS pg_temp.{qi(stage)}")
                    await conn.execute(stage_table_sql(st, stage))
                    await pipe(self.source, source_rows_sql(st), args, conn, stage)
                on = args if self.same_db else []
                derived, n = await conn.fetchrow(counted_upsert_sql(st, stage), *on)
                # rows the upsert left as they were: already as derived, or someone else's (the slow path counts them)
                if n < derived and await conn.fetchval(unwritten_sql(st, stage), *on):
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

    async def _note_children(self, conn: asyncpg.Connection, i: int, keys: list[Any], b: Batch) -> None:
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

    async def _left_otherwise(
        self,
        conn: asyncpg.Connection,
        i: int,
        stage: str | None,
        rows: list[tuple[list[str], list[str]]],
        numbers: list[Any],
        b: Batch,
    ) -> None:
        """Count the ``rows`` (batch key, target key) the upserts went through and left otherwise than derived:
        someone else's (``numbers``: theirs in ``stage``).  When the source, read again, fails the cast now (a row
        changed since), every one of them that someone else wrote is counted, as derived or not: never fewer."""
        if not rows or self.snapshot is None:
            return
        st = self.tables[i]
        args = key_columns_args([bk for bk, _ in rows], len(st.ct.batch_by)) if stage is None else [numbers]
        try:
            async with conn.transaction():
                n = await conn.fetchval(unwritten_sql(st, stage, others=True), *args, self.snapshot)
        except asyncpg.PostgresError as e:
            if not is_data_error(e):
                raise
            await self._skipped(conn, i, [tk for _, tk in rows], b)
            return
        self._report_skipped(st, n, b)

    async def _skipped(self, conn: asyncpg.Connection, i: int, keys: Sequence[Sequence[str]], b: Batch) -> None:
        """Count the rows of these target keys that sync left as they are, someone else's: never silently."""
        if not keys or self.snapshot is None:
            return
        st = self.tables[i]
        self._report_skipped(
            st, await conn.fetchval(others_sql(st), *key_columns_args(keys, len(st.ct.key)), self.snapshot), b
        )

    def _report_skipped(self, st: SyncTable, n: int, b: Batch) -> None:
        """Count, and say, the ``n`` changed rows of ``st`` that sync left as they are, someone else's."""
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
        self, conn: asyncpg.Connection, src: Any, i: int, logged: list[asyncpg.Record], b: Batch
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
        b: Batch,
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
        stage = None
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
            await self._quarantine(conn, i, bk, tk, e, b)

        done, ok = await self._bisect(conn, st, items, attempt, failed)
        b.counts["upserted"] += done
        b.taken_out -= {(st.name, tuple(row_of(x)[0])) for x in ok}  # a last try put it back
        await self._left_otherwise(conn, i, stage, [row_of(x) for x in ok], ok, b)
        b.counts["cleared"] += await ledger.clear_rejects_of(conn, self.phase, st.name, [row_of(x)[0] for x in ok])
        if again:
            b.again.append((i, again))

    async def _quarantine(
        self, conn: asyncpg.Connection, i: int, bk: list[str], tk: list[str], e: asyncpg.PostgresError, b: Batch
    ) -> None:
        """Put the source row of batch key ``bk`` in quarantine and take its old version (target key ``tk``) out of
        the target, as after the copy."""
        st = self.tables[i]
        where = conn if self.same_db else self.source
        row = await where.fetchval(st.ct.source_row_sql(), *bk)
        await ledger.quarantine(
            conn, phase=self.phase, target=st.name, source=st.source, key=bk, error=e, row=row, run_id=self.run_id
        )
        b.rejected.add(st.name)
        b.counts["rejected"] += 1
        await self._note_children(conn, i, [tk], b)
        try:
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
