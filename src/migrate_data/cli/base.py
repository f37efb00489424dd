"""What every command shares: the state the group leaves, errors printed like psql, signals, option types.

Exit codes: 0 done (and valid), 1 failed (resumable), 2 bad input or refused (flags, YAML, a held lock, a declined
prompt, a missing privilege: nothing was done), 3 copied but validation found differences, 130 stopped cleanly at a
checkpoint (a signal or ``--until``; the same command resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import api
from ..capture_sql import LOCK_RETRIES, LOCK_WAIT
from ..errors import BadInput, MigrationError, RefusedError, database_error, postgres_error
from ..settings import Settings, check_duration, find_project, load_settings, redact, redact_text

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
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


def wants_json(args: list[str]) -> bool:
    """``--format json`` anywhere on the command line: errors are then printed as JSON too."""
    return "--format=json" in args or any(a == "--format" and b == "json" for a, b in zip(args, args[1:], strict=False))


def as_migration_error(exc: BaseException, args: list[str]) -> MigrationError | None:
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
                from ..embedded import embedded_server

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


def setup_logging(verbose: int) -> None:
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

    def __init__(self, *, bounded: bool = False) -> None:
        self.bounded = bounded  # a wait in front of the application's writers: what the server reads as 0 is refused

    def convert(self, value: Any, param: Any, ctx: Any) -> str | None:
        if value is None:
            return None
        try:
            return check_duration(str(value), bounded=self.bounded)
        except BadInput as e:
            self.fail(e.message, param, ctx)


def lock_options(
    doing: str, *, wait: str = LOCK_WAIT, retries: int = LOCK_RETRIES, dest: str = "retries"
) -> Callable[[F], F]:
    """``--lock-wait`` and ``--retries`` (into ``dest``): the patience of a command that locks tables in front of the
    application's writers, to ``doing``."""

    def apply(command: F) -> F:
        command = click.option(
            "--retries", dest, default=retries, show_default=True, type=click.IntRange(0), help="Tries after the first."
        )(command)
        return click.option(
            "--lock-wait", default=wait, show_default=True, type=Duration(bounded=True),
            help=f"How long one try to {doing} may wait for the application's transactions.",
        )(command)  # fmt: skip

    return apply


def patience_flags(lock_wait: str, retries: int) -> str:
    """`` --lock-wait … --retries …`` as a resume hint repeats them: only where they are not the defaults."""
    out = f" --lock-wait {shlex.quote(lock_wait)}" if lock_wait != LOCK_WAIT else ""
    return out + (f" --retries {retries}" if retries != LOCK_RETRIES else "")


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
        setup_logging(obj.opts["verbose"])
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


pass_ctx = click.make_pass_decorator(Context)
FORMATS = click.Choice(["text", "json", "markdown", "html"])


def format_option(choices: tuple[str, ...] = ("text", "json")) -> Callable[[Any], Any]:
    return click.option(
        "--format", "fmt", type=click.Choice(list(choices)), default="text", show_default=True,
        help="Output format; with json, errors are JSON objects too (message, detail, hint, exit_code).",
    )  # fmt: skip


def tz_option(what: str = "Time zone of the times shown") -> Callable[[Any], Any]:
    return click.option("--tz", help=f"{what}, e.g. America/Guayaquil (default: this machine's).")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def progress_every() -> float:
    """Seconds between progress lines without a terminal ($MIGRATE_DATA_PROGRESS_EVERY, default 5)."""
    try:
        return max(float(os.environ.get("MIGRATE_DATA_PROGRESS_EVERY", "5")), 0.1)
    except ValueError:
        return 5.0


def interactive() -> bool:
    """Whether a person can answer a prompt (stdin is a terminal)."""
    return sys.stdin.isatty()


def confirm(action: str, prompt: str) -> None:
    """Ask on a terminal; without one, refuse (a night's work is never started by a script that forgot --yes).
    A "no" refuses too: exit 2, nothing was done."""
    if not interactive():
        raise BadInput(f"refusing to {action} without confirmation: no terminal", hint="pass --yes")
    if not click.confirm(prompt, default=False, err=True):
        raise RefusedError(f"not confirmed: did not {action}; nothing was done")
