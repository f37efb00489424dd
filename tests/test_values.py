"""No silent value change: a value that would be cut or rounded is quarantined unless the mapping allows it, and a
timestamp <-> timestamptz conversion happens in the time zone the mapping names, on both copy paths."""

from __future__ import annotations

import json
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from conftest import run, run_cli, scalar, sql
from migrate_data import api
from migrate_data.errors import PreflightError
from migrate_data.settings import Settings

SOURCE = """
CREATE TABLE s (id int PRIMARY KEY, name varchar(300), amount numeric(12, 4), qty numeric, at timestamp);
INSERT INTO s VALUES
  (1, 'short', 12.5000, 3, '2025-01-01 10:00'),
  (2, 'much longer than ten', 1.0000, 4, '2025-06-01 10:00'),
  (3, 'ok', 12.3450, 5, NULL),
  (4, 'padded    ' || '   ', 2.0000, 6.5, '2025-01-01 00:00'),
  (5, NULL, NULL, NULL, NULL);
"""
TARGET = """
CREATE TABLE t (id int PRIMARY KEY, name varchar(10), amount numeric(8, 2), qty integer, at timestamptz);
"""


def write(project: Path, mapping: str) -> Path:
    (project / "mappings").mkdir(exist_ok=True)
    (project / "mappings" / "p.yaml").write_text(textwrap.dedent(mapping))
    return project


COLUMNS = """
tables:
  - source: s
    target: t
    columns:
      id: id
      name: name
      amount: amount
      qty: qty
"""


@pytest.fixture(params=["same database", "two databases"])
def copy(request, make_db, tmp_path):
    """Run the phase on one database, or from a source database into another; return (settings, target url)."""
    source = make_db()
    target = source if request.param == "same database" else make_db()
    sql(source, SOURCE)
    sql(target, TARGET)

    def go(mapping: str, **opts) -> tuple[Settings, str, api.RunResult]:
        settings = Settings(database_url=target, project_dir=write(tmp_path, mapping), output_dir=tmp_path)
        if source != target:
            settings = settings.with_(source_url=source)
        options = api.RunOptions(backup=False, max_reject_share=None, **opts)
        return settings, target, run(api.run_phase(settings, "p", options))

    return go


def rejects(url: str) -> dict[int, str]:
    return {int(r["source_key"][0]): r["sqlstate"] for r in sql(url, "SELECT * FROM migrate_data.rejects")}


def test_values_that_would_be_cut_or_rounded_are_quarantined_on_both_paths(copy):
    _, url, result = copy(COLUMNS, batch_size=2)
    # 2: 20 characters into varchar(10); 4: trailing spaces an assignment would drop; 3: 12.3450 -> 12.35;
    # 4: 6.5 into an integer
    assert rejects(url) == {2: "22001", 3: "22003", 4: "22001"}
    rows = {r["id"]: r for r in sql(url, "SELECT * FROM t")}
    assert set(rows) == {1, 5}
    assert (rows[1]["name"], rows[1]["amount"], rows[1]["qty"]) == ("short", Decimal("12.50"), 3)
    assert result.validation.ok and result.validation.deep  # the quarantined rows are accounted for
    detail = scalar(url, "SELECT detail FROM migrate_data.rejects WHERE source_key = '{2}'")
    assert detail == "'much longer than ten' would be stored as 'much longe'"


def test_truncate_and_round_make_the_change_explicit_and_deep_accepts_it(copy):
    mapping = COLUMNS.replace("name: name", "name: {column: name, truncate: true}")
    mapping = mapping.replace("amount: amount", "amount: {column: amount, round: true}")
    mapping = mapping.replace("qty: qty", "qty: {column: qty, round: true}")
    _, url, result = copy(mapping)
    assert rejects(url) == {}
    rows = {r["id"]: r for r in sql(url, "SELECT * FROM t")}
    assert rows[2]["name"] == "much longe" and rows[3]["amount"] == Decimal("12.35") and rows[4]["qty"] == 7
    assert result.validation.ok


def test_deep_finds_a_value_that_was_cut_silently(copy):
    settings, url, _ = copy(COLUMNS)
    # what an older copier did: row 2 cut to fit, and no reject recorded for it
    sql(url, "DELETE FROM migrate_data.rejects WHERE source_key = '{2}'")
    sql(url, "INSERT INTO t (id, name, amount, qty) VALUES (2, 'much longe', 1, 4)")
    result = run(api.validate(settings, "p", deep=True))
    t = result.tables[0]
    assert not result.ok and (t.differs, t.missing, t.extra) == (1, 0, 0)
    sample = t.samples[0]
    assert sample["key"] == ["2"]
    assert sample["columns"] == [{"column": "name", "expected": "much longer than ten", "actual": "much longe"}]


def test_a_constant_that_does_not_fit_stops_the_pre_flight(copy):
    with pytest.raises(PreflightError) as e:
        copy(COLUMNS.replace("name: name", "name: {column: name, default: 'far too long a name'}"))
    assert "columns.name: default 'far too long a name' does not fit character varying(10)" in e.value.detail


def test_plan_counts_the_rows_each_narrowing_column_would_change(make_db, tmp_path):
    url = make_db()
    sql(url, SOURCE)
    sql(url, TARGET)
    write(tmp_path, COLUMNS)
    out = run_cli("plan", "p", url=url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (
        "WARNING: public.t: name: 2 rows have values that character varying(10) would have cut; "
        "they will be quarantined (22001)" in out.stdout
    )
    assert "WARNING: public.t: amount: 1 rows have values that numeric(8,2) would have rounded" in out.stdout
    assert "WARNING: public.t: qty: 1 rows have values that integer would have rounded" in out.stdout
    write(tmp_path, COLUMNS.replace("name: name", "name: {column: name, truncate: true}"))
    out = run_cli("plan", "p", url=url, cwd=tmp_path)
    assert (
        "WARNING: public.t: name: 2 rows have values that will be cut to character varying(10) (`truncate: true`)"
        in out.stdout
    )


# -- time zones ----------------------------------------------------------------------------------
ZONED = """
timezone: America/Guayaquil
tables:
  - source: s
    target: t
    columns:
      id: id
      at: at
"""


def test_timestamp_to_timestamptz_without_a_zone_is_refused_naming_file_line_and_column(make_db, tmp_path):
    url = make_db()
    sql(url, SOURCE)
    sql(url, TARGET)
    write(tmp_path, ZONED.replace("timezone: America/Guayaquil\n", ""))
    out = run_cli("plan", "p", url=url, cwd=tmp_path)
    assert out.returncode == 2
    assert (
        "mappings/p.yaml:7 tables[0].columns.at: timestamp without time zone -> timestamp with time zone "
        "needs a time zone" in out.stdout
    )
    assert scalar(url, "SELECT count(*) FROM t") == 0


def test_the_mappings_time_zone_decides_not_the_sessions(copy, make_db):
    settings, url, result = copy(ZONED)
    assert result.validation.ok
    got = {
        r["id"]: r["utc"]
        for r in sql(url, "SELECT id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') AS utc FROM t")
    }
    assert got[1] == "2025-01-01 15:00" and got[2] == "2025-06-01 15:00" and got[3] is None


def test_the_session_time_zone_changes_nothing(make_db, tmp_path):
    url = make_db()
    sql(url, SOURCE)
    sql(url, TARGET)
    sql(
        url,
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET timezone = %L', current_database(), 'Asia/Tokyo'); END $$",
    )
    write(tmp_path, ZONED.replace("at: at", "at: {column: at, timezone: UTC}"))
    settings = Settings(database_url=url, project_dir=tmp_path, output_dir=tmp_path)
    result = run(api.run_phase(settings, "p", api.RunOptions(backup=False)))
    assert result.validation.ok
    assert scalar(url, "SELECT to_char(at AT TIME ZONE 'UTC', 'HH24:MI') FROM t WHERE id = 1") == "10:00"
    out = run_cli("plan", "p", "--format", "json", url=url, cwd=tmp_path)
    findings = [f["message"] for f in json.loads(out.stdout)["findings"]]
    assert "at: timestamp without time zone converted as timestamp with time zone, in time zone UTC" in findings


@pytest.mark.parametrize(
    "source_type, value, target_type",
    [
        ("timestamp", "'2025-03-01 13:45:12'", "date"),
        ("timestamp", "'2025-03-01 13:45:12'", "time"),
        ("double precision", "1.23456789012345", "real"),
        ("numeric(30,10)", "12345678901234567890.1234567891", "double precision"),
    ],
)
def test_a_narrowing_conversion_quarantines_the_value_it_would_change(
    db_url, tmp_path, source_type, value, target_type
):
    from conftest import scalar, sql
    from migrate_data import api
    from migrate_data.settings import Settings

    sql(
        db_url,
        f"CREATE TABLE src (id int PRIMARY KEY, v {source_type}); CREATE TABLE dst (id int PRIMARY KEY, v {target_type});"
        f"INSERT INTO src VALUES (1, {value}), (2, NULL);",
    )
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "night.yaml").write_text(
        "tables:\n  - {source: src, target: dst, columns: {id: id, v: v}}\n"
    )
    settings = Settings(database_url=db_url, project_dir=tmp_path, output_dir=tmp_path)
    result = run(api.run_phase(settings, "night", api.RunOptions(backup=False, max_reject_share=None)))
    assert scalar(db_url, "SELECT sqlstate FROM migrate_data.rejects") == "22003"
    assert scalar(db_url, "SELECT count(*) FROM dst") == 1 and result.validation.ok


def test_dates_and_intervals_arrive_unchanged_across_two_databases_whose_sessions_write_them_differently(
    make_db, tmp_path
):
    """Across two databases values travel as text: a source whose sessions write dates day first (a European
    server's DateStyle) and intervals the SQL-standard way must not give the target other days or other spans."""
    from test_partitions import project

    source, target = make_db(), make_db()
    sql(
        source,
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET DateStyle = ''SQL, DMY''', current_database()); "
        "EXECUTE format('ALTER DATABASE %I SET IntervalStyle = ''sql_standard''', current_database()); END $$;",
    )
    sql(
        source,
        "CREATE TABLE spans (id int PRIMARY KEY, d date, t timestamp, i interval);"
        "INSERT INTO spans VALUES (1, '2024-02-01', '2024-03-04 05:06:07.5', '-1 day +02:03:04'), "
        "(2, '2024-12-11', '2024-01-12 00:00:00', '1 year 2 months -3 days')",
    )
    sql(target, "CREATE TABLE lapsos (id int PRIMARY KEY, d date, t timestamp, i interval)")
    proj = project(
        tmp_path, "tables:\n  - source: spans\n    target: lapsos\n    columns: {id: id, d: d, t: t, i: i}\n"
    )
    two = Settings(database_url=target, source_url=source, project_dir=proj, output_dir=proj / "out")
    result = run(api.run_phase(two, "night", api.RunOptions(backup=False)))
    assert result.validation.ok
    query = "SELECT id, d::text, t::text, i::text FROM {} ORDER BY id"
    want = [
        (1, "2024-02-01", "2024-03-04 05:06:07.5", "-1 days +02:03:04"),
        (2, "2024-12-11", "2024-01-12 00:00:00", "1 year 2 mons -3 days"),
    ]
    got = [tuple(r) for r in sql(target, query.format("lapsos"))]
    assert got == want
