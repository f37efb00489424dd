"""Paths that destroy data: a rollback removes exactly what its phase wrote, a rollback or run killed at any named
step finishes when run again, and a phase that drops tables proves first that nothing is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, _create_database, _drop_database, run, run_cli, scalar, sql
from killer import kill_at
from migrate_data import api
from migrate_data.errors import RefusedError
from test_copier import project
from test_orchestration import snapshot

CLIENTE = "INSERT INTO clientes (id, telefono, nombre_completo) VALUES ({id}, '{tel}', 'Escrita por la aplicación')"
NEW_KEY = "'00000000-0000-0000-0000-000000000007'::uuid"
FIRST, LAST = "(SELECT min(id::text)::uuid FROM customers)", "(SELECT max(id::text)::uuid FROM customers)"


def apply(settings, *phases, **opts):
    return [run(api.run_phase(settings, p, api.RunOptions(**{"backup": False, **opts}))) for p in phases]


def state(url: str, phase: str) -> str | None:
    return scalar(url, "SELECT state FROM migrate_data.phases WHERE phase = $1", phase)


# -- rollback removes exactly what the phase wrote ---------------------------------------------------------------
def test_rollback_keeps_rows_that_were_in_the_target_before_the_phase(applied_db, settings_for):
    url = applied_db("phase1")
    settings = settings_for(url)
    # one row with a key the source also produces (customer 1), one with a key of its own
    sql(url, CLIENTE.format(id=FIRST, tel="+593-before-1") + "; " + CLIENTE.format(id=NEW_KEY, tel="+593-b2"))
    before = sql(url, "SELECT * FROM clientes ORDER BY id")
    (result,) = apply(settings, "phase2a")
    assert scalar(url, "SELECT count(*) FROM clientes") == 998  # 997 copied + the one new key
    # the row with a key of its own is not the phase's: validation leaves it out; the first customer, whose key
    # another row held before, is reported missing
    clientes = next(t for t in result.validation.tables if t.target == "public.clientes")
    assert (clientes.missing, clientes.extra, clientes.differs) == (1, 0, 0)
    result = run(api.rollback(settings, "phase2a"))
    assert result.kept == {"public.clientes": 2}
    assert sql(url, "SELECT * FROM clientes ORDER BY id") == before
    assert state(url, "phase2a") == "rolled_back"


def test_rollback_refuses_a_migrated_row_the_application_updated_and_force_saves_it(applied_db, settings_for):
    url = applied_db("phase2a")
    settings = settings_for(url)
    changed = scalar(url, f"UPDATE clientes SET ciudad = 'Cuenca (cambiada)' WHERE id = {FIRST} RETURNING id")
    with pytest.raises(RefusedError, match=r"changed after it wrote them \(public.clientes: 1 rows\)") as e:
        run(api.rollback(settings, "phase2a"))
    assert f"first keys: {changed}" in e.value.detail
    assert scalar(url, "SELECT count(*) FROM clientes") == 997  # nothing was deleted
    assert state(url, "phase2a") == "applied"
    result = run(api.rollback(settings, "phase2a", force=True))
    saved = [json.loads(line) for line in Path(result.foreign_rows_dump).read_text().splitlines()]
    assert [(r["table"], r["row"]["id"], r["row"]["ciudad"]) for r in saved] == [
        ("public.clientes", str(changed), "Cuenca (cambiada)")
    ]
    assert Path(result.foreign_rows_dump).stat().st_mode & 0o777 == 0o600
    assert scalar(url, "SELECT count(*) FROM clientes") == 0


def test_rollback_keeps_a_row_the_application_wrote_during_the_copy_with_a_key_not_yet_copied(
    applied_db, settings_for, tmp_path
):
    url = applied_db("phase1")
    settings = settings_for(url)
    args = ["phase2a", "--yes", "--no-backup", "--batch-size", "100", "--jobs", "1"]
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)}
    killed = kill_at("migrate_data.copier:Copier._batch:return", *args, url=url, cwd=ROOT, nth=3, env=env)
    assert killed.returncode == -9, killed.stderr
    # the application writes the last customer's key, which the copy has not reached
    last = scalar(url, f"SELECT {LAST}")
    sql(url, CLIENTE.format(id=f"'{last}'", tel="+593-app"))
    again = run_cli(*args, url=url, env=env)
    assert again.returncode == 3, again.stderr  # the source's last customer differs from what the target holds
    with pytest.raises(RefusedError, match=r"public.clientes: 1 rows") as e:
        run(api.rollback(settings, "phase2a"))
    assert f"first keys: {last}" in e.value.detail
    assert scalar(url, "SELECT nombre_completo FROM clientes WHERE id = $1", last) == "Escrita por la aplicación"


def test_rollback_of_a_schema_phase_refuses_to_drop_tables_holding_rows_and_force_saves_them(applied_db, settings_for):
    url = applied_db("phase1")
    settings = settings_for(url)
    sql(url, CLIENTE.format(id=NEW_KEY, tel="+593-app-7"))
    dry = run(api.rollback(settings, "phase1", dry_run=True))
    assert dry.dry_run and [(t.table, t.at_risk, t.dropped) for t in dry.plan.at_risk] == [("public.clientes", 1, True)]
    out = run_cli("rollback", "phase1", "--yes", url=url)
    assert out.returncode == 2
    assert "in a table the downgrade drops (first keys: 00000000-0000-0000-0000-000000000007)" in out.stderr
    assert scalar(url, "SELECT count(*) FROM clientes") == 1
    result = run(api.rollback(settings, "phase1", force=True))
    saved = [json.loads(line) for line in Path(result.foreign_rows_dump).read_text().splitlines()]
    assert [(r["table"], r["row"]["id"]) for r in saved] == [
        ("public.clientes", "00000000-0000-0000-0000-000000000007")
    ]
    assert scalar(url, "SELECT to_regclass('clientes') IS NULL") is True


def test_a_phase_mid_rollback_cannot_be_run_until_the_rollback_finishes(applied_db, tmp_path):
    url = applied_db("phase2a")
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)}
    killed = kill_at("migrate_data.rollback:_delete:return", "rollback", "phase2a", "--yes", url=url, cwd=ROOT, env=env)
    assert killed.returncode == -9, killed.stderr
    assert state(url, "phase2a") == "rolling_back"
    out = run_cli("phase2a", "--yes", "--no-backup", url=url, env=env)
    assert out.returncode == 2 and "finish it first: `migrate-data rollback phase2a`" in out.stderr
    assert run_cli("rollback", "phase2a", "--yes", url=url, env=env).returncode == 0
    assert scalar(url, "SELECT count(*) FROM clientes") == 0 and state(url, "phase2a") == "rolled_back"


# -- every rollback is resumable; the ledger never runs ahead of the data ------------------------------------------
@pytest.fixture(scope="module")
def phase5_template(server_url, plan_template, tmp_path_factory):
    """A database with the whole plan applied, phase5 included (its backup under a module tmp dir)."""
    from migrate_data.settings import Settings

    name, url = _create_database(server_url, template=plan_template("phase4"))
    out = tmp_path_factory.mktemp("phase5")
    settings = Settings(database_url=url, project_dir=ROOT, output_dir=out)
    # production has what the revision's DDL does not know: a column and an index of its own
    sql(
        url,
        "ALTER TABLE customers ADD COLUMN vip boolean NOT NULL DEFAULT false; CREATE INDEX customers_vip ON customers (vip);"
        "UPDATE customers SET vip = true WHERE id IN (SELECT id FROM customers ORDER BY id LIMIT 5)",
    )
    legacy = snapshot(url)
    with pytest.raises(RefusedError, match="would drop data that no mapping copies") as e:
        run(api.run_phase(settings, "phase5", api.RunOptions()))
    assert "public.customers.vip: 1,000 rows with a value, and no mapping reads this column" in e.value.detail
    assert "public.users: 180 rows that the `where` of phase2b leaves out" in e.value.detail
    run(api.run_phase(settings, "phase5", api.RunOptions(accept_unmapped=True)))
    yield name, legacy, out
    _drop_database(server_url, name)


@pytest.mark.parametrize(
    "step, nth",
    [
        ("migrate_data.rollback:inspect:return", 1),
        ("migrate_data.schema:_run:return", 2),  # the downgrade ran (the 1st is inspect's, rolled back), not committed
        ("migrate_data.backup:restore_all:enter", 1),  # the recreated legacy tables dropped, not restored yet
        ("migrate_data.backup:restore_all:return", 1),  # the backup restored, the ledger not told yet
        ("migrate_data.rollback:finish:enter", 1),
        ("migrate_data.ledger:update_run:enter", 1),
    ],
)
def test_rollback_of_phase5_killed_at_each_step_finishes_when_run_again(phase5_template, make_db, step, nth):
    template, legacy, out = phase5_template
    url = make_db(template=template)
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(out)}
    killed = kill_at(step, "rollback", "phase5", "--yes", url=url, cwd=ROOT, env=env, nth=nth)
    assert killed.returncode == -9, killed.stderr
    if state(url, "phase5") == "rolled_back":  # only once every legacy row is back
        assert snapshot(url) == legacy
    again = run_cli("rollback", "phase5", "--yes", url=url, env=env)
    if state(url, "phase5") == "rolled_back" and "nothing to roll back" in again.stderr:
        pass  # killed after the last step
    else:
        assert again.returncode == 0, again.stderr
    assert state(url, "phase5") == "rolled_back"
    assert snapshot(url) == legacy


def test_phase5_refuses_to_drop_when_a_legacy_row_is_not_in_the_spanish_tables(applied_db, settings_for):
    url = applied_db("phase4")
    settings = settings_for(url)
    sql(url, f"INSERT INTO customers (id, phone_number, full_name) VALUES ({NEW_KEY}, '+593-late', 'Tardía')")
    with pytest.raises(RefusedError, match="would drop rows that are not in the Spanish tables") as e:
        run(api.run_phase(settings, "phase5", api.RunOptions(accept_unmapped=True)))
    assert "phase2a: public.clientes" in e.value.detail and "1 keys missing" in e.value.detail
    assert scalar(url, f"SELECT count(*) FROM customers WHERE id = {NEW_KEY}") == 1
    assert state(url, "phase5") is None


# -- a run killed at a named step gives, when run again, what a clean run gives ------------------------------------
@pytest.mark.parametrize(
    "step",
    [
        "migrate_data.backup:take_backup:return",
        "migrate_data.copier:Copier._batch:return",
        "migrate_data.copier:Copier._fix_sequences:enter",  # the last batch committed, the table not finished
        "migrate_data.steps:validate_phase:enter",
        "migrate_data.ledger:set_phase:enter",
    ],
)
def test_phase_killed_at_a_step_then_run_again_equals_a_clean_run(applied_db, tmp_path, step):
    clean = applied_db("phase2a")
    url = applied_db("phase1")
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)}
    args = ["phase2a", "--yes", "--batch-size", "200"]
    nth = 2 if step.endswith("set_phase:enter") else 1  # the second: the phase marked applied after validation
    killed = kill_at(step, *args, url=url, cwd=ROOT, env=env, nth=nth)
    assert killed.returncode == -9, killed.stderr
    again = run_cli(*args, url=url, env=env)
    assert again.returncode == 0, again.stderr
    assert snapshot(url) == snapshot(clean)


def test_a_table_is_not_finished_until_its_sequence_is_past_the_copied_ids(db_url, tmp_path):
    sql(
        db_url,
        """CREATE TABLE src (id int PRIMARY KEY, v text); CREATE TABLE dst (id serial PRIMARY KEY, v text);
           INSERT INTO src SELECT i, 'v' || i FROM generate_series(1, 500) i;""",
    )
    project(tmp_path, night="tables:\n  - {source: src, target: dst, columns: {id: id, v: v}}\n")
    args = ["night", "--yes", "--no-backup"]
    killed = kill_at("migrate_data.copier:Copier._fix_sequences:enter", *args, url=db_url, cwd=tmp_path)
    assert killed.returncode == -9 and scalar(db_url, "SELECT count(*) FROM dst") == 500
    assert run_cli(*args, url=db_url, cwd=tmp_path).returncode == 0
    # the application's next row gets a new id, not one the copy used
    assert scalar(db_url, "INSERT INTO dst (v) VALUES ('nueva') RETURNING id") == 501


# -- validation cannot pass what is wrong --------------------------------------------------------------------------
def test_a_run_validates_with_checksums_and_fails_on_a_changed_value(applied_db, settings_for):
    url = applied_db("phase1")
    settings = settings_for(url)
    first = scalar(url, f"SELECT {FIRST}")
    sql(
        url,
        f"""CREATE FUNCTION cambia() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.id = '{first}' THEN NEW.ciudad := 'otra'; END IF; RETURN NEW; END $$;
           CREATE TRIGGER cambia BEFORE INSERT ON clientes FOR EACH ROW EXECUTE FUNCTION cambia();""",
    )
    (result,) = apply(settings, "phase2a")
    assert result.status == "invalid" and result.validation.deep
    clientes = next(t for t in result.validation.tables if t.target == "public.clientes")
    assert clientes.differs == 1 and clientes.samples[0]["key"] == [str(first)]
    counts_only = run(api.validate(settings, "phase2a"))
    assert counts_only.ok  # what a count cannot see


def test_a_large_share_of_rejects_fails_the_phase(db_url, tmp_path):
    from migrate_data.errors import MigrationError
    from migrate_data.settings import Settings

    sql(
        db_url,
        """CREATE TABLE src (id int PRIMARY KEY, doc text); CREATE TABLE dst (id int PRIMARY KEY, doc jsonb);
           INSERT INTO src SELECT i, CASE WHEN i % 5 = 0 THEN 'not json' ELSE '{}' END FROM generate_series(1, 200) i;""",
    )
    project(tmp_path, night="tables:\n  - {source: src, target: dst, columns: {id: id, doc: doc}}\n")
    settings = Settings(database_url=db_url, project_dir=tmp_path, output_dir=tmp_path)
    with pytest.raises(
        MigrationError, match=r"30 of the 200 source rows of public.dst rejected \(15.0%\), more than --max-rejects 10%"
    ):
        run(api.run_phase(settings, "night", api.RunOptions(backup=False, batch_size=50)))
    ok = run(api.run_phase(settings, "night", api.RunOptions(backup=False, max_reject_share=0.25)))
    assert ok.status == "done" and ok.validation.tables[0].rejected == 40


# -- what others write while a rollback runs -----------------------------------------------------------------------
async def app_commits(url: str, statement: str) -> None:
    """The application, on a connection of its own, commits ``statement``."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def after_inspect(monkeypatch, url: str, statement: str) -> None:
    """The application commits ``statement`` right after the rollback looked at the tables."""
    from migrate_data import rollback

    original = rollback.inspect

    async def inspect_then_write(*args, **kwargs):
        plan = await original(*args, **kwargs)
        await app_commits(url, statement)
        return plan

    monkeypatch.setattr(rollback, "inspect", inspect_then_write)


def test_forced_rollback_deletes_only_rows_it_saved_in_the_same_transaction(applied_db, settings_for, monkeypatch):
    url = applied_db("phase2a")
    from migrate_data import rollback

    settings = settings_for(url)
    sql(url, CLIENTE.format(id=NEW_KEY, tel="+593-early"))
    original = rollback._Saver.write
    late = "'00000000-0000-0000-0000-00000000000a'::uuid"
    written: list[bool] = []

    async def write_then_app_commits(self, table, rows):
        await original(self, table, rows)
        if self.path and not written:  # after the first saved batch, once
            written.append(True)
            await app_commits(url, CLIENTE.format(id=late, tel="+593-late"))

    monkeypatch.setattr(rollback._Saver, "write", write_then_app_commits)
    result = run(api.rollback(settings, "phase2a", force=True, batch_size=1))
    saved = {json.loads(line)["row"]["telefono"] for line in Path(result.foreign_rows_dump).read_text().splitlines()}
    kept = {r["telefono"] for r in sql(url, "SELECT telefono FROM clientes")}
    assert "+593-early" in saved
    assert "+593-late" in saved | kept  # never deleted without being saved first
    assert not saved & kept


def test_rollback_refuses_to_cascade_into_rows_written_after_it_looked(applied_db, settings_for, monkeypatch):
    url = applied_db("phase2b")
    settings = settings_for(url)
    proveedor = scalar(url, "SELECT id FROM proveedores ORDER BY id LIMIT 1")
    after_inspect(
        monkeypatch,
        url,
        f"INSERT INTO servicios_proveedor (proveedor_id, titulo) VALUES ('{proveedor}', 'escrito por la aplicación')",
    )
    with pytest.raises(
        RefusedError, match=r"1 rows of public.servicios_proveedor reference rows of public.proveedores"
    ):
        run(api.rollback(settings, "phase2b"))
    assert scalar(url, "SELECT count(*) FROM servicios_proveedor WHERE titulo = 'escrito por la aplicación'") == 1
    assert state(url, "phase2b") == "rolling_back"


def test_rollback_of_a_schema_phase_refuses_a_row_written_after_it_looked(applied_db, settings_for, monkeypatch):
    url = applied_db("phase1")
    settings = settings_for(url)
    after_inspect(monkeypatch, url, CLIENTE.format(id=NEW_KEY, tel="+593-late"))
    with pytest.raises(RefusedError, match="public.clientes holds 1 rows written since the rollback looked"):
        run(api.rollback(settings, "phase1"))
    assert scalar(url, "SELECT count(*) FROM clientes") == 1


def test_rollback_of_phase5_restores_the_tables_as_the_backup_has_them(phase5_template, make_db):
    template, legacy, out = phase5_template
    url = make_db(template=template)
    # what the revision's DDL does not know: restored from the backup all the same
    assert run_cli("rollback", "phase5", "--yes", url=url, env={"MIGRATE_DATA_OUTPUT_DIR": str(out)}).returncode == 0
    assert snapshot(url) == legacy
    assert (
        scalar(url, "SELECT count(*) FROM pg_indexes WHERE tablename = 'customers' AND indexname = 'customers_vip'")
        == 1
    )
    assert scalar(url, "SELECT count(*) FROM customers WHERE vip") == 5


def test_rollback_dry_run_lists_what_it_would_delete_keep_and_refuse_and_changes_nothing(applied_db):
    url = applied_db("phase2a")
    sql(url, f"UPDATE clientes SET ciudad = 'cambiada' WHERE id = {FIRST}")
    out = run_cli("rollback", "phase2a", "--dry-run", url=url)
    assert out.returncode == 0, out.stderr
    assert "public.clientes: 996 rows the phase wrote will be deleted, 1 rows it did not write (refused)" in out.stdout
    assert "public.profesiones: 40 rows the phase wrote will be deleted" in out.stdout
    assert "it would refuse" in out.stdout
    assert scalar(url, "SELECT count(*) FROM clientes") == 997 and state(url, "phase2a") == "applied"
