"""rehearse, init, demo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import rehearsal
from ..copier import CopyOptions
from .base import Context, format_option, pass_ctx, print_json, run
from .group import cli


# -- rehearse, init, demo -----------------------------------------------------------------------------------------
@cli.command(
    epilog="\b\nExample:\n  migrate-data rehearse phase2a --staging-url postgresql://dba@staging/tinkubot_rehearsal "
    "\\\n      --rebuild --window 02:00-06:00 --tz America/Guayaquil"
)
@click.argument("phases", nargs=-1)
@click.option("--staging-url", required=True, help="The staging database to build and rehearse on.")
@click.option("--window", help="The maintenance window, e.g. 02:00-06:00.")
@click.option("--tz", help="Time zone of the window, e.g. America/Guayaquil (shown in the report).")
@click.option("--rebuild", is_flag=True, help="Replace the staging database if it exists.")
@click.option("--use-existing", is_flag=True, help="Rehearse on the staging database as it is (no copy).")
@click.option("--jobs", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--batch-size", default=CopyOptions.batch_size, show_default=True, type=click.IntRange(1))
@format_option()
@pass_ctx
def rehearse(
    obj: Context,
    phases: tuple[str, ...],
    staging_url: str,
    window: str | None,
    tz: str | None,
    rebuild: bool,
    use_existing: bool,
    jobs: int,
    batch_size: int,
    fmt: str,
) -> None:
    """Rehearse phases on a staging copy and predict whether they fit the window."""
    from ..rehearse import rehearse as run_rehearsal

    settings = obj.settings()
    result = run(
        lambda stop: run_rehearsal(
            settings,
            list(phases),
            staging_url=staging_url,
            window=f"{window} {tz}".strip() if window and tz else window,
            rebuild=rebuild,
            use_existing=use_existing,
            jobs=jobs,
            batch_size=batch_size,
        )
    )
    if fmt == "json":
        print_json(result.to_dict())
    else:
        click.echo(rehearsal.rehearsal_markdown(result))
        click.echo(f"reports: {result.reports.get('html')}")
    if not result.validations_ok:
        sys.exit(3)


@cli.command(epilog="\b\nExample:\n  migrate-data init ./migration")
@click.argument("directory", type=click.Path(file_okay=False))
def init(directory: str) -> None:
    """Create a new migration project: alembic.ini, alembic/, mappings/ with an example."""
    from ..project import init_project

    created = init_project(Path(directory))
    for p in created:
        click.echo(f"created {p}")
    click.echo(f"next: add a revision in {directory}/alembic/versions and a phase in {directory}/mappings")


@cli.command(epilog="\b\nExamples:\n  migrate-data demo\n  migrate-data demo --scale 0.01")
@click.option("--scale", default=0.002, show_default=True, help="Size of the sample database (1.0 = 1M customers).")
@pass_ctx
def demo(obj: Context, scale: float) -> None:
    """Seed the sample legacy database and run the whole plan on it, rollback included."""
    from ..project import demo as run_demo

    if not obj.opts["database_url"] or obj.opts["embedded"]:
        obj.opts["embedded"] = True
    settings = obj.settings()
    code = run(lambda stop: run_demo(settings, scale=scale, say=lambda m: click.echo(m)))
    sys.exit(code)
