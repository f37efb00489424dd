"""The ``migrate-data`` command: parse, call ``api``, print.  The only place that decides exit codes.

Exit codes: 0 done (and valid), 1 failed (resumable), 2 bad input or refused (flags, YAML, a held lock, a declined
prompt, a missing privilege: nothing was done), 3 copied but validation found differences, 130 stopped cleanly at a
checkpoint (a signal or ``--until``; the same command resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import difflib
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

from . import __version__, api, console, rehearsal, report
from .copier import CopyOptions
from .errors import BadInput, MigrationError, PrivilegeMissing, RefusedError, Stopped, database_error, postgres_error
from .files import write_private
from .mapping import load_phase
from .settings import Settings, find_project, load_settings, redact, redact_text
from .sync import SyncOptions

T = TypeVar("T")
log = logging.getLogger("migrate_data")


# -- errors -------------------------------------------------------------------------------------------------------
def fail(e: MigrationError, *, as_json: bool = False) -> None:
    """Print an error like psql (ERROR / DETAIL / HINT on stderr), or as one JSON object on stdout."""
    if as_json:
        click.echo(json.dumps(e.to_dict(), indent=2, ensure_ascii=False))
        return
    click.echo(f"ERROR: {e.message}", err=True)
    if e.detail:
        click.echo("DETAIL: " + e.detail.replace("\n", "\nDETAIL: "), err=True)
    if e.hint:
        click.echo(f"HINT: {e.hint}", err=True)


def _wants_json(args: list[str]) -> bool:
    """``--format json`` anywhere on the command line: errors are then printed as JSON too."""
    return "--format=json" in args or any(a == "--format" and b == "json" for a, b in zip(args, args[1:], strict=False))


def _as_migration_error(exc: BaseException, args: list[str]) -> MigrationError | None:
    """What main() prints for an exception that escaped a command; None: let it propagate (--traceback)."""
    if isinstance(exc, MigrationError):
        return exc
    if isinstance(exc, click.exceptions.Abort):
        return RefusedError("aborted; nothing was done")
    if isinstance(exc, click.ClickException):
        error = BadInput(exc.format_message())
        error.exit_code = exc.exit_code
        ctx = getattr(exc, "ctx", None)
        if ctx is not None and isinstance(exc, click.UsageError):
            error.hint = f"see `{ctx.command_path} --help`"
        return error
    if postgres_error(exc) is not None:
        return database_error(exc)
    if "--traceback" in args:
        return None
    return MigrationError(
        f"unexpected error: {redact_text(str(exc)) or 'no message'}",
        detail=f"an internal error of migrate-data ({type(exc).__name__}), not of the database",
        hint="run again with --traceback to see where, and report it",
    )


# -- the command line's state -------------------------------------------------------------------------------------
class Context:
    """What the group's options leave for the commands (global options given after a command land here too)."""

    def __init__(self, **opts: Any) -> None:
        self.opts = opts
        self.stack = ExitStack()
        self._settings: Settings | None = None

    def settings(self, *, require_url: bool = True) -> Settings:
        if self._settings is None or (require_url and not self._settings.database_url):
            url = self.opts["database_url"]
            if self.opts["embedded"] and require_url:
                from .embedded import embedded_server

                url, where = self.stack.enter_context(embedded_server())
                click.echo(f"embedded PostgreSQL: {redact(url)} (data in {where}, removed at exit)", err=True)
            self._settings = load_settings(
                database_url=url,
                source_url=self.opts["source_url"],
                project_dir=self.opts["project"],
                statement_timeout=self.opts["statement_timeout"],
                lock_timeout=self.opts["lock_timeout"],
                require_url=require_url,
            )
        return self._settings

    def project_dir(self) -> Path:
        return Path(self.opts["project"]).resolve() if self.opts["project"] else find_project(Path.cwd())

    def phase_order(self) -> list[str]:
        """Every phase of the project in order (for 'next:'); empty when the mappings cannot be read."""
        try:
            return list(api.project_phases(self.settings(require_url=False)))
        except MigrationError:
            return []


def _logging(verbose: int) -> None:
    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    logging.getLogger().setLevel(level)


# -- signals ------------------------------------------------------------------------------------------------------
def _detach_from(fds: set[int]) -> None:
    """The terminal hung up: what is still written to it goes to /dev/null, so the run stops cleanly and records
    that it stopped instead of dying on a write to a terminal that is gone."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.dup2(null, fd)
    os.close(null)


def run(coro_fn: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run a library coroutine; SIGINT, SIGTERM and SIGHUP ask it to stop at the next checkpoint (exit 130)."""
    terminals = {fd for fd in (1, 2) if os.isatty(fd)}

    async def main() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def hangup() -> None:
            _detach_from(terminals)
            stop.set()

        for sig, handler in ((signal.SIGINT, stop.set), (signal.SIGTERM, stop.set), (signal.SIGHUP, hangup)):
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        return await coro_fn(stop)

    return asyncio.run(main())


# -- values -------------------------------------------------------------------------------------------------------
class Duration(click.ParamType):
    """A PostgreSQL duration for statement_timeout / lock_timeout: ``30min``, ``10s``, ``500ms``, ``0`` (none)."""

    name = "DURATION"
    PATTERN = re.compile(r"\d+(\.\d+)?\s*(us|ms|s|min|h|d)?")

    def convert(self, value: Any, param: Any, ctx: Any) -> str | None:
        if value is None:
            return None
        text = str(value).strip()
        if not self.PATTERN.fullmatch(text):
            self.fail(f"{value!r} is not a duration; write e.g. 30min, 10s or 500ms (0 for none)", param, ctx)
        return text


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


# -- global options, before or after the command ------------------------------------------------------------------
GLOBAL_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--database-url",), {"help": "Target database (default: $DATABASE_URL)."}),
    (("--source-url",), {"help": "Source database when it is another one (default: $SOURCE_DATABASE_URL)."}),
    (("--project",), {"type": click.Path(file_okay=False), "help": "Migration project directory (default: here)."}),
    (("--embedded",), {"is_flag": True, "help": "Start a throwaway local PostgreSQL and use it."}),
    (("--statement-timeout",), {"type": Duration(), "help": "statement_timeout for our sessions, e.g. 30min."}),
    (("--lock-timeout",), {"type": Duration(), "help": "lock_timeout for our sessions (default 10s)."}),
    (("-v", "--verbose"), {"count": True, "help": "More log output (-vv for debug)."}),
    (("--traceback",), {"is_flag": True, "help": "Show the Python traceback of unexpected errors."}),
]


def _late_global(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after the command (``migrate-data status -v``): the same effect as before it."""
    if value is None or value is False or (param.name == "verbose" and not value):
        return
    obj = ctx.find_object(Context)
    if obj is None:
        return
    if param.name == "verbose":
        obj.opts["verbose"] = obj.opts.get("verbose", 0) + value
        _logging(obj.opts["verbose"])
    else:
        obj.opts[str(param.name)] = value
        obj._settings = None


def with_global_options(command: click.Command) -> click.Command:
    """Accept the group's options after ``command`` too (hidden there: the group's --help lists them)."""
    for decls, attrs in GLOBAL_OPTIONS:
        command.params.append(
            click.Option(decls, expose_value=False, hidden=True, callback=_late_global, **attrs)  # type: ignore[arg-type]
        )
    return command


# -- the group ----------------------------------------------------------------------------------------------------
class PhaseGroup(click.Group):
    """Built-in commands plus one command per phase file in ``mappings/``."""

    def _project(self, ctx: click.Context) -> Path:
        given = ctx.params.get("project")  # parsed before the group's callback runs
        return Path(given).resolve() if given else find_project(Path.cwd())

    def _phases(self, ctx: click.Context) -> list[str]:
        mappings = self._project(ctx) / "mappings"
        return sorted(p.stem for p in mappings.glob("*.yaml")) if mappings.is_dir() else []

    def list_commands(self, ctx: click.Context) -> list[str]:
        return super().list_commands(ctx) + [p for p in self._phases(ctx) if p not in self.commands]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        builtin = super().get_command(ctx, name)
        if builtin is not None:
            return builtin
        if name in self._phases(ctx):
            return phase_command(name, self._project(ctx) / "mappings" / f"{name}.yaml")
        return None

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = click.utils.make_str(args[0]) if args else ""
        if args and not name.startswith("-") and self.get_command(ctx, name) is None:
            phases = self._phases(ctx)
            close = difflib.get_close_matches(name, [*phases, *self.commands], n=1)
            raise BadInput(
                f"no command or phase {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                hint=f"phases: {', '.join(phases) or 'none (no mappings/*.yaml here)'}; "
                f"commands: {', '.join(sorted(self.commands))}",
            )
        return super().resolve_command(ctx, args)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        """Run the command; print any error like psql (or as JSON under --format json) and exit with its code."""
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name or "migrate-data", complete_var, standalone_mode=False, **extra)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - every error ends here, as a message and an exit code
            error = _as_migration_error(exc, argv)
            if error is None:
                raise
            with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
                fail(error, as_json=_wants_json(argv))
            sys.exit(error.exit_code)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(
    cls=PhaseGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="\b\nGlobal options may also follow the command:\n  migrate-data status -v\n"
    "  migrate-data phase2a --yes --database-url URL\n\n\b\nExit codes:\n  0 done\n  1 failed (the same command resumes)\n"
    "  2 bad input or refused: nothing was done\n  3 copied, but validation failed\n"
    "  130 stopped at a checkpoint (the same command resumes)",
)
@click.version_option(__version__, prog_name="migrate-data")
@click.option("--database-url", envvar="DATABASE_URL", help="Target database (default: $DATABASE_URL).")
@click.option("--source-url", envvar="SOURCE_DATABASE_URL", help="Source database when it is another one.")
@click.option("--project", type=click.Path(file_okay=False), help="Migration project directory (default: here).")
@click.option("--embedded", is_flag=True, help="Start a throwaway local PostgreSQL and use it.")
@click.option("--statement-timeout", type=Duration(), help="statement_timeout for our sessions, e.g. 30min.")
@click.option("--lock-timeout", type=Duration(), help="lock_timeout for our sessions (default 10s).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--traceback", is_flag=True, help="Show the Python traceback of unexpected errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, traceback: bool, **opts: Any) -> None:
    """Run a PostgreSQL schema-translation migration, one phase per maintenance window.

    Each phase is a file in mappings/ and a command of its own (`migrate-data phase2a`)."""
    _logging(verbose)
    ctx.obj = Context(traceback=traceback, verbose=verbose, **opts)
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


def _format_option(choices: tuple[str, ...] = ("text", "json")) -> Callable[[Any], Any]:
    return click.option(
        "--format", "fmt", type=click.Choice(list(choices)), default="text", show_default=True,
        help="Output format; with json, errors are JSON objects too (message, detail, hint, exit_code).",
    )  # fmt: skip


def _tz_option(what: str = "Time zone of the times shown") -> Callable[[Any], Any]:
    return click.option("--tz", help=f"{what}, e.g. America/Guayaquil (default: this machine's).")


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


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


def _progress_every() -> float:
    """Seconds between progress lines without a terminal ($MIGRATE_DATA_PROGRESS_EVERY, default 5)."""
    try:
        return max(float(os.environ.get("MIGRATE_DATA_PROGRESS_EVERY", "5")), 0.1)
    except ValueError:
        return 5.0


def _interactive() -> bool:
    """Whether a person can answer a prompt (stdin is a terminal)."""
    return sys.stdin.isatty()


def confirm(action: str, prompt: str) -> None:
    """Ask on a terminal; without one, refuse (a night's work is never started by a script that forgot --yes).
    A "no" refuses too: exit 2, nothing was done."""
    if not _interactive():
        raise BadInput(f"refusing to {action} without confirmation: no terminal", hint="pass --yes")
    if not click.confirm(prompt, default=False, err=True):
        raise RefusedError(f"not confirmed: did not {action}; nothing was done")


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


def phase_command(name: str, path: Path) -> click.Command:
    help_text = _phase_help(path)

    @click.command(
        name=name,
        help=f"{help_text}\n\nPre-flight, backup, schema, copy and validate phase {name}; resumable at the last "
        "checkpoint.",
        epilog=f"\b\nExamples:\n  migrate-data {name} --dry-run\n  migrate-data {name} --until 05:30 --tz "
        f"America/Guayaquil\n  migrate-data {name} --yes --format json > {name}.json\n  migrate-data rollback {name}",
        short_help=help_text,
    )
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
    @click.option("--tz", help="Time zone of --until and of the times shown, e.g. America/Guayaquil (default: local).")
    @click.option(
        "--accept-unmapped",
        is_flag=True,
        help="Let a phase that drops tables drop data no mapping copies (it stays in the phase's backup).",
    )
    @click.option(
        "--deep/--counts-only",
        default=True,
        show_default=True,
        help="Validate with checksums (default) or counts only.",
    )
    @_format_option()
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
        accept_unmapped: bool,
        deep: bool,
        fmt: str,
    ) -> None:
        settings = obj.settings()
        zone = _zone(tz)
        deadline = _until(until, tz)
        if deadline is not None:
            click.echo(
                f"the window closes at {_label(deadline)} ({deadline:%Y-%m-%d}, in "
                f"{_span(deadline - dt.datetime.now(dt.timezone.utc))}): no batch starts that would not finish by then",
                err=True,
            )
        phases, phase = api.get_phase(settings, name)
        if phase.backup and not dry_run:
            destroys = _destroys(settings, [str(t) for t in phase.backup])
            if yes:
                click.echo(f"phase {name}:\n{destroys}\n  to restore them: migrate-data rollback {name}", err=True)
        if not dry_run and not yes:
            tables = ", ".join(f"{t.source}→{t.target}" for t in phase.tables) or "no tables (schema only)"
            confirm(
                f"run {name}",
                f"phase {name}: {phase.description}\n  database: {redact(settings.database_url)}\n"
                f"  revision: {phase.revision or '-'}\n  tables: {tables}\n  backup: {'no' if no_backup else 'yes'}\n"
                + (f"{destroys}\n  to restore them: migrate-data rollback {name}\n" if phase.backup else "")
                + "run it?",
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
            accept_unmapped=accept_unmapped,
        )
        tracker = console.Tracker(name, deadline=deadline)
        terminal = sys.stderr if sys.stderr.isatty() else None
        say = lambda line: click.echo(line, err=True)  # noqa: E731
        with console.progress(tracker, terminal=terminal, say=say, every=_progress_every(), zone=zone):
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
                        "\n".join([f"phase {name} stopped at a checkpoint:", *console.stopped_lines(tracker)]), err=True
                    )
                e.hint = f"resume with: migrate-data {name} --yes" + (
                    f" --until {until}" + (f" --tz {shlex.quote(tz)}" if tz else "") if until else ""
                )
                if deadline is not None and not e.detail:
                    e.detail = f"--until {until}: the window closes at {_label(deadline)}"
                raise
        following = console.next_step(result, obj.phase_order())
        if result.validation is not None:
            report.add_run_details(
                result.reports, result.validation, steps=console.timer_list(tracker), next_step=following
            )
        if fmt == "json":
            _json(_run_dict(result, tracker, zone, following))
        elif result.status == "dry-run":
            for f in result.findings:
                click.echo(str(f))
            click.echo(
                f"dry run of {name}: pre-flight passed; would back up, "
                f"{'upgrade to ' + phase.revision + ', ' if phase.revision else ''}copy "
                f"{len(phase.tables)} tables and validate\nnext:   {following}"
            )
        else:
            for f in result.findings:
                click.echo(str(f))
            click.echo(console.summary(result, tracker, next_step=following, zone=zone))
        if result.status == "invalid":
            sys.exit(3)

    return with_global_options(command)


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


# -- plan, validate, rollback -------------------------------------------------------------------------------------
@cli.command(
    epilog="\b\nExamples:\n  migrate-data plan phase2a\n  migrate-data plan phase4 --sql > phase4.sql    "
    "(the DDL, no database needed)\n  migrate-data plan phase2a --format json"
)
@click.argument("phase")
@_format_option()
@click.option("--sql", is_flag=True, help="Only print the DDL of the phase's Alembic revision, offline (no database).")
@pass_ctx
def plan(obj: Context, phase: str, fmt: str, sql: bool) -> None:
    """Show what a phase would do: pre-flight findings, SQL, a preview; never writes."""
    if sql:
        ddl = api.plan_sql(obj.settings(require_url=False), phase)
        if fmt == "json":
            _json({"phase": phase, "ddl": ddl})
        else:
            click.echo(ddl if ddl is not None else f"-- {phase} has no Alembic revision: no DDL")
        return
    result = run(lambda stop: api.plan(obj.settings(), phase))
    data = result.to_dict()
    if fmt == "json":
        _json(data)
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
@_format_option()
@pass_ctx
def rollback(obj: Context, phase: str, yes: bool, force: bool, dry_run: bool, fmt: str) -> None:
    """Undo a phase: delete exactly what it wrote, downgrade its revision, restore what it dropped."""
    settings = obj.settings()
    api.get_phase(settings, phase)
    if not (yes or dry_run or _interactive()):
        confirm(f"roll back {phase}", "")  # refuses: no terminal to ask on
    if dry_run or not yes:
        plan = run(lambda stop: api.rollback(settings, phase, dry_run=True)).plan
        assert plan is not None
        if fmt == "json" and dry_run:
            _json({"phase": phase, "dry_run": True, "plan": asdict(plan), "refused": bool(plan.at_risk and not force)})
            return
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
    if fmt == "json":
        _json({**asdict(result), "plan": None, "next": f"migrate-data {phase}    (to run it again)"})
        return
    for table, n in result.deleted.items():
        click.echo(f"{table}: {n:,} rows deleted" + (f", {result.kept[table]:,} kept" if table in result.kept else ""))
    if result.foreign_rows_dump:
        click.echo(f"rows the phase did not write were saved to {result.foreign_rows_dump}")
    if result.downgraded_to:
        click.echo(f"schema downgraded to {result.downgraded_to}")
    if result.restored:
        click.echo(f"restored from backup: {', '.join(result.restored)}")
    click.echo(f"phase {phase} rolled back in {console.dur(result.seconds)}")
    click.echo(f"next:   migrate-data {phase}    (to run it again)")


# -- between nights: sync and cutover -------------------------------------------------------------------------------
@cli.command(epilog="\b\nExamples:\n  migrate-data sync phase2a\n  migrate-data sync phase2a phase2b --follow")
@click.argument("phases", nargs=-1, required=True)
@click.option("--follow", is_flag=True, help="Keep applying changes as they come, until Ctrl-C (exit 130).")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1), help="Changes per transaction.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.05), help="--follow: seconds "
              "between looks at an empty change log.")  # fmt: skip
@_format_option()
@pass_ctx
def sync(obj: Context, phases: tuple[str, ...], follow: bool, batch_size: int, interval: float, fmt: str) -> None:
    """Apply the writes captured since a phase's copy to its Spanish tables."""
    settings = obj.settings()
    if follow:
        logging.getLogger("migrate_data.sync").setLevel(logging.INFO)  # the lag, as it goes
    options = SyncOptions(batch_size=batch_size, follow=follow, interval=interval)
    try:
        result = run(lambda stop: api.sync(settings, list(phases), options, stop=stop))
    except Stopped as e:
        e.hint = f"continue with: migrate-data sync {' '.join(phases)}" + (" --follow" if follow else "")
        raise
    if fmt == "json":
        _json(asdict(result))
        return
    for p in result.phases:
        click.echo(
            f"{p.phase}: {p.changes:,} changes applied: {p.upserted:,} rows upserted, {p.deleted:,} deleted, "
            f"{p.rejected:,} quarantined, {p.cleared:,} rejects cleared; {p.waiting:,} waiting"
            + (f" (the oldest {console.dur(p.oldest_seconds)} old)" if p.oldest_seconds is not None else "")
            + (f"; {p.deferred:,} deletes wait for rows that reference them" if p.deferred else "")
            + (f"; {p.skipped:,} changed rows NOT applied: someone else wrote them in the target" if p.skipped else "")
        )
    click.echo(f"synced in {console.dur(result.seconds)}")


@cli.command(epilog="\b\nExamples:\n  migrate-data cutover phase2a\n  migrate-data cutover phase2a --lock-wait 1s")
@click.argument("phases", nargs=-1, required=True)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--lock-wait", default="2s", show_default=True, help="How long one try to block writes may wait.")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(0), help="Tries after the first.")
@_format_option()
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
    result = run(lambda stop: api.cutover(settings, list(phases), lock_wait=lock_wait, retries=retries))
    if fmt == "json":
        _json(asdict(result))
    else:
        for v in result.validations:
            click.echo(report.to_text(v))
        if result.blocked_tables:
            click.echo(
                f"writes to {', '.join(result.blocked_tables)} were blocked for {console.dur(result.blocked_seconds)}"
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


# -- status and history -------------------------------------------------------------------------------------------
def _when(at: dt.datetime | None, zone: dt.tzinfo) -> str | None:
    return at.astimezone(zone).isoformat(timespec="seconds") if at is not None else None


def _live_text(p: api.LiveProgress, zone: dt.tzinfo) -> str:
    since = f"since {console.clock(p.started_at, zone, seconds=False)} by {p.operator}"
    if p.stage != "copying":
        return f"{p.stage}: {p.rows:,} rows read; {since}"
    total = f" of ≈{p.total:,}" if p.total else ""
    pct = f" ({100 * p.rows // p.total} %)" if p.total else ""
    tables = f"copying {', '.join(p.tables)}: " if p.tables else "copying: "
    return (
        f"{tables}{p.rows:,}{total} rows{pct}, {console.num(p.rate)} rows/s, "
        f"ETA {'≈ ' + console.dur(p.eta_seconds) if p.eta_seconds is not None else '-'}; {since}"
    )


@cli.command(
    epilog="\b\nExamples:\n  migrate-data status --tz America/Guayaquil\n  watch -n 10 migrate-data status    "
    "(a running phase's rows, rows/s and ETA, from another terminal)"
)
@_format_option()
@_tz_option()
@pass_ctx
def status(obj: Context, fmt: str, tz: str | None) -> None:
    """Show each phase: applied, running (live progress), partial (with the resume point), rolled back or pending."""
    zone = _zone(tz)
    phases = run(lambda stop: api.status(obj.settings()))
    if fmt == "json":
        _json(
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
            f"last run ({console.zone_name(zone)})": (
                f"{s.last_run} {console.clock(s.last_run_at, zone, seconds=False, date=True)}" if s.last_run else "-"
            ),
            "rows": s.rows,
            "quarantined": s.quarantined,
            "validation": s.validation,
        }
        if show_capture:
            row["capture"] = s.capture
            row["waiting"] = "-" if s.changes_waiting is None else f"{s.changes_waiting:,}"
            row["oldest"] = console.dur(s.oldest_change_seconds) if s.oldest_change_seconds is not None else "-"
            row[f"last sync ({console.zone_name(zone)})"] = (
                console.clock(s.last_sync_at, zone, seconds=False, date=True) if s.last_sync_at else "-"
            )
        if show_timing:
            row["predicted"] = console.dur(s.predicted_seconds)
            row["took"] = console.dur(s.actual_seconds)
        row["note"] = _live_text(s.progress, zone) if s.progress else (s.error or s.resume or "")
        rows.append(row)
    click.echo(report.summary(rows, right=("rows", "quarantined", "waiting", "oldest", "predicted", "took")))
    for s in phases:
        if s.state == "error" and s.resume:
            click.echo(f"\n{s.phase}: {s.error}\n  " + s.resume.replace("\n", "\n  "))


@cli.command(epilog="\b\nExamples:\n  migrate-data history --phase phase2a --limit 10 --tz America/Guayaquil")
@click.option("--phase", help="Only this phase.")
@click.option("--limit", default=50, show_default=True)
@_format_option()
@_tz_option()
@pass_ctx
def history(obj: Context, phase: str | None, limit: int, fmt: str, tz: str | None) -> None:
    """List past runs, rollbacks and validations from the ledger."""
    zone = _zone(tz)
    runs = run(lambda stop: api.history(obj.settings(), phase=phase, limit=limit))
    if fmt == "json":
        _json([{**r, "started": _when(r["started"], zone)} for r in runs])
        return
    label = f"started ({console.zone_name(zone)})"
    click.echo(
        report.summary(
            [
                {
                    "id": r["id"],
                    "kind": r["kind"],
                    "phase": r["phase"],
                    "status": r["status"],
                    label: console.clock(r["started"], zone, date=True),
                    "took": console.dur(r["seconds"]),
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
@_format_option()
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
        _json(result.to_dict())
    else:
        click.echo(rehearsal.rehearsal_markdown(result))
        click.echo(f"reports: {result.reports.get('html')}")
    if not result.validations_ok:
        sys.exit(3)


@cli.command(epilog="\b\nExample:\n  migrate-data init ./migration")
@click.argument("directory", type=click.Path(file_okay=False))
def init(directory: str) -> None:
    """Create a new migration project: alembic.ini, alembic/, mappings/ with an example."""
    from .project import init_project

    created = init_project(Path(directory))
    for p in created:
        click.echo(f"created {p}")
    click.echo(f"next: add a revision in {directory}/alembic/versions and a phase in {directory}/mappings")


@cli.command(epilog="\b\nExamples:\n  migrate-data demo\n  migrate-data demo --scale 0.01")
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
for _command in list(cli.commands.values()):
    with_global_options(_command)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="migrate-data")
