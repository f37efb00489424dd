"""Validation: counts that know the mapping, checksums, integrity, reports and exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import pytest

from conftest import ROOT, run, run_cli, scalar, sql
from migrate_data import api
from migrate_data.settings import Settings


@pytest.fixture
def phase2a(applied_db):
    return applied_db("phase2a")


def validate(url: str, *args: str) -> tuple[int, dict]:
    out = run_cli("validate", "phase2a", "--format", "json", *args, url=url)
    return out.returncode, json.loads(out.stdout)


def test_clean_phase_validates_with_exit_0(phase2a):
    code, report = validate(phase2a, "--deep")
    assert code == 0 and report["ok"] is True
    clientes = next(t for t in report["tables"] if t["target"] == "public.clientes")
    assert (clientes["source_rows"], clientes["target_rows"], clientes["rejected"], clientes["status"]) == (
        1000,
        997,
        3,
        "ok",
    )
    assert {"phase", "ok", "tables", "checks"} <= set(report)


def test_deleted_target_row_fails_the_count_naming_the_table(phase2a):
    sql(phase2a, "DELETE FROM clientes WHERE id = (SELECT id FROM clientes ORDER BY id LIMIT 1)")
    code, report = validate(phase2a)
    assert code == 3 and report["ok"] is False
    failed = [t for t in report["tables"] if t["status"] == "failed"]
    assert [t["target"] for t in failed] == ["public.clientes"]
    assert "997, but 996 rows in public.clientes" in failed[0]["problems"][0]


def test_changed_value_is_found_by_deep_with_key_and_column(phase2a):
    key = scalar(phase2a, "SELECT id::text FROM clientes ORDER BY id LIMIT 1")
    sql(phase2a, "UPDATE clientes SET ciudad = 'Atlantis' WHERE id = $1::uuid", key)
    code, _ = validate(phase2a)
    assert code == 0  # counts alone cannot see it
    code, report = validate(phase2a, "--deep")
    assert code == 3
    clientes = next(t for t in report["tables"] if t["target"] == "public.clientes")
    assert clientes["differs"] == 1
    sample = clientes["samples"][0]
    assert sample["kind"] == "differs" and sample["key"] == [key]
    assert [c["column"] for c in sample["columns"]] == ["ciudad"]
    assert sample["columns"][0]["actual"] == "Atlantis"


def test_lookup_to_a_non_unique_key_fails(db_url, tmp_path):
    sql(
        db_url,
        """CREATE TABLE s (id int PRIMARY KEY, u int); INSERT INTO s VALUES (1, 1), (2, 2);
                   CREATE TABLE u (id int, phone text); INSERT INTO u VALUES (1, 'a'), (2, 'b');
                   CREATE TABLE t (id int PRIMARY KEY, phone text)""",
    )
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "p.yaml").write_text(
        textwrap.dedent("""
        tables:
          - source: s
            target: t
            columns: {id: id, phone: {lookup: {table: u, on: u, key: id, column: phone}}}
    """)
    )
    settings = Settings(database_url=db_url, project_dir=tmp_path, output_dir=tmp_path)
    sql(db_url, "INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    assert run(api.validate(settings, "p")).ok
    sql(db_url, "INSERT INTO u VALUES (1, 'again')")  # u.id has no unique key: now a row multiplies
    result = run(api.validate(settings, "p"))
    assert not result.ok
    assert "a lookup multiplies rows: 2 source rows become 3 when joined" in result.tables[0].problems[0]


def test_orphan_foreign_key_fails(applied_db):
    url = applied_db("phase2b")
    sql(url, "ALTER TABLE servicios_proveedor DISABLE TRIGGER ALL")
    sql(
        url,
        "UPDATE servicios_proveedor SET profesion_id = gen_random_uuid() WHERE id = (SELECT min(id) FROM servicios_proveedor)",
    )
    sql(url, "ALTER TABLE servicios_proveedor ENABLE TRIGGER ALL")
    out = run_cli("validate", "phase2b", url=url)
    assert out.returncode == 3
    assert "servicios_proveedor_profesion_id_fkey: 1 rows reference no row of public.profesiones" in out.stdout


def test_sequence_behind_its_column_fails(applied_db, settings_for):
    url = applied_db("phase3")
    settings = settings_for(url)
    sql(url, "SELECT setval(pg_get_serial_sequence('tareas_programadas', 'id'), 1)")
    result = run(api.validate(settings, "phase3"))
    assert not result.ok
    assert any(c.name == "sequence" and not c.ok and "new rows would collide" in c.message for c in result.checks)


def test_reports_render_in_every_format(phase2a, tmp_path):
    for fmt, marker in (
        ("markdown", "| public.customers | public.clientes | 1,000 | 997 | 3 | ok |"),
        ("html", "<!doctype html>"),
        ("text", "validation of phase2a PASSED"),
    ):
        out = run_cli("validate", "phase2a", "--format", fmt, url=phase2a)
        assert out.returncode == 0 and marker in out.stdout, out.stdout
    target = tmp_path / "r.html"
    out = run_cli("validate", "phase2a", "--format", "html", "--output", str(target), url=phase2a)
    assert out.returncode == 0 and "22P02" in target.read_text() and "***" not in target.read_text()


def test_phase_run_saves_json_and_html_reports(applied_db, settings_for, tmp_path):
    run(api.run_phase(settings_for(applied_db("phase1")), "phase2a", api.RunOptions(backup=False)))
    reports = sorted((tmp_path / "reports").glob("phase2a-*"))
    assert {p.suffix for p in reports} == {".json", ".html"}
    data = json.loads(next(p for p in reports if p.suffix == ".json").read_text())
    assert data["phase"] == "phase2a" and data["ok"] and data["operator"] == "postgres"


def test_history_lists_runs_with_operator(phase2a):
    out = run_cli("history", "--format", "json", url=phase2a)
    rows = json.loads(out.stdout)
    assert [r["phase"] for r in rows[:2]] == ["phase2a", "phase1"]
    assert rows[0]["kind"] == "run" and rows[0]["status"] == "done" and rows[0]["operator"].startswith("postgres@")
    assert rows[0]["rows"] == 1037 and rows[0]["rejects"] == 3


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium is not installed (apt-get install chromium)")
def test_html_report_renders_in_a_real_browser(phase2a, tmp_path):
    page = tmp_path / "report.html"
    run_cli("validate", "phase2a", "--format", "html", "--output", str(page), url=phase2a)
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=60,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            f"--user-data-dir={tmp_path / 'profile2'}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "Validation of <code>phase2a</code>" in dom and "public.clientes" in dom


def test_phase_whose_rows_vanish_exits_3_and_records_it(db_url, tmp_path):
    sql(
        db_url,
        """CREATE TABLE s (id int PRIMARY KEY); INSERT INTO s SELECT generate_series(1, 100);
           CREATE TABLE t (id int PRIMARY KEY);
           CREATE FUNCTION drop_odd() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN IF NEW.id % 2 = 1 THEN RETURN NULL; END IF; RETURN NEW; END $$;
           CREATE TRIGGER drop_odd BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION drop_odd()""",
    )
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "p.yaml").write_text("tables: [{source: s, target: t, columns: {id: id}}]\n")
    out = run_cli("p", "--yes", "--no-backup", url=db_url, cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    assert "phase p copied, but validation FAILED" in out.stdout
    assert "100 source rows - 0 rejected = 100, but 50 rows in public.t" in out.stdout
    status = run_cli("status", "--format", "json", url=db_url, cwd=tmp_path)
    assert json.loads(status.stdout)[0]["validation"] == "FAILED"


def test_deep_in_concurrent_key_ranges_finds_every_difference(phase2a):
    from migrate_data.db import open_pool
    from migrate_data.loader import load_phases
    from migrate_data.preflight import compile_phase
    from migrate_data.validate import validate_phase

    keys = [r[0] for r in sql(phase2a, "SELECT id::text FROM clientes ORDER BY id")]
    changed = [keys[10], keys[500], keys[990]]  # in different ranges
    sql(phase2a, "UPDATE clientes SET nombre_completo = 'X' WHERE id = ANY($1::uuid[])", changed)
    sql(phase2a, "DELETE FROM clientes WHERE id = $1::uuid", keys[700])

    async def go():
        async with open_pool(phase2a) as pool:
            phase = load_phases(ROOT / "mappings")["phase2a"]
            tables, _ = await compile_phase(phase, source=pool, target=pool)
            return await validate_phase("phase2a", tables, target=pool, source=pool, deep=True, split_rows=100)

    result = run(go())
    clientes = next(t for t in result.tables if t.target == "public.clientes")
    assert (clientes.differs, clientes.missing, clientes.extra) == (3, 1, 0)
    assert sorted(s["key"][0] for s in clientes.samples if s["kind"] == "differs") == sorted(changed)


def test_deep_hashes_rows_with_types_that_have_no_hash_function(db_url, tmp_path):
    sql(
        db_url,
        """CREATE TABLE s (id int PRIMARY KEY, doc text, pos text);
           INSERT INTO s VALUES (1, '{"a": 1}', '(1,2)'), (2, '[]', '(3,4)');
           CREATE TABLE t (id int PRIMARY KEY, doc json, pos point)""",
    )
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "p.yaml").write_text(
        "tables: [{source: s, target: t, columns: {id: id, doc: doc, pos: pos}}]\n"
    )
    out = run_cli("p", "--yes", "--no-backup", "--deep", url=db_url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    sql(db_url, "UPDATE t SET pos = '(9,9)' WHERE id = 2")
    out = run_cli("validate", "p", "--deep", "--format", "json", url=db_url, cwd=tmp_path)
    assert out.returncode == 3
    table = json.loads(out.stdout)["tables"][0]
    assert table["differs"] == 1 and table["samples"][0]["columns"][0]["column"] == "pos"


def test_deep_across_two_databases_bisects_to_the_differing_rows(legacy_url, applied_db, settings_for, monkeypatch):
    from migrate_data import deep

    monkeypatch.setattr(deep, "LEAF_ROWS", 40)  # ranges of ~1,000 rows are bisected down to 40
    target_url = applied_db("phase1", seeded=False)
    settings = settings_for(target_url).with_(source_url=legacy_url)
    run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False)))
    clean = run(api.validate(settings, "phase2a", deep=True))
    assert clean.ok, clean.tables  # the 3 rejected rows are not reported missing
    keys = [r[0] for r in sql(target_url, "SELECT id::text FROM clientes ORDER BY id")]
    sql(target_url, "UPDATE clientes SET ciudad = 'Atlantis' WHERE id = $1::uuid", keys[100])
    sql(target_url, "DELETE FROM clientes WHERE id = $1::uuid", keys[800])
    sql(target_url, "INSERT INTO clientes (telefono, nombre_completo) VALUES ('+1', 'Extra')")
    result = run(api.validate(settings, "phase2a", deep=True))
    clientes = next(t for t in result.tables if t.target == "public.clientes")
    assert (clientes.differs, clientes.missing, clientes.extra) == (1, 1, 1)
    differs = next(s for s in clientes.samples if s["kind"] == "differs")
    assert differs["key"] == [keys[100]] and [c["column"] for c in differs["columns"]] == ["ciudad"]
    assert next(s for s in clientes.samples if s["kind"] == "missing")["key"] == [keys[800]]
    assert not result.ok
