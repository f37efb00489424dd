"""One run at a time, really: the advisory lock is checked by every batch, watched, and protected from timeouts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest

from conftest import run, run_cli, scalar, sql
from migrate_data import api, db, ledger
from migrate_data.errors import LockHeld, LockLost
from test_copier import BIG, BIG_MAPPING

THIS_DB = "database = (SELECT oid FROM pg_database WHERE datname = current_database())"
LOCK_PID = (
    f"SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND {THIS_DB} "
    "AND classid = ($1::bigint >> 32)::oid AND objid = ($1::bigint & 4294967295)::oid"
)


def project(tmp_path: Path) -> Path:
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "mappings" / "night.yaml").write_text(textwrap.dedent(BIG_MAPPING))
    return tmp_path


def start_night(url: str, proj: Path, batch_size: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "migrate_data", "night", "--yes", "--no-backup", "--batch-size", str(batch_size)]
        + ["--jobs", "1"],
        cwd=proj,
        env=dict(os.environ, DATABASE_URL=url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_rows(url: str, proc: subprocess.Popen, minimum: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if scalar(url, "SELECT COALESCE(sum(rows_read), 0) FROM migrate_data.checkpoints") >= minimum:
                return
        except asyncpg.UndefinedTableError:
            pass
        time.sleep(0.02)
    raise AssertionError("no progress")


def lock_pid(url: str) -> int | None:
    return scalar(url, LOCK_PID, ledger.LOCK_KEY)


async def terminate(url: str, pid: int):
    """End backend ``pid`` and wait until it is gone; return the server's clock just after."""
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
        return await conn.fetchval("SELECT clock_timestamp()")
    finally:
        await conn.close()


SLOW_INSERTS = """
CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$;
CREATE TRIGGER slow BEFORE INSERT ON grande FOR EACH ROW EXECUTE FUNCTION slow();
"""


def test_lock_lost_mid_copy_stops_at_the_last_checkpoint_and_the_same_command_resumes(db_url, tmp_path):
    sql(db_url, BIG + SLOW_INSERTS)  # a batch of 50 rows takes 0.5 s: the lock dies in the middle of one
    proj = project(tmp_path)
    proc = start_night(db_url, proj, batch_size=50)
    wait_for_rows(db_url, proc, 50)
    died_at = run(terminate(db_url, lock_pid(db_url)))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "ERROR: lost the migrate-data lock on this database during phase night" in err
    assert "run the same command again" in err
    copied = scalar(db_url, "SELECT count(*) FROM grande")
    assert 50 <= copied < 20000
    assert scalar(db_url, "SELECT sum(rows_read) FROM migrate_data.checkpoints") == copied
    # no batch committed once the lock was gone: the batch in flight then wrote its checkpoint after that instant
    # (its inserts are slow, its checkpoint comes after them) and rolled back at its lock check
    assert scalar(db_url, "SELECT max(updated_at) FROM migrate_data.checkpoints") < died_at
    assert scalar(db_url, "SELECT status FROM migrate_data.runs ORDER BY id DESC LIMIT 1") == "failed"
    sql(db_url, "DROP TRIGGER slow ON grande")
    again = run_cli("night", "--yes", "--no-backup", url=db_url, cwd=proj)
    assert again.returncode == 0, again.stderr
    assert scalar(db_url, "SELECT count(*) FROM big b JOIN grande g ON g.id = b.id AND g.valor = upper(b.v)") == 20000
    assert scalar(db_url, "SELECT count(*) FROM grande") == 20000
    assert scalar(db_url, "SELECT sum(rows_read) FROM migrate_data.checkpoints") == 20000


def test_idle_session_timeout_does_not_end_the_lock_session(db_url):
    """The database ends every session idle for 300 ms; the lock's session sits idle for 1.5 s and keeps the lock.

    (The pooled sessions: test_pooled_sessions_keep_their_timeouts_off_after_being_returned_to_the_pool.)"""
    sql(db_url, SETUP)
    sql(
        db_url,
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET idle_session_timeout = 300', current_database()); END $$;",
    )

    async def scenario() -> None:
        async with await _pool(db_url) as pool, ledger.exclusive(pool, url=db_url, what="x") as lock:
            await asyncio.sleep(1.5)
            assert not lock.lost.is_set() and not lock.is_closed()
            batch = await asyncpg.connect(db_url)
            try:
                async with batch.transaction():
                    await batch.execute("INSERT INTO t VALUES (1)")
                    await lock.check(batch)
                assert await batch.fetchval(LOCK_PID, ledger.LOCK_KEY) == lock.pid
            finally:
                await batch.close()

    run(scenario())
    assert scalar(db_url, "SELECT count(*) FROM t") == 1


def test_the_holder_named_is_the_one_on_this_database(make_db, settings_for):
    """Two databases on one server, each locked by its own holder: each refusal names its own database's."""
    urls = [make_db(), make_db()]

    async def hold(url: str, phase: str) -> asyncpg.Connection:
        conn = await asyncpg.connect(url)
        await ledger.ensure(conn)
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", ledger.LOCK_KEY)
        await ledger.start_run(conn, kind="run", phase=phase)
        return conn

    async def scenario() -> list[tuple[int, LockHeld]]:
        holders = [await hold(urls[0], "phase2a"), await hold(urls[1], "phase3")]
        try:
            refusals = []
            for url, holder in zip(urls, holders, strict=True):
                with pytest.raises(LockHeld) as e:
                    await api.run_phase(settings_for(url), "phase1", api.RunOptions(backup=False))
                refusals.append((holder.get_server_pid(), e.value))
            return refusals
        finally:
            for h in holders:
                await h.close()

    (pid_a, a), (pid_b, b) = run(scenario())
    assert "held by run phase2a of user postgres from" in a.detail and f"(backend pid {pid_a})" in a.detail
    assert "held by run phase3 of user postgres from" in b.detail and f"(backend pid {pid_b})" in b.detail


# -- the API a batched writer (the copier, rollback's deletes) uses ------------------------------------------------
SETUP = "CREATE TABLE t (id int PRIMARY KEY)"


async def _pool(url: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(url, min_size=1, max_size=4)


def test_a_batch_cannot_commit_once_the_lock_session_is_gone(db_url):
    sql(db_url, SETUP)

    async def scenario():
        async with await _pool(db_url) as pool, ledger.exclusive(pool, url=db_url, what="rollback of p") as lock:
            stop = asyncio.Event()
            lock.watch(stop)
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO t VALUES (1)")
                await lock.check(conn)
            await terminate(db_url, lock.pid)
            await asyncio.wait_for(stop.wait(), 1)  # noticed at once: the session closed
            with pytest.raises(LockLost) as e:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("INSERT INTO t VALUES (2)")
                    await lock.check(conn)
            with pytest.raises(LockLost):
                lock.raise_if_lost()
            return e.value

    err = run(scenario())
    assert (
        err.message
        == "lost the migrate-data lock on this database during rollback of p; stopped at the last checkpoint"
    )
    assert err.hint == "run the same command again: it resumes after the last committed batch"
    assert [r["id"] for r in sql(db_url, "SELECT id FROM t")] == [1]


def test_watchdog_notices_a_lock_no_longer_held_by_an_open_session(db_url):
    async def scenario() -> float:
        async with await _pool(db_url) as pool:
            async with ledger.exclusive(pool, url=db_url, what="x", watch_every=0.2) as lock:
                stop = asyncio.Event()
                lock.watch(stop)
                await asyncio.sleep(0.5)
                assert not stop.is_set()
                await lock.execute("SELECT pg_advisory_unlock($1)", ledger.LOCK_KEY)  # the session lives on
                started = time.monotonic()
                await asyncio.wait_for(stop.wait(), 3)
                assert not lock.is_closed() and lock.lost.is_set()
                return time.monotonic() - started

    assert run(scenario()) < 1


def test_a_new_holder_waits_for_a_batch_that_passed_its_check_to_commit(db_url):
    """The check runs just before COMMIT; a batch between its check and its commit when the lock dies still commits,
    so the next holder must start only after it, or it would read a checkpoint that is about to move."""
    sql(db_url, SETUP)

    async def scenario() -> None:
        async with await _pool(db_url) as pool:
            batch = await asyncpg.connect(db_url)
            second = None
            try:
                async with ledger.exclusive(pool, url=db_url, what="first") as lock:
                    tr = batch.transaction()
                    await tr.start()
                    await batch.execute("INSERT INTO t VALUES (1)")
                    await lock.check(batch)  # passed: this batch will commit
                    await terminate(db_url, lock.pid)
                entered = asyncio.Event()

                async def start_second() -> int:
                    async with ledger.exclusive(pool, url=db_url, what="second"):
                        entered.set()
                        return await pool.fetchval("SELECT count(*) FROM t")

                second = asyncio.create_task(start_second())
                await asyncio.sleep(0.5)
                assert not entered.is_set(), "the next holder started while a checked batch was still open"
                await tr.commit()
                assert await asyncio.wait_for(second, 5) == 1  # and it sees that batch
            finally:
                await batch.close()
                if second is not None:
                    await asyncio.gather(second, return_exceptions=True)

    run(scenario())


def test_a_check_waiting_behind_a_new_holder_sees_the_lock_as_it_is_after_the_wait(db_url):
    """A check blocked on the fence (a next holder is starting) must look at pg_locks only once it has the fence."""
    sql(db_url, SETUP)

    async def scenario() -> None:
        async with await _pool(db_url) as pool, ledger.exclusive(pool, url=db_url, what="x") as lock:
            newcomer = await asyncpg.connect(db_url)
            batch = await asyncpg.connect(db_url)
            try:
                fence = newcomer.transaction()
                await fence.start()
                await newcomer.execute("SELECT pg_advisory_xact_lock($1)", ledger.FENCE_KEY)
                tr = batch.transaction()
                await tr.start()
                await batch.execute("INSERT INTO t VALUES (1)")
                check = asyncio.create_task(lock.check(batch))
                await asyncio.sleep(0.3)
                assert not check.done()
                await terminate(db_url, lock.pid)
                await fence.commit()
                with pytest.raises(LockLost):
                    await asyncio.wait_for(check, 5)
            finally:
                await newcomer.close()
                await batch.close()

    run(scenario())
    assert scalar(db_url, "SELECT count(*) FROM t") == 0


def test_pooled_sessions_keep_their_timeouts_off_after_being_returned_to_the_pool(db_url):
    """The database ends sessions idle (in a transaction) for 5 min; the pool's reset (RESET ALL) on every release
    would put that back on a session of ours, which then dies under a long batch of another table."""
    sql(
        db_url,
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET idle_in_transaction_session_timeout = ''5min''', "
        "current_database()); END $$;",
    )

    async def scenario() -> list[str]:
        seen = []
        async with db.open_pool(db_url, max_size=1) as pool:
            for _ in range(3):  # the same connection each time: acquired, released (reset), acquired again
                async with pool.acquire() as conn:
                    seen.append(await conn.fetchval("SELECT current_setting('idle_in_transaction_session_timeout')"))
        return seen

    assert run(scenario()) == ["0", "0", "0"]
