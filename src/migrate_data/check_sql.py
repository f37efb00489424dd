"""The SQL the pre-flight counts with (rows the target will refuse, values a map lacks, values a cast would change, a
preview), and what validation reads besides the rows (orphans of a foreign key, the rejects by cause)."""

from __future__ import annotations

from .catalog import ForeignKey
from .compile import CompiledTable
from .mapping import QualifiedName
from .model import CompiledColumn
from .sql import LEDGER_SCHEMA, qcols, qi, ql, qname


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
