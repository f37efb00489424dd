"""``sync --follow`` runs for days: what a lost session does to it.  A batch whose session the server ends (a DBA's
pg_terminate_backend, idle_session_timeout, the network) rolls back, and the follower tries again and goes on, up to
``FOLLOW_RETRIES`` passes in a row; a follower that loses its lock (a restart, a failover end every session) stops
with the lock's own error (the same command resumes), never with a driver's internal error from a connection that
died under it (each failed before its fix)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from test_sync import waiting

from conftest import run, scalar, sql
from migrate_data import api
from migrate_data import sync as syncing
from migrate_data.errors import LockLost

WAITING = "SELECT count(*) FROM migrate_data.changes WHERE phase = $1"
CHANGE = "UPDATE customers SET city = 'Puyo' WHERE phone_number LIKE '+59390000001_'"


def _follow(settings_, hook, *, until_empty: str) -> asyncio.Future:
    """Run ``api.sync(--follow)`` with ``hook(conn, lock_pid, call)`` run on each batch's connection when it takes
    its log rows; stop once the log of ``until_empty`` is empty after a batch.  Returns the sync's outcome (result or
    exception)."""
    real = syncing.take
    calls = {"n": 0}

    async def scenario():
        stop = asyncio.Event()
        follower = None

        async def take(conn, phase, after, upto, limit):
            calls["n"] += 1
            await hook(conn, calls["n"])
            return await real(conn, phase, after, upto, limit)

        syncing.take = take
        try:
            options = syncing.SyncOptions(follow=True, interval=0.05)
            follower = asyncio.ensure_future(api.sync(settings_, ["phase2a"], options, stop=stop))
            probe = await asyncpg.connect(settings_.database_url)
            try:
                for _ in range(400):
                    await asyncio.sleep(0.05)
                    left = await probe.fetchval(WAITING, until_empty)
                    if follower.done() or (calls["n"] > 2 and not left):
                        break
            finally:
                await probe.close()
            stop.set()
            return await asyncio.gather(follower, return_exceptions=True)
        finally:
            syncing.take = real

    return asyncio.run(scenario())[0]


def test_sync_follow_goes_on_after_the_server_ends_a_batchs_session(applied_db, settings_for, caplog):
    url = applied_db("phase2a")
    settings_ = settings_for(url)
    sql(url, CHANGE)

    async def terminate_first(conn, n):
        if n == 1:  # the server ends the session of the first batch, in its transaction
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with caplog.at_level(logging.WARNING, logger="migrate_data.sync"):
        outcome = _follow(settings_, terminate_first, until_empty="phase2a")
    assert "stopped cleanly" in str(outcome), outcome  # stopped by us, not by the lost session
    assert waiting(url, "phase2a") == 0
    assert scalar(url, "SELECT count(*) FROM clientes WHERE ciudad = 'Puyo'") == 10
    assert any("trying again" in r.getMessage() for r in caplog.records), caplog.text


def test_sync_follow_that_loses_its_lock_stops_with_the_locks_error(applied_db, settings_for):
    url = applied_db("phase2a")
    settings_ = settings_for(url)
    sql(url, CHANGE)

    async def terminate_all(conn, n):
        if n == 1:  # every session of ours ends: the lock's and the batch's
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'migrate-data' "
                "AND datname = current_database() AND pid <> pg_backend_pid()"
            )
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    outcome = _follow(settings_, terminate_all, until_empty="phase2a")
    assert isinstance(outcome, LockLost), repr(outcome)
    # nothing was applied without the lock; the same command resumes
    result = run(api.sync(settings_, ["phase2a"]))
    assert result.phases[0].waiting == 0
    assert scalar(url, "SELECT count(*) FROM clientes WHERE ciudad = 'Puyo'") == 10


def test_a_follower_whose_batches_keep_losing_their_session_gives_up_with_a_clear_error(
    applied_db, settings_for, monkeypatch
):
    url = applied_db("phase2a")
    settings_ = settings_for(url)
    sql(url, CHANGE)

    async def terminate_always(conn, n):
        await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    monkeypatch.setattr(syncing, "FOLLOW_RETRIES", 2)
    outcome = _follow(settings_, terminate_always, until_empty="nothing")
    assert "lost the connection to the database" in str(outcome), repr(outcome)
    assert waiting(url, "phase2a") == 10  # nothing taken: every batch rolled back
