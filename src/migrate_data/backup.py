"""pg_dump before a phase writes; pg_restore when rolling back a phase that dropped tables."""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import glob
import logging
import os
import re
import shutil
from pathlib import Path
from typing import IO, Any

import asyncpg

from . import files, partitions
from .db import Executor, fetch_val, open_pool
from .embedded import bundled_bin_dir
from .errors import MigrationError, RefusedError
from .mapping import Phase, QualifiedName
from .settings import APPLICATION_NAME, DatabaseURL, Settings, redact_text
from .sql import qname

log = logging.getLogger(__name__)


def _candidates(tool: str) -> list[str]:
    found = [shutil.which(tool) or ""]
    found += sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    bundled = bundled_bin_dir()
    if bundled is not None:
        found.append(str(bundled / tool))
    return [f for f in dict.fromkeys(found) if f and os.access(f, os.X_OK)]


async def _major(path: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        path, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    m = re.search(rb"(\d+)(?:\.\d+)?", out)
    return int(m.group(1)) if m else 0


async def find_tool(tool: str, server_major: int) -> str:
    """The ``pg_dump``/``pg_restore`` with the lowest major version that is at least the server's."""
    versions = [(await _major(c), c) for c in _candidates(tool)]
    fit = sorted(v for v in versions if v[0] >= server_major)
    if not fit:
        have = ", ".join(f"{p} ({m})" for m, p in versions) or "none"
        raise MigrationError(
            f"no {tool} of major version {server_major} or newer",
            detail=f"found: {have}",
            hint=f"install postgresql-client-{server_major}, or pass --no-backup for a rehearsal",
        )
    return fit[0][1]


def _libpq(url: str | DatabaseURL) -> tuple[str, dict[str, str]]:
    """The URL without its password, and an environment that carries the password (decoded) instead."""
    dsn, secret = DatabaseURL.parse(url).libpq()
    return dsn, {**os.environ, "PGAPPNAME": APPLICATION_NAME, **secret}


async def _run(args: list[str], url: str, env: dict[str, str], *, stdout: IO[Any] | None = None) -> str:
    """Run a client tool; its output is returned, or written to ``stdout`` when given (a file of ours).

    When we are cancelled, the tool is killed: it never goes on writing a file nobody will finish."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=stdout if stdout is not None else asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        raise MigrationError(
            f"{Path(args[0]).name} failed (exit {proc.returncode})",
            detail=redact_text((err or b"").decode(errors="replace").strip(), url),
        )
    return (out or b"").decode(errors="replace")


# What the dump will need at most: the tables' heap and TOAST, uncompressed (pg_dump writes no index data, and
# -Fc compresses), so a conservative estimate.
# A partitioned table's rows are in its partitions (pg_partition_tree: itself and every partition below it).
SIZE_SQL = """SELECT coalesce(sum(pg_table_size(r)), 0)::bigint FROM unnest($1::text[]) AS t
CROSS JOIN LATERAL (SELECT relid FROM pg_partition_tree(to_regclass(t)) UNION SELECT to_regclass(t)) AS x(r)"""


async def estimate_bytes(db: Executor, tables: list[QualifiedName]) -> int:
    """The size on disk of ``tables`` (without indexes): what their dump can take at most."""
    return int(await fetch_val(db, SIZE_SQL, [qname(t) for t in tables]))


def check_space(directory: Path, need: int) -> None:
    """Refuse, before anything is written, when ``directory``'s file system has less than ``need`` bytes free."""
    free = files.free_bytes(directory)
    if free < need:
        raise RefusedError(
            f"not enough disk space for the backup in {directory}",
            detail=(
                f"the tables take {files.human_bytes(need)} ({need:,} bytes) without indexes; "
                f"{files.human_bytes(free)} ({free:,} bytes) are free"
            ),
            hint=(
                f"free at least {files.human_bytes(need - free)} there, or point MIGRATE_DATA_OUTPUT_DIR at a "
                "larger disk (backups go to its backups/)"
            ),
        )


def _partial_pattern(path: Path) -> re.Pattern[str]:
    """``<phase>-<UTC stamp>.partial`` for the phase (or prefix) of ``path``: the partial files of earlier runs."""
    prefix = path.stem.rsplit("-", 1)[0]
    return re.compile(rf"{re.escape(prefix)}-[0-9]{{8}}T[0-9]+Z\.partial")


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove the ``.partial`` dumps an earlier, killed run left beside ``path``; return them.

    A dump being written holds an exclusive ``flock`` on its file (so does a pg_dump that outlived a killed
    migrate-data): such a file is left alone."""
    pattern = _partial_pattern(path)
    removed = []
    for p in sorted(path.parent.iterdir()):
        if not pattern.fullmatch(p.name) or p.is_symlink() or not p.is_file():
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s is being written by another process; left alone", p)
            os.close(fd)
            continue
        try:
            p.unlink(missing_ok=True)
        finally:
            os.close(fd)
        log.warning("removed %s, the unfinished backup of a run that was killed", p)
        removed.append(p)
    return removed


async def dump(
    url: str,
    tables: list[QualifiedName],
    path: Path,
    *,
    server_major: int,
    snapshot: str | None = None,
    need_bytes: int | None = None,
) -> Path:
    """``pg_dump -Fc`` of ``tables`` into the new file ``path``, then check with ``pg_restore --list`` that each is
    there.  A partitioned table is dumped with every partition below it, each named with ``-t`` (pg_dump before 16
    has no ``--table-and-children``, and ``-t parent`` alone dumps no rows), and its data is checked leaf by leaf.

    The dump is written to ``<path stem>.partial`` (mode 0600, in a 0700 directory) and takes the name ``path``
    only once verified; a failed or cancelled dump removes it, and the ``.partial`` of a killed run is removed by
    the next one.  An existing ``path`` is never overwritten.  With ``need_bytes``, refuses first when the disk
    has less free space than that."""
    pg_dump = await find_tool("pg_dump", server_major)
    dsn, env = _libpq(url)
    files.private_dir(path.parent)
    remove_stale_partials(path)
    if os.path.lexists(path):
        raise MigrationError(f"backup {path} already exists; not overwriting it", hint="run again for a new name")
    if need_bytes is not None:
        check_space(path.parent, need_bytes)
    partial = path.with_suffix(".partial")
    args = [pg_dump, "-Fc", "--no-owner", "--dbname", dsn]  # writes to stdout: our 0600 file
    if snapshot:  # an exported snapshot: the dump sees exactly what that transaction sees
        args += ["--snapshot", snapshot]
    try:
        async with open_pool(url, max_size=1) as db:
            members = await partitions.leaf_members(db, tables)
    except MigrationError as e:  # then pg_dump cannot connect either; and a partitioned table fails the check below
        log.warning("could not look for partitions of the tables to dump: %s", e)
        members = {}
    data: list[tuple[str, QualifiedName]] = []  # (what the error names, the table whose TABLE DATA must be there)
    for t in tables:
        args += ["-t", qname(t)]
        for member, leaf in members.get(str(t), []):
            args += ["-t", qname(member)]
            if leaf:
                data.append((f"{t} (partition {member})", member))
        if str(t) not in members:
            data.append((str(t), t))
    log.info("backup of %d tables (%d with data) into %s", len(tables), len(data), path)
    with files.open_private(partial, "wb") as out:
        try:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # "being written": see remove_stale_partials
            await _run(args, url, env, stdout=out)
            os.fsync(out.fileno())
            listing = await _run([str(Path(pg_dump).with_name("pg_restore")), "--list", str(partial)], url, env)
            missing = [what for what, t in data if not re.search(_data_line(t), listing)]
            if missing:
                raise MigrationError(f"backup {path} does not contain the data of {', '.join(missing)}")
            files.move_no_replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return path


def _data_line(t: QualifiedName) -> str:
    """The pattern of a table's TABLE DATA entry in ``pg_restore --list`` (``… TABLE DATA public t owner``)."""
    schema = re.escape(t.schema) if t.schema else r"\S+"
    return rf"TABLE DATA {schema} {re.escape(t.name)} "


async def restore_all(
    url: str, path: Path, *, server_major: int, keep_owner: bool = False, leave_out: str | None = None
) -> None:
    """Restore a whole dump (structure and rows) in one transaction; ``keep_owner`` gives the objects back to the
    roles that owned them (the same server), else they belong to the restoring role (a staging copy).  ``leave_out``:
    a regular expression of the table-of-contents lines not to restore (another database has no use for our change
    capture triggers, and no function for them)."""
    pg_restore = await find_tool("pg_restore", server_major)
    dsn, env = _libpq(url)
    owner = [] if keep_owner else ["--no-owner"]
    only: list[str] = []
    list_file = path.with_name(f"{path.name}.{os.getpid()}.restore-list")
    if leave_out:
        listing = await _run([pg_restore, "--list", str(path)], url, env)
        keep = [line for line in listing.splitlines() if not re.search(leave_out, line)]
        list_file.unlink(missing_ok=True)
        files.write_private(list_file, "\n".join(keep) + "\n")
        only = ["-L", str(list_file)]
    try:
        args = [pg_restore, *owner, *only, "--single-transaction", "--exit-on-error", "--dbname", dsn, str(path)]
        await _run(args, url, env)
    finally:
        list_file.unlink(missing_ok=True)


# -- a phase's backup ----------------------------------------------------------------------------------------------
def backed_up_tables(phase: Phase) -> list[QualifiedName]:
    """The tables a phase's backup holds, when they exist: what it reads, what it writes, what it drops."""
    out: list[QualifiedName] = []
    for t in [*(tm.source for tm in phase.tables), *(tm.target for tm in phase.tables), *phase.backup]:
        if t not in out:
            out.append(t)
    return out


async def take_backup(settings: Settings, phase: Phase, target: asyncpg.Pool, *, snapshot: str | None = None) -> str:
    """pg_dump the phase's tables that exist into a new file under backups/ ("" when none exists)."""
    tables = [
        t for t in backed_up_tables(phase) if await fetch_val(target, "SELECT to_regclass($1) IS NOT NULL", qname(t))
    ]
    if not settings.same_database and phase.tables:
        log.info("source tables live in another database; backing up the target tables only")
    if not tables:
        return ""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = settings.backups_dir / f"{phase.name}-{stamp}.dump"
    major = int(await fetch_val(target, "SHOW server_version_num")) // 10000
    need = await estimate_bytes(target, tables)  # refused before pg_dump starts when the disk is short
    return str(await dump(settings.database_url, tables, path, server_major=major, snapshot=snapshot, need_bytes=need))


def pg_dump_line(phase: Phase, *, snapshot: bool = False) -> str:
    """The pg_dump a phase's backup runs, as ``plan`` shows it."""
    tables = " ".join(f"-t {qname(t)}" for t in backed_up_tables(phase))
    return f"pg_dump -Fc{' --snapshot=<the transaction’s>' if snapshot else ''} {tables} -f backups/{phase.name}-<UTC>.dump"
