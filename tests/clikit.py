"""Helpers for the command-line tests: click's CliRunner in-process, a read-only role, a project copy."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from click.testing import CliRunner, Result

from conftest import ROOT, sql
from migrate_data.cli import cli


def invoke(
    *args: str,
    url: str | None = None,
    output_dir: Path | None = None,
    project: Path = ROOT,
    input: str | None = None,
    env: dict[str, str | None] | None = None,
) -> Result:
    """Run ``migrate-data ARGS`` in this process (stdin is not a terminal); the result has exit_code, stdout and
    stderr apart."""
    environment: dict[str, str | None] = {
        "DATABASE_URL": url,
        "SOURCE_DATABASE_URL": None,
        "MIGRATE_DATA_OUTPUT_DIR": str(output_dir) if output_dir else None,
        "PGCONNECT_TIMEOUT": None,
        **(env or {}),
    }
    return CliRunner().invoke(cli, ["--project", str(project), *args], env=environment, input=input)


def with_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@contextmanager
def read_only_role(server_url: str) -> Iterator[str]:
    """A role that may read everything and write nothing (pg_read_all_data), dropped afterwards."""
    name = f"md_reader_{uuid.uuid4().hex[:8]}"
    sql(server_url, f'CREATE ROLE "{name}" LOGIN IN ROLE pg_read_all_data')
    try:
        yield name
    finally:
        sql(server_url, f'DROP ROLE IF EXISTS "{name}"')


def project_copy(tmp_path: Path) -> Path:
    """The repository's project (alembic.ini, alembic/, mappings/, scripts/) in ``tmp_path``, to break a file of."""
    dest = tmp_path / "project"
    dest.mkdir()
    shutil.copy(ROOT / "alembic.ini", dest / "alembic.ini")
    for d in ("alembic", "mappings", "scripts"):
        shutil.copytree(ROOT / d, dest / d, ignore=shutil.ignore_patterns("__pycache__"))
    return dest
