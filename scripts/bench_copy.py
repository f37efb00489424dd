#!/usr/bin/env python3
"""Measure the copier against the physical limits of the same server, in the same run.

For each benchmarked table (customers -> clientes; messages -> mensajes, with its lookup in users):
  (a) one bare INSERT … SELECT … ON CONFLICT DO NOTHING with the mapping's own expressions (the limit in one db)
  (b) `migrate-data` copying it, same database
  (c) psql \\copy (SELECT <same expressions>) TO STDOUT | psql \\copy … FROM STDIN, between two databases
  (d) `migrate-data` copying it across the two databases
  (e) `migrate-data` again on the finished table (skipped), and with --recheck (a full idempotent pass)
and, for validation, `migrate-data validate --deep` against count(*) of both sides plus one full read of each.
Peak RSS is that of the migrate-data process.  The seed's planted dirt is cleaned first so the bare statement
of (a) can run at all.  Results are written to BENCHMARKS.md.

    python scripts/bench_copy.py --server postgresql://postgres@127.0.0.1:5432/postgres --scale 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from migrate_data import api  # noqa: E402
from migrate_data.loader import load_phases  # noqa: E402
from migrate_data.preflight import compile_phase  # noqa: E402
from migrate_data.settings import Settings  # noqa: E402
from seed_legacy import seed  # noqa: E402

TABLES = {"clientes": "phase2a", "mensajes": "phase3"}
CLEAN = [
    "UPDATE customers SET notes = NULL WHERE notes = '{not json'",
    "UPDATE messages SET metadata = NULL WHERE metadata LIKE '{\"broken%'",
    "UPDATE messages SET message_type = 'text' WHERE message_type = 'sticker'",
]


def db(server: str, name: str) -> str:
    return urlunsplit(urlsplit(server)._replace(path="/" + name))


async def sql(url: str, *statements: str) -> list:
    conn = await asyncpg.connect(url)
    try:
        out = []
        for s in statements:
            out.append(await conn.fetch(s))
        return out
    finally:
        await conn.close()


async def timed(url: str, statement: str) -> float:
    conn = await asyncpg.connect(url)
    try:
        t = time.perf_counter()
        await conn.execute(statement)
        return time.perf_counter() - t
    finally:
        await conn.close()


def cli(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Run migrate-data; return (seconds, peak RSS in MB)."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "migrate_data", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"migrate-data {' '.join(args)} failed: {proc.stderr.read().decode()[-2000:]}")
    return took, usage.ru_maxrss / 1024


def bench_project(tmp: Path) -> Path:
    """The shipped Alembic environment and phase1, plus one phase per benchmarked table from the shipped mappings."""
    (tmp / "mappings").mkdir(parents=True)
    shutil.copytree(ROOT / "alembic", tmp / "alembic")
    shutil.copy(ROOT / "alembic.ini", tmp / "alembic.ini")
    shutil.copy(ROOT / "mappings" / "phase1.yaml", tmp / "mappings" / "phase1.yaml")
    shipped = {p: yaml.safe_load((ROOT / "mappings" / f"{p}.yaml").read_text()) for p in set(TABLES.values())}
    for target, phase in TABLES.items():
        table = next(t for t in shipped[phase]["tables"] if t["target"] == target)
        text = yaml.safe_dump(
            {"description": f"bench {target}", "requires": ["phase1"], "tables": [table]}, sort_keys=False
        )
        (tmp / "mappings" / f"bench_{target}.yaml").write_text(text.replace("true:", "on:"))
    return tmp


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark script has: where the server is, where the results go."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    default = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--server", default=default, help="a server where the benchmark may create databases")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    return p


async def main() -> None:
    p = parser(__doc__)
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=20000)
    args = p.parse_args()
    admin = db(args.server, "postgres")
    src, tgt = db(args.server, "bench_source"), db(args.server, "bench_target")
    for name in ("bench_source", "bench_target"):
        await sql(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}")
    conn = await asyncpg.connect(src)
    t = time.perf_counter()
    rows = await seed(conn, args.scale)
    seed_s = time.perf_counter() - t
    await conn.close()
    await sql(src, *CLEAN, "VACUUM ANALYZE")
    env = dict(os.environ, DATABASE_URL=src, MIGRATE_DATA_OUTPUT_DIR=tempfile.mkdtemp())
    env.pop("SOURCE_DATABASE_URL", None)
    project = bench_project(Path(tempfile.mkdtemp()))
    cli(["phase1", "--yes", "--no-backup"], env, project)
    cli(["phase1", "--yes", "--no-backup"], dict(env, DATABASE_URL=tgt), project)
    phases = load_phases(project / "mappings")
    conn = await asyncpg.connect(src)
    compiled = {}
    for target in TABLES:
        tables, findings = await compile_phase(phases[f"bench_{target}"], source=conn, target=conn)
        compiled[target] = tables[0][0]
    await conn.close()
    psql = shutil.which("psql") or "psql"
    startup, _ = cli(["--version"], env, project)
    results = []
    # --counts-only: (b) and (d) time the copy; the checksum validation a run does by default is measured on its
    # own below (--deep) and in scripts/bench_safety.py
    common = ["--yes", "--no-backup", "--counts-only", "--jobs", str(args.jobs), "--batch-size", str(args.batch_size)]
    for target, ct in compiled.items():
        n = (await sql(src, ct.count_sql()))[0][0][0]
        truncate = f"TRUNCATE {ct.tgt} CASCADE"
        reset = (
            "DELETE FROM migrate_data.checkpoints; DELETE FROM migrate_data.rejects; "
            "DELETE FROM migrate_data.phases WHERE phase <> 'phase1'; DELETE FROM migrate_data.writes; "
            "DELETE FROM migrate_data.finished"
        )
        await sql(src, truncate)
        a = await timed(src, ct.insert_sql(lower=False, upper=False))
        await sql(src, truncate, *reset.split(";"))
        b, b_rss = cli([f"bench_{target}", *common], env, project)
        e_skip, _ = cli([f"bench_{target}", *common], env, project)
        e_re, e_rss = cli([f"bench_{target}", *common, "--recheck"], env, project)
        # validation: --deep against two count(*) and one full read of each side
        base = 0.0
        for url, q in (
            (src, ct.count_sql()),
            (src, ct.target_count_sql()),
            (src, f"SELECT sum(length(x::text)) FROM {ct.source.schema}.{ct.source.name} x"),
            (src, f"SELECT sum(length(x::text)) FROM {ct.tgt} x"),
        ):
            base += await timed(url, q)
        t = time.perf_counter()
        await api.validate(Settings(database_url=src, project_dir=project), f"bench_{target}", deep=True)
        deep = time.perf_counter() - t
        # (c) the psql pipe between two databases, with the same expressions
        await sql(tgt, truncate)
        select = ct.insert_sql(lower=False, upper=False).split(" SELECT ", 1)[1].split(" ON CONFLICT ")[0]
        cols = ", ".join(f'"{c.target}"' for c in ct.columns)
        t = time.perf_counter()
        pipe = (
            f'{psql} -q "{src}" -c "\\copy (SELECT {select.replace(chr(34), chr(92) + chr(34))}) TO STDOUT" | '
            f'{psql} -q "{tgt}" -c "\\copy {ct.tgt} ({cols.replace(chr(34), chr(92) + chr(34))}) FROM STDIN"'
        )
        subprocess.run(pipe, shell=True, check=True, capture_output=True)
        c = time.perf_counter() - t
        await sql(tgt, truncate, *reset.split(";"))
        d, d_rss = cli([f"bench_{target}", *common], dict(env, DATABASE_URL=tgt, SOURCE_DATABASE_URL=src), project)
        t = time.perf_counter()
        two = Settings(database_url=tgt, source_url=src, project_dir=project)
        await api.validate(two, f"bench_{target}", deep=True)
        deep2 = time.perf_counter() - t
        results.append(
            dict(
                target=target,
                rows=n,
                a=a,
                b=b,
                c=c,
                d=d,
                e_skip=e_skip,
                e_re=e_re,
                deep=deep,
                deep2=deep2,
                base=base,
                rss=max(b_rss, d_rss, e_rss),
            )
        )
        print(results[-1], flush=True)
    write(args, rows, seed_s, results, startup)


def write(args, rows, seed_s, results, startup: float) -> None:
    command = f"python scripts/bench_copy.py --scale {args.scale} --jobs {args.jobs} --batch-size {args.batch_size}"
    lines = [
        f"### scale {args.scale} — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {platform.python_version()}",
        "",
        f"`{command}` (server: {urlsplit(args.server).hostname or 'local socket'}; "
        f"seeding {sum(rows.values()):,} rows took {seed_s:.1f} s; starting the migrate-data process alone takes "
        f"{startup:.2f} s and is included in (b), (d) and (e); --deep is timed in-process)",
        "",
        "| table | rows | (a) INSERT…SELECT | (b) copier, 1 db | (b)/(a) speed | (c) psql \\copy pipe | "
        "(d) copier, 2 dbs | (d)/(c) speed | (e) re-run skipped | (e) --recheck | --deep | deep / (2 counts + 2 reads) | "
        "--deep, 2 dbs | peak RSS |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        lines.append(
            f"| {r['target']} | {r['rows']:,} | {r['a']:.2f} s | {r['b']:.2f} s | {r['a'] / r['b']:.2f} | "
            f"{r['c']:.2f} s | {r['d']:.2f} s | {r['c'] / r['d']:.2f} | {r['e_skip']:.2f} s "
            f"({100 * r['e_skip'] / r['b']:.0f}% of b) | {r['e_re']:.2f} s | {r['deep']:.2f} s | "
            f"{r['deep'] / r['base']:.2f} | {r['deep2']:.2f} s | {r['rss']:.0f} MB |"
        )
    write_section(args.output, "\n".join(lines) + "\n")


async def server_stats(url: str) -> bool:
    """Reset pg_stat_statements in ``url``'s database (creating the extension); False where the server does not load
    it (``shared_preload_libraries``)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
        return True
    except asyncpg.PostgresError:
        return False
    finally:
        await conn.close()


async def server_time(url: str) -> tuple[float, int]:
    """Milliseconds of server execution and number of top-level statements in ``url``'s database since the reset."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT COALESCE(sum(total_exec_time), 0)::float8 AS ms, COALESCE(sum(calls), 0)::bigint AS n "
            "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND query NOT LIKE '%pg_stat_statements%'"
        )
        return row["ms"], row["n"]
    finally:
        await conn.close()


class BackendCPU:
    """On-CPU seconds of the server processes of ``url``'s database while the block runs (sampled every ``every`` s
    from /proc/<pid>/schedstat, so only for a server on this machine): time spent waiting for a CPU the machine's
    other load holds is not in it, which makes it the steadiest figure a shared machine gives."""

    def __init__(self, url: str, every: float = 0.02) -> None:
        self.url, self.every = url, every
        self.first: dict[int, int] = {}  # a backend there at the start counts from then, a new one from its start
        self.last: dict[int, int] = {}
        self.started = False

    @staticmethod
    def available() -> bool:
        return Path("/proc/self/schedstat").exists()

    async def __aenter__(self) -> BackendCPU:
        self.conn = await asyncpg.connect(self.url)
        await self._sample()
        self.started = True
        self.task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self._sample()
        await self.conn.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self._sample()

    async def _sample(self) -> None:
        pids = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        for (pid,) in pids:
            try:
                ns = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
            except (OSError, ValueError):
                continue
            self.first.setdefault(pid, 0 if self.started else ns)
            self.last[pid] = ns

    @property
    def seconds(self) -> float:
        return sum(self.last[p] - self.first[p] for p in self.last) / 1e9


def write_section(output: str, section: str) -> None:
    """Put ``section`` first under the results marker of BENCHMARKS.md (newest first), and print it."""
    path = Path(output)
    head = path.read_text() if path.exists() else ""
    marker = "<!-- results -->"
    if marker not in head:
        head = (head or "# Benchmarks\n") + f"\n{marker}\n"
    path.write_text(head.replace(marker, marker + "\n\n" + section, 1))
    print(section)


if __name__ == "__main__":
    asyncio.run(main())
