"""A rehearsal only reads production: a staging URL that reaches production, however spelled, is refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import uuid
from pathlib import Path

import asyncpg
import pytest

from conftest import ROOT, _create_database, _drop_database, run, run_cli, scalar, seed_legacy, sql, with_database
from migrate_data import rehearse
from migrate_data.errors import RefusedError
from migrate_data.identity import DatabaseIdentity, ServerIdentity, refuse_if_production
from migrate_data.settings import DatabaseURL, Settings, redact
from migrate_data.staging import build_staging

PASSWORD = "n0t-Shown"  # trust auth ignores it; it must still never be printed

SPELLINGS = (
    "same text",
    "localhost for 127.0.0.1",
    "127.0.0.1 for localhost",
    "the machine's hostname",
    "no explicit port",
    "explicit port",
    "unix socket",
    "percent-encoded database name",
    "dbname parameter",
    "another user",
    "postgres:// with a password",
    "postgresql+asyncpg:// with ?password=",
)
MODES = ("rebuild", "use_existing", "plain")


def _fingerprint(url: str) -> dict:
    """The database's oid (a DROP and CREATE changes it), its schemas, and a hash of every table's rows."""

    async def go() -> dict:
        conn = await asyncpg.connect(url)
        try:
            oid = await conn.fetchval("SELECT oid FROM pg_database WHERE datname = current_database()")
            schemas = [r[0] for r in await conn.fetch("SELECT nspname FROM pg_namespace ORDER BY 1")]
            tables = [r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            rows = {
                t: await conn.fetchval(
                    f"SELECT count(*) || ':' || md5(COALESCE(string_agg(x::text, '|' ORDER BY x::text), '')) "
                    f'FROM "{t}" x'
                )
                for t in sorted(tables)
            }
            return {"oid": oid, "schemas": schemas, "rows": rows}
        finally:
            await conn.close()

    return asyncio.run(go())


_IDENTITY = "SELECT current_setting('data_directory'), pg_postmaster_start_time()"


def _reaches(url: str, reference: tuple) -> bool:
    """The test's own oracle: does ``url`` (a maintenance-database URL) reach the server of ``reference``?"""
    try:
        return tuple(sql(url, _IDENTITY)[0]) == reference
    except (OSError, asyncpg.PostgresError):
        return False


@pytest.fixture(scope="module")
def production(server_url: str):
    """The production database (legacy schema seeded), shared by the module: every test must leave it as it is."""
    name, url = _create_database(server_url)

    async def seed():
        conn = await asyncpg.connect(url)
        try:
            await seed_legacy.seed(conn, 0.0005)
        finally:
            await conn.close()

    asyncio.run(seed())
    yield url
    _drop_database(server_url, name)


@pytest.fixture(scope="module")
def other_role(server_url: str):
    """A login role that is not a superuser (it cannot read data_directory)."""
    role = f"md_reader_{uuid.uuid4().hex[:8]}"
    sql(with_database(server_url, "postgres"), f'CREATE ROLE "{role}" LOGIN')
    yield role
    sql(with_database(server_url, "postgres"), f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture(scope="module")
def spellings(production: str, other_role: str) -> dict[str, str]:
    """Other spellings of ``production`` that this machine can produce, each checked to reach the same server."""
    u = DatabaseURL.parse(production)
    name, user, port = u.database, u.user or "postgres", u.port or "5432"
    reference = tuple(sql(with_database(production, "postgres"), _IDENTITY)[0])
    found: dict[str, str] = {
        "same text": production,
        "percent-encoded database name": production.replace(f"/{name}", "/" + "".join(f"%{ord(c):02X}" for c in name)),
        "dbname parameter": with_database(production, "postgres") + f"{'&' if '?' in production else '?'}dbname={name}",
        "another user": production.replace(f"{user}@", f"{other_role}@", 1),
        "postgres:// with a password": "postgres://"
        + production.split("://", 1)[1].replace(f"{user}@", f"{user}:{PASSWORD}@", 1),
        "postgresql+asyncpg:// with ?password=": "postgresql+asyncpg://"
        + production.split("://", 1)[1]
        + f"{'&' if '?' in production else '?'}password={PASSWORD}",
    }
    servers: dict[str, str] = {}  # spellings of the server itself: kept only when they reach it
    if u.host in ("127.0.0.1", "localhost"):
        hosts = {"localhost for 127.0.0.1": "localhost", "127.0.0.1 for localhost": "127.0.0.1"}
        hosts["the machine's hostname"] = socket.gethostname()
        servers.update({k: f"postgresql://{user}@{h}:{port}/{{}}" for k, h in hosts.items() if h != u.host})
        if port == "5432" and not u.params:
            servers["no explicit port"] = f"postgresql://{user}@{u.host}/{{}}"
            servers["explicit port"] = f"postgresql://{user}@{u.host}:5432/{{}}"
    for sockdir in ("/var/run/postgresql", "/tmp"):
        if Path(sockdir, f".s.PGSQL.{port}").exists():
            servers["unix socket"] = f"postgresql://{user}@/{{}}?host={sockdir}&port={port}"
            break
    for label, template in servers.items():
        if _reaches(template.format("postgres"), reference):
            found[label] = template.format(name)
    return found


def _modes(mode: str) -> dict[str, bool]:
    return {"rebuild": mode == "rebuild", "use_existing": mode == "use_existing"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_staging_that_resolves_to_production_is_refused_and_production_is_untouched(
    production, spellings, spelling, mode, tmp_path
):
    if spelling not in spellings:
        pytest.skip(f"{spelling}: not producible against this server")
    staging = spellings[spelling]
    before = _fingerprint(production)
    settings = Settings(database_url=production, project_dir=ROOT, output_dir=tmp_path)
    with pytest.raises(RefusedError) as refused:
        run(rehearse.rehearse(settings, ["phase2a"], staging_url=staging, **_modes(mode)))
    message = f"{refused.value}\n{refused.value.detail}"
    assert f"the staging URL {redact(staging)} names the production database {redact(production)}" in message
    assert "same server" in refused.value.detail and f"database oid {before['oid']}" in refused.value.detail
    assert PASSWORD not in message
    assert _fingerprint(production) == before
    assert scalar(production, "SELECT to_regnamespace('migrate_data') IS NULL") is True


@pytest.mark.parametrize(
    ("mode", "spelling"),
    [("rebuild", "the machine's hostname"), ("use_existing", "unix socket"), ("plain", "postgres:// with a password")],
)
def test_cli_refuses_production_as_staging_with_exit_2_naming_both(production, spellings, mode, spelling, tmp_path):
    if spelling not in spellings:
        pytest.skip(f"{spelling}: not producible against this server")
    staging = spellings[spelling]
    before = _fingerprint(production)
    flags = {"rebuild": ["--rebuild"], "use_existing": ["--use-existing"], "plain": []}[mode]
    out = run_cli(
        "rehearse",
        "phase2a",
        "--staging-url",
        staging,
        *flags,
        url=production,
        env={"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)},
    )
    assert out.returncode == 2, out.stderr
    assert f"ERROR: refusing to rehearse: the staging URL {redact(staging)} names the production database" in out.stderr
    assert redact(production) in out.stderr and "DETAIL: both reach the same server (" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    assert _fingerprint(production) == before
    assert scalar(production, "SELECT to_regnamespace('migrate_data') IS NULL") is True


def test_staging_that_resolves_to_the_source_database_is_refused(production, spellings, make_db, tmp_path):
    target = make_db()
    staging = spellings.get("unix socket") or spellings["percent-encoded database name"]
    before = _fingerprint(production)
    settings = Settings(database_url=target, source_url=production, project_dir=ROOT, output_dir=tmp_path)
    with pytest.raises(RefusedError, match="names the production database"):
        run(build_staging(settings, staging, [], rebuild=True, use_existing=False))
    assert _fingerprint(production) == before


def test_another_spelling_of_the_same_server_is_recognised_for_template(production, make_db, server_url, tmp_path):
    staging = make_db()  # a genuine staging database, reached by another spelling of the same server
    u = DatabaseURL.parse(staging)
    other = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}.get(u.host or "")
    if other is None:
        pytest.skip("the test server is not on the loopback address")
    spelled = staging.replace(f"@{u.host}", f"@{other}", 1)
    before = _fingerprint(production)
    settings = Settings(database_url=production, project_dir=ROOT, output_dir=tmp_path)
    built = run(build_staging(settings, spelled, [], rebuild=True, use_existing=False))
    assert built == "template"
    assert scalar(staging, "SELECT count(*) FROM customers") == scalar(production, "SELECT count(*) FROM customers")
    assert _fingerprint(production) == before


def _server(**kw) -> ServerIdentity:
    base = {
        "system_identifier": 7,
        "port": "5432",
        "started": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        "data_directory": "/var/lib/pg",
    }
    return ServerIdentity(**{**base, **kw})


def test_a_clone_of_production_with_the_same_system_identifier_is_another_server():
    later = dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc)
    assert not _server().same_as(_server(started=later))  # pg_basebackup copy: same cluster id, another server
    assert not _server().same_as(_server(port="5433"))
    assert not _server().same_as(_server(system_identifier=8))
    assert _server().same_as(_server(data_directory=None))  # a role that may not read data_directory
    assert _server(system_identifier=None).same_as(_server())  # pg_control_system() not readable


def test_a_staging_database_not_created_yet_is_compared_by_name():
    prod = {"postgresql://app:***@db/prod": DatabaseIdentity(_server(), "prod", 16384)}
    url = DatabaseURL.parse("postgresql://app:pw@db.alias/prod")
    with pytest.raises(RefusedError, match="names the production database") as refused:
        refuse_if_production(DatabaseIdentity(_server(), "prod", None), url, prod)
    assert "database name prod (the staging database does not exist yet)" in refused.value.detail
    refuse_if_production(DatabaseIdentity(_server(), "prod_rehearsal", None), url, prod)  # another name: fine
    other = _server(started=dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc))
    refuse_if_production(DatabaseIdentity(other, "prod", None), url, prod)  # another server: fine
