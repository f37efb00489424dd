"""The command line, configuration, redaction and connection hygiene."""

from __future__ import annotations

import asyncio

import pytest

from conftest import run, run_cli, scalar
from migrate_data import api
from migrate_data.cli import cli
from migrate_data.errors import MigrationError
from migrate_data.settings import redact, redact_text


def test_help_lists_builtin_and_phase_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("plan", "validate", "rollback", "status", "history", "init", "demo", "phase2a", "phase3"):
        assert f"  {command} " in out.stdout


def test_version_prints_the_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("migrate-data, version ")


def test_every_command_has_help_text():
    for name, command in cli.commands.items():
        assert command.help and command.help.strip(), f"{name} has no help"


def test_redact_hides_password_in_urls():
    assert redact("postgresql://app:s3cr3t@db:5432/prod") == "postgresql://app:***@db:5432/prod"
    assert redact("postgresql://app@db/prod") == "postgresql://app@db/prod"
    text = "could not connect to postgresql://app:s3cr3t@db/prod (password s3cr3t rejected)"
    assert "s3cr3t" not in redact_text(text, "postgresql://app:s3cr3t@db/prod")


def test_connection_error_never_prints_the_password():
    out = run_cli("status", url="postgresql://postgres:hunter2secret@127.0.0.1:1/nope")
    assert out.returncode == 1
    assert "hunter2secret" not in out.stdout + out.stderr
    assert "ERROR: cannot connect to postgresql://postgres:***@127.0.0.1:1/nope" in out.stderr


def test_missing_database_url_is_bad_input():
    out = run_cli("status")
    assert out.returncode == 2
    assert "no target database" in out.stderr and "HINT:" in out.stderr


def _our_sessions(url: str) -> int:
    return scalar(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migrate-data' "
        "AND datname = current_database()",
    )


def test_no_session_left_open_after_runs_that_fail_midway(applied_db, settings_for):
    url = applied_db("phase1")
    settings = settings_for(url)
    # phase2a failing in the middle of the copy (the seed's invalid JSON exceeds --max-rejects 0) ...
    with pytest.raises(MigrationError, match="more than --max-rejects 0"):
        run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False, batch_size=50, max_rejects=0)))
    # ... and failing on any statement (a statement timeout of 1ms)
    with pytest.raises(MigrationError, match="statement timeout"):
        run(api.run_phase(settings.with_(statement_timeout="1ms"), "phase2a", api.RunOptions(backup=False)))
    # a failing rollback (nothing to roll back) and a failing validation (phase3 tables empty) too
    with pytest.raises(MigrationError):
        run(api.rollback(settings, "phase3"))
    run(api.validate(settings, "phase3"))
    assert _our_sessions(url) == 0
    assert (
        scalar(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migrate-data' "
            "AND datname = current_database() AND state LIKE 'idle in transaction%'",
        )
        == 0
    )


def test_pool_is_closed_when_the_block_raises(db_url):
    from migrate_data.db import open_pool

    async def go():
        async with open_pool(db_url, max_size=3) as pool:
            async with pool.acquire() as conn:
                await conn.execute("BEGIN")  # a careless caller
                await conn.execute("SELECT 1")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        asyncio.run(go())
    assert _our_sessions(db_url) == 0


def test_seed_script_fills_every_legacy_table(legacy_url):
    for table in (
        "professions",
        "customers",
        "users",
        "provider_professions",
        "provider_services",
        "service_requests",
        "sessions",
        "messages",
        "task_queue",
    ):
        assert scalar(legacy_url, f"SELECT count(*) FROM {table}") > 0
    assert scalar(legacy_url, "SELECT count(*) FROM customers WHERE notes = '{not json'") == 3
    assert (
        scalar(
            legacy_url,
            "SELECT count(*) FROM messages m WHERE user_id IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = m.user_id)",
        )
        > 0
    )
