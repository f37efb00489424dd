"""The SQL the copier runs for one table: the batch's INSERT … SELECT … ON CONFLICT, its bounds and keys, the text a
cross-database copy ships and the staging table it lands in, and the duplicates of a batch."""

from __future__ import annotations

from .conversions import REFUSE
from .mapping import QualifiedName
from .model import TARGET_ALIAS, TableModel, sample_split_sql
from .sql import qcols, qi, ql, qname
from .undo import written_by


class CopySQL(TableModel):
    """The copy's statements (parameters as ``$n``: the batch's bounds)."""

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
        return sample_split_sql(sampled, self.alias, self.batch_by)

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


def setval_sql(target: QualifiedName, column: str) -> str:
    """Move the sequence ``$1`` of ``column`` past the highest value in ``target`` (never back)."""
    return (
        f"SELECT setval($1::regclass, m) FROM (SELECT max({qi(column)}) AS m FROM {qname(target)}) x "
        f"WHERE m > COALESCE(pg_sequence_last_value($1::regclass), 0)"
    )


def analyze_sql(ct: CopySQL) -> str:
    return f"ANALYZE {qname(ct.target)}"


def statements(ct: CopySQL, serial_columns: list[str], *, same_db: bool) -> list[str]:
    """The statements the copy of one table runs that write the target (parameters as ``$n``), for ``plan``: the
    first batch's and every later batch's, the sequences moved past the copied values, ANALYZE.  Across two
    databases the batches read the source with the text query and COPY it into the target (a staging table and
    ON CONFLICT when a batch conflicts or holds a bad row)."""
    out: list[str] = []
    for c in [ct.for_leaf(leaf) for leaf in ct.leaves] or [ct]:
        if same_db:
            out += [c.insert_sql(lower=False, upper=True), c.insert_sql(lower=True, upper=True)]
        else:
            out += [c.source_text_sql(lower=False, upper=True), c.source_text_sql(lower=True, upper=True)]
    if not same_db:
        out += [f"COPY {qname(ct.target)} FROM STDIN", ct.stage_insert_sql("<stage>", sub=False)]
    return list(dict.fromkeys([*out, *(setval_sql(ct.target, col) for col in serial_columns), analyze_sql(ct)]))
