"""Sync installing capture again (COLUMN MOVED) and the cutover's catch-up before the block, attacked as an
adversarial DBA would: a busy table, kill -9 inside the repair, a signal during the catch-up, a row taken out by it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import asyncpg
import pytest
from test_guard_attack import LOOKUP, LOOKUP_MAPPING
from test_keys_attack import ITEMS, ITEMS_MAPPING, _logged, _status
from test_sync import deep
from test_sync_attack import _night

from conftest import ROOT, run, scalar, sql
from killer import kill_at
from migrate_data import api
from migrate_data.errors import MigrationError
from migrate_data.sync import SyncOptions

BOTH_MOVED = "ALTER TABLE countries ALTER COLUMN name TYPE varchar(40); ALTER TABLE shops ALTER COLUMN id TYPE bigint"


def _proj(s) -> list[str]:
    return ["--project", str(s.project_dir)]


# -- 1. a repair waiting for a busy table holds no other table's lock (nor the log's) -------------------------------
@pytest.mark.parametrize("held", ["shops", "countries"])
def test_a_repair_waiting_for_one_busy_table_does_not_block_the_other_tables_readers_and_writers(
    db_url, tmp_path, held
):
    """Both tables are captured again, each in a transaction of its own: before, the first stayed locked while the
    second's lock was retried (about 14 s), and ensure_capture's CREATE INDEX IF NOT EXISTS held a SHARE lock on the
    change log, so that every captured write of every table waited too."""
    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    sql(db_url, BOTH_MOVED)
    assert _status(s) == "COLUMN MOVED"
    other = {"shops": "countries", "countries": "shops"}[held]
    seen: dict[str, object] = {}

    async def scenario() -> None:
        holder = await asyncpg.connect(db_url)
        await holder.execute("BEGIN")
        await holder.execute(f"LOCK TABLE {held} IN ROW EXCLUSIVE MODE")  # an app transaction that wrote `held`
        task = asyncio.ensure_future(api.sync(s, ["night"]))
        await asyncio.sleep(3.0)  # the repair is retrying on `held`
        seen["locks"] = [
            (r[0], r[1])
            for r in await holder.fetch(
                "SELECT relation::regclass::text, mode FROM pg_locks WHERE granted AND relation::regclass::text IN "
                "('shops', 'countries') AND pid <> pg_backend_pid() ORDER BY 1, 2"
            )
        ]
        probe = await asyncpg.connect(db_url)
        await probe.execute("SET lock_timeout = '3s'")
        t0 = time.monotonic()
        try:
            await probe.fetchval(f"SELECT count(*) FROM {other}")
            await probe.execute(
                f"UPDATE {other} SET {'v' if other == 'shops' else 'name'} = {'v' if other == 'shops' else 'name'} WHERE false"
            )
            seen["probe"] = "ok"
        except asyncpg.LockNotAvailableError:
            seen["probe"] = f"blocked > {time.monotonic() - t0:.1f}s"
        await probe.close()
        await holder.execute("ROLLBACK")  # the application's transaction ends: the repair's next try goes through
        await holder.close()
        try:
            await task
            seen["sync"] = "ok"
        except MigrationError as e:
            seen["sync"] = str(e)[:80]

    run(scenario())
    assert seen["probe"] == "ok", seen
    assert seen["sync"] == "ok", seen
    assert _status(s) == "on"


# -- 2. a repair that keeps failing leaves nothing behind (no re-derive row per attempt) -----------------------------
def test_a_repair_that_keeps_failing_leaves_the_log_and_the_registry_as_they_were(db_url, tmp_path):
    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    sql(db_url, "ALTER TABLE countries ALTER COLUMN name TYPE varchar(40) USING upper(name)")
    before = _logged(db_url)

    async def scenario() -> list[str]:
        holder = await asyncpg.connect(db_url)
        await holder.execute("BEGIN")
        await holder.execute("LOCK TABLE countries IN ROW EXCLUSIVE MODE")
        out = []
        for _ in range(2):
            try:
                await api.sync(s, ["night"], SyncOptions(lock_wait="100ms", retries=1))
                out.append("ok")
            except MigrationError as e:
                out.append(str(e)[:60])
        await holder.execute("ROLLBACK")
        await holder.close()
        return out

    outcomes = run(scenario())
    assert all("could not" in o for o in outcomes), outcomes
    assert _logged(db_url) == before
    assert _status(s) == "COLUMN MOVED"
    run(api.sync(s, ["night"]))  # once the table is free, the same command finishes
    assert scalar(db_url, "SELECT pais FROM tiendas WHERE id = 2") == "SPAIN"
    assert deep(s, "night")[0]


# -- 3. kill -9 inside the repair, then the same sync --------------------------------------------------------------
@pytest.mark.parametrize(
    "at",
    [
        "migrate_data.capture:install:enter",
        "migrate_data.capture:_record:return",
        "migrate_data.capture:install:return",
        "migrate_data.sync:PhaseSyncer._capture_again:return",
    ],
)
def test_a_sync_killed_inside_the_repair_is_finished_exactly_by_the_same_sync(db_url, tmp_path, at):
    s = _night(db_url, tmp_path, LOOKUP, LOOKUP_MAPPING)
    sql(db_url, "ALTER TABLE countries ALTER COLUMN name TYPE varchar(40) USING upper(name)")
    sql(db_url, "UPDATE shops SET v = 'after-move' WHERE id = 3")
    killed = kill_at(at, *_proj(s), "sync", "night", url=db_url, cwd=ROOT)
    assert killed.returncode == -9, killed.stderr[-2000:]
    sql(db_url, "UPDATE countries SET name = 'FRANCIA' WHERE code = 'fr'")  # a write after the kill
    again = subprocess.run(
        [sys.executable, "-m", "migrate_data", *_proj(s), "sync", "night"],
        env={**os.environ, "DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert _status(s) == "on"
    assert scalar(db_url, "SELECT pais FROM tiendas WHERE id = 2") == "SPAIN"
    assert scalar(db_url, "SELECT pais FROM tiendas WHERE id = 1") == "FRANCIA"
    assert scalar(db_url, "SELECT v FROM tiendas WHERE id = 3") == "after-move"
    assert deep(s, "night") == (True, [])


# -- 4. SIGINT / SIGTERM during the catch-up ------------------------------------------------------------------------
DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from migrate_data import live
    orig = live._catch_up
    async def hooked(*a, **k):
        os.kill(os.getpid(), signal.{sig})   # the operator's Ctrl-C / the service manager's stop, during the catch-up
        return await orig(*a, **k)
    live._catch_up = hooked
    from migrate_data.cli import main
    main(sys.argv[1:])
    """
)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_cutover_catch_up_stops_it_before_writes_are_blocked(db_url, tmp_path, sig):
    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)
    sql(db_url, "UPDATE items SET v = v || '!'")
    p = subprocess.run(
        [sys.executable, "-c", DRIVER.format(sig=sig), *_proj(s), "cutover", "night", "--yes"],
        env={**os.environ, "DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    cut = scalar(db_url, "SELECT cut_over_at IS NOT NULL FROM migrate_data.phases WHERE phase = 'night'")
    # asked to stop before anything irreversible: exit 130 (as sync does), not cut over, same command finishes later
    assert (p.returncode, cut) == (130, False), (p.returncode, cut, p.stdout[-500:], p.stderr[-500:])


# -- 5. a row the catch-up took out of the target must still fail the cutover ---------------------------------------
def test_a_row_taken_out_by_the_catch_up_fails_the_cutover(db_url, tmp_path):
    s = _night(db_url, tmp_path, ITEMS, ITEMS_MAPPING)
    sql(db_url, "ALTER TABLE articulos ADD CONSTRAINT no_bad CHECK (v <> 'bad')")
    sql(db_url, "UPDATE items SET v = 'bad' WHERE id = 5")
    seen: dict[str, int] = {}

    async def while_blocked() -> None:
        conn = await asyncpg.connect(db_url)
        seen["logged"] = await conn.fetchval("SELECT count(*) FROM migrate_data.changes WHERE phase = 'night'")
        await conn.close()

    result = run(api.cutover(s, ["night"], on_blocked=while_blocked))
    assert seen["logged"] == 0  # the catch-up applied it, before the block
    assert not result.ok and any("took row (5)" in p for p in result.problems), result.problems
    assert scalar(db_url, "SELECT cut_over_at IS NULL FROM migrate_data.phases WHERE phase = 'night'")
