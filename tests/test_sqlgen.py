"""The SQL a phase runs, generated from hand-built catalog objects: no database (Alembic's op_fixture style)."""

from __future__ import annotations

import textwrap

import pytest

from migrate_data import graph, undo
from migrate_data.catalog import Column, ForeignKey, Table, parents_first
from migrate_data.compile import compile_table
from migrate_data.errors import PreflightError
from migrate_data.mapping import QualifiedName, load_phase


def col(
    name: str, type_: str = "integer", *, not_null: bool = False, default: bool = False, identity: str = ""
) -> Column:
    return Column(name, type_, not_null, default, identity, False)


SRC = Table(
    "public",
    "customers",
    (col("id", not_null=True), col("full_name", "text"), col("status", "text"), col("order", "text")),
    ("id",),
    (("id",),),
    (),
)
TGT = Table(
    "public",
    "clientes",
    (
        col("id", not_null=True),
        col("nombre", "character varying(10)"),
        col("estado", "text"),
        col("orden", "text"),
    ),
    ("id",),
    (("id",),),
    (),
)


def mapping(tmp_path, body: str):
    path = tmp_path / "night.yaml"
    path.write_text(textwrap.dedent(body))
    return load_phase(path).tables[0]


def test_the_copy_is_one_insert_select_on_conflict_over_a_keyset_range(tmp_path):
    tm = mapping(
        tmp_path,
        """
        tables:
          - source: customers
            target: clientes
            columns:
              id: id
              estado: {column: status, map: {active: activo}, default: activo}
              orden: order
        """,
    )
    ct = compile_table(tm, SRC, TGT)
    sql = ct.insert_sql(lower=True, upper=True)
    assert sql.startswith('INSERT INTO "public"."clientes" AS "__target" ("id", "estado", "orden") SELECT ')
    assert 'FROM "public"."customers" AS ' in sql
    assert "> CAST($1::text AS integer)" in sql and "<= CAST($2::text AS integer)" in sql
    assert sql.endswith(' ON CONFLICT ("id") DO NOTHING')
    assert '"order"' in sql  # a reserved word, quoted
    assert "'active'" in sql and "'activo'" in sql  # the map's values are literals of the mapping, escaped


def test_a_value_that_could_be_cut_is_checked_not_cast(tmp_path):
    tm = mapping(tmp_path, "tables:\n  - {source: customers, target: clientes, columns: {id: id, nombre: full_name}}\n")
    ct = compile_table(tm, SRC, TGT, value_types={"nombre": "text"})
    sql = ct.insert_sql(lower=False, upper=False)
    assert "refuse" in sql  # text into varchar(10): too long a value raises 22001 instead of being cut
    explicit = mapping(
        tmp_path,
        "tables:\n  - {source: customers, target: clientes, columns: {id: id, nombre: {column: full_name, truncate: true}}}\n",
    )
    assert "refuse" not in compile_table(explicit, SRC, TGT, value_types={"nombre": "text"}).insert_sql(
        lower=False, upper=False
    )


def test_a_missing_source_column_is_a_preflight_error_naming_it(tmp_path):
    tm = mapping(tmp_path, "tables:\n  - {source: customers, target: clientes, columns: {id: id, estado: nope}}\n")
    with pytest.raises(PreflightError, match="nope"):
        compile_table(tm, SRC, TGT)


def test_rollback_deletes_by_ctid_only_rows_whose_xmin_is_one_of_the_phase_write_marks():
    table = QualifiedName("clientes", "public")
    pick = undo.batch_sql(table, "ours")
    assert pick.startswith("WITH p AS (SELECT $1::text AS phase, $2::text AS target, $3::text::pg_snapshot AS snap) ")
    assert 't.xmin IN (SELECT w.xmin FROM "migrate_data".writes AS w WHERE w.phase = p.phase' in pick
    assert pick.endswith("LIMIT $4) x")
    delete = undo.delete_sql(table, "ours", returning=False)
    assert 'DELETE FROM "public"."clientes" AS t USING p WHERE t.ctid = ANY ($4::tid[]) AND t.xmin IN' in delete
    assert "RETURNING" not in delete
    saved = undo.delete_sql(table, "others", returning=True)
    assert "NOT (t.xmin IN" in saved and "pg_visible_in_snapshot" in saved
    assert saved.endswith("RETURNING to_jsonb(t) AS row")


def test_tables_are_ordered_parents_first_and_cycles_are_found():
    child = Table(
        "public",
        "hijo",
        (col("id"), col("padre_id")),
        ("id",),
        (("id",),),
        (ForeignKey("fk", ("padre_id",), QualifiedName("padre", "public"), ("id",), False, True),),
    )
    parent = Table("public", "padre", (col("id"),), ("id",), (("id",),), ())
    assert [t.name for t in parents_first([child, parent])] == ["padre", "hijo"]
    assert graph.cycles({"a": {"b"}, "b": {"a"}, "c": {"c"}, "d": {"a"}}) == [{"a", "b"}, {"c"}]
    assert graph.parents_first(["c", "b", "a"], {"c": {"a"}}) == ["a", "c", "b"]


def test_plan_relations_finds_the_tables_of_subplans_too():
    from migrate_data.capture import plan_relations

    sub = {"Node Type": "Index Scan", "Relation Name": "prof", "Schema": "public", "Subplan Name": "SubPlan 1"}
    plan = [{"Plan": {"Node Type": "Seq Scan", "Relation Name": "cust", "Schema": "public", "Plans": [sub]}}]
    assert plan_relations(plan) == {("public", "cust"), ("public", "prof")}


def test_capture_of_a_partitioned_table_puts_the_parents_function_on_every_leaf():
    from migrate_data import capture
    from migrate_data.mapping import QualifiedName

    c = capture.Captured(QualifiedName("ev", "public"), ("id", "d"))
    statements = capture.install_sql("night", c, leaves=['"ev_jan"', '"ev_feb"'])
    fn = capture.function_name("night", c.name)
    creates = [x for x in statements if x.startswith("CREATE TRIGGER")]
    assert len(creates) == 3 * 4 and all(x.endswith(f"EXECUTE FUNCTION {fn}()") for x in creates)
    assert sum(" ON \"ev_jan\" REFERENCING" in x for x in creates) == 3
    assert statements[-1].startswith('ALTER TABLE "ev_feb" ENABLE ALWAYS TRIGGER')
    drops = capture.remove_sql("night", c.name, c.relation, exists=True, others=['"ev_jan"'])
    assert sum('ON "ev_jan"' in x for x in drops) == 4 and drops[-1] == f"DROP FUNCTION IF EXISTS {fn}()"
