"""Quoting: the one way identifiers and literals become SQL text.  Pure; no I/O."""

from __future__ import annotations

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
