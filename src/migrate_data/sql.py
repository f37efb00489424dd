"""Quoting: the one way identifiers and literals become SQL text.  Pure; no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .mapping import QualifiedName, text_form


def qi(name: str) -> str:
    """Quote an identifier exactly as written (case kept, quotes doubled)."""
    if "\x00" in name:
        raise ValueError("identifier contains a NUL character")
    return '"' + name.replace('"', '""') + '"'


def qname(name: QualifiedName) -> str:
    """Quote a ``[schema.]table``."""
    return f"{qi(name.schema)}.{qi(name.name)}" if name.schema else qi(name.name)


def ql(value: Any) -> str:
    """Render a YAML constant as a SQL literal (text form, quotes doubled; NULL for None)."""
    text = text_form(value)
    if text is None:
        return "NULL"
    if "\x00" in text:
        raise ValueError("literal contains a NUL character")
    if "\\" in text:
        return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + text.replace("'", "''") + "'"


def qcols(names: tuple[str, ...] | list[str], prefix: str | None = None) -> str:
    """Quote a column list, optionally qualified by an alias."""
    p = f"{qi(prefix)}." if prefix else ""
    return ", ".join(p + qi(n) for n in names)


LEDGER_SCHEMA = "migrate_data"  # the tool's own schema, in the target (and, for change capture, in the source)


def key_text(expr: str, type_: str) -> str:
    """The text of a key value that every session writes and reads the same way, whatever its ``DateStyle``,
    ``TimeZone`` or ``bytea_output``: what checkpoints, rejects and the change log hold, and what the copier and sync
    compare them with.  ``expr::text`` for most types; ISO 8601 (JSON's form) for dates and times; UTC for a
    ``timestamptz``; hex for ``bytea``.  Every name is ``pg_catalog``'s: it also runs inside capture's triggers, under
    the writer's ``search_path``.  Parsed back with ``CAST(… AS type)`` under any of those settings."""
    t = type_.lower()
    if t.startswith("timestamp") and t.endswith("with time zone"):
        utc = f"pg_catalog.to_jsonb(pg_catalog.timezone('UTC'::pg_catalog.text, {expr}))"
        return (
            f"CASE WHEN pg_catalog.isfinite({expr}) THEN ({utc} OPERATOR(pg_catalog.#>>) '{{}}'::pg_catalog.text[]) "
            f"OPERATOR(pg_catalog.||) '+00'::pg_catalog.text ELSE ({expr})::pg_catalog.text END"
        )
    if t == "date" or t.startswith(("timestamp", "time ", "time(")) or t == "time":
        return f"(pg_catalog.to_jsonb({expr}) OPERATOR(pg_catalog.#>>) '{{}}'::pg_catalog.text[])"
    if t == "bytea":
        return f"(E'\\\\x'::pg_catalog.text OPERATOR(pg_catalog.||) pg_catalog.encode({expr}, 'hex'::pg_catalog.text))"
    return f"({expr})::pg_catalog.text"


def key_text_array(exprs: Sequence[str], types: Sequence[str]) -> str:
    """``ARRAY[key_text(e1, t1), …]``: a key as the ``text[]`` the ledger holds."""
    return "ARRAY[" + ", ".join(key_text(e, t) for e, t in zip(exprs, types, strict=True)) + "]::pg_catalog.text[]"
