"""The compiled model of a table mapping: its columns (each with the casts to its target type) and the table's
pieces that every SQL builder shares (FROM, batch ranges, keys).  The builders by concern are ``copy_sql``
(what the copier runs) and ``verify_sql`` (what validation runs); ``compile.CompiledTable`` is both."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

from .catalog import ForeignKey
from .conversions import Step, TypeName
from .mapping import ColumnSpec, Lookup, QualifiedName, TableMapping
from .sql import key_text_array, qcols, qi, qname

TARGET_ALIAS = "__target"  # the target table in INSERT … ON CONFLICT
T = TypeVar("T", bound="TableModel")


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

    def hashed(self, v: str) -> str:
        """``v`` as validation hashes it: text in the "C" collation, bytewise, so that a nondeterministic collation
        (whose equality and hash ignore case or accents) neither makes equal texts differ nor different ones equal."""
        t = (self.compare_as or self.target_type).lower()
        return f'({v}) COLLATE "C"' if t == "text" or t.startswith(("character", "varchar")) else v

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
class TableModel:
    """One table mapping compiled against the live catalogs: what the copy and verify builders render from."""

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

    @property
    def src(self) -> str:
        return f"{qname(self.leaf or self.source)} AS {qi(self.alias)}"

    @property
    def by_blocks(self) -> bool:
        """``batch_by: ctid``: batches are ranges of physical blocks, ``ctid > '(b,0)' AND ctid <= '(b2,0)'``
        (no row has offset 0, so that is exactly the blocks b … b2-1), read with a TID range scan."""
        return self.batch_by == ("ctid",)

    def portable(self: T) -> T:
        """This table's validation across two databases: each column of a type of the target's own compared as a
        built-in type (see CompiledColumn.portable)."""
        return replace(self, columns=tuple(c.portable() for c in self.columns))

    def for_leaf(self: T, leaf: QualifiedName) -> T:
        """This table's copy reading one leaf partition (same key, same SQL, another relation in FROM)."""
        return replace(self, leaf=leaf)

    @property
    def whole(self: T) -> T:
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
        return key_text_array([f"{qi(prefix)}.{qi(k)}" for k in self.batch_by], self.batch_types)

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

    def _key_params(self, first: int = 1) -> str:
        ps = [f"CAST(${first + i}::text AS {c.target_type})" for i, c in enumerate(self.key_columns)]
        return f"({', '.join(ps)})" if len(ps) > 1 else ps[0]


def sample_split_sql(sampled_from: str, alias: str, keys: tuple[str, ...]) -> str:
    """The last key (text[]) of each of ``$1`` ntiles of a sample, but the last: range boundaries in key order."""
    arr = "ARRAY[" + ", ".join(f"{qi(alias)}.{qi(k)}::text" for k in keys) + "]"
    cols = ", ".join(f"{qi(alias)}.{qi(k)} AS {qi('o_' + k)}" for k in keys)
    order = ", ".join(f"{qi('o_' + k)} DESC" for k in keys)
    return (
        f"SELECT DISTINCT ON (part) k FROM (SELECT {arr} AS k, {cols}, ntile($1::integer) OVER "
        f"(ORDER BY {qcols(keys, alias)}) AS part FROM {sampled_from}) s WHERE part < $1::integer "
        f"ORDER BY part, {order}"
    )
