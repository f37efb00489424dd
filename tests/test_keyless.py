"""Tables without a unique key: refused with the options; copied by physical block ranges with `batch_by: ctid`,
exactly once (kill -9 and resume), validated by counts and a hash of the whole multiset of rows, rolled back."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import run, run_cli, scalar, sql
from killer import kill_at
from migrate_data import api
from migrate_data.errors import PreflightError
from migrate_data.settings import Settings

# A log without any key: 20,000 rows, many of them identical (the multiset matters), 20 with a level too long for
# the target's varchar(5) (quarantined, 22001).
SOURCE = """
CREATE TABLE logs (at timestamptz NOT NULL, level text, msg text);
INSERT INTO logs SELECT timestamptz '2024-01-01 00:00+00' + (i % 500) * interval '1 minute',
    CASE WHEN i % 1000 = 0 THEN 'CRITICAL' ELSE (ARRAY['info', 'warn', 'error'])[1 + i % 3] END, 'm' || (i % 700)
FROM generate_series(1, 20000) i;
CREATE TABLE registros (id bigserial PRIMARY KEY, ocurrido timestamptz NOT NULL, nivel varchar(5), mensaje text);
"""
MAPPING = """
tables:
  - source: logs
    target: registros
    batch_by: ctid
    columns: {ocurrido: at, nivel: level, mensaje: msg}
"""
ARGS = ["night", "--yes", "--no-backup", "--batch-size", "1000", "--jobs", "1"]


def project(tmp_path: Path, mapping: str = MAPPING) -> Path:
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "mappings" / "night.yaml").write_text(textwrap.dedent(mapping))
    return tmp_path


def settings(url: str, proj: Path) -> Settings:
    return Settings(database_url=url, project_dir=proj, output_dir=proj / "out")


def cli(url: str, proj: Path, *args: str):
    return run_cli(*args, url=url, cwd=proj, env={"MIGRATE_DATA_OUTPUT_DIR": str(proj / "out")})


def multiset(url: str, table: str, cols: str) -> list:
    return [tuple(r) for r in sql(url, f"SELECT {cols}, count(*) FROM {table} GROUP BY {cols} ORDER BY {cols}")]


@pytest.fixture
def logs(db_url: str) -> str:
    sql(db_url, SOURCE)
    return db_url


def test_a_table_without_a_key_is_refused_with_the_options(logs, tmp_path):
    mapping = MAPPING.replace("    batch_by: ctid\n", "    key: [ocurrido]\n")
    with pytest.raises(PreflightError) as e:
        run(api.run_phase(settings(logs, project(tmp_path, mapping)), "night", api.RunOptions(backup=False)))
    text = f"{e.value.message}\n{e.value.detail}"
    assert "batch_by (at) is not unique in logs; keyset batches would skip rows" in text
    assert "a primary key, or a unique index on NOT NULL columns" in text
    assert "batch_by: ctid" in text and "must then not be written during the copy" in text
    assert "a hash of the whole multiset of rows" in text


def test_copied_by_block_ranges_exactly_validated_as_a_multiset_and_rolled_back(logs, tmp_path):
    proj = project(tmp_path)
    plan = run(api.plan(settings(logs, proj), "night"))
    assert not plan.plan.errors
    (step,) = [s for s in plan.steps if s.step == "copy"]
    copy = "\n".join(sqls for heading, part in step.parts if heading.endswith("-> public.registros") for sqls in part)
    assert '"logs"."ctid" > CAST($1::text AS tid) AND "logs"."ctid" <= CAST($2::text AS tid)' in copy
    assert "ON CONFLICT" not in copy  # the target gets no key from the mapping: each range is copied once
    warning = next(f.message for f in plan.plan.findings if "physical blocks" in f.message)
    assert "it must not be written until the copy is validated" in warning and "--recheck is refused" in warning
    opts = api.RunOptions(backup=False, batch_size=1000, jobs=2, split_rows=5000)
    result = run(api.run_phase(settings(logs, proj), "night", opts))
    assert result.validation.ok and result.validation.deep
    [table] = result.tables
    assert (table.rows_read, table.rows_written, table.rejected) == (20000, 19980, 20)
    # two concurrent block ranges, each in about 1,000-row batches, ending at block boundaries
    parts = sql(logs, "SELECT lo, hi, last_key, rows_read, done FROM migrate_data.checkpoints ORDER BY part")
    blocks = scalar(logs, "SELECT pg_relation_size('logs') / 8192")
    assert len(parts) == 2 and parts[0]["hi"] == parts[1]["lo"] == [f"({blocks // 2},0)"]
    assert parts[1]["last_key"] == [f"({blocks},0)"] and all(p["done"] for p in parts)
    # the multiset is the source's (identical rows included), less the quarantined
    assert multiset(logs, "registros", "ocurrido, nivel, mensaje") == multiset(
        logs, "(SELECT * FROM logs WHERE level <> 'CRITICAL') s", "at, level, msg"
    )
    rejects = sql(logs, "SELECT source_key, sqlstate FROM migrate_data.rejects ORDER BY id")
    assert len(rejects) == 20 and {r["sqlstate"] for r in rejects} == {"22001"}
    assert scalar(logs, "SELECT level FROM logs WHERE ctid = $1::text::tid", rejects[0]["source_key"][0]) == "CRITICAL"
    # one changed row: counts agree, the multiset does not
    sql(logs, "UPDATE registros SET mensaje = 'changed' WHERE id = (SELECT min(id) FROM registros)")
    deep = run(api.validate(settings(logs, proj), "night", deep=True))
    assert not deep.ok
    assert (deep.tables[0].missing, deep.tables[0].extra) == (1, 1)
    assert "1 rows missing from public.registros (besides 20 rejected)" in deep.tables[0].problems
    assert run(api.validate(settings(logs, proj), "night")).ok  # counts alone cannot see it
    # --recheck cannot recognise copied rows without a key
    out = cli(logs, proj, *ARGS, "--recheck")
    assert out.returncode == 2 and "copied by blocks (batch_by: ctid) into a table without a key" in out.stderr
    undone = run(api.rollback(settings(logs, proj), "night", force=True))
    assert sum(undone.deleted.values()) == 19980 and scalar(logs, "SELECT count(*) FROM registros") == 0


def test_killed_in_the_middle_of_a_block_copy_resumes_exactly(logs, tmp_path):
    proj = project(tmp_path)
    killed = kill_at("migrate_data.copier:Copier._batch:return", *ARGS, url=logs, cwd=proj, nth=7)
    assert killed.returncode == -9, killed.stderr
    [part] = sql(logs, "SELECT last_key, rows_read, rows_written, done FROM migrate_data.checkpoints")
    assert not part["done"] and 0 < part["rows_read"] < 20000
    assert scalar(logs, "SELECT count(*) FROM registros") == part["rows_written"]
    # the checkpoint is a block boundary: everything before it is in the target, nothing after it
    boundary = part["last_key"][0]
    assert (
        scalar(logs, "SELECT count(*) FROM logs WHERE ctid <= $1::text::tid AND level <> 'CRITICAL'", boundary)
        == part["rows_written"]
    )
    again = cli(logs, proj, *ARGS)
    assert again.returncode == 0, again.stderr
    assert multiset(logs, "registros", "ocurrido, nivel, mensaje") == multiset(
        logs, "(SELECT * FROM logs WHERE level <> 'CRITICAL') s", "at, level, msg"
    )
    deep = cli(logs, proj, "validate", "night", "--deep")
    assert deep.returncode == 0, deep.stdout + deep.stderr


def test_batch_by_ctid_with_a_target_key_keeps_on_conflict_and_recheck(db_url, tmp_path):
    """A keyless source whose rows do carry a value that the target's key takes: ON CONFLICT works as usual."""
    sql(
        db_url,
        "CREATE TABLE codes (code text NOT NULL, label text); "
        "INSERT INTO codes SELECT 'c' || i, 'l' || i FROM generate_series(1, 3000) i; "
        "CREATE TABLE codigos (codigo text PRIMARY KEY, etiqueta text)",
    )
    mapping = """
    tables:
      - source: codes
        target: codigos
        batch_by: ctid
        columns: {codigo: code, etiqueta: label}
    """
    proj = project(tmp_path, mapping)
    first = run(api.run_phase(settings(db_url, proj), "night", api.RunOptions(backup=False, batch_size=500)))
    assert first.validation.ok and first.tables[0].rows_written == 3000
    again = run(api.run_phase(settings(db_url, proj), "night", api.RunOptions(backup=False, recheck=True)))
    assert again.validation.ok and (again.tables[0].rows_read, again.tables[0].rows_written) == (3000, 0)


def test_ctid_must_stand_alone_in_batch_by(db_url, tmp_path):
    mapping = MAPPING.replace("batch_by: ctid", "batch_by: [ctid, at]")
    out = cli(db_url, project(tmp_path, mapping), "plan", "night")
    assert out.returncode == 2 and "tables[0].batch_by: ctid pages by physical blocks on its own" in out.stderr


def test_block_copy_across_two_databases(make_db, tmp_path):
    source, target = make_db(), make_db()
    sql(source, SOURCE)
    sql(
        target,
        "CREATE TABLE registros (id bigserial PRIMARY KEY, ocurrido timestamptz NOT NULL, nivel varchar(5), "
        "mensaje text)",
    )
    proj = project(tmp_path)
    two = Settings(database_url=target, source_url=source, project_dir=proj, output_dir=proj / "out")
    result = run(api.run_phase(two, "night", api.RunOptions(backup=False, batch_size=3000)))
    assert result.validation.ok and result.validation.deep
    assert (result.tables[0].rows_written, result.tables[0].rejected) == (19980, 20)
    sql(target, "UPDATE registros SET mensaje = 'changed' WHERE id = (SELECT min(id) FROM registros)")
    deep = run(api.validate(two, "night", deep=True))
    assert not deep.ok and deep.tables[0].differs == 1  # across databases: one count and one sum per side
