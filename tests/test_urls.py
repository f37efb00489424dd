"""One URL type: every consumer reaches the same database, and no spelling of a password is ever shown."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from conftest import run, run_cli, with_database
from migrate_data import backup, schema
from migrate_data.db import fetch_val, open_pool
from migrate_data.errors import BadInput, MigrationError
from migrate_data.mapping import QualifiedName
from migrate_data.settings import DatabaseURL, Settings, asyncpg_dsn, redact, redact_text, sqlalchemy_url

# (URL, every spelling of its password that must never be shown)
WITH_PASSWORDS = [
    ("postgresql://app:s3cr3t@db:5432/prod", ["s3cr3t"]),
    ("postgresql://app@db/prod?sslmode=require&password=s3cr3t", ["s3cr3t"]),
    ("postgresql://app:p%40ss%3A%2Fw%3Frd@db/prod", ["p@ss:/w?rd", "p%40ss%3A%2Fw%3Frd", "p%40ss", "w?rd", "w%3Frd"]),
    ("postgres://app:s3cr3t@/prod?host=/var/run/postgresql", ["s3cr3t"]),
    ("postgresql+asyncpg://app:s3cr3t@db/prod", ["s3cr3t"]),
    ("postgresql://app:pa+ss%20word@db/prod", ["pa+ss word", "pa+ss%20word", "pa%2Bss%20word", "pa%2Bss+word"]),
    ("postgresql://app:pw/with/slash@db/prod", ["pw/with/slash", "pw%2Fwith%2Fslash"]),
]


@pytest.mark.parametrize(("url", "secrets"), WITH_PASSWORDS)
def test_redaction_hides_every_spelling_of_the_password(url, secrets):
    parsed = DatabaseURL.parse(url)
    pw = parsed.password or ""
    text = f"FATAL: authentication failed for {url} (password {pw}, sent {quote(pw, safe='')} / {quote_plus(pw)})"
    shown = [redact(url), str(parsed), repr(parsed), redact_text(text, url), parsed.libpq()[0]]
    for out in shown:
        assert "***" in out or out == parsed.libpq()[0]
        assert "app" in out and "prod" in out  # what is not secret stays
        for secret in secrets:
            assert secret not in out, (secret, out)


def test_redaction_keeps_the_url_as_given_when_it_has_no_password():
    assert redact("postgresql://app@db/prod") == "postgresql://app@db/prod"
    assert redact("postgresql://app:s3cr3t@db:5432/prod") == "postgresql://app:***@db:5432/prod"
    assert redact("postgres://app:s3cr3t@/prod?host=/var/run/postgresql") == (
        "postgres://app:***@/prod?host=/var/run/postgresql"
    )


def test_redact_text_hides_passwords_of_urls_it_was_not_given():
    text = (
        "connect to postgresql://u:p@ss@h/db failed; retrying postgresql://u@h/db?password=s3cr3t&sslmode=require, "
        "conninfo host=h password='two words'"
    )
    out = redact_text(text)
    for secret in ("p@ss", "ss@h", "s3cr3t", "two words"):
        assert secret not in out
    assert "postgresql://u:***@h/db" in out and "sslmode=require" in out


def test_unencoded_at_in_the_password_is_bad_input_that_does_not_echo_it():
    url = "postgresql://app:hunter@2secret@db/prod"
    with pytest.raises(BadInput, match="not percent-encoded") as e:
        DatabaseURL.parse(url)
    said = f"{e.value} {e.value.detail} {e.value.hint}"
    assert "%40" in said and "hunter" not in said and "2secret" not in said
    out = run_cli("status", url=url)
    assert out.returncode == 2, out.stderr
    assert "hunter" not in out.stdout + out.stderr and "2secret" not in out.stdout + out.stderr
    assert "ERROR: the database URL postgresql://app:***@db/prod has an '@' that is not percent-encoded" in out.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cr3t@db:notaport/prod",
        "mysql://app:s3cr3t@db/prod",
        "postgresql://app:s3cr3t@db/prod?port=abc",
    ],
)
def test_a_url_that_does_not_parse_is_bad_input_without_the_password(url):
    with pytest.raises(BadInput) as e:
        DatabaseURL.parse(url)
    assert "s3cr3t" not in f"{e.value} {e.value.detail} {e.value.hint}"


def _spellings(db_url: str) -> dict[str, str]:
    """Spellings of ``db_url`` that name the same database in different ways."""
    u = DatabaseURL.parse(db_url)
    name = u.database or ""
    rest = db_url.split("://", 1)[1]
    out = {
        "dbname parameter": with_database(db_url, "postgres") + ("&" if "?" in db_url else "?") + f"dbname={name}",
        "percent-encoded name": db_url.replace(f"/{name}", "/" + "".join(f"%{ord(c):02X}" for c in name)),
        "postgres scheme": "postgres://" + rest,
        "sqlalchemy scheme": "postgresql+asyncpg://" + rest,
        "password parameter": db_url + ("&" if "?" in db_url else "?") + "password=ignored%20by%20trust",
    }
    port = u.port or "5432"
    for sockdir in ("/var/run/postgresql", "/tmp"):
        if u.host in ("127.0.0.1", "localhost") and Path(sockdir, f".s.PGSQL.{port}").exists():
            out["unix socket"] = f"postgresql://{u.user}@/{name}?host={sockdir}&port={port}"
            break
    return out


async def _via_open_pool(url: str) -> str:
    async with open_pool(url, max_size=1) as pool:
        return await fetch_val(pool, "SELECT current_database()")


async def _via_sqlalchemy(engine) -> str:
    from sqlalchemy import text

    try:
        async with engine.connect() as conn:
            return (await conn.execute(text("SELECT current_database()"))).scalar_one()
    finally:
        await engine.dispose()


def test_asyncpg_sqlalchemy_and_libpq_reach_the_same_database_for_every_spelling(db_url):
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    name = DatabaseURL.parse(db_url).database
    psql = shutil.which("psql")
    for label, url in _spellings(db_url).items():
        parsed = DatabaseURL.parse(url)
        assert parsed.database == name, label
        assert run(_via_open_pool(url)) == name, label
        assert run(_via_sqlalchemy(schema._engine(Settings(database_url=url)))) == name, label
        assert run(_via_sqlalchemy(create_async_engine(sqlalchemy_url(url), poolclass=NullPool))) == name, label
        assert asyncpg_dsn(url).startswith("postgresql://"), label
        if psql:
            dsn, env = parsed.libpq()
            got = subprocess.run(
                [psql, "-XAtc", "SELECT current_database()", dsn],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            assert got == name, label


def test_connection_errors_and_logs_never_show_the_password(db_url, caplog):
    caplog.set_level(logging.DEBUG, logger="migrate_data")
    u = DatabaseURL.parse(db_url)
    secret = "Pw-in-the-logs"
    good = [
        db_url.replace(f"{u.user}@", f"{u.user}:{secret}@", 1),
        db_url + ("&" if "?" in db_url else "?") + f"password={secret}",
    ]
    for url in good:  # trust auth: the connection works, the password is only carried
        run(_via_open_pool(url))
    errors = []
    for url in (
        "postgresql://app:Pw-in-the-logs@127.0.0.1:1/nope",
        "postgresql://app@127.0.0.1:1/nope?password=Pw-in-the-logs",
    ):
        with pytest.raises(MigrationError) as e:
            run(_via_open_pool(url))
        errors.append(f"{e.value} {e.value.detail} {e.value.hint}")
    assert "pool opened on" in caplog.text and "cannot connect to postgresql://app:***@127.0.0.1:1/nope" in errors[0]
    assert secret not in caplog.text and not [m for m in errors if secret in m]


FAKE_TOOL = """#!{python}
import json, os, sys
with open(os.environ["FAKE_RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv, "PGPASSWORD": os.environ.get("PGPASSWORD"),
                        "PGAPPNAME": os.environ.get("PGAPPNAME")}}) + "\\n")
if "-f" in sys.argv:
    open(sys.argv[sys.argv.index("-f") + 1], "wb").write(b"PGDMP")
if "--list" in sys.argv:
    for t in os.environ["FAKE_TABLES"].split():
        print(f"1; 1 1 TABLE DATA public {{t}} app")
"""


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:p%40ss%3A%2Fw%3Frd@db.internal:5432/tinkubot?sslmode=require",
        "postgresql://app@db.internal:5432/tinkubot?sslmode=require&password=p%40ss%3A%2Fw%3Frd",
    ],
)
def test_pg_dump_and_pg_restore_get_the_decoded_password_in_their_environment_only(url, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pg_dump", "pg_restore"):
        (bin_dir / tool).write_text(FAKE_TOOL.format(python=sys.executable))
        (bin_dir / tool).chmod(0o755)
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_RECORD", str(record))
    monkeypatch.setenv("FAKE_TABLES", "customers")
    monkeypatch.delenv("PGPASSWORD", raising=False)

    async def fake_find_tool(tool: str, server_major: int) -> str:
        return str(bin_dir / tool)

    monkeypatch.setattr(backup, "find_tool", fake_find_tool)
    tables = [QualifiedName("customers", "public")]
    run(backup.dump(url, tables, tmp_path / "out.dump", server_major=15))
    run(backup.restore_all(url, tmp_path / "out.dump", server_major=15))
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [Path(c["argv"][0]).name for c in calls] == ["pg_dump", "pg_restore", "pg_restore"]
    for call in calls:
        assert call["PGPASSWORD"] == "p@ss:/w?rd" and call["PGAPPNAME"] == "migrate-data"
        args = " ".join(call["argv"])
        for secret in ("p@ss", "p%40ss", "w?rd", "w%3Frd", "password"):
            assert secret not in args
    dbname = calls[0]["argv"][calls[0]["argv"].index("--dbname") + 1]
    assert dbname == "postgresql://app@db.internal:5432/tinkubot?sslmode=require"
