"""pg_dump before a phase writes; pg_restore when rolling back a phase that dropped tables."""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .embedded import bundled_bin_dir
from .errors import MigrationError
from .mapping import QualifiedName
from .settings import APPLICATION_NAME, asyncpg_dsn, redact_text
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


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its password, and an environment that carries the password instead."""
    url = asyncpg_dsn(url)
    parts = urlsplit(url)
    env = dict(os.environ, PGAPPNAME=APPLICATION_NAME)
    if parts.password is not None:
        env["PGPASSWORD"] = parts.password
        user, host = parts.netloc.rsplit("@", 1)
        parts = parts._replace(netloc=user.split(":", 1)[0] + "@" + host)
    return urlunsplit(parts), env


async def _run(args: list[str], url: str, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise MigrationError(
            f"{Path(args[0]).name} failed (exit {proc.returncode})",
            detail=redact_text(err.decode(errors="replace").strip(), url),
        )
    return out.decode(errors="replace")


async def dump(url: str, tables: list[QualifiedName], path: Path, *, server_major: int) -> Path:
    """``pg_dump -Fc`` of ``tables`` into ``path``, then check with ``pg_restore --list`` that each is there."""
    pg_dump = await find_tool("pg_dump", server_major)
    dsn, env = _libpq(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    args = [pg_dump, "-Fc", "--no-owner", "-f", str(partial), "--dbname", dsn]
    for t in tables:
        args += ["-t", qname(t)]
    log.info("backup of %d tables into %s", len(tables), path)
    await _run(args, url, env)
    listing = await _run([str(Path(pg_dump).with_name("pg_restore")), "--list", str(partial)], url, env)
    missing = [str(t) for t in tables if not re.search(rf"TABLE DATA \S+ {re.escape(t.name)} ", listing)]
    if missing:
        raise MigrationError(f"backup {path} does not contain the data of {', '.join(missing)}")
    partial.rename(path)
    return path


async def restore_data(url: str, path: Path, tables: list[QualifiedName], *, server_major: int) -> None:
    """Restore the rows of ``tables``, in the order given (parents first), and the dump's sequence values."""
    pg_restore = await find_tool("pg_restore", server_major)
    dsn, env = _libpq(url)
    listing = await _run([pg_restore, "--list", str(path)], url, env)
    data: dict[str, str] = {}
    sequences: list[str] = []
    for line in listing.splitlines():
        m = re.search(r" TABLE DATA \S+ (\S+) ", line)
        if m:
            data[m.group(1)] = line
        elif " SEQUENCE SET " in line:
            sequences.append(line)
    missing = [t.name for t in tables if t.name not in data]
    if missing:
        raise MigrationError(f"backup {path} has no data for {', '.join(missing)}")
    keep = [data[t.name] for t in tables] + sequences  # pg_restore -L restores in the file's order
    list_file = path.with_suffix(".restore-list")
    list_file.write_text("\n".join(keep) + "\n")
    try:
        await _run(
            [
                pg_restore,
                "--data-only",
                "--single-transaction",
                "--exit-on-error",
                "--dbname",
                dsn,
                "-L",
                str(list_file),
                str(path),
            ],
            url,
            env,
        )
    finally:
        list_file.unlink(missing_ok=True)


async def restore_all(url: str, path: Path, *, server_major: int) -> None:
    """Restore a whole dump (structure and rows) into an empty database."""
    pg_restore = await find_tool("pg_restore", server_major)
    dsn, env = _libpq(url)
    await _run(
        [pg_restore, "--no-owner", "--single-transaction", "--exit-on-error", "--dbname", dsn, str(path)], url, env
    )
