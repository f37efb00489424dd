"""Alembic owns the schema: revisions, the bridge, offline SQL, and `migrate-data init`."""

from __future__ import annotations

import textwrap

from conftest import ROOT, run, run_cli, scalar, sql
from migrate_data import schema
from migrate_data.db import open_pool
from migrate_data.settings import Settings

SPANISH = (
    "clientes",
    "profesiones",
    "proveedores",
    "proveedor_profesiones",
    "servicios_proveedor",
    "solicitudes_servicio",
    "mensajes",
    "sesiones",
    "tareas_programadas",
)


def tables(url: str) -> set[str]:
    return {r[0] for r in sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_phase1_up_and_down_leaves_no_spanish_table(db_url):
    settings = Settings(database_url=db_url, project_dir=ROOT)

    async def step(**kw):
        async with open_pool(db_url) as pool, schema.schema_transaction(settings, pool, commit=True, **kw):
            pass

    run(step(upgrade_to="phase1"))
    assert set(SPANISH) <= tables(db_url)
    run(step(upgrade_to="phase1"))  # twice: a no-op
    assert scalar(db_url, "SELECT version_num FROM alembic_version") == "phase1"
    run(step(downgrade_to="base"))
    assert not set(SPANISH) & tables(db_url)


def test_history_reads_like_the_plan():
    heads = [r.revision for r in schema.script_directory(Settings(database_url="", project_dir=ROOT)).walk_revisions()]
    assert heads == ["phase5", "phase4", "phase1"]


def test_alembic_by_hand_uses_database_url(db_url):
    import os
    import subprocess
    import sys

    env = dict(os.environ, DATABASE_URL=db_url)
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "phase1"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    assert "clientes" in tables(db_url)
    subprocess.run(
        [sys.executable, "-m", "alembic", "downgrade", "base"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    assert "clientes" not in tables(db_url)


def test_shipped_alembic_files_are_the_init_templates():
    template = ROOT / "src" / "migrate_data" / "templates"
    assert (ROOT / "alembic" / "env.py").read_text() == (template / "alembic" / "env.py").read_text()
    assert (ROOT / "alembic.ini").read_text() == (template / "alembic.ini").read_text()


def test_init_project_runs_a_phase_of_its_own_schema_end_to_end(db_url, tmp_path):
    project = tmp_path / "shop"
    out = run_cli("init", str(project))
    assert out.returncode == 0, out.stderr
    assert (project / "alembic" / "env.py").is_file() and (project / "mappings" / "example.yaml.example").is_file()
    assert not list((project / "alembic" / "versions").glob("*.py"))  # nothing of the shipped plan
    (project / "alembic" / "versions" / "v1.py").write_text(
        textwrap.dedent("""
        from alembic import op
        revision = "v1"
        down_revision = None
        branch_labels = None
        depends_on = None

        def upgrade():
            op.execute("CREATE TABLE artikel (nr int PRIMARY KEY, bezeichnung text NOT NULL, preis numeric(8, 2))")

        def downgrade():
            op.execute("DROP TABLE artikel")
    """)
    )
    (project / "mappings" / "night1.yaml").write_text(
        textwrap.dedent("""
        description: Articles to German
        revision: v1
        tables:
          - source: items
            target: artikel
            columns:
              nr: id
              bezeichnung: {column: title, default: unbenannt}
              preis: {column: price_text, cast: 'numeric(8,2)'}
    """)
    )
    sql(
        db_url,
        "CREATE TABLE items (id int PRIMARY KEY, title text, price_text text); "
        "INSERT INTO items SELECT i, CASE WHEN i % 3 = 0 THEN NULL ELSE 'item ' || i END, i || '.5' "
        "FROM generate_series(1, 100) i",
    )
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)}
    out = run_cli("night1", "--yes", url=db_url, cwd=project, env=env)
    assert out.returncode == 0, out.stderr
    assert scalar(db_url, "SELECT count(*) FROM artikel WHERE bezeichnung = 'unbenannt'") == 33
    assert scalar(db_url, "SELECT sum(preis) FROM artikel") == sum(i + 0.5 for i in range(1, 101))
    out = run_cli("rollback", "night1", "--yes", url=db_url, cwd=project, env=env)
    assert out.returncode == 0, out.stderr
    assert "artikel" not in tables(db_url) and scalar(db_url, "SELECT count(*) FROM items") == 100


def test_init_refuses_to_overwrite(tmp_path):
    assert run_cli("init", str(tmp_path)).returncode == 0
    out = run_cli("init", str(tmp_path))
    assert out.returncode == 2 and "not overwriting anything" in out.stderr
