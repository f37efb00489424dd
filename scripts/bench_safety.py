#!/usr/bin/env python3
"""Measure what the safety mechanisms cost, against the same copy without them, in the same run.

For each benchmarked table (customers -> clientes; messages -> mensajes with its lookup in users):
  - the copy with the write marks a rollback relies on (one row of migrate_data.writes per batch transaction),
    against the same copy with the marks switched off, alternating three times, median;
  - the validation after a run: checksums (the default) against counts only;
  - the rollback (delete by xmin against the marks) against the copy that wrote the rows.

    python scripts/bench_safety.py --scale 1.0
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_copy import CLEAN, TABLES, bench_project, db, parser, sql, write_section  # noqa: E402
from migrate_data import api, ledger  # noqa: E402
from migrate_data.settings import Settings  # noqa: E402
from seed_legacy import seed  # noqa: E402

RESET = [
    "DELETE FROM migrate_data.{t} WHERE phase LIKE 'bench_%'".format(t=t)
    for t in ("checkpoints", "rejects", "writes", "finished", "phases")
]


async def copy_once(settings: Settings, phase: str, target: str, *, marks: bool) -> float:
    await sql(settings.database_url, f"TRUNCATE {target} CASCADE", *RESET)
    original = ledger.mark_write
    if not marks:

        async def no_mark(*args: object) -> None:
            return None

        ledger.mark_write = no_mark  # type: ignore[assignment]
    try:
        result = await api.run_phase(settings, phase, api.RunOptions(backup=False, deep=False))
    finally:
        ledger.mark_write = original  # type: ignore[assignment]
    return result.tables[0].seconds


async def main() -> None:
    p = parser(__doc__)
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    admin, url = db(args.server, "postgres"), db(args.server, "bench_safety")
    await sql(admin, "DROP DATABASE IF EXISTS bench_safety WITH (FORCE)", "CREATE DATABASE bench_safety")
    import asyncpg

    conn = await asyncpg.connect(url)
    await seed(conn, args.scale)
    await conn.close()
    await sql(url, *CLEAN, "VACUUM ANALYZE")
    project = bench_project(Path(tempfile.mkdtemp()))
    settings = Settings(database_url=url, project_dir=project, output_dir=Path(tempfile.mkdtemp()))
    await api.run_phase(settings, "phase1", api.RunOptions(backup=False))
    rows = []
    for target in TABLES:
        phase = f"bench_{target}"
        with_marks, without = [], []
        for _ in range(args.repeat):
            without.append(await copy_once(settings, phase, target, marks=False))
            with_marks.append(await copy_once(settings, phase, target, marks=True))
        n = (await sql(url, f"SELECT count(*) FROM {target}"))[0][0][0]
        marks = (await sql(url, f"SELECT count(*) FROM migrate_data.writes WHERE phase = '{phase}'"))[0][0][0]
        t = time.perf_counter()
        await api.validate(settings, phase, deep=False)
        counts = time.perf_counter() - t
        t = time.perf_counter()
        await api.validate(settings, phase, deep=True)
        deep = time.perf_counter() - t
        t = time.perf_counter()
        await api.rollback(settings, phase)
        rollback = time.perf_counter() - t
        rows.append(
            dict(
                target=target,
                rows=n,
                marks=marks,
                without=statistics.median(without),
                with_=statistics.median(with_marks),
                counts=counts,
                deep=deep,
                rollback=rollback,
            )
        )
        print(rows[-1], flush=True)
    lines = [
        f"### safety costs, scale {args.scale} — {time.strftime('%Y-%m-%d')}",
        "",
        f"`python scripts/bench_safety.py --scale {args.scale}` (one database; copy times are the copier's own, "
        f"median of {args.repeat} alternating runs; validation and rollback timed in-process)",
        "",
        "| table | rows | write marks | copy without marks | copy with marks | cost of the marks | "
        "validation, counts | validation, checksums (default) | rollback | rollback / copy |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['rows']:,} | {r['marks']:,} | {r['without']:.2f} s | {r['with_']:.2f} s | "
            f"{100 * (r['with_'] / r['without'] - 1):+.1f} % | {r['counts']:.2f} s | {r['deep']:.2f} s | "
            f"{r['rollback']:.2f} s | {r['rollback'] / r['with_']:.2f} |"
        )
    write_section(args.output, "\n".join(lines) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
