"""One command per phase: ``migrate-data phase2a`` runs it."""

from __future__ import annotations

import contextlib
import datetime as dt
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from .. import api, closing, console, report
from ..copier import CopyOptions
from ..errors import MigrationError, PrivilegeMissing, Stopped
from ..loader import load_phase
from ..settings import Settings, redact
from .base import (
    Context,
    RejectLimit,
    confirm,
    format_option,
    lock_options,
    pass_ctx,
    patience_flags,
    print_json,
    progress_every,
    run,
    with_global_options,
)
from .times import label, span, until_deadline, zone_of


# -- a phase ------------------------------------------------------------------------------------------------------
def _phase_help(path: Path) -> str:
    try:
        description = load_phase(path).description
    except MigrationError as e:
        return f"(its file does not load: {e.message})"
    return description or f"Run phase {path.stem}."


def _destroys(settings: Settings, tables: list[str]) -> str:
    counts = run(lambda stop: api.row_counts(settings, tables))
    width = max(len(t) for t in tables)
    listed = "\n".join(
        f"    {t.ljust(width)}  " + (f"{n:>12,} rows" if n is not None else "(not there)") for t, n in counts.items()
    )
    total = sum(n or 0 for n in counts.values())
    return f"  DROPS {len(tables)} tables, {total:,} rows (after a verified backup and proof that every row is in its target):\n{listed}"


PHASE_OPTIONS = (
    click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation."),
    click.option("--dry-run", is_flag=True, help="Stop after the pre-flight; print what would happen."),
    click.option("--no-backup", is_flag=True, help="Skip pg_dump (rehearsals only)."),
    click.option("--batch-size", default=CopyOptions.batch_size, show_default=True, type=click.IntRange(1)),
    click.option("--jobs", default=2, show_default=True, type=click.IntRange(1, 64), help="Concurrent batches."),
    click.option("--recheck", is_flag=True, help="Pass over finished tables again (idempotent)."),
    click.option(
        "--max-rejects", type=RejectLimit(), default="10%", show_default=True,
        help="Fail when more rows are quarantined: a count for the phase (100) or a share of each table (5%).",
    ),
    click.option("--until", help="Stop cleanly before HH:MM (the end of the window)."),
    click.option("--tz", help="Time zone of --until and of the times shown, e.g. America/Guayaquil (default: local)."),
    click.option(
        "--accept-unmapped", is_flag=True,
        help="Let a phase that drops tables drop data no mapping copies (it stays in the phase's backup).",
    ),
    click.option(
        "--force", is_flag=True,
        help="Let a phase that drops tables drop the views, functions, foreign keys... that depend on them, with no "
        "`dependents:` decision in its file (their definitions are saved first; rollback restores them).",
    ),
    click.option(
        "--deep/--counts-only", default=True, show_default=True, help="Validate with checksums (default) or counts only."
    ),
    lock_options("install change capture on the phase's source tables", dest="lock_retries"),
    format_option(),
)  # fmt: skip


def phase_command(name: str, path: Path) -> click.Command:
    """The command of one phase file: ``migrate-data NAME``."""
    help_text = _phase_help(path)

    def command(obj: Context, /, **flags: Any) -> None:
        run_phase_command(obj, name, **flags)

    command = pass_ctx(command)  # type: ignore[arg-type]
    for option in reversed(PHASE_OPTIONS):
        command = option(command)
    return with_global_options(
        click.command(
            name=name,
            help=f"{help_text}\n\nPre-flight, backup, schema, copy and validate phase {name}; resumable at the last "
            "checkpoint.",
            epilog=f"\b\nExamples:\n  migrate-data {name} --dry-run\n  migrate-data {name} --until 05:30 --tz "
            f"America/Guayaquil\n  migrate-data {name} --yes --format json > {name}.json\n  migrate-data rollback {name}",
            short_help=help_text,
        )(command)
    )


def run_phase_command(
    obj: Context,
    name: str,
    *,
    yes: bool,
    dry_run: bool,
    no_backup: bool,
    until: str | None,
    tz: str | None,
    fmt: str,
    max_rejects: tuple[int | None, float | None],
    **copy: Any,
) -> None:
    """Say when the window closes, confirm, run the phase with live progress, print the outcome (exit 3: invalid)."""
    settings = obj.settings()
    zone = zone_of(tz)
    deadline = until_deadline(until, tz)
    if deadline is not None:
        left = span(deadline - dt.datetime.now(dt.timezone.utc))
        click.echo(f"the window closes at {label(deadline)} ({deadline:%Y-%m-%d}, in {left}): no batch starts that "
                   "would not finish by then", err=True)  # fmt: skip
    _, phase = api.get_phase(settings, name)
    if not dry_run:
        _confirm_run(settings, phase, yes=yes, backup=not no_backup)
    options = api.RunOptions(max_rejects=max_rejects[0], max_reject_share=max_rejects[1], deadline=deadline,
                             backup=not no_backup, dry_run=dry_run, **copy)  # fmt: skip
    tracker = console.Tracker(name, deadline=deadline)
    terminal = sys.stderr if sys.stderr.isatty() else None
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    with console.progress(tracker, terminal=terminal, say=say, every=progress_every(), zone=zone):
        try:
            result = run(lambda stop: api.run_phase(settings, name, options, on_event=tracker, stop=stop))
        except PrivilegeMissing as e:
            if not dry_run:
                raise
            result = _read_only_dry_run(settings, name, e)
        except Stopped as e:
            tracker.finish()
            with contextlib.suppress(OSError):
                click.echo(
                    "\n".join([f"phase {name} stopped at a checkpoint:", *closing.stopped_lines(tracker)]), err=True
                )
            e.hint = (
                f"resume with: migrate-data {name} --yes"
                + (f" --until {until}" + (f" --tz {shlex.quote(tz)}" if tz else "") if until else "")
                + patience_flags(copy["lock_wait"], copy["lock_retries"])
            )
            if deadline is not None and not e.detail:
                e.detail = f"--until {until}: the window closes at {label(deadline)}"
            raise
    _print_outcome(obj, result, tracker, zone, fmt=fmt)


def _confirm_run(settings: Settings, phase: Any, *, yes: bool, backup: bool) -> None:
    """Ask before a run (a phase that drops tables lists them with their rows); with --yes only say what it drops."""
    name = phase.name
    destroys = _destroys(settings, [str(t) for t in phase.backup]) if phase.backup else ""
    restore = f"{destroys}\n  to restore them: migrate-data rollback {name}"
    if yes:
        if phase.backup:
            click.echo(f"phase {name}:\n{restore}", err=True)
        return
    tables = ", ".join(f"{t.source}→{t.target}" for t in phase.tables) or "no tables (schema only)"
    confirm(
        f"run {name}",
        f"phase {name}: {phase.description}\n  database: {redact(settings.database_url)}\n"
        f"  revision: {phase.revision or '-'}\n  tables: {tables}\n  backup: {'yes' if backup else 'no'}\n"
        + (f"{restore}\n" if phase.backup else "")
        + "run it?",
    )


def _print_outcome(obj: Context, result: api.RunResult, tracker: console.Tracker, zone: dt.tzinfo, *, fmt: str) -> None:
    following = closing.next_step(result, obj.phase_order())
    if result.validation is not None:
        report.add_run_details(
            result.reports, result.validation, steps=closing.timer_list(tracker), next_step=following
        )
    if fmt == "json":
        print_json(_run_dict(result, tracker, zone, following))
    else:
        for f in result.findings:
            click.echo(str(f))
        if result.status == "dry-run":
            rev = f"upgrade to {result.revision}, " if result.revision else ""
            n = len(api.get_phase(obj.settings(), result.phase)[1].tables)
            click.echo(f"dry run of {result.phase}: pre-flight passed; would back up, {rev}copy {n} tables and "
                       f"validate\nnext:   {following}")  # fmt: skip
        else:
            click.echo(closing.summary(result, tracker, next_step=following, zone=zone))
    if result.status == "invalid":
        sys.exit(3)


def _read_only_dry_run(settings: Settings, name: str, why: PrivilegeMissing) -> api.RunResult:
    """A dry run for a role that may not take the lock or write the ledger: the pre-flight of ``plan``."""
    click.echo(
        f"note: {why.message}; this role cannot take the lock or write the ledger, so the requirements were not "
        "checked: pre-flight only",
        err=True,
    )
    planned = run(lambda stop: api.plan(settings, name))
    planned.plan.raise_for_errors()
    return api.RunResult(name, "dry-run", findings=planned.plan.findings, revision=planned.plan.phase.revision)


def _run_dict(result: api.RunResult, tracker: console.Tracker, zone: dt.tzinfo, following: str) -> dict[str, Any]:
    return {
        "phase": result.phase,
        "status": result.status,
        "exit_code": 3 if result.status == "invalid" else 0,
        "seconds": round(result.seconds, 3),
        "steps": tracker.steps_dict(zone),
        "tables": [
            {**asdict(t), "rows_per_second": round(t.rows_read / t.seconds) if t.seconds and not t.skipped else None}
            for t in result.tables
        ],
        "validation": result.validation.to_dict() if result.validation else None,
        "findings": [{"level": f.level, "table": f.table, "message": f.message} for f in result.findings],
        "reports": result.reports,
        "backup": result.backup_path,
        "next": following,
    }
