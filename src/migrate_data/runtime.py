"""What every verb does first: load the project, connect (one pool per database), hold the run lock after the
checks every writing verb makes, record the run; and turn driver errors into psql-shaped MigrationErrors."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from . import ledger, schema
from .db import Executor, fetch_val, open_pool
from .errors import MigrationError, PrivilegeMissing, RefusedError, Stopped, database_error, postgres_error
from .loader import load_phases
from .mapping import Phase, Phases
from .settings import Settings, redact

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _is_driver_error(e: BaseException) -> bool:
    """A driver error, raw or as SQLAlchemy wraps it (the Alembic step runs through SQLAlchemy).  SQLAlchemy is not
    imported for this: when it was never imported, no error of its can be raised."""
    if isinstance(e, asyncpg.PostgresError):
        return True
    exc = sys.modules.get("sqlalchemy.exc")
    return exc is not None and isinstance(e, exc.DBAPIError)


def database_errors(fn: F) -> F:
    """Turn a driver error escaping a verb into a MigrationError shaped like psql's (message, DETAIL, HINT, SQLSTATE;
    never a Python class name).  A missing privilege becomes PrivilegeMissing (exit 2), naming what to grant."""
    verb = {"run_phase": "{}", "plan": "plan {}", "validate": "validate {}", "rollback": "rollback {}"}.get(
        fn.__name__, fn.__name__
    )

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        settings = next((a for a in args if isinstance(a, Settings)), None)
        name = next((a for a in args if isinstance(a, str)), "")
        doing = "migrate-data " + verb.format(name).strip()
        try:
            role = settings.url.user if settings is not None else None
        except MigrationError:
            role = None
        try:
            return await fn(*args, **kwargs)
        except MigrationError as e:
            pg = postgres_error(e.__cause__)
            if pg is not None and pg.sqlstate == "42501" and not isinstance(e, PrivilegeMissing):
                better = database_error(pg, doing=doing, role=role)
                raise PrivilegeMissing(
                    e.message, detail=e.detail or better.message, hint=better.hint, sqlstate="42501"
                ) from e
            raise
        except Exception as e:
            if _is_driver_error(e) and postgres_error(e) is not None:
                raise database_error(e, doing=doing, role=role) from e
            if isinstance(e, (OSError, asyncpg.InterfaceError)) and not _is_driver_error(e):
                raise MigrationError(
                    f"lost the connection to the database during {doing}: {e}",
                    hint="every batch is checkpointed; run the same command again",
                ) from e
            raise

    return wrapper  # type: ignore[return-value]


# -- project and connections ----------------------------------------------------------------------
def project_phases(settings: Settings) -> Phases:
    """Load the project's phase files; a file with an error is in ``.broken`` (MappingError with file:line:column)."""
    return load_phases(settings.mappings_dir)


def get_phase(settings: Settings, name: str) -> tuple[dict[str, Phase], Phase]:
    phases = project_phases(settings)
    phase = phases.require(name)  # the file's own error, or the phases there are; other phases' errors do not block
    if phase.revision:
        schema.check_revision(settings, phase.revision)
    return phases, phase


@asynccontextmanager
async def connect(settings: Settings, *, jobs: int = 2) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool]]:
    """One pool for the target and, when the source is another database, one for the source."""
    size = max(2, jobs + 2)
    st, lt = settings.statement_timeout, settings.lock_timeout
    if settings.same_database:
        async with open_pool(settings.database_url, max_size=size, statement_timeout=st, lock_timeout=lt) as target:
            yield target, target
        return
    async with open_pool(settings.effective_source_url, max_size=size, statement_timeout=st, lock_timeout=lt) as source:
        # the target reads the intervals the source writes as text in the source's own style
        style = await fetch_val(source, "SHOW IntervalStyle")
        async with open_pool(
            settings.database_url, max_size=size, statement_timeout=st, lock_timeout=lt, interval_style=style
        ) as target:
            yield target, source


async def _server_major(db: Executor) -> int:
    return int(await fetch_val(db, "SHOW server_version_num")) // 10000


async def check_schema_agrees(
    settings: Settings, db: Executor, phases: dict[str, Phase], states: dict[str, asyncpg.Record]
) -> None:
    """Refuse when alembic_version is not what the ledger's applied phases imply (Alembic run by hand)."""
    expected: str | None = None
    acceptable: set[str | None] = {None}
    for name, phase in phases.items():
        st = states.get(name)
        if phase.revision and st is not None and st["state"] in APPLIED:
            # a rollback stopped midway may or may not have downgraded its revision yet
            acceptable = {phase.revision, expected} if st["state"] == "rolling_back" else {phase.revision}
            expected = phase.revision
    current = await schema.current_revision(db)
    if current not in acceptable:
        raise RefusedError(
            f"the database's Alembic revision is {current or 'base'} but the ledger says {expected or 'base'}",
            detail="someone changed the schema outside migrate-data (alembic upgrade/downgrade/stamp by hand)",
            hint=f"bring the database back to {expected or 'base'} (`alembic upgrade` or `alembic downgrade "
            f"{expected or 'base'}`), or see `migrate-data status`, then run the command again",
        )


APPLIED = ("applied", "partial", "rolling_back")  # states in which a phase's effects are (partly) in the database


def later_applied(phases: dict[str, Phase], states: dict[str, asyncpg.Record], name: str) -> list[str]:
    order = list(phases)
    return [p for p in order[order.index(name) + 1 :] if states.get(p) is not None and states[p]["state"] in APPLIED]


@asynccontextmanager
async def exclusive(
    settings: Settings, phases: dict[str, Phase], name: str, *, what: str, jobs: int = 2
) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool, ledger.LockSession, dict[str, asyncpg.Record]]]:
    """Connect and hold the database's lock, after the checks every writing verb makes: no later phase is applied,
    and Alembic's revision is what the ledger says.  Yields the pools, the lock's session and the phase states;
    every batch that writes calls ``lock.check(conn)`` in its transaction before it commits."""
    async with connect(settings, jobs=jobs) as (target, source):
        await ledger.ensure(target)
        async with ledger.exclusive(target, url=settings.database_url, what=what) as lock:
            await ledger.close_abandoned_runs(target)
            states = await ledger.phase_states(target)
            later = later_applied(phases, states, name)
            if later:
                raise RefusedError(
                    f"{', '.join(later)} is applied after {name}",
                    hint=f"roll back {later[-1]} first (`migrate-data rollback {later[-1]}`)",
                )
            broken = [p for p in getattr(phases, "broken", {}) if (states.get(p) or {}).get("state") in APPLIED]
            if broken:  # its place in the order is unknown: it may depend on what this would change
                raise RefusedError(
                    f"{', '.join(broken)} is applied, and its phase file has an error; not changing {name}",
                    detail=phases.broken[broken[0]].message,  # type: ignore[attr-defined]
                    hint="fix the phase file first (`migrate-data status` lists the phases that do not load)",
                )
            await check_schema_agrees(settings, target, phases, states)
            yield target, source, lock, states


@asynccontextmanager
async def recorded(target: asyncpg.Pool, lock: ledger.LockSession, *, kind: str, phase: str) -> AsyncIterator[int]:
    """A run in the ledger: started here, marked stopped or failed when the block raises."""
    run_id = await ledger.start_run(lock, kind=kind, phase=phase)
    try:
        yield run_id
    except Stopped as e:
        await ledger.update_run(target, run_id, status="stopped", error=str(e))
        raise
    except BaseException as e:
        error = redact(str(e)) or type(e).__name__
        await asyncio.shield(ledger.update_run(target, run_id, status="failed", error=error))
        raise
