"""Tables outside public: the same name in two schemas, mixed-case and spaced schema names, a DBA whose search_path
puts a schema with same-named tables first.  Everything is schema-qualified end to end: the copy, checkpoints,
rejects, capture and sync, validation (--deep), the backup and the rollback."""

from __future__ import annotations

import subprocess
from urllib.parse import urlsplit

import asyncpg
import pytest
from clikit import invoke
from test_partitions import project, settings

from conftest import run, scalar, sql, with_database
from migrate_data import api, backup
from migrate_data.mapping import QualifiedName
from migrate_data.project import init_project
from migrate_data.rehearse import rehearse

# sales.customers and public.customers have the same name and other rows; the targets are in "Ventas" (mixed case)
# and "my schema", both named "Clientes".  decoy has tables of all these names (other columns, no rows): a search_path
# that puts it first must change nothing.  Dirt: 6 names too long for varchar(10) (22001).
SOURCE = """
CREATE SCHEMA sales; CREATE SCHEMA "Ventas"; CREATE SCHEMA "my schema"; CREATE SCHEMA decoy;
CREATE TABLE sales.customers (id int PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE sales.orders (id int PRIMARY KEY, customer_id int NOT NULL REFERENCES sales.customers, total numeric(10,2));
CREATE TABLE public.customers (id int PRIMARY KEY, name text NOT NULL, email text);
INSERT INTO sales.customers SELECT i, CASE WHEN i % 50 = 0 THEN 'a name far too long' ELSE 'c' || i END,
    'c' || i || '@x' FROM generate_series(1, 300) i;
INSERT INTO sales.orders SELECT i, 1 + i % 300, i * 1.5 FROM generate_series(1, 400) i WHERE (1 + i % 300) % 50 <> 0;
INSERT INTO public.customers SELECT i, 'p' || i, NULL FROM generate_series(1, 120) i;
CREATE TABLE "Ventas"."Clientes" (id int PRIMARY KEY, nombre varchar(10) NOT NULL, correo text);
CREATE TABLE "Ventas".pedidos (id int PRIMARY KEY, cliente_id int NOT NULL REFERENCES "Ventas"."Clientes",
    total numeric(10,2), correo text);
CREATE TABLE "my schema"."Clientes" (id int PRIMARY KEY, nombre text NOT NULL, correo text);
CREATE TABLE decoy.customers (id int, other text);
CREATE TABLE decoy.orders (id int, other text);
CREATE TABLE decoy."Clientes" (id int, other text);
CREATE TABLE decoy.pedidos (id int, other text);
CREATE TABLE decoy.checkpoints (id int);
CREATE TABLE decoy.rejects (id int);
"""
MAPPING = """
tables:
  - source: sales.orders
    target: Ventas.pedidos
    columns:
      id: id
      cliente_id: customer_id
      total: total
      correo: {lookup: {table: sales.customers, on: customer_id, key: id, column: email}}
  - source: sales.customers
    target: Ventas.Clientes
    columns: {id: id, nombre: name, correo: email}
  - source: public.customers
    target: '"my schema"."Clientes"'
    columns: {id: id, nombre: name, correo: email}
"""
TARGETS = {"Ventas.Clientes": 294, "Ventas.pedidos": 392, "my schema.Clientes": 120}


@pytest.fixture
def shop(db_url: str) -> str:
    sql(db_url, SOURCE)
    return db_url


def dba_url(url: str, how: str) -> str:
    """``url`` as a DBA whose search_path puts decoy first (and leaves public out)."""
    if how == "url options":
        return url + ("&" if "?" in url else "?") + "options=-csearch_path%3Ddecoy"
    if how == "role setting":
        name = urlsplit(url).path.lstrip("/")
        sql(with_database(url, "postgres"), f'ALTER ROLE CURRENT_USER IN DATABASE "{name}" SET search_path = decoy')
    return url


DECOYS = ("customers", "orders", "Clientes", "pedidos", "checkpoints", "rejects")


def restore_list(url: str, path: str) -> str:
    major = scalar(url, "SELECT current_setting('server_version_num')::int / 10000")
    pg_restore = run(backup.find_tool("pg_restore", major))
    return subprocess.run([pg_restore, "--list", path], capture_output=True, text=True, check=True).stdout


def decoys_untouched(url: str) -> bool:
    return all(scalar(url, f'SELECT count(*) FROM decoy."{t}"') == 0 for t in DECOYS)


@pytest.mark.parametrize("how", ["default", "url options", "role setting"])
def test_same_name_in_two_schemas_copied_validated_backed_up_and_rolled_back_whatever_the_search_path(
    shop, tmp_path, how
):
    url = dba_url(shop, how)
    if how != "default":
        assert scalar(url, "SHOW search_path") == "decoy"
    proj = project(tmp_path, MAPPING)
    result = run(api.run_phase(settings(url, proj), "night", api.RunOptions(batch_size=50, jobs=2)))
    assert result.validation.ok and result.validation.deep
    assert {t.target: t.rows_written for t in result.tables} == TARGETS
    assert {t.source for t in result.tables} == {"sales.customers", "sales.orders", "public.customers"}
    # each row went to its own schema's table; the decoys got nothing
    assert scalar(shop, 'SELECT count(*) FROM "my schema"."Clientes" WHERE nombre LIKE $1', "p%") == 120
    assert scalar(shop, 'SELECT count(*) FROM "Ventas"."Clientes" WHERE nombre LIKE $1', "c%") == 294
    assert decoys_untouched(shop)
    # checkpoints and rejects name the schema-qualified tables
    assert {r[0] for r in sql(shop, "SELECT target FROM migrate_data.checkpoints WHERE done")} == set(TARGETS)
    rejects = sql(shop, "SELECT target, source, sqlstate, count(*) FROM migrate_data.rejects GROUP BY 1, 2, 3")
    assert [tuple(r) for r in rejects] == [("Ventas.Clientes", "sales.customers", "22001", 6)]
    # the backup holds the data of exactly these tables, not of the decoys
    listing = restore_list(shop, result.backup_path)
    data = sorted(
        line.split(" TABLE DATA ")[1].rsplit(" ", 1)[0] for line in listing.splitlines() if " TABLE DATA " in line
    )
    assert data == sorted(
        [
            "sales customers",
            "sales orders",
            "public customers",
            "Ventas Clientes",
            "Ventas pedidos",
            "my schema Clientes",
        ]
    )
    # --deep compares each target with its own source: a row changed in "my schema" is found there only
    sql(shop, """UPDATE "my schema"."Clientes" SET nombre = 'changed' WHERE id = 7""")
    deep = run(api.validate(settings(url, proj), "night", deep=True))
    assert not deep.ok
    assert {t.target: t.differs for t in deep.tables} == {**{t: 0 for t in TARGETS}, "my schema.Clientes": 1}
    undone = run(api.rollback(settings(url, proj), "night", force=True))
    assert undone.deleted == TARGETS
    assert scalar(shop, 'SELECT count(*) FROM "Ventas"."Clientes"') == 0
    assert scalar(shop, 'SELECT count(*) FROM "my schema"."Clientes"') == 0
    assert scalar(shop, "SELECT count(*) FROM public.customers") == 120  # the sources are untouched


REVISION = """
from alembic import op

revision = "r1"
down_revision = None


def upgrade():
    op.execute('CREATE TABLE "Ventas"."Notas" (id int PRIMARY KEY, texto text)')


def downgrade():
    op.execute('DROP TABLE "Ventas"."Notas"')
"""


def test_a_revision_under_another_search_path_keeps_alembic_version_in_public_and_rolls_back(shop, tmp_path):
    proj = revision_project(tmp_path, REVISION, MAPPING)
    url = dba_url(shop, "role setting")
    result = run(api.run_phase(settings(url, proj), "night", api.RunOptions(backup=False)))
    assert result.validation.ok
    # Alembic's version table is where a DBA with the default search_path looks for it
    assert [
        tuple(r) for r in sql(shop, "SELECT schemaname, tablename FROM pg_tables WHERE tablename = 'alembic_version'")
    ] == [("public", "alembic_version")]
    assert scalar(shop, "SELECT version_num FROM public.alembic_version") == "r1"
    # another DBA, with the default search_path, sees the phase as applied and rolls it back
    sql(
        with_database(shop, "postgres"),
        f'ALTER ROLE CURRENT_USER IN DATABASE "{urlsplit(shop).path.lstrip("/")}" RESET search_path',
    )
    assert run(api.validate(settings(shop, proj), "night")).ok
    undone = run(api.rollback(settings(shop, proj), "night", force=True))
    assert {t: n for t, n in undone.deleted.items() if n} == TARGETS
    assert scalar(shop, """SELECT to_regclass('"Ventas"."Notas"') IS NULL""")
    assert scalar(shop, "SELECT count(*) FROM public.alembic_version") == 0


def test_changes_captured_in_schemas_outside_the_search_path_are_synced(shop, tmp_path):
    url = dba_url(shop, "url options")
    proj = project(tmp_path, MAPPING)
    assert run(api.run_phase(settings(url, proj), "night", api.RunOptions(backup=False))).validation.ok
    sql(
        shop,
        """INSERT INTO sales.customers VALUES (301, 'new', NULL); UPDATE public.customers SET name = 'renamed' WHERE id = 5;
        DELETE FROM public.customers WHERE id = 6; UPDATE sales.orders SET total = 0 WHERE id = 1;
        INSERT INTO decoy.customers VALUES (1, 'not captured')""",
    )
    logged = {r[0]: r[1] for r in sql(shop, "SELECT source, count(*) FROM migrate_data.changes GROUP BY 1")}
    assert logged == {"sales.customers": 1, "public.customers": 2, "sales.orders": 1}
    synced = run(api.sync(settings(url, proj), ["night"]))
    assert synced.phases[0].changes == 4
    assert scalar(shop, 'SELECT nombre FROM "my schema"."Clientes" WHERE id = 5') == "renamed"
    assert scalar(shop, 'SELECT count(*) FROM "my schema"."Clientes" WHERE id = 6') == 0
    assert scalar(shop, 'SELECT nombre FROM "Ventas"."Clientes" WHERE id = 301') == "new"
    assert scalar(shop, 'SELECT nombre FROM "Ventas"."Clientes" WHERE id = 5') == "c5"  # the other customers
    assert scalar(shop, 'SELECT count(*) FROM "Ventas".pedidos WHERE correo = $1', "moved@x") == 0
    sql(shop, "UPDATE sales.customers SET email = 'moved@x' WHERE id = 9")  # read by the orders' lookup
    run(api.sync(settings(url, proj), ["night"]))
    assert scalar(shop, 'SELECT count(*) FROM "Ventas".pedidos WHERE correo = $1', "moved@x") == scalar(
        shop, "SELECT count(*) FROM sales.orders WHERE customer_id = 9"
    )
    assert run(api.validate(settings(url, proj), "night", deep=True)).ok


# The targets come from the phase's revision, so that a staging copy built with pg_dump has them too.
STAGED_REVISION = """
from alembic import op

revision = "r1"
down_revision = None


def upgrade():
    op.execute('CREATE SCHEMA "Ventas"')
    op.execute('CREATE SCHEMA "my schema"')
    op.execute('CREATE TABLE "Ventas"."Clientes" (id int PRIMARY KEY, nombre varchar(10) NOT NULL, correo text)')
    op.execute('CREATE TABLE "Ventas".pedidos (id int PRIMARY KEY, cliente_id int NOT NULL '
               'REFERENCES "Ventas"."Clientes", total numeric(10,2), correo text)')
    op.execute('CREATE TABLE "my schema"."Clientes" (id int PRIMARY KEY, nombre text NOT NULL, correo text)')


def downgrade():
    op.execute('DROP SCHEMA "Ventas" CASCADE')
    op.execute('DROP SCHEMA "my schema" CASCADE')
"""


def revision_project(tmp_path, revision: str, mapping: str):
    proj = project(tmp_path, "revision: r1\n" + mapping)
    init_project(tmp_path / "scaffold")
    (proj / "alembic.ini").write_text((tmp_path / "scaffold" / "alembic.ini").read_text())
    (proj / "alembic" / "versions").mkdir(parents=True)
    (proj / "alembic" / "env.py").write_text((tmp_path / "scaffold" / "alembic" / "env.py").read_text())
    (proj / "alembic" / "versions" / "r1.py").write_text(revision)
    return proj


@pytest.mark.parametrize("built", ["template", "dump"])
def test_rehearsal_of_tables_outside_public(db_url, make_db, tmp_path, built):
    sources = SOURCE.split('CREATE TABLE "Ventas"')[0].replace(
        'CREATE SCHEMA "Ventas"; CREATE SCHEMA "my schema"; ', ""
    )
    sql(db_url, sources)
    proj = revision_project(tmp_path, STAGED_REVISION, MAPPING)
    staging = with_database(db_url, "md_test_staging_" + urlsplit(db_url).path.lstrip("/")[-12:])

    async def go():
        busy = await asyncpg.connect(db_url) if built == "dump" else None  # TEMPLATE is refused: pg_dump instead
        try:
            return await rehearse(settings(db_url, proj), ["night"], staging_url=staging, rebuild=True)
        finally:
            if busy is not None:
                await busy.close()

    try:
        result = run(go())
        assert result.built == built and result.validations_ok
        assert {t.target: t.staging_rows for t in result.tables} == {
            "Ventas.Clientes": 300,
            "Ventas.pedidos": 392,
            "my schema.Clientes": 120,
        }
        assert scalar(staging, 'SELECT count(*) FROM "my schema"."Clientes"') == 120
        assert scalar(db_url, "SELECT to_regnamespace('Ventas') IS NULL AND to_regnamespace('migrate_data') IS NULL")
    finally:
        sql(with_database(db_url, "postgres"), f'DROP DATABASE IF EXISTS "{urlsplit(staging).path[1:]}" WITH (FORCE)')


def test_backup_takes_exactly_the_named_table_when_its_name_looks_like_a_pattern(db_url, tmp_path):
    # unquoted, pg_dump -t would read . as a separator, * and ? as wildcards and fold the case: all of these match
    sql(
        db_url,
        """CREATE SCHEMA "odd.Sch*"; CREATE TABLE "odd.Sch*"."Ta?ble" (id int); CREATE TABLE "odd.Sch*"."Taxble" (id int);
        CREATE SCHEMA odd; CREATE TABLE odd."Sch*.Ta?ble" (id int); CREATE TABLE "odd.Sch*".ta_ble (id int)""",
    )
    name = QualifiedName.parse('"odd.Sch*"."Ta?ble"')
    assert (name.schema, name.name) == ("odd.Sch*", "Ta?ble") and QualifiedName.parse(str(name)) == name
    major = scalar(db_url, "SELECT current_setting('server_version_num')::int / 10000")
    path = run(backup.dump(db_url, [name], tmp_path / "b.dump", server_major=major))
    listing = restore_list(db_url, str(path)).splitlines()
    assert [line.split(" TABLE ")[1].rsplit(" ", 1)[0] for line in listing if " TABLE " in line] == [
        "odd.Sch* Ta?ble",
        "DATA odd.Sch* Ta?ble",
    ]


def test_the_commands_name_each_table_with_its_schema(shop, tmp_path):
    proj = project(tmp_path, MAPPING)
    out = invoke("night", "--yes", "--no-backup", url=shop, project=proj, output_dir=tmp_path / "out")
    assert out.exit_code == 0, out.output
    lines = [" ".join(line.split()) for line in out.stdout.splitlines()]
    assert "public.customers my schema.Clientes 120 120 0" in " | ".join(lines)
    assert any(line.startswith("Ventas.Clientes 6 22001 value of column nombre too long") for line in lines)
    out = invoke("rollback", "night", "--dry-run", url=shop, project=proj, output_dir=tmp_path / "out")
    assert "my schema.Clientes: 120 rows the phase wrote will be deleted" in out.stdout


def test_plan_warns_when_an_unqualified_name_has_namesakes_in_other_schemas(shop, tmp_path):
    mapping = MAPPING.replace("source: public.customers", "source: customers")
    result = run(api.plan(settings(shop, project(tmp_path, mapping)), "night"))
    assert not result.plan.errors
    [warning] = [f.message for f in result.plan.findings if "the same name" in f.message]
    assert warning == (
        'mappings line 13: source customers is public.customers through the search_path ("$user", public), and '
        "decoy.customers, sales.customers have the same name: write public.customers in the mapping, so that another "
        "search_path cannot pick another table"
    )
