"""The ``migrate-data`` command: parse, call ``api``, print.  The only place that decides exit codes.

Exit codes: 0 done (and valid), 1 failed (resumable), 2 bad input or refused (flags, YAML, a held lock, a declined
prompt, a missing privilege: nothing was done), 3 copied but validation found differences, 130 stopped cleanly at a
checkpoint (a signal or ``--until``; the same command resumes).
"""

from __future__ import annotations

from . import commands, live, status, tools  # noqa: F401  (each registers its commands on the group)
from .base import with_global_options
from .group import cli

BUILTINS = frozenset(cli.commands)
for _command in list(cli.commands.values()):
    with_global_options(_command)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="migrate-data")
