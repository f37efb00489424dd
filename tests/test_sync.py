"""Live sync between nights: capture from the start of the copy, `sync` re-derives what changed, exactly."""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time
import uuid

import asyncpg
import pytest

from conftest import ROOT, cli_env, run, run_cli, run_cli_args, scalar, sql
from killer import kill_at
from migrate_data import api, capture_sql
from migrate_data.errors import MigrationError, RefusedError
from migrate_data.mapping import QualifiedName

NEW_CUSTOMER = (
    "INSERT INTO customers (id, phone_number, full_name, city, notes) VALUES ('{id}', '{phone}', 'Nuevo', 'Quito', "
    "'{{\"n\": 1}}')"
)
LONELY = "(SELECT c.id FROM customers c WHERE NOT EXISTS (SELECT 1 FROM service_requests r WHERE r.customer_id = c.id))"


def apply(settings, *phases, **opts):
    return [run(api.run_phase(settings, p, api.RunOptions(**{"backup": False, **opts}))) for p in phases]


def deep(settings, phase):
    result = run(api.validate(settings, phase, deep=True))
    return result.ok, [p for t in result.tables for p in t.problems]


def waiting(source_url: str, phase: str) -> int:
    return scalar(source_url, "SELECT count(*) FROM migrate_data.changes WHERE phase = $1", phase)


def capture_triggers(url: str) -> list[str]:
    return [
        r[0]
        for r in sql(
            url, "SELECT tgname FROM pg_trigger WHERE tgname LIKE 'md_capture_%' ORDER BY tgrelid::regclass::text, 1"
        )
    ]


@pytest.fixture(params=["one database", "two databases"])
def setup(request, legacy_template, make_db, applied_db, settings_for, tmp_path):
    """(settings, source url, target url, environment of a CLI run), with phase1 applied on the target."""
    if request.param == "one database":
        source = target = applied_db("phase1")
        settings, env = settings_for(target), {}
    else:
        source, target = make_db(template=legacy_template), applied_db("phase1", seeded=False)
        settings = settings_for(target).with_(source_url=source)
        env = {"SOURCE_DATABASE_URL": source}
    return settings, source, target, {"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path), **env}


# -- what capture installs --------------------------------------------------------------------------------------------
def test_capture_is_statement_level_grant_free_and_catches_nothing():
    c = capture_sql.Captured(QualifiedName("customers", "public"), ("id",))
    statements = capture_sql.install_sql("phase2a", c, [capture_sql.Layout(9001, (1,), (20,))])
    text = "\n".join(statements)
    assert "SECURITY DEFINER" in text and "SET search_path" not in text  # a SET clause costs every call
    assert "EXCEPTION" not in text  # no subtransaction per statement, nothing swallowed (see capture.py)
    assert text.count("FOR EACH STATEMENT") == 4 and "FOR EACH ROW" not in text
    assert 'REFERENCING OLD TABLE AS "migrate_data_old" NEW TABLE AS "migrate_data_new"' in text
    assert "ENABLE ALWAYS TRIGGER" in statements[-1]  # captured under session_replication_role = replica too
    assert "REVOKE ALL ON FUNCTION" in text
    lookup = capture_sql.Captured(QualifiedName("users", "public"), ("id",), watched=("phone_number",))
    body = capture_sql.function_sql("phase3", lookup, [capture_sql.Layout(9001, (1, 5), (2950, 25))])
    assert '"phone_number"::pg_catalog.text OPERATOR(pg_catalog.=)' in body  # a lookup's table: what it reads


def test_capture_starts_with_the_phase_and_a_delete_waits_for_the_later_phase_that_references_it(
    applied_db, settings_for
):
    url = applied_db("phase3")
    settings = settings_for(url)
    registry = {
        (r["phase"], r["source"]): (r["columns"], r["watched"]) for r in sql(url, "SELECT * FROM migrate_data.capture")
    }
    assert registry[("phase2a", "public.customers")] == (["id"], None)
    assert registry[("phase2b", "public.provider_professions")] == (["provider_id", "profession_id"], None)
    assert registry[("phase3", "public.users")] == (["id"], ["phone_number"])  # only a lookup's table in phase3
    assert len(registry) == 2 + 3 + 5
    assert all(
        r["tgenabled"] == b"A" for r in sql(url, "SELECT tgenabled FROM pg_trigger WHERE tgname LIKE 'md_capture_%'")
    )
    # an update of a users column no lookup reads is not phase3's business (phase2b copies users: it logs it)
    sql(url, "UPDATE users SET email = 'x@example.com' WHERE id = (SELECT id FROM users ORDER BY id LIMIT 1)")
    assert (waiting(url, "phase3"), waiting(url, "phase2b")) == (0, 1)
    rows = {s.phase: s for s in run(api.status(settings))}
    assert (rows["phase3"].capture, rows["phase2b"].capture, rows["phase1"].capture) == ("on", "on", "-")
    assert rows["phase2b"].changes_waiting == 1 and rows["phase2b"].oldest_change_seconds >= 0
    # a delete that a later phase's rows still reference waits for that phase to be synced too
    customer = "(SELECT id FROM customers WHERE phone_number = '+593900000005')"  # it has service requests
    sql(
        url,
        f"DELETE FROM service_requests WHERE customer_id = {customer}; DELETE FROM customers WHERE id = {customer}",
    )
    first = run(api.sync(settings, ["phase2a"])).phases[0]
    assert (first.changes, first.deferred, first.waiting) == (0, 1, 1)  # solicitudes_servicio references it
    both = run(api.sync(settings, ["phase3", "phase2a", "phase2b"]))
    assert [(p.phase, p.waiting, p.deferred) for p in both.phases] == [
        ("phase2a", 0, 0),
        ("phase2b", 0, 0),
        ("phase3", 0, 0),
    ]
    assert deep(settings, "phase2a") == (True, []) and deep(settings, "phase3") == (True, [])


def test_a_writers_search_path_cannot_put_its_own_operator_or_type_in_the_definer_trigger(applied_db):
    url = applied_db("phase3")  # users: a lookup's table (phase3), compared with =
    schema = f"evil_{uuid.uuid4().hex[:8]}"
    sql(
        url,
        f"""CREATE SCHEMA {schema};
        CREATE FUNCTION {schema}.eq(text, text) RETURNS boolean LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'hijacked: % = %', $1, $2; END $$;
        CREATE OPERATOR {schema}.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {schema}.eq);
        CREATE DOMAIN {schema}.text AS pg_catalog.text CHECK (VALUE <> VALUE)""",
    )
    user = "(SELECT id FROM users ORDER BY id LIMIT 1)"

    async def go():
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"SET search_path = {schema}, public, pg_catalog")  # its = and its text come first
            with pytest.raises(asyncpg.RaiseError, match="hijacked"):  # the session's own statements use them
                await conn.execute("SELECT 'a'::pg_catalog.text = 'b'::pg_catalog.text")
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute("SELECT 'a'::text")
            await conn.execute(f"UPDATE users SET phone_number = phone_number || '9' WHERE id = {user}")
            await conn.execute(
                "UPDATE customers SET city = 'Tena' WHERE phone_number OPERATOR(pg_catalog.=) '+593900000001'"
            )
        finally:
            await conn.close()

    run(go())
    assert waiting(url, "phase3") == 1 and waiting(url, "phase2a") == 1


def test_a_rolled_back_write_leaves_nothing_and_a_role_without_grants_is_captured(applied_db):
    url = applied_db("phase2a")
    role = f"app_{uuid.uuid4().hex[:8]}"
    sql(url, f"CREATE ROLE {role}; GRANT SELECT, INSERT, UPDATE, DELETE ON customers TO {role}")
    try:

        async def go():
            conn = await asyncpg.connect(url)
            try:
                async with conn.transaction():
                    await conn.execute(NEW_CUSTOMER.format(id=uuid.uuid4(), phone="+593-rolled-back"))
                    await conn.execute("UPDATE customers SET city = 'Tena'")
                    raise RuntimeError("the application gives up")
            except RuntimeError:
                pass
            assert await conn.fetchval("SELECT count(*) FROM migrate_data.changes") == 0
            await conn.execute("SET session_replication_role = replica")  # e.g. a replication or restore job
            await conn.execute(f"SET ROLE {role}")  # no privilege on migrate_data at all
            await conn.execute("UPDATE customers SET city = 'Tena' WHERE phone_number = '+593900000001'")
            await conn.execute("RESET ROLE")
            return await conn.fetch("SELECT source, key, op FROM migrate_data.changes")

        rows = run(go())
    finally:
        sql(url, f"DROP OWNED BY {role}; DROP ROLE {role}")
    key = scalar(url, "SELECT id::text FROM customers WHERE phone_number = '+593900000001'")
    assert [(r["source"], r["key"], r["op"]) for r in rows] == [("public.customers", [key], b"U")]


# -- sync -----------------------------------------------------------------------------------------------------------
def test_writes_during_the_copy_behind_and_ahead_of_the_cursor_are_synced_exactly(setup):
    settings, source, target, env = setup
    args = ["phase2a", "--yes", "--no-backup", "--batch-size", "100", "--jobs", "1"]
    killed = kill_at("migrate_data.copier:Copier._batch:return", *args, url=target, cwd=ROOT, nth=3, env=env)
    assert killed.returncode == -9, killed.stderr
    last = scalar(target, "SELECT last_key[1] FROM migrate_data.checkpoints WHERE target = 'public.clientes'")
    behind = f"(SELECT id FROM customers WHERE id < '{last}' ORDER BY id DESC LIMIT 1)"
    sql(
        source,
        f"""UPDATE customers SET city = 'Behind', full_name = 'Cambiado' WHERE id = {behind};
            DELETE FROM customers WHERE id = (SELECT id FROM {LONELY} x(id) ORDER BY id LIMIT 1);
            {NEW_CUSTOMER.format(id="00000000-0000-4000-8000-000000000001", phone="+593-behind")};
            {NEW_CUSTOMER.format(id="ffffffff-0000-4000-8000-000000000001", phone="+593-ahead")};
            UPDATE customers SET city = 'Ahead' WHERE id = (SELECT id FROM customers WHERE id > '{last}' ORDER BY id DESC LIMIT 1);
            UPDATE professions SET name = 'Renamed' WHERE id = (SELECT id FROM professions ORDER BY id LIMIT 1)""",
    )
    resumed = apply(settings, "phase2a", batch_size=100, jobs=1)[0]
    assert not resumed.validation.ok  # the copy alone misses what changed behind its cursor
    assert waiting(source, "phase2a") == 6  # insert x2, update x3 (the one ahead too), delete
    result = run(api.sync(settings, ["phase2a"]))
    (p,) = result.phases
    assert (p.changes, p.waiting, p.deleted, p.rejected) == (6, 0, 1, 0)
    assert deep(settings, "phase2a") == (True, [])
    assert scalar(target, "SELECT nombre_completo FROM clientes WHERE ciudad = 'Behind'") == "Cambiado"
    assert waiting(source, "phase2a") == 0


def test_a_bad_row_in_a_batch_is_quarantined_alone_and_the_rest_of_the_batch_is_written(setup):
    settings, source, target, env = setup
    apply(settings, "phase2a")
    gone = "00000000-0000-4000-8000-0000000000aa"
    sql(
        source,
        f"""UPDATE customers SET city = 'Lote' WHERE right(phone_number, 1) = '2';
            UPDATE customers SET notes = '{{not json' WHERE phone_number = '+593900000012';
            {NEW_CUSTOMER.format(id=gone, phone="+593-gone")};
            DELETE FROM customers WHERE id = '{gone}';
            {NEW_CUSTOMER.format(id="00000000-0000-4000-8000-0000000000bb", phone="+593-kept")}""",
    )
    updated = scalar(source, "SELECT count(*) FROM customers WHERE city = 'Lote'")
    (p,) = run(api.sync(settings, ["phase2a"])).phases
    assert (p.rejected, p.waiting) == (1, 0)
    assert p.upserted == updated - 1 + 1  # every updated row but the bad one, and the new customer
    assert scalar(target, "SELECT count(*) FROM clientes WHERE ciudad = 'Lote'") == updated - 1
    assert scalar(target, "SELECT count(*) FROM clientes WHERE telefono IN ('+593-gone', '+593-kept')") == 1
    assert deep(settings, "phase2a") == (True, [])
    sql(source, "UPDATE customers SET notes = NULL WHERE phone_number = '+593900000012'")  # fixed: copied, cleared
    (p,) = run(api.sync(settings, ["phase2a"])).phases
    assert (p.upserted, p.cleared, p.rejected) == (1, 1, 0)
    bad = "SELECT count(*) FROM migrate_data.rejects WHERE row->>'phone_number' = '+593900000012'"
    assert scalar(target, bad) == 0
    assert scalar(target, "SELECT count(*) FROM clientes WHERE ciudad = 'Lote'") == updated


def test_sync_counts_as_left_out_only_the_rows_someone_else_wrote_otherwise_than_derived(setup):
    settings, source, target, env = setup
    apply(settings, "phase2a")
    same, other, plain, unchanged = "+593900000012", "+593900000022", "+593900000032", "+593900000042"
    # the application writes both schemas for two customers: one exactly as the mapping derives it (nothing is left
    # out), the other not; a third customer changes only in the source, a fourth is updated to what it was
    sql(
        source,
        f"""UPDATE customers SET city = 'Dual' WHERE phone_number IN ('{same}', '{other}', '{plain}');
            UPDATE customers SET city = city WHERE phone_number = '{unchanged}'""",
    )
    sql(target, f"UPDATE clientes SET ciudad = 'Dual' WHERE telefono = '{same}'")
    sql(target, f"UPDATE clientes SET ciudad = 'Otra' WHERE telefono = '{other}'")
    (p,) = run(api.sync(settings, ["phase2a"])).phases
    assert (p.changes, p.waiting, p.skipped, p.upserted) == (4, 0, 1, 1)  # only the row that differs is left out
    assert scalar(target, f"SELECT ciudad FROM clientes WHERE telefono = '{other}'") == "Otra"  # never overwritten
    assert scalar(target, f"SELECT ciudad FROM clientes WHERE telefono = '{plain}'") == "Dual"
    ok, problems = deep(settings, "phase2a")
    assert not ok and len(problems) == 1 and "1 rows of public.clientes differ" in problems[0], problems


def test_a_truncated_source_table_makes_sync_refuse_and_its_log_rows_stay(setup):
    settings, source, target, env = setup
    apply(settings, "phase2a")
    sql(
        source, "UPDATE customers SET city = 'Antes' WHERE phone_number = '+593900000001'; TRUNCATE professions CASCADE"
    )
    logged = waiting(source, "phase2a")
    with pytest.raises(MigrationError, match="was truncated after phase2a copied it"):
        run(api.sync(settings, ["phase2a"]))
    assert waiting(source, "phase2a") == logged  # nothing taken, nothing applied
    assert scalar(target, "SELECT count(*) FROM clientes WHERE ciudad = 'Antes'") == 0


def test_a_lookup_row_changed_during_the_copy_re_derives_the_rows_that_read_it(applied_db, settings_for, tmp_path):
    url = applied_db("phase2b")
    settings = settings_for(url)
    args = ["phase3", "--yes", "--no-backup", "--batch-size", "500", "--jobs", "1"]
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)}
    killed = kill_at("migrate_data.copier:Copier._batch:return", *args, url=url, cwd=ROOT, nth=5, env=env)
    assert killed.returncode == -9, killed.stderr
    # a user whose messages the copy has read (some or all of them) changes phone number
    user = scalar(
        url,
        "SELECT m.user_id FROM messages m JOIN mensajes t USING (id) WHERE m.user_id IS NOT NULL AND t.telefono IS NOT NULL ORDER BY m.id LIMIT 1",
    )
    sql(url, "UPDATE users SET phone_number = '+593-nuevo' WHERE id = $1", user)
    assert waiting(url, "phase3") == 1
    apply(settings, "phase3", batch_size=500, jobs=1)
    assert deep(settings, "phase3")[0] is False
    result = run(api.sync(settings, ["phase3"]))
    assert result.phases[0].upserted >= 2  # every message (and session) of that user
    assert deep(settings, "phase3") == (True, [])
    n = scalar(url, "SELECT count(*) FROM messages WHERE user_id = $1", user)
    assert scalar(url, "SELECT count(*) FROM mensajes WHERE telefono = '+593-nuevo'") == n


def test_rows_entering_and_leaving_the_where_and_quarantined_rows_follow_the_source(applied_db, settings_for):
    url = applied_db("phase2b")
    settings = settings_for(url)
    left = scalar(url, "SELECT provider_id::text FROM provider_professions ORDER BY 1 LIMIT 1")
    joined = scalar(url, "SELECT id::text FROM users WHERE user_type = 'customer' ORDER BY id LIMIT 1")
    sql(
        url,
        f"""UPDATE users SET user_type = 'customer' WHERE id = '{left}';
            UPDATE users SET user_type = 'provider' WHERE id = '{joined}';
            UPDATE customers SET notes = '{{not json' WHERE phone_number = '+593900000003'""",
    )
    run(api.sync(settings, ["phase2a", "phase2b"]))
    assert deep(settings, "phase2a") == (True, []) and deep(settings, "phase2b") == (True, [])
    assert scalar(url, "SELECT count(*) FROM proveedores WHERE id = $1::uuid", left) == 0
    assert scalar(url, "SELECT count(*) FROM proveedores WHERE id = $1::uuid", joined) == 1
    # its professions and services went with it (ON DELETE CASCADE): they are quarantined, not lost in silence
    rejected = "SELECT count(*) FROM migrate_data.rejects WHERE phase = 'phase2b' AND row->>'provider_id' = $1"
    children = (
        "SELECT (SELECT count(*) FROM provider_professions WHERE provider_id = $1::uuid) + "
        "(SELECT count(*) FROM provider_services WHERE provider_id = $1::uuid)"
    )
    assert scalar(url, rejected, left) == scalar(url, children, left) > 0
    assert (
        scalar(url, "SELECT sqlstate FROM migrate_data.rejects WHERE row->>'phone_number' = '+593900000003'") == "22P02"
    )
    assert scalar(url, "SELECT count(*) FROM clientes WHERE telefono = '+593900000003'") == 0
    # fixed in the source: copied, and the rejects are cleared
    sql(
        url,
        f"""UPDATE users SET user_type = 'provider' WHERE id = '{left}';
            UPDATE customers SET notes = NULL WHERE phone_number = '+593900000003'""",
    )
    run(api.sync(settings, ["phase2a", "phase2b"]))
    assert deep(settings, "phase2a") == (True, []) and deep(settings, "phase2b") == (True, [])
    assert scalar(url, rejected + " AND sqlstate = '23503'", left) == 0
    assert scalar(url, "SELECT count(*) FROM clientes WHERE telefono = '+593900000003'") == 1


WRITES = f"""UPDATE customers SET city = 'Sync ' || right(phone_number, 3) WHERE right(phone_number, 1) IN ('1', '4');
INSERT INTO customers (phone_number, full_name) SELECT '+593-k-' || i, 'Nuevo ' || i FROM generate_series(1, 40) i;
DELETE FROM customers WHERE id IN (SELECT id FROM {LONELY} x(id) WHERE id <> md5('customer7')::uuid ORDER BY id LIMIT 15);
UPDATE customers SET notes = '{{not json' WHERE phone_number = '+593900000007'"""


@pytest.mark.parametrize(
    "at,nth",
    [("migrate_data.sync:PhaseSyncer.apply:return", 2), ("migrate_data.sync:keep_deferred:enter", 3)],
    ids=["after-a-batch", "between-apply-and-the-log-commit"],
)
def test_kill_9_during_sync_then_sync_again_is_exact(setup, at, nth):
    settings, source, target, env = setup
    apply(settings, "phase2a")
    sql(source, WRITES)
    logged = waiting(source, "phase2a")
    assert logged > 200
    killed = kill_at(at, "sync", "phase2a", "--batch-size", "50", url=target, cwd=ROOT, nth=nth, env=env)
    assert killed.returncode == -9, killed.stderr
    assert 0 < waiting(source, "phase2a") < logged
    again = run_cli("sync", "phase2a", url=target, env=env)
    assert again.returncode == 0, again.stderr
    assert "0 waiting" in again.stdout
    assert deep(settings, "phase2a") == (True, [])
    assert scalar(target, "SELECT count(*) FROM migrate_data.rejects WHERE sqlstate = '22P02'") == 4
    # nothing doubled, nothing lost: the target is what one clean sync gives
    assert scalar(target, "SELECT count(*) FROM clientes") == scalar(source, "SELECT count(*) FROM customers") - 4
    assert run(api.rollback(settings, "phase2a")).deleted["public.clientes"] > 0  # every sync write is the phase's


def test_rollback_removes_the_capture_its_log_and_the_rows_sync_wrote(applied_db, settings_for):
    url = applied_db("phase2a")
    settings = settings_for(url)
    sql(url, NEW_CUSTOMER.format(id=uuid.uuid4(), phone="+593-synced"))
    run(api.sync(settings, ["phase2a"]))
    sql(url, "UPDATE customers SET city = 'Ambato' WHERE phone_number = '+593900000009'")
    assert capture_triggers(url) and waiting(url, "phase2a") == 1
    run(api.rollback(settings, "phase2a"))  # no refusal: the rows sync wrote are the phase's
    assert capture_triggers(url) == []
    assert scalar(url, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'capture\\_%'") == 0
    assert scalar(url, "SELECT count(*) FROM migrate_data.changes") == 0
    assert scalar(url, "SELECT count(*) FROM migrate_data.capture") == 0
    assert scalar(url, "SELECT count(*) FROM clientes") == 0
    sql(url, "UPDATE customers SET city = 'Ambato'")  # writes go on, logged by nobody
    assert waiting(url, "phase2a") == 0
    with pytest.raises(RefusedError, match="phase2a is rolled_back"):
        run(api.sync(settings, ["phase2a"]))


def test_sync_follow_applies_as_writes_come_and_stops_on_sigint_with_130(applied_db, settings_for, tmp_path):
    url = applied_db("phase2a")
    settings = settings_for(url)
    env = cli_env(url, MIGRATE_DATA_OUTPUT_DIR=str(tmp_path))
    proc = subprocess.Popen(
        run_cli_args("sync", "phase2a", "--follow", "--interval", "0.1"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:  # the writes may come before the follower starts or after: both are its to apply
        sql(url, "UPDATE customers SET city = 'Macas' WHERE phone_number LIKE '+59390000001_'")
        deadline = time.monotonic() + 60  # a loaded machine: the follower's start alone can take seconds
        while waiting(url, "phase2a") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert waiting(url, "phase2a") == 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "10 changes applied" in err and "0 changes waiting" in err
    assert "HINT: continue with: migrate-data sync phase2a --follow" in err
    assert deep(settings, "phase2a") == (True, [])
    status = {s.phase: s for s in run(api.status(settings))}["phase2a"]
    assert status.last_sync_at is not None and status.changes_waiting == 0


def test_a_computed_key_cannot_be_captured_and_sync_says_why(db_url, tmp_path):
    sql(db_url, "CREATE TABLE s (id int PRIMARY KEY, code text); CREATE TABLE t (code text PRIMARY KEY, id int)")
    sql(db_url, "INSERT INTO s VALUES (1, 'a'), (2, 'b')")
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "p.yaml").write_text(
        textwrap.dedent("""
        tables:
          - source: s
            target: t
            columns: {code: {sql: "upper(s.code)"}, id: id}
        """)
    )
    settings = api.Settings(database_url=db_url, project_dir=tmp_path, output_dir=tmp_path)
    planned = run(api.plan(settings, "p")).plan.findings  # said before the night, too
    assert [f.message for f in planned if "cannot be captured" in f.message]
    result = apply(settings, "p")[0]
    assert result.validation.ok
    assert [f.level for f in result.findings] == ["warning"]
    assert "target key column code is computed (sql:)" in result.findings[0].message
    assert capture_triggers(db_url) == []
    out = run_cli("sync", "p", url=db_url, cwd=tmp_path, env={"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)})
    assert out.returncode == 2
    assert "p: its changes cannot be captured" in out.stderr and "is computed (sql:)" in out.stderr


def test_sync_refuses_a_phase_whose_copy_is_not_finished(applied_db, settings_for):
    url = applied_db("phase1")
    settings = settings_for(url)
    with pytest.raises(RefusedError, match="phase2a is pending"):
        run(api.sync(settings, ["phase2a"]))


def test_quoted_names_and_a_composite_key_sync_and_cut_over(db_url, tmp_path):
    sql(
        db_url,
        """CREATE SCHEMA "Legacy Data";
           CREATE TABLE "Legacy Data"."Old Orders" ("Shop" int, "order" int, name text, PRIMARY KEY ("Shop", "order"));
           CREATE TABLE "Pedidos Nuevos" (tienda int, "Pedido" int, nombre text NOT NULL, PRIMARY KEY (tienda, "Pedido"));
           INSERT INTO "Legacy Data"."Old Orders" SELECT i % 3, i, 'n' || i FROM generate_series(1, 30) i""",
    )
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "p.yaml").write_text(
        textwrap.dedent("""
        tables:
          - source: Legacy Data.Old Orders
            target: Pedidos Nuevos
            columns: {tienda: Shop, Pedido: order, nombre: name}
        """)
    )
    settings = api.Settings(database_url=db_url, project_dir=tmp_path, output_dir=tmp_path)
    apply(settings, "p")
    sql(
        db_url,
        """UPDATE "Legacy Data"."Old Orders" SET name = NULL WHERE "order" = 4;
           UPDATE "Legacy Data"."Old Orders" SET "Shop" = 7 WHERE "order" = 5;
           DELETE FROM "Legacy Data"."Old Orders" WHERE "order" = 6""",
    )
    (p,) = run(api.sync(settings, ["p"])).phases
    assert (p.changes, p.rejected, p.deleted) == (4, 1, 3)  # 4 quarantined and out; 5 moved (2 keys); 6 gone
    assert deep(settings, "p") == (True, [])
    assert scalar(db_url, 'SELECT nombre FROM "Pedidos Nuevos" WHERE tienda = 7') == "n5"
    result = run(api.cutover(settings, ["p"]))
    assert result.ok and result.blocked_tables == ("Legacy Data.Old Orders",) and capture_triggers(db_url) == []


@pytest.mark.parametrize("setup", ["two databases"], indirect=True)
def test_rollback_of_a_start_killed_after_capture_was_installed_removes_that_capture(setup):
    settings, source, target, env = setup
    args = ["phase2a", "--yes", "--no-backup"]
    killed = kill_at("migrate_data.capture:install:return", *args, url=target, cwd=ROOT, env=env)
    assert killed.returncode == -9, killed.stderr
    sql(source, "UPDATE customers SET city = city WHERE phone_number = '+593900000001'")
    status = {s.phase: s for s in run(api.status(settings))}["phase2a"]
    assert (status.state, status.capture, status.changes_waiting) == ("pending", "on", 1)
    dry = run(api.rollback(settings, "phase2a", dry_run=True))
    assert dry.dry_run and len(capture_triggers(source)) == 8
    run(api.rollback(settings, "phase2a"))
    assert capture_triggers(source) == [] and waiting(source, "phase2a") == 0
    assert {s.phase: s for s in run(api.status(settings))}["phase2a"].capture == "-"
    with pytest.raises(RefusedError, match="nothing to roll back"):
        run(api.rollback(settings, "phase2a"))
