#!/usr/bin/env python3
"""How good is the rehearsal's prediction?  Rehearse on a small staging, then run production for real.

Seeds "production" at --scale (default 1.0) and "staging" at --staging-scale (default 0.1), rehearses
phase2a, phase2b and phase3 on staging (as is: --use-existing), then runs phase1..phase3 on production and
compares each phase's predicted duration with its actual one.  Results are added to BENCHMARKS.md.

    python scripts/bench_rehearse.py --server postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

import asyncpg  # noqa: E402

from bench_copy import db, parser, sql, write_section  # noqa: E402
from migrate_data import api  # noqa: E402
from migrate_data.rehearse import rehearse  # noqa: E402
from migrate_data.settings import Settings  # noqa: E402
from seed_legacy import seed  # noqa: E402

PHASES = ["phase2a", "phase2b", "phase3"]


async def main() -> None:
    p = parser(__doc__)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--staging-scale", type=float, default=0.1)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    admin = db(args.server, "postgres")
    prod, stag = db(args.server, "bench_production"), db(args.server, "bench_staging")
    for name, scale in (("bench_production", args.scale), ("bench_staging", args.staging_scale)):
        await sql(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}")
        conn = await asyncpg.connect(db(args.server, name))
        await seed(conn, scale)
        await conn.close()
    out = Path(tempfile.mkdtemp())
    settings = Settings(database_url=prod, project_dir=ROOT, output_dir=out)
    t = time.perf_counter()
    rehearsal = await rehearse(
        settings, PHASES, staging_url=stag, use_existing=True, window="02:00-06:00", jobs=args.jobs
    )
    rehearsal_s = time.perf_counter() - t
    predicted = {p.phase: p for p in rehearsal.predictions}
    await api.run_phase(settings, "phase1", api.RunOptions(backup=False, jobs=args.jobs))
    rows = []
    per_table = {t.target: t for t in rehearsal.tables}
    for phase in PHASES:
        result = await api.run_phase(settings, phase, api.RunOptions(backup=False, jobs=args.jobs))
        for t in result.tables:
            pt = per_table[t.target]
            print(
                f"  {t.target}: predicted {pt.predicted_seconds:.2f} s (staging {pt.staging_seconds:.2f} s, "
                f"{pt.staging_rows:,} rows), actual {t.seconds:.2f} s ({t.rows_read:,} rows)",
                flush=True,
            )
        pr = predicted[phase]
        rows.append(
            (phase, sum(t.rows_read for t in result.tables), pr.predicted_seconds, pr.low, pr.high, result.seconds)
        )
        print(rows[-1], flush=True)
    status = {s.phase: s for s in await api.status(settings)}
    lines = [
        f"### rehearsal at scale {args.staging_scale} predicting scale {args.scale} — {time.strftime('%Y-%m-%d')}",
        "",
        f"`python scripts/bench_rehearse.py --scale {args.scale} --staging-scale {args.staging_scale} "
        f"--jobs {args.jobs}` (the rehearsal itself took {rehearsal_s:.1f} s)",
        "",
        "| phase | production rows | predicted | range ±30% | actual | error | `status`: predicted / actual |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for phase, n, pred, low, high, actual in rows:
        st = status[phase]
        lines.append(
            f"| {phase} | {n:,} | {pred:.1f} s | {low:.1f} – {high:.1f} s | {actual:.1f} s | "
            f"{100 * (pred - actual) / actual:+.0f}% | {st.predicted_seconds or 0:.0f} s / "
            f"{st.actual_seconds or 0:.0f} s |"
        )
    section = "\n".join(lines) + "\n"
    write_section(args.output, section)


if __name__ == "__main__":
    asyncio.run(main())
