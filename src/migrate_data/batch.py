"""How one batch's rows are written, inside the batch's transaction: in one database a single
``INSERT … SELECT … ON CONFLICT``; across two, a text COPY straight into the target, or a binary COPY into a staging
table and the same ``INSERT … ON CONFLICT`` from it.  A batch that fails for a data reason is bisected in savepoints
until each bad row is alone: it goes to ``migrate_data.rejects`` and the rest is written.  Every savepoint that writes
target rows records, in itself, that this phase wrote them (``ledger.mark_write``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg

from . import duplicates, ledger
from .compile import CompiledTable
from .db import is_data_error, rowcount
from .pipe import pipe
from .sql import qi

log = logging.getLogger(__name__)


class BatchWriter:
    """Writes the batches of one phase's run (``phase`` and ``run_id`` go on every write mark and reject)."""

    def __init__(self, phase: str, run_id: int | None, source_pool: asyncpg.Pool) -> None:
        self.phase, self.run_id, self.source_pool = phase, run_id, source_pool

    async def same_db(
        self,
        conn: asyncpg.Connection,
        ct: CompiledTable,
        last: list[str] | None,
        new_last: list[str],
        rng: list[str],
    ) -> tuple[int, int]:
        lower = last is not None

        async def duplicates_of(done: int, read: int | None = None) -> int:
            """Rows of the range that another source row's target key pushed out (see duplicates.py)."""
            return await duplicates.quarantine(
                conn, conn, ct, phase=self.phase, run_id=self.run_id, lower=lower, rng=rng, done=done, read=read
            )

        try:
            async with self._writing(conn, ct):
                written = await _write(conn, ct, ct.insert_sql(lower=lower, upper=True), *rng)
        except asyncpg.PostgresError as e:
            if not is_data_error(e):
                raise
        else:
            return written, await duplicates_of(written)
        keys = [r["k"] for r in await conn.fetch(ct.keys_sql(lower=lower, upper=True), *rng)]
        sql = ct.insert_sql(lower=True, upper=True)
        sql_first = ct.insert_sql(lower=lower, upper=True)

        async def insert(i: int, j: int) -> int:
            if i == 0:
                return await _write(conn, ct, sql_first, *(last or []), *keys[j - 1])
            return await _write(conn, ct, sql, *keys[i - 1], *keys[j - 1])

        async def source_row(i: int) -> str | None:
            return await conn.fetchval(ct.source_row_sql(), *keys[i])

        written, rejected = await self._bisect(conn, ct, len(keys), insert, lambda i: keys[i], source_row)
        return written, rejected + await duplicates_of(written + rejected, len(keys))

    async def direct(
        self, conn: asyncpg.Connection, ct: CompiledTable, lower: bool, rng: list[str]
    ) -> int | bool | None:
        """The fast path across databases: text COPY from the source straight into the target, in a savepoint.

        A range past the checkpoint holds none of our rows (each batch commits with its checkpoint), so usually
        there is nothing to conflict with and ON CONFLICT is not needed.  When there is (a row the application
        wrote, a key two source rows share) or a row is bad, COPY fails, the savepoint rolls back and the batch
        takes the staged path, which has ON CONFLICT and the bisection: None, or False after a conflict (the table
        then stays on the staged path).
        Only for tables whose every column's value is cast to the target column's own type, where the type's text
        input and the cast agree (a longer varchar fails here and is truncated by the staged path's cast).
        """
        try:
            async with self._writing(conn, ct):
                return await pipe(
                    self.source_pool,
                    ct.source_values_sql(lower=lower, upper=True),
                    rng,
                    conn,
                    ct.target.name,
                    columns=[c.target for c in ct.columns],
                    schema=ct.target.schema,
                    binary=False,
                )
        except asyncpg.PostgresError as e:
            if not is_data_error(e):
                raise
            log.debug("%s: direct COPY fell back to the staged path: %s", ct.target, e)
            return False if isinstance(e, asyncpg.UniqueViolationError) else None

    async def staged(self, conn: asyncpg.Connection, ct: CompiledTable, lower: bool, rng: list[str]) -> tuple[int, int]:
        """Pipe the range from the source (binary COPY out) into a staging table (binary COPY in), then insert."""
        stage = f"migrate_data_stage_{abs(hash(str(ct.target))) % 10**8}"
        await conn.execute(ct.stage_table_sql(stage))
        query = ct.source_text_sql(lower=lower, upper=True)
        read = await pipe(self.source_pool, query, rng, conn, stage, columns=ct.stage_columns())

        async def duplicates_of(done: int) -> int:
            """Rows of the range that another source row's target key pushed out (see duplicates.py)."""
            source = self.source_pool
            return await duplicates.quarantine(
                conn, source, ct, phase=self.phase, run_id=self.run_id, lower=lower, rng=rng, done=done, read=read
            )

        try:
            async with self._writing(conn, ct):
                written = await _write(conn, ct, ct.stage_insert_sql(stage, sub=False))
        except asyncpg.PostgresError as e:
            if not is_data_error(e):
                raise
        else:
            return written, await duplicates_of(written)
        count = await conn.fetchval(f"SELECT count(*) FROM {qi(stage)}")
        sub = ct.stage_insert_sql(stage, sub=True)
        keys = {r["__n"]: list(r["__key"]) for r in await conn.fetch(f"SELECT __n, __key FROM {qi(stage)}")}

        async def insert(i: int, j: int) -> int:
            return await _write(conn, ct, sub, i, j)

        async def source_row(i: int) -> str | None:
            return await self.source_pool.fetchval(ct.source_row_sql(), *keys[i + 1])

        written, rejected = await self._bisect(conn, ct, count, insert, lambda i: keys[i + 1], source_row)
        return written, rejected + await duplicates_of(written + rejected)

    async def _bisect(
        self, conn: asyncpg.Connection, ct: CompiledTable, count: int, insert: Callable, key_of: Callable,
        source_row: Callable,
    ) -> tuple[int, int]:  # fmt: skip
        """Insert rows [0, count) by halves, each in a savepoint; single failing rows become rejects."""
        written = rejected = 0
        stack = [(0, count)]
        while stack:
            i, j = stack.pop()
            try:
                async with self._writing(conn, ct):
                    written += await insert(i, j)
            except asyncpg.PostgresError as e:
                if not is_data_error(e):
                    raise
                if j - i > 1:
                    mid = (i + j) // 2
                    stack += [(mid, j), (i, mid)]
                    continue
                rejected += 1
                await ledger.quarantine(
                    conn,
                    phase=self.phase,
                    target=str(ct.target),
                    source=str(ct.source),
                    key=key_of(i),
                    error=e,
                    row=await source_row(i),
                    run_id=self.run_id,
                )
                log.debug("%s: row %s rejected: %s %s", ct.target, key_of(i), e.sqlstate, e)
        return written, rejected

    @asynccontextmanager
    async def _writing(self, conn: asyncpg.Connection, ct: CompiledTable) -> AsyncIterator[None]:
        """A savepoint that writes target rows, and records in it that this phase wrote them (see ledger.writes)."""
        async with conn.transaction():
            yield
            await ledger.mark_write(conn, self.phase, str(ct.target), self.run_id)


async def _write(conn: asyncpg.Connection, ct: CompiledTable, sql: str, *args: object) -> int:
    """Run one of ``ct``'s inserts; return the rows it wrote (a query's count when it checks foreign keys)."""
    if ct.insert_counts:
        return int(await conn.fetchval(sql, *args))
    return rowcount(await conn.execute(sql, *args))
