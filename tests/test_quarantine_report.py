"""Validation cannot hide what is wrong: quarantined rows are counted by cause in every report format, and a key
that is NULL is reported, not a crash."""

from __future__ import annotations

import json
import textwrap

from conftest import run, run_cli, sql
from migrate_data import api
from migrate_data.settings import Settings


def project(tmp_path, mapping: str) -> Settings:
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "mappings" / "p.yaml").write_text(textwrap.dedent(mapping))
    return tmp_path


def test_quarantined_rows_are_counted_by_cause_in_every_format(db_url, tmp_path):
    sql(
        db_url,
        """CREATE TABLE s (id int PRIMARY KEY, qty int, doc text);
           INSERT INTO s SELECT i, CASE WHEN i % 10 = 0 THEN -i ELSE i END,
                                CASE WHEN i IN (3, 33) THEN 'x' || i ELSE '{}' END FROM generate_series(1, 100) i;
           CREATE TABLE t (id int PRIMARY KEY, qty int CONSTRAINT qty_positive CHECK (qty > 0), doc jsonb)""",
    )
    project(tmp_path, "tables: [{source: s, target: t, columns: {id: id, qty: qty, doc: doc}}]\n")
    out = run_cli("p", "--yes", "--no-backup", "--max-rejects", "50", url=db_url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "QUARANTINED: 12 source rows of 1 table are not in the target but in migrate_data.rejects, by cause:" in text
    assert "validation of p PASSED (deep): 1 tables, 0 integrity checks, 0 failed; 12 rows QUARANTINED, not copied" in (
        text
    )
    lines = [line.split() for line in text.splitlines() if line.startswith("  public.t")]
    assert [(ln[1], ln[2], ln[-1]) for ln in lines] == [("10", "23514", "10"), ("2", "22P02", "3")]

    data = json.loads(run_cli("validate", "p", "--format", "json", url=db_url, cwd=tmp_path).stdout)
    assert data["quarantined"] == 12
    causes = {(c["sqlstate"], c["n"], tuple(c["example_key"])) for c in data["reject_causes"]}
    assert causes == {("23514", 10, ("10",)), ("22P02", 2, ("3",))}
    check = next(c for c in data["reject_causes"] if c["sqlstate"] == "23514")
    assert check["cause"] == 'new row for relation "t" violates check constraint "qty_positive"'

    page = run_cli("validate", "p", "--format", "html", url=db_url, cwd=tmp_path).stdout
    assert "<div class='quarantine' id='quarantined'><h2>⚠ 12 rows quarantined, not copied</h2>" in page
    assert page.index("id='quarantined'") < page.index("<h2>Rows per table</h2>")  # at the top, not at the end
    md = run_cli("validate", "p", "--format", "markdown", url=db_url, cwd=tmp_path).stdout
    assert "## Quarantined: 12 rows not copied" in md and "| public.t | 10 | 23514 |" in md


def test_values_are_masked_so_rows_of_one_cause_group_together(db_url, tmp_path):
    sql(
        db_url,
        """CREATE TABLE s (id int PRIMARY KEY, n text); INSERT INTO s VALUES (1, 'one'), (2, 'two'), (3, '3');
           CREATE TABLE t (id int PRIMARY KEY, n int)""",
    )
    settings = Settings(
        database_url=db_url,
        project_dir=project(tmp_path, "tables: [{source: s, target: t, columns: {id: id, n: n}}]\n"),
        output_dir=tmp_path,
    )
    result = run(api.run_phase(settings, "p", api.RunOptions(backup=False, max_reject_share=None)))
    assert [(c["cause"], c["n"]) for c in result.validation.reject_causes] == [
        ('invalid input syntax for type integer: "…"', 2)
    ]


def test_deep_reports_null_keys_instead_of_crashing(db_url, tmp_path):
    sql(
        db_url,
        """CREATE TABLE s (id int PRIMARY KEY, code text); INSERT INTO s VALUES (1, NULL), (2, NULL), (3, 'a');
           CREATE TABLE t (code text UNIQUE, n int)""",
    )
    project(tmp_path, "tables: [{source: s, target: t, key: [code], columns: {code: code, n: id}}]\n")
    out = run_cli("p", "--yes", "--no-backup", url=db_url, cwd=tmp_path)
    assert out.returncode == 3, out.stderr  # rows with a NULL key cannot be matched: a re-run would copy them again
    assert "Traceback" not in out.stderr
    out = run_cli("validate", "p", "--deep", "--format", "json", url=db_url, cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    table = json.loads(out.stdout)["tables"][0]
    assert (table["missing"], table["extra"]) == (2, 2)
    assert {tuple(s["key"]) for s in table["samples"]} == {(None,)}
    out = run_cli("validate", "p", "--deep", url=db_url, cwd=tmp_path)
    assert "missing key NULL" in out.stdout and "extra key NULL" in out.stdout
