"""Every column kind, filter and option of the mapping language, inserted and read back on PostgreSQL."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import run, sql
from migrate_data import api
from migrate_data.settings import Settings

SOURCE = """
CREATE TABLE users (id int PRIMARY KEY, phone text);
CREATE TABLE "Old Orders" (
    id int PRIMARY KEY, "order" int NOT NULL, name text, notes text, status text, amount text,
    user_id int, region text, seq int NOT NULL, UNIQUE ("order")
);
INSERT INTO users VALUES (1, '+593-1'), (2, '+593-2');
INSERT INTO "Old Orders" VALUES
  (1, 10, 'o''brien', NULL, 'pending', '12.50', 1, 'ec', 1),
  (2, 20, '  ana  ', '{"a": 1}', 'verified', '7', 2, 'pe', 1),
  (3, 30, 'zoe', '[]', 'on_hold', NULL, 99, 'ec', 2),
  (4, 40, 'max', NULL, NULL, '1', NULL, 'ec', 3);
CREATE TABLE "Nuevos Pedidos" (
    id int PRIMARY KEY, "order" int UNIQUE, nombre text NOT NULL, notas jsonb DEFAULT '{}',
    estado varchar(20), monto numeric(10, 2), telefono text, origen text, etiqueta text,
    creado_at timestamptz DEFAULT now()
);
"""


def project(tmp_path: Path, mapping: str) -> Settings:
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "mappings" / "p1.yaml").write_text(textwrap.dedent(mapping))
    return tmp_path


@pytest.fixture
def setup(db_url, tmp_path):
    sql(db_url, SOURCE)

    def go(mapping: str, **opts):
        settings = Settings(database_url=db_url, project_dir=project(tmp_path, mapping), output_dir=tmp_path)
        result = run(api.run_phase(settings, "p1", api.RunOptions(backup=False, **opts)))
        rows = sql(db_url, 'SELECT * FROM "Nuevos Pedidos" ORDER BY id')
        return result, [dict(r) for r in rows]

    return go


FULL = """
tables:
  - source: Old Orders
    target: Nuevos Pedidos
    columns:
      id: id
      order: order
      nombre: {sql: 'initcap(trim("Old Orders".name))'}
      notas: {column: notes, default: '{}'}
      estado:
        column: status
        map: {pending: pendiente, verified: verificado}
        default: pendiente
      monto: {column: amount, cast: 'numeric(10,2)'}
      telefono:
        lookup: {table: users, on: user_id, key: id, column: phone}
      origen: {value: "O'Brien's \\\\ legacy"}
"""


def test_every_column_kind_lands_as_mapped(setup):
    result, rows = setup(FULL)
    assert result.status == "done"
    assert [r["nombre"] for r in rows] == ["O'Brien", "Ana", "Zoe", "Max"]
    assert [json.loads(r["notas"]) for r in rows] == [{}, {"a": 1}, [], {}]
    # map translates, passes unmapped values through, default replaces NULL
    assert [r["estado"] for r in rows] == ["pendiente", "verificado", "on_hold", "pendiente"]
    assert [str(r["monto"]) if r["monto"] is not None else None for r in rows] == ["12.50", "7.00", None, "1.00"]
    # lookup: LEFT JOIN, NULL when nothing matches
    assert [r["telefono"] for r in rows] == ["+593-1", "+593-2", None, None]
    assert {r["origen"] for r in rows} == {"O'Brien's \\ legacy"}
    assert [r["order"] for r in rows] == [10, 20, 30, 40]
    assert all(r["etiqueta"] is None and r["creado_at"] is not None for r in rows)  # unlisted keep DEFAULT


def test_map_else_replaces_uncovered_values_but_not_null(setup):
    _, rows = setup("""
        tables:
          - source: Old Orders
            target: Nuevos Pedidos
            columns:
              id: id
              nombre: name
              estado: {column: status, map: {pending: pendiente}, else: otro}
    """)
    assert [r["estado"] for r in rows] == ["pendiente", "otro", "otro", None]


def test_where_filters_source_rows(setup):
    result, rows = setup("""
        tables:
          - source: Old Orders
            target: Nuevos Pedidos
            where: "\\"Old Orders\\".region = 'ec'"
            columns: {id: id, nombre: name}
    """)
    assert [r["id"] for r in rows] == [1, 3, 4]
    assert result.validation.tables[0].source_rows == 3 and result.validation.ok


def test_key_and_batch_by_on_other_unique_columns(setup):
    result, rows = setup(
        """
        tables:
          - source: Old Orders
            target: Nuevos Pedidos
            key: [order]
            batch_by: [order]
            columns: {id: id, order: order, nombre: name}
    """,
        batch_size=1,
    )
    assert [r["order"] for r in rows] == [10, 20, 30, 40]
    assert result.validation.ok


def test_on_conflict_update_refreshes_rows_the_phase_wrote_and_never_overwrites_others(setup, db_url):
    sql(db_url, """INSERT INTO "Nuevos Pedidos" (id, nombre, estado) VALUES (1, 'there before', 'x')""")
    mapping = """
        tables:
          - source: Old Orders
            target: Nuevos Pedidos
            on_conflict: update
            columns: {id: id, nombre: name, estado: {value: nuevo}}
    """
    _, rows = setup(mapping)
    assert rows[0]["nombre"] == "there before" and rows[1]["nombre"] == "  ana  "
    sql(db_url, """UPDATE "Old Orders" SET name = 'ana maría' WHERE id = 2""")
    _, rows = setup(mapping, recheck=True)
    assert rows[0]["nombre"] == "there before"  # not the phase's: left as it was (validation shows the difference)
    assert rows[1]["nombre"] == "ana maría" and rows[1]["estado"] == "nuevo"  # the phase's own row, refreshed


def test_on_conflict_nothing_keeps_existing_rows(setup, db_url):
    sql(db_url, """INSERT INTO "Nuevos Pedidos" (id, nombre) VALUES (1, 'kept')""")
    result, rows = setup("""
        tables:
          - source: Old Orders
            target: Nuevos Pedidos
            columns: {id: id, nombre: name}
    """)
    assert rows[0]["nombre"] == "kept" and len(rows) == 4
    assert result.tables[0].rows_written == 3


def test_composite_batch_key(setup, db_url):
    sql(db_url, 'ALTER TABLE "Old Orders" ALTER region SET NOT NULL, ADD UNIQUE (region, seq)')
    result, rows = setup(
        """
        tables:
          - source: Old Orders
            target: Nuevos Pedidos
            batch_by: [region, seq]
            columns: {id: id, nombre: name}
    """,
        batch_size=1,
    )
    assert sorted(r["id"] for r in rows) == [1, 2, 3, 4]
    assert result.tables[0].rows_read == 4
