"""What the pre-flight found, and a phase compiled against the live catalogs (``PhasePlan``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .catalog import Table
from .compile import CompiledTable
from .errors import PreflightError
from .mapping import Phase


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning" | "info"
    table: str | None
    message: str
    count: int | None = None

    def __str__(self) -> str:
        where = f"{self.table}: " if self.table else ""
        return f"{self.level.upper()}: {where}{self.message}"


@dataclass(frozen=True)
class PhasePlan:
    """A compiled phase: its tables in foreign-key order, what the pre-flight found, a preview."""

    phase: Phase
    tables: tuple[tuple[CompiledTable, Table], ...]
    findings: tuple[Finding, ...] = ()
    previews: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def raise_for_errors(self) -> None:
        errs = self.errors
        if errs:
            raise PreflightError(
                f"pre-flight of {self.phase.name} failed: {len(errs)} error{'s' if len(errs) > 1 else ''}",
                detail="\n".join(str(e) for e in errs),
                hint=f"see `migrate-data plan {self.phase.name}`; nothing was written",
            )
