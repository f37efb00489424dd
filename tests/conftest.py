"""Real PostgreSQL for every test: TEST_DATABASE_URL when set, else an embedded server.

Every test that writes gets a database of its own, dropped afterwards (in a thread of its own: see _Dropper).
"""

from __future__ import annotations

import asyncio
import faulthandler
import importlib.util
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from click.testing import CliRunner

from migrate_data import api
from migrate_data.cli import cli
from migrate_data.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _load_seed():
    spec = importlib.util.spec_from_file_location("seed_legacy", ROOT / "scripts" / "seed_legacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seed_legacy = _load_seed()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """The server; at the end of the session, once every database the tests made is dropped."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        _dropper.finish()
        return
    from migrate_data.embedded import embedded_server

    with embedded_server() as (url, _):
        yield url
        _dropper.finish()


def sql(url: str, query: str, *args):
    """Run one query on ``url`` and return its rows (a fresh connection, closed after)."""

    async def go():
        conn = await asyncpg.connect(url)
        try:
            if not args and ";" in query.strip().rstrip(";"):
                await conn.execute(query)  # a script of several statements
                return []
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def scalar(url: str, query: str, *args):
    rows = sql(url, query, *args)
    return rows[0][0] if rows else None


def _create_database(server: str, template: str | None = None) -> tuple[str, str]:
    name = f"md_test_{uuid.uuid4().hex[:12]}"
    sql(
        with_database(server, "postgres"), f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
    )
    return name, with_database(server, name)


class _Dropper:
    """Drops databases in a thread of its own.  On PostgreSQL 15 a DROP DATABASE waits for a checkpoint, seconds on
    a busy server: the next test need not wait for it, and the drops waiting when the thread comes back for more go
    at once (concurrent drops share a checkpoint).  ``finish`` waits for the last one and raises if a drop failed."""

    AT_ONCE = 8

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.failed: list[str] = []
        self.thread: threading.Thread | None = None

    def drop(self, server: str, name: str) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="drop databases", daemon=True)
            self.thread.start()
        self.queue.put((server, name))

    def _run(self) -> None:
        while True:
            waiting = [self.queue.get()]
            while not self.queue.empty():
                waiting.append(self.queue.get())
            asyncio.run(self._drop_all([w for w in waiting if w is not None]))
            if None in waiting:
                return

    async def _drop_all(self, databases: list[tuple[str, str]]) -> None:
        at_once = asyncio.Semaphore(self.AT_ONCE)

        async def drop(server: str, name: str) -> None:
            async with at_once:
                try:
                    conn = await asyncpg.connect(with_database(server, "postgres"))
                    try:
                        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    finally:
                        await conn.close()
                except Exception as e:  # noqa: BLE001 - said by finish, at the end of the session
                    self.failed.append(f"{name}: {e}")

        await asyncio.gather(*(drop(server, name) for server, name in databases))

    def finish(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        if self.failed:
            raise RuntimeError("databases the tests made were not dropped: " + "; ".join(self.failed))


_dropper = _Dropper()


def _drop_database(server: str, name: str) -> None:
    """Drop database ``name`` soon (nothing connects to it again; see _Dropper)."""
    _dropper.drop(server, name)


@pytest.fixture
def make_db(server_url: str) -> Iterator:
    """A factory of fresh empty databases, all dropped at the end of the test."""
    created: list[str] = []

    def make(template: str | None = None) -> str:
        name, url = _create_database(server_url, template)
        created.append(name)
        return url

    yield make
    for name in created:
        _drop_database(server_url, name)


@pytest.fixture
def db_url(make_db) -> str:
    return make_db()


def seed(url: str, scale: float = 0.001) -> None:
    """Create the legacy schema in ``url`` and fill it (scripts/seed_legacy.py)."""

    async def go():
        conn = await asyncpg.connect(url)
        try:
            await seed_legacy.seed(conn, scale)
        finally:
            await conn.close()

    asyncio.run(go())


@pytest.fixture(scope="session")
def legacy_template(server_url: str) -> Iterator[str]:
    """A database seeded once per test session (and xdist worker): the template of every ``legacy_url``."""
    name, url = _create_database(server_url)
    seed(url)
    yield name
    _drop_database(server_url, name)


@pytest.fixture
def legacy_url(server_url: str, legacy_template: str) -> Iterator[str]:
    """A fresh database with the legacy schema seeded at a small scale (a copy of the seeded template)."""
    name, url = _create_database(server_url, template=legacy_template)
    yield url
    _drop_database(server_url, name)


PLAN = ("phase1", "phase2a", "phase2b", "phase3", "phase4")  # the sample plan's phases before the drop


@pytest.fixture(scope="session")
def plan_template(server_url: str, legacy_template: str, tmp_path_factory) -> Iterator:
    """``plan_template(phase)``: a template of the seeded database with the sample plan applied up to ``phase`` (each
    phase without a backup, as the tests' ``apply`` runs it), made once per session (and xdist worker) when first
    asked, from the template of the phase before.  ``seeded=False``: of an empty database instead (a target whose
    source is another database; phase1 only, the phases after it copy)."""
    out = tmp_path_factory.mktemp("plan")
    no_backup = api.RunOptions(backup=False)
    made: dict[tuple[str, bool], str] = {}

    def upto(phase: str, seeded: bool = True) -> str:
        if (phase, seeded) not in made:
            i = PLAN.index(phase)
            name, url = _create_database(
                server_url, template=upto(PLAN[i - 1], seeded) if i else legacy_template if seeded else None
            )
            try:
                run(api.run_phase(Settings(database_url=url, project_dir=ROOT, output_dir=out), phase, no_backup))
            except BaseException:
                _drop_database(server_url, name)  # the next test asks again, and fails again
                raise
            made[phase, seeded] = name
        return made[phase, seeded]

    yield upto
    for name in made.values():
        _drop_database(server_url, name)


@pytest.fixture
def applied_db(make_db, plan_template):
    """``applied_db(phase)``: a fresh database, a copy of the seeded one with the plan applied up to ``phase``;
    ``applied_db("phase1", seeded=False)``: of an empty one with phase1 applied."""
    return lambda phase, seeded=True: make_db(template=plan_template(phase, seeded))


@pytest.fixture
def settings_for(tmp_path: Path):
    """Settings for a database URL, with the repository's project and reports/backups under tmp_path."""

    def make(url: str, project: Path = ROOT, **kw) -> Settings:
        return Settings(database_url=url, project_dir=project, output_dir=tmp_path, **kw)

    return make


def run_cli_args(*args: str) -> list[str]:
    """The real ``migrate-data`` command, for a process of its own: a signal, a kill, another process at once."""
    return [sys.executable, "-m", "migrate_data", *args]


def cli_env(url: str | None = None, output_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a ``migrate-data`` process: ours, less DATABASE_URL, plus what is given."""
    e = dict(os.environ)
    e.pop("DATABASE_URL", None)
    if url:
        e["DATABASE_URL"] = url
    if output_dir:
        e["MIGRATE_DATA_OUTPUT_DIR"] = str(output_dir)
    e.update(extra)
    return e


def run_cli(
    *args: str,
    url: str | None = None,
    cwd: Path = ROOT,
    env: dict | None = None,
    input: str | None = None,
    timeout: int = 120,
) -> subprocess.CompletedProcess:
    """Run ``migrate-data ARGS`` in this process, as the command runs (``main``: exit codes, psql-shaped errors);
    stdin is not a terminal.

    Only what a separate process would not share is set apart: the working directory, the environment (ours, less
    DATABASE_URL, plus what is given), sys.path, the loggers (the command's log lines go to its stderr) and the
    signal handlers.  An unexpected exception is exit 1 with its traceback on stderr, as Python prints it; a run
    still going after ``timeout`` seconds ends the test process (faulthandler), so a hang fails the test.
    """
    environment: dict[str, str | None] = {"DATABASE_URL": url, **(env or {})}
    loggers = [
        logging.getLogger(),
        *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    levels = [(lg, lg.level) for lg in loggers]
    root_handlers = logging.getLogger().handlers[:]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    path, here = sys.path[:], os.getcwd()
    logging.getLogger().handlers[:] = []  # so the command's logging.basicConfig writes to its own stderr
    faulthandler.dump_traceback_later(timeout, exit=True, file=sys.__stderr__)
    try:
        os.chdir(cwd)
        result = CliRunner().invoke(cli, list(args), input=input, env=environment, prog_name="migrate-data")
    finally:
        faulthandler.cancel_dump_traceback_later()
        os.chdir(here)
        sys.path[:] = path
        for handler in logging.getLogger().handlers:
            handler.close()
        logging.getLogger().handlers[:] = root_handlers
        for lg, level in levels:
            lg.setLevel(level)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["migrate-data", *args], result.exit_code, result.stdout, stderr)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def alembic_config():
    """pytest-alembic: the project's own Alembic environment."""
    return {"file": str(ROOT / "alembic.ini"), "script_location": str(ROOT / "alembic")}


@pytest.fixture
def alembic_engine(db_url):
    """pytest-alembic: an async engine on a fresh database (our env.py is the async template)."""
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    from migrate_data.settings import sqlalchemy_url

    # phase5's downgrade recreates the legacy tables, so the database starts with them, as production does
    sql(db_url, (ROOT / "alembic" / "sql" / "legacy_schema.sql").read_text())
    engine = create_async_engine(sqlalchemy_url(db_url), poolclass=NullPool)
    yield engine
    asyncio.run(engine.dispose())
