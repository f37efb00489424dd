"""Between nights: sync and cutover."""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict

import click

from .. import api, human, report
from ..errors import Stopped
from ..settings import redact
from ..sync import SyncOptions
from .base import Context, confirm, format_option, lock_options, pass_ctx, print_json, run
from .group import cli


# -- between nights: sync and cutover -------------------------------------------------------------------------------
@cli.command(epilog="\b\nExamples:\n  migrate-data sync phase2a\n  migrate-data sync phase2a phase2b --follow")
@click.argument("phases", nargs=-1, required=True)
@click.option("--follow", is_flag=True, help="Keep applying changes as they come, until Ctrl-C (exit 130).")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1), help="Changes per transaction.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.05), help="--follow: seconds "
              "between looks at an empty change log.")  # fmt: skip
@lock_options("install capture again on a table (after DDL)", wait=SyncOptions.lock_wait, retries=SyncOptions.retries)
@format_option()
@pass_ctx
def sync(
    obj: Context, phases: tuple[str, ...], follow: bool, batch_size: int, interval: float, lock_wait: str,
    retries: int, fmt: str,
) -> None:  # fmt: skip
    """Apply the writes captured since a phase's copy to its Spanish tables."""
    settings = obj.settings()
    if follow:
        logging.getLogger("migrate_data.sync").setLevel(logging.INFO)  # the lag, as it goes
    options = SyncOptions(batch_size=batch_size, follow=follow, interval=interval, lock_wait=lock_wait, retries=retries)
    try:
        result = run(lambda stop: api.sync(settings, list(phases), options, stop=stop))
    except Stopped as e:
        e.hint = f"continue with: migrate-data sync {' '.join(phases)}" + (" --follow" if follow else "")
        raise
    if fmt == "json":
        print_json(asdict(result))
        return
    for p in result.phases:
        click.echo(
            f"{p.phase}: {p.changes:,} changes applied: {p.upserted:,} rows upserted, {p.deleted:,} deleted, "
            f"{p.rejected:,} quarantined, {p.cleared:,} rejects cleared; {p.waiting:,} waiting"
            + (f" (the oldest {human.dur(p.oldest_seconds)} old)" if p.oldest_seconds is not None else "")
            + (f"; {p.deferred:,} deletes wait for rows that reference them" if p.deferred else "")
            + (f"; {p.skipped:,} changed rows NOT applied: someone else wrote them in the target" if p.skipped else "")
        )
    click.echo(f"synced in {human.dur(result.seconds)}")


@cli.command(epilog="\b\nExamples:\n  migrate-data cutover phase2a\n  migrate-data cutover phase2a --lock-wait 1s")
@click.argument("phases", nargs=-1, required=True)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@lock_options("block writes (or install capture again on a table, or remove it)", wait="2s", retries=5)
@format_option()
@pass_ctx
def cutover(obj: Context, phases: tuple[str, ...], yes: bool, lock_wait: str, retries: int, fmt: str) -> None:
    """Block writes to a phase's English tables, apply the last changes, validate, stop capturing."""
    settings = obj.settings()
    for p in phases:
        api.get_phase(settings, p)
    if not yes:
        confirm(
            f"cut over {', '.join(phases)}",
            f"cut over {', '.join(phases)} on {redact(settings.database_url)}: writes to their English tables are "
            "blocked while the last changes are applied and validated; go?",
        )
    result = run(lambda stop: api.cutover(settings, list(phases), lock_wait=lock_wait, retries=retries, stop=stop))
    if fmt == "json":
        print_json(asdict(result))
    else:
        for v in result.validations:
            click.echo(report.to_text(v))
        if result.blocked_tables:
            click.echo(
                f"writes to {', '.join(result.blocked_tables)} were blocked for {human.dur(result.blocked_seconds)}"
                + (f" (blocked at try {result.attempts})" if result.attempts > 1 else "")
            )
        if result.ok:
            for p in result.already:
                click.echo(f"{p} was cut over before")
            click.echo(
                f"{', '.join(result.phases)} cut over"
                + (
                    "; change capture removed"
                    if result.capture_removed
                    else "; change capture NOT removed yet: run the same command again"
                )
            )
        else:
            for line in result.problems:
                click.echo(line)
            click.echo("validation FAILED: writes released, change capture kept on; nothing was cut over")
        if result.late:
            click.echo(
                f"WARNING: {result.late:,} changes were written to the English tables after the last sync (is the "
                "application still writing them?): kept, not applied, in migrate_data.changes"
            )
    if not result.ok:
        sys.exit(3)
