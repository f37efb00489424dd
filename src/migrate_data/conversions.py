"""What a conversion to a target column's type can silently change, and the checked casts that refuse it.

A value that a cast would cut (varchar, char) or round (numeric, integers, timestamp precision, floats) becomes a
data error through ``refuse`` (SQLSTATE 22001 / 22003), which the copier quarantines, unless the mapping allows it
(``truncate:`` / ``round:``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from .mapping import text_form
from .sql import LEDGER_SCHEMA, qi, ql

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
