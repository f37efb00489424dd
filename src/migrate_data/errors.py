"""One error root for everything the tool reports to a DBA.

Each class maps to one exit code, decided in ``cli.py``.  ``detail`` and ``hint``
are printed like psql prints them.
"""

from __future__ import annotations


class MigrationError(Exception):
    """Something went wrong; the message says what, ``detail`` why, ``hint`` what to do."""

    exit_code = 1

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class BadInput(MigrationError):
    """The user's input (flags, YAML, project layout, state preconditions) is wrong; nothing was touched."""

    exit_code = 2


class MappingError(BadInput):
    """A mapping file is invalid; the message names file, line and path."""


class PreflightError(BadInput):
    """A compiled phase does not fit the live catalogs."""


class RefusedError(BadInput):
    """The tool refuses an operation in the current state (a later phase applied, ledger disagrees, ...)."""


class LockHeld(MigrationError):
    """Another migrate-data run holds the database's advisory lock."""


class LockLost(MigrationError):
    """The run's advisory lock was lost (its session ended); it stopped at its last checkpoint and the same command
    resumes."""


class ValidationFailed(MigrationError):
    """Rows were copied but the validation found differences."""

    exit_code = 3


class Stopped(MigrationError):
    """Stopped cleanly at a checkpoint (signal or --until); the same command resumes."""

    exit_code = 130
