"""The batch copier: crash safety, idempotency, quarantine, order, sequences, locking, the window."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest

from conftest import ROOT, run, run_cli, scalar, sql
from migrate_data import api, ledger
from migrate_data.errors import LockHeld, Stopped
from migrate_data.settings import Settings

BIG = """
CREATE TABLE big (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO big SELECT i, 'v' || i FROM generate_series(1, 20000) i;
CREATE TABLE grande (id int PRIMARY KEY, valor text NOT NULL);
"""
BIG_MAPPING = """
tables:
  - source: big
    target: grande
    columns: {id: id, valor: {sql: "upper(big.v)"}}
"""


def project(tmp_path: Path, **phases: str) -> Path:
    (tmp_path / "mappings").mkdir(exist_ok=True)
    for name, text in phases.items():
        (tmp_path / "mappings" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return tmp_path


def start_cli(args: list[str], url: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, DATABASE_URL=url)
    return subprocess.Popen(
        [sys.executable, "-m", "migrate_data", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_progress(url: str, proc: subprocess.Popen, minimum: int = 1000) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            n = scalar(url, "SELECT COALESCE(sum(rows_read), 0) FROM migrate_data.checkpoints")
        except asyncpg.UndefinedTableError:
            n = 0
        if n >= minimum:
            return n
        time.sleep(0.02)
    raise AssertionError("no progress")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_mid_copy_then_rerun_gives_exactly_the_source(db_url, tmp_path, sig):
    sql(db_url, BIG)
    proj = project(tmp_path, night=BIG_MAPPING)
    proc = start_cli(["night", "--yes", "--no-backup", "--batch-size", "50", "--jobs", "1"], db_url, proj)
    wait_for_progress(db_url, proc)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, err
        assert "resume with: migrate-data night --yes" in err
    else:
        assert proc.returncode == -9
    copied = scalar(db_url, "SELECT count(*) FROM grande")
    checkpointed = scalar(db_url, "SELECT sum(rows_written) FROM migrate_data.checkpoints")
    assert 0 < copied < 20000 and copied == checkpointed  # the checkpoint commits with its batch
    again = run_cli("night", "--yes", "--no-backup", url=db_url, cwd=proj)
    assert again.returncode == 0, again.stderr
    assert scalar(db_url, "SELECT count(*) FROM grande") == 20000
    assert scalar(db_url, "SELECT count(*) FROM big b JOIN grande g ON g.id = b.id AND g.valor = upper(b.v)") == 20000
    assert re.search(r"public\.big +public\.grande +20,000 +20,000 +0 ", again.stdout), (
        again.stdout
    )  # read, written, quarantined


def test_second_run_inserts_nothing(db_url, tmp_path):
    sql(db_url, BIG)
    settings = Settings(database_url=db_url, project_dir=project(tmp_path, night=BIG_MAPPING), output_dir=tmp_path)
    first = run(api.run_phase(settings, "night", api.RunOptions(backup=False)))
    assert first.tables[0].rows_written == 20000
    skipped = run(api.run_phase(settings, "night", api.RunOptions(backup=False)))
    assert skipped.tables[0].skipped and skipped.validation.ok
    recheck = run(api.run_phase(settings, "night", api.RunOptions(backup=False, recheck=True)))
    assert not recheck.tables[0].skipped
    assert recheck.tables[0].rows_read == 20000 and recheck.tables[0].rows_written == 0


def test_big_table_is_split_into_concurrent_key_ranges(db_url, tmp_path):
    sql(db_url, BIG)
    settings = Settings(database_url=db_url, project_dir=project(tmp_path, night=BIG_MAPPING), output_dir=tmp_path)
    result = run(
        api.run_phase(settings, "night", api.RunOptions(backup=False, jobs=3, batch_size=1000, split_rows=1000))
    )
    parts = sql(db_url, "SELECT lo, hi, rows_read, done FROM migrate_data.checkpoints ORDER BY part")
    assert [(p["lo"], p["hi"]) for p in parts] == [(None, ["6667"]), (["6667"], ["13334"]), (["13334"], None)]
    assert [p["rows_read"] for p in parts] == [6667, 6667, 6666] and all(p["done"] for p in parts)
    assert result.tables[0].rows_written == 20000 and result.validation.ok


def test_invalid_json_rows_are_quarantined_and_good_rows_arrive(applied_db, settings_for):
    url = applied_db("phase1")
    settings = settings_for(url)
    result = run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False, batch_size=100)))
    rejects = sql(url, "SELECT target, sqlstate, message, row->>'notes' AS notes FROM migrate_data.rejects")
    assert len(rejects) == 3
    assert {(r["target"], r["sqlstate"], r["notes"]) for r in rejects} == {("public.clientes", "22P02", "{not json")}
    assert all("invalid input syntax for type json" in r["message"] for r in rejects)
    assert scalar(url, "SELECT count(*) FROM clientes") == 997
    assert result.validation.ok and result.validation.tables[1].rejected == 3


def test_two_tables_referencing_each_other_copy(db_url, tmp_path):
    sql(
        db_url,
        """
        CREATE TABLE a (id int PRIMARY KEY, b_id int); CREATE TABLE b (id int PRIMARY KEY, a_id int);
        INSERT INTO a SELECT i, i FROM generate_series(1, 50) i; INSERT INTO b SELECT i, i FROM generate_series(1, 50) i;
        CREATE TABLE x (id int PRIMARY KEY, y_id int); CREATE TABLE y (id int PRIMARY KEY, x_id int REFERENCES x);
        ALTER TABLE x ADD FOREIGN KEY (y_id) REFERENCES y;
    """,
    )
    settings = Settings(
        database_url=db_url,
        output_dir=tmp_path,
        project_dir=project(
            tmp_path,
            cyc="""
        tables:
          - {source: a, target: x, columns: {id: id, y_id: b_id}}
          - {source: b, target: y, columns: {id: id, x_id: a_id}}
    """,
        ),
    )
    result = run(api.run_phase(settings, "cyc", api.RunOptions(backup=False, batch_size=7)))
    assert result.validation.ok
    assert scalar(db_url, "SELECT count(*) FROM x JOIN y ON y.id = x.y_id AND y.x_id = x.id") == 50


def test_identity_and_serial_accept_new_rows_after_the_copy(applied_db):
    url = applied_db("phase3")
    new_msg = scalar(url, "INSERT INTO mensajes (contenido) VALUES ('new') RETURNING id")
    assert new_msg > scalar(url, "SELECT max(id) FROM messages")
    new_task = scalar(url, "INSERT INTO tareas_programadas (tipo_tarea) VALUES ('x') RETURNING id")
    assert new_task == scalar(url, "SELECT max(id) FROM task_queue") + 1


def test_generated_always_identity_is_written_with_overriding(db_url, tmp_path):
    sql(
        db_url,
        """CREATE TABLE s (id int PRIMARY KEY); INSERT INTO s SELECT generate_series(1, 10);
                   CREATE TABLE t (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text)""",
    )
    settings = Settings(
        database_url=db_url,
        output_dir=tmp_path,
        project_dir=project(tmp_path, p="tables: [{source: s, target: t, columns: {id: id}}]"),
    )
    run(api.run_phase(settings, "p", api.RunOptions(backup=False)))
    assert scalar(db_url, "INSERT INTO t (note) VALUES ('new') RETURNING id") == 11


def test_second_runner_fails_fast_naming_the_holder(legacy_url, settings_for):
    async def hold():
        conn = await asyncpg.connect(legacy_url)
        await ledger.ensure(conn)
        await conn.execute("SELECT pg_advisory_lock($1)", ledger.LOCK_KEY)
        await ledger.start_run(conn, kind="run", phase="phase2a")
        return conn

    async def scenario():
        holder = await hold()
        try:
            started = time.monotonic()
            with pytest.raises(LockHeld) as e:
                await api.run_phase(settings_for(legacy_url), "phase1", api.RunOptions(backup=False))
            assert time.monotonic() - started < 5
            return e.value
        finally:
            await holder.close()

    err = run(scenario())
    assert "another migrate-data run holds the lock" in err.message
    assert "held by run phase2a of user postgres" in err.detail


def test_concurrent_cli_runs_never_both_copy(db_url, tmp_path):
    sql(db_url, BIG)
    proj = project(tmp_path, night=BIG_MAPPING)
    a = start_cli(["night", "--yes", "--no-backup", "--batch-size", "50", "--jobs", "1"], db_url, proj)  # 400 batches
    wait_for_progress(db_url, a, minimum=50)
    b = run_cli("night", "--yes", "--no-backup", url=db_url, cwd=proj)
    a.communicate(timeout=120)
    assert a.returncode == 0
    assert b.returncode == 2 and "another migrate-data run holds the lock" in b.stderr  # refused: nothing done
    assert "held by run night" in b.stderr
    assert scalar(db_url, "SELECT count(*) FROM grande") == 20000


def test_the_copier_stops_at_the_deadline_between_batches_and_the_same_command_resumes(
    applied_db, settings_for, monkeypatch
):
    from types import SimpleNamespace

    from migrate_data import copier

    url = applied_db("phase1")
    settings = settings_for(url)
    calls = {"n": 0}

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):  # the window closes after the copier's third look at the clock
            calls["n"] += 1
            return dt.datetime.now(tz) + dt.timedelta(hours=1 if calls["n"] > 3 else 0)

    monkeypatch.setattr(copier, "dt", SimpleNamespace(datetime=Clock, timedelta=dt.timedelta, timezone=dt.timezone))
    deadline = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=30)
    options = api.RunOptions(backup=False, batch_size=100, jobs=1, deadline=deadline)
    with pytest.raises(Stopped, match=r"\(--until\) before the next batch could finish"):
        run(api.run_phase(settings, "phase2a", options))
    copied = scalar(url, "SELECT count(*) FROM clientes")
    assert 0 < copied < 997 and copied == scalar(
        url, "SELECT sum(rows_written) FROM migrate_data.checkpoints WHERE target = 'public.clientes'"
    )
    monkeypatch.undo()
    assert run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False))).validation.ok
    assert scalar(url, "SELECT count(*) FROM clientes") == 997


def test_cross_database_copy_gives_the_same_rows_and_rejects(legacy_url, applied_db, make_db, settings_for):
    target_url = applied_db("phase1", seeded=False)
    settings = settings_for(target_url).with_(source_url=legacy_url)
    result = run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False, batch_size=128)))
    assert result.validation.ok
    assert scalar(target_url, "SELECT count(*) FROM clientes") == 997
    assert scalar(target_url, "SELECT count(*) FROM migrate_data.rejects WHERE sqlstate = '22P02'") == 3
    same = make_db()
    sql(same, open(ROOT / "alembic" / "sql" / "legacy_schema.sql").read())
    # the transformed values equal those of the one-database path
    one_db = applied_db("phase2a")
    fingerprint = "SELECT md5(string_agg(c::text, ',' ORDER BY id)) FROM clientes c"
    assert scalar(target_url, fingerprint) == scalar(one_db, fingerprint)


def test_cross_database_copy_keeps_rows_already_in_the_target(legacy_url, applied_db, settings_for):
    """The direct COPY meets a conflicting key, falls back to the ON CONFLICT path, and keeps the existing row."""
    target_url = applied_db("phase1", seeded=False)
    key = scalar(legacy_url, "SELECT id::text FROM professions ORDER BY id LIMIT 1")
    sql(target_url, "INSERT INTO profesiones (id, nombre) VALUES ($1::uuid, 'ya estaba')", key)
    settings = settings_for(target_url).with_(source_url=legacy_url)
    result = run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False)))
    assert scalar(target_url, "SELECT nombre FROM profesiones WHERE id = $1::uuid", key) == "ya estaba"
    assert scalar(target_url, "SELECT count(*) FROM profesiones") == 40
    profesiones = next(t for t in result.tables if t.target == "public.profesiones")
    assert profesiones.rows_written == 39
