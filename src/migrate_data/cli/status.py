"""status and history."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

import click

from .. import api, human, report
from .base import Context, format_option, pass_ctx, print_json, run, tz_option
from .group import cli
from .times import zone_of


# -- status and history -------------------------------------------------------------------------------------------
def _when(at: dt.datetime | None, zone: dt.tzinfo) -> str | None:
    return at.astimezone(zone).isoformat(timespec="seconds") if at is not None else None


def _live_text(p: api.LiveProgress, zone: dt.tzinfo) -> str:
    since = f"since {human.clock(p.started_at, zone, seconds=False)} by {p.operator}"
    if p.stage != "copying":
        return f"{p.stage}: {p.rows:,} rows read; {since}"
    total = f" of ≈{p.total:,}" if p.total else ""
    pct = f" ({100 * p.rows // p.total} %)" if p.total else ""
    tables = f"copying {', '.join(p.tables)}: " if p.tables else "copying: "
    return (
        f"{tables}{p.rows:,}{total} rows{pct}, {human.num(p.rate)} rows/s, "
        f"ETA {'≈ ' + human.dur(p.eta_seconds) if p.eta_seconds is not None else '-'}; {since}"
    )


@cli.command(
    epilog="\b\nExamples:\n  migrate-data status --tz America/Guayaquil\n  watch -n 10 migrate-data status    "
    "(a running phase's rows, rows/s and ETA, from another terminal)"
)
@format_option()
@tz_option()
@pass_ctx
def status(obj: Context, fmt: str, tz: str | None) -> None:
    """Show each phase: applied, running (live progress), partial (with the resume point), rolled back or pending."""
    zone = zone_of(tz)
    phases = run(lambda stop: api.status(obj.settings()))
    if fmt == "json":
        print_json(
            [
                {**asdict(s), "last_run_at": _when(s.last_run_at, zone),
                 "progress": {**asdict(s.progress), "started_at": _when(s.progress.started_at, zone)}
                 if s.progress else None}
                for s in phases
            ]
        )  # fmt: skip
        return
    show_timing = any(s.predicted_seconds is not None for s in phases)
    show_capture = any(s.capture != "-" for s in phases)
    rows = []
    for s in phases:
        row: dict[str, Any] = {
            "phase": s.phase,
            "state": s.state,
            f"last run ({human.zone_name(zone)})": (
                f"{s.last_run} {human.clock(s.last_run_at, zone, seconds=False, date=True)}" if s.last_run else "-"
            ),
            "rows": s.rows,
            "quarantined": s.quarantined,
            "validation": s.validation,
        }
        if show_capture:
            row["capture"] = s.capture
            row["waiting"] = "-" if s.changes_waiting is None else f"{s.changes_waiting:,}"
            row["oldest"] = human.dur(s.oldest_change_seconds) if s.oldest_change_seconds is not None else "-"
            row[f"last sync ({human.zone_name(zone)})"] = (
                human.clock(s.last_sync_at, zone, seconds=False, date=True) if s.last_sync_at else "-"
            )
        if show_timing:
            row["predicted"] = human.dur(s.predicted_seconds)
            row["took"] = human.dur(s.actual_seconds)
        row["note"] = _live_text(s.progress, zone) if s.progress else (s.error or s.resume or "")
        rows.append(row)
    click.echo(report.summary(rows, right=("rows", "quarantined", "waiting", "oldest", "predicted", "took")))
    for s in phases:
        if s.state == "error" and s.resume:
            click.echo(f"\n{s.phase}: {s.error}\n  " + s.resume.replace("\n", "\n  "))


@cli.command(epilog="\b\nExamples:\n  migrate-data history --phase phase2a --limit 10 --tz America/Guayaquil")
@click.option("--phase", help="Only this phase.")
@click.option("--limit", default=50, show_default=True)
@format_option()
@tz_option()
@pass_ctx
def history(obj: Context, phase: str | None, limit: int, fmt: str, tz: str | None) -> None:
    """List past runs, rollbacks and validations from the ledger."""
    zone = zone_of(tz)
    runs = run(lambda stop: api.history(obj.settings(), phase=phase, limit=limit))
    if fmt == "json":
        print_json([{**r, "started": _when(r["started"], zone)} for r in runs])
        return
    label = f"started ({human.zone_name(zone)})"
    click.echo(
        report.summary(
            [
                {
                    "id": r["id"],
                    "kind": r["kind"],
                    "phase": r["phase"],
                    "status": r["status"],
                    label: human.clock(r["started"], zone, date=True),
                    "took": human.dur(r["seconds"]),
                    "operator": r["operator"],
                    "rows": r["rows"] if r["rows"] is not None else "-",
                    "quarantined": r["rejects"],
                    "valid": "-" if r["valid"] is None else "yes" if r["valid"] else "NO",
                    "report": r["report"],
                }
                for r in runs
            ],
            right=("id", "took", "rows", "quarantined"),
        )
    )
