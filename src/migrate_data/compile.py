"""Mapping + catalog -> the SQL a table's copy, validation and rollback run.  Pure: no I/O.

Every statement a phase runs is rendered here, from quoted identifiers (``sql.qi``) and escaped
literals (``sql.ql``); values that change per batch are bind parameters.  ``where:`` and ``sql:``
are the DBA's own SQL and are pasted as written, in parentheses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation

from . import partitions
from .catalog import ForeignKey, Table
from .errors import PreflightError
from .mapping import ColumnSpec, Lookup, QualifiedName, TableMapping, text_form
from .sql import qcols, qi, ql, qname
from .undo import written_by

TARGET_ALIAS = "__target"  # the target table in INSERT … ON CONFLICT
LEDGER_SCHEMA = "migrate_data"  # the copier's rejects live in this schema of the target (see ledger.py)

# Whether the target's user triggers fire on the copied rows when the mapping does not say (docs/mapping.md): they
# fire, as they would for any INSERT; `skip` needs a privilege most roles lack and silences the foreign keys too.
DEFAULT_TARGET_TRIGGERS = "fire"

KEYLESS_HINT = (
    "give {table} a key to page on: a primary key, or a unique index on NOT NULL columns (then name them in "
    "`batch_by:` if they are not the primary key); or copy it by physical blocks with `batch_by: ctid` "
    "(PostgreSQL 14+): {table} must then not be written during the copy, it cannot be kept in sync afterwards, and "
    "validation compares row counts and a hash of the whole multiset of rows (docs/mapping.md, Tables without a key)"
)

# The one server-side helper a copy may need: raise an error with a given SQLSTATE from inside an expression (a
# value that would be cut or rounded becomes a data error, which the copier quarantines).  VOLATILE, so the planner
# never folds a call with constant arguments at PREPARE time.  Created in the target by the pre-flight, in the
# transaction of the phase's schema step (rolled back by `plan`), only for a phase that needs it.
REFUSE = f"{qi(LEDGER_SCHEMA)}.refuse"
HELPERS_SQL = f"""CREATE SCHEMA IF NOT EXISTS {qi(LEDGER_SCHEMA)};
CREATE OR REPLACE FUNCTION {REFUSE}(sqlstate text, message text, detail text, hint text, typed anyelement)
RETURNS anyelement LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = sqlstate, MESSAGE = message, DETAIL = COALESCE(detail, ''), HINT = hint;
END $$"""
HELPERS_EXIST_SQL = f"SELECT to_regprocedure('{LEDGER_SCHEMA}.refuse(text, text, text, text, anyelement)') IS NOT NULL"

# -- types: what a conversion can silently change ------------------------------------------------------------
_ALIASES = {
    "varchar": "varchar",
    "character varying": "varchar",
    "char": "char",
    "character": "char",
    "bpchar": "char",
    "int": "int4",
    "integer": "int4",
    "int4": "int4",
    "smallint": "int2",
    "int2": "int2",
    "bigint": "int8",
    "int8": "int8",
    "decimal": "numeric",
    "numeric": "numeric",
    "real": "float4",
    "float4": "float4",
    "double precision": "float8",
    "float8": "float8",
    "bool": "bool",
    "boolean": "bool",
    "text": "text",
    "uuid": "uuid",
    "date": "date",
    "timestamptz": "timestamptz",
    "timetz": "timetz",
}
_TYPE = re.compile(r"^(?P<base>[a-z][a-z0-9_ ]*?)\s*(?:\((?P<mods>[0-9 ,]+)\))?\s*(?P<tz>with(?:out)? time zone)?$")
_INTEGERS = ("int2", "int4", "int8")
_FLOATS = ("float4", "float8")
_WIDER_THAN = {"float4": ("float8", "numeric", "int4", "int8"), "float8": ("numeric", "int8")}
_DATETIMES = ("timestamp", "timestamptz", "time", "timetz")
_TEXT_WIDTH = {"bool": 5, "uuid": 36, "int2": 6, "int4": 11, "int8": 20}  # longest text form


@dataclass(frozen=True)
class TypeName:
    """A type as far as conversions care: a family (``varchar``, ``numeric``, ``timestamptz`` …) and its modifiers."""

    family: str
    mods: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> TypeName | None:
        """``character varying(20)``, ``varchar(20)``, ``timestamp(0) without time zone``, ``timestamptz`` …;
        None for None.  A type it does not know keeps its text as its family."""
        if text is None:
            return None
        t = text.strip().lower()
        m = _TYPE.match(t)
        if m is None:
            return cls(t)
        base, tz = m["base"].strip(), m["tz"]
        mods = tuple(int(x) for x in m["mods"].split(",")) if m["mods"] else ()
        if base in ("timestamp", "time"):
            return cls(base + ("tz" if tz == "with time zone" else ""), mods)
        return cls(_ALIASES.get(base, base), mods)

    @property
    def base_sql(self) -> str:
        """The type without its modifiers, as SQL (for the date/time families)."""
        return {"timestamp": "timestamp", "timestamptz": "timestamptz", "time": "time", "timetz": "timetz"}.get(
            self.family, self.family
        )


def change_kind(value_type: str | None, target: str) -> str | None:
    """How converting a value of ``value_type`` (None: not known) to ``target`` can change it without an error:
    ``"cut"`` (text longer than a varchar/char), ``"round"`` (a number's scale, a fraction into an integer, a
    time's precision), or None (it cannot: the value converts exactly, or the conversion fails loudly)."""
    t, v = TypeName.parse(target), TypeName.parse(value_type)
    assert t is not None
    if t.family in ("varchar", "char") and t.mods:
        n = t.mods[0]
        if v is not None and v.family in ("varchar", "char") and v.mods and v.mods[0] <= n:
            return None
        if v is not None and _TEXT_WIDTH.get(v.family, n + 1) <= n:
            return None
        return "cut"
    if t.family == "numeric" and t.mods:
        scale = t.mods[1] if len(t.mods) > 1 else 0
        if v is not None and v.family in _INTEGERS:
            return None
        if v is not None and v.family == "numeric" and v.mods and (v.mods[1] if len(v.mods) > 1 else 0) <= scale:
            return None
        return "round"
    if t.family in _INTEGERS:
        return "round" if v is None or v.family in ("numeric", "float4", "float8") else None
    if v is not None and v.family in ("timestamp", "timestamptz") and t.family in ("date", "time"):
        return "round"  # the time of day (to a date), or the date (to a time), is dropped
    if v is not None and v.family in _WIDER_THAN.get(t.family, ()):
        return "round"  # digits a float of this size does not keep
    if t.family in _DATETIMES and t.mods:
        if v is not None and v.family == "date":
            return None
        if v is not None and v.family in _DATETIMES and v.mods and v.mods[0] <= t.mods[0]:
            return None
        return "round"
    return None


def zone_conversion(value_type: str | None, target: str) -> str | None:
    """``"to_tz"`` when a value without a time zone becomes a ``timestamptz`` (``timestamp``/``date`` ->
    ``timestamptz``), ``"from_tz"`` for the reverse (``timestamptz`` -> ``timestamp``/``date``/``time``): both mean
    something only in a time zone.  None otherwise."""
    t, v = TypeName.parse(target), TypeName.parse(value_type)
    if v is None or t is None:
        return None
    if v.family in ("timestamp", "date") and t.family == "timestamptz":
        return "to_tz"
    if v.family == "timestamptz" and t.family in ("timestamp", "date", "time"):
        return "from_tz"
    return None


def literal_fits(value: object, target: str) -> bool:
    """Whether a constant of the mapping (``value``, ``default``, ``map``, ``else``) converts to ``target`` unchanged
    (True when that cannot be told here: the database decides, loudly)."""
    text = text_form(value)
    t = TypeName.parse(target)
    if text is None or t is None:
        return True
    if t.family in ("varchar", "char") and t.mods:
        return len(text.rstrip(" ") if t.family == "char" else text) <= t.mods[0]
    try:
        d = Decimal(text.strip())
        if t.family == "numeric" and t.mods:
            return d.is_nan() or d == d.quantize(Decimal(1).scaleb(-(t.mods[1] if len(t.mods) > 1 else 0)))
        if t.family in _INTEGERS:
            return d == d.to_integral_value()
    except (InvalidOperation, ValueError):
        return True
    return True


@dataclass(frozen=True)
class Step:
    """One conversion of a column's value: a cast to ``type``, checked when it could change the value (``check``
    is ``"cut"`` or ``"round"``) unless the mapping allows that (``allowed``)."""

    type: str
    check: str | None = None
    allowed: bool = False

    @property
    def checked(self) -> bool:
        return self.check is not None and not self.allowed

    def cast(self, v: str) -> str:
        """The plain cast (which would cut or round)."""
        if self.check == "round" and TypeName.parse(self.type).family in _INTEGERS:  # type: ignore[union-attr]
            v = f"CAST({v} AS numeric)"  # '1.0' (the text form of a numeric) converts to an integer only so
        return f"CAST({v} AS {self.type})"

    def fits(self, v: str) -> str:
        """True when the cast keeps the value as it is (NULL included); never raises for a cut or a rounding."""
        t = TypeName.parse(self.type)
        assert t is not None
        if self.check == "cut":
            text = f"CAST({v} AS text)"
            cond = f"char_length({'rtrim(' + text + ')' if t.family == 'char' else text}) <= {t.mods[0]}"
        elif t.family == "numeric":
            scale = t.mods[1] if len(t.mods) > 1 else 0
            cond = f"CAST({v} AS numeric) = round(CAST({v} AS numeric), {scale})"
        elif t.family in _INTEGERS:
            cond = f"CAST({v} AS numeric) = trunc(CAST({v} AS numeric))"
        elif t.family in _FLOATS:
            cond = f"CAST(CAST({v} AS {t.family}) AS numeric) = CAST({v} AS numeric)"
        elif t.family == "date":
            cond = f"CAST({v} AS timestamp) = CAST(CAST({v} AS date) AS timestamp)"
        elif t.family == "time":
            cond = "false"  # a date is always dropped: only `round: true` allows it
        else:
            cond = f"CAST({v} AS {t.base_sql}) = {self.cast(v)}"
        return f"(({v}) IS NULL OR {cond})"

    def render(self, v: str, column: str) -> str:
        """The cast; checked: the cast when the value fits, else an error (22001 cut, 22003 rounded)."""
        if not self.checked:
            return self.cast(v)
        if self.check == "cut":
            state, what, opt = "22001", "too long for", "truncate: true"
        else:
            state, what, opt = "22003", "would be rounded to", "round: true"
        detail = (
            f"format('%s would be stored as %s', quote_nullable(left(CAST({v} AS text), 200)), "
            f"quote_nullable(left(CAST({self.cast(v)} AS text), 200)))"
        )
        refuse = (
            f"{REFUSE}({ql(state)}, {ql(f'value of column {column} {what} {self.type}')}, {detail}, "
            f"{ql(f'widen the column, or give it `{opt}` in the mapping to accept the change')}, "
            f"CAST(NULL AS {self.type}))"
        )
        return f"CASE WHEN {self.fits(v)} THEN {self.cast(v)} ELSE {refuse} END"

    def expected(self, v: str) -> str:
        """What the target should hold: the cast when the value fits, else NULL (and the row's flag is false)."""
        if not self.checked:
            return self.cast(v)
        return f"CASE WHEN {self.fits(v)} THEN {self.cast(v)} END"


@dataclass(frozen=True)
class CompiledColumn:
    target: str
    target_type: str
    expr: str  # the final expression, cast to the target type where needed (the copy)
    pre_cast: str  # the expression before the final cast (cross-database: shipped as text)
    cast_type: str  # what the text form is cast to on the target (cross-database)
    base: str  # the value before map/default (coverage checks)
    before_default: str  # the value before `default` replaces NULL (coverage checks)
    spec: ColumnSpec
    steps: tuple[Step, ...] = ()  # the casts from pre_cast to the target column (none: it has the type already)
    value_type: str | None = None  # the type of the mapped values before any conversion, when known (a map: text)
    zone: str | None = None  # the time zone of a timestamp <-> timestamptz conversion applied in pre_cast
    zone_conversion: str | None = None  # "to_tz" | "from_tz" when the value needs a time zone to convert
    # The target's type is one of its database's own (an enum, a domain): across two databases the values are compared
    # as this built-in type (see ``portable``); ``compare_as`` is set once they are.
    portable_type: str | None = None
    compare_as: str | None = None

    def portable(self) -> CompiledColumn:
        """This column compared as a type both databases know: the casts to the target's own type left out, the
        value cast to ``portable_type`` on both sides (an enum's hash is its label's oid, which differs between
        databases, and the source database may not have the type at all)."""
        if self.portable_type is None:
            return self
        steps = tuple(s for s in self.steps if s.type != self.target_type) + (Step(self.portable_type),)
        return replace(self, steps=steps, compare_as=self.portable_type)

    def actual(self, alias: str) -> str:
        """The target's value as validation compares it."""
        v = f"{qi(alias)}.{qi(self.target)}"
        return f"CAST({v} AS {self.compare_as})" if self.compare_as else v

    def convert(self, v: str) -> str:
        """The copy's expression for a pre-cast value ``v`` (a column of the staging table, across databases)."""
        for step in self.steps:
            v = step.render(v, self.target)
        return v

    @property
    def checked(self) -> bool:
        """True when a value that would be cut or rounded is refused, row by row."""
        return any(s.checked for s in self.steps)

    @property
    def expected(self) -> str:
        """What the target should hold (validation): like ``expr``, but NULL for a value that does not fit,
        instead of an error; ``fits`` tells those rows apart.  Needs no helper in the database."""
        v = self.pre_cast
        for step in self.steps:
            v = step.expected(v)
        return v

    @property
    def fits(self) -> str | None:
        """A condition true when every checked cast keeps the value (None when nothing is checked)."""
        conds, v = [], self.pre_cast
        for step in self.steps:
            if step.checked:
                conds.append(step.fits(v))
            v = step.cast(v)
        return " AND ".join(conds) if conds else None

    @property
    def expected_text(self) -> str:
        """The expected value as text, the source's own value where it does not fit (differing-column samples)."""
        if self.fits is None:
            return f"({self.expected})::text"
        return f"CASE WHEN {self.fits} THEN ({self.expected})::text ELSE CAST({self.pre_cast} AS text) END"

    @property
    def direct_text(self) -> str:
        """The text a COPY straight into the target column gets: the value, or, when it would be cut or rounded, a
        text that column's input refuses (too long for a varchar, not a number or a time otherwise)."""
        if self.fits is None:
            return f"({self.pre_cast})::text"
        t = TypeName.parse(self.target_type)
        refused = f"repeat('x', {t.mods[0] + 1})" if t is not None and t.family in ("varchar", "char") else "'?'"
        return f"CASE WHEN {self.fits} THEN ({self.pre_cast})::text ELSE {refused} END"

    @property
    def changes(self) -> tuple[Step, ...]:
        """The casts that can cut or round a value (checked, or allowed by ``truncate``/``round``)."""
        return tuple(s for s in self.steps if s.check is not None)

    @property
    def unchanged(self) -> str | None:
        """A condition true when no cast cuts or rounds the value, allowed or not (None: none can)."""
        conds, v = [], self.pre_cast
        for step in self.steps:
            if step.check is not None:
                conds.append(step.fits(v))
            v = step.cast(v)
        return " AND ".join(conds) if conds else None


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
    key_injective: bool = True  # the key is a plain copy of unique source columns: no two rows share a target key
    hash_rows_by: str = "record"  # how --deep hashes rows: "record" (per column) or "text"
    phase: str = ""  # the phase that copies it: `on_conflict: update` only overwrites rows this phase wrote
    # The phase's start snapshot (ledger.phases.started_snapshot): validation leaves out the target rows that were
    # there before the phase, which the counts already subtract (None: every row is compared).
    before_snapshot: str | None = None
    # A partitioned source: its leaf partitions, copied one by one (``for_leaf``); ``leaf`` is the one this copy
    # of the table reads (None: the whole table, as validation and the pre-flight read it).
    leaves: tuple[QualifiedName, ...] = ()
    leaf: QualifiedName | None = None
    # ``target_triggers: skip``: each batch runs with session_replication_role = replica, which also silences the
    # target's foreign keys; ``fk_checks`` are the ones the insert then checks itself (see ``_checked``).
    replica: bool = False
    fk_checks: tuple[ForeignKey, ...] = ()

    # -- pieces --------------------------------------------------------------------------------
    @property
    def src(self) -> str:
        return f"{qname(self.leaf or self.source)} AS {qi(self.alias)}"

    @property
    def by_blocks(self) -> bool:
        """``batch_by: ctid``: batches are ranges of physical blocks, ``ctid > '(b,0)' AND ctid <= '(b2,0)'``
        (no row has offset 0, so that is exactly the blocks b … b2-1), read with a TID range scan."""
        return self.batch_by == ("ctid",)

    def portable(self) -> CompiledTable:
        """This table's validation across two databases: each column of a type of the target's own compared as a
        built-in type (see CompiledColumn.portable)."""
        return replace(self, columns=tuple(c.portable() for c in self.columns))

    def for_leaf(self, leaf: QualifiedName) -> CompiledTable:
        """This table's copy reading one leaf partition (same key, same SQL, another relation in FROM)."""
        return replace(self, leaf=leaf)

    @property
    def whole(self) -> CompiledTable:
        """This table reading its whole source (every partition)."""
        return replace(self, leaf=None) if self.leaf is not None else self

    @property
    def insert_counts(self) -> bool:
        """True when ``insert_sql``/``stage_insert_sql`` are a query returning the rows written (``fetchval``), not
        a plain INSERT (``execute``'s status tag): the insert checks the foreign keys itself (``replica``)."""
        return self.replica and bool(self.fk_checks)

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
        if not self.key:  # copied by blocks into a table without a key: each block range exactly once
            return ""
        rest = [c.target for c in self.columns if c.target not in self.key]
        if self.mapping.on_conflict == "update" and rest:
            # Only a row this phase wrote (see ledger.writes) is brought up to date: a row that was there before,
            # or that the application wrote, is left as it is (validation then shows it), never overwritten.
            sets = ", ".join(f"{qi(c)} = EXCLUDED.{qi(c)}" for c in rest)
            return f" ON CONFLICT ({qcols(self.key)}) DO UPDATE SET {sets} WHERE {self.written_by_phase(TARGET_ALIAS)}"
        return f" ON CONFLICT ({qcols(self.key)}) DO NOTHING"

    def written_by_phase(self, alias: str) -> str:
        """True for a target row (``alias``) this phase wrote and nobody changed since (see ledger.writes): the only
        rows a phase may update or delete."""
        return written_by(qi(alias), ql(str(self.target)), ql(self.phase) if self.phase else None)

    @property
    def _insert_head(self) -> str:
        over = " OVERRIDING SYSTEM VALUE" if self.overriding else ""
        return f"INSERT INTO {self.tgt} AS {qi(TARGET_ALIAS)} ({qcols([c.target for c in self.columns])}){over}"

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
        return self._checked(
            f"{self._insert_head} SELECT {exprs} FROM {self.from_}{self._where(conds)}{self._conflict}"
        )

    def _checked(self, insert: str) -> str:
        """With ``replica`` (the target's triggers, foreign keys included, do not fire): ``insert`` as a query that
        returns the rows it wrote and raises foreign_key_violation (23503), as the foreign key would, when one of
        them references no parent row, so the copier isolates and quarantines it as usual.  For a self-reference the
        parent may also be a row of the same insert (a statement does not see its own rows: ``ins`` has them)."""
        if not self.insert_counts:
            return insert
        returning, bad = [], []
        for i, fk in enumerate(self.fk_checks):
            cols = [qi(f"fk{i}_{j}") for j in range(len(fk.columns))]
            returning += [f"{qi(c)} AS {a}" for c, a in zip(fk.columns, cols, strict=True)]
            notnull = " AND ".join(f"i.{a} IS NOT NULL" for a in cols)
            match = " AND ".join(f"p.{qi(r)} = i.{a}" for r, a in zip(fk.ref_columns, cols, strict=True))
            if fk.ref_table == self.target:
                refs = [qi(f"fkref{i}_{j}") for j in range(len(fk.ref_columns))]
                returning += [f"{qi(c)} AS {a}" for c, a in zip(fk.ref_columns, refs, strict=True)]
                same = " AND ".join(f"j.{r} = i.{a}" for r, a in zip(refs, cols, strict=True))
                match += f") AND NOT EXISTS (SELECT 1 FROM ins AS j WHERE {same}"
            message = f'insert or update on table "{self.target.name}" violates foreign key constraint "{fk.name}"'
            values = ", ".join(f"i.{a}::text" for a in cols)
            detail = (
                f"format('Key ({', '.join(fk.columns)})=(%s) is not present in table \"{fk.ref_table.name}\".', "
                f"concat_ws(', ', {values}))"
            )
            bad.append(
                f"SELECT {ql(message)} AS m, {detail} AS d FROM ins AS i WHERE {notnull} "
                f"AND NOT EXISTS (SELECT 1 FROM {qname(fk.ref_table)} AS p WHERE {match})"
            )
        hint = "target_triggers: skip silences the foreign keys while copying; migrate-data checks them itself"
        refuse = f"{REFUSE}('23503', b.m, b.d, {ql(hint)}, NULL::integer)"
        return (
            f"WITH ins AS ({insert} RETURNING {', '.join(returning)}), "
            f"bad AS (SELECT * FROM ({' UNION ALL '.join(bad)}) AS x LIMIT 1) "
            f"SELECT count(*) + COALESCE((SELECT {refuse} FROM bad AS b), 0) AS written FROM ins"
        )

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
        sampled = f"{qname(self.leaf or self.source)} AS {qi(self.alias)} TABLESAMPLE SYSTEM ($2){where}"
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
        """The rows of a range as the target's own columns, for a COPY straight into the target.

        A value that its column would cut or round (a type's text input does so without an error) is sent as a
        text the column refuses: the COPY fails, and the batch takes the staged path, which quarantines the row."""
        conds, _ = self._conditions(lower=lower, upper=upper)
        cols = ", ".join(f"{c.direct_text} AS {qi(c.target)}" for c in self.columns)
        return f"SELECT {cols} FROM {self.from_}{self._where(conds)}"

    @property
    def direct_copy_ok(self) -> bool:
        """True when COPY's text input gives what the mapping's casts give: every value goes to its column's
        own type (no ``cast:`` to another type) and no identity column needs OVERRIDING SYSTEM VALUE.
        A value that a checked column would cut or round is sent so that COPY refuses it (``direct_text``)."""
        return (
            not self.overriding
            and not self.insert_counts  # a COPY cannot check the foreign keys that replica mode silences
            and all(c.cast_type == c.target_type and len(c.steps) <= 1 for c in self.columns)
        )

    def stage_table_sql(self, stage: str) -> str:
        cols = ", ".join(f"{qi(c.target)} text" for c in self.columns)
        return f"CREATE TEMP TABLE {qi(stage)} (__n integer, __key text[], {cols}) ON COMMIT DROP"

    def stage_columns(self) -> list[str]:
        return ["__n", "__key", *(c.target for c in self.columns)]

    def stage_insert_sql(self, stage: str, *, sub: bool) -> str:
        exprs = ", ".join(
            c.convert(f"s.{qi(c.target)}") if c.steps else f"CAST(s.{qi(c.target)} AS {c.cast_type})"
            for c in self.columns
        )
        where = " WHERE s.__n > $1 AND s.__n <= $2" if sub else ""
        return self._checked(f"{self._insert_head} SELECT {exprs} FROM {qi(stage)} AS s{where}{self._conflict}")

    # -- duplicates: two source rows, one target key ----------------------------------------------
    def range_count_sql(self, *, lower: bool) -> str:
        """The source rows of a batch (params: the lower key if ``lower``, the upper key)."""
        conds, _ = self._conditions(lower=lower, upper=True)
        return f"SELECT count(*) FROM {self.src}{self._where(conds)}"

    def duplicates_sql(self, *, lower: bool) -> str:
        """The source rows that share a target key with another source row, for the keys a batch produces:
        batch key (text[]), target key (text[]), whether the row is in the batch, and its rank among the rows of
        its key in batch-key order.  Params as ``insert_sql(lower=lower, upper=True)``.  Reads the whole source
        (the target key is an expression): run only when a batch wrote fewer rows than it read."""
        conds, _ = self._conditions(lower=lower, upper=True)
        rng = conds[1:] if self.mapping.where else conds
        ks = [qi(f"k_{i}") for i in range(len(self.key))]
        keys = ", ".join(f"{c.expected} AS {k}" for c, k in zip(self.key_columns, ks, strict=True))
        order = ", ".join(qi(f"o_{i}") for i in range(len(self.batch_by)))
        ordered = ", ".join(f"{qi(self.alias)}.{qi(b)} AS {qi(f'o_{i}')}" for i, b in enumerate(self.batch_by))
        tup = f"({', '.join(ks)})"
        where = f" WHERE ({self.mapping.where})" if self.mapping.where else ""
        if self.leaf is not None:  # every partition can produce the key; the batch is in this one
            rng.append(f"{qi(self.alias)}.tableoid = {ql(qname(self.leaf))}::regclass")
        return (
            f"WITH b AS (SELECT DISTINCT {keys} FROM {self.from_}{self._where(conds)}), "
            f"s AS (SELECT {self._key_text_array(self.alias)} AS bk, {ordered}, {keys}, "
            f"COALESCE({' AND '.join(rng)}, false) AS in_batch FROM {self.whole.from_}{where}) "
            f"SELECT bk, ARRAY[{', '.join(f'{k}::text' for k in ks)}] AS k, in_batch, r FROM "
            f"(SELECT s.*, count(*) OVER w AS n, row_number() OVER (w ORDER BY {order}) AS r FROM s "
            f"WHERE {tup} IN (SELECT * FROM b) WINDOW w AS (PARTITION BY {', '.join(ks)})) x WHERE n > 1"
        )

    def expected_row_by_batch_key_sql(self) -> str:
        """Expected target values (text) of the source row with one batch key."""
        vals = "ARRAY[" + ", ".join(c.expected_text for c in self.columns) + "]"
        return f"SELECT {vals} FROM {self.whole.from_} WHERE {self._batch_tuple()} = {self._params(1)}"

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
            keys = ", ".join(c.expected for c in self.key_columns)
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
        first: int = 2,
    ) -> str:
        """Per source row: the expected target key and (``with_hash``) a hash of the expected target values.

        ``skip_rejected`` leaves out the source rows the copier quarantined, read from the ledger (``$2`` = phase,
        ``$3`` = target); ``rejected_param`` names a parameter carrying their keys as a jsonb list instead (for a
        source in another database).  Their values do not convert, which is why they were rejected.
        """
        keys = ", ".join(f"{c.expected} AS {qi('k_' + c.target)}" for c in self.key_columns)
        row = self._row_hash(", ".join([c.expected for c in self.columns] + self._fits_flag(expected=True)))
        conds = [f"({self.mapping.where})"] if self.mapping.where else []
        rejected = None
        if skip_rejected:
            rejected = (
                f"SELECT r.source_key FROM {qi(LEDGER_SCHEMA)}.rejects AS r "
                f"WHERE r.phase = ${first} AND r.target = ${first + 1}"
            )
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
        items = ([keys] if keys else []) + ([f"{row} AS h"] if with_hash else [])
        return f"SELECT {', '.join(items) or '1'} FROM {self.from_}{self._where(conds)}"

    def _fits_flag(self, *, expected: bool) -> list[str]:
        """The last field of a hashed row when some value is checked: on the expected side, whether every value
        fits its column (a value that would have been cut or rounded then differs from any actual row), on the
        actual side ``true``."""
        conds = [c.fits for c in self.columns if c.fits is not None]
        if not conds:
            return []
        return [" AND ".join(f"COALESCE({c}, false)" for c in conds) if expected else "true"]

    def _row_hash(self, values: str) -> str:
        """A 64-bit hash of a row: per column with the types' own hash functions (no text conversion, PostgreSQL
        14+), or of the row's text when some column type has no hash function (``hash_rows_by="text"``)."""
        if self.hash_rows_by == "record":
            return f"hash_record_extended(ROW({values}), 0)"
        return f"hashtextextended(ROW({values})::text, 0)"

    def actual_sql(self, *, key_range: tuple[int, bool, bool] | None = None) -> str:
        keys = ", ".join(f"t.{qi(k)} AS {qi('k_' + k)}" for k in self.key)
        row = ", ".join([c.actual("t") for c in self.columns] + self._fits_flag(expected=False))
        conds = self._key_range("t", key_range[0], lower=key_range[1], upper=key_range[2]) if key_range else []
        if self.before_snapshot:
            conds.append(
                f"NOT COALESCE(pg_visible_in_snapshot({qi(LEDGER_SCHEMA)}.full_xid(t.xmin), "
                f"{ql(self.before_snapshot)}::pg_snapshot), false)"
            )
        items = ([keys] if keys else []) + [f"{self._row_hash(row)} AS h"]
        return f"SELECT {', '.join(items)} FROM {self.tgt} AS t{self._where(conds)}"

    def multiset_diff_sql(self, *, skip_rejected: bool = False) -> str:
        """For a table without a key (copied by blocks): the expected and actual rows compared as multisets of row
        hashes: how many expected rows the target lacks (missing) and how many it has beyond them (extra).  With
        ``skip_rejected``, ``$1``, ``$2`` = phase, target."""
        e = self.expected_sql(skip_rejected=skip_rejected, first=1)
        return (
            f"WITH e AS (SELECT h, count(*) AS n FROM ({e}) x GROUP BY h), "
            f"a AS (SELECT h, count(*) AS n FROM ({self.actual_sql()}) y GROUP BY h) "
            f"SELECT COALESCE(sum(GREATEST(COALESCE(e.n, 0) - COALESCE(a.n, 0), 0)), 0)::bigint AS missing, "
            f"COALESCE(sum(GREATEST(COALESCE(a.n, 0) - COALESCE(e.n, 0), 0)), 0)::bigint AS extra "
            f"FROM e FULL JOIN a ON e.h = a.h"
        )

    def diff_sql(self, *, skip_rejected: bool = False, lower: bool = False, upper: bool = False) -> str:
        """Missing, extra and differing target keys: kind, key (text[]), total of that kind.

        Parameters: ``$1`` = first N; with ``skip_rejected`` ``$2``, ``$3`` = phase, target; then the lower and
        upper target keys of the range (text), when ``lower`` / ``upper``.
        """
        rng = (4 if skip_rejected else 2, lower, upper) if (lower or upper) else None
        on = " AND ".join(f"e.{qi('k_' + k)} = a.{qi('k_' + k)}" for k in self.key)
        key = "ARRAY[" + ", ".join(f"COALESCE(e.{qi('k_' + k)}, a.{qi('k_' + k)})::text" for k in self.key) + "]"
        # ``here`` tells a side's row from the NULLs of the outer join: a key may itself be NULL (a nullable unique
        # key), and such a row matches nothing, on either side
        return (
            f"WITH e AS (SELECT x.*, true AS here FROM ({self.expected_sql(skip_rejected=skip_rejected, key_range=rng)}) x), "
            f"a AS (SELECT y.*, true AS here FROM ({self.actual_sql(key_range=rng)}) y), "
            f"d AS (SELECT CASE WHEN a.here IS NULL THEN 'missing' WHEN e.here IS NULL THEN 'extra' "
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
        vals = "ARRAY[" + ", ".join(c.expected_text for c in self.columns) + "]"
        keys = ", ".join(c.expected for c in self.key_columns)
        keys = f"({keys})" if len(self.key) > 1 else keys
        conds = [f"({self.mapping.where})"] if self.mapping.where else []
        conds.append(f"{keys} = {self._key_params()}")
        return f"SELECT {vals} FROM {self.from_}{self._where(conds)}"

    def actual_row_sql(self) -> str:
        vals = "ARRAY[" + ", ".join(f"t.{qi(c.target)}::text" for c in self.columns) + "]"
        keys = qcols(self.key, "t")
        keys = f"({keys})" if len(self.key) > 1 else keys
        return f"SELECT {vals} FROM {self.tgt} AS t WHERE {keys} = {self._key_params()}"

    def key_split_sql(self) -> str:
        """Like ``split_sql``, on the target's key: ranges ``--deep`` compares concurrently."""
        return _sample_split_sql(f"{self.tgt} AS t TABLESAMPLE SYSTEM ($2)", "t", self.key)

    # -- rollback ------------------------------------------------------------------------------
    def _unnest_keys(self) -> tuple[str, str]:
        """``unnest($1::text[], …) AS u(k0, …)`` and the join condition of the target's key on it."""
        cols = ", ".join(f"${i + 1}::text[]" for i in range(len(self.key)))
        names = ", ".join(qi(f"k{i}") for i in range(len(self.key)))
        on = " AND ".join(
            f"t.{qi(k)} = CAST(u.{qi(f'k{i}')} AS {c.target_type})"
            for i, (k, c) in enumerate(zip(self.key, self.key_columns, strict=True))
        )
        return f"unnest({cols}) AS u({names})", on


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
    cols = ", ".join(f"{c.expected} AS {qi(c.target)}" for c in ct.columns)  # no helper needed on the source
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


# -- what the pre-flight counts: rows the target will refuse, values that would change --------------------------
TARGET_CHECKS_SQL = """SELECT c.conname, pg_get_expr(c.conbin, c.conrelid) AS expr,
       array(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
             ORDER BY a.attnum) AS columns
FROM pg_constraint c WHERE c.conrelid = to_regclass($1) AND c.contype = 'c' ORDER BY c.conname"""

TARGET_DEFAULTS_SQL = """SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type,
       pg_get_expr(d.adbin, d.adrelid) AS dflt
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped"""


def check_violations_sql(
    ct: CompiledTable, expr: str, columns: list[str], defaults: dict[str, tuple[str, str | None]]
) -> str:
    """Count the source rows whose mapped values a target CHECK (``expr``, on ``columns``) refuses: it is FALSE
    (NULL passes, as in the table).  A column the mapping does not fill gets its DEFAULT (``defaults``: column ->
    (type, default expression)), or NULL when that calls a sequence, which a count must not advance."""
    by_target = {c.target: c for c in ct.columns}
    cols = []
    for name in columns:
        c = by_target.get(name)
        if c is not None:
            cols.append(f"{c.expected} AS {qi(name)}")
        else:
            typ, dflt = defaults.get(name, ("text", None))
            value = dflt if dflt is not None and "nextval(" not in dflt else "NULL"
            cols.append(f"CAST({value} AS {typ}) AS {qi(name)}")
    where = f" WHERE ({ct.mapping.where})" if ct.mapping.where else ""
    return f"SELECT count(*) FROM (SELECT {', '.join(cols) or '1'} FROM {ct.from_}{where}) AS t WHERE NOT ({expr})"


def null_counts_sql(ct: CompiledTable, columns: list[CompiledColumn]) -> str:
    """Per column, the source rows whose mapped value is NULL (for NOT NULL target columns)."""
    sel = ", ".join(f"count(*) FILTER (WHERE ({c.pre_cast}) IS NULL)" for c in columns)
    where = f" WHERE ({ct.mapping.where})" if ct.mapping.where else ""
    return f"SELECT {sel} FROM {ct.from_}{where}"


def change_count_sql(ct: CompiledTable, column: CompiledColumn) -> str:
    """The source rows whose value of ``column`` a cast would cut or round (refused, or changed where allowed)."""
    conds = [f"({ct.mapping.where})"] if ct.mapping.where else []
    conds.append(f"NOT ({column.unchanged})")
    return f"SELECT count(*) FROM {ct.from_} WHERE {' AND '.join(conds)}"


def reject_causes_sql() -> str:
    """The quarantined rows of a phase (``$1``) grouped by cause: table, SQLSTATE and the message's first line (the
    copier stores DETAIL after it) with the values of the source masked (``invalid input syntax for type integer: "…"``), with a count and the first example."""
    cause = (
        "regexp_replace(regexp_replace(split_part(r.message, E'\\n', 1), ': \".*\"$', ': \"…\"'), "
        "'value \".*\" is out of range', 'value \"…\" is out of range')"
    )
    return (
        f"SELECT target, sqlstate, cause, n, source_key AS example_key, message, detail FROM "
        f"(SELECT target, sqlstate, cause, source_key, message, detail, count(*) OVER w AS n, "
        f"row_number() OVER (w ORDER BY id) AS rn FROM "
        f"(SELECT r.*, {cause} AS cause FROM {qi(LEDGER_SCHEMA)}.rejects AS r WHERE r.phase = $1) AS r "
        f"WINDOW w AS (PARTITION BY target, sqlstate, cause)) AS x WHERE rn = 1 ORDER BY target, n DESC, sqlstate, cause"
    )
