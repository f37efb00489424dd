"""Mapping + catalog -> a CompiledTable: the SQL a table's copy, validation and rollback run.  Pure: no I/O.

Every statement a phase runs is rendered from quoted identifiers (``sql.qi``) and escaped literals (``sql.ql``);
values that change per batch are bind parameters.  ``where:`` and ``sql:`` are the DBA's own SQL and are pasted as
written, in parentheses.  The builders are by concern: ``copy_sql`` (the copier), ``verify_sql`` (validation),
``check_sql`` (the pre-flight's counts), ``undo`` (rollback), over the model in ``model.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import partitions
from .catalog import Column, Table
from .conversions import Step, change_kind, literal_fits, zone_conversion
from .copy_sql import CopySQL
from .errors import PreflightError
from .mapping import ColumnSpec, Lookup, QualifiedName, TableMapping, text_form
from .model import CompiledColumn
from .sql import qi, ql, qname
from .verify_sql import VerifySQL

# Whether the target's user triggers fire on the copied rows when the mapping does not say (docs/mapping.md): they
# fire, as they would for any INSERT; `skip` needs a privilege most roles lack and silences the foreign keys too.
DEFAULT_TARGET_TRIGGERS = "fire"

KEYLESS_HINT = (
    "give {table} a key to page on: a primary key, or a unique index on NOT NULL columns (then name them in "
    "`batch_by:` if they are not the primary key); or copy it by physical blocks with `batch_by: ctid` "
    "(PostgreSQL 14+): {table} must then not be written during the copy, it cannot be kept in sync afterwards, and "
    "validation compares row counts and a hash of the whole multiset of rows (docs/mapping.md, Tables without a key)"
)


@dataclass(frozen=True)
class CompiledTable(CopySQL, VerifySQL):
    """Everything needed to copy, check and undo one table mapping, as SQL text (fields in ``model.TableModel``)."""


def compile_table(
    mapping: TableMapping,
    source: Table,
    target: Table,
    lookup_tables: dict[QualifiedName, Table] | None = None,
    *,
    value_types: dict[str, str] | None = None,
) -> CompiledTable:
    """Compile one table mapping against the source and target catalogs.

    ``lookup_tables`` (the catalogs of the lookups' tables) and ``value_types`` (the types the database gives the
    ``sql:`` expressions, by target column) tell the types of the values, which decide whether a cast can cut or
    round them and whether a conversion needs a time zone; without them such casts are checked row by row.

    Raises PreflightError for what makes SQL impossible to build (a column that does not exist,
    no key to conflict on, a constant of the mapping that does not fit its column); everything else is the
    pre-flight's job.
    """
    where = f"{mapping.target} (mappings line {mapping.line})"
    reads = _Reads(mapping, source, lookup_tables or {}, value_types or {}, where)
    columns: list[CompiledColumn] = []
    for spec in mapping.columns:
        tcol = _target_column(spec, target, where)
        columns.append(_column(spec, tcol, reads.value(spec, tcol), mapping.timezone, where))
    key = _key(mapping, target, {c.target for c in columns}, where)
    batch_by = _batch_by(mapping, source, key, where)
    replica = (mapping.target_triggers or DEFAULT_TARGET_TRIGGERS) == "skip"
    return CompiledTable(
        mapping=mapping,
        source=source.qualified,
        target=target.qualified,
        alias=reads.alias,
        columns=tuple(columns),
        joins=tuple(reads.joins),
        batch_by=batch_by,
        batch_types=_batch_types(mapping, source, batch_by, where),
        key=key,
        key_types=tuple(target.column(k).key_type for k in key),  # type: ignore[union-attr]
        overriding=any(target.column(c.target).identity == "a" for c in columns),  # type: ignore[union-attr]
        lookups=tuple(reads.lookups),
        key_injective=_key_injective(source, columns, key),
        leaves=tuple(leaf.name for leaf in source.leaves),
        replica=replica,
        fk_checks=target.foreign_keys if replica else (),  # replica mode silences them: the insert checks them
    )


# -- a column ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    """A column's value on its way to the target column: its SQL, the type of that SQL (None: not known, so it is
    cast), the type of the values it carries (None: not known) and whether values of the source reach it (not only
    the mapping's constants)."""

    sql: str
    sql_type: str | None
    value_type: str | None
    from_source: bool = True


class _Reads:
    """What a table's columns read: source columns, constants, ``sql:`` expressions, and looked-up columns with the
    LEFT JOIN each lookup needs (one per lookup table, ``on`` and ``key``, whichever columns share it)."""

    def __init__(
        self,
        mapping: TableMapping,
        source: Table,
        lookup_tables: dict[QualifiedName, Table],
        value_types: dict[str, str],
        where: str,
    ) -> None:
        self.alias = mapping.source.name
        self.source = source
        self.lookup_tables = lookup_tables
        self.value_types = value_types
        self.where = where
        self.joins: list[str] = []
        self.lookups: list[tuple[str, Lookup]] = []
        self._aliases: dict[tuple[QualifiedName, tuple[str, ...], tuple[str, ...]], str] = {}

    def value(self, spec: ColumnSpec, tcol: Column) -> _Value:
        """What ``spec`` reads, before its map, default and casts."""
        if spec.kind == "column":
            assert spec.column is not None
            scol = self.source.column(spec.column)
            if scol is None:
                raise PreflightError(
                    f"{self.where}: columns.{spec.target}: source column {self.source.name}.{spec.column} does not "
                    "exist",
                    hint=f"columns of {self.source.name}: {', '.join(c.name for c in self.source.columns)}",
                )
            sql = f"{qi(self.alias)}.{qi(spec.column)}"
            if scol.labels and scol.type != tcol.type:  # no cast joins two enums: through the labels' text
                text = "text[]" if scol.is_array else "text"
                return _Value(f"CAST({sql} AS {text})", text, scol.type)
            return _Value(sql, scol.type, scol.type)
        if spec.kind == "value":
            return _Value(ql(spec.value), None, None, from_source=False)
        if spec.kind == "sql":
            return _Value(f"({spec.sql})", None, self.value_types.get(spec.target))
        assert spec.lookup is not None
        return self._looked_up(spec, spec.lookup)

    def _looked_up(self, spec: ColumnSpec, lk: Lookup) -> _Value:
        for on in lk.on:
            if self.source.column(on) is None:
                raise PreflightError(
                    f"{self.where}: columns.{spec.target}: lookup.on column {self.source.name}.{on} does not exist"
                )
        sig = (lk.table, lk.on, lk.key)
        la = self._aliases.get(sig)
        table = self.lookup_tables.get(lk.table)  # schema-qualified, whatever the search_path
        if la is None:
            la = self._aliases[sig] = f"lookup{len(self._aliases) + 1}"
            cond = " AND ".join(
                f"{qi(la)}.{qi(k)} = {qi(self.alias)}.{qi(o)}" for o, k in zip(lk.on, lk.key, strict=True)
            )
            self.joins.append(f"LEFT JOIN {qname(table.qualified if table else lk.table)} AS {qi(la)} ON {cond}")
            self.lookups.append((la, lk))
        column = table.column(lk.column) if table else None
        return _Value(f"{qi(la)}.{qi(lk.column)}", None, column.type if column else None)


def _target_column(spec: ColumnSpec, target: Table, where: str) -> Column:
    """The column ``spec`` writes: one that exists and is not generated."""
    tcol = target.column(spec.target)
    if tcol is None:
        raise PreflightError(
            f"{where}: target column {target.name}.{spec.target} does not exist",
            hint=f"columns of {target.name}: {', '.join(c.name for c in target.columns)}",
        )
    if tcol.generated:
        raise PreflightError(
            f"{where}: columns.{spec.target} (line {spec.line}): {target.name}.{spec.target} is a generated "
            f"column (GENERATED ALWAYS AS {_parenthesized(tcol.expression)} STORED) and cannot be written",
            hint="leave it out of the mapping: PostgreSQL computes it from the columns that are copied",
        )
    return tcol


def _column(spec: ColumnSpec, tcol: Column, read: _Value, phase_zone: str | None, where: str) -> CompiledColumn:
    """One column compiled: what it reads, its map and default, its time zone conversion and its casts."""
    mapped = _mapped(spec, read)
    value = replace(mapped, sql=f"COALESCE({mapped.sql}, {ql(spec.default)})") if spec.has_default else mapped
    cast_type = spec.cast or tcol.type
    # A timestamp becomes a timestamptz (or back) only in a time zone the mapping names: the server session's
    # TimeZone would otherwise decide, silently.  Converted here, on the source, so that the text shipped to
    # another database carries its offset.
    zone = spec.timezone or phase_zone
    zconv = None if spec.map else zone_conversion(value.value_type, cast_type)
    if zconv is not None and zone is not None:
        value = _in_time_zone(value, zconv, zone)
    steps = _casts(spec, tcol, value)
    _check_constants(spec, steps or [Step(tcol.type)], where)
    column = CompiledColumn(
        spec.target,
        tcol.type,
        value.sql,
        value.sql,
        cast_type,
        read.sql,
        mapped.sql,
        spec,
        steps=tuple(steps),
        value_type=read.value_type if not spec.map else "text",
        zone=zone if zconv else None,
        zone_conversion=zconv,
        portable_type=tcol.portable or None,
    )
    return replace(column, expr=column.convert(value.sql))


def _mapped(spec: ColumnSpec, read: _Value) -> _Value:
    """The value after ``map:`` (a CASE over its text; with ``else:``, no value of the source gets through)."""
    if not spec.map:
        return read
    base = read.sql
    if spec.has_else:
        whens = " ".join(f"WHEN ({base})::text = {ql(k)} THEN {ql(v)}" for k, v in spec.map)
        sql = f"CASE WHEN ({base}) IS NULL THEN NULL {whens} ELSE {ql(spec.else_value)} END"
        return _Value(sql, None, read.value_type, from_source=False)
    whens = " ".join(f"WHEN {ql(k)} THEN {ql(v)}" for k, v in spec.map)
    return _Value(f"CASE ({base})::text {whens} ELSE ({base})::text END", None, read.value_type, read.from_source)


def _in_time_zone(value: _Value, conversion: str, zone: str) -> _Value:
    """A timestamp made a timestamptz in ``zone`` (``to_tz``), or a timestamptz made a timestamp (``from_tz``)."""
    if conversion == "to_tz":
        sql, converted = f"(CAST({value.sql} AS timestamp) AT TIME ZONE {ql(zone)})", "timestamp with time zone"
    else:
        sql, converted = f"(({value.sql}) AT TIME ZONE {ql(zone)})", "timestamp without time zone"
    return _Value(sql, converted, converted, value.from_source)


def _casts(spec: ColumnSpec, tcol: Column, value: _Value) -> list[Step]:
    """The casts from the value to the target column, checked where they could cut or round a value of the source."""
    cast_type = spec.cast or tcol.type
    vtype = value.value_type if value.from_source else None
    steps: list[Step] = []
    if spec.cast or value.sql_type != tcol.type:
        kind = change_kind(vtype, cast_type) if value.from_source else None
        steps.append(Step(cast_type, kind, _allowed(spec, kind)))
        if spec.cast and cast_type != tcol.type:
            kind2 = change_kind(cast_type, tcol.type)
            if kind2 is not None:
                steps.append(Step(tcol.type, kind2, _allowed(spec, kind2)))
    if tcol.base_type and steps and steps[-1].type == tcol.type:
        # a domain: what can cut or round is the cast to its base type; then the domain's CHECKs, which refuse
        before = vtype if len(steps) == 1 else steps[-2].type
        kind = change_kind(before, tcol.base_type) if value.from_source else None
        steps[-1:] = [Step(tcol.base_type, kind, _allowed(spec, kind)), Step(tcol.type)]
    return steps


def _check_constants(spec: ColumnSpec, steps: list[Step], where: str) -> None:
    """Refuse a constant of the mapping that a cast would cut or round: checked here, once, not row by row."""
    for what, constant in constants(spec):
        for step in steps:
            if not literal_fits(constant, step.type) and not (spec.truncate or spec.round):
                raise PreflightError(
                    f"{where}: columns.{spec.target}: {what} {text_form(constant)!r} does not fit {step.type}",
                    detail="it would be cut or rounded in every row that gets it",
                    hint="change the constant, widen the column, or give the column `truncate: true` / `round: true`",
                )


# -- the keys ------------------------------------------------------------------------------------------------


def _key(mapping: TableMapping, target: Table, written: set[str], where: str) -> tuple[str, ...]:
    """The target key a re-run recognises copied rows by: ``key:``, else the target's primary key; every column of
    it written by the mapping."""
    key = mapping.key or target.primary_key
    if mapping.by_blocks and not mapping.key and not (key and all(k in written for k in key)):
        return ()  # each block range is copied once, with its checkpoint: no key is needed to recognise a copied row
    if not key:
        raise PreflightError(f"{where}: {target.name} has no primary key; give `key:` (columns of a unique constraint)")
    for k in key:
        if k not in written:
            raise PreflightError(
                f"{where}: key column {target.name}.{k} gets no value from the mapping",
                detail="without it a re-run cannot recognise rows it already copied",
                hint=f"map {k} from the source, or name another unique key with `key:`",
            )
    return tuple(key)


def _batch_by(mapping: TableMapping, source: Table, key: tuple[str, ...], where: str) -> tuple[str, ...]:
    """The source columns the copy pages on: ``batch_by:``, else (a partitioned source) a key of every partition,
    else the source's primary key, else the source columns the target key copies; ``ctid`` by blocks."""
    feeders = [mapping.column(k) for k in key]
    plain_feeders = all(f is not None and f.kind == "column" and f.column for f in feeders)
    feeding_columns = tuple(f.column for f in feeders if f is not None and f.column) if plain_feeders else ()
    if mapping.by_blocks:
        if source.partitioned:
            raise PreflightError(
                f"{where}: batch_by: ctid cannot page the partitioned table {source.name}",
                detail="a ctid is a place in one partition; the partitions are copied one by one on their own keys",
                hint="leave `batch_by:` out, or give each partition a primary key",
            )
        return ("ctid",)
    if mapping.batch_by:
        return tuple(mapping.batch_by)
    if source.partitioned:
        return tuple(partitions.batch_key(source, feeders=feeding_columns))
    if source.primary_key:
        return tuple(source.primary_key)
    if not feeding_columns:
        raise PreflightError(
            f"{where}: {source.name} has no primary key, and the target's key is not a copy of source columns: "
            "nothing tells its rows apart to page on",
            hint=KEYLESS_HINT.format(table=source.name),
        )
    return feeding_columns


def _batch_types(mapping: TableMapping, source: Table, batch_by: tuple[str, ...], where: str) -> tuple[str, ...]:
    """The types of the ``batch_by`` columns (the batch bounds are cast to them)."""
    batch_types = []
    for b in batch_by:
        scol = source.column(b)
        if b == "ctid" and mapping.by_blocks:
            batch_types.append("tid")
            continue
        if scol is None:
            raise PreflightError(f"{where}: batch_by column {source.name}.{b} does not exist")
        batch_types.append(scol.key_type)
    return tuple(batch_types)


def _key_injective(source: Table, columns: list[CompiledColumn], key: tuple[str, ...]) -> bool:
    """True when no two source rows can produce the same target key: the key is a plain copy of unique source
    columns.  Only when it is not does the copier look for such duplicates (see duplicates.py)."""
    if not key:
        return True
    key_specs = [next(c for c in columns if c.target == k) for k in key]
    feeding = tuple(c.spec.column or "" for c in key_specs)
    unique_feeding = source.is_unique(feeding) or (
        source.partitioned
        and all(leaf.is_key(feeding) for leaf in source.leaves)
        and partitions.unique_across(source, feeding)
    )
    plain = all(
        c.spec.kind == "column" and not (c.spec.map or c.spec.has_default or c.spec.cast) and not c.steps
        for c in key_specs
    )
    return plain and unique_feeding


def _parenthesized(expression: str) -> str:
    return expression if expression.startswith("(") and expression.endswith(")") else f"({expression})"


def _allowed(spec: ColumnSpec, kind: str | None) -> bool:
    return (kind == "cut" and spec.truncate) or (kind == "round" and spec.round)


def constants(spec: ColumnSpec) -> list[tuple[str, object]]:
    """The mapping's own constants that can reach the column: ``value``, the map's values, ``else``, ``default``."""
    out: list[tuple[str, object]] = []
    if spec.kind == "value":
        out.append(("value", spec.value))
    out += [(f"map value for {k!r}", v) for k, v in spec.map]
    if spec.has_else:
        out.append(("else", spec.else_value))
    if spec.has_default:
        out.append(("default", spec.default))
    return [(w, v) for w, v in out if v is not None]
