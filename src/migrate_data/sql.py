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


def _signed(v: str) -> str:
    """A number's text with its sign always written: a leading sign alone applies to every field of an interval read
    with ``IntervalStyle = sql_standard``."""
    return (
        f"(CASE WHEN ({v}) OPERATOR(pg_catalog.<) 0 THEN '' ELSE '+' END OPERATOR(pg_catalog.||) "
        f"({v})::pg_catalog.text)"
    )


def key_text(expr: str, type_: str) -> str:
    """The text of a key value that every session writes and reads the same way, whatever its ``DateStyle``,
    ``TimeZone``, ``IntervalStyle``, ``extra_float_digits`` or ``bytea_output``: what checkpoints, rejects and the
    change log hold, and what the copier and sync compare them with.  ``expr::text`` for most types; ISO 8601 (JSON's
    form) for dates and times; UTC for a ``timestamptz``; hex for ``bytea``; every digit a float needs (``to_char``'s
    exponent form); an interval's months, days and microseconds, each signed.  Every name is ``pg_catalog``'s: it also
    runs inside capture's triggers, under the writer's ``search_path``.  Parsed back with ``CAST(… AS type)`` under
    any of those settings."""
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
    if t in ("double precision", "real"):  # ::text drops digits when extra_float_digits < 1
        digits = "0." + "0" * (16 if t == "double precision" else 8) + "EEEE"
        return (
            f"CASE WHEN ({expr}) OPERATOR(pg_catalog.-) ({expr}) OPERATOR(pg_catalog.=) '0' THEN "
            f"pg_catalog.btrim(pg_catalog.to_char({expr}, '{digits}'::pg_catalog.text)) "
            f"ELSE ({expr})::pg_catalog.text END"  # NaN, Infinity and -Infinity, which no setting changes
        )
    if t == "interval" or t.startswith(("interval ", "interval(")):  # ::text depends on IntervalStyle
        x = f"({expr})"
        months = f"(EXTRACT(year FROM {x}) OPERATOR(pg_catalog.*) 12 OPERATOR(pg_catalog.+) EXTRACT(month FROM {x}))"
        micros = (
            f"((EXTRACT(hour FROM {x}) OPERATOR(pg_catalog.*) 60 OPERATOR(pg_catalog.+) EXTRACT(minute FROM {x})) "
            f"OPERATOR(pg_catalog.*) 60000000 OPERATOR(pg_catalog.+) EXTRACT(microseconds FROM {x}))"
        )
        parts = " OPERATOR(pg_catalog.||) ".join(
            (_signed(months), "' mons '", _signed(f"EXTRACT(day FROM {x})"), "' days '", _signed(micros), "' us'")
        )
        return f"CASE WHEN pg_catalog.isfinite({x}) THEN {parts} ELSE {x}::pg_catalog.text END"
    return f"({expr})::pg_catalog.text"


def key_text_typed(type_: str) -> bool:
    """Whether ``key_text``'s form of ``type_`` is its own (anything but ``::text``): it calls the type's functions
    (``encode`` takes a bytea only), or it reads as another value once the column is of another type (a timestamptz in
    JSON's form is another day as a date).  Capture checks such a key's type in every statement."""
    return key_text("x", type_) != "(x)::pg_catalog.text"


def key_text_array(exprs: Sequence[str], types: Sequence[str]) -> str:
    """``ARRAY[key_text(e1, t1), …]``: a key as the ``text[]`` the ledger holds."""
    return "ARRAY[" + ", ".join(key_text(e, t) for e, t in zip(exprs, types, strict=True)) + "]::pg_catalog.text[]"
