"""A phase run's and a rollback's --lock-wait/--retries (the patience of installing and removing change capture),
attacked as an adversarial DBA would, in one database and two: out of tries, or killed at the short-lock DDL, the
same command finishes equal to a clean run; and what failed before its fix: a start whose Alembic transaction waited
longer than the database's idle_in_transaction_session_timeout (an internal error, and, across two databases, a stray
capture), a --lock-wait of one table capped as for several, a --retries so large its back-off overflowed."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_guard_attack import LOOKUP, LOOKUP_MAPPING
from test_partitions import settings
from test_patience_attack import _holding, _leftovers, _proj
from test_removal_attack import TIENDAS, _captured, _phase
from test_schemas import revision_project

from conftest import ROOT, run_cli, scalar, sql
from killer import kill_at
from test_orchestration import snapshot

REVISION = """
from alembic import op

revision = "r1"
down_revision = None


def upgrade():
    op.execute("CREATE TABLE tiendas (id int PRIMARY KEY, pais text, v text)")
    op.execute("CREATE TABLE r1_marker (x int)")


def downgrade():
    op.execute("DROP TABLE r1_marker")
    op.execute("DROP TABLE tiendas")
"""
WHERE = ["one database", "two databases"]


def _pair(make_db, tmp_path, where: str, name: str):
    """(settings, source, target, env): LOOKUP's sources, `night` with an Alembic revision r1 that creates tiendas;
    nothing run yet."""
    (tmp_path / name).mkdir()
    proj = revision_project(tmp_path / name, REVISION, LOOKUP_MAPPING)
    if where == "one database":
        source = target = make_db()
        s, env = settings(target, proj), {}
    else:
        source, target = make_db(), make_db()
        s, env = settings(target, proj).with_(source_url=source), {"SOURCE_DATABASE_URL": source}
    sql(source, LOOKUP.replace(TIENDAS, ""))
    return s, source, target, env


def _cli(s, env, *args):
    return run_cli(*_proj(s), *args, url=s.database_url, env=env)


def _everything(source: str, target: str) -> dict:
    """What a DBA compares with a clean run: the source's capture, the target's tables and Alembic version, the
    ledger's phase state."""
    has_version = scalar(target, "SELECT to_regclass('public.alembic_version') IS NOT NULL")
    return {
        "captured": _captured(source),
        "target": snapshot(target),
        "alembic": scalar(target, "SELECT string_agg(version_num, ',') FROM alembic_version") if has_version else None,
        "phase": _phase(target, "night"),
        "source": snapshot(source) if source != target else None,
    }


def _clean(make_db, tmp_path, where, *commands):
    c, cs, ct, cenv = _pair(make_db, tmp_path, where, "clean")
    for cmd in commands:
        r = _cli(c, cenv, *cmd)
        assert r.returncode == 0, r.stderr
    return _everything(cs, ct)


def _nothing_held(*urls):
    for url in set(urls):
        left = _leftovers(url) if scalar(url, "SELECT to_regclass('migrate_data.runs') IS NOT NULL") else None
        if left is not None:
            assert left["sessions"] == [] and left["advisory"] == 0, left


# == 1. out of tries, one database and two =========================================================================
@pytest.mark.parametrize("where", WHERE)
def test_start_out_of_tries_leaves_nothing_and_the_same_command_equals_a_clean_run(make_db, tmp_path, where):
    s, source, target, env = _pair(make_db, tmp_path, where, "busy")
    args = ("night", "--yes", "--no-backup")
    with _holding(source, "shops"):
        failed = _cli(s, env, *args, "--lock-wait", "150ms", "--retries", "1")
    assert failed.returncode != 0, failed.stderr
    assert "through 2 attempts of 150ms" in failed.stderr, failed.stderr
    assert _captured(source)["triggers"] == [] and _captured(source)["registry"] == []
    assert _captured(source)["functions"] == []
    assert scalar(target, "SELECT to_regclass('public.tiendas')") is None  # the revision is not half applied
    assert scalar(target, "SELECT to_regclass('public.r1_marker')") is None
    assert _phase(target, "night") in (None, ("pending", False))
    assert scalar(target, "SELECT count(*) FROM migrate_data.runs WHERE status = 'running'") == 0
    _nothing_held(source, target)
    again = _cli(s, env, *args)
    assert again.returncode == 0, again.stderr
    assert _everything(source, target) == _clean(make_db, tmp_path, where, args)


@pytest.mark.parametrize("where", WHERE)
def test_rollback_out_of_tries_stays_rolling_back_and_the_same_command_equals_a_clean_rollback(
    make_db, tmp_path, where
):
    s, source, target, env = _pair(make_db, tmp_path, where, "busy")
    run_args, rb = ("night", "--yes", "--no-backup"), ("rollback", "night", "--yes")
    assert _cli(s, env, *run_args).returncode == 0
    sql(source, "UPDATE shops SET v = v WHERE id = 3")
    with _holding(source, "countries"):
        failed = _cli(s, env, *rb, "--lock-wait", "150ms", "--retries", "1")
    assert failed.returncode != 0, failed.stderr
    assert "through 2 attempts of 150ms" in failed.stderr, failed.stderr
    assert _phase(target, "night") == ("rolling_back", False)
    left = _captured(source, "night")
    assert sorted({t for t, *_ in left["triggers"]}) == ["countries", "shops"] and len(left["registry"]) == 2
    assert left["log"]
    assert scalar(target, "SELECT count(*) FROM migrate_data.runs WHERE status = 'running'") == 0
    _nothing_held(source, target)
    # the application writes while the rollback waits for its next try: logged, then dropped with the rest
    sql(source, "UPDATE shops SET v = 'v3' WHERE id = 3")
    again = _cli(s, env, *rb)
    assert again.returncode == 0, again.stderr
    assert _everything(source, target) == _clean(make_db, tmp_path, where, run_args, rb)


# == 2. kill -9 at the short-lock DDL =============================================================================
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("when", ["enter", "return"])
def test_a_rollback_killed_at_the_short_lock_ddl_then_the_same_command(make_db, tmp_path, where, when):
    s, source, target, env = _pair(make_db, tmp_path, where, "busy")
    run_args, rb = ("night", "--yes", "--no-backup"), ("rollback", "night", "--yes", "--retries", "3")
    assert _cli(s, env, *run_args).returncode == 0
    sql(source, "UPDATE shops SET v = v WHERE id = 3")
    killed = kill_at(f"migrate_data.blocking:ddl_with_short_locks:{when}", *_proj(s), *rb, url=s.database_url,
                     cwd=ROOT, env=env)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-1500:]
    assert _phase(target, "night") == ("rolling_back", False)
    assert len(_captured(source, "night")["registry"]) == 2 and _captured(source, "night")["log"]
    again = _cli(s, env, *rb)
    assert again.returncode == 0, again.stderr
    assert _everything(source, target) == _clean(make_db, tmp_path, where, run_args, rb)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("when", ["enter", "return"])
def test_a_start_killed_at_the_short_lock_ddl_then_the_same_command(make_db, tmp_path, where, when):
    s, source, target, env = _pair(make_db, tmp_path, where, "busy")
    args = ("night", "--yes", "--no-backup", "--retries", "3")
    killed = kill_at(f"migrate_data.blocking:ddl_with_short_locks:{when}", *_proj(s), *args, url=s.database_url,
                     cwd=ROOT, env=env)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-1500:]
    assert scalar(target, "SELECT to_regclass('public.tiendas')") is None
    again = _cli(s, env, *args)
    assert again.returncode == 0, again.stderr
    assert _everything(source, target) == _clean(make_db, tmp_path, where, args[:3])


# == 3. dry run, rehearse, JSON ======================================================================================
def test_a_rollback_dry_run_with_a_lock_wait_changes_nothing(make_db, tmp_path):
    s, source, target, env = _pair(make_db, tmp_path, "one database", "p")
    assert _cli(s, env, "night", "--yes", "--no-backup").returncode == 0
    before = _everything(source, target)
    with _holding(source, "shops"):
        r = _cli(s, env, "rollback", "night", "--dry-run", "--lock-wait", "150ms", "--retries", "0")
        rj = _cli(s, env, "rollback", "night", "--dry-run", "--lock-wait", "150ms", "--format", "json")
    assert r.returncode == 0 and rj.returncode == 0, (r.stderr, rj.stderr)
    assert '"dry_run": true' in rj.stdout
    assert _everything(source, target) == before


def test_a_json_error_for_a_refused_lock_wait():
    import json

    for cmd in (["rollback", "phase2a", "--yes"], ["phase2a", "--yes"]):
        r = run_cli(*cmd, "--lock-wait", "0.4ms", "--format", "json", url="postgresql://nobody@127.0.0.1:1/x")
        assert r.returncode == 2
        assert json.loads(r.stdout)["error"] is True, (r.stdout, r.stderr)


# == 4. values ======================================================================================================
def test_huge_retries_end_with_a_clean_failure_not_an_overflow(db_url, monkeypatch):
    """--retries is click.IntRange(0): any size.  The back-off min(0.25 * 2**attempt, 4.0) overflowed a float at
    attempt 1024: a busy table with --retries >= 1024 ended in OverflowError, not the "could not ..." failure."""
    import asyncpg

    from migrate_data import blocking
    from migrate_data.errors import MigrationError

    sql(db_url, "CREATE TABLE busy (id int)")

    async def nosleep(_):
        return None

    monkeypatch.setattr(blocking.asyncio, "sleep", nosleep)

    async def go():
        holder = await asyncpg.connect(db_url)
        conn = await asyncpg.connect(db_url)
        try:
            await holder.execute("BEGIN; LOCK TABLE busy IN ROW EXCLUSIVE MODE")
            async with conn.transaction():
                await blocking.ddl_with_short_locks(
                    conn,
                    "turn on change capture on busy",
                    ["ALTER TABLE busy ADD COLUMN x int"],
                    "1ms",
                    1100,
                    relations=["busy"],
                )
        finally:
            await holder.close()
            await conn.close()

    with pytest.raises(MigrationError):
        asyncio.run(go())


# == 5. the Alembic transaction is not one of the pool's sessions: no idle_in_transaction_session_timeout = 0 ==========
def _hold_for(url: str, table: str, seconds: float):
    import threading

    import asyncpg

    ready = threading.Event()

    async def hold():
        conn = await asyncpg.connect(url)
        try:
            ready.set()  # active, not idle, while it holds the table
            await conn.execute(f"BEGIN; LOCK TABLE {table} IN ROW EXCLUSIVE MODE; SELECT pg_sleep({seconds}); ROLLBACK")
        finally:
            await conn.close()

    t = threading.Thread(target=lambda: asyncio.run(hold()))
    t.start()
    ready.wait(10)
    time.sleep(0.5)
    return t


@pytest.mark.parametrize("where", WHERE)
def test_a_start_that_waits_longer_than_the_databases_idle_in_transaction_timeout(make_db, tmp_path, where):
    """The target database (or the role) has idle_in_transaction_session_timeout = 1500ms, which the pool's sessions
    turn off (db._session_settings), and the Alembic engine's did not.  The start waits for a busy source table
    (sleeping between tries); the application lets go after 5 s; --retries 20 is patience enough."""
    s, source, target, env = _pair(make_db, tmp_path, where, "busy")
    db = target.rsplit("/", 1)[1]
    sql(target, f"ALTER DATABASE {db} SET idle_in_transaction_session_timeout = '1500ms'")
    args = ("night", "--yes", "--no-backup")
    t = _hold_for(source, "shops", 5.0)
    first = _cli(s, env, *args, "--lock-wait", "300ms", "--retries", "20")
    t.join()
    # before the fix: "unexpected error: (sqlalchemy...InterfaceError) cannot call Transaction.rollback(): the
    # underlying connection is closed ... an internal error of migrate-data"; two databases: capture left committed
    # in the source (a stray start), the ledger without the phase
    assert first.returncode == 0, (first.stderr[-800:], _phase(target, "night"), _captured(source)["registry"])


# == 6. --lock-wait above 80 % of deadlock_timeout is not what one try waits, even for ONE table ===================
@pytest.mark.parametrize("command", ["run", "rollback"])
def test_one_table_lock_wait_is_what_one_try_waits(db_url, tmp_path, command):
    """help: "How long one try ... may wait"; README: only a try that takes several tables' locks is capped at 80 % of
    deadlock_timeout.  A phase of one table asks for 2s (it was capped because its DDL is several statements)."""
    from test_keys_attack import ITEMS, ITEMS_MAPPING
    from test_partitions import project

    sql(db_url, ITEMS)
    s = settings(db_url, project(tmp_path, ITEMS_MAPPING))
    if command == "rollback":
        assert _cli(s, {}, "night", "--yes", "--no-backup").returncode == 0
    args = ("night", "--yes", "--no-backup") if command == "run" else ("rollback", "night", "--yes")
    with _holding(db_url, "items"):
        failed = _cli(s, {}, *args, "--lock-wait", "2s", "--retries", "0")
    assert failed.returncode != 0
    assert "through 1 attempts of 2s" in failed.stderr, failed.stderr[-600:]


def test_a_stray_captures_rollback_out_of_tries_then_the_same_command(make_db, tmp_path):
    s, source, target, env = _pair(make_db, tmp_path, "two databases", "p")
    started = kill_at("migrate_data.capture:install:return", *_proj(s), "night", "--yes", "--no-backup",
                      url=s.database_url, cwd=ROOT, env=env)  # fmt: skip
    assert started.returncode == -9
    assert len(_captured(source, "night")["registry"]) == 2 and _phase(target, "night") is None
    sql(source, "UPDATE shops SET v = v WHERE id = 5")
    with _holding(source, "shops"):
        failed = _cli(s, env, "rollback", "night", "--yes", "--lock-wait", "100ms", "--retries", "1")
    assert failed.returncode != 0 and "through 2 attempts of 100ms" in failed.stderr, failed.stderr[-800:]
    assert len(_captured(source, "night")["registry"]) == 2 and _captured(source, "night")["log"]
    _nothing_held(source, target)
    dry = _cli(s, env, "rollback", "night", "--dry-run", "--lock-wait", "100ms")
    assert dry.returncode == 0, dry.stderr[-800:]
    assert len(_captured(source, "night")["registry"]) == 2
    again = _cli(s, env, "rollback", "night", "--yes")
    assert again.returncode == 0, again.stderr[-800:]
    assert _captured(source) == {"triggers": [], "functions": [], "registry": [], "log": []}
    run_again = _cli(s, env, "night", "--yes", "--no-backup")
    assert run_again.returncode == 0
    assert _everything(source, target) == _clean(make_db, tmp_path, "two databases", ("night", "--yes", "--no-backup"))
