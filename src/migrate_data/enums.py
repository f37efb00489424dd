"""Enum columns of the target: every value a mapping can put in one must be one of its labels.  Pure: no I/O.

A value that is not a label fails the cast in every row that has it (22P02, quarantined), so the pre-flight refuses
the phase instead, naming the mapping's line, the value and the enum.  The values checked are the mapping's own
constants (``map`` values, ``else``, ``default``, ``value``) and, for an enum source column, the source enum's
labels that reach the target unchanged (not in the ``map``, and no ``else``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import Table
from .compile import CompiledTable, constants
from .mapping import text_form


@dataclass(frozen=True)
class LabelProblem:
    """A value the mapping can write into an enum column that the enum does not have."""

    column: str  # the target column
    line: int  # its line in the phase file
    what: str  # "map value for 'verified'", "else", "default", "value", "label of status (not in the map)"
    value: str
    enum: str  # the target column's type (an enum, or a domain over one)
    labels: tuple[str, ...]

    def message(self) -> str:
        return (
            f"{self.what}: {self.value!r} is not a label of the enum {self.enum} "
            f"(its labels: {', '.join(self.labels)}): every row that gets it would be refused (22P02)"
        )


def label_problems(ct: CompiledTable, source: Table, target: Table) -> list[LabelProblem]:
    """The values ``ct`` can write into the target's enum columns that are not labels of their enum."""
    out: list[LabelProblem] = []
    for c in ct.columns:
        tcol = target.column(c.target)
        if tcol is None or not tcol.labels:
            continue
        spec = c.spec
        # an array's constants are whole arrays, which PostgreSQL checks element by element when they are cast
        values = [] if tcol.is_array else [(what, text_form(v) or "") for what, v in constants(spec)]
        scol = source.column(spec.column) if spec.kind == "column" and spec.column else None
        if (
            scol is not None
            and scol.labels
            and scol.is_array == tcol.is_array
            and scol.type != tcol.type
            and not spec.has_else
        ):
            covered = set() if scol.is_array else {k for k, _ in spec.map}
            unmapped = " (not in the map)" if spec.map else ""
            of = scol.type.removesuffix("[]")
            values += [(f"label of {of}{unmapped}", label) for label in scol.labels if label not in covered]
        out += [
            LabelProblem(c.target, spec.line, what, value, tcol.type.removesuffix("[]"), tcol.labels)
            for what, value in values
            if value not in tcol.labels
        ]
    return out
