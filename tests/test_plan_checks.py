"""`plan` evaluates the target's CHECK constraints and NOT NULL columns on the mapped values and counts the rows
they will refuse, before the night."""

from __future__ import annotations

import textwrap

from conftest import run, run_cli, sql
from migrate_data import api
from migrate_data.settings import Settings

SCHEMA = """
CREATE TABLE s (id int PRIMARY KEY, qty int, label text, doc text);
INSERT INTO s VALUES (1, 5, 'a', '{}'), (2, 0, 'b', '{}'), (3, -1, NULL, 'not json'), (4, 7, NULL, '[]');
CREATE TABLE t (
    id int PRIMARY KEY,
    qty int CONSTRAINT qty_positive CHECK (qty > 0),
    label text NOT NULL,
    doc jsonb CONSTRAINT doc_object CHECK (jsonb_typeof(doc) = 'object'),
    kind text DEFAULT 'x' CONSTRAINT kind_known CHECK (kind IN ('x', 'y')),
    CONSTRAINT label_or_qty CHECK (label IS NOT NULL OR qty > 6)
);
"""
MAPPING = """
tables:
  - source: s
    target: t
    columns: {id: id, qty: qty, label: label, doc: doc}
"""


def findings(url: str, project) -> list[str]:
    out = run_cli("plan", "p", url=url, cwd=project)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.startswith(("WARNING", "INFO", "ERROR"))]


def test_plan_counts_rows_each_check_and_not_null_refuses(db_url, tmp_path):
    sql(db_url, SCHEMA)
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "p.yaml").write_text(textwrap.dedent(MAPPING))
    lines = findings(db_url, tmp_path)
    assert "WARNING: public.t: CHECK qty_positive refuses 2 rows: they will be quarantined (23514)" in lines
    assert "WARNING: public.t: CHECK label_or_qty refuses 1 rows: they will be quarantined (23514)" in lines
    assert (
        "WARNING: public.t: label: NULL for 2 rows, and the column is NOT NULL: they will be quarantined (23502)"
        in lines
    )
    # one row's doc is not JSON: that constraint cannot be counted, the others still are
    assert any(
        line.startswith("WARNING: public.t: CHECK doc_object not evaluated on the mapped values: ") for line in lines
    )
    assert not any("kind_known" in line for line in lines)  # the unmapped column gets its DEFAULT, which passes
    # and the copy refuses exactly those rows: 2 (qty <= 0), 3 (qty, label, json), 4 (label)
    settings = Settings(database_url=db_url, project_dir=tmp_path, output_dir=tmp_path)
    run(api.run_phase(settings, "p", api.RunOptions(backup=False, max_reject_share=None)))
    assert [r[0] for r in sql(db_url, "SELECT source_key[1] FROM migrate_data.rejects ORDER BY 1")] == ["2", "3", "4"]


def test_a_default_the_check_refuses_is_counted(db_url, tmp_path):
    sql(db_url, SCHEMA + "ALTER TABLE t ALTER kind SET DEFAULT 'z';")
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "p.yaml").write_text(textwrap.dedent(MAPPING))
    assert "WARNING: public.t: CHECK kind_known refuses 4 rows: they will be quarantined (23514)" in findings(
        db_url, tmp_path
    )


def test_plan_of_phase2b_counts_the_on_hold_rows_the_check_refuses(applied_db):
    url = applied_db("phase1")
    out = run_cli("plan", "phase2b", url=url)
    assert out.returncode == 0, out.stderr
    assert (
        "WARNING: public.proveedor_profesiones: CHECK proveedor_profesiones_estado_verificacion_check refuses 12 rows: "
        "they will be quarantined (23514)" in out.stdout
    )
