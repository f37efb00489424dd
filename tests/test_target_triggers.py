"""Triggers on the target tables: `target_triggers: fire` (the default) lets them change the copied rows, which
--deep then reports; `skip` copies with session_replication_role = replica, the values arrive as the mapping made
them, and the foreign keys that replica mode silences are checked by the insert itself (rows quarantined 23503)."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from conftest import run, run_cli, scalar, sql
from migrate_data import api
from migrate_data.mapping import QualifiedName
from migrate_data.settings import Settings

# Authors and their posts; post 250 has an author that does not exist, and every post from 11 on answers the post 10
# before it, so the posts that answer 250 (260, 270, …) lose their parent when it is quarantined.
SCHEMA = """
CREATE TABLE authors (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE posts (id int PRIMARY KEY, author_id int, title text NOT NULL, updated_at timestamptz NOT NULL,
                    parent_id int);
INSERT INTO authors SELECT i, 'a' || i FROM generate_series(1, 50) i;
INSERT INTO posts SELECT i, CASE WHEN i = 250 THEN 999 ELSE 1 + i % 50 END, 't' || i,
    timestamptz '2024-01-01 00:00+00' + i * interval '1 hour', CASE WHEN i > 10 THEN i - 10 END
FROM generate_series(1, 2000) i;
CREATE TABLE autores (id int PRIMARY KEY, nombre text NOT NULL);
CREATE TABLE entradas (id int PRIMARY KEY, autor_id int REFERENCES autores, titulo text NOT NULL,
                       actualizado_at timestamptz NOT NULL, padre_id int REFERENCES entradas);
CREATE FUNCTION tocar() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.actualizado_at := now(); RETURN NEW; END $$;
CREATE TRIGGER entradas_tocar BEFORE INSERT OR UPDATE ON entradas FOR EACH ROW EXECUTE FUNCTION tocar();
"""
MAPPING = """
{mode}
tables:
  - source: authors
    target: autores
    columns: {{id: id, nombre: name}}
  - source: posts
    target: entradas
    columns: {{id: id, autor_id: author_id, titulo: title, actualizado_at: updated_at, padre_id: parent_id}}
"""
ORPHANS = 1 + len(range(260, 2001, 10))  # post 250, and every post that answers it, directly or not


def project(tmp_path: Path, mode: str = "") -> Path:
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "mappings" / "night.yaml").write_text(textwrap.dedent(MAPPING.format(mode=mode)))
    return tmp_path


def settings(url: str, proj: Path) -> Settings:
    return Settings(database_url=url, project_dir=proj, output_dir=proj / "out")


def cli(url: str, proj: Path, *args: str):
    return run_cli(*args, url=url, cwd=proj, env={"MIGRATE_DATA_OUTPUT_DIR": str(proj / "out")})


@pytest.fixture
def blog(db_url: str) -> str:
    sql(db_url, SCHEMA)
    return db_url


def test_by_default_the_trigger_fires_plan_warns_and_deep_reports_the_changed_column(blog, tmp_path):
    proj = project(tmp_path)
    plan = cli(blog, proj, "plan", "night")
    assert plan.returncode == 0, plan.stderr
    assert (
        "WARNING: entradas: target_triggers: fire (the default): entradas_tocar (BEFORE INSERT OR UPDATE FOR EACH "
        "ROW, tocar()) fire on every copied row" in plan.stdout
    )
    result = run(api.run_phase(settings(blog, proj), "night", api.RunOptions(backup=False)))
    assert result.status == "invalid"
    entradas = next(t for t in result.validation.tables if t.target == "public.entradas")
    assert entradas.differs == 2000 - ORPHANS
    assert {c["column"] for c in entradas.samples[0]["columns"]} == {"actualizado_at"}
    # said explicitly, it is no longer a warning
    plan = cli(blog, project(tmp_path, "target_triggers: fire"), "plan", "night")
    assert "INFO: entradas: target_triggers: fire: entradas_tocar" in plan.stdout


def test_skip_copies_the_values_as_mapped_checks_foreign_keys_itself_and_rolls_back(blog, tmp_path):
    proj = project(tmp_path, "target_triggers: skip")
    plan = cli(blog, proj, "plan", "night")
    assert plan.returncode == 0, plan.stderr
    assert "INFO: entradas: target_triggers: skip: entradas_tocar (BEFORE INSERT OR UPDATE" in plan.stdout
    assert "do not fire on the copied rows (session_replication_role = replica in each batch)" in plan.stdout
    result = run(api.run_phase(settings(blog, proj), "night", api.RunOptions(backup=False, batch_size=300)))
    assert result.validation.ok and result.validation.deep, result.validation
    assert scalar(blog, "SELECT count(*) FROM entradas e JOIN posts p USING (id) WHERE e.actualizado_at = p.updated_at")
    assert scalar(blog, "SELECT count(*) FROM entradas") == 2000 - ORPHANS
    # the foreign keys silenced by replica mode refused what they would have refused, with their own words
    rejects = sql(blog, "SELECT source_key, sqlstate, detail FROM migrate_data.rejects ORDER BY source_key[1]::int")
    assert len(rejects) == ORPHANS and {r["sqlstate"] for r in rejects} == {"23503"}
    assert rejects[0]["source_key"] == ["250"]
    assert rejects[0]["detail"] == 'Key (autor_id)=(999) is not present in table "autores".'
    assert rejects[1]["detail"] == 'Key (padre_id)=(250) is not present in table "entradas".'
    assert (
        scalar(
            blog,
            "SELECT count(*) FROM entradas c WHERE NOT EXISTS (SELECT 1 FROM entradas p WHERE p.id = "
            "c.padre_id) AND c.padre_id IS NOT NULL",
        )
        == 0
    )
    # only the copy's own session skipped the trigger: the application's rows still get it
    sql(blog, "INSERT INTO entradas VALUES (5000, 1, 'app', '2000-01-01', NULL)")
    assert scalar(blog, "SELECT actualizado_at > '2020-01-01' FROM entradas WHERE id = 5000") is True
    sql(blog, "DELETE FROM entradas WHERE id = 5000")
    undone = run(api.rollback(settings(blog, proj), "night"))
    assert undone.deleted == {"public.entradas": 2000 - ORPHANS, "public.autores": 50}


def test_skip_is_refused_by_the_preflight_for_a_role_that_may_not_set_replica_mode(blog, tmp_path):
    role = f"md_nosu_{uuid.uuid4().hex[:8]}"
    sql(
        blog,
        f'CREATE ROLE "{role}" LOGIN; GRANT CREATE ON SCHEMA public TO "{role}"; '
        f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"; '
        f'GRANT CREATE ON DATABASE "{scalar(blog, "SELECT current_database()")}" TO "{role}"',
    )
    parts = urlsplit(blog)
    url = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
    try:
        result = run(api.plan(settings(url, project(tmp_path, "target_triggers: skip")), "night"))
        messages = [f.message for f in result.plan.errors]
        assert any(
            "target_triggers: skip needs session_replication_role = replica, which this role may not set" in m
            and "GRANT SET ON PARAMETER session_replication_role" in m
            for m in messages
        ), messages
    finally:
        sql(blog, f'DROP OWNED BY "{role}"')
        sql(blog, f'DROP ROLE "{role}"')


def test_target_triggers_takes_fire_or_skip(db_url, tmp_path):
    out = cli(db_url, project(tmp_path, "target_triggers: sometimes"), "plan", "night")
    assert out.returncode == 2
    assert "target_triggers: 'sometimes': expected fire or skip" in out.stderr


def test_target_triggers_skip_makes_the_insert_check_the_foreign_keys():
    from migrate_data.catalog import Column, ForeignKey, Table
    from migrate_data.compile import compile_table
    from migrate_data.mapping import ColumnSpec, TableMapping

    cols = tuple(Column(n, "integer", n == "id", False, "", False) for n in ("id", "parent", "owner"))
    fks = (
        ForeignKey("t_owner_fkey", ("owner",), QualifiedName("owners", "public"), ("id",), False, True),
        ForeignKey("t_parent_fkey", ("parent",), QualifiedName("t", "public"), ("id",), False, True),
    )
    source = Table("public", "s", cols, ("id",), (("id",),), ())
    target = Table("public", "t", cols, ("id",), (("id",),), fks)
    columns = tuple(ColumnSpec(target=c, kind="column", column=c, line=1) for c in ("id", "parent", "owner"))
    mapping = TableMapping(QualifiedName("s"), QualifiedName("t"), columns, line=1, target_triggers="skip")
    ct = compile_table(mapping, source, target)
    sql_ = ct.insert_sql(lower=True, upper=True)
    assert ct.replica and ct.insert_counts and not ct.direct_copy_ok
    assert sql_.startswith('WITH ins AS (INSERT INTO "public"."t"')
    assert 'RETURNING "owner" AS "fk0_0", "parent" AS "fk1_0", "id" AS "fkref1_0")' in sql_
    assert 'NOT EXISTS (SELECT 1 FROM "public"."owners" AS p WHERE p."id" = i."fk0_0")' in sql_
    assert 'NOT EXISTS (SELECT 1 FROM ins AS j WHERE j."fkref1_0" = i."fk1_0")' in sql_  # a parent in the same insert
    assert "refuse('23503', b.m, b.d" in sql_
    fire = compile_table(TableMapping(QualifiedName("s"), QualifiedName("t"), columns, line=1), source, target)
    assert not fire.replica and fire.insert_sql(lower=True, upper=True).startswith('INSERT INTO "public"."t"')
