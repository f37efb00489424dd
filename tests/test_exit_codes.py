"""Exit codes, as README's table says: 0 done, 1 failed, 2 bad input or refused, 3 validation failed, 130 stopped.

One table, one row per way out.  Rows run in this process with click's CliRunner (stdin is not a terminal), except
the 130 rows, which need a real process to send a signal to."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from clikit import invoke, read_only_role, with_user

from conftest import ROOT, scalar, sql
from migrate_data import cli, ledger


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    code: int
    says: str  # a line of the output (stdout + stderr)
    given: str = "legacy"  # legacy | applied (phase1, phase2a) | tampered (applied, then a row deleted) | ...
    input: str | None = None
    env: dict[str, str] = field(default_factory=dict)


CASES = [
    Case("done", ("status",), 0, "phase2a  applied", given="applied"),
    Case("done: plan", ("plan", "phase1"), 0, "order: -"),
    Case("failed: no server there", ("status",), 1, "ERROR: cannot connect to", given="no server"),
    Case("refused: the lock is held", ("phase1", "--yes", "--no-backup"), 2, "another migrate-data run holds the lock", given="lock held"),
    Case("refused: declined at the prompt", ("phase1", "--no-backup"), 2, "ERROR: not confirmed: did not run phase1; nothing was done", given="terminal", input="n\n"),
    Case("refused: no terminal to confirm on", ("phase1",), 2, "refusing to run phase1 without confirmation: no terminal"),
    Case("refused: rollback declined", ("rollback", "phase2a"), 2, "not confirmed: did not roll back phase2a", given="applied terminal", input="n\n"),
    Case("refused: a phase out of order", ("phase2b", "--yes"), 2, "phase2b requires phase2a, which is pending"),
    Case("bad flag: --statement-timeout banana", ("--statement-timeout", "banana", "status"), 2, "'banana' is not a duration"),
    Case("bad flag after the command", ("status", "--statement-timeout", "banana"), 2, "'banana' is not a duration"),
    Case("bad flag: --batch-size 0", ("phase1", "--batch-size", "0"), 2, "Invalid value for '--batch-size'"),
    Case("bad flag: unknown option", ("status", "--bogus"), 2, "ERROR: No such option '--bogus'"),
    Case("bad flag: bad --tz", ("status", "--tz", "Mars/Olympus"), 2, "--tz Mars/Olympus: unknown time zone"),
    Case("bad input: unknown phase", ("phase9",), 2, "no command or phase 'phase9'"),
    Case("bad input: the server refuses a setting", ("status",), 2, "the server refused a session setting", env={"MIGRATE_DATA_STATEMENT_TIMEOUT": "10 parsecs"}),
    Case("missing privilege: run as a read-only role", ("phase2b", "--yes", "--no-backup"), 2, "needs CREATE on database", given="applied reader"),
    Case("missing privilege: schema step as a read-only role", ("plan", "phase4"), 2, "the schema step (DDL) on clientes needs its owner", given="applied reader"),
    Case("validation failed", ("validate", "phase2a"), 3, "validation of phase2a FAILED", given="tampered"),
]  # fmt: skip


def _hold_lock(url: str) -> subprocess.Popen:
    holder = subprocess.Popen(
        ["psql", url, "-qc", f"SELECT pg_advisory_lock({ledger.LOCK_KEY})", "-c", "SELECT pg_sleep(60)"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    # this database's lock only: other tests hold advisory locks of their own in theirs, on the same server
    held = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    while not scalar(url, held):
        assert time.monotonic() < deadline and holder.poll() is None, "psql did not take the lock"
        time.sleep(0.05)
    return holder


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_exit_code(case: Case, applied_db, legacy_template, make_db, server_url, tmp_path, monkeypatch):
    applied = "applied" in case.given or case.given == "tampered"  # phase1 and phase2a
    url = applied_db("phase2a") if applied else make_db(template=legacy_template)
    if case.given == "tampered":
        sql(url, "DELETE FROM clientes WHERE id IN (SELECT id FROM clientes LIMIT 2)")
    if "terminal" in case.given:
        monkeypatch.setattr(cli.base, "interactive", lambda: True)
    if case.given == "no server":
        url = "postgresql://postgres@127.0.0.1:1/nowhere"
    holder = _hold_lock(url) if case.given == "lock held" else None
    try:
        if "reader" in case.given:
            with read_only_role(server_url) as reader:
                result = invoke(
                    *case.args, url=with_user(url, reader), output_dir=tmp_path, input=case.input, env=case.env
                )
        else:
            result = invoke(*case.args, url=url, output_dir=tmp_path, input=case.input, env=case.env)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    output = result.stdout + result.stderr
    assert result.exit_code == case.code, output
    assert case.says in output, output
    if case.code == 2:
        assert "Traceback" not in output
    # database errors read like psql's: no Python class name anywhere
    assert not re.search(r"\b[A-Z][a-zA-Z]+(Error|Exception)\b", output), output


def test_an_error_under_format_json_is_a_json_object(legacy_url, tmp_path):
    result = invoke("phase2b", "--yes", "--format", "json", url=legacy_url, output_dir=tmp_path)
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error == {
        "error": True,
        "message": "phase2b requires phase2a, which is pending",
        "detail": None,
        "hint": "run `migrate-data phase2a` first",
        "sqlstate": None,
        "exit_code": 2,
    }
    bad_flag = json.loads(invoke("status", "--format", "json", "--tz", "Nowhere/Land").stdout)
    assert bad_flag["exit_code"] == 2 and "unknown time zone" in bad_flag["message"]


def test_a_missing_privilege_names_the_privilege_the_object_and_the_role(applied_db, server_url, tmp_path):
    url = applied_db("phase2a")
    database = url.rpartition("/")[2]
    with read_only_role(server_url) as reader:
        result = invoke("phase2b", "--yes", "--no-backup", url=with_user(url, reader), output_dir=tmp_path)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"ERROR: permission denied for database {database}",
        f"HINT: {reader} needs CREATE on database {database} (migrate-data phase2b) (migrate-data creates its ledger, "
        f"the schema migrate_data, on its first write): GRANT CREATE ON DATABASE {database} TO {reader}",
    ]


@pytest.mark.parametrize(
    "message, query, hint",
    [
        (
            "permission denied for table runs",
            "UPDATE migrate_data.runs SET status = $2 WHERE id = $1",
            "dba needs UPDATE on runs (migrate-data phase2a): GRANT UPDATE ON runs TO dba",
        ),
        (
            "permission denied for table clientes",
            "INSERT INTO public.clientes (id) SELECT id FROM customers",
            "dba needs INSERT on clientes (migrate-data phase2a): GRANT INSERT ON clientes TO dba",
        ),
        (
            "permission denied for table customers",
            "INSERT INTO public.clientes (id) SELECT id FROM customers",
            "dba needs SELECT on customers (migrate-data phase2a): GRANT SELECT ON customers TO dba",
        ),
        (
            "permission denied for schema migrate_data",
            "CREATE TABLE IF NOT EXISTS migrate_data.runs ()",
            "dba needs USAGE (CREATE to create tables) on schema migrate_data (migrate-data phase2a): "
            "GRANT USAGE, CREATE ON SCHEMA migrate_data TO dba",
        ),
        (
            'permission denied to set parameter "session_replication_role"',
            "SET LOCAL session_replication_role = replica",
            "setting session_replication_role needs a superuser (migrate-data phase2a): run as a superuser "
            "(ALTER ROLE dba SUPERUSER)",
        ),
    ],
)
def test_privilege_hints_name_what_to_grant(message, query, hint):
    from migrate_data.errors import privilege_hint

    assert privilege_hint(message, query, role="dba", doing="migrate-data phase2a").startswith(hint)


def test_read_only_role_can_plan_dry_run_validate_and_see_status(applied_db, server_url, tmp_path):
    applied = applied_db("phase2a")
    with read_only_role(server_url) as reader:
        url = with_user(applied, reader)
        status = invoke("status", url=url, output_dir=tmp_path)
        plan = invoke("plan", "phase2b", url=url, output_dir=tmp_path)
        dry = invoke("phase2b", "--dry-run", url=url, output_dir=tmp_path)
        validate = invoke("validate", "phase2a", url=url, output_dir=tmp_path)
    assert status.exit_code == 0 and "phase2a  applied" in status.stdout, status.stderr
    assert plan.exit_code == 0 and "order: public.proveedores" in plan.stdout, plan.stderr
    assert dry.exit_code == 0 and "dry run of phase2b: pre-flight passed" in dry.stdout, dry.stderr
    assert "the requirements were not checked: pre-flight only" in dry.stderr
    assert validate.exit_code == 0 and "validation of phase2a PASSED" in validate.stdout, validate.stderr
    assert scalar(applied, "SELECT count(*) FROM migrate_data.runs WHERE kind = 'validate'") == 0  # not recorded


# -- connect timeouts -------------------------------------------------------------------------------------------
@pytest.fixture
def silent_server():
    """A TCP port on 127.0.0.1 that accepts connections and never says a word."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for s in accepted:
        s.close()
    listener.close()


@pytest.mark.parametrize("how", ["connect_timeout in the URL", "PGCONNECT_TIMEOUT"])
def test_a_server_that_never_answers_fails_within_the_connect_timeout(silent_server, how):
    url = f"postgresql://postgres@127.0.0.1:{silent_server}/db"
    env = {"PGCONNECT_TIMEOUT": "2"} if how == "PGCONNECT_TIMEOUT" else {}
    started = time.monotonic()
    result = invoke("status", url=url + ("?connect_timeout=2" if "URL" in how else ""), env=env)
    took = time.monotonic() - started
    assert result.exit_code == 1
    assert 1.5 < took < 6
    assert "no answer within 2 s" in result.stderr
    assert "connect_timeout=N in the URL or PGCONNECT_TIMEOUT" in result.stderr


def test_connect_timeout_in_the_url_is_not_sent_to_the_server(legacy_url, tmp_path):
    result = invoke("status", url=legacy_url + "?connect_timeout=10", output_dir=tmp_path)
    assert result.exit_code == 0, result.stderr


# -- 130: stopped at a checkpoint by a signal ---------------------------------------------------------------------
SLOW = """
CREATE TABLE big (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO big SELECT i, 'v' || i FROM generate_series(1, 5000) i;
CREATE TABLE grande (id int PRIMARY KEY, valor text NOT NULL);
CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$;
CREATE TRIGGER slow BEFORE INSERT ON grande FOR EACH ROW EXECUTE FUNCTION slow();
"""
NIGHT = """
description: A slow night
tables:
  - source: big
    target: grande
    columns: {id: id, valor: {sql: "upper(big.v)"}}
"""


def slow_project(tmp_path: Path, url: str) -> Path:
    sql(url, SLOW)
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "night.yaml").write_text(textwrap.dedent(NIGHT))
    return tmp_path


def start_night(url: str, project: Path, *extra: str, every: str = "0.3") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "migrate_data", "night", "--yes", "--no-backup", "--batch-size", "100", "--jobs", "1"]
        + list(extra),
        cwd=project,
        env=dict(os.environ, DATABASE_URL=url, MIGRATE_DATA_PROGRESS_EVERY=every, PYTHONPATH=str(ROOT / "src")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_rows(url: str, proc: subprocess.Popen, minimum: int = 200) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if scalar(url, "SELECT to_regclass('migrate_data.checkpoints') IS NOT NULL") and (
            scalar(url, "SELECT COALESCE(sum(rows_read), 0) FROM migrate_data.checkpoints") >= minimum
        ):
            return
        time.sleep(0.05)
    raise AssertionError("no progress")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_stops_at_a_checkpoint_with_130_and_history_counts_the_rows(sig, db_url, tmp_path):
    project = slow_project(tmp_path, db_url)
    proc = start_night(db_url, project)
    wait_for_rows(db_url, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "phase night stopped at a checkpoint:" in err
    assert "HINT: resume with: migrate-data night --yes" in err
    copied = scalar(db_url, "SELECT count(*) FROM grande")
    assert 0 < copied < 5000
    history = invoke("history", "--format", "json", url=db_url, project=project)
    last = json.loads(history.stdout)[0]
    assert (last["status"], last["rows"]) == ("stopped", copied)  # what it had copied when it stopped
