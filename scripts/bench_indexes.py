#!/usr/bin/env python3
"""Should secondary indexes be built after the bulk load?  Copy mensajes (2M rows at scale 1.0) twice.

  1. with the plan's secondary indexes in place (had phase1 created them), and
  2. without them, then building them after the copy (what revision phase4 does),
and report both, so the decision "indexes in phase1, or in a revision after the data phases" rests on a number.
Uses the bench_source database left by scripts/bench_copy.py (run that first, same --server).

    python scripts/bench_indexes.py --server postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_copy import db, parser, write_section  # noqa: E402

INDEXES = {
    "idx_mensajes_conversacion": "CREATE INDEX idx_mensajes_conversacion ON mensajes (conversacion_id, creado_at)",
    "idx_mensajes_telefono": "CREATE INDEX idx_mensajes_telefono ON mensajes (telefono)",
}
COPY = """INSERT INTO mensajes (id, conversacion_id, telefono, contenido, creado_at)
          SELECT m.id, m.conversation_id, u.phone_number, m.content, m."timestamp"
          FROM messages m LEFT JOIN users u ON u.id = m.user_id ON CONFLICT (id) DO NOTHING"""


async def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    conn = await asyncpg.connect(db(args.server, "bench_source"))
    try:
        n = await conn.fetchval("SELECT count(*) FROM messages")
        await conn.execute("TRUNCATE mensajes")
        for name, ddl in INDEXES.items():
            await conn.execute(f"DROP INDEX IF EXISTS {name}")
            await conn.execute(ddl)
        t = time.perf_counter()
        await conn.execute(COPY)
        with_indexes = time.perf_counter() - t
        await conn.execute("TRUNCATE mensajes")
        for name in INDEXES:
            await conn.execute(f"DROP INDEX {name}")
        t = time.perf_counter()
        await conn.execute(COPY)
        load = time.perf_counter() - t
        t = time.perf_counter()
        for ddl in INDEXES.values():
            await conn.execute(ddl)
        build = time.perf_counter() - t
    finally:
        await conn.close()
    line = (
        f"mensajes, {n:,} rows: with the secondary indexes in place {with_indexes:.1f} s; without them "
        f"{load:.1f} s + building them {build:.1f} s = {load + build:.1f} s ({(load + build) / with_indexes:.2f}×)"
    )
    print(line)
    section = (
        f"### secondary indexes: before or after the bulk load — {time.strftime('%Y-%m-%d')}\n\n"
        f"`python scripts/bench_indexes.py` (after `bench_copy.py --scale 1.0`): {line}. "
        "Hence revision phase4 builds them after the data phases.\n"
    )
    write_section(args.output, section)


if __name__ == "__main__":
    asyncio.run(main())
