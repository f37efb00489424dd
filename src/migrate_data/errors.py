"""One error root for everything the tool reports to a DBA.

Each class maps to one exit code, decided in the ``cli`` package.  ``detail`` and ``hint``
are printed like psql prints them.
"""

from __future__ import annotations

import re
from typing import Any


class MigrationError(Exception):
    """Something went wrong; the message says what, ``detail`` why, ``hint`` what to do."""

    exit_code = 1

    def __init__(
        self, message: str, *, detail: str | None = None, hint: str | None = None, sqlstate: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        self.sqlstate = sqlstate

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """The error as ``--format json`` prints it."""
        return {
            "error": True,
            "message": self.message,
            "detail": self.detail,
            "hint": self.hint,
            "sqlstate": self.sqlstate,
            "exit_code": self.exit_code,
        }


class BadInput(MigrationError):
    """The user's input (flags, YAML, project layout, state preconditions) is wrong; nothing was touched."""

    exit_code = 2


class MappingError(BadInput):
    """A mapping file is invalid; the message names file, line, column and path."""


class PreflightError(BadInput):
    """A compiled phase does not fit the live catalogs."""


class RefusedError(BadInput):
    """The tool refuses an operation in the current state (a later phase applied, ledger disagrees, ...)."""


class LockHeld(RefusedError):
    """Another migrate-data run holds the database's advisory lock: refused, nothing was done."""


class LockLost(MigrationError):
    """The run's advisory lock was lost (its session ended); it stopped at its last checkpoint and the same command
    resumes."""


class DatabaseError(MigrationError):
    """The server refused a statement; message, detail and hint are the server's, ``sqlstate`` its code."""


class PrivilegeMissing(DatabaseError):
    """The role lacks a privilege the command needs: refused before anything was written (exit 2)."""

    exit_code = 2


class ValidationFailed(MigrationError):
    """Rows were copied but the validation found differences."""

    exit_code = 3


class Stopped(MigrationError):
    """Stopped cleanly at a checkpoint (signal or --until); the same command resumes."""

    exit_code = 130


# -- driver errors -> MigrationError ------------------------------------------------------------------------------
def postgres_error(e: BaseException | None) -> Any:
    """The server's error (an asyncpg ``PostgresError``) behind ``e``: ``e`` itself, or what SQLAlchemy or our own
    wrappers put around it; None when there is none."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(getattr(e, "sqlstate", None), str) and hasattr(e, "server_source_function"):
            return e
        e = getattr(e, "orig", None) or e.__cause__ or e.__context__
    return None


_DENIED_TABLE = re.compile(r"permission denied for (?:table|relation|sequence|view) (\S+)")
_DENIED_ON = re.compile(r"permission denied for (schema|database|function) (\S+)")
_OWNER = re.compile(r"must be owner of (?:table|relation|index|sequence|schema|database|view) (\S+)")
_SETTING = re.compile(r'permission denied to set parameter "([^"]+)"')


def _verb_on(query: str, table: str) -> str:
    """The privilege a statement needs on ``table``: INSERT/UPDATE/DELETE when it writes that table, else SELECT."""
    q = " ".join(query.split()).upper()
    name = re.escape(table.upper().split(".")[-1])
    for verb, pattern in (
        ("INSERT", rf"INSERT INTO (?:\S+\.)?\"?{name}\b"),
        ("UPDATE", rf"UPDATE (?:\S+\.)?\"?{name}\b"),
        ("DELETE", rf"DELETE FROM (?:\S+\.)?\"?{name}\b"),
        ("TRUNCATE", rf"TRUNCATE (?:TABLE )?(?:\S+\.)?\"?{name}\b"),
    ):
        if re.search(pattern, q):
            return verb
    if re.match(r"COPY \S+ FROM", q):
        return "INSERT"
    return "SELECT"


def privilege_hint(message: str, query: str, *, role: str | None, doing: str | None) -> str:
    """What to grant, named: the privilege, the object and the role, as a GRANT a DBA can run."""
    who = role or "this role"
    grantee = role or "<role>"
    context = f" ({doing})" if doing else ""
    if m := _DENIED_TABLE.search(message):
        table = m.group(1)
        verb = _verb_on(query, table)
        return (
            f"{who} needs {verb} on {table}{context}: GRANT {verb} ON {table} TO {grantee}; "
            "or run as a role that owns the migration's tables"
        )
    if m := _DENIED_ON.search(message):
        kind, name = m.groups()
        priv = {"database": "CREATE", "schema": "USAGE (CREATE to create tables)", "function": "EXECUTE"}[kind]
        grant = {"database": "CREATE", "schema": "USAGE, CREATE", "function": "EXECUTE"}[kind]
        why = (
            " (migrate-data creates its ledger, the schema migrate_data, on its first write)"
            if kind == "database"
            else ""
        )
        return f"{who} needs {priv} on {kind} {name}{context}{why}: GRANT {grant} ON {kind.upper()} {name} TO {grantee}"
    if m := _OWNER.search(message):
        return (
            f"the schema step (DDL) on {m.group(1)} needs its owner{context}: run as the owner of {m.group(1)} "
            f"(or GRANT <owner> TO {grantee}); `migrate-data plan PHASE --sql` prints the DDL without a database"
        )
    if m := _SETTING.search(message):
        return f"setting {m.group(1)} needs a superuser{context}: run as a superuser (ALTER ROLE {grantee} SUPERUSER)"
    return f"{who} lacks a privilege{context}; run as the owner of the migration's tables"


def database_error(e: BaseException, *, doing: str | None = None, role: str | None = None) -> MigrationError:
    """A server error as a DBA reads it (psql's ERROR / DETAIL / HINT, never a Python class name).

    A missing privilege (SQLSTATE 42501) becomes PrivilegeMissing (exit 2) with a hint that names the privilege,
    the object and the role; anything else a DatabaseError (exit 1)."""
    pg = postgres_error(e)
    if pg is None:
        return MigrationError(str(e) or "unexpected database error", hint="run again with --traceback to see where")
    message = getattr(pg, "message", None) or str(pg)
    detail = getattr(pg, "detail", None)
    hint = getattr(pg, "hint", None)
    if pg.sqlstate == "42501":
        return PrivilegeMissing(
            message,
            detail=detail,
            hint=hint or privilege_hint(message, getattr(pg, "query", None) or "", role=role, doing=doing),
            sqlstate=pg.sqlstate,
        )
    return DatabaseError(message, detail=detail, hint=hint, sqlstate=pg.sqlstate)
