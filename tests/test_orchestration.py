"""A phase from end to end: run, rollback, backups, status, refusals."""

from __future__ import annotations

import asyncio
import json
import subprocess

import asyncpg
import pytest

from conftest import run, run_cli, scalar, sql
from migrate_data import api
from migrate_data.backup import find_tool
from migrate_data.errors import MigrationError, RefusedError

DATA_PHASES = ("phase1", "phase2a", "phase2b", "phase3")


def snapshot(url: str) -> dict:
    """Tables, a fingerprint of every row, and sequence values of the application's schema (on one connection)."""

    async def go() -> dict:
        conn = await asyncpg.connect(url)
        try:
            tables = [
                r[0]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version' "
                    "ORDER BY 1"
                )
            ]
            rows = {
                t: await conn.fetchval(
                    f"SELECT md5(COALESCE(string_agg(x::text, '|' ORDER BY x::text), '')) FROM \"{t}\" x"
                )
                for t in tables
            }
            seqs = {
                r[0]: (r[1], r[2])
                for r in await conn.fetch(
                    "SELECT sequencename, last_value, start_value FROM pg_sequences WHERE schemaname = 'public' "
                    "ORDER BY 1"
                )
            }
        finally:
            await conn.close()
        return {"tables": tables, "rows": rows, "sequences": seqs}

    return asyncio.run(go())


def run_all(settings, phases=DATA_PHASES, **opts):
    return [run(api.run_phase(settings, p, api.RunOptions(**opts))) for p in phases]


def test_whole_plan_then_rollbacks_leave_the_database_as_it_was(legacy_url, settings_for):
    settings = settings_for(legacy_url)
    before = snapshot(legacy_url)
    results = run_all(settings, backup=False)
    assert all(r.validation.ok for r in results)
    after_run = snapshot(legacy_url)
    assert "clientes" in after_run["tables"] and after_run["rows"]["customers"] == before["rows"]["customers"]
    for phase in reversed(DATA_PHASES):
        run(api.rollback(settings, phase))
    assert snapshot(legacy_url) == before
    status = {s.phase: s.state for s in run(api.status(settings))}
    assert status == {
        "phase1": "rolled_back",
        "phase2a": "rolled_back",
        "phase2b": "rolled_back",
        "phase3": "rolled_back",
        "phase4": "pending",
        "phase5": "pending",
    }


def test_rollback_refuses_while_a_later_phase_is_applied(applied_db):
    url = applied_db("phase3")
    before = snapshot(url)
    out = run_cli("rollback", "phase2a", "--yes", url=url)
    assert out.returncode == 2
    assert "phase2b, phase3 is applied after phase2a" in out.stderr and "HINT: roll back phase3 first" in out.stderr
    assert snapshot(url) == before


def test_rollback_refuses_rows_written_by_the_application_and_force_keeps_them(applied_db, tmp_path):
    url = applied_db("phase2a")
    sql(url, "INSERT INTO clientes (telefono, nombre_completo) VALUES ('+593000', 'Nueva Clienta')")
    out = run_cli("rollback", "phase2a", "--yes", url=url, env={"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)})
    assert out.returncode == 2
    assert (
        "hold rows the phase did not write, or that were changed after it wrote them (public.clientes: 1 rows)"
        in out.stderr
    )
    assert scalar(url, "SELECT count(*) FROM clientes") == 998
    out = run_cli("rollback", "phase2a", "--yes", "--force", url=url, env={"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    dumps = list((tmp_path / "backups").glob("phase2a-rollback-foreign-rows-*.jsonl"))
    assert len(dumps) == 1
    kept = [json.loads(line) for line in dumps[0].read_text().splitlines()]
    assert [(k["table"], k["row"]["nombre_completo"]) for k in kept] == [("public.clientes", "Nueva Clienta")]
    assert scalar(url, "SELECT count(*) FROM clientes") == 0


def test_without_a_terminal_and_without_yes_nothing_runs(legacy_url):
    out = run_cli("phase1", url=legacy_url)
    assert out.returncode == 2 and "refusing to run phase1 without confirmation: no terminal" in out.stderr
    assert scalar(legacy_url, "SELECT to_regclass('clientes') IS NULL") is True
    out = run_cli("rollback", "phase1", url=legacy_url)
    assert out.returncode == 2 and "without confirmation" in out.stderr


def test_dry_run_changes_nothing(legacy_url):
    out = run_cli("phase1", "--dry-run", url=legacy_url)
    assert out.returncode == 0 and "dry run of phase1: pre-flight passed" in out.stdout
    assert scalar(legacy_url, "SELECT to_regclass('clientes') IS NULL") is True


def test_requires_refuses_to_skip_a_phase(legacy_url):
    out = run_cli("phase2b", "--yes", url=legacy_url)
    assert out.returncode == 2 and "phase2b requires phase2a, which is pending" in out.stderr


def test_backups_are_taken_and_readable(applied_db, settings_for):
    url = applied_db("phase1")
    settings = settings_for(url)
    run_all(settings, ("phase2a",))
    dumps = list(settings.backups_dir.glob("phase2a-*.dump"))
    assert len(dumps) == 1
    major = int(scalar(url, "SHOW server_version_num")) // 10000
    pg_restore = run(find_tool("pg_restore", major))
    listing = subprocess.run([pg_restore, "--list", str(dumps[0])], capture_output=True, text=True, check=True).stdout
    for table in ("customers", "professions", "clientes", "profesiones"):
        assert f"TABLE DATA public {table} " in listing
    history = run(api.history(settings, phase="phase2a"))
    assert history[0]["status"] == "done"


def test_status_shows_partial_with_resume_point(applied_db, settings_for):
    url = applied_db("phase1")
    settings = settings_for(url)
    with pytest.raises(MigrationError, match="max-rejects"):
        run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False, batch_size=100, max_rejects=0)))
    out = run_cli("status", "--format", "json", url=url)
    rows = {r["phase"]: r for r in json.loads(out.stdout)}
    assert rows["phase1"]["state"] == "applied"
    assert rows["phase2a"]["state"] == "partial" and "resumes at" in rows["phase2a"]["resume"]
    assert rows["phase3"]["state"] == "pending"


def test_phase5_drops_legacy_tables_and_its_rollback_restores_them(applied_db, settings_for):
    url = applied_db("phase4")
    settings = settings_for(url)
    assert scalar(url, "SELECT to_regclass('idx_mensajes_telefono') IS NOT NULL") is True
    legacy = snapshot(url)
    with pytest.raises(RefusedError, match="needs a verified backup"):
        run(api.run_phase(settings, "phase5", api.RunOptions(backup=False)))
    result = run(api.run_phase(settings, "phase5", api.RunOptions(accept_unmapped=True)))
    assert result.backup_path and result.status == "done"
    assert scalar(url, "SELECT to_regclass('customers') IS NULL") is True
    out = run_cli("rollback", "phase3", "--yes", url=url)
    assert out.returncode == 2 and "phase4, phase5 is applied after phase3" in out.stderr
    rb = run(api.rollback(settings, "phase5"))
    assert rb.downgraded_to == "phase4" and "public.customers" in rb.restored
    assert snapshot(url) == legacy


def test_alembic_changed_by_hand_is_refused(applied_db, settings_for):
    url = applied_db("phase1")
    settings = settings_for(url)
    sql(url, "UPDATE alembic_version SET version_num = 'phase5'")
    with pytest.raises(RefusedError, match="Alembic revision is phase5 but the ledger says phase1"):
        run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False)))


def test_demo_runs_on_the_embedded_server(tmp_path):
    pytest.importorskip("pgserver")
    out = run_cli("demo", env={"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "$ migrate-data rollback phase3 --yes" in out.stdout
    assert out.stdout.count("validation passed") == 5
    assert "password" not in out.stdout


def test_rollback_across_databases_finds_application_rows_too(legacy_url, applied_db, settings_for, tmp_path):
    target_url = applied_db("phase1", seeded=False)
    settings = settings_for(target_url).with_(source_url=legacy_url)
    run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False)))
    sql(target_url, "INSERT INTO clientes (telefono, nombre_completo) VALUES ('+593000', 'Nueva Clienta')")
    with pytest.raises(RefusedError, match=r"public.clientes: 1 rows"):
        run(api.rollback(settings, "phase2a"))
    assert scalar(target_url, "SELECT count(*) FROM clientes") == 998
    result = run(api.rollback(settings, "phase2a", force=True))
    kept = [json.loads(line) for line in open(result.foreign_rows_dump).read().splitlines()]
    assert [k["row"]["nombre_completo"] for k in kept] == ["Nueva Clienta"]
    assert scalar(target_url, "SELECT count(*) FROM clientes") == 0
