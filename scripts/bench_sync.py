#!/usr/bin/env python3
"""Measure live sync between nights: sync throughput against the copier, lag under a steady load, cutover.

One database: the sample data is seeded (its planted dirt cleaned), phase1 creates the Spanish tables and phase2a
copies professions and customers -> clientes (the copier's rows/s for clientes come from that run), which also turns
change capture on.  Then:

  1. throughput  UPDATE 10 % of customers in statements of 1,000 rows, insert 1 % in statements of 1,000 and delete
                 half of those; ``api.sync(settings, ["phase2a"])`` is timed -> changes/s against the copier's rows/s;
                 ``--rounds`` times (median and spread).  Each round also times one bare upsert of every changed key
                 (the sync's own INSERT … ON CONFLICT, rolled back): the limit for these changes in one statement;
                 and one bare UPDATE … FROM of the updated keys' target rows from their source rows (no conflict
                 handling, no check of who wrote a row, rolled back): what updating those rows costs at all
                 Where the server loads pg_stat_statements, the server's execution time of the sync is summed too
                 (a figure the machine's other load moves much less than the wall clock)
  2. lag         ``migrate-data sync phase2a --follow`` runs while pgbench writes customers at a fixed rate (an
                 INSERT and a one-row UPDATE per transaction); the change log is sampled every second; the follower
                 is stopped with SIGINT (exit 130)
  3. cutover     the same load runs without sync, then ``api.cutover(settings, ["phase2a"])`` (what
                 ``migrate-data cutover phase2a --yes`` runs) applies what is pending, validates and removes capture;
                 how long writes were blocked is its ``blocked_seconds``

Results go to BENCHMARKS.md.

    python scripts/bench_sync.py --server postgresql://postgres@127.0.0.1:5432/postgres --scale 0.2
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_copy import (  # noqa: E402
    CLEAN,
    BackendCPU,
    bench_project,
    db,
    parser,
    server_stats,
    server_time,
    sql,
    write_section,
)
from migrate_data import api, sync_sql  # noqa: E402
from migrate_data import sync as syncing  # noqa: E402
from migrate_data.db import open_pool  # noqa: E402
from migrate_data.preflight import compile_phase  # noqa: E402
from migrate_data.settings import Settings  # noqa: E402
from migrate_data.sql import qcols, qi, qname  # noqa: E402
from seed_legacy import counts, seed  # noqa: E402

PHASE = "phase2a"
LOAD = """\\set c random(1, {customers})
BEGIN;
INSERT INTO customers (phone_number, full_name, city) VALUES ('+b' || nextval('bench_phone'), 'Bench', 'Quito');
UPDATE customers SET city = 'Cuenca', updated_at = now() WHERE phone_number = '+5939' || lpad(:c::text, 8, '0');
END;
"""
LAG_SQL = (
    "SELECT count(*)::bigint, extract(epoch FROM clock_timestamp() - min(at))::float8 "
    "FROM migrate_data.changes WHERE phase = $1"
)


def phone(i: int) -> str:
    return "+5939" + str(i).rjust(8, "0")


async def waiting(url: str) -> tuple[int, float | None]:
    conn = await asyncpg.connect(url)
    try:
        n, age = await conn.fetchrow(LAG_SQL, PHASE)
        return n, age
    finally:
        await conn.close()


async def pgbench(
    url: str, script: Path, *, rate: int, seconds: int, clients: int, jobs: int
) -> asyncio.subprocess.Process:
    exe = shutil.which("pgbench")
    assert exe, "pgbench is not installed (apt-get install postgresql-client)"
    return await asyncio.create_subprocess_exec(
        exe,
        "-n",
        "-f",
        str(script),
        "-c",
        str(clients),
        "-j",
        str(jobs),
        "-R",
        str(rate),
        "-T",
        str(seconds),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process) -> dict[str, float]:
    out, err = await proc.communicate()
    text = out.decode()
    if proc.returncode != 0:
        raise SystemExit(f"pgbench failed: {err.decode()[-2000:]}")
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", text)
    tx = re.search(r"number of transactions actually processed: (\d+)", text)
    lat = re.search(r"latency average = ([0-9.]+) ms", text)
    assert m and tx, text
    return {"tps": float(m.group(1)), "tx": int(tx.group(1)), "latency_ms": float(lat.group(1)) if lat else 0.0}


async def sampled(url: str, until: asyncio.Future, samples: list[tuple[int, float]]) -> None:
    while not until.done():
        n, age = await waiting(url)
        samples.append((n, age or 0.0))
        await asyncio.sleep(1.0)


def changes(n: int) -> tuple[list[str], int, int, int]:
    """The statements of one round of changes to customers: (statements, updated, inserted, deleted)."""
    statements = []
    updated = 0
    for start in range(1, n + 1, 10_000):  # 1,000 of every 10,000: 10 %, spread over the table
        end = min(start + 999, n)
        statements.append(
            f"UPDATE customers SET city = 'Cuenca', updated_at = now() "
            f"WHERE phone_number BETWEEN '{phone(start)}' AND '{phone(end)}'"
        )
        updated += end - start + 1
    inserted = max(n // 100, 10)
    for start in range(0, inserted, 1000):
        k = min(1000, inserted - start)
        statements.append(
            "INSERT INTO customers (phone_number, full_name, city) "
            f"SELECT '+b' || nextval('bench_phone'), 'Bench', 'Quito' FROM generate_series(1, {k})"
        )
    # deletes of copied rows (those no service request references; from the half of the table not updated)
    deleted = max(n // 200, 5)
    statements.append(
        f"DELETE FROM customers c WHERE c.id IN (SELECT id FROM customers x WHERE x.phone_number BETWEEN "
        f"'{phone(5001)}' AND '{phone(n)}' AND NOT EXISTS (SELECT FROM service_requests s WHERE s.customer_id = x.id) "
        f"ORDER BY x.phone_number LIMIT {deleted})"
    )
    return statements, updated, inserted, deleted


async def _bare(
    url: str, settings: Settings, statement: Callable[[sync_sql.SyncTable], str], ops: str
) -> tuple[int, float]:
    """One ``statement`` of every key of customers the log holds (its log rows of ``ops``), rolled back: (rows,
    seconds)."""
    _, phase = api.get_phase(settings, PHASE)
    async with open_pool(url, max_size=2) as pool:
        tables, _ = await compile_phase(phase, source=pool, target=pool)
        syncer = syncing.PhaseSyncer(phase=PHASE, tables=tables, target=pool, source=pool, lock=None)  # type: ignore[arg-type]
        await syncer.prepare()
        st = next(t for t in syncer.tables if t.source == "public.customers")
        async with pool.acquire() as conn:
            keys = await conn.fetchval(
                "SELECT array_agg(DISTINCT key[$2]) FROM migrate_data.changes WHERE phase = $1 AND source = $3 "
                "AND op::text = ANY ($4::text[])",
                PHASE,
                st.bk_positions[0] + 1,
                st.source,
                list(ops),
            )
            tr = conn.transaction()
            await tr.start()
            t = time.perf_counter()
            status = await conn.execute(statement(st), keys)
            took = time.perf_counter() - t
            await tr.rollback()
    return int(status.rsplit(" ", 1)[-1]), took


def update_sql(st: sync_sql.SyncTable) -> str:
    """A bare UPDATE … FROM of the target rows of the batch keys ``$1`` from their source rows, with the mapping's
    expressions and nothing else (no conflict handling, no check of who wrote a row)."""
    ct = st.ct
    target_key = ct.key[0]
    sets = ", ".join(f"{qi(c.target)} = s.{qi(c.target)}" for c in ct.columns if c.target != target_key)
    exprs = ", ".join(f"{c.expr} AS {qi(c.target)}" for c in ct.columns)
    return (
        f"UPDATE {qname(ct.target)} AS t SET {sets} FROM (SELECT {exprs} FROM {ct.from_} WHERE "
        f"{qcols((st.feed[0],), ct.alias)} = ANY (CAST($1::text[] AS {st.feed_types[0]}[]))) AS s "
        f"WHERE t.{qi(target_key)} = s.{qi(target_key)}"
    )


async def bare_upsert(url: str, settings: Settings) -> tuple[int, float]:
    """Sync's own INSERT … ON CONFLICT of every changed key at once."""
    return await _bare(url, settings, sync_sql.upsert_sql, "IUD")


async def bare_update(url: str, settings: Settings) -> tuple[int, float]:
    """A bare UPDATE of the updated keys' target rows: what updating those rows costs at all."""
    return await _bare(url, settings, update_sql, "U")


async def throughput_round(url: str, settings: Settings, n: int, stats: bool) -> dict:
    """Change customers, then time one bare upsert of the changed keys and the sync of the change log."""
    statements, updated, inserted, deleted = changes(n)
    t = time.perf_counter()
    await sql(url, *statements)
    write_s = time.perf_counter() - t
    logged, _ = await waiting(url)
    bare_rows, bare_s = await bare_upsert(url, settings)
    update_rows, update_s = await bare_update(url, settings)
    if stats:
        await server_stats(url)
    cpu = time.process_time()
    t = time.perf_counter()
    async with BackendCPU(url) as used:
        res = await api.sync(settings, [PHASE])
    sync_s = time.perf_counter() - t
    cpu = time.process_time() - cpu
    server_ms, calls = await server_time(url) if stats else (0.0, 0)
    ps = res.phases[0]
    assert ps.waiting == 0, ps
    print(
        f"sync: {ps} in {sync_s:.2f} s = {ps.changes / sync_s:,.0f} changes/s; bare upsert {bare_rows:,} rows in "
        f"{bare_s:.2f} s; server {server_ms:.0f} ms in {calls} statements; server CPU {used.seconds:.2f} s; client CPU "
        f"{cpu:.2f} s",
        flush=True,
    )
    return {
        "updated": updated,
        "inserted": inserted,
        "deleted": deleted,
        "logged": logged,
        "write_s": write_s,
        "ps": ps,
        "sync_s": sync_s,
        "cps": ps.changes / sync_s,
        "bare_rows": bare_rows,
        "bare_s": bare_s,
        "update_rows": update_rows,
        "update_s": update_s,
        "server_us": server_ms * 1e3 / ps.changes,
        "calls": calls * 1000 / ps.changes,
        "wall_us": sync_s * 1e6 / ps.changes,
        "cpu_us": cpu * 1e6 / ps.changes,
        "server_cpu_us": used.seconds * 1e6 / ps.changes,
    }


async def main() -> None:
    p = parser(__doc__)
    p.add_argument("--scale", type=float, default=0.2)
    p.add_argument("--rate", type=int, default=200, help="pgbench -R: transactions per second of the write load")
    p.add_argument("--lag-seconds", type=int, default=30, help="pgbench -T while sync --follow runs")
    p.add_argument("--load-seconds", type=int, default=60, help="pgbench -T of the load left pending for the cutover")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="rounds of changes + sync for the throughput")
    args = p.parse_args()
    load_before = os.getloadavg()
    name = "md_bench_sync"
    admin = db(args.server, "postgres")
    await sql(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    url = db(args.server, name)
    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    try:
        conn = await asyncpg.connect(url)
        t = time.perf_counter()
        rows = await seed(conn, args.scale)
        seed_s = time.perf_counter() - t
        version = await conn.fetchval("SHOW server_version")
        await conn.close()
        await sql(url, *CLEAN, "CREATE SEQUENCE bench_phone", "VACUUM ANALYZE")
        project = bench_project(work / "project")
        shutil.copy(ROOT / "mappings" / f"{PHASE}.yaml", project / "mappings" / f"{PHASE}.yaml")
        settings = Settings(database_url=url, project_dir=project, output_dir=work)
        await api.run_phase(settings, "phase1", api.RunOptions(backup=False))

        # 1. the copier, then sync of a bulk of changes
        run = await api.run_phase(settings, PHASE, api.RunOptions(backup=False, deep=False))
        copied = next(r for r in run.tables if r.target.endswith("clientes"))
        copy_rps = copied.rows_written / copied.seconds
        print(
            f"copy: {copied.rows_written:,} rows of clientes in {copied.seconds:.2f} s = {copy_rps:,.0f} rows/s",
            flush=True,
        )
        captured = (await sql(url, f"SELECT count(*) FROM migrate_data.capture WHERE phase = '{PHASE}'"))[0][0][0]
        assert captured, "phase2a did not turn capture on"
        n = counts(args.scale)["customers"]
        stats = await server_stats(url)
        rounds = [await throughput_round(url, settings, n, stats) for _ in range(args.rounds)]
        first = rounds[0]
        ps = first["ps"]

        # 2. lag under a steady load, with sync --follow
        script = work / "load.sql"
        script.write_text(LOAD.format(customers=n))
        env = dict(os.environ, DATABASE_URL=url, MIGRATE_DATA_OUTPUT_DIR=str(work))
        env.pop("SOURCE_DATABASE_URL", None)
        flog = open(work / "follow.log", "w+")
        follower = subprocess.Popen(
            [sys.executable, "-m", "migrate_data", "sync", PHASE, "--follow"],
            cwd=project,
            env=env,
            stdout=flog,
            stderr=subprocess.STDOUT,
        )
        await asyncio.sleep(3.0)  # let it start and take the lock
        assert follower.poll() is None, (work / "follow.log").read_text()
        samples: list[tuple[int, float]] = []
        bench = await pgbench(
            url, script, rate=args.rate, seconds=args.lag_seconds, clients=args.clients, jobs=args.jobs
        )
        done = asyncio.ensure_future(finish(bench))
        await sampled(url, done, samples)
        lag_load = done.result()
        t = time.perf_counter()
        while (await waiting(url))[0] and time.perf_counter() - t < 30:
            await asyncio.sleep(0.1)
        drain_s = time.perf_counter() - t
        left, _ = await waiting(url)
        follower.send_signal(signal.SIGINT)
        try:
            follow_rc = follower.wait(timeout=60)
        except subprocess.TimeoutExpired:
            follower.kill()
            follow_rc = follower.wait()
        flog.seek(0)
        follow_out = flog.read()
        flog.close()
        print(follow_out[-1500:], flush=True)
        counts_ = [s[0] for s in samples]
        ages = [s[1] for s in samples]
        print(
            f"lag: {lag_load}; waiting max {max(counts_)} median {statistics.median(counts_)}; "
            f"age max {max(ages):.2f} median {statistics.median(ages):.2f}; drained in {drain_s:.2f} s; "
            f"follower exit {follow_rc}",
            flush=True,
        )

        # 3. cutover with a load's changes pending
        bench = await pgbench(
            url, script, rate=args.rate, seconds=args.load_seconds, clients=args.clients, jobs=args.jobs
        )
        cut_load = await finish(bench)
        pending, pending_age = await waiting(url)
        t = time.perf_counter()
        cut = await api.cutover(settings, [PHASE])
        cut_s = time.perf_counter() - t
        cut_changes = sum(s.changes for s in cut.synced)
        print(
            f"cutover: ok={cut.ok} blocked {cut.blocked_seconds:.2f} s of {cut_s:.2f} s; {cut_changes:,} changes; "
            f"capture removed {cut.capture_removed}",
            flush=True,
        )
        load_after = os.getloadavg()

        def la(x: tuple[float, float, float]) -> str:
            return f"{x[0]:.1f} / {x[1]:.1f} / {x[2]:.1f}"

        pgv = subprocess.run(["pgbench", "--version"], capture_output=True, text=True).stdout.strip()
        command = (
            f"python scripts/bench_sync.py --scale {args.scale} --rate {args.rate} --lag-seconds {args.lag_seconds} "
            f"--load-seconds {args.load_seconds} --clients {args.clients} --jobs {args.jobs} --rounds {args.rounds}"
        )

        def med(key: str) -> float:
            return statistics.median(r[key] for r in rounds)

        def each(key: str, fmt: str) -> str:
            return f" (rounds: {', '.join(format(r[key], fmt) for r in rounds)})" if len(rounds) > 1 else ""

        sync_cps = med("cps")
        ratio = sync_cps / copy_rps
        bare_rps = statistics.median(r["bare_rows"] / r["bare_s"] for r in rounds)
        update_rps = statistics.median(r["update_rows"] / r["update_s"] for r in rounds)
        server = (
            f"| server execution time of the sync (pg_stat_statements: all its statements) | {med('server_us'):.1f} µs "
            f"a change{each('server_us', '.1f')}, {med('calls'):.0f} statements a 1,000 changes |\n"
            if stats
            else ""
        ) + (
            f"| a change costs (median of the rounds) | **{med('server_cpu_us'):.1f} µs of server CPU** (its server "
            f"processes' on-CPU time, /proc/<pid>/schedstat){each('server_cpu_us', '.1f')}, {med('cpu_us'):.1f} µs of "
            f"client CPU, {med('wall_us'):.1f} µs of wall clock |\n"
        )
        section = (
            f"### live sync: throughput, lag, cutover — scale {args.scale} — {time.strftime('%Y-%m-%d')}, "
            f"{os.cpu_count()} cores, {platform.python_version()}\n\n"
            f"`{command}` (PostgreSQL {version}, {pgv}; one database; seeding {sum(rows.values()):,} rows took "
            f"{seed_s:.1f} s; load average before {la(load_before)}, after {la(load_after)})\n\n"
            "| measure | result |\n|---|--:|\n"
            f"| copier, clientes (phase2a run, counts only) | {copied.rows_written:,} rows in {copied.seconds:.2f} s = "
            f"{copy_rps:,.0f} rows/s |\n"
            f"| changes made, each round: UPDATE of {first['updated']:,} rows (statements of 1,000), INSERT "
            f"{first['inserted']:,}, DELETE {first['deleted']:,} | {first['logged']:,} log rows, written in "
            f"{first['write_s']:.2f} s |\n"
            f"| one bare upsert of the changed keys (sync's own statement, one for all, rolled back) | "
            f"{first['bare_rows']:,} rows in {first['bare_s']:.2f} s; median {bare_rps:,.0f} rows/s |\n"
            f"| one bare UPDATE … FROM of the updated keys' rows (the mapping's expressions, nothing else, rolled "
            f"back) | {first['update_rows']:,} rows in {first['update_s']:.2f} s; median {update_rps:,.0f} rows/s "
            f"= **{update_rps / copy_rps:.2f}× the copier** |\n"
            f'| `api.sync(settings, ["phase2a"])` (batch size 1,000) | {ps.changes:,} changes ({ps.upserted:,} '
            f"upserted, {ps.deleted:,} deleted) in {first['sync_s']:.2f} s; median of {len(rounds)} round(s) "
            f"**{sync_cps:,.0f} changes/s**{each('cps', ',.0f')} |\n"
            + server
            + f"| sync / copier | **{ratio:.2f}×** (target ≥ 0.5×); sync / one bare upsert {sync_cps / bare_rps:.2f}× |\n"
            f"| write load with `sync phase2a --follow` | pgbench -R {args.rate} -T {args.lag_seconds} -c "
            f"{args.clients}: {lag_load['tx']:,} transactions, {lag_load['tps']:.0f} tps, "
            f"{lag_load['latency_ms']:.1f} ms average latency |\n"
            f"| waiting changes, sampled every second ({len(samples)} samples) | max {max(counts_):,}, median "
            f"{statistics.median(counts_):,.0f} |\n"
            f"| age of the oldest waiting change | max {max(ages):.2f} s, median {statistics.median(ages):.2f} s |\n"
            f"| after the load stopped | log empty in {drain_s:.1f} s ({left} left); follower stopped by SIGINT: exit "
            f"{follow_rc} |\n"
            f"| load left pending for the cutover | pgbench -R {args.rate} -T {args.load_seconds}: {cut_load['tx']:,} "
            f"transactions, {pending:,} log rows waiting (oldest {pending_age or 0:.0f} s) |\n"
            f'| `api.cutover(settings, ["phase2a"])` (= `migrate-data cutover phase2a --yes`) | ok={cut.ok}, '
            f"{cut_changes:,} changes applied, **writes blocked {cut.blocked_seconds:.2f} s** (try {cut.attempts}), "
            f"{cut_s:.2f} s in all, capture removed: {cut.capture_removed} |\n"
        )
        write_section(args.output, section)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        await sql(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main())
