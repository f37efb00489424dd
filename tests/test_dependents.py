"""Objects that depend on a legacy table: plan lists them, a phase that drops the table refuses without a decision
(and changes nothing), with one it saves their definitions and drops them, and its rollback brings them back."""

from __future__ import annotations

import json
import stat
import textwrap
from pathlib import Path

import asyncpg
import pytest
from clikit import invoke

from conftest import run, run_cli, scalar, sql
from killer import kill_at
from migrate_data import api
from migrate_data.errors import MappingError, RefusedError
from migrate_data.loader import load_phase
from migrate_data.project import init_project

LEGACY = """
CREATE TABLE things (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO things SELECT i, 'thing ' || i FROM generate_series(1, 200) AS i;
CREATE TABLE notes (id int PRIMARY KEY, thing_id int REFERENCES things (id));
INSERT INTO notes SELECT i, i FROM generate_series(1, 20) AS i;
CREATE VIEW thing_names AS SELECT id, upper(name) AS name FROM things;
CREATE VIEW first_things AS SELECT * FROM thing_names WHERE id <= 10;
CREATE MATERIALIZED VIEW thing_count AS SELECT count(*) AS n FROM things;
CREATE FUNCTION count_things() RETURNS bigint LANGUAGE sql BEGIN ATOMIC SELECT count(*) FROM things; END;
CREATE FUNCTION last_thing() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN (SELECT max(id) FROM Things); END $$;
CREATE FUNCTION not_about_things() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$;  -- "things_x" only
COMMENT ON FUNCTION not_about_things() IS 'things_x';
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.name := NEW.name || ' (stamped)'; RETURN NEW; END $$;
CREATE TRIGGER things_stamp BEFORE INSERT ON things FOR EACH ROW EXECUTE FUNCTION stamp();
ALTER TABLE things ENABLE ROW LEVEL SECURITY;
CREATE POLICY things_visible ON things USING (id > 0);
CREATE PUBLICATION things_pub FOR TABLE things;
"""
CREATE_COSAS = "CREATE TABLE cosas (id int PRIMARY KEY, nombre text NOT NULL)"
REVISIONS = {
    "cosas": ("None", f'op.execute("{CREATE_COSAS}")', 'op.execute("DROP TABLE cosas")'),
    "drop_things": (
        "'cosas'",
        'op.execute("DROP TABLE things")',  # no CASCADE, as a revision should be written
        'op.execute("CREATE TABLE things (id int PRIMARY KEY, name text NOT NULL)")',
    ),
}
COPY = """
description: Copiar things
revision: cosas
tables:
  - source: things
    target: cosas
    columns:
      id: id
      nombre: name
"""
DROP = """
description: Eliminar things
requires: [copy]
revision: drop_things
backup: [things]
"""
DEPENDENTS = {  # (kind, name) -> what the drop does with it
    ("view", "public.thing_names"): "dropped by CASCADE",
    ("view", "public.first_things"): "dropped by CASCADE",
    ("materialized view", "public.thing_count"): "dropped by CASCADE",
    ("function", "public.count_things()"): "dropped by CASCADE",
    ("table constraint", "notes_thing_id_fkey on public.notes"): "dropped by CASCADE",
    ("trigger", "things_stamp on public.things"): "dropped with the table",
    ("policy", "things_visible on public.things"): "dropped with the table",
    ("publication relation", "public.things in publication things_pub"): "dropped with the table",
    ("plpgsql function", "public.last_thing()"): "may reference",
}


def make_project(
    root: Path, drop: str = DROP, *, revisions: dict[str, tuple[str, str, str]] = REVISIONS, copy: str = COPY
) -> Path:
    """A project of two phases, ``copy`` and ``drop``, each with its revision (down_revision, upgrade, downgrade: the
    bodies as Python)."""
    init_project(root)
    for rev, (down, up, downgrade) in revisions.items():
        (root / "alembic" / "versions" / f"{rev}.py").write_text(
            f"from alembic import op\n\nrevision = {rev!r}\ndown_revision = {down}\nbranch_labels = None\n"
            f"depends_on = None\n\n\ndef upgrade():\n    {up}\n\n\ndef downgrade():\n    {downgrade}\n"
        )
    for f in (root / "mappings").glob("*"):
        f.unlink()
    (root / "mappings" / "copy.yaml").write_text(textwrap.dedent(copy))
    (root / "mappings" / "drop.yaml").write_text(textwrap.dedent(drop))
    return root


@pytest.fixture
def legacy(db_url, tmp_path, settings_for):
    """A database with the legacy table and its dependents, ``copy`` applied; the project and its settings."""
    sql(db_url, LEGACY)
    project = make_project(tmp_path / "project")
    settings = settings_for(db_url, project)
    run(api.run_phase(settings, "copy", api.RunOptions(backup=False)))
    return db_url, project, settings


def catalog_state(url: str) -> list:
    """Everything the test's dependents are made of, and the ledger."""
    return [
        sql(url, "SELECT relname, relkind FROM pg_class WHERE relnamespace = 'public'::regnamespace ORDER BY 1"),
        sql(url, "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1"),
        sql(url, "SELECT conname FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1"),
        sql(url, "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1"),
        sql(url, "SELECT polname FROM pg_policy ORDER BY 1"),
        sql(url, "SELECT prrelid::regclass::text FROM pg_publication_rel ORDER BY 1"),
        sql(url, "SELECT phase, state FROM migrate_data.phases ORDER BY 1"),
        sql(url, "SELECT id, kind, phase, status FROM migrate_data.runs ORDER BY 1"),
        sql(url, "SELECT version_num FROM alembic_version"),
    ]


def test_plan_lists_the_objects_that_depend_on_a_table_it_reads_and_on_one_it_drops(legacy):
    url, project, _ = legacy
    reads = invoke("plan", "copy", "--format", "json", url=url, project=project)
    assert reads.exit_code == 0, reads.output
    listed = {(d["kind"], d["name"]): d["effect"] for d in json.loads(reads.stdout)["dependents"]}
    assert listed == DEPENDENTS
    drops = invoke("plan", "drop", url=url, project=project)
    assert drops.exit_code == 2, drops.output  # it would refuse: no decision
    assert (
        "ERROR: things: view public.thing_names depends on it (dropped by CASCADE); the phase drops it" in drops.stdout
    )
    assert "ERROR: things: plpgsql function public.last_thing() depends on it (may reference)" in drops.stdout
    assert "not_about_things" not in drops.stdout
    text = invoke("plan", "copy", url=url, project=project)
    assert "INFO: things: trigger things_stamp on public.things depends on it (dropped with the table)" in text.stdout


def test_a_phase_that_drops_a_table_with_dependents_refuses_without_a_decision_and_changes_nothing(legacy):
    url, project, settings = legacy
    before = catalog_state(url)
    with pytest.raises(RefusedError, match="would drop or break 9 objects that depend on the tables it drops") as e:
        run(api.run_phase(settings, "drop", api.RunOptions()))
    assert "things: view public.first_things (dropped by CASCADE)" in e.value.detail.splitlines()
    assert "dependents: drop" in e.value.hint
    result = invoke("drop", "--yes", url=url, project=project, output_dir=settings.output_dir)
    assert result.exit_code == 2
    assert "nothing was done" in result.stderr
    assert catalog_state(url) == before  # no run, no phase state, no revision, every object still there
    assert not settings.backups_dir.exists() or not any(settings.backups_dir.iterdir())  # no backup taken


def test_keep_lets_only_objects_that_outlive_the_table_through(legacy):
    url, project, settings = legacy
    (project / "mappings" / "drop.yaml").write_text(textwrap.dedent(DROP) + "dependents: keep\n")
    with pytest.raises(RefusedError) as e:
        run(api.run_phase(settings, "drop", api.RunOptions()))
    assert "last_thing" not in e.value.detail  # a plpgsql function outlives it: kept
    assert "things: view public.thing_names (dropped by CASCADE)" in e.value.detail


@pytest.mark.parametrize("how", ["mapping", "force"])
def test_with_a_decision_the_drop_saves_the_definitions_and_the_rollback_restores_every_dependent(legacy, how):
    url, project, settings = legacy
    if how == "mapping":
        (project / "mappings" / "drop.yaml").write_text(textwrap.dedent(DROP) + "dependents:\n  things: drop\n")
    result = run(api.run_phase(settings, "drop", api.RunOptions(force=how == "force")))
    saved = Path(
        next(f.message for f in result.findings if "are saved in" in f.message).split(" saved in ")[1].split(";")[0]
    )
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600 and stat.S_IMODE(saved.parent.stat().st_mode) == 0o700
    kept = json.loads(saved.read_text())["dependents"]
    assert {(d["kind"], d["name"]) for d in kept} == set(DEPENDENTS)
    assert all(d["create"] for d in kept)
    assert scalar(url, "SELECT to_regclass('things') IS NULL AND to_regclass('thing_names') IS NULL")
    assert scalar(url, "SELECT count(*) FROM pg_proc WHERE proname = 'count_things'") == 0
    assert scalar(url, "SELECT count(*) FROM pg_constraint WHERE conname = 'notes_thing_id_fkey'") == 0
    assert scalar(url, "SELECT count(*) FROM pg_proc WHERE proname = 'last_thing'") == 1  # kept: may reference

    rolled = invoke("rollback", "drop", "--yes", url=url, project=project, output_dir=settings.output_dir)
    assert rolled.exit_code == 0, rolled.output
    assert scalar(url, "SELECT count(*) FROM things") == 200
    assert scalar(url, "SELECT count(*) FROM first_things") == 10
    assert scalar(url, "SELECT name FROM thing_names WHERE id = 3") == "THING 3"
    assert scalar(url, "SELECT n FROM thing_count") == 200
    assert scalar(url, "SELECT count_things()") == 200
    assert scalar(url, "SELECT last_thing()") == 200
    assert scalar(url, "SELECT prrelid::regclass::text FROM pg_publication_rel") == "things"
    assert scalar(url, "SELECT polname FROM pg_policy WHERE polrelid = 'things'::regclass") == "things_visible"
    assert scalar(url, "SELECT relrowsecurity FROM pg_class WHERE oid = 'things'::regclass")
    sql(url, "INSERT INTO things VALUES (201, 'new')")
    assert scalar(url, "SELECT name FROM things WHERE id = 201") == "new (stamped)"  # the trigger fires again
    with pytest.raises(asyncpg.ForeignKeyViolationError):  # the foreign key of notes is back
        sql(url, "INSERT INTO notes VALUES (99, 999)")


def working_dependents(url: str) -> list:
    return [
        scalar(url, "SELECT count(*) FROM things"),
        scalar(url, "SELECT count(*) FROM first_things"),
        scalar(url, "SELECT n FROM thing_count"),
        scalar(url, "SELECT count_things()"),
        scalar(url, "SELECT count(*) FROM pg_publication_rel"),
        scalar(url, "SELECT count(*) FROM pg_constraint WHERE conname = 'notes_thing_id_fkey'"),
        scalar(url, "SELECT count(*) FROM pg_trigger WHERE tgname = 'things_stamp'"),
        scalar(url, "SELECT count(*) FROM pg_policy WHERE polname = 'things_visible'"),
    ]


WORKING = [200, 10, 200, 200, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "step",
    [
        "migrate_data.dependents:before_drop:return",  # definitions saved, nothing committed
        "migrate_data.dependents:drop_dependents:return",  # dependents dropped in the transaction, not committed
    ],
)
def test_a_drop_killed_before_it_commits_leaves_every_dependent_and_runs_again(legacy, step):
    url, project, settings = legacy
    args = ["--project", str(project), "drop", "--yes", "--force"]
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(settings.output_dir)}
    killed = kill_at(step, *args, url=url, cwd=project, env=env)
    assert killed.returncode == -9, killed.stderr
    assert working_dependents(url) == WORKING
    assert scalar(url, "SELECT version_num FROM alembic_version") == "cosas"
    again = run_cli(*args, url=url, cwd=project, env=env)
    assert again.returncode == 0, again.stderr
    assert scalar(url, "SELECT to_regclass('things') IS NULL AND to_regclass('first_things') IS NULL")


@pytest.mark.parametrize("step", ["migrate_data.dependents:replay:enter", "migrate_data.dependents:replay:return"])
def test_a_rollback_killed_around_the_replay_recreates_the_dependents_when_run_again(legacy, step):
    url, project, settings = legacy
    run(api.run_phase(settings, "drop", api.RunOptions(force=True)))
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(settings.output_dir)}
    args = ["--project", str(project), "rollback", "drop", "--yes"]
    killed = kill_at(step, *args, url=url, cwd=project, env=env)
    assert killed.returncode == -9, killed.stderr
    assert scalar(url, "SELECT count(*) FROM things") == 200  # the tables are back, the phase is not rolled back yet
    assert scalar(url, "SELECT state FROM migrate_data.phases WHERE phase = 'drop'") == "rolling_back"
    again = run_cli(*args, url=url, cwd=project, env=env)
    assert again.returncode == 0, again.stderr
    assert working_dependents(url) == WORKING
    assert scalar(url, "SELECT state FROM migrate_data.phases WHERE phase = 'drop'") == "rolled_back"


@pytest.mark.parametrize(
    "text, message",
    [
        ("dependents: drop\n", "dependents: only a phase that drops tables (`backup:`) has dependents to decide on"),
        ("backup: [things]\ndependents: cascade\n", "dependents: 'cascade': expected keep or drop"),
        ("backup: [things]\ndependents:\n  others: drop\n", "dependents.others: 'others' is not one of the tables"),
        ("backup: [things]\ndependents:\n  things: yes\n", "dependents.things: 'True': expected keep or drop"),
        ("backup: [things]\ndependents: [drop]\n", "dependents: expected keep, drop, or a mapping of dropped table"),
    ],
)
def test_the_loader_rejects_a_bad_dependents_setting_naming_its_line(tmp_path, text, message):
    path = tmp_path / "drop.yaml"
    path.write_text("description: x\n" + text)
    with pytest.raises(MappingError) as e:
        load_phase(path)
    assert message in e.value.message
    assert f"drop.yaml:{3 if 'backup' in text else 2}:" in e.value.message or "drop.yaml:4:" in e.value.message


def test_the_loader_reads_dependents_for_every_dropped_table_or_per_table(tmp_path):
    path = tmp_path / "drop.yaml"
    path.write_text("backup: [things, stuff]\ndependents: drop\n")
    assert load_phase(path).dependents == (("things", "drop"), ("stuff", "drop"))
    path.write_text("backup: [things, stuff]\ndependents:\n  stuff: keep\n")
    assert load_phase(path).dependents == (("stuff", "keep"),)
