"""The mapping language: what the loader accepts and how it explains what it does not."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from migrate_data.errors import MappingError
from migrate_data.loader import load_phase, load_phases


def write(tmp_path: Path, text: str, name: str = "phase9.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(MappingError) as e:
        load_phase(write(tmp_path, text))
    return e.value.message


def test_shipped_mappings_load():
    phases = load_phases(ROOT / "mappings")
    assert list(phases) == ["phase1", "phase2a", "phase2b", "phase3", "phase4", "phase5"]
    msg = phases["phase3"].table("mensajes").column("telefono")
    assert msg.kind == "lookup" and msg.lookup.on == ("user_id",) and msg.lookup.key == ("id",)


def test_lookup_on_key_is_not_read_as_a_boolean(tmp_path):
    # YAML 1.1 reads a bare `on` as true; the loader keeps keys as written
    p = load_phase(
        write(
            tmp_path,
            """
        tables:
          - source: a
            target: b
            columns:
              x: {lookup: {table: u, on: uid, key: id, column: phone}}
    """,
        )
    )
    assert p.tables[0].columns[0].lookup.on == ("uid",)


def test_unknown_key_names_file_line_and_path(tmp_path):
    msg = error_of(
        tmp_path,
        """
        tables:
          - source: users
            target: proveedores
            columns:
              id: id
              rating: {colum: stars}
    """,
    )
    assert msg.endswith(
        "phase9.yaml:7:16 tables[0].columns.rating: unknown key 'colum' "
        "(expected one of: column, value, lookup, sql, map, else, default, cast, truncate, round, timezone)"
    )


def test_column_given_twice_is_an_error(tmp_path):
    msg = error_of(
        tmp_path,
        """
        tables:
          - source: a
            target: b
            columns:
              id: id
              id: other
    """,
    )
    assert ":7:7 tables[0].columns.id: given twice" in msg


def test_lookup_without_on_is_an_error(tmp_path):
    msg = error_of(
        tmp_path,
        """
        tables:
          - source: a
            target: b
            columns:
              phone: {lookup: {table: users, key: id, column: phone_number}}
    """,
    )
    assert "tables[0].columns.phone.lookup: missing 'on'" in msg and ":6:23 " in msg


def test_wrong_type_is_an_error(tmp_path):
    msg = error_of(
        tmp_path,
        """
        tables:
          - source: a
            target: b
            columns: [id, name]
    """,
    )
    assert ":5:14 tables[0].columns: expected a mapping" in msg


def test_two_bases_in_one_column_is_an_error(tmp_path):
    msg = error_of(
        tmp_path,
        """
        tables:
          - {source: a, target: b, columns: {x: {column: y, value: 3}}}
    """,
    )
    assert "give exactly one of column, value, lookup, sql (got column, value)" in msg


def test_broken_yaml_names_the_line(tmp_path):
    msg = error_of(tmp_path, "tables:\n  - source: a\n    target: [b\n")
    assert "phase9.yaml:4:1: invalid YAML: " in msg and "expected ',' or ']'" in msg  # libyaml's words or PyYAML's


def test_on_conflict_accepts_only_nothing_or_update(tmp_path):
    msg = error_of(
        tmp_path,
        """
        tables:
          - {source: a, target: b, on_conflict: replace, columns: {id: id}}
    """,
    )
    assert "on_conflict: 'replace': expected nothing or update" in msg


def test_requires_must_name_an_existing_phase(tmp_path):
    write(tmp_path, "requires: [phase0]\ntables: []\n", "phase1.yaml")
    assert "requires unknown phase 'phase0'" in load_phases(tmp_path).broken["phase1"].message
    with pytest.raises(MappingError, match="requires unknown phase 'phase0'"):
        load_phases(tmp_path, strict=True)


def test_bad_mapping_exits_2_and_touches_nothing(tmp_path):
    (tmp_path / "mappings").mkdir()
    write(tmp_path / "mappings", "tables:\n  - source: a\n    target: b\n    colums: {}\n", "night1.yaml")
    out = run_cli("--project", str(tmp_path), "night1", "--yes", url="postgresql://nobody@127.0.0.1:1/none")
    assert out.returncode == 2
    assert "night1.yaml:4:5 tables[0]: unknown key 'colums'" in out.stderr
    assert "DETAIL: line 4:     colums: {}\nDETAIL:             ^\n" in out.stderr  # the line, a caret under column 5


def test_phase_file_named_like_a_command_is_refused(tmp_path):
    (tmp_path / "mappings").mkdir()
    write(tmp_path / "mappings", "tables: []\n", "status.yaml")
    out = run_cli("--project", str(tmp_path), "status", url="postgresql://nobody@127.0.0.1:1/none")
    assert out.returncode == 2
    assert "phase name 'status' is a built-in command" in out.stderr


def test_schema_qualified_names_keep_their_case_and_quoted_parts(tmp_path):
    p = load_phase(
        write(
            tmp_path,
            """
        backup: ['"my.schema"."Old ""T"', sales.orders]
        tables:
          - source: Sales.Customers
            target: '"my schema"."Clientes"'
            columns:
              x: {lookup: {table: 'ref."Users"', on: uid, key: id, column: phone}}
    """,
        )
    )
    t = p.tables[0]
    assert (t.source.schema, t.source.name) == ("Sales", "Customers")
    assert (t.target.schema, t.target.name) == ("my schema", "Clientes") and str(t.target) == "my schema.Clientes"
    assert (t.columns[0].lookup.table.schema, t.columns[0].lookup.table.name) == ("ref", "Users")
    assert [(b.schema, b.name) for b in p.backup] == [("my.schema", 'Old "T'), ("sales", "orders")]
    assert str(p.backup[0]) == '"my.schema"."Old ""T"' and str(p.backup[1]) == "sales.orders"


def test_a_malformed_quoted_name_names_file_and_line(tmp_path):
    msg = error_of(
        tmp_path,
        """
        tables:
          - source: '"sales.customers'
            target: clientes
            columns: {id: id}
    """,
    )
    assert "phase9.yaml:3:" in msg
    assert "tables[0].source" in msg and "unterminated quote" in msg
