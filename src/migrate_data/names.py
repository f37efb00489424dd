"""Unqualified table names: which table the search_path picked, and which tables of other schemas share its name.

A mapping that names ``customers`` gets the first ``customers`` of the session's ``search_path``; a DBA with another
``search_path`` (a role's setting, ``options=-csearch_path=…`` in the URL) would get another table.  The pre-flight
says so whenever another schema has a table of the same name.
"""

from __future__ import annotations

from .catalog import Table
from .db import Executor, fetch_all, fetch_val
from .mapping import QualifiedName

NAMESAKES_SQL = """SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = $1 AND n.nspname <> $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition
  AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' ORDER BY 1"""


async def namesakes_warning(db: Executor, written: QualifiedName, resolved: Table, what: str) -> str | None:
    """A warning when ``written`` has no schema and other schemas have a table of its name (None otherwise)."""
    if written.schema is not None:
        return None
    others = [r[0] for r in await fetch_all(db, NAMESAKES_SQL, resolved.name, resolved.schema)]
    if not others:
        return None
    path = await fetch_val(db, "SHOW search_path")
    return (
        f"{what} {written} is {resolved.qualified} through the search_path ({path}), and {', '.join(others)} "
        f"{'has' if len(others) == 1 else 'have'} the same name: write {resolved.qualified} in the mapping, so that "
        "another search_path cannot pick another table"
    )
