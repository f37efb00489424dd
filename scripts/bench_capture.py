#!/usr/bin/env python3
"""Measure what change capture costs the application: pgbench with and without capture's triggers.

The sample database is seeded, phase1 creates the Spanish tables, and capture is installed exactly as a phase start
installs it (``capture.install`` for phase2a and phase3: customers and messages carry triggers, users too as a
lookup's table).  pgbench then runs a custom script of inserts and updates on customers and messages, in turns:

  none       no triggers
  statement  capture's statement-level triggers with transition tables (what migrate-data installs)
  unguarded  the same without the check that the columns it names are still there (``capture_sql._guard``, which
             keeps a renamed column from failing the application's writes): what that check costs
  row        the same log written by row-level triggers (``capture_sql.function_sql(level="row")``)
  floor      the same triggers whose function only logs, with one INSERT a statement, the keys of its new rows (of
             its old ones for a DELETE): no column check, and an UPDATE that changes a key loses the old one.  The
             floor of any trigger that logs keys; what "statement" adds to it is what its guarantees cost
  empty      the same statement-level triggers with transition tables, whose function only returns: the floor of
             any trigger-based capture (the trigger call and the transition tables, nothing logged)

Two workloads: "oltp" (a transaction of 4 one-row statements, as the application writes) and "batch" (one UPDATE
of 100 messages per transaction).  The variants alternate for ``--rounds`` rounds; the table shows the median tps
and its ratio to "none".  The change log is emptied between runs (nobody syncs during the benchmark).  Where the
server loads pg_stat_statements, each run also gives the server's execution time per statement of the workload's
script (the triggers' time included), a figure the machine's other load moves much less than tps.  Results go to
BENCHMARKS.md.

    python scripts/bench_capture.py --server postgresql://postgres@127.0.0.1:5432/postgres --scale 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_copy import BackendCPU, server_stats, server_time, write_section  # noqa: E402
from migrate_data import api, capture, capture_sql, ledger  # noqa: E402
from migrate_data.db import open_pool  # noqa: E402
from migrate_data.preflight import compile_phase  # noqa: E402
from migrate_data.settings import Settings  # noqa: E402
from migrate_data.sql import key_text_array, qi, ql  # noqa: E402
from seed_legacy import counts, seed  # noqa: E402

PHASES = ("phase2a", "phase3")
VARIANTS = ("none", "statement", "unguarded", "row", "floor", "empty")
CAPTURED = VARIANTS[1:]
HEADS = {  # the column of each captured variant, as its cost is shown
    "statement": "statement-level",
    "unguarded": "without the column check",
    "row": "row-level",
    "floor": "one INSERT of the keys",
    "empty": "an empty trigger",
}
ADDS = " | ".join(f"{HEADS[v]} adds" for v in CAPTURED)
EMPTY_BODY = re.compile(r"(?s)\nBEGIN\n.*\nEND\n")
GUARD = re.compile(r"    ELSIF \(CASE WHEN TG_RELID .*? IS NOT TRUE THEN\n.*?\n")
OLTP = """\\set c random(1, {customers})
\\set m random(1, {messages})
\\set u random(1, {users})
BEGIN;
INSERT INTO customers (phone_number, full_name, city) VALUES ('+b' || nextval('bench_phone'), 'Bench', 'Quito');
UPDATE customers SET city = 'Cuenca', updated_at = now() WHERE phone_number = '+5939' || lpad(:c::text, 8, '0');
INSERT INTO messages (conversation_id, user_id, message_type, content)
    VALUES (md5('conversation' || :m)::uuid, md5('user' || :u)::uuid, 'text', 'bench');
UPDATE messages SET processing_status = 'processed' WHERE id = :m;
END;
"""
BATCH = """\\set m random(1, {messages} - 100)
UPDATE messages SET processing_status = 'processed' WHERE id BETWEEN :m AND :m + 99;
"""


def floor_sql(phase: str, c: capture_sql.Captured) -> str:
    """The trigger function of the "floor" variant: one INSERT of the statement's new keys (old ones for a DELETE)."""
    types = c.types or ("text",) * len(c.columns)

    def log(op: str, alias: str, table: str) -> str:
        key = key_text_array([f"{alias}.{qi(col)}" for col in c.columns], types)
        return (
            f"INSERT INTO migrate_data.changes (phase, source, key, op) "
            f"SELECT {ql(phase)}, {ql(c.name)}, {key}, '{op}' FROM {qi(table)} AS {alias}"
        )

    return (
        f"CREATE OR REPLACE FUNCTION {capture_sql.function_name(phase, c.name)}() RETURNS trigger LANGUAGE plpgsql "
        f"SECURITY DEFINER AS $capture$\nBEGIN\n    IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN "
        f"{log('D', 'o', capture_sql.OLD)};\n    ELSIF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN "
        f"{log('I', 'n', capture_sql.NEW)};\n    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN "
        f"{log('U', 'n', capture_sql.NEW)};\n    END IF;\n    RETURN NULL;\nEND\n$capture$"
    )


def db(server: str, name: str) -> str:
    return urlunsplit(urlsplit(server)._replace(path="/" + name))


async def set_capture(url: str, settings: Settings, variant: str) -> None:
    """Remove every capture of the benchmark's phases, then install ``variant``."""
    async with open_pool(url, max_size=2) as pool:
        for phase in PHASES:
            await capture.remove(settings, pool, phase)
        if variant == "none":
            return
        for phase in PHASES:
            _, ph = api.get_phase(settings, phase)
            tables, _ = await compile_phase(ph, source=pool, target=pool)
            if variant == "statement":
                await capture.install(pool, phase, tables)
                continue
            if variant == "floor":
                await capture.install(pool, phase, tables)
                plan = await capture.capture_plan(pool, phase, [ct for ct, _ in tables])
                async with pool.acquire() as conn:
                    for c in plan.tables:
                        await conn.execute(floor_sql(phase, c))
                continue
            if variant == "empty":
                await capture.install(pool, phase, tables)
                plan = await capture.capture_plan(pool, phase, [ct for ct, _ in tables])
                async with pool.acquire() as conn:
                    for c in plan.tables:
                        sql_, n = EMPTY_BODY.subn(
                            "\nBEGIN\n    RETURN NULL;\nEND\n",
                            capture_sql.function_sql(
                                phase, c, [capture_sql.Layout(0, (0,) * len(c.names), (0,) * len(c.names))]
                            ),
                        )
                        assert n == 1
                        await conn.execute(sql_)
                continue
            if variant == "unguarded":
                await capture.install(pool, phase, tables)
                plan = await capture.capture_plan(pool, phase, [ct for ct, _ in tables])
                async with pool.acquire() as conn:
                    for c in plan.tables:
                        sql_, n = GUARD.subn("", (await capture.install_statements(conn, phase, c)).statements[0])
                        assert n == 1 and "pg_identify_object_as_address" not in sql_
                        await conn.execute(sql_)
                continue
            plan = await capture.capture_plan(pool, phase, [ct for ct, _ in tables])
            async with pool.acquire() as conn, conn.transaction():
                await ledger.ensure_capture(conn)
                for c in plan.tables:
                    for statement in (await capture.install_statements(conn, phase, c, level="row")).statements:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO migrate_data.capture (phase, source, relation, columns, function) "
                        "VALUES ($1, $2, $3, $4, $5)",
                        phase,
                        c.name,
                        c.relation,
                        list(c.columns),
                        capture_sql.function_name(phase, c.name),
                    )


SERVER_LOOPS = {  # the server's own cost, without the client, the network and the commit: a DO loop of statements
    "one row": "DO $$ BEGIN FOR i IN 1..{n} LOOP UPDATE messages SET processing_status = 'processed' WHERE id = i; "
    "END LOOP; END $$",
    "100 rows": "DO $$ BEGIN FOR i IN 1..{n} LOOP UPDATE messages SET processing_status = 'processed' "
    "WHERE id BETWEEN i * 100 AND i * 100 + 99; END LOOP; END $$",
}


async def server_cost(url: str, loop: str, n: int) -> float:
    """Microseconds per statement of ``loop``, in a fresh session, rolled back: its server process's on-CPU time
    (/proc/<pid>/schedstat) where the server is on this machine, else the wall clock."""
    conn = await asyncpg.connect(url)
    try:
        stat = Path(f"/proc/{await conn.fetchval('SELECT pg_backend_pid()')}/schedstat")

        def on_cpu() -> float:
            return int(stat.read_text().split()[0]) / 1e9 if stat.exists() else time.perf_counter()

        tr = conn.transaction()
        await tr.start()
        started = on_cpu()
        await conn.execute(SERVER_LOOPS[loop].format(n=n))
        took = on_cpu() - started
        await tr.rollback()
        return took * 1e6 / n
    finally:
        await conn.close()


def pgbench(url: str, script: Path, *, seconds: int, clients: int, jobs: int) -> tuple[float, int]:
    """tps and transactions of one pgbench run."""
    exe = shutil.which("pgbench")
    assert exe, "pgbench is not installed (apt-get install postgresql-client)"
    out = subprocess.run(
        [exe, "-n", "-f", str(script), "-c", str(clients), "-j", str(jobs), "-T", str(seconds), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    tx = re.search(r"number of transactions actually processed: (\d+)", out)
    assert m and tx, out
    return float(m.group(1)), int(tx.group(1))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--server", default=os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--seconds", type=int, default=15, help="one pgbench run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    name = "md_bench_capture"
    admin = await asyncpg.connect(db(args.server, "postgres"))
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = db(args.server, name)
    work = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    try:
        conn = await asyncpg.connect(url)
        started = time.monotonic()
        await seed(conn, args.scale)
        await conn.execute("CREATE SEQUENCE bench_phone")
        version = await conn.fetchval("SHOW server_version")
        await conn.close()
        seeded = time.monotonic() - started
        settings = Settings(database_url=url, project_dir=ROOT, output_dir=work)
        await api.run_phase(settings, "phase1", api.RunOptions(backup=False))
        n = counts(args.scale)
        n_messages = n["messages"]
        scripts = {
            "oltp": OLTP.format(customers=n["customers"], messages=n["messages"], users=n["users"]),
            "batch": BATCH.format(messages=n["messages"]),
        }
        paths = {}
        for k, text in scripts.items():
            paths[k] = work / f"{k}.sql"
            paths[k].write_text(text)
        tps: dict[tuple[str, str], list[float]] = {}
        cost: dict[tuple[str, str], list[float]] = {}
        served: dict[tuple[str, str], list[float]] = {}  # µs of server execution per statement of the script
        cpu_tx: dict[tuple[str, str], list[float]] = {}  # µs of server CPU per transaction
        stats = await server_stats(url)
        for r in range(args.rounds):
            for variant in VARIANTS:
                await set_capture(url, settings, variant)
                for loop in SERVER_LOOPS:
                    n = 2000 if loop == "one row" else max(10, n_messages // 100 - 2)
                    cost.setdefault((loop, variant), []).append(await server_cost(url, loop, n))
                for workload, path in paths.items():
                    if stats:
                        await server_stats(url)
                    async with BackendCPU(url) as used:
                        value, tx = await asyncio.to_thread(
                            pgbench, url, path, seconds=args.seconds, clients=args.clients, jobs=args.jobs
                        )
                    tps.setdefault((workload, variant), []).append(value)
                    cpu_tx.setdefault((workload, variant), []).append(used.seconds * 1e6 / tx)
                    extra = f" {used.seconds * 1e6 / tx:8.1f} µs server CPU/transaction"
                    if stats:
                        ms, calls = await server_time(url)
                        per = ms * 1e3 / max(calls, 1)
                        served.setdefault((workload, variant), []).append(per)
                        extra = f" {per:8.1f} µs/statement"
                    print(f"round {r + 1} {workload:5} {variant:9} {value:10.1f} tps{extra}", flush=True)
                    c = await asyncpg.connect(url)
                    logged = await c.fetchval("SELECT count(*) FROM migrate_data.changes") if variant != "none" else 0
                    await c.execute("TRUNCATE migrate_data.changes") if variant != "none" else None
                    await c.close()
                    if variant not in ("none", "empty") and not logged:
                        raise SystemExit(f"{variant}: nothing was logged")
        await set_capture(url, settings, "none")
        load = os.getloadavg()
        label = {
            "oltp": "oltp: 4 one-row statements per transaction (insert + update customers, insert + update messages)",
            "batch": "batch: one UPDATE of 100 messages per transaction",
        }
        rows = []
        for workload in paths:
            base = tps[(workload, "none")]
            cells = [f"{statistics.median(base):,.0f}"]
            for variant in CAPTURED:
                # the ratio of each round (the variants of a round run back to back: the machine's load is shared)
                ratios = [v / b for v, b in zip(tps[(workload, variant)], base, strict=True)]
                cells += [
                    f"{statistics.median(tps[(workload, variant)]):,.0f}",
                    f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})",
                ]
            rows.append(f"| {label[workload]} | " + " | ".join(cells) + " |")
        costs = []
        for loop in SERVER_LOOPS:
            base = min(cost[(loop, "none")])
            cells = [f"{base:.1f} µs"]
            for variant in CAPTURED:
                extra = min(cost[(loop, variant)]) - base
                cells.append(f"+{extra:.1f} µs" + (f" ({extra / 100:.2f} µs a row)" if loop == "100 rows" else ""))
            costs.append(f"| UPDATE of {loop} | " + " | ".join(cells) + " |")
        cpu_rows = []
        for workload in paths:
            base_c = statistics.median(cpu_tx[(workload, "none")])
            cells = [f"{base_c:.0f} µs"]
            for variant in CAPTURED:
                # per round, against the round's own "none"
                d = [v - b for v, b in zip(cpu_tx[(workload, variant)], cpu_tx[(workload, "none")], strict=True)]
                cells.append(
                    f"+{statistics.median(d):.0f} µs = {statistics.median(d) / base_c:+.0%} "
                    f"({min(d):+.0f} to {max(d):+.0f})"
                )
            cpu_rows.append(f"| {label[workload]} | " + " | ".join(cells) + " |")
        cpu_table = (
            "Server CPU per transaction: the on-CPU time of the database's server processes (/proc/<pid>/schedstat, "
            "sampled every 20 ms) over the transactions pgbench made; waiting for a CPU that the machine's other "
            "load holds is not in it (median of the rounds; the spread of the per-round difference):\n\n"
            f"| workload | no capture | {ADDS} |\n|---|--:|{'--:|' * len(CAPTURED)}\n" + "\n".join(cpu_rows) + "\n\n"
        )
        served_rows = []
        for workload in paths if stats else ():
            base_s = statistics.median(served[(workload, "none")])
            cells = [f"{base_s:.1f} µs"]
            for variant in CAPTURED:
                v = served[(workload, variant)]
                cells.append(
                    f"+{statistics.median(v) - base_s:.1f} µs ({min(v) - base_s:+.1f} to {max(v) - base_s:+.1f})"
                )
            served_rows.append(f"| {label[workload]} | " + " | ".join(cells) + " |")
        served_table = (
            "Server execution time per statement of the pgbench script, triggers included (pg_stat_statements, "
            "`BEGIN`/`END` counted as statements; the median of the rounds, and the spread of the difference):\n\n"
            f"| workload | no capture | {ADDS} |\n|---|--:|{'--:|' * len(CAPTURED)}\n" + "\n".join(served_rows) + "\n\n"
            if stats
            else ""
        )
        pgv = subprocess.run(["pgbench", "--version"], capture_output=True, text=True).stdout.strip()
        section = (
            f"### change capture: statement-level vs row-level triggers — {time.strftime('%Y-%m-%d')}, "
            f"{os.cpu_count()} cores, {platform.python_version()}\n\n"
            f"`python scripts/bench_capture.py --scale {args.scale} --seconds {args.seconds} --rounds {args.rounds} "
            f"--clients {args.clients} --jobs {args.jobs}` ({pgv}, PostgreSQL {version}; seeding took {seeded:.1f} s; "
            f"{args.rounds} rounds of {args.seconds} s runs, the {len(VARIANTS)} variants back to back in each; capture on "
            "phase2a and phase3, as a phase start installs it; the change log grows during a run, as when nobody "
            f"syncs; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})\n\n"
            "| workload | no capture (tps, median) | "
            + " | ".join(f"{HEADS[v]} (tps) | ratio, median of the rounds (min–max)" for v in CAPTURED)
            + f" |\n|---|--:|{'--:|--:|' * len(CAPTURED)}\n"
            + "\n".join(rows)
            + "\n\n"
            + cpu_table
            + served_table
            + "The server's own cost per statement (a DO loop in one transaction, rolled back: no client, no network, no "
            "commit; its server process's on-CPU time; the best of the rounds):\n\n"
            f"| statement | no capture | {ADDS} |\n|---|--:|{'--:|' * len(CAPTURED)}\n" + "\n".join(costs) + "\n"
        )
        write_section(args.output, section)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        admin = await asyncpg.connect(db(args.server, "postgres"))
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
