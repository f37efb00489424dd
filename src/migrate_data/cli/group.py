"""The ``migrate-data`` group: built-in commands plus one command per phase file."""

from __future__ import annotations

import contextlib
import difflib
import sys
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..errors import BadInput
from ..settings import find_project
from .base import Context, Duration, as_migration_error, fail, setup_logging, wants_json
from .phase import phase_command


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
            error = as_migration_error(exc, argv)
            if error is None:
                raise
            with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
                fail(error, as_json=wants_json(argv))
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
    setup_logging(verbose)
    ctx.obj = Context(traceback=traceback, verbose=verbose, **opts)
    ctx.call_on_close(ctx.obj.stack.close)
    mappings = ctx.obj.project_dir() / "mappings"
    clash = sorted(p.stem for p in mappings.glob("*.yaml") if p.stem in cli.commands) if mappings.is_dir() else []
    if clash:
        raise BadInput(
            f"{mappings / (clash[0] + '.yaml')}: phase name {clash[0]!r} is a built-in command",
            hint="rename the phase file",
        )
