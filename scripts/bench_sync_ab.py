#!/usr/bin/env python3
"""Compare live sync's cost per change between two versions of the code, in interleaved runs on one database.

The sample data is seeded at ``--scale``, phase1 and phase2a are run (with this checkout's code); then, ``--rounds``
times, for the code in ``--before`` (a ``src`` directory, e.g. from ``git archive <commit> src | tar -x -C DIR``) and
for this checkout's in turn: the changes of ``bench_sync.py``'s throughput round are made, and ``api.sync`` of
phase2a runs in a fresh process importing that code.  Each run prints its changes/s, the server CPU of its server
processes (``BackendCPU``) and its own client CPU, per change.  ``--changes unchanged`` makes, instead, UPDATEs of
the same 10 % of customers that change no value the mapping copies (``SET city = city``, as an ORM that saves a whole
object does): re-derived rows already as derived.  Nothing is written to BENCHMARKS.md.

    python scripts/bench_sync_ab.py --server postgresql://postgres@127.0.0.1:5432/postgres --scale 0.2 \\
        --before /tmp/before/src --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "md_bench_sync_ab"


async def prepare(server: str, scale: float, work: Path) -> str:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "scripts")]
    import asyncpg

    from bench_copy import CLEAN, bench_project, db, sql
    from migrate_data import api
    from migrate_data.settings import Settings
    from seed_legacy import seed

    await sql(db(server, "postgres"), f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)', f'CREATE DATABASE "{NAME}"')
    url = db(server, NAME)
    conn = await asyncpg.connect(url)
    await seed(conn, scale)
    await conn.close()
    await sql(url, *CLEAN, "CREATE SEQUENCE bench_phone", "VACUUM ANALYZE")
    project = bench_project(work / "project")
    shutil.copy(ROOT / "mappings" / "phase2a.yaml", project / "mappings" / "phase2a.yaml")
    settings = Settings(database_url=url, project_dir=project, output_dir=work)
    for phase in ("phase1", "phase2a"):
        await api.run_phase(settings, phase, api.RunOptions(backup=False, deep=False))
    return url


async def one(url: str, scale: float, work: Path, kind: str) -> dict[str, float]:
    """One round with whatever ``migrate_data`` is first on sys.path (the caller puts it there)."""
    from bench_sync import changes

    from bench_copy import BackendCPU, sql
    from migrate_data import api
    from migrate_data.settings import Settings
    from seed_legacy import counts

    statements, *_ = changes(counts(scale)["customers"])
    if kind == "unchanged":  # the same UPDATEs, of a value to itself
        statements = [re.sub(r"SET .* WHERE", "SET city = city WHERE", q) for q in statements if q.startswith("UPDATE")]
    await sql(url, *statements)
    settings = Settings(database_url=url, project_dir=work / "project", output_dir=work)
    cpu, t = time.process_time(), time.perf_counter()
    async with BackendCPU(url) as used:
        res = await api.sync(settings, ["phase2a"])
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    n = res.phases[0].changes
    return {"changes": n, "cps": n / wall, "server_cpu_us": used.seconds * 1e6 / n, "client_cpu_us": cpu * 1e6 / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--server", default=default)
    p.add_argument("--scale", type=float, default=0.2)
    p.add_argument("--before", type=Path, help="the src/ directory of the code to compare with")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--changes", choices=("bench", "unchanged"), default="bench")
    p.add_argument("--one", nargs=2, metavar=("URL", "WORK"), help=argparse.SUPPRESS)
    p.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # a child: this version's code first on the path, then the scripts
        sys.path[:0] = [str(args.src), str(ROOT / "scripts")]
        import migrate_data.api  # noqa: F401  (before the scripts put this checkout's src first on the path)

        print(json.dumps(asyncio.run(one(args.one[0], args.scale, Path(args.one[1]), args.changes))))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-sync-ab-"))
    try:
        url = asyncio.run(prepare(args.server, args.scale, work))
        for r in range(args.rounds):
            for label, src in (("before", args.before), ("after", ROOT / "src")):
                cmd = [sys.executable, __file__, "--scale", str(args.scale), "--src", str(src), "--changes", args.changes,
                       "--one", url, str(work)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                m = json.loads(out)
                print(
                    f"round {r + 1} {label:6} {m['changes']:,.0f} changes {m['cps']:9,.0f} changes/s  server CPU "
                    f"{m['server_cpu_us']:5.1f} µs  client CPU {m['client_cpu_us']:5.1f} µs a change",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["psql", "-q", "-d", args.server, "-c", f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)'])


if __name__ == "__main__":
    main()
