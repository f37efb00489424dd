"""Mapping + catalog -> the SQL a table's copy, validation and rollback run.  Pure: no I/O.

Every statement a phase runs is rendered here, from quoted identifiers (``sql.qi``) and escaped
literals (``sql.ql``); values that change per batch are bind parameters.  ``where:`` and ``sql:``
are the DBA's own SQL and are pasted as written, in parentheses.
"""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import ForeignKey, Table
from .errors import PreflightError
from .mapping import ColumnSpec, Lookup, QualifiedName, TableMapping
from .sql import qcols, qi, ql, qname

LEDGER_SCHEMA = "migrate_data"  # the copier's rejects live in this schema of the target (see ledger.py)


@dataclass(frozen=True)
class CompiledColumn:
    target: str
    target_type: str
    expr: str  # the final expression, cast to the target type where needed
    pre_cast: str  # the expression before the final cast (cross-database: shipped as text)
    cast_type: str  # what the text form is cast to on the target (cross-database)
    base: str  # the value before map/default (coverage checks)
    before_default: str  # the value before `default` replaces NULL (coverage checks)
    spec: ColumnSpec


@dataclass(frozen=True)
class CompiledTable:
    """Everything needed to copy, check and undo one table mapping, as SQL text."""

    mapping: TableMapping
    source: QualifiedName  # resolved (schema-qualified)
    target: QualifiedName
    alias: str
    columns: tuple[CompiledColumn, ...]
    joins: tuple[str, ...]
    batch_by: tuple[str, ...]
    batch_types: tuple[str, ...]
    key: tuple[str, ...]
    key_types: tuple[str, ...]
    overriding: bool
    lookups: tuple[tuple[str, Lookup], ...]  # (alias, lookup)
    hash_rows_by: str = "record"  # how --deep hashes rows: "record" (per column) or "text"

    # -- pieces --------------------------------------------------------------------------------
    @property
    def src(self) -> str:
        return f"{qname(self.source)} AS {qi(self.alias)}"

    @property
    def from_(self) -> str:
        return " ".join((self.src, *self.joins))

    @property
    def tgt(self) -> str:
        return qname(self.target)

    def _batch_tuple(self, prefix: str | None = None) -> str:
        cols = qcols(self.batch_by, prefix if prefix is not None else self.alias)
        return f"({cols})" if len(self.batch_by) > 1 else cols

    def _params(self, first: int) -> str:
        ps = [f"CAST(${first + i}::text AS {t})" for i, t in enumerate(self.batch_types)]
        return f"({', '.join(ps)})" if len(ps) > 1 else ps[0]

    def _conditions(self, *, lower: bool, upper: bool, first: int = 1) -> tuple[list[str], int]:
        conds = [f"({self.mapping.where})"] if self.mapping.where else []
        n = first
        if lower:
            conds.append(f"{self._batch_tuple()} > {self._params(n)}")
            n += len(self.batch_by)
        if upper:
            conds.append(f"{self._batch_tuple()} <= {self._params(n)}")
            n += len(self.batch_by)
        return conds, n

    @staticmethod
    def _where(conds: list[str]) -> str:
        return " WHERE " + " AND ".join(conds) if conds else ""

    @property
    def _order(self) -> str:
        return qcols(self.batch_by, self.alias)

    def _key_text_array(self, prefix: str) -> str:
        return "ARRAY[" + ", ".join(f"{qi(prefix)}.{qi(k)}::text" for k in self.batch_by) + "]"

    @property
    def _conflict(self) -> str:
        rest = [c.target for c in self.columns if c.target not in self.key]
        if self.mapping.on_conflict == "update" and rest:
            sets = ", ".join(f"{qi(c)} = EXCLUDED.{qi(c)}" for c in rest)
            return f" ON CONFLICT ({qcols(self.key)}) DO UPDATE SET {sets}"
        return f" ON CONFLICT ({qcols(self.key)}) DO NOTHING"

    @property
    def _insert_head(self) -> str:
        over = " OVERRIDING SYSTEM VALUE" if self.overriding else ""
        return f"INSERT INTO {self.tgt} ({qcols([c.target for c in self.columns])}){over}"

    # -- copy ----------------------------------------------------------------------------------
    def bound_sql(self, *, lower: bool, upper: bool = False) -> str:
        """Count the next batch and return its last key: params = [lower key...], [upper key...], limit."""
        conds, n = self._conditions(lower=lower, upper=upper)
        inner = (
            f"SELECT {qcols(self.batch_by, self.alias)} FROM {self.src}{self._where(conds)} "
            f"ORDER BY {self._order} LIMIT ${n}"
        )
        desc = ", ".join(f"b.{qi(k)} DESC" for k in self.batch_by)
        return (
            f"WITH b AS ({inner}) SELECT count(*) AS n, "
            f"(SELECT {self._key_text_array('b')} FROM b ORDER BY {desc} LIMIT 1) AS last FROM b"
        )

    def insert_sql(self, *, lower: bool, upper: bool) -> str:
        """INSERT … SELECT … ON CONFLICT for the source rows with lower < key <= upper."""
        conds, _ = self._conditions(lower=lower, upper=upper)
        exprs = ", ".join(c.expr for c in self.columns)
        return f"{self._insert_head} SELECT {exprs} FROM {self.from_}{self._where(conds)}{self._conflict}"

    def keys_sql(self, *, lower: bool, upper: bool) -> str:
        """The batch keys (as text arrays, in order) of the source rows in a range."""
        conds, _ = self._conditions(lower=lower, upper=upper)
        return (
            f"SELECT {self._key_text_array(self.alias)} AS k FROM {self.src}{self._where(conds)} ORDER BY {self._order}"
        )

    def source_row_sql(self) -> str:
        """The whole source row, as jsonb, of one batch key."""
        return f"SELECT to_jsonb({qi(self.alias)}) FROM {self.src} WHERE {self._batch_tuple()} = {self._params(1)}"

    def split_sql(self) -> str:
        """``$1 - 1`` batch keys cutting the source into about equal parts (copied concurrently), from a ``$2`` %
        block sample: approximate boundaries are enough, and a sample costs no full scan."""
        where = f" WHERE ({self.mapping.where})" if self.mapping.where else ""
        sampled = f"{qname(self.source)} AS {qi(self.alias)} TABLESAMPLE SYSTEM ($2){where}"
        return _sample_split_sql(sampled, self.alias, self.batch_by)

    # cross-database: the source ships text (binary COPY), the target casts it from a staging table
    def source_text_sql(self, *, lower: bool, upper: bool) -> str:
        """The rows of a range as the staging table's columns: ordinal, batch key, each value as text."""
        conds, _ = self._conditions(lower=lower, upper=upper)
        cols = ", ".join(f"({c.pre_cast})::text AS {qi(c.target)}" for c in self.columns)
        # No ORDER BY: a batch is a key range, the order of its rows does not matter (and sorting wide rows
        # spills to disk); __n only has to number them for the bisection.
        return (
            f"SELECT (row_number() OVER ())::integer AS __n, "
            f"{self._key_text_array(self.alias)} AS __key, {cols} FROM {self.from_}{self._where(conds)}"
        )

    def source_values_sql(self, *, lower: bool, upper: bool) -> str:
        """The rows of a range as the target's own columns, for a COPY straight into the target."""
        conds, _ = self._conditions(lower=lower, upper=upper)
        cols = ", ".join(f"({c.pre_cast})::text AS {qi(c.target)}" for c in self.columns)
        return f"SELECT {cols} FROM {self.from_}{self._where(conds)}"

    @property
    def direct_copy_ok(self) -> bool:
        """True when COPY's text input gives what the mapping's casts give: every value goes to its column's
        own type (no ``cast:`` to another type) and no identity column needs OVERRIDING SYSTEM VALUE."""
        return not self.overriding and all(c.cast_type == c.target_type for c in self.columns)

    def stage_table_sql(self, stage: str) -> str:
        cols = ", ".join(f"{qi(c.target)} text" for c in self.columns)
        return f"CREATE TEMP TABLE {qi(stage)} (__n integer, __key text[], {cols}) ON COMMIT DROP"

    def stage_columns(self) -> list[str]:
        return ["__n", "__key", *(c.target for c in self.columns)]

    def stage_insert_sql(self, stage: str, *, sub: bool) -> str:
        exprs = ", ".join(f"CAST(s.{qi(c.target)} AS {c.cast_type})" for c in self.columns)
        where = " WHERE s.__n > $1 AND s.__n <= $2" if sub else ""
        return f"{self._insert_head} SELECT {exprs} FROM {qi(stage)} AS s{where}{self._conflict}"

    # -- validation -----------------------------------------------------------------------------
    def count_sql(self) -> str:
        return (
            f"SELECT count(*) FROM {self.src}{self._where([f'({self.mapping.where})'] if self.mapping.where else [])}"
        )

    def count_joined_sql(self) -> str:
        return (
            f"SELECT count(*) FROM {self.from_}{self._where([f'({self.mapping.where})'] if self.mapping.where else [])}"
        )

    def target_count_sql(self) -> str:
        return f"SELECT count(*) FROM {self.tgt}"

    @property
    def key_columns(self) -> tuple[CompiledColumn, ...]:
        return tuple(next(c for c in self.columns if c.target == k) for k in self.key)

    def _key_range(self, prefix: str | None, first: int, *, lower: bool, upper: bool) -> list[str]:
        """Conditions ``key > $first`` / ``key <= $next`` on the target key (expected side: its expressions)."""
        if prefix is None:
            keys = ", ".join(c.expr for c in self.key_columns)
        else:
            keys = qcols(self.key, prefix)
        keys = f"({keys})" if len(self.key) > 1 else keys
        out, n = [], first
        for op, on in ((">", lower), ("<=", upper)):
            if on:
                out.append(f"{keys} {op} {self._key_params(n)}")
                n += len(self.key)
        return out

    def expected_sql(
        self,
        *,
        with_hash: bool = True,
        skip_rejected: bool = False,
        rejected_param: int | None = None,
        key_range: tuple[int, bool, bool] | None = None,
    ) -> str:
        """Per source row: the expected target key and (``with_hash``) a hash of the expected target values.

        ``skip_rejected`` leaves out the source rows the copier quarantined, read from the ledger (``$2`` = phase,
        ``$3`` = target); ``rejected_param`` names a parameter carrying their keys as a jsonb list instead (for a
        source in another database).  Their values do not convert, which is why they were rejected.
        """
        keys = ", ".join(f"{c.expr} AS {qi('k_' + c.target)}" for c in self.key_columns)
        row = self._row_hash(", ".join(c.expr for c in self.columns))
        conds = [f"({self.mapping.where})"] if self.mapping.where else []
        rejected = None
        if skip_rejected:
            rejected = f"SELECT r.source_key FROM {qi(LEDGER_SCHEMA)}.rejects AS r WHERE r.phase = $2 AND r.target = $3"
        elif rejected_param is not None:
            rejected = (
                f"SELECT ARRAY(SELECT jsonb_array_elements_text(r)) "
                f"FROM jsonb_array_elements(${rejected_param}::jsonb) AS r"
            )
        if rejected is not None:
            # A hashed NOT IN, and the row built only inside CASE: PostgreSQL may evaluate the select list
            # before a join filter, and a rejected row's values are exactly those that fail to convert.
            ok = f"{self._key_text_array(self.alias)} NOT IN ({rejected})"
            conds.append(ok)
            row = f"CASE WHEN {ok} THEN {row} END"
        if key_range is not None:
            conds += self._key_range(None, key_range[0], lower=key_range[1], upper=key_range[2])
        hashed = f", {row} AS h" if with_hash else ""
        return f"SELECT {keys}{hashed} FROM {self.from_}{self._where(conds)}"

    def _row_hash(self, values: str) -> str:
        """A 64-bit hash of a row: per column with the types' own hash functions (no text conversion, PostgreSQL
        14+), or of the row's text when some column type has no hash function (``hash_rows_by="text"``)."""
        if self.hash_rows_by == "record":
            return f"hash_record_extended(ROW({values}), 0)"
        return f"hashtextextended(ROW({values})::text, 0)"

    def actual_sql(self, *, key_range: tuple[int, bool, bool] | None = None) -> str:
        keys = ", ".join(f"t.{qi(k)} AS {qi('k_' + k)}" for k in self.key)
        row = ", ".join(f"t.{qi(c.target)}" for c in self.columns)
        conds = self._key_range("t", key_range[0], lower=key_range[1], upper=key_range[2]) if key_range else []
        return f"SELECT {keys}, {self._row_hash(row)} AS h FROM {self.tgt} AS t{self._where(conds)}"

    def diff_sql(self, *, skip_rejected: bool = False, lower: bool = False, upper: bool = False) -> str:
        """Missing, extra and differing target keys: kind, key (text[]), total of that kind.

        Parameters: ``$1`` = first N; with ``skip_rejected`` ``$2``, ``$3`` = phase, target; then the lower and
        upper target keys of the range (text), when ``lower`` / ``upper``.
        """
        rng = (4 if skip_rejected else 2, lower, upper) if (lower or upper) else None
        on = " AND ".join(f"e.{qi('k_' + k)} = a.{qi('k_' + k)}" for k in self.key)
        first = qi("k_" + self.key[0])
        key = "ARRAY[" + ", ".join(f"COALESCE(e.{qi('k_' + k)}, a.{qi('k_' + k)})::text" for k in self.key) + "]"
        return (
            f"WITH e AS ({self.expected_sql(skip_rejected=skip_rejected, key_range=rng)}), "
            f"a AS ({self.actual_sql(key_range=rng)}), "
            f"d AS (SELECT CASE WHEN a.{first} IS NULL THEN 'missing' WHEN e.{first} IS NULL THEN 'extra' "
            f"ELSE 'differs' END AS kind, {key} AS key FROM e FULL JOIN a ON {on} WHERE e.h IS DISTINCT FROM a.h) "
            f"SELECT kind, key, total FROM (SELECT kind, key, count(*) OVER (PARTITION BY kind) AS total, "
            f"row_number() OVER (PARTITION BY kind ORDER BY key) AS rn FROM d) x WHERE rn <= $1 ORDER BY kind, key"
        )

    # Two databases: each side summarised per key range, compared, and the ranges that differ bisected.
    def _side(self, side: str, lower: bool, upper: bool) -> tuple[str, int]:
        """The expected (source: ``$1`` = rejected keys as jsonb) or actual (target) rows of a key range,
        and the number of the next free parameter."""
        if side == "expected":
            n = 2
            sql = self.expected_sql(rejected_param=1, key_range=(2, lower, upper) if (lower or upper) else None)
        else:
            n = 1
            sql = self.actual_sql(key_range=(1, lower, upper) if (lower or upper) else None)
        return sql, n + len(self.key) * (int(lower) + int(upper))

    def range_summary_sql(self, side: str, *, lower: bool, upper: bool) -> str:
        """Rows and the sum of their hashes in a key range, on one side."""
        sql, _ = self._side(side, lower, upper)
        return f"SELECT count(*) AS n, COALESCE(sum(h::numeric), 0) AS s FROM ({sql}) x"

    def range_rows_sql(self, side: str, *, lower: bool, upper: bool) -> str:
        """Every (key as text[], hash) of a key range, on one side."""
        sql, _ = self._side(side, lower, upper)
        key = "ARRAY[" + ", ".join(f"x.{qi('k_' + k)}::text" for k in self.key) + "]"
        return f"SELECT {key} AS key, x.h FROM ({sql}) x"

    def range_median_sql(self, side: str, *, lower: bool, upper: bool) -> str:
        """The key (text[]) at position ``$n`` of a key range on one side, ``$n`` being the next parameter."""
        sql, n = self._side(side, lower, upper)
        key = "ARRAY[" + ", ".join(f"x.{qi('k_' + k)}::text" for k in self.key) + "]"
        order = ", ".join(f"x.{qi('k_' + k)}" for k in self.key)
        return f"SELECT {key} FROM ({sql}) x ORDER BY {order} OFFSET ${n} LIMIT 1"

    def _key_params(self, first: int = 1) -> str:
        ps = [f"CAST(${first + i}::text AS {c.target_type})" for i, c in enumerate(self.key_columns)]
        return f"({', '.join(ps)})" if len(ps) > 1 else ps[0]

    def expected_row_sql(self) -> str:
        """Expected target values (text) of one target key."""
        vals = "ARRAY[" + ", ".join(f"({c.expr})::text" for c in self.columns) + "]"
        keys = ", ".join(c.expr for c in self.key_columns)
        keys = f"({keys})" if len(self.key) > 1 else keys
        conds = [f"({self.mapping.where})"] if self.mapping.where else []
        conds.append(f"{keys} = {self._key_params()}")
        return f"SELECT {vals} FROM {self.from_}{self._where(conds)}"

    def actual_row_sql(self) -> str:
        vals = "ARRAY[" + ", ".join(f"t.{qi(c.target)}::text" for c in self.columns) + "]"
        keys = qcols(self.key, "t")
        keys = f"({keys})" if len(self.key) > 1 else keys
        return f"SELECT {vals} FROM {self.tgt} AS t WHERE {keys} = {self._key_params()}"

    def extra_keys_sql(self) -> str:
        """Keys (text[]) of the target rows no source row produces: rows someone else wrote (one database)."""
        on = " AND ".join(f"e.{qi('k_' + k)} = t.{qi(k)}" for k in self.key)
        arr = "ARRAY[" + ", ".join(f"t.{qi(k)}::text" for k in self.key) + "]"
        return (
            f"SELECT {arr} AS key FROM {self.tgt} AS t WHERE NOT EXISTS "
            f"(SELECT 1 FROM ({self.expected_sql(with_hash=False)}) e WHERE {on})"
        )

    def key_split_sql(self) -> str:
        """Like ``split_sql``, on the target's key: ranges ``--deep`` compares concurrently."""
        return _sample_split_sql(f"{self.tgt} AS t TABLESAMPLE SYSTEM ($2)", "t", self.key)

    # -- rollback ------------------------------------------------------------------------------
    def expected_keys_sql(self, *, lower: bool) -> str:
        """A page of source rows: the batch key and the target key each produces (text arrays)."""
        conds, n = self._conditions(lower=lower, upper=False)
        tk = "ARRAY[" + ", ".join(f"({c.expr})::text" for c in self.key_columns) + "]"
        return (
            f"SELECT {self._key_text_array(self.alias)} AS bk, {tk} AS tk FROM {self.from_}"
            f"{self._where(conds)} ORDER BY {self._order} LIMIT ${n}"
        )

    def _unnest_keys(self) -> tuple[str, str]:
        """``unnest($1::text[], …) AS u(k0, …)`` and the join condition of the target's key on it."""
        cols = ", ".join(f"${i + 1}::text[]" for i in range(len(self.key)))
        names = ", ".join(qi(f"k{i}") for i in range(len(self.key)))
        on = " AND ".join(
            f"t.{qi(k)} = CAST(u.{qi(f'k{i}')} AS {c.target_type})"
            for i, (k, c) in enumerate(zip(self.key, self.key_columns, strict=True))
        )
        return f"unnest({cols}) AS u({names})", on

    def delete_keys_sql(self) -> str:
        """Delete the target rows whose keys are given: one text[] parameter per key column."""
        keys, on = self._unnest_keys()
        return f"DELETE FROM {self.tgt} AS t USING {keys} WHERE {on}"

    def rows_by_keys_sql(self) -> str:
        """The target rows (jsonb) whose keys are given: one text[] parameter per key column."""
        keys, on = self._unnest_keys()
        return f"SELECT to_jsonb(t) AS row FROM {self.tgt} AS t JOIN {keys} ON {on}"


def _sample_split_sql(sampled_from: str, alias: str, keys: tuple[str, ...]) -> str:
    """The last key (text[]) of each of ``$1`` ntiles of a sample, but the last: range boundaries in key order."""
    arr = "ARRAY[" + ", ".join(f"{qi(alias)}.{qi(k)}::text" for k in keys) + "]"
    cols = ", ".join(f"{qi(alias)}.{qi(k)} AS {qi('o_' + k)}" for k in keys)
    order = ", ".join(f"{qi('o_' + k)} DESC" for k in keys)
    return (
        f"SELECT DISTINCT ON (part) k FROM (SELECT {arr} AS k, {cols}, ntile($1::integer) OVER "
        f"(ORDER BY {qcols(keys, alias)}) AS part FROM {sampled_from}) s WHERE part < $1::integer "
        f"ORDER BY part, {order}"
    )


def compile_table(
    mapping: TableMapping,
    source: Table,
    target: Table,
    lookup_tables: dict[QualifiedName, Table] | None = None,
) -> CompiledTable:
    """Compile one table mapping against the source and target catalogs.

    Raises PreflightError for what makes SQL impossible to build (a column that does not exist,
    no key to conflict on); everything else is the pre-flight's job.
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
            raise PreflightError(f"{where}: {target.name}.{spec.target} is a generated column and cannot be written")
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
        elif spec.kind == "value":
            base, base_type = ql(spec.value), None
        elif spec.kind == "sql":
            base, base_type = f"({spec.sql})", None
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
                joins.append(f"LEFT JOIN {qname(lk.table)} AS {qi(la)} ON {cond}")
                lookups.append((la, lk))
            base, base_type = f"{qi(la)}.{qi(lk.column)}", None
        expr = base
        if spec.map:
            if spec.has_else:
                whens = " ".join(f"WHEN ({base})::text = {ql(k)} THEN {ql(v)}" for k, v in spec.map)
                expr = f"CASE WHEN ({base}) IS NULL THEN NULL {whens} ELSE {ql(spec.else_value)} END"
            else:
                whens = " ".join(f"WHEN {ql(k)} THEN {ql(v)}" for k, v in spec.map)
                expr = f"CASE ({base})::text {whens} ELSE ({base})::text END"
            base_type = None
        before_default = expr
        if spec.has_default:
            expr = f"COALESCE({expr}, {ql(spec.default)})"
        cast_type = spec.cast or tcol.type
        pre_cast = expr
        if spec.cast or base_type != tcol.type:
            expr = f"CAST({expr} AS {cast_type})"
        columns.append(CompiledColumn(spec.target, tcol.type, expr, pre_cast, cast_type, base, before_default, spec))

    key = mapping.key or target.primary_key
    if not key:
        raise PreflightError(f"{where}: {target.name} has no primary key; give `key:` (columns of a unique constraint)")
    written = {c.target for c in columns}
    for k in key:
        if k not in written:
            raise PreflightError(
                f"{where}: key column {target.name}.{k} gets no value from the mapping",
                detail="without it a re-run cannot recognise rows it already copied",
                hint=f"map {k} from the source, or name another unique key with `key:`",
            )
    if mapping.batch_by:
        batch_by = mapping.batch_by
    elif source.primary_key:
        batch_by = source.primary_key
    else:
        feeders = [mapping.column(k) for k in key]
        if not all(f is not None and f.kind == "column" and f.column for f in feeders):
            raise PreflightError(f"{where}: {source.name} has no primary key; give `batch_by:` (unique source columns)")
        batch_by = tuple(f.column for f in feeders if f is not None and f.column)
    batch_types = []
    for b in batch_by:
        scol = source.column(b)
        if scol is None:
            raise PreflightError(f"{where}: batch_by column {source.name}.{b} does not exist")
        batch_types.append(scol.type)
    overriding = any(target.column(c.target).identity == "a" for c in columns)  # type: ignore[union-attr]
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
    )


def coverage_sql(ct: CompiledTable) -> tuple[str, list[str]] | None:
    """One scan counting, per column, rows where a default applies and rows whose lookup finds nothing."""
    items: list[tuple[str, str]] = []
    for c in ct.columns:
        spec = c.spec
        if spec.has_default:
            items.append((f"default:{c.target}", f"({c.before_default}) IS NULL"))
    for la, lk in ct.lookups:
        ons = " AND ".join(f"{qi(ct.alias)}.{qi(o)} IS NOT NULL" for o in lk.on)
        items.append((f"lookup:{lk.table}", f"{ons} AND {qi(la)}.{qi(lk.key[0])} IS NULL"))
    if not items:
        return None
    sel = ", ".join(f"count(*) FILTER (WHERE {cond})" for _, cond in items)
    where = f" WHERE ({ct.mapping.where})" if ct.mapping.where else ""
    return f"SELECT {sel} FROM {ct.from_}{where}", [label for label, _ in items]


def unmapped_values_sql(ct: CompiledTable, column: CompiledColumn) -> str:
    """Distinct non-NULL values of a ``map`` column that the map does not cover, with their counts."""
    keys = ", ".join(ql(k) for k, _ in column.spec.map)
    conds = [f"({ct.mapping.where})"] if ct.mapping.where else []
    conds += [f"({column.base}) IS NOT NULL", f"({column.base})::text NOT IN ({keys})"]
    return (
        f"SELECT ({column.base})::text AS value, count(*) AS n FROM {ct.from_} WHERE {' AND '.join(conds)} "
        f"GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20"
    )


def preview_sql(ct: CompiledTable, limit: int = 5) -> str:
    cols = ", ".join(f"{c.expr} AS {qi(c.target)}" for c in ct.columns)
    where = f" WHERE ({ct.mapping.where})" if ct.mapping.where else ""
    return f"SELECT {cols} FROM {ct.from_}{where} ORDER BY {qcols(ct.batch_by, ct.alias)} LIMIT {int(limit)}"


def orphans_sql(table: QualifiedName, fk: ForeignKey) -> str:
    """Count rows of ``table`` whose foreign key ``fk`` points at no parent row."""
    notnull = " AND ".join(f"c.{qi(col)} IS NOT NULL" for col in fk.columns)
    match = " AND ".join(f"p.{qi(r)} = c.{qi(col)}" for col, r in zip(fk.columns, fk.ref_columns, strict=True))
    return (
        f"SELECT count(*) FROM {qname(table)} AS c WHERE {notnull} "
        f"AND NOT EXISTS (SELECT 1 FROM {qname(fk.ref_table)} AS p WHERE {match})"
    )
