"""Mapping + catalog -> a CompiledTable: the SQL a table's copy, validation and rollback run.  Pure: no I/O.

Every statement a phase runs is rendered from quoted identifiers (``sql.qi``) and escaped literals (``sql.ql``);
values that change per batch are bind parameters.  ``where:`` and ``sql:`` are the DBA's own SQL and are pasted as
written, in parentheses.  The builders are by concern: ``copy_sql`` (the copier), ``verify_sql`` (validation),
``check_sql`` (the pre-flight's counts), ``undo`` (rollback), over the model in ``model.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import partitions
from .catalog import Table
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
    alias = mapping.source.name
    lookup_aliases: dict[tuple[QualifiedName, tuple[str, ...], tuple[str, ...]], str] = {}
    joins: list[str] = []
    lookups: list[tuple[str, Lookup]] = []
    columns: list[CompiledColumn] = []
    for spec in mapping.columns:
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
        value_type: str | None = None  # the type of the base's values, when known
        if spec.kind == "column":
            assert spec.column is not None
            scol = source.column(spec.column)
            if scol is None:
                raise PreflightError(
                    f"{where}: columns.{spec.target}: source column {source.name}.{spec.column} does not exist",
                    hint=f"columns of {source.name}: {', '.join(c.name for c in source.columns)}",
                )
            base = f"{qi(alias)}.{qi(spec.column)}"
            base_type: str | None = scol.type
            value_type = scol.type
            if scol.labels and scol.type != tcol.type:  # no cast joins two enums: through the labels' text
                text = "text[]" if scol.is_array else "text"
                base, base_type = f"CAST({base} AS {text})", text
        elif spec.kind == "value":
            base, base_type = ql(spec.value), None
        elif spec.kind == "sql":
            base, base_type = f"({spec.sql})", None
            value_type = (value_types or {}).get(spec.target)
        else:
            lk = spec.lookup
            assert lk is not None
            for on in lk.on:
                if source.column(on) is None:
                    raise PreflightError(
                        f"{where}: columns.{spec.target}: lookup.on column {source.name}.{on} does not exist"
                    )
            sig = (lk.table, lk.on, lk.key)
            la = lookup_aliases.get(sig)
            if la is None:
                la = lookup_aliases[sig] = f"lookup{len(lookup_aliases) + 1}"
                cond = " AND ".join(
                    f"{qi(la)}.{qi(k)} = {qi(alias)}.{qi(o)}" for o, k in zip(lk.on, lk.key, strict=True)
                )
                resolved = (lookup_tables or {}).get(lk.table)  # schema-qualified, whatever the search_path
                joins.append(f"LEFT JOIN {qname(resolved.qualified if resolved else lk.table)} AS {qi(la)} ON {cond}")
                lookups.append((la, lk))
            base, base_type = f"{qi(la)}.{qi(lk.column)}", None
            lcol = (lookup_tables or {}).get(lk.table)
            value_type = lcol.column(lk.column).type if lcol and lcol.column(lk.column) else None  # type: ignore[union-attr]
        expr = base
        passes_through = spec.kind != "value"  # a value of the source (not only constants) reaches the cast
        if spec.map:
            if spec.has_else:
                whens = " ".join(f"WHEN ({base})::text = {ql(k)} THEN {ql(v)}" for k, v in spec.map)
                expr = f"CASE WHEN ({base}) IS NULL THEN NULL {whens} ELSE {ql(spec.else_value)} END"
                passes_through = False
            else:
                whens = " ".join(f"WHEN {ql(k)} THEN {ql(v)}" for k, v in spec.map)
                expr = f"CASE ({base})::text {whens} ELSE ({base})::text END"
            base_type = None
        before_default = expr
        if spec.has_default:
            expr = f"COALESCE({expr}, {ql(spec.default)})"
        cast_type = spec.cast or tcol.type
        # A timestamp becomes a timestamptz (or back) only in a time zone the mapping names: the server session's
        # TimeZone would otherwise decide, silently.  Converted here, on the source, so that the text shipped to
        # another database carries its offset.
        zone = spec.timezone or mapping.timezone
        zconv = None if spec.map else zone_conversion(value_type, cast_type)
        source_type = value_type if not spec.map else "text"
        if zconv is not None and zone is not None:
            if zconv == "to_tz":
                expr = f"(CAST({expr} AS timestamp) AT TIME ZONE {ql(zone)})"
                value_type = base_type = "timestamp with time zone"
            else:
                expr = f"(({expr}) AT TIME ZONE {ql(zone)})"
                value_type = base_type = "timestamp without time zone"
        pre_cast = expr
        # The casts, checked where they could cut or round a value of the source; the mapping's own constants
        # are checked here, once.
        steps: list[Step] = []
        vtype = value_type if passes_through else None
        if spec.cast or base_type != tcol.type:
            kind = change_kind(vtype, cast_type) if passes_through else None
            steps.append(Step(cast_type, kind, _allowed(spec, kind)))
            if spec.cast and cast_type != tcol.type:
                kind2 = change_kind(cast_type, tcol.type)
                if kind2 is not None:
                    steps.append(Step(tcol.type, kind2, _allowed(spec, kind2)))
        if tcol.base_type and steps and steps[-1].type == tcol.type:
            # a domain: what can cut or round is the cast to its base type; then the domain's CHECKs, which refuse
            kind = change_kind(vtype if len(steps) == 1 else steps[-2].type, tcol.base_type) if passes_through else None
            steps[-1:] = [Step(tcol.base_type, kind, _allowed(spec, kind)), Step(tcol.type)]
        for what, constant in constants(spec):
            for step in steps or [Step(tcol.type)]:
                if not literal_fits(constant, step.type) and not (spec.truncate or spec.round):
                    raise PreflightError(
                        f"{where}: columns.{spec.target}: {what} {text_form(constant)!r} does not fit {step.type}",
                        detail="it would be cut or rounded in every row that gets it",
                        hint="change the constant, widen the column, or give the column `truncate: true` / "
                        "`round: true`",
                    )
        column = CompiledColumn(
            spec.target,
            tcol.type,
            expr,
            pre_cast,
            cast_type,
            base,
            before_default,
            spec,
            steps=tuple(steps),
            value_type=source_type,
            zone=zone if zconv else None,
            zone_conversion=zconv,
            portable_type=tcol.portable or None,
        )
        columns.append(replace(column, expr=column.convert(pre_cast)))

    key = mapping.key or target.primary_key
    written = {c.target for c in columns}
    if mapping.by_blocks and not mapping.key and not (key and all(k in written for k in key)):
        key = ()  # each block range is copied once, with its checkpoint: no key is needed to recognise a copied row
    elif not key:
        raise PreflightError(f"{where}: {target.name} has no primary key; give `key:` (columns of a unique constraint)")
    for k in key:
        if k not in written:
            raise PreflightError(
                f"{where}: key column {target.name}.{k} gets no value from the mapping",
                detail="without it a re-run cannot recognise rows it already copied",
                hint=f"map {k} from the source, or name another unique key with `key:`",
            )
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
        batch_by: tuple[str, ...] = ("ctid",)
    elif mapping.batch_by:
        batch_by = mapping.batch_by
    elif source.partitioned:
        batch_by = partitions.batch_key(source, feeders=feeding_columns)
    elif source.primary_key:
        batch_by = source.primary_key
    else:
        if not feeding_columns:
            raise PreflightError(
                f"{where}: {source.name} has no primary key, and the target's key is not a copy of source columns: "
                "nothing tells its rows apart to page on",
                hint=KEYLESS_HINT.format(table=source.name),
            )
        batch_by = feeding_columns
    batch_types = []
    for b in batch_by:
        scol = source.column(b)
        if b == "ctid" and mapping.by_blocks:
            batch_types.append("tid")
            continue
        if scol is None:
            raise PreflightError(f"{where}: batch_by column {source.name}.{b} does not exist")
        batch_types.append(scol.type)
    overriding = any(target.column(c.target).identity == "a" for c in columns)  # type: ignore[union-attr]
    # Two source rows can produce the same target key only when the key is not a plain copy of unique source
    # columns; only then does the copier look for such duplicates (see duplicates.py).
    key_specs = [next(c for c in columns if c.target == k) for k in key]
    feeding = tuple(c.spec.column or "" for c in key_specs)
    unique_feeding = source.is_unique(feeding) or (
        source.partitioned
        and all(leaf.is_key(feeding) for leaf in source.leaves)
        and partitions.unique_across(source, feeding)
    )
    key_injective = not key or (
        all(
            c.spec.kind == "column" and not (c.spec.map or c.spec.has_default or c.spec.cast) and not c.steps
            for c in key_specs
        )
        and unique_feeding
    )
    replica = (mapping.target_triggers or DEFAULT_TARGET_TRIGGERS) == "skip"
    return CompiledTable(
        mapping=mapping,
        source=source.qualified,
        target=target.qualified,
        alias=alias,
        columns=tuple(columns),
        joins=tuple(joins),
        batch_by=tuple(batch_by),
        batch_types=tuple(batch_types),
        key=tuple(key),
        key_types=tuple(target.column(k).type for k in key),  # type: ignore[union-attr]
        overriding=overriding,
        lookups=tuple(lookups),
        key_injective=key_injective,
        leaves=tuple(leaf.name for leaf in source.leaves),
        replica=replica,
        fk_checks=target.foreign_keys if replica else (),  # replica mode silences them: the insert checks them
    )


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
