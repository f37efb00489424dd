"""Pre-flight against the live catalogs, and `migrate-data plan`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import run, run_cli, sql
from migrate_data import api
from migrate_data.errors import PreflightError
from migrate_data.settings import Settings

SCHEMA = """
CREATE TABLE src (id int PRIMARY KEY, code text NOT NULL, n text, ref int, dup int);
CREATE TABLE lk (id int, val text);
CREATE TABLE lku (id int PRIMARY KEY, val text);
INSERT INTO src VALUES (1, 'a', '1', 1, 1), (2, 'b', 'x', 2, 1);
INSERT INTO lk VALUES (1, 'one'), (1, 'uno');
INSERT INTO lku VALUES (1, 'one');
CREATE TABLE dst (id int PRIMARY KEY, code text NOT NULL, n int, must text NOT NULL, val text, other int UNIQUE);
"""


def preflight_error(db_url: str, tmp_path: Path, columns: str, extra: str = "") -> str:
    sql(db_url, SCHEMA)
    (tmp_path / "mappings").mkdir()
    text = (
        "tables:\n  - source: src\n    target: dst\n"
        + textwrap.indent(extra + "\n", "    ")
        + "    columns:\n"
        + textwrap.indent(columns, "      ")
    )
    (tmp_path / "mappings" / "p.yaml").write_text(text)
    settings = Settings(database_url=db_url, project_dir=tmp_path, output_dir=tmp_path)
    with pytest.raises(PreflightError) as e:
        run(api.run_phase(settings, "p", api.RunOptions(backup=False)))
    assert sql(db_url, "SELECT count(*) FROM dst")[0][0] == 0
    return e.value.detail or ""


def test_missing_target_column_is_named(db_url, tmp_path):
    detail = preflight_error(db_url, tmp_path, "id: id\ncode: code\nmust: code\nnope: code\n")
    assert "target column dst.nope does not exist" in detail


def test_missing_source_column_is_named(db_url, tmp_path):
    detail = preflight_error(db_url, tmp_path, "id: id\ncode: kode\nmust: code\n")
    assert "source column src.kode does not exist" in detail


def test_not_null_column_without_value_is_an_error(db_url, tmp_path):
    detail = preflight_error(db_url, tmp_path, "id: id\ncode: code\n")
    assert "dst.must is NOT NULL without a default and gets no value" in detail


def test_key_without_unique_constraint_is_an_error(db_url, tmp_path):
    detail = preflight_error(db_url, tmp_path, "id: id\ncode: code\nmust: code\n", "key: [code]")
    assert "key (code) is not a primary key or unique constraint of dst" in detail


def test_lookup_key_not_unique_is_an_error(db_url, tmp_path):
    detail = preflight_error(
        db_url, tmp_path, "id: id\ncode: code\nmust: code\nval: {lookup: {table: lk, on: ref, key: id, column: val}}\n"
    )
    assert "lookup key lk(id) is not unique: rows would multiply" in detail


def test_batch_by_not_unique_is_an_error(db_url, tmp_path):
    detail = preflight_error(db_url, tmp_path, "id: id\ncode: code\nmust: code\n", "batch_by: [dup]")
    assert "batch_by (dup) is not unique in src" in detail


def test_type_errors_surface_at_prepare(db_url, tmp_path):
    detail = preflight_error(db_url, tmp_path, "id: id\ncode: code\nmust: code\nn: {sql: 'src.code + 1'}\n")
    assert "the copy statement does not prepare: 42883" in detail


def test_plan_of_phase3_shows_sql_preview_and_coverage_warnings(applied_db, tmp_path):
    url = applied_db("phase1")
    out = run_cli("plan", "phase3", url=url, env={"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert 'INSERT INTO "public"."mensajes"' in text and 'ON CONFLICT ("id") DO NOTHING' in text
    assert 'LEFT JOIN "public"."users" AS "lookup1" ON "lookup1"."id" = "messages"."user_id"' in text
    assert "preview (first rows, computed and rolled back)" in text
    assert "WARNING: public.mensajes: tipo_mensaje: value 'sticker' is not in the map (5 rows)" in text
    assert "WARNING: public.mensajes: lookup in users finds nothing for" in text
    assert "WARNING: public.sesiones: lookup in users finds nothing for" in text
    assert (
        "order: public.sesiones -> public.mensajes -> public.solicitudes_servicio -> public.tareas_programadas" in text
    )
    # plan never writes
    assert sql(url, "SELECT count(*) FROM mensajes")[0][0] == 0


def test_plan_json_and_offline_ddl(legacy_url, tmp_path):
    out = run_cli("plan", "phase1", "--format", "json", url=legacy_url)
    data = json.loads(out.stdout)
    assert data["phase"] == "phase1" and data["ok"] is True
    # plan applied phase1's DDL only inside a rolled-back transaction
    assert sql(legacy_url, "SELECT to_regclass('clientes') IS NULL")[0][0] is True
    # --sql: the revision's DDL, offline: no database at all
    out = run_cli("plan", "phase1", "--format", "json", "--sql")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "CREATE TABLE clientes" in data["ddl"] and "CREATE TABLE mensajes" in data["ddl"]


def test_plan_with_errors_exits_2(legacy_url):
    out = run_cli("plan", "phase2a", url=legacy_url)  # phase1 not applied: the targets do not exist
    assert out.returncode == 2
    assert "ERROR: public.clientes" not in out.stdout
    assert "target table clientes does not exist" in out.stdout
