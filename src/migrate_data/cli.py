"""The ``migrate-data`` command: parse, call ``api``, print.  The only place that decides exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click

from . import __version__, api, report
from .copier import CopyEvent, CopyOptions
from .errors import BadInput, MigrationError, Stopped
from .files import write_private
from .settings import Settings, find_project, load_settings, redact, redact_text

T = TypeVar("T")
log = logging.getLogger("migrate_data")


def fail(e: MigrationError) -> None:
    click.echo(f"ERROR: {e.message}", err=True)
    if e.detail:
        click.echo("DETAIL: " + e.detail.replace("\n", "\nDETAIL: "), err=True)
    if e.hint:
        click.echo(f"HINT: {e.hint}", err=True)


class Context:
    """What the group's options leave for the commands."""

    def __init__(self, **opts: Any) -> None:
        self.opts = opts
        self.stack = ExitStack()
        self._settings: Settings | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            url = self.opts["database_url"]
            if self.opts["embedded"]:
                from .embedded import embedded_server

                url, where = self.stack.enter_context(embedded_server())
                click.echo(f"embedded PostgreSQL: {redact(url)} (data in {where}, removed at exit)", err=True)
            self._settings = load_settings(
                database_url=url,
                source_url=self.opts["source_url"],
                project_dir=self.opts["project"],
                statement_timeout=self.opts["statement_timeout"],
                lock_timeout=self.opts["lock_timeout"],
            )
        return self._settings

    def project_dir(self) -> Path:
        return Path(self.opts["project"]).resolve() if self.opts["project"] else find_project(Path.cwd())


def run(coro_fn: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run a library coroutine; SIGINT/SIGTERM ask it to stop at the next checkpoint."""

    async def main() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        return await coro_fn(stop)

    return asyncio.run(main())


class PhaseGroup(click.Group):
    """Built-in commands plus one command per phase file in ``mappings/``."""

    def _phases(self, ctx: click.Context) -> list[str]:
        given = ctx.params.get("project")  # parsed before the group's callback runs
        project = Path(given).resolve() if given else find_project(Path.cwd())
        mappings = project / "mappings"
        return sorted(p.stem for p in mappings.glob("*.yaml")) if mappings.is_dir() else []

    def list_commands(self, ctx: click.Context) -> list[str]:
        return super().list_commands(ctx) + [p for p in self._phases(ctx) if p not in self.commands]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        builtin = super().get_command(ctx, name)
        if builtin is not None:
            return builtin
        if name in self._phases(ctx):
            return phase_command(name)
        return None


@click.group(cls=PhaseGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="migrate-data")
@click.option("--database-url", envvar="DATABASE_URL", help="Target database (default: $DATABASE_URL).")
@click.option("--source-url", envvar="SOURCE_DATABASE_URL", help="Source database when it is another one.")
@click.option("--project", type=click.Path(file_okay=False), help="Migration project directory (default: here).")
@click.option("--embedded", is_flag=True, help="Start a throwaway local PostgreSQL and use it.")
@click.option("--statement-timeout", help="statement_timeout for our sessions, e.g. 30min.")
@click.option("--lock-timeout", help="lock_timeout for our sessions (default 10s).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--traceback", is_flag=True, help="Show the Python traceback of unexpected errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, traceback: bool, **opts: Any) -> None:
    """Run a PostgreSQL schema-translation migration, one phase per maintenance window."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    ctx.obj = Context(traceback=traceback, **opts)
    ctx.call_on_close(ctx.obj.stack.close)
    mappings = ctx.obj.project_dir() / "mappings"
    clash = sorted(p.stem for p in mappings.glob("*.yaml") if p.stem in BUILTINS) if mappings.is_dir() else []
    if clash:
        raise BadInput(
            f"{mappings / (clash[0] + '.yaml')}: phase name {clash[0]!r} is a built-in command",
            hint="rename the phase file",
        )


pass_ctx = click.make_pass_decorator(Context)
FORMATS = click.Choice(["text", "json", "markdown", "html"])


# --until: a wall-clock time in the user's zone.  The rule for a time that is not in the future: less than
# PASSED ago, it has passed (05:31 with --until 05:30) and is refused; longer ago, it means the next occurrence
# (23:00 with --until 05:30 means tomorrow morning).  MIN_LEFT: with less than this left, no batch can run.
PASSED = dt.timedelta(hours=12)
MIN_LEFT = dt.timedelta(minutes=1)


def _zone(tz: str | None) -> dt.tzinfo:
    """The zone of --tz, else this machine's (as a named zone when it can be found, so DST is right)."""
    if tz:
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise BadInput(f"--tz {tz}: unknown time zone", hint="an IANA name, e.g. America/Guayaquil") from e
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        candidates.append(os.readlink("/etc/localtime").partition("zoneinfo/")[2])
    for name in filter(None, candidates):
        with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
            return ZoneInfo(name)
    local = dt.datetime.now().astimezone().tzinfo
    assert local is not None
    return local


def _label(at: dt.datetime) -> str:
    """``05:30 America/Guayaquil``: a time in the zone the user gave, named."""
    return f"{at:%H:%M} {getattr(at.tzinfo, 'key', None) or at.tzname()}"


def _span(d: dt.timedelta) -> str:
    s = int(abs(d.total_seconds()))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min" if s >= 60 else f"{s} s"


def _wall(day: dt.date, hh: int, mm: int, zone: dt.tzinfo) -> dt.datetime:
    """``day`` at ``hh:mm`` on the clocks of ``zone``: the first occurrence when DST repeats the hour, and the end
    of the jump (the first instant the clocks read at least ``hh:mm``) when DST skips it."""
    naive = dt.datetime.combine(day, dt.time(hh, mm))
    a, b = (naive.replace(tzinfo=zone, fold=f).astimezone(dt.timezone.utc) for f in (0, 1))
    lo, hi = min(a, b), max(a, b)
    if lo == hi or lo.astimezone(zone).replace(tzinfo=None) == naive:
        return lo.astimezone(zone)  # one occurrence, or the first of two
    while hi - lo > dt.timedelta(seconds=1):  # skipped: find the jump between the two readings
        mid = lo + (hi - lo) / 2
        if mid.astimezone(zone).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return hi.replace(microsecond=0).astimezone(zone)


def _until(until: str | None, tz: str | None, *, now: dt.datetime | None = None) -> dt.datetime | None:
    """The deadline of ``--until HH:MM`` in ``--tz`` (aware, in that zone), at the clock ``now`` (default: now).

    Refuses (BadInput) a time that has passed (less than 12 h ago) and one too close for any batch."""
    if not until:
        return None
    zone = _zone(tz)
    m = re.fullmatch(r"([01]?[0-9]|2[0-3]):([0-5][0-9])", until.strip())
    if not m:
        raise BadInput(f"--until {until}: expected HH:MM, e.g. 05:30")
    hh, mm = int(m.group(1)), int(m.group(2))
    now = dt.datetime.now(dt.timezone.utc) if now is None else now if now.tzinfo else now.replace(tzinfo=zone)
    now = now.astimezone(dt.timezone.utc)  # instants: the same tzinfo on both sides would compare wall clocks
    today = now.astimezone(zone).date()
    at = next(
        at
        for at in (_wall(today + dt.timedelta(days=d), hh, mm, zone) for d in (-1, 0, 1, 2))
        if at > now - PASSED  # aware datetimes in different zones: compared as instants
    )
    if at <= now:
        raise BadInput(
            f"--until {until}: {_label(at)} has passed ({_span(now - at)} ago); nothing was done",
            hint=f"a time more than {PASSED.total_seconds() / 3600:.0f} h ago means the next day; "
            "give the end of the window that is still ahead",
        )
    if at - now < MIN_LEFT:
        raise BadInput(
            f"--until {until}: the window closes at {_label(at)}, in {_span(at - now)}: too soon for a batch; "
            "nothing was done (no backup taken)"
        )
    return at


class Progress:
    """Rich progress bars on a terminal; nothing extra otherwise (the library logs a line per batch)."""

    def __init__(self) -> None:
        self.bars: Any = None
        self.tasks: dict[str, Any] = {}
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bars

            self.bars = Bars(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"),
                TimeRemainingColumn(),
                transient=False,
            )
        else:
            logging.getLogger("migrate_data.copier").setLevel(logging.INFO)

    def __enter__(self) -> Progress:
        if self.bars:
            self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bars:
            self.bars.__exit__(*exc)

    def __call__(self, e: CopyEvent) -> None:
        if not self.bars:
            if e.kind in ("done", "skip"):
                click.echo(
                    f"{e.target}: {e.kind} — {e.rows:,} rows read, {e.written:,} written, {e.rejected:,} rejected",
                    err=True,
                )
            return
        t = self.tasks.get(e.target)
        if t is None:
            t = self.tasks[e.target] = self.bars.add_task(e.target, total=e.total or None, rate="-")
        rate = f"{e.rows / e.seconds:,.0f}" if e.kind == "done" and e.seconds else "-"
        self.bars.update(t, completed=e.rows, rate=rate)


class RejectLimit(click.ParamType):
    """``N`` rows in the phase, or ``N%`` of each table's source rows."""

    name = "N|N%"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int | None, float | None]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        try:
            if text.endswith("%"):
                share = float(text[:-1]) / 100
                if not 0 <= share <= 1:
                    raise ValueError
                return None, share
            n = int(text)
            if n < 0:
                raise ValueError
            return n, None
        except ValueError:
            self.fail(f"{value!r}: expected a number of rows (100) or a percentage (5%)", param, ctx)


def confirm(action: str, prompt: str) -> None:
    """Ask on a terminal; without one, refuse (a night's work is never started by a script that forgot --yes)."""
    if not sys.stdin.isatty():
        raise BadInput(f"refusing to {action} without confirmation: no terminal", hint="pass --yes")
    click.confirm(prompt, abort=True)


def phase_command(name: str) -> click.Command:
    @click.command(name=name, help=f"Run phase {name}: pre-flight, backup, schema, copy, validate.")
    @click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
    @click.option("--dry-run", is_flag=True, help="Stop after the pre-flight; print what would happen.")
    @click.option("--no-backup", is_flag=True, help="Skip pg_dump (rehearsals only).")
    @click.option("--batch-size", default=CopyOptions.batch_size, show_default=True, type=click.IntRange(1))
    @click.option("--jobs", default=2, show_default=True, type=click.IntRange(1, 64), help="Concurrent batches.")
    @click.option("--recheck", is_flag=True, help="Pass over finished tables again (idempotent).")
    @click.option(
        "--max-rejects",
        type=RejectLimit(),
        default="10%",
        show_default=True,
        help="Fail when more rows are quarantined: a count for the phase (100) or a share of each table (5%).",
    )
    @click.option("--until", help="Stop cleanly before HH:MM (the end of the window).")
    @click.option("--tz", help="Time zone of --until, e.g. America/Guayaquil (default: local).")
    @click.option(
        "--deep/--counts-only",
        default=True,
        show_default=True,
        help="Validate with checksums (default) or counts only.",
    )
    @pass_ctx
    def command(
        obj: Context,
        yes: bool,
        dry_run: bool,
        no_backup: bool,
        batch_size: int,
        jobs: int,
        recheck: bool,
        max_rejects: tuple[int | None, float | None],
        until: str | None,
        tz: str | None,
        deep: bool,
    ) -> None:
        settings = obj.settings()
        deadline = _until(until, tz)
        if deadline is not None:
            click.echo(
                f"the window closes at {_label(deadline)} ({deadline:%Y-%m-%d}, in "
                f"{_span(deadline - dt.datetime.now(dt.timezone.utc))}): no batch starts that would not finish by then",
                err=True,
            )
        phases, phase = api.get_phase(settings, name)
        if not dry_run and not yes:
            tables = ", ".join(f"{t.source}→{t.target}" for t in phase.tables) or "no tables (schema only)"
            confirm(
                f"run {name}",
                f"phase {name}: {phase.description}\n  database: {redact(settings.database_url)}\n"
                f"  revision: {phase.revision or '-'}\n  tables: {tables}\n  backup: {'no' if no_backup else 'yes'}\n"
                "run it?",
            )
        options = api.RunOptions(
            batch_size=batch_size,
            jobs=jobs,
            recheck=recheck,
            max_rejects=max_rejects[0],
            max_reject_share=max_rejects[1],
            deadline=deadline,
            backup=not no_backup,
            deep=deep,
            dry_run=dry_run,
        )
        with Progress() as progress:
            try:
                result = run(lambda stop: api.run_phase(settings, name, options, on_event=progress, stop=stop))
            except Stopped as e:
                e.hint = f"resume with: migrate-data {name} --yes" + (
                    f" --until {until}" + (f" --tz {shlex.quote(tz)}" if tz else "") if until else ""
                )
                if deadline is not None and not e.detail:
                    e.detail = f"--until {until}: the window closes at {_label(deadline)}"
                raise
        for f in result.findings:
            click.echo(str(f))
        if result.status == "dry-run":
            click.echo(
                f"dry run of {name}: pre-flight passed; would back up, "
                f"{'upgrade to ' + phase.revision + ', ' if phase.revision else ''}copy "
                f"{len(phase.tables)} tables and validate"
            )
            return
        for t in result.tables:
            state = "skipped (done before)" if t.skipped else f"{t.seconds:.1f}s"
            click.echo(
                f"{t.source} -> {t.target}: {t.rows_read:,} read, {t.rows_written:,} written, "
                f"{t.rejected:,} rejected, {state}"
            )
        assert result.validation is not None
        click.echo(report.to_text(result.validation))
        if result.backup_path:
            click.echo(f"backup: {result.backup_path}")
        click.echo(f"report: {result.reports.get('html')}")
        click.echo(
            f"phase {name} {'done' if result.status == 'done' else 'copied, but validation FAILED'} "
            f"in {result.seconds:.1f}s"
        )
        if result.status != "done":
            sys.exit(3)

    return command


@cli.command()
@click.argument("phase")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--sql", is_flag=True, help="Also print the DDL of the phase's Alembic revision.")
@pass_ctx
def plan(obj: Context, phase: str, fmt: str, sql: bool) -> None:
    """Show what a phase would do: pre-flight findings, SQL, a preview; never writes."""
    result = run(lambda stop: api.plan(obj.settings(), phase, sql=sql))
    data = result.to_dict()
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))
    else:
        click.echo(f"-- phase {phase}: {result.plan.phase.description}")
        if data["ddl"]:
            click.echo(f"-- DDL of revision {data['revision']}\n{data['ddl']}")
        for t in data["tables"]:
            click.echo(f"\n-- {t['source']} -> {t['target']}\n{t['copy']};")
            pv = t.get("preview") or {}
            if pv.get("error"):
                click.echo(f"-- preview failed: {pv['error']}")
            elif pv.get("rows"):
                click.echo("-- preview (first rows, computed and rolled back):")
                click.echo(
                    "\n".join(
                        "--   " + line
                        for line in report.summary(
                            [{k: _short(v) for k, v in r.items()} for r in pv["rows"]]
                        ).splitlines()
                    )
                )
        click.echo("")
        for f in result.plan.findings:
            click.echo(str(f))
        click.echo(f"order: {' -> '.join(data['order']) or '-'}")
    if result.plan.errors:
        sys.exit(2)


def _short(v: Any, width: int = 24) -> str:
    s = "" if v is None else str(v)
    return s if len(s) <= width else s[: width - 1] + "…"


@cli.command()
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


@cli.command()
@click.argument("phase")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Also remove rows the phase did not write or that changed since (saved to a file first).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted, kept and refused; change nothing.")
@pass_ctx
def rollback(obj: Context, phase: str, yes: bool, force: bool, dry_run: bool) -> None:
    """Undo a phase: delete exactly what it wrote, downgrade its revision, restore what it dropped."""
    settings = obj.settings()
    api.get_phase(settings, phase)
    if not (yes or dry_run or sys.stdin.isatty()):
        confirm(f"roll back {phase}", "")  # refuses: no terminal to ask on
    if dry_run or not yes:
        plan = run(lambda stop: api.rollback(settings, phase, dry_run=True)).plan
        assert plan is not None
        click.echo(f"rollback of {phase} on {redact(settings.database_url)}:\n{rollback_plan_text(plan)}")
        if dry_run:
            if plan.at_risk and not force:
                click.echo("it would refuse: rows it did not write are in the way (see above; --force saves them)")
            return
        confirm(f"roll back {phase}", f"roll back {phase}?")
    try:
        result = run(lambda stop: api.rollback(settings, phase, force=force, stop=stop))
    except Stopped as e:
        e.hint = f"resume with: migrate-data rollback {phase} --yes" + (" --force" if force else "")
        raise
    for table, n in result.deleted.items():
        click.echo(f"{table}: {n:,} rows deleted" + (f", {result.kept[table]:,} kept" if table in result.kept else ""))
    if result.foreign_rows_dump:
        click.echo(f"rows the phase did not write were saved to {result.foreign_rows_dump}")
    if result.downgraded_to:
        click.echo(f"schema downgraded to {result.downgraded_to}")
    if result.restored:
        click.echo(f"restored from backup: {', '.join(result.restored)}")
    click.echo(f"phase {phase} rolled back in {result.seconds:.1f}s")


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@pass_ctx
def status(obj: Context, fmt: str) -> None:
    """Show each phase: applied, partial (with the resume point), rolled back or pending."""
    rows = [asdict(s) for s in run(lambda stop: api.status(obj.settings()))]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    show_timing = any(r["predicted_seconds"] is not None for r in rows)
    click.echo(
        report.summary(
            [
                {
                    k: (f"{v:.0f}s" if isinstance(v, float) else v)
                    for k, v in r.items()
                    if show_timing or k not in ("predicted_seconds", "actual_seconds")
                }
                for r in rows
            ]
        )
    )


@cli.command()
@click.argument("phases", nargs=-1)
@click.option("--staging-url", required=True, help="The staging database to build and rehearse on.")
@click.option("--window", help="The maintenance window, e.g. 02:00-06:00.")
@click.option("--tz", help="Time zone of the window, e.g. America/Guayaquil (shown in the report).")
@click.option("--rebuild", is_flag=True, help="Replace the staging database if it exists.")
@click.option("--use-existing", is_flag=True, help="Rehearse on the staging database as it is (no copy).")
@click.option("--jobs", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--batch-size", default=CopyOptions.batch_size, show_default=True, type=click.IntRange(1))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
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
    from .rehearse import rehearse as run_rehearsal

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
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(report.rehearsal_markdown(result))
        click.echo(f"reports: {result.reports.get('html')}")
    if not result.validations_ok:
        sys.exit(3)


@cli.command()
@click.option("--phase", help="Only this phase.")
@click.option("--limit", default=50, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@pass_ctx
def history(obj: Context, phase: str | None, limit: int, fmt: str) -> None:
    """List past runs, rollbacks and validations from the ledger."""
    rows = run(lambda stop: api.history(obj.settings(), phase=phase, limit=limit))
    click.echo(json.dumps(rows, indent=2, default=str) if fmt == "json" else report.summary(rows))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
def init(directory: str) -> None:
    """Create a new migration project: alembic.ini, alembic/, mappings/ with an example."""
    from .project import init_project

    created = init_project(Path(directory))
    for p in created:
        click.echo(f"created {p}")
    click.echo(f"next: add a revision in {directory}/alembic/versions and a phase in {directory}/mappings")


@cli.command()
@click.option("--scale", default=0.002, show_default=True, help="Size of the sample database (1.0 = 1M customers).")
@pass_ctx
def demo(obj: Context, scale: float) -> None:
    """Seed the sample legacy database and run the whole plan on it, rollback included."""
    from .project import demo as run_demo

    if not obj.opts["database_url"] or obj.opts["embedded"]:
        obj.opts["embedded"] = True
    settings = obj.settings()
    code = run(lambda stop: run_demo(settings, scale=scale, say=lambda m: click.echo(m)))
    sys.exit(code)


BUILTINS = frozenset(cli.commands)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="migrate-data", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted; nothing was done", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except MigrationError as e:
        fail(e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception:
        ctx_tb = "--traceback" in (argv if argv is not None else sys.argv)
        if ctx_tb:
            raise
        exc = sys.exc_info()[1]
        click.echo(f"ERROR: unexpected {type(exc).__name__}: {redact_text(str(exc))}", err=True)
        click.echo("HINT: run again with --traceback to see where", err=True)
        sys.exit(1)
