"""The SQL validation runs for one table: counts, the expected and actual rows and their hashes, the differences,
and the per-range summaries a comparison across two databases bisects."""

from __future__ import annotations

from .model import TableModel, sample_split_sql
from .sql import LEDGER_SCHEMA, qcols, qi, ql


class VerifySQL(TableModel):
    """The validation's statements."""

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
        row = self._row_hash(", ".join([c.hashed(c.expected) for c in self.columns] + self._fits_flag(expected=True)))
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
        row = ", ".join([c.hashed(c.actual("t")) for c in self.columns] + self._fits_flag(expected=False))
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
        return sample_split_sql(f"{self.tgt} AS t TABLESAMPLE SYSTEM ($2)", "t", self.key)

    def _unnest_keys(self) -> tuple[str, str]:
        """``unnest($1::text[], …) AS u(k0, …)`` and the join condition of the target's key on it."""
        cols = ", ".join(f"${i + 1}::text[]" for i in range(len(self.key)))
        names = ", ".join(qi(f"k{i}") for i in range(len(self.key)))
        on = " AND ".join(
            f"t.{qi(k)} = CAST(u.{qi(f'k{i}')} AS {c.target_type})"
            for i, (k, c) in enumerate(zip(self.key, self.key_columns, strict=True))
        )
        return f"unnest({cols}) AS u({names})", on
