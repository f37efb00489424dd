"""Objects that depend on the tables a phase reads or drops, and what a drop does with them.

A view, a materialized view, a function whose body PostgreSQL parsed (``BEGIN ATOMIC``), a foreign key of another
table, or a rule or policy of another table that names the table depends on it (``pg_depend``; a view through its
``_RETURN`` rule in ``pg_rewrite``): ``DROP TABLE`` refuses without CASCADE, and CASCADE drops them.  Its triggers,
policies and rules, and its membership of publications, go with it silently.  Functions whose body is only text
(plpgsql, plain SQL) and publications ``FOR ALL TABLES`` / ``FOR TABLES IN SCHEMA`` are not tied to it at all: they
outlive it and *may* break.  ``find`` reads all of them from the catalogs; the rest of the module is pure:
``blocking`` says which of them stop a drop under the phase's ``dependents:`` decision, ``replay_order`` the order
to recreate them in.  ``before_drop`` (in the transaction that drops the tables) saves their definitions to a
private file and drops exactly those that would block the drop, deepest first and never with CASCADE; ``replay``
recreates them after a rollback has restored the tables (their own triggers, policies and rules come back with the
tables' backup).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg

from . import files, ledger
from .db import Executor
from .dependents_sql import EXISTS_SQL, MAY_REFERENCE_SQL, PUBLISHES_SQL, WALK_SQL
from .errors import MigrationError, RefusedError
from .mapping import Phase, QualifiedName
from .preflight import Finding
from .sql import qname

log = logging.getLogger(__name__)

# What a drop of the table does to the object (``Dependent.effect``):
WITH_TABLE = "dropped with the table"  # its own trigger, policy, rule: in the table's backup
CASCADE = "dropped by CASCADE"  # another object tied to it: its definition is saved and replayed by rollback
UNSAVED = "dropped by CASCADE, definition not saved"  # e.g. a column of another table of its row type
MAY_REFERENCE = "may reference"  # a function whose body names it: kept, may fail once the table is gone
PUBLISHES = "publishes it"  # FOR ALL TABLES / FOR TABLES IN SCHEMA: kept, stops carrying it
KEPT = (MAY_REFERENCE, PUBLISHES)
DECISIONS = ("refuse", "keep", "drop")


@dataclass(frozen=True)
class Dependent:
    """One object that depends on (or may reference) a table."""

    table: str  # the table it depends on
    kind: str  # view, materialized view, function, trigger, policy, rule, table constraint, publication relation, ...
    name: str  # its identity, e.g. ``public.v``, ``tr on public.t``, ``public.f(integer)``
    effect: str  # WITH_TABLE | CASCADE | UNSAVED | MAY_REFERENCE | PUBLISHES
    create: str | None = None  # the SQL that recreates it
    drop: str | None = None  # the SQL that drops it on its own (never CASCADE)
    address: tuple[str, tuple[str, ...], tuple[str, ...]] | None = None  # pg_get_object_address's arguments
    depth: int = 1  # its longest chain of dependencies from the table: recreate in this order

    def line(self) -> str:
        return f"{self.table}: {self.kind} {self.name} ({self.effect})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Dependent:
        addr = d.get("address")
        return cls(**{**d, "address": (addr[0], tuple(addr[1]), tuple(addr[2])) if addr else None})


# -- pure ---------------------------------------------------------------------------------------------------------
IDENT_CHAR = r"[A-Za-z0-9_$]"


def mentions(source: str, table: str) -> bool:
    """Whether a function body names ``table`` as a word (not as part of another name), in any case."""
    return re.search(rf"(?<!{IDENT_CHAR}){re.escape(table)}(?!{IDENT_CHAR})", source, re.IGNORECASE) is not None


def kind_of(kind: str) -> str:
    """The catalog's object type, as a DBA names it."""
    return {"table constraint": "foreign key or constraint", "publication relation": "publication"}.get(kind, kind)


def blocking(deps: Iterable[Dependent], decision: dict[str, str], *, force: bool = False) -> list[Dependent]:
    """The dependents that stop a drop: every one under ``refuse`` (the default), those the drop would destroy under
    ``keep``, and under ``drop`` (or ``force``) those whose definition cannot be saved."""
    out = []
    for d in deps:
        how = "drop" if force else decision.get(d.table, "refuse")
        if how == "refuse" or (how == "keep" and d.effect not in KEPT) or (how == "drop" and d.effect == UNSAVED):
            out.append(d)
    return out


def refusal(phase: Phase, blocked: list[Dependent]) -> RefusedError:
    unsaved = [d for d in blocked if d.effect == UNSAVED]
    if unsaved:
        hint = "change or drop these objects yourself first (their definitions cannot be saved and replayed)"
    else:
        hint = (
            f"decide in {phase.path.name}: `dependents: drop` (their definitions are saved to a private file and "
            "`rollback` restores them) or `dependents: keep` (only objects that outlive the tables); or pass --force"
        )
    return RefusedError(
        f"{phase.name} would drop or break {len(blocked)} object{'s' if len(blocked) != 1 else ''} that depend on the "
        f"tables it drops; nothing was done",
        detail="\n".join(d.line() for d in blocked),
        hint=hint,
    )


def replay_order(deps: Iterable[Dependent]) -> list[Dependent]:
    """The dependents a rollback recreates (not the tables' own: their backup has them), each after what it needs:
    by depth, functions before views before the rest."""
    rank = {"function": 0, "procedure": 0, "view": 1, "materialized view": 1}
    todo = [d for d in deps if d.effect == CASCADE or (d.effect == WITH_TABLE and d.kind == "publication relation")]
    return sorted(todo, key=lambda d: (d.depth, rank.get(d.kind, 2), d.name))


def drop_order(deps: Iterable[Dependent]) -> list[Dependent]:
    """The dependents to drop before the tables (those that would make DROP TABLE refuse), deepest first."""
    return list(reversed(replay_order(d for d in deps if d.effect == CASCADE and d.drop)))


def findings(deps: Iterable[Dependent], phase: Phase, *, reads: set[str], force: bool = False) -> list[Finding]:
    """What ``plan`` says about the dependents: of a table the phase reads, for information; of a table it drops,
    an error when the phase would refuse, a warning saying what the drop does otherwise."""
    deps = list(deps)
    blocked = {id(d) for d in blocking(deps, decision(phase), force=force)}
    out = []
    for d in deps:
        what = f"{kind_of(d.kind)} {d.name} depends on it ({d.effect})"
        if d.table in reads:
            out.append(Finding("info", d.table, f"{what}; the phase reads it"))
        elif id(d) in blocked:
            out.append(Finding("error", d.table, f"{what}; the phase drops it: decide with `dependents:` or --force"))
        else:
            out.append(Finding("warning", d.table, f"{what}; the phase drops it: {_fate(d)}"))
    return out


def _fate(d: Dependent) -> str:
    if d.effect in KEPT:
        return "kept as it is"
    if d.effect == WITH_TABLE:
        return "its definition is saved; rollback restores it"
    return "dropped first, its definition saved; rollback recreates it"


def decision(phase: Phase) -> dict[str, str]:
    """The phase's ``dependents:`` decision per dropped table (unlisted: refuse)."""
    return dict(phase.dependents)


def saved_findings(deps: list[Dependent], path: str | None) -> list[Finding]:
    """What a run that dropped tables says about their dependents: where their definitions are."""
    if not path:
        return []
    again = len(replay_order(deps)) + sum(d.effect == WITH_TABLE and d.kind != "publication relation" for d in deps)
    return [
        Finding(
            "info",
            None,
            f"the definitions of {len(deps)} objects that depended on the dropped tables are saved in {path}; "
            f"`rollback` restores {again} of them (the others were kept)",
            count=len(deps),
        )
    ]


def state(deps: list[Dependent]) -> dict[str, Any]:
    """What the ledger keeps for the rollback (in the phase's ``pre_state``): the definitions it replays."""
    return {"dependents": [d.to_dict() for d in replay_order(deps)]} if deps else {}


def definitions_text(phase: str, deps: list[Dependent]) -> str:
    """The saved file: JSON, one entry per dependent with its definition."""
    return json.dumps({"phase": phase, "dependents": [d.to_dict() for d in deps]}, indent=2, ensure_ascii=False) + "\n"


# -- catalogs -----------------------------------------------------------------------------------------------------
async def find(db: Executor, tables: Iterable[QualifiedName]) -> list[Dependent]:
    """Every object that depends on, or may reference, the tables that exist of ``tables``.  The definitions are
    read with ``search_path`` set to pg_catalog only, so every name in them is schema-qualified."""
    given = {qname(t): str(t) for t in tables}
    if not given:
        return []
    async with _connection(db) as conn, conn.transaction():
        rows = await conn.fetch("SELECT t, to_regclass(t)::oid AS r FROM unnest($1::text[]) t", list(given))
        old = await conn.fetchval("SELECT current_setting('search_path')")
        await conn.execute("SELECT set_config('search_path', 'pg_catalog', true)")
        found = await _find(conn, {r["r"]: given[r["t"]] for r in rows if r["r"] is not None})
        await conn.execute("SELECT set_config('search_path', $1, true)", old)  # the caller's transaction goes on
        return found


@asynccontextmanager
async def _connection(db: Executor) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db  # type: ignore[misc]


async def _find(conn: asyncpg.Connection, oids: dict[int, str]) -> list[Dependent]:
    if not oids:
        return []
    present = list(oids)
    named = {
        r["r"]: oids[r["o"]]
        for r in await conn.fetch("SELECT o, o::regclass::text AS r FROM unnest($1::oid[]) o", list(oids))
    }
    out: list[Dependent] = []
    for r in await conn.fetch(WALK_SQL, present):
        effect = WITH_TABLE if r["attached"] else CASCADE if r["create_sql"] else UNSAVED
        out.append(
            Dependent(
                table=named.get(r["root"], r["root"]),
                kind=r["type"],
                name=r["identity"],
                effect=effect,
                create=r["create_sql"],
                drop=None if r["attached"] else r["drop_sql"],
                address=(r["addr_type"], tuple(r["object_names"]), tuple(r["object_args"])),
                depth=r["depth"],
            )
        )
    certain = {d.name for d in out}
    own = {p: p.rpartition(".")[2].strip('"') for p in named}
    for r in await conn.fetch(MAY_REFERENCE_SQL, sorted(set(own.values()))):
        if r["identity"] in certain or not mentions(r["prosrc"], r["name"]):
            continue
        for table in (p for p, n in own.items() if n == r["name"]):
            addr = (r["addr_type"], tuple(r["object_names"]), tuple(r["object_args"]))
            kind = f"{r['lanname']} function"
            out.append(Dependent(named[table], kind, r["identity"], MAY_REFERENCE, r["create_sql"], None, addr))
    for r in await conn.fetch(PUBLISHES_SQL, present):
        out.append(Dependent(named.get(r["root"], r["root"]), "publication", f"{r['pubname']} ({r['how']})", PUBLISHES))
    return out


async def for_plan(target: Executor, source: Executor, phase: Phase) -> tuple[list[Dependent], list[Finding]]:
    """The dependents of the tables ``phase`` reads (in the source) and drops (in the target), and what plan says."""
    reads: list[QualifiedName] = []
    for tm in phase.tables:
        reads += [tm.source, *(c.lookup.table for c in tm.columns if c.lookup is not None)]
    read = await find(source, list(dict.fromkeys(reads)))
    dropped = await find(target, phase.backup)
    deps = read + [d for d in dropped if d.table not in {r.table for r in read}]
    return deps, findings(deps, phase, reads={str(t) for t in reads})


async def check(db: Executor, phase: Phase, *, force: bool = False) -> list[Dependent]:
    """Refuse, before anything is written, when the tables ``phase`` drops have dependents it has no decision for."""
    deps = await find(db, phase.backup)
    blocked = blocking(deps, decision(phase), force=force)
    if blocked:
        raise refusal(phase, blocked)
    return deps


async def before_drop(
    conn: asyncpg.Connection, phase: Phase, directory: Path, *, force: bool
) -> tuple[list[Dependent], str | None]:
    """In the transaction that drops the phase's tables, after writes to them are blocked: check again, save the
    definitions of every dependent to a new 0600 file in ``directory`` (0700), return them and the file's path.
    Nothing is dropped here (``drop_dependents``, later in the same transaction)."""
    deps = await check(conn, phase, force=force)
    if not deps:
        return [], None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = files.private_dir(directory) / f"{phase.name}-dependents-{stamp}.json"
    files.write_private(path, definitions_text(phase.name, deps))
    log.warning("%d objects depend on the tables %s drops; their definitions are in %s", len(deps), phase.name, path)
    return deps, str(path)


async def drop_dependents(conn: asyncpg.Connection, deps: list[Dependent]) -> None:
    """Drop the dependents that would make ``DROP TABLE`` refuse, deepest first, each on its own (no CASCADE)."""
    for d in drop_order(deps):
        log.info("dropping %s %s before the tables it depends on", d.kind, d.name)
        assert d.drop is not None
        await conn.execute(d.drop)


def dropped_first(phase: Phase) -> Callable[[asyncpg.Connection], Awaitable[None]] | None:
    """For a transaction that is rolled back (plan, pre-flight): drop what a drop of the phase's tables would refuse
    over, so that the revision's DDL can be tried; None when the phase drops nothing."""
    if not phase.backup:
        return None

    async def hook(conn: asyncpg.Connection) -> None:
        await drop_dependents(conn, await find(conn, phase.backup))

    return hook


async def _exists(conn: asyncpg.Connection, d: Dependent) -> bool:
    assert d.address is not None
    try:
        async with conn.transaction():  # a savepoint: a missing object is an error
            await conn.fetchval(EXISTS_SQL, *d.address)
        return True
    except asyncpg.UndefinedObjectError:
        return False
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError, asyncpg.InvalidSchemaNameError):
        return False


async def replay(target: asyncpg.Pool, lock: ledger.LockSession, saved: list[dict[str, Any]] | None) -> list[str]:
    """Recreate the saved dependents that are missing (idempotent: run again, it recreates nothing twice), in one
    transaction under the lock; return what it recreated."""
    deps = replay_order(Dependent.from_dict(d) for d in saved or [])
    if not deps:
        return []
    done = []
    async with ledger.committed_under(target, lock) as conn:
        for d in deps:
            if await _exists(conn, d):
                continue
            assert d.create is not None
            try:
                async with conn.transaction():
                    await conn.execute(d.create)
            except asyncpg.PostgresError as e:
                raise MigrationError(
                    f"cannot recreate {d.kind} {d.name}, which depended on {d.table}: {e}",
                    detail=d.create,
                    hint="fix what it needs and run the rollback again (it resumes here), or recreate it by hand",
                ) from e
            done.append(f"{d.kind} {d.name}")
    log.info("recreated %d objects that depended on the restored tables", len(done))
    return done
