"""``sync --follow`` trying again after a failed pass, attacked as an adversarial DBA would (a helper's attack): two
databases with a session killed between the target's commit and the source's, deferred and quarantined rows across
a rolled-back batch, errors that look transient but never clear, a lost session while capture is installed again,
and the paths that must not try again.  What failed before its fix: the batches a pass committed before its failure
went uncounted, and an error asyncpg itself raises (a value it cannot encode) was tried again 10 times."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest
from test_sync import WRITES, apply, deep, setup, waiting  # noqa: F401  (setup: the fixture)

from conftest import run, scalar, sql
from migrate_data import api, ledger
from migrate_data import sync as syncing
from migrate_data.errors import MigrationError

OURS_IDLE = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migrate-data' "
    "AND datname = current_database() AND state LIKE 'idle in transaction%'"
)


def _follow(settings_, names, patches, *, probe_url, until, calls, options=None, timeout=40.0):
    """Run api.sync(--follow) with ``patches`` [(owner, attr, make(real) -> fake)] in place; stop once ``until``
    (an async fn of a probe connection) is true after at least one patched call, or the follower ended."""

    async def scenario():
        stop = asyncio.Event()
        saved = [(o, a, getattr(o, a)) for o, a, _ in patches]
        for o, a, make in patches:
            setattr(o, a, make(getattr(o, a)))
        try:
            opts = options or syncing.SyncOptions(follow=True, interval=0.05)
            follower = asyncio.ensure_future(api.sync(settings_, names, opts, stop=stop))
            probe = await asyncpg.connect(probe_url)
            try:
                for _ in range(int(timeout / 0.05)):
                    await asyncio.sleep(0.05)
                    if follower.done() or (calls["n"] >= calls.get("min", 1) and await until(probe)):
                        break
                await asyncio.sleep(0.3)  # let a batch in flight finish
            finally:
                await probe.close()
            stop.set()
            return (await asyncio.gather(follower, return_exceptions=True))[0]
        finally:
            for o, a, real in saved:
                setattr(o, a, real)

    return asyncio.run(scenario())


def _empty(phase):
    async def until(probe):
        return not await probe.fetchval("SELECT count(*) FROM migrate_data.changes WHERE phase = $1", phase)

    return until


def _exact(settings, source, target, rejects=4):
    assert waiting(source, "phase2a") == 0
    assert deep(settings, "phase2a") == (True, [])
    assert scalar(target, "SELECT count(*) FROM migrate_data.rejects WHERE sqlstate = '22P02'") == rejects
    assert scalar(target, "SELECT count(*) FROM clientes") == scalar(source, "SELECT count(*) FROM customers") - rejects
    assert scalar(target, "SELECT count(*) FROM migrate_data.runs WHERE status = 'running'") == 0


# -- 1. two databases: a kill between the target's commit and the source's ----------------------------------------
@pytest.mark.parametrize("setup", ["two databases"], indirect=True)
@pytest.mark.parametrize("nth", [1, 3])
def test_source_session_killed_after_the_target_committed_then_follow_retries_exactly(setup, nth, caplog):  # noqa: F811
    settings, source, target, env = setup
    apply(settings, "phase2a")
    sql(source, WRITES)
    calls = {"n": 0}

    def make(real):
        async def keep_deferred(conn, phase, rows):
            calls["n"] += 1
            if calls["n"] == nth:  # the target committed; the log's source transaction is still open
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return await real(conn, phase, rows)

        return keep_deferred

    opts = syncing.SyncOptions(follow=True, interval=0.05, batch_size=50)
    with caplog.at_level(logging.WARNING, logger="migrate_data.sync"):
        out = _follow(
            settings,
            ["phase2a"],
            [(syncing, "keep_deferred", make)],
            probe_url=source,
            until=_empty("phase2a"),
            calls=calls,
            options=opts,
        )
    assert "stopped cleanly" in str(out), repr(out)
    assert any("trying again" in r.getMessage() for r in caplog.records)
    _exact(settings, source, target)
    assert scalar(target, OURS_IDLE) == 0 and scalar(source, OURS_IDLE) == 0


@pytest.mark.parametrize("setup", ["two databases"], indirect=True)
def test_target_session_killed_before_its_commit_while_the_source_holds_the_log_then_follow_retries_exactly(setup):  # noqa: F811
    settings, source, target, env = setup
    apply(settings, "phase2a")
    sql(source, WRITES)
    calls = {"n": 0}

    def make(real):
        async def mark_synced(conn, phase):
            calls["n"] += 1
            if calls["n"] == 2:  # the target's batch transaction: the server ends it before COMMIT
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return await real(conn, phase)

        return mark_synced

    opts = syncing.SyncOptions(follow=True, interval=0.05, batch_size=50)
    out = _follow(
        settings,
        ["phase2a"],
        [(ledger, "mark_synced", make)],
        probe_url=source,
        until=_empty("phase2a"),
        calls=calls,
        options=opts,
    )
    assert "stopped cleanly" in str(out), repr(out)
    _exact(settings, source, target)


@pytest.mark.parametrize("setup", ["two databases"], indirect=True)
def test_both_sessions_killed_at_once_mid_batch(setup):  # noqa: F811
    settings, source, target, env = setup
    apply(settings, "phase2a")
    sql(source, WRITES)
    calls = {"n": 0}

    def make(real):
        async def keep_deferred(conn, phase, rows):
            calls["n"] += 1
            if calls["n"] == 2:  # every pooled session but the lock's, on both sides
                for url in (source, target):
                    k = await asyncpg.connect(url)
                    await k.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'migrate-data' "
                        "AND datname = current_database() AND pid <> pg_backend_pid() AND query NOT ILIKE '%advisory%'"
                        " AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory')"
                    )
                    await k.close()
            return await real(conn, phase, rows)

        return keep_deferred

    opts = syncing.SyncOptions(follow=True, interval=0.05, batch_size=50)
    out = _follow(
        settings,
        ["phase2a"],
        [(syncing, "keep_deferred", make)],
        probe_url=source,
        until=_empty("phase2a"),
        calls=calls,
        options=opts,
    )
    assert "stopped cleanly" in str(out), repr(out)
    _exact(settings, source, target)


# -- the follower's count of what it applied ------------------------------------------------------------------------
def test_a_pass_that_loses_a_session_after_committed_batches_still_counts_them(applied_db, settings_for, caplog):
    url = applied_db("phase2a")
    settings = settings_for(url)
    sql(url, "UPDATE customers SET city = 'Puyo' WHERE phone_number LIKE '+59390000001_'")  # 10 changes
    calls = {"n": 0}

    def make(real):
        async def take(conn, phase, after, upto, limit):
            calls["n"] += 1
            if calls["n"] == 3:  # batches 1 and 2 (4 + 4 changes) committed; the third's session ends
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return await real(conn, phase, after, upto, limit)

        return take

    opts = syncing.SyncOptions(follow=True, interval=0.05, batch_size=4)
    with caplog.at_level(logging.INFO, logger="migrate_data.sync"):
        out = _follow(
            settings,
            ["phase2a"],
            [(syncing, "take", make)],
            probe_url=url,
            until=_empty("phase2a"),
            calls=calls,
            options=opts,
        )
    assert waiting(url, "phase2a") == 0
    assert scalar(url, "SELECT count(*) FROM clientes WHERE ciudad = 'Puyo'") == 10
    applied = sum(
        int(r.getMessage().split(": ")[1].split(" changes")[0])
        for r in caplog.records
        if "changes applied" in r.getMessage()
    )
    assert "after 10 changes" in str(out) and applied == 10, (str(out), caplog.text)


# -- 2. deferred deletes and quarantined rows across a rolled-back batch --------------------------------------------
def test_a_retry_while_a_delete_is_deferred_keeps_it_and_applies_it_once_its_children_go(applied_db, settings_for):
    url, twin = applied_db("phase3"), applied_db("phase3")
    settings = settings_for(url)
    customer = "(SELECT id FROM customers WHERE phone_number = '+593900000005')"  # it has service requests
    for u in (url, twin):
        sql(
            u,
            f"""DELETE FROM service_requests WHERE customer_id = {customer}; DELETE FROM customers WHERE id = {customer};
            UPDATE customers SET notes = '{{not json' WHERE phone_number = '+593900000007';
            UPDATE customers SET city = 'Puyo' WHERE phone_number LIKE '+59390000001_'""",
        )
    run(api.sync(settings_for(twin), ["phase2a", "phase2b", "phase3"]))  # a clean sync of the same writes
    calls = {"n": 0}

    def make(real):
        async def take(conn, phase, after, upto, limit):
            calls["n"] += 1
            if calls["n"] in (2, 4, 7):  # several batches roll back, some after a deferral was decided
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return await real(conn, phase, after, upto, limit)

        return take

    async def until(probe):
        return not await probe.fetchval("SELECT count(*) FROM migrate_data.changes")

    calls["min"] = 8
    opts = syncing.SyncOptions(follow=True, interval=0.05, batch_size=3)
    out = _follow(
        settings,
        ["phase2a", "phase2b", "phase3"],
        [(syncing, "take", make)],
        probe_url=url,
        until=until,
        calls=calls,
        options=opts,
    )
    assert "stopped cleanly" in str(out), repr(out)
    assert scalar(url, "SELECT count(*) FROM migrate_data.changes") == 0
    for p in ("phase2a", "phase2b", "phase3"):
        assert deep(settings, p) == (True, []), p
    assert scalar(url, "SELECT count(*) FROM clientes WHERE telefono = '+593900000005'") == 0
    rejects = sql(url, "SELECT phase, target, source_key, sqlstate FROM migrate_data.rejects ORDER BY 1, 2, 3")
    assert [tuple(r) for r in rejects] == [
        tuple(r)
        for r in sql(twin, "SELECT phase, target, source_key, sqlstate FROM migrate_data.rejects ORDER BY 1, 2, 3")
    ]
    for t in ("clientes", "solicitudes_servicio"):
        assert scalar(url, f"SELECT count(*) FROM {t}") == scalar(twin, f"SELECT count(*) FROM {t}"), t


def test_deferred_state_after_a_rolled_back_batch_in_two_databases_keeps_the_delete(
    legacy_template, make_db, applied_db, settings_for
):
    source, target = make_db(template=legacy_template), applied_db("phase1", seeded=False)
    settings = settings_for(target).with_(source_url=source)
    apply(settings, "phase2a", "phase2b", "phase3")
    customer = "(SELECT id FROM customers WHERE phone_number = '+593900000005')"
    sql(
        source,
        f"DELETE FROM service_requests WHERE customer_id = {customer}; DELETE FROM customers WHERE id = {customer}",
    )
    run(api.sync(settings, ["phase2a"]))  # the delete waits for phase3
    assert waiting(source, "phase2a") == 1
    calls = {"n": 0}

    def make(real):
        async def keep_deferred(conn, phase, rows):
            calls["n"] += 1
            if rows and calls["n"] <= 2:  # the put-back of the deferred delete dies after the target committed
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return await real(conn, phase, rows)

        return keep_deferred

    opts = syncing.SyncOptions(follow=True, interval=0.05, batch_size=5)
    calls["min"] = 3
    out = _follow(
        settings,
        ["phase2a"],
        [(syncing, "keep_deferred", make)],
        probe_url=source,
        until=lambda p: _true(),
        calls=calls,
        options=opts,
    )
    assert "stopped cleanly" in str(out), repr(out)
    assert waiting(source, "phase2a") == 1  # still kept, exactly once
    assert scalar(target, "SELECT count(*) FROM clientes WHERE telefono = '+593900000005'") == 1
    res = run(api.sync(settings, ["phase2a", "phase3"]))
    assert [p.waiting for p in res.phases] == [0, 0]
    assert scalar(target, "SELECT count(*) FROM clientes WHERE telefono = '+593900000005'") == 0
    assert deep(settings, "phase2a") == (True, []) and deep(settings, "phase3") == (True, [])


async def _true():
    return True


# -- 3. "transient" errors that never go away ------------------------------------------------------------------------
def test_a_lock_timeout_on_every_pass_gives_up_after_follow_retries_with_nothing_half_done(
    applied_db, settings_for, monkeypatch
):
    url = applied_db("phase2a")
    settings = settings_for(url)
    sql(url, "UPDATE customers SET city = 'Puyo' WHERE phone_number LIKE '+59390000001_'")
    monkeypatch.setattr(syncing, "FOLLOW_RETRIES", 3)
    calls = {"n": 0}

    async def scenario():
        holder = await asyncpg.connect(url)
        tr = holder.transaction()
        await tr.start()
        await holder.execute("LOCK TABLE clientes IN ACCESS EXCLUSIVE MODE")  # a DBA's long maintenance
        real = syncing.take

        async def take(conn, phase, after, upto, limit):
            calls["n"] += 1
            await conn.execute("SET LOCAL lock_timeout = '50ms'")
            return await real(conn, phase, after, upto, limit)

        syncing.take = take
        try:
            opts = syncing.SyncOptions(follow=True, interval=0.02)
            try:
                return await asyncio.wait_for(api.sync(settings, ["phase2a"], opts, stop=asyncio.Event()), 120)
            except Exception as e:  # noqa: BLE001
                return e
        finally:
            syncing.take = real
            await tr.rollback()
            await holder.close()

    out = asyncio.run(scenario())
    assert isinstance(out, MigrationError), repr(out)
    assert "lock" in str(out).lower() or "55P03" in repr(out), repr(out)
    assert calls["n"] == 4  # the first try and FOLLOW_RETRIES more
    assert waiting(url, "phase2a") == 10
    assert scalar(url, "SELECT count(*) FROM clientes WHERE ciudad = 'Puyo'") == 0
    assert scalar(url, "SELECT count(*) FROM migrate_data.runs WHERE status = 'running'") == 0
    assert scalar(url, OURS_IDLE) == 0
    assert (
        scalar(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migrate-data' AND datname = current_database()",
        )
        == 0
    )


def test_a_deadlock_every_time_gives_up(applied_db, settings_for, monkeypatch):
    url = applied_db("phase2a")
    settings = settings_for(url)
    sql(url, "UPDATE customers SET city = 'Puyo' WHERE phone_number LIKE '+59390000001_'")
    monkeypatch.setattr(syncing, "FOLLOW_RETRIES", 2)
    calls = {"n": 0}

    def make(real):
        async def take(conn, phase, after, upto, limit):
            calls["n"] += 1
            rows = await real(conn, phase, after, upto, limit)  # taken in the transaction, then the deadlock
            await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END $$")
            return rows

        return take

    async def never(probe):
        return False

    out = _follow(settings, ["phase2a"], [(syncing, "take", make)], probe_url=url, until=never, calls=calls)
    assert isinstance(out, MigrationError) and "deadlock" in str(out), repr(out)
    assert calls["n"] == 3
    assert waiting(url, "phase2a") == 10
    assert scalar(url, "SELECT status FROM migrate_data.runs WHERE kind = 'sync' ORDER BY id DESC LIMIT 1") == "failed"
    assert scalar(url, OURS_IDLE) == 0


# -- 4. a lost session during the periodic recheck (prepare) --------------------------------------------------------
def test_a_lost_session_while_capture_is_installed_again_is_retried_and_nothing_is_missed(
    applied_db, settings_for, caplog
):
    url = applied_db("phase2a")
    settings = settings_for(url)
    from migrate_data import capture

    calls = {"n": 0, "min": 1}

    def make(real):
        async def install(db, phase, tables, **kw):
            calls["n"] += 1
            if calls["n"] == 1 and kw.get("only"):
                async with db.acquire() as conn:  # the recheck's session ends mid-install
                    await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
                raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")
            return await real(db, phase, tables, **kw)

        return install

    async def scenario():
        stop = asyncio.Event()
        real = capture.install
        capture.install = make(real)
        try:
            opts = syncing.SyncOptions(follow=True, interval=0.05, recheck_every=0.2)
            follower = asyncio.ensure_future(api.sync(settings, ["phase2a"], opts, stop=stop))
            await asyncio.sleep(1.0)
            probe = await asyncpg.connect(url)
            # a DBA's DDL: the column moves; the rewrite fires no trigger, and writes go on meanwhile
            await probe.execute(
                "ALTER TABLE customers ALTER COLUMN city TYPE varchar(200); "
                "UPDATE customers SET city = 'Tena' WHERE phone_number LIKE '+59390000002_'"
            )
            for _ in range(300):
                await asyncio.sleep(0.05)
                if follower.done() or (
                    calls["n"] >= 2 and not await probe.fetchval("SELECT count(*) FROM migrate_data.changes")
                ):
                    break
            await asyncio.sleep(0.5)
            await probe.execute("UPDATE customers SET city = 'Macas' WHERE phone_number LIKE '+59390000003_'")
            for _ in range(200):
                await asyncio.sleep(0.05)
                if follower.done() or not await probe.fetchval("SELECT count(*) FROM migrate_data.changes"):
                    break
            await probe.close()
            stop.set()
            return (await asyncio.gather(follower, return_exceptions=True))[0]
        finally:
            capture.install = real

    with caplog.at_level(logging.WARNING, logger="migrate_data"):
        out = asyncio.run(scenario())
    assert "stopped cleanly" in str(out), (repr(out), caplog.text)
    assert calls["n"] >= 2, caplog.text
    assert scalar(url, "SELECT count(*) FROM clientes WHERE ciudad = 'Tena'") == 10
    assert scalar(url, "SELECT count(*) FROM clientes WHERE ciudad = 'Macas'") == 10
    assert deep(settings, "phase2a") == (True, [])
    trig = scalar(url, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'md_capture_%' AND tgenabled = 'A'")
    assert trig == 8


# -- 5. without --follow, and the cutover's catch-up: no retry -------------------------------------------------------
def _terminate_first(calls):
    def make(real):
        async def take(conn, phase, after, upto, limit):
            calls["n"] += 1
            if calls["n"] == 1:
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return await real(conn, phase, after, upto, limit)

        return take

    return make


def test_sync_without_follow_does_not_retry(applied_db, settings_for, monkeypatch):
    url = applied_db("phase2a")
    settings = settings_for(url)
    sql(url, "UPDATE customers SET city = 'Puyo' WHERE phone_number LIKE '+59390000001_'")
    calls = {"n": 0}
    monkeypatch.setattr(syncing, "take", _terminate_first(calls)(syncing.take))
    with pytest.raises(MigrationError, match="lost the connection"):
        run(api.sync(settings, ["phase2a"]))
    assert calls["n"] == 1 and waiting(url, "phase2a") == 10
    assert scalar(url, "SELECT count(*) FROM migrate_data.runs WHERE status = 'running'") == 0


def test_cutover_catch_up_does_not_retry_and_blocks_nothing(applied_db, settings_for, monkeypatch):
    url = applied_db("phase2a")
    settings = settings_for(url)
    sql(url, "UPDATE customers SET city = 'Puyo' WHERE phone_number LIKE '+59390000001_'")
    calls = {"n": 0}
    monkeypatch.setattr(syncing, "take", _terminate_first(calls)(syncing.take))
    with pytest.raises(MigrationError, match="lost the connection"):
        run(api.cutover(settings, ["phase2a"]))
    assert calls["n"] == 1 and waiting(url, "phase2a") == 10
    assert scalar(url, "SELECT count(*) FROM migrate_data.runs WHERE status = 'running'") == 0
    assert scalar(url, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'md_capture_%'") == 8
    sql(url, "UPDATE customers SET city = 'Tena' WHERE phone_number = '+593900000001'")  # writes not blocked


def test_a_client_side_error_that_can_never_succeed_is_not_retried_as_a_lost_session(
    applied_db, settings_for, monkeypatch, caplog
):
    url = applied_db("phase2a")
    settings = settings_for(url)
    sql(url, "UPDATE customers SET city = 'Puyo' WHERE phone_number LIKE '+59390000001_'")
    monkeypatch.setattr(syncing, "FOLLOW_RETRIES", 3)
    calls = {"n": 0}

    def make(real):
        async def take(conn, phase, after, upto, limit):
            calls["n"] += 1  # what asyncpg raises when a value cannot be encoded: the same every time
            raise asyncpg.exceptions._base.DataError("invalid input for query argument $1: 'x' (expected int)")

        return take

    async def never(probe):
        return False

    with caplog.at_level(logging.WARNING, logger="migrate_data.sync"):
        out = _follow(settings, ["phase2a"], [(syncing, "take", make)], probe_url=url, until=never, calls=calls)
    assert not any("trying again" in r.getMessage() for r in caplog.records), caplog.text
    assert calls["n"] == 1, (calls, repr(out))
