"""The closing summary of a run, like pgloader's: per table rows read / written / quarantined, seconds, rows/s and the
validation's verdict; the totals; each step's time; the quarantined rows by cause; the verdict and the next command."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from . import report
from .console import Tracker
from .human import clock, dur, fmt_seconds, num, zone_name

if TYPE_CHECKING:
    from .api import RunResult


def table_rows(result: RunResult, tracker: Tracker | None = None) -> list[dict[str, Any]]:
    """Per table: rows read / written / quarantined, seconds, rows/s and the validation's verdict; then totals."""
    checks = {v.target: v for v in (result.validation.tables if result.validation else ())}
    rows: list[dict[str, Any]] = []
    for t in result.tables:
        v = checks.get(t.target)
        rate = t.rows_read / t.seconds if t.seconds and not t.skipped else None
        rows.append(
            {
                "source": t.source,
                "target": t.target,
                "read": t.rows_read,
                "written": t.rows_written,
                "quarantined": t.rejected,
                "seconds": "skipped" if t.skipped else fmt_seconds(t.seconds),
                "rows/s": num(rate),
                "check": (v.status.upper() if v is not None else "-"),
            }
        )
    if len(result.tables) > 1:
        copied = [t for t in result.tables if not t.skipped]
        copy_step = next((s for s in tracker.steps if s.name == "copy"), None) if tracker else None
        wall = copy_step.seconds if copy_step is not None and copy_step.seconds else sum(t.seconds for t in copied)
        read = sum(t.rows_read for t in copied)
        rows.append(
            {
                "source": "total",
                "target": "",
                "read": sum(t.rows_read for t in result.tables),
                "written": sum(t.rows_written for t in result.tables),
                "quarantined": sum(t.rejected for t in result.tables),
                "seconds": fmt_seconds(wall),
                "rows/s": num(read / wall if wall else None),
                "check": "",
            }
        )
    return rows


def summary(
    result: RunResult,
    tracker: Tracker | None = None,
    *,
    next_step: str | None = None,
    zone: dt.tzinfo | None = None,
) -> str:
    """The closing summary of a phase run, like pgloader's: what was moved, how fast, what was left out and why,
    where the reports are, and what to run next."""
    v = result.validation
    copied = sum(t.rows_written for t in result.tables)
    quarantined = sum(t.rejected for t in result.tables)
    verdict = "done" if result.status == "done" else "copied, but validation FAILED"
    check = "validation passed" if v is not None and v.ok else "validation FAILED"
    out = [
        f"phase {result.phase} {verdict}: {copied:,} rows copied, {quarantined:,} quarantined, {check}, "
        f"in {dur(result.seconds)}",
        "",
    ]
    if tracker is not None and tracker.steps:
        steps = [
            {"step": s.name, f"started ({zone_name(zone)})": clock(s.started_at, zone), "took": dur(s.seconds)}
            for s in tracker.steps
        ]
        out += [report.summary(steps, right=("took",)), ""]
    if result.tables:
        out += [
            report.summary(table_rows(result, tracker), right=("read", "written", "quarantined", "seconds", "rows/s")),
            "",
        ]
    if v is not None:
        problems = report.problem_lines(v)
        if problems:
            out += ["differences:", *problems, ""]
        if v.reject_causes:
            out += report.quarantine_lines(v)[1:]
        out.append(report.verdict_line(v))
    if result.backup_path:
        out.append(f"backup: {result.backup_path}")
    if result.reports.get("html"):
        out.append(f"report: {result.reports['html']}")
    if next_step:
        out.append(f"next:   {next_step}")
    return "\n".join(out)


def next_step(result: RunResult, order: list[str]) -> str:
    """The command to run next, after a run of ``result.phase`` (``order``: every phase, in order)."""
    name = result.phase
    if result.status == "dry-run":
        return f"migrate-data {name}    (pre-flight passed; this runs it)"
    if result.status != "done":
        return (
            f"read the differences in the report; fix the mapping or the data, then `migrate-data {name} --recheck`, "
            f"or undo it: `migrate-data rollback {name}`"
        )
    later = order[order.index(name) + 1 :] if name in order else []
    then = f"migrate-data {later[0]}" if later else "nothing: every phase is applied"
    v = result.validation
    if v is not None and v.quarantined:
        return f"{then}    (first look at the {v.quarantined:,} quarantined rows in the report)"
    return then


def stopped_lines(tracker: Tracker) -> list[str]:
    """What a stopped run had done, per table, for the lines before its error."""
    out = []
    for t in tracker.tables.values():
        pct = f" ({100 * t.rows // t.total} %)" if t.total else ""
        out.append(
            f"  {t.name}: {t.rows:,} of {t.total:,} rows read{pct}, {t.written:,} written, {t.rejected:,} quarantined"
        )
    return out


def timer_list(tracker: Tracker) -> list[tuple[str, float, float]]:
    """The steps as (name, start offset, seconds) from the start of the run: the report's timeline."""
    base = tracker.started
    return [(s.name, s.started - base, s.seconds or 0.0) for s in tracker.steps]
