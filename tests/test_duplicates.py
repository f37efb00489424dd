"""Two source rows, one target key: the second is quarantined as a duplicate (23505), never dropped in silence by
ON CONFLICT DO NOTHING; rows that conflict with themselves (a re-run, --recheck) are not."""

from __future__ import annotations

import textwrap

import pytest

from conftest import run, sql
from migrate_data import api
from migrate_data.settings import Settings

SOURCE = """
CREATE TABLE s (id int PRIMARY KEY, code text, val text);
INSERT INTO s VALUES (1, 'A', 'first'), (2, 'B', 'b'), (3, 'a ', 'second'), (4, 'C', 'c'), (5, 'A', 'third');
"""
TARGET = "CREATE TABLE t (code text PRIMARY KEY, val text);"
MAPPING = """
tables:
  - source: s
    target: t
    columns:
      code: {sql: "upper(trim(s.code))"}
      val: val
"""


@pytest.fixture(params=["same database", "two databases"])
def phase(request, make_db, tmp_path):
    source = make_db()
    target = source if request.param == "same database" else make_db()
    sql(source, SOURCE)
    sql(target, TARGET)
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "p.yaml").write_text(textwrap.dedent(MAPPING))
    settings = Settings(database_url=target, project_dir=tmp_path, output_dir=tmp_path)
    if source != target:
        settings = settings.with_(source_url=source)

    def go(**opts) -> api.RunResult:
        return run(api.run_phase(settings, "p", api.RunOptions(backup=False, max_reject_share=None, **opts)))

    return go, target


def duplicates(url: str) -> list[tuple[list[str], str]]:
    return [
        (list(r["source_key"]), r["sqlstate"])
        for r in sql(url, "SELECT source_key, sqlstate FROM migrate_data.rejects ORDER BY source_key")
    ]


@pytest.mark.parametrize("batch_size", [1, 100])  # across batches, and inside one
def test_second_source_row_of_a_target_key_is_quarantined_as_a_duplicate(phase, batch_size):
    go, url = phase
    result = go(batch_size=batch_size)
    assert duplicates(url) == [(["3"], "23505"), (["5"], "23505")]
    assert {r["code"]: r["val"] for r in sql(url, "SELECT * FROM t")} == {"A": "first", "B": "b", "C": "c"}
    assert result.tables[0].rejected == 2 and result.validation.ok  # 5 source rows = 3 copied + 2 quarantined
    reject = sql(url, "SELECT message, detail, row FROM migrate_data.rejects WHERE source_key = '{3}'")[0]
    assert reject["message"] == "duplicate target key (code) of public.t: another source row produces it"
    assert reject["detail"] == "Key (code)=(A) is produced by source rows (id)=(1), which is kept, and (3)."
    assert '"val": "second"' in reject["row"]


def test_recheck_over_copied_rows_quarantines_only_the_duplicates_again(phase):
    go, url = phase
    go(batch_size=2)
    result = go(batch_size=2, recheck=True)
    assert duplicates(url) == [(["3"], "23505"), (["5"], "23505")]
    assert result.tables[0].rows_written == 0 and result.validation.ok


def test_the_row_the_target_holds_is_kept_whatever_the_order(phase):
    go, url = phase
    sql(url, "INSERT INTO t VALUES ('A', 'second')")  # e.g. copied by an earlier run in another order
    go(batch_size=1)
    assert duplicates(url) == [(["1"], "23505"), (["5"], "23505")]
    assert {r["code"]: r["val"] for r in sql(url, "SELECT * FROM t")}["A"] == "second"
