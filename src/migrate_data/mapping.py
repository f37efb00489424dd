"""What a phase file says, as frozen dataclasses: phases, table mappings, column specs, lookups, qualified names.
``loader.py`` reads them from ``mappings/<phase>.yaml`` with ``file:line path`` errors; the pre-flight
(``preflight.py``) checks them against the live catalogs.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput, MappingError

PHASE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
CAST_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .,()\[\]\"]*$")
MAX_IDENTIFIER = 63
TIME_ZONE = re.compile(r"^[A-Za-z0-9_+\-/:.]+$")


@dataclass(frozen=True)
class QualifiedName:
    """A ``[schema.]name`` as written in the mapping; ``schema`` None means the search_path."""

    name: str
    schema: str | None = None

    @classmethod
    def parse(cls, text: str) -> QualifiedName:
        """``name``, ``schema.name``, or either part in double quotes (``"my.schema"."Tabla"``, ``""`` for a quote).

        Case is kept, quoted or not: ``Ventas.Clientes`` is the schema ``Ventas`` and the table ``Clientes``.  Without
        quotes the first ``.`` separates the schema.  Raise ValueError on a malformed quoted name."""
        if '"' not in text:
            schema, dot, name = text.partition(".")
            return cls(name=name, schema=schema) if dot else cls(name=text)
        parts = _quoted_parts(text)
        if len(parts) > 2:
            raise ValueError(f"{text!r} has {len(parts)} parts; expected [schema.]table")
        return cls(name=parts[-1], schema=parts[0] if len(parts) == 2 else None)

    def __str__(self) -> str:
        """``schema.name`` as written; a part with a ``.`` or a ``"`` in double quotes, so that parse() reads it back."""
        name = _display_part(self.name)
        return f"{_display_part(self.schema)}.{name}" if self.schema else name


def _display_part(part: str) -> str:
    return '"' + part.replace('"', '""') + '"' if ("." in part or '"' in part) else part


def _quoted_parts(text: str) -> list[str]:
    """Split ``a."b.c"`` into its parts, each unquoted (``""`` inside quotes is one ``"``)."""
    parts: list[str] = []
    i = 0
    while True:
        if text.startswith('"', i):
            end, buf = i + 1, []
            while True:
                q = text.find('"', end)
                if q < 0:
                    raise ValueError(f"{text!r}: unterminated quote")
                buf.append(text[end:q])
                if text.startswith('"', q + 1):
                    buf.append('"')
                    end = q + 2
                    continue
                i = q + 1
                break
            part = "".join(buf)
        else:
            dot = text.find(".", i)
            part = text[i:] if dot < 0 else text[i:dot]
            if '"' in part:
                raise ValueError(f"{text!r}: a quote inside an unquoted name")
            i = len(text) if dot < 0 else dot
        if not part:
            raise ValueError(f"{text!r}: an empty name")
        parts.append(part)
        if i == len(text):
            return parts
        if text[i] != ".":
            raise ValueError(f"{text!r}: expected a . after the quoted name")
        i += 1


@dataclass(frozen=True)
class Lookup:
    """``LEFT JOIN table ON table.key = source.on`` and take ``table.column``."""

    table: QualifiedName
    on: tuple[str, ...]
    key: tuple[str, ...]
    column: str


@dataclass(frozen=True)
class ColumnSpec:
    """What goes into one target column: a base (column, value, lookup or sql) and its modifiers."""

    target: str
    kind: str  # "column" | "value" | "lookup" | "sql"
    line: int
    column: str | None = None
    value: Any = None
    lookup: Lookup | None = None
    sql: str | None = None
    map: tuple[tuple[str, Any], ...] = ()
    has_else: bool = False
    else_value: Any = None
    has_default: bool = False
    default: Any = None
    cast: str | None = None
    truncate: bool = False  # a text value longer than the target type may be cut (otherwise it is quarantined)
    round: bool = False  # a number (or time) may be rounded to the target type's scale (otherwise quarantined)
    timezone: str | None = None  # the zone of a timestamp <-> timestamptz conversion (else the phase's)

    @property
    def is_plain_column(self) -> bool:
        return self.kind == "column" and not (self.map or self.has_else or self.has_default or self.cast)


@dataclass(frozen=True)
class TableMapping:
    """One source table copied into one target table."""

    source: QualifiedName
    target: QualifiedName
    columns: tuple[ColumnSpec, ...]
    line: int
    where: str | None = None
    key: tuple[str, ...] | None = None
    batch_by: tuple[str, ...] | None = None
    on_conflict: str = "nothing"
    timezone: str | None = None  # the phase's `timezone:`, for columns that give none
    # Whether the target's user triggers fire on the copied rows: "fire" or "skip" (None: not said, "fire")
    target_triggers: str | None = None

    @property
    def by_blocks(self) -> bool:
        """``batch_by: ctid``: the source is copied by ranges of physical blocks (see docs/mapping.md)."""
        return self.batch_by == ("ctid",)

    def column(self, target: str) -> ColumnSpec | None:
        return next((c for c in self.columns if c.target == target), None)


@dataclass(frozen=True)
class Phase:
    """One night's work: its schema revision, the tables it copies, what it needs first."""

    name: str
    path: Path
    description: str = ""
    requires: tuple[str, ...] = ()
    revision: str | None = None
    backup: tuple[QualifiedName, ...] = ()
    tables: tuple[TableMapping, ...] = field(default_factory=tuple)
    timezone: str | None = None  # the zone of every timestamp <-> timestamptz conversion of the phase
    target_triggers: str | None = None  # the default of the phase's tables: "fire" | "skip"
    # what a drop of each ``backup:`` table does with the objects that depend on it: "keep" | "drop" (unlisted:
    # refuse); see dependents.py and docs/mapping.md
    dependents: tuple[tuple[str, str], ...] = ()

    def table(self, target: str) -> TableMapping | None:
        return next((t for t in self.tables if str(t.target) == target or t.target.name == target), None)


def display_path(path: Path) -> str:
    """A phase file's path as errors show it: relative to the working directory when it is below it."""
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else str(path)
    except ValueError:
        return str(path)


def text_form(value: Any) -> str | None:
    """Return the text PostgreSQL would show for a YAML scalar (None for null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return str(value)


class Phases(dict[str, Phase]):
    """The project's phases that load, in order; ``broken`` maps the name of every phase that does not (its file has
    an error, or it requires such a phase) to its MappingError, so one bad file does not block the other phases."""

    def __init__(self, phases: dict[str, Phase] | None = None, broken: dict[str, MappingError] | None = None) -> None:
        super().__init__(phases or {})
        self.broken: dict[str, MappingError] = dict(broken or {})

    def names(self) -> list[str]:
        """Every phase of the project, loaded or not."""
        return sorted({*self, *self.broken}, key=natural_key)

    def require(self, name: str) -> Phase:
        """The phase ``name``; its file's error when it does not load; BadInput listing the phases when no file has
        that name.  A phase that drops data (``backup:``) is refused while any phase file has an error: the proof
        that nothing is lost needs every data phase."""
        if name in self.broken:
            raise self.broken[name]
        if name not in self:
            raise unknown_phase(name, self.names())
        phase = self[name]
        if phase.backup and self.broken:
            first = next(iter(self.broken.values()))
            raise MappingError(
                f"{name} drops data, and the phase file of {', '.join(self.broken)} has an error",
                detail=first.message,
                hint="fix it first: before dropping anything, every data phase must be checked",
            )
        return phase


def unknown_phase(name: str, names: list[str]) -> BadInput:
    close = difflib.get_close_matches(name, names, n=1)
    return BadInput(
        f"no phase {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
        hint=f"phases: {', '.join(names) or 'none (no mappings/*.yaml)'}",
    )


def phase_order(phases: dict[str, Phase]) -> list[str]:
    """Return phase names so that every phase comes after what it requires (file order otherwise)."""
    out: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise MappingError(f"phases require each other in a cycle: {' -> '.join(chain + (name,))}")
        state[name] = 1
        for r in phases[name].requires:
            visit(r, chain + (name,))
        state[name] = 2
        out.append(name)

    for name in sorted(phases, key=natural_key):
        visit(name, ())
    return out


def natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
