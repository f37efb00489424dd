"""Staging rehearsal: build, run / roll back / run again, predict, and leave production alone."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from conftest import cli_env, run_cli, run_cli_args, scalar, seed_legacy
from migrate_data.rehearse import TablePrediction, advise, parse_window
from test_orchestration import snapshot


def test_rehearsal_on_the_same_server_predicts_and_leaves_production_untouched(legacy_url, make_db, tmp_path):
    staging = make_db()  # exists already: --rebuild replaces it with a TEMPLATE copy of production
    before = snapshot(legacy_url)
    out = run_cli(
        "rehearse",
        "phase2a",
        "phase2b",
        "phase3",
        "--staging-url",
        staging,
        "--rebuild",
        "--window",
        "02:00-06:00",
        "--tz",
        "America/Guayaquil",
        "--format",
        "json",
        url=legacy_url,
        env={"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["built"] == "template" and r["ok"] is True and r["validations_ok"] is True
    assert r["phases"] == ["phase2a", "phase2b", "phase3"]
    steps = {(s["phase"], s["step"]) for s in r["steps"]}
    assert ("phase1", "setup") in steps
    for phase in ("phase2a", "phase2b", "phase3"):
        assert {(phase, "run"), (phase, "rollback"), (phase, "rerun"), (phase, "recheck")} <= steps
    assert [p["phase"] for p in r["predictions"]] == ["phase2a", "phase2b", "phase3"]
    assert all(p["fits"] is True and p["low"] <= p["predicted_seconds"] <= p["high"] for p in r["predictions"])
    clientes = next(t for t in r["tables"] if t["target"] == "public.clientes")
    assert clientes["staging_rows"] == clientes["production_rows"] == 1000
    assert not [d for d in r["drift"] if d["kind"] in ("schema", "values")]
    # production: not a row, not a table, not a ledger more
    assert snapshot(legacy_url) == before
    assert scalar(legacy_url, "SELECT to_regnamespace('migrate_data') IS NULL") is True
    # staging carries the result
    assert scalar(staging, "SELECT count(*) FROM mensajes") > 0
    reports = {p.suffix for p in (tmp_path / "reports").glob("rehearsal-*")}
    assert reports == {".json", ".md", ".html"}
    html = next((tmp_path / "reports").glob("rehearsal-*.html")).read_text()
    assert "class='timeline'" in html and "Prediction against the window" in html
    predictions = json.loads((tmp_path / "reports" / "predictions.json").read_text())
    assert set(predictions) == {"phase2a", "phase2b", "phase3"}


def test_rehearsal_on_a_smaller_staging_scales_and_reports_drift(legacy_url, make_db, tmp_path):
    staging = make_db()

    async def seed_small():
        conn = await asyncpg.connect(staging)
        try:
            await seed_legacy.seed(conn, 0.0005)
            await conn.execute("UPDATE customers SET city = 'Quito' WHERE city = 'Loja'")  # a value staging lacks
        finally:
            await conn.close()

    asyncio.run(seed_small())
    out = run_cli(
        "rehearse",
        "phase2a",
        "--staging-url",
        staging,
        "--use-existing",
        "--format",
        "json",
        url=legacy_url,
        env={"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["built"] == "existing"
    clientes = next(t for t in r["tables"] if t["target"] == "public.clientes")
    assert clientes["staging_rows"] == 500 and clientes["production_rows"] == 1000
    drift = [(d["kind"], d["table"], d["message"]) for d in r["drift"]]
    assert ("values", "public.clientes.ciudad", "values in production but not in staging: 'Loja'") in drift
    assert any(k == "rows" and t == "public.clientes" and "2.0×" in m for k, t, m in drift)


def test_staging_url_equal_to_production_is_refused(legacy_url):
    out = run_cli("rehearse", "phase2a", "--staging-url", legacy_url, url=legacy_url)
    assert out.returncode == 2 and "names the production database" in out.stderr


def test_existing_staging_database_is_not_replaced_without_rebuild(legacy_url, make_db):
    staging = make_db()
    out = run_cli("rehearse", "phase2a", "--staging-url", staging, url=legacy_url)
    assert out.returncode == 2 and "--rebuild" in out.stderr


def test_window_parsing_crosses_midnight():
    assert parse_window("02:00-06:00")[2] == 4 * 3600
    assert parse_window("23:00-01:30 America/Guayaquil")[2] == 2.5 * 3600


def test_advice_for_a_phase_that_does_not_fit():
    big = TablePrediction("p", "mensajes", "messages", 10, 100, 1.0, 10.0, 9000.0)
    small = TablePrediction("p", "sesiones", "sessions", 10, 100, 1.0, 10.0, 1000.0)
    advice = advise([big, small], 10000.0, 1200.0, 2)
    assert advice[0].startswith("raise --jobs (now 2): mensajes is 90% of the night")
    assert advice[1] == "split the phase over two nights: mensajes first, the rest the night after"
    assert advice[2].endswith("with --recheck inside the window as a catch-up: about 20m00s")


@pytest.mark.parametrize("capture_on", [False, True])
def test_busy_production_is_copied_with_pg_dump_instead_of_template(
    legacy_template, applied_db, make_db, tmp_path, capture_on
):
    staging = make_db()
    # production mid-migration: phase2a applied, its change capture on customers and professions
    production = applied_db("phase2a") if capture_on else make_db(template=legacy_template)
    if capture_on:
        assert scalar(production, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'md\\_capture\\_%'") > 0

    async def rehearse_while_busy():
        busy = await asyncpg.connect(production)  # an application session: TEMPLATE is impossible
        try:
            proc = await asyncio.create_subprocess_exec(
                *run_cli_args("rehearse", "phase2b", "--staging-url", staging, "--rebuild", "--format", "json"),
                env=cli_env(production, tmp_path),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
            return proc.returncode, out.decode(), err.decode()
        finally:
            await busy.close()

    code, out, err = asyncio.run(rehearse_while_busy())
    assert code == 0, err
    r = json.loads(out)
    assert r["built"] == "dump" and r["validations_ok"] is True
    assert [p["phase"] for p in r["predictions"]] == ["phase2b"]
    assert {(s["phase"], s["step"]) for s in r["steps"]} >= {("phase1", "setup"), ("phase2a", "setup")}
