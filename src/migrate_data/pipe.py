"""A COPY pipe between two databases: ``COPY (query) TO STDOUT`` on the source streamed into ``COPY table FROM
STDIN`` on a target connection, chunk by chunk through a small queue; nothing is decoded in Python."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from .db import rowcount


async def pipe(
    source: asyncpg.Pool,
    query: str,
    args: list[Any],
    conn: asyncpg.Connection,
    table: str,
    *,
    columns: list[str] | None = None,
    schema: str | None = None,
    binary: bool = True,
) -> int:
    """Stream the rows of ``query`` on ``source`` into ``table`` on ``conn``; return the rows copied.  When either
    side fails, the other is stopped and the error is raised (the target's transaction decides what is kept)."""
    fmt = "binary" if binary else "text"
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=32)

    async def produce() -> None:
        try:
            async with source.acquire() as src:
                await src.copy_from_query(query, *args, output=queue.put, format=fmt)
        finally:
            await queue.put(None)  # the reader stops, on an error too (raised from this task below)

    async def chunks():  # type: ignore[no-untyped-def]
        while (chunk := await queue.get()) is not None:
            yield chunk

    producer = asyncio.create_task(produce())
    consumer = asyncio.create_task(
        conn.copy_to_table(table, source=chunks(), columns=columns, schema_name=schema, format=fmt)
    )
    await asyncio.wait({producer, consumer}, return_when=asyncio.FIRST_EXCEPTION)
    for task in (producer, consumer):
        if task.done() and task.exception() is not None:
            for other in (producer, consumer):
                other.cancel()
            await asyncio.gather(producer, consumer, return_exceptions=True)
            raise task.exception()  # type: ignore[misc]
    await producer
    return rowcount(await consumer)
