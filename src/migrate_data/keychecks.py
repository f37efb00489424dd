"""What the pre-flight says about a table's keys, from the catalogs alone: the key the copy conflicts on in the target,
and the key that pages the source (its columns, or ranges of blocks)."""

from __future__ import annotations

from . import partitions
from .catalog import Table
from .compile import KEYLESS_HINT, CompiledTable
from .findings import Finding


def key_findings(ct: CompiledTable, src: Table, tgt: Table) -> list[Finding]:
    """What the pre-flight says about the conflict key on the target and the key that pages the source."""
    out = _conflict_key(ct, tgt)
    if ct.by_blocks:
        out.append(_by_blocks(ct, src, tgt))
    elif src.partitioned:
        out += _partitioned_batch_key(ct, src)
    else:
        out += _batch_key(ct, src)
    return out


def _conflict_key(ct: CompiledTable, tgt: Table) -> list[Finding]:
    """The key is a unique constraint of the target (ON CONFLICT needs one), and not nullable."""
    name = str(ct.mapping.target)
    out: list[Finding] = []
    if ct.key and not tgt.has_exact_unique(ct.key):
        missing = [c for c in tgt.partition_columns if c not in ct.key]
        if tgt.partitioned and missing:
            out.append(
                Finding(
                    "error",
                    name,
                    f"key ({', '.join(ct.key)}) is not a unique constraint of {tgt.name}, and cannot be one: "
                    f"{tgt.name} is partitioned ({tgt.partition_key}), and a unique key of a partitioned table must "
                    f"include its partition key columns ({', '.join(missing)} missing), so ON CONFLICT has nothing "
                    "to match; give `key:` with the partition key columns too (e.g. "
                    f"[{', '.join((*ct.key, *missing))}]) and that unique constraint on {tgt.name}",
                )
            )
        else:
            out.append(
                Finding(
                    "error",
                    name,
                    f"key ({', '.join(ct.key)}) is not a primary key or unique constraint of {tgt.name}; "
                    "ON CONFLICT needs one (give `key:` or add the constraint in the phase's revision)",
                )
            )
    nullable = [k for k in ct.key if (col := tgt.column(k)) is not None and not col.not_null]
    if nullable:
        out.append(
            Finding(
                "warning",
                name,
                f"key column{'s' if len(nullable) > 1 else ''} {', '.join(nullable)} of {tgt.name} "
                f"{'are' if len(nullable) > 1 else 'is'} nullable: a row with a NULL key conflicts with nothing, "
                "so every re-run copies it again, and validation cannot match it",
            )
        )
    return out


def _by_blocks(ct: CompiledTable, src: Table, tgt: Table) -> Finding:
    """``batch_by: ctid``: what it costs."""
    return Finding(
        "warning",
        str(ct.mapping.target),
        f"{src.name} is copied by ranges of physical blocks (batch_by: ctid): it must not be written until the "
        "copy is validated (an UPDATE moves a row to another block: it could be copied twice, or not at "
        "all); it cannot be synced; validation compares counts and a hash of the whole multiset of rows"
        + ("" if ct.key else f"; {tgt.name} gets no key from the mapping, so --recheck is refused"),
    )


def _partitioned_batch_key(ct: CompiledTable, src: Table) -> list[Finding]:
    """A partitioned source: its leaves are paged one by one, on a key each of them has."""
    name = str(ct.mapping.target)
    problems = partitions.key_problems(src, ct.batch_by)
    out = [
        Finding(
            "error",
            name,
            f"{problem}: its rows cannot be paged (give it that key, or name other "
            "`batch_by:` columns unique and NOT NULL in every partition)",
        )
        for problem in problems
    ]
    if not src.leaves:
        out.append(Finding("warning", name, f"{src.name} is partitioned and has no partition: nothing to copy"))
    elif not problems:
        leaves = ", ".join(f"{leaf.name} ({leaf.bound})" for leaf in src.leaves)
        out.append(
            Finding(
                "info",
                name,
                f"{src.name} is partitioned ({src.partition_key}): {len(src.leaves)} leaf partitions copied one "
                f"by one on ({', '.join(ct.batch_by)}), up to --jobs at a time: {leaves}",
            )
        )
        if not partitions.unique_across(src, ct.batch_by):
            out.append(
                Finding(
                    "info",
                    name,
                    f"batch_by ({', '.join(ct.batch_by)}) is unique in each partition of {src.name}, but no "
                    "constraint makes it unique across partitions; a value found in two partitions would be "
                    "one source key for the rejects and --deep (validation counts would show it)",
                )
            )
    return out


def _batch_key(ct: CompiledTable, src: Table) -> list[Finding]:
    """The keyset batches see every row once: ``batch_by`` is unique and NOT NULL in the source."""
    name = str(ct.mapping.target)
    out: list[Finding] = []
    if not src.is_unique(ct.batch_by):
        out.append(
            Finding(
                "error",
                name,
                f"batch_by ({', '.join(ct.batch_by)}) is not unique in {src.name}; keyset batches would skip rows. "
                + KEYLESS_HINT.format(table=src.name),
            )
        )
    for b in ct.batch_by:
        col = src.column(b)
        if col is not None and not col.not_null:
            out.append(
                Finding("error", name, f"batch_by column {src.name}.{b} is nullable; rows with NULL would be skipped")
            )
    return out
