"""plan, validate, rollback."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from .. import api, human, report
from ..errors import Stopped
from ..files import write_private
from ..settings import redact
from . import base
from .base import FORMATS, Context, confirm, format_option, lock_options, pass_ctx, patience_flags, print_json, run
from .group import cli


# -- plan, validate, rollback -------------------------------------------------------------------------------------
@cli.command(
    epilog="\b\nExamples:\n  migrate-data plan phase2a\n  migrate-data plan phase4 --sql > phase4.sql    "
    "(the DDL, no database needed)\n  migrate-data plan phase2a --format json"
)
@click.argument("phase")
@format_option()
@click.option("--sql", is_flag=True, help="Only print the DDL of the phase's Alembic revision, offline (no database).")
@pass_ctx
def plan(obj: Context, phase: str, fmt: str, sql: bool) -> None:
    """Show what a phase would do: pre-flight findings, SQL, a preview; never writes."""
    if sql:
        ddl = api.plan_sql(obj.settings(require_url=False), phase)
        if fmt == "json":
            print_json({"phase": phase, "ddl": ddl})
        else:
            click.echo(ddl if ddl is not None else f"-- {phase} has no Alembic revision: no DDL")
        return
    result = run(lambda stop: api.plan(obj.settings(), phase))
    data = result.to_dict()
    if fmt == "json":
        print_json(data)
    else:
        click.echo(f"-- phase {phase}: {result.plan.phase.description}")
        previews = {f"{t['source']} -> {t['target']}": t.get("preview") or {} for t in data["tables"]}
        for i, st in enumerate(result.steps, 1):
            click.echo(f"\n-- step {i}. {st.step}: {st.summary}" + (f"\n--   undo: {st.undo}" if st.undo else ""))
            for command in st.commands:
                click.echo(f"--   $ {command}")
            for heading, statements in st.parts or (("", st.statements),):
                if heading:
                    click.echo(f"\n-- {heading}")
                click.echo("".join(f"{x.rstrip().rstrip(';')};\n" for x in statements), nl=False)
                _print_preview(previews.get(heading) or {})
        click.echo("")
        for f in result.plan.findings:
            click.echo(str(f))
        click.echo(f"order: {' -> '.join(data['order']) or '-'}")
        if result.plan.phase.revision:
            click.echo(f"DDL: migrate-data plan {phase} --sql")
    if result.plan.errors:
        sys.exit(2)


def _print_preview(pv: dict[str, Any]) -> None:
    if pv.get("error"):
        click.echo(f"-- preview failed: {pv['error']}")
    elif pv.get("rows"):
        click.echo("-- preview (first rows, computed and rolled back):")
        rows = [{k: _short(v) for k, v in r.items()} for r in pv["rows"]]
        click.echo("\n".join("--   " + line for line in report.summary(rows).splitlines()))


def _short(v: Any, width: int = 24) -> str:
    s = "" if v is None else str(v)
    return s if len(s) <= width else s[: width - 1] + "…"


@cli.command(
    epilog="\b\nExamples:\n  migrate-data validate phase2a\n  migrate-data validate phase2a --deep --format html "
    "--output phase2a.html"
)
@click.argument("phase")
@click.option("--deep", is_flag=True, help="Compare checksums of every row, not only counts.")
@click.option("--sample", default=10, show_default=True, help="How many differing keys to show per kind.")
@click.option("--no-rejects", is_flag=True, help="Fail when any row was rejected.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), help="Write the report here instead of stdout.")
@pass_ctx
def validate(obj: Context, phase: str, deep: bool, sample: int, no_rejects: bool, fmt: str, output: str | None) -> None:
    """Compare a phase's source and target: counts, checksums (--deep), integrity."""
    result = run(
        lambda stop: api.validate(obj.settings(), phase, deep=deep, sample=sample, allow_rejects=not no_rejects)
    )
    text = report.render(result, fmt)
    if output:
        write_private(Path(output), text)
        click.echo(f"report written to {output}")
    else:
        click.echo(text)
    if not result.ok:
        sys.exit(3)


def rollback_plan_text(plan: Any) -> str:
    """What a rollback will do, per table: rows deleted, kept, and at risk."""
    lines = [
        f"  {t.table}: {t.ours:,} rows the phase wrote will be deleted"
        + (f", {t.before:,} there before it are kept" if t.before and not t.dropped else "")
        + (
            f", {t.at_risk:,} rows it did not write ({'the table is dropped' if t.dropped else 'refused'})"
            if t.at_risk
            else ""
        )
        for t in plan.tables
    ]
    if plan.downgrade_to:
        lines.append(f"  schema downgraded to {plan.downgrade_to}")
    if plan.restore:
        lines.append(f"  restored from the phase's backup: {', '.join(plan.restore)}")
    return "\n".join(lines) or "  nothing to delete"


@cli.command(epilog="\b\nExamples:\n  migrate-data rollback phase3 --dry-run\n  migrate-data rollback phase3")
@click.argument("phase")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Also remove rows the phase did not write or that changed since (saved to a file first).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted, kept and refused; change nothing.")
@lock_options("remove change capture from the phase's source tables")
@format_option()
@pass_ctx
def rollback(
    obj: Context, phase: str, yes: bool, force: bool, dry_run: bool, lock_wait: str, retries: int, fmt: str
) -> None:
    """Undo a phase: delete exactly what it wrote, downgrade its revision, restore what it dropped."""
    settings = obj.settings()
    api.get_phase(settings, phase)
    if not (yes or dry_run or base.interactive()):
        confirm(f"roll back {phase}", "")  # refuses: no terminal to ask on
    if dry_run or not yes:
        plan = run(lambda stop: api.rollback(settings, phase, dry_run=True)).plan
        assert plan is not None
        if fmt == "json" and dry_run:
            print_json(
                {"phase": phase, "dry_run": True, "plan": asdict(plan), "refused": bool(plan.at_risk and not force)}
            )
            return
        click.echo(f"rollback of {phase} on {redact(settings.database_url)}:\n{rollback_plan_text(plan)}")
        if dry_run:
            if plan.at_risk and not force:
                click.echo("it would refuse: rows it did not write are in the way (see above; --force saves them)")
            return
        confirm(f"roll back {phase}", f"roll back {phase}?")
    try:
        result = run(
            lambda stop: api.rollback(settings, phase, force=force, stop=stop, lock_wait=lock_wait, retries=retries)
        )
    except Stopped as e:
        e.hint = (
            f"resume with: migrate-data rollback {phase} --yes"
            + (" --force" if force else "")
            + patience_flags(lock_wait, retries)
        )
        raise
    if fmt == "json":
        print_json({**asdict(result), "plan": None, "next": f"migrate-data {phase}    (to run it again)"})
        return
    for table, n in result.deleted.items():
        click.echo(f"{table}: {n:,} rows deleted" + (f", {result.kept[table]:,} kept" if table in result.kept else ""))
    if result.foreign_rows_dump:
        click.echo(f"rows the phase did not write were saved to {result.foreign_rows_dump}")
    if result.downgraded_to:
        click.echo(f"schema downgraded to {result.downgraded_to}")
    if result.restored:
        click.echo(f"restored from backup: {', '.join(result.restored)}")
    click.echo(f"phase {phase} rolled back in {human.dur(result.seconds)}")
    click.echo(f"next:   migrate-data {phase}    (to run it again)")
