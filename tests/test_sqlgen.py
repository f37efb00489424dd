"""The SQL a phase runs, generated from hand-built catalog objects: no database (Alembic's op_fixture style)."""

from __future__ import annotations

import textwrap

import pytest

from migrate_data import graph, undo
from migrate_data.catalog import Column, ForeignKey, Table, parents_first
from migrate_data.compile import compile_table
from migrate_data.errors import PreflightError
from migrate_data.loader import load_phase
from migrate_data.mapping import QualifiedName


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


# -- dependents (dependents.py): the pure decisions --------------------------------------------------------------
def _dep(kind: str, name: str, effect: str, depth: int = 1, table: str = "things"):
    from migrate_data.dependents import Dependent

    return Dependent(table, kind, name, effect, create=f"CREATE {name}", drop=f"DROP {name}", depth=depth)


def test_a_function_mentions_a_table_only_as_a_whole_word_in_any_case():
    from migrate_data.dependents import mentions

    assert mentions("BEGIN RETURN (SELECT max(id) FROM Things); END", "things")
    assert mentions('SELECT 1 FROM public."things"', "things")
    assert not mentions("SELECT 1 FROM things_archive", "things")
    assert not mentions("SELECT 1 FROM old_things", "things")
    assert not mentions("SELECT $things$", "things$x")


def test_refuse_blocks_every_dependent_keep_only_those_the_drop_destroys_drop_only_the_unsaved():
    from migrate_data.dependents import CASCADE, MAY_REFERENCE, PUBLISHES, UNSAVED, WITH_TABLE, blocking

    deps = [
        _dep("view", "v", CASCADE),
        _dep("trigger", "t on things", WITH_TABLE),
        _dep("plpgsql function", "f()", MAY_REFERENCE),
        _dep("publication", "p (FOR ALL TABLES)", PUBLISHES),
        _dep("column", "other.c", UNSAVED),
    ]
    names = lambda ds: [d.name for d in ds]  # noqa: E731
    assert names(blocking(deps, {})) == names(deps)
    assert names(blocking(deps, {"things": "keep"})) == ["v", "t on things", "other.c"]
    assert names(blocking(deps, {"things": "drop"})) == ["other.c"]
    assert names(blocking(deps, {}, force=True)) == ["other.c"]
    assert names(blocking(deps, {"others": "drop"})) == names(deps)  # decided for another table only


def test_dependents_are_recreated_in_dependency_order_and_dropped_in_the_reverse():
    from migrate_data.dependents import CASCADE, MAY_REFERENCE, WITH_TABLE, drop_order, replay_order

    deps = [
        _dep("view", "first_things", CASCADE, depth=2),
        _dep("view", "thing_names", CASCADE),
        _dep("function", "count_things()", CASCADE),
        _dep("table constraint", "fk on notes", CASCADE),
        _dep("publication relation", "things in pub", WITH_TABLE),
        _dep("trigger", "stamp on things", WITH_TABLE),  # comes back with the table's backup
        _dep("plpgsql function", "last_thing()", MAY_REFERENCE),  # never dropped
    ]
    assert [d.name for d in replay_order(deps)] == [
        "count_things()",
        "thing_names",
        "fk on notes",
        "things in pub",
        "first_things",
    ]
    assert [d.name for d in drop_order(deps)] == ["first_things", "fk on notes", "thing_names", "count_things()"]


def test_real_types_enums_through_text_domains_through_their_base_and_portable_comparison(tmp_path):
    src = Table(
        "sales",
        "items",
        (
            col("id", not_null=True),
            Column("st", "status", False, False, "", False, "e", ("a", "b")),
            col("p", "numeric"),
        ),
        ("id",),
        (("id",),),
        (),
    )
    tgt = Table(
        "Ventas",
        "Artículos",
        (
            col("id", not_null=True),
            Column("estado", "estado", False, False, "", False, "e", ("a", "b"), portable="text"),
            Column(
                "precio", "precio", False, False, "", False, "d", base_type="numeric(10,2)", portable="numeric(10,2)"
            ),
        ),
        ("id",),
        (("id",),),
        (),
    )
    tm = mapping(
        tmp_path,
        """
        tables:
          - source: sales.items
            target: '"Ventas"."Artículos"'
            columns: {id: id, estado: st, precio: p}
        """,
    )
    ct = compile_table(tm, src, tgt)
    copy = ct.insert_sql(lower=True, upper=True)
    assert 'INSERT INTO "Ventas"."Artículos"' in copy and 'FROM "sales"."items" AS "items"' in copy
    assert 'CAST(CAST("items"."st" AS text) AS estado)' in copy  # no cast joins two enums
    # the domain: the cast to numeric(10,2) is checked (22003), then the domain's CHECKs
    assert "CAST(CASE WHEN" in copy and "would be rounded to numeric(10,2)" in copy and "AS precio)" in copy
    one = ct.expected_sql()
    assert "AS estado)" in one and "AS precio)" in one
    two = ct.portable()
    assert 'CAST(CAST("items"."st" AS text) AS text)' in two.expected_sql()  # across two databases: as built-in types
    assert "AS estado)" not in two.expected_sql() and "END AS numeric(10,2))" in two.expected_sql()
    assert (
        'CAST("t"."estado" AS text)' in two.actual_sql() and 'CAST("t"."precio" AS numeric(10,2))' in two.actual_sql()
    )
    assert '"t"."id"' in two.actual_sql() and 'CAST("t"."id"' not in two.actual_sql()  # built-in types as they are


def test_plan_relations_finds_the_tables_of_subplans_too():
    from migrate_data.capture_sql import plan_relations

    sub = {"Node Type": "Index Scan", "Relation Name": "prof", "Schema": "public", "Subplan Name": "SubPlan 1"}
    plan = [{"Plan": {"Node Type": "Seq Scan", "Relation Name": "cust", "Schema": "public", "Plans": [sub]}}]
    assert plan_relations(plan) == {("public", "cust"), ("public", "prof")}


def test_capture_of_a_partitioned_table_puts_the_parents_function_on_every_leaf():
    from migrate_data import capture_sql
    from migrate_data.mapping import QualifiedName

    c = capture_sql.Captured(QualifiedName("ev", "public"), ("id", "d"))
    layouts = [capture_sql.Layout(9001, (1, 2), (20, 1082)), capture_sql.Layout(9002, (1, 2), (20, 1082))]
    statements = capture_sql.install_sql("night", c, layouts, partitions=['"ev_jan"', '"ev_feb"'])
    fn = capture_sql.function_name("night", c.name)
    creates = [x for x in statements if x.startswith("CREATE TRIGGER")]
    assert len(creates) == 3 * 4 and all(x.endswith(f"EXECUTE FUNCTION {fn}()") for x in creates)
    assert sum(' ON "ev_jan" REFERENCING' in x for x in creates) == 3
    assert statements[-1].startswith('ALTER TABLE "ev_feb" ENABLE ALWAYS TRIGGER')
    drops = capture_sql.remove_sql("night", c.name, c.relation, exists=True, others=['"ev_jan"'])
    assert sum('ON "ev_jan"' in x for x in drops) == 4 and drops[-1] == f"DROP FUNCTION IF EXISTS {fn}()"


def test_the_guard_checks_each_column_at_its_number_in_the_relation_the_trigger_fired_on():
    """Each relation's columns are checked where they were at install, by name from the system cache, with no query;
    a key whose text form needs its type is checked against the type it had (a domain's own oid) in the transition
    table, as the statement will be planned; any other relation is not trusted."""
    from migrate_data import capture_sql
    from migrate_data.mapping import QualifiedName

    c = capture_sql.Captured(QualifiedName("ev", "public"), ("id", "b"), types=("integer", "bytea"))
    layouts = [
        capture_sql.Layout(9001, (1, 2), (23, 50001)),
        capture_sql.Layout(9002, (1, 2), (23, 50001)),  # a partition numbered as its parent: one branch
        capture_sql.Layout(9003, (2, 4), (23, 50001)),  # a partition with a dropped column before them
    ]
    body = capture_sql.function_sql("night", c, layouts)
    assert body.count("WHEN TG_RELID OPERATOR(pg_catalog.=) ANY (") == 2 and "ANY ('{9001, 9002}'" in body
    assert "TG_RELID, 4::pg_catalog.int4)).object_names[3] OPERATOR(pg_catalog.=) 'b'::pg_catalog.text" in body
    assert "ELSE false END) IS NOT TRUE THEN" in body and "pg_attribute" not in body
    typed = 'pg_typeof(r."b")::pg_catalog.oid OPERATOR(pg_catalog.=) 50001::pg_catalog.oid'
    assert body.count(typed) == 3 and 'pg_typeof(r."id")' not in body  # an integer's text needs no type
    assert 'FROM "migrate_data_old" AS r LIMIT 1' in body  # a DELETE's rows are in the old table only
    plain = capture_sql.function_sql(
        "night", capture_sql.Captured(c.table, ("id",)), [capture_sql.Layout(9001, (1,), (23,))]
    )
    assert "pg_typeof" not in plain


def test_a_key_is_written_as_text_no_session_setting_changes():
    from migrate_data import capture_sql
    from migrate_data.mapping import QualifiedName
    from migrate_data.sql import key_text

    assert key_text("t.id", "bigint") == "(t.id)::pg_catalog.text"  # the copier's hot path stays a plain cast
    assert "to_jsonb(t.d)" in key_text("t.d", "date")  # ISO 8601 whatever the DateStyle
    assert "to_jsonb(t.d)" in key_text("t.d", "timestamp(3) without time zone")
    assert "timezone('UTC'::pg_catalog.text, t.d)" in key_text("t.d", "timestamp with time zone")
    assert "encode(t.b, 'hex'" in key_text("t.b", "bytea")
    c = capture_sql.Captured(QualifiedName("days", "public"), ("d",), types=("date",))
    body = capture_sql.function_sql("night", c, [capture_sql.Layout(9001, (1,), (1082,))])
    assert 'to_jsonb(n."d")' in body and 'to_jsonb(o."d")' in body and "::pg_catalog.text)" not in body
    # the trigger checks that the columns it names are there before it names them: a rename must not fail a write
    guard, keyed = (
        body.index("pg_identify_object_as_address(1259::pg_catalog.oid, TG_RELID, 1::pg_catalog.int4)"),
        body.index(
            "INSERT INTO \"migrate_data\".changes (phase, source, key, op) SELECT 'night', 'public.days', k, 'I'"
        ),
    )
    assert guard < keyed


def test_sync_updates_a_row_when_any_value_would_read_differently_as_text(tmp_path):
    """Only the phase's own rows whose values differ are updated.  Values whose equality is their text's are
    compared as they are (text bytewise, whatever the collation); numeric (1.0 = 1.00), jsonb and the rest as text."""
    from migrate_data import sync_sql

    src = Table(
        "public",
        "prices",
        (col("id", not_null=True), col("name", "text"), col("amount", "numeric")),
        ("id",),
        (("id",),),
        (),
    )
    tgt = Table(
        "public",
        "precios",
        (col("id", not_null=True), col("nombre", "text"), col("monto", "numeric(10,2)")),
        ("id",),
        (("id",),),
        (),
    )
    tm = mapping(
        tmp_path,
        "tables:\n  - source: prices\n    target: precios\n    columns: {id: id, nombre: name, monto: amount}\n",
    )
    st = sync_sql.SyncTable(compile_table(tm, src, tgt), tgt, ("id",), ("integer",), (0,), (0,))
    sql = sync_sql.upsert_sql(st)
    assert 'ROW("__target"."nombre" COLLATE "C") IS DISTINCT FROM ROW(EXCLUDED."nombre" COLLATE "C")' in sql
    assert 'ROW("__target"."monto")::text IS DISTINCT FROM ROW(EXCLUDED."monto")::text' in sql
    assert sql.endswith(
        'AND "__target".xmin IN (SELECT w.xmin FROM "migrate_data".writes AS w WHERE w.target = \'public.precios\')'
    )
