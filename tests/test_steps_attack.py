"""The step runner attacked: a run or a rollback killed (SIGKILL) at every step boundary is finished by the same
command, ends where a clean run ends, and the ledger never says more than the data (``applied`` only once every
step completed, ``rolled_back`` only once every row and table is back)."""

from __future__ import annotations

import pytest

from conftest import ROOT, _create_database, _drop_database, run, run_cli, scalar, sql, with_database
from killer import kill_at
from migrate_data import api
from migrate_data.settings import Settings
from test_orchestration import snapshot


def apply(settings: Settings, *phases: str, **opts) -> None:
    for p in phases:
        run(api.run_phase(settings, p, api.RunOptions(**{"backup": False, **opts})))


def phase_row(url: str, phase: str) -> tuple | None:
    if not scalar(url, "SELECT to_regclass('migrate_data.phases') IS NOT NULL"):
        return None
    rows = sql(url, "SELECT state, validated FROM migrate_data.phases WHERE phase = $1", phase)
    return tuple(rows[0]) if rows else None


def state(url: str, phase: str) -> str | None:
    row = phase_row(url, phase)
    return row[0] if row else None


def capture_left(url: str, phase: str) -> int:
    """Triggers and registrations of the phase's change capture still in ``url``."""
    n = scalar(url, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE $1", f"md_capture_{phase}_%")
    if scalar(url, "SELECT to_regclass('migrate_data.capture') IS NOT NULL"):
        n += scalar(url, "SELECT count(*) FROM migrate_data.capture WHERE phase = $1", phase)
    return n


@pytest.fixture(scope="module")
def templates(server_url, legacy_template, plan_template, tmp_path_factory):
    """Databases with the plan applied up to a phase (``after[p]``), and the snapshot of each; backups under one dir.
    Up to phase4 the session's templates (no backup); phase5 made here on a copy of phase4's, with its backup."""
    out = tmp_path_factory.mktemp("attack")
    full = api.RunOptions(accept_unmapped=True)  # with its backup
    made: dict[str, str] = {}
    snaps: dict[str, dict] = {}

    def after(phase: str) -> str:
        if phase not in made:
            if phase == "legacy":
                made[phase] = legacy_template
            elif phase != "phase5":
                made[phase] = plan_template(phase)
            else:
                name, url = _create_database(server_url, template=plan_template("phase4"))
                try:
                    run(api.run_phase(Settings(database_url=url, project_dir=ROOT, output_dir=out), phase, full))
                except BaseException:
                    _drop_database(server_url, name)
                    raise
                made[phase] = name
            snaps[phase] = snapshot(with_database(server_url, made[phase]))
        return made[phase]

    yield after, snaps, out
    if "phase5" in made:
        _drop_database(server_url, made["phase5"])


BEFORE = {"phase1": "legacy", "phase2a": "phase1", "phase3": "phase2b", "phase5": "phase4"}


# -- rollback killed at each step boundary ----------------------------------------------------------------------
ROLLBACK_KILLS = [
    ("migrate_data.rollback:inspect:return", 1),
    ("migrate_data.steps:Validate.undo:enter", 1),
    ("migrate_data.rollback:delete_written:enter", 1),
    ("migrate_data.rollback:_delete:return", 1),
    ("migrate_data.rollback:delete_written:return", 1),
    ("migrate_data.rollback:restore_sequences:enter", 1),
    ("migrate_data.rollback:restore_sequences:return", 1),
    ("migrate_data.capture:remove:enter", 1),
    ("migrate_data.capture:_removal:return", 1),
    ("migrate_data.capture:remove:return", 1),
    ("migrate_data.rollback:downgrade:return", 1),
    ("migrate_data.rollback:finish:enter", 1),
    ("migrate_data.rollback:finish:return", 1),
    ("migrate_data.ledger:update_run:enter", 1),
]
PHASE5_ROLLBACK_KILLS = [
    ("migrate_data.rollback:inspect:return", 1),
    ("migrate_data.steps:Copy.undo:return", 1),
    ("migrate_data.rollback:downgrade:enter", 1),
    ("migrate_data.rollback:downgrade:return", 1),
    ("migrate_data.rollback:restore_dropped:enter", 1),
    ("migrate_data.backup:restore_all:return", 1),
    ("migrate_data.rollback:restore_dropped:return", 1),
    ("migrate_data.dependents:replay:enter", 1),
    ("migrate_data.dependents:replay:return", 1),
    ("migrate_data.rollback:finish:enter", 1),
    ("migrate_data.rollback:finish:return", 1),
]


def _rollback_killed_then_again(templates, make_db, phase, step, nth):
    after, snaps, out = templates
    before = snaps.get(BEFORE[phase]) or (after(BEFORE[phase]) and snaps[BEFORE[phase]])
    url = make_db(template=after(phase))
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(out)}
    killed = kill_at(step, "rollback", phase, "--yes", url=url, cwd=ROOT, env=env, nth=nth)
    if killed.returncode != -9:
        pytest.skip(f"{step} not reached in a rollback of {phase} (rc {killed.returncode})")
    if state(url, phase) == "rolled_back":  # the ledger may say so only once everything is back
        assert snapshot(url) == before
    again = run_cli("rollback", phase, "--yes", url=url, env=env)
    if not (state(url, phase) == "rolled_back" and "nothing to roll back" in again.stderr):
        assert again.returncode == 0, again.stderr
    assert state(url, phase) == "rolled_back"
    assert snapshot(url) == before
    assert capture_left(url, phase) == 0
    return url, env


@pytest.mark.sweep
@pytest.mark.parametrize("phase", ["phase2a", "phase3"])
@pytest.mark.parametrize("step, nth", ROLLBACK_KILLS)
def test_rollback_killed_at_each_step_boundary_finishes_when_run_again(templates, make_db, phase, step, nth):
    _rollback_killed_then_again(templates, make_db, phase, step, nth)


@pytest.mark.sweep
@pytest.mark.parametrize("step, nth", PHASE5_ROLLBACK_KILLS)
def test_rollback_of_phase5_killed_at_each_step_boundary_finishes_when_run_again(templates, make_db, step, nth):
    _rollback_killed_then_again(templates, make_db, "phase5", step, nth)


@pytest.mark.parametrize(
    "step", ["migrate_data.capture:_removal:return", "migrate_data.blocking:ddl_with_short_locks:return"]
)
def test_a_rollback_killed_inside_capture_removal_finishes_when_run_again(templates, make_db, step):
    """Capture's removal is one transaction (every table's triggers, the registry, the log): killed inside it, with
    some or all of the DDL run, the same rollback removes all of it and gives back the database as it was."""
    _rollback_killed_then_again(templates, make_db, "phase3", step, 1)


@pytest.mark.parametrize("step", ["migrate_data.rollback:downgrade:return", "migrate_data.rollback:finish:enter"])
def test_rollback_of_phase1_killed_after_its_downgrade_committed_finishes_and_phase1_runs_again(
    templates, make_db, step
):
    url, env = _rollback_killed_then_again(templates, make_db, "phase1", step, 1)
    assert scalar(url, "SELECT to_regclass('clientes') IS NULL") is True
    out = run_cli("phase1", "--yes", "--no-backup", url=url, env=env)
    assert out.returncode == 0, out.stderr
    assert state(url, "phase1") == "applied"
    assert scalar(url, "SELECT to_regclass('clientes') IS NOT NULL") is True


# -- run killed at each step boundary ---------------------------------------------------------------------------
RUN_KILLS = [
    ("migrate_data.backup:take_backup:return", 1),
    ("migrate_data.steps:Start.apply:enter", 1),
    ("migrate_data.steps:preflight:return", 1),
    ("migrate_data.capture:install:return", 1),
    ("migrate_data.steps:Start.apply:return", 1),
    ("migrate_data.steps:Copy.apply:enter", 1),
    ("migrate_data.copier:Copier._batch:return", 2),
    ("migrate_data.steps:Copy.apply:return", 1),
    ("migrate_data.steps:Validate.apply:enter", 1),
    ("migrate_data.report:save:return", 1),
    ("migrate_data.steps:Validate.apply:return", 1),
    ("migrate_data.ledger:set_phase:enter", 2),
    ("migrate_data.ledger:set_phase:return", 2),
]
PHASE5_RUN_KILLS = [
    ("migrate_data.steps:DropLegacy.apply:enter", 1),
    ("migrate_data.backup:take_backup:return", 1),
    ("migrate_data.steps:prove_nothing_lost:return", 1),
    ("migrate_data.dependents:drop_dependents:return", 1),
    ("migrate_data.schema:_run:return", 2),  # the drop ran (the 1st is the pre-flight's, rolled back), not committed
    ("migrate_data.steps:DropLegacy.apply:return", 1),
    ("migrate_data.steps:Copy.apply:return", 1),
    ("migrate_data.steps:Validate.apply:return", 1),
    ("migrate_data.ledger:set_phase:enter", 2),
]


def _run_killed_then_again(templates, make_db, phase, step, nth, extra=()):
    after, snaps, out = templates
    after(phase)  # the clean run, made (and kept) before the killed one
    url = make_db(template=after(BEFORE[phase]))
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(out)}
    args = [phase, "--yes", "--batch-size", "200", *extra]
    killed = kill_at(step, *args, url=url, cwd=ROOT, env=env, nth=nth)
    if killed.returncode != -9:
        pytest.skip(f"{step} not reached in a run of {phase} (rc {killed.returncode}): {killed.stderr[-300:]}")
    if state(url, phase) == "applied":  # the ledger may say so only once every step completed
        assert snapshot(url) == snaps[phase]
    again = run_cli(*args, url=url, env=env)
    assert again.returncode == 0, again.stderr
    assert phase_row(url, phase) == ("applied", True)
    assert snapshot(url) == snaps[phase]
    return url


@pytest.mark.sweep
@pytest.mark.parametrize("phase", ["phase2a", "phase3"])
@pytest.mark.parametrize("step, nth", RUN_KILLS)
def test_run_killed_at_each_step_boundary_then_run_again_equals_a_clean_run(templates, make_db, phase, step, nth):
    _run_killed_then_again(templates, make_db, phase, step, nth)


@pytest.mark.sweep
@pytest.mark.parametrize("step, nth", PHASE5_RUN_KILLS)
def test_phase5_killed_at_each_step_boundary_then_run_again_equals_a_clean_run(templates, make_db, step, nth):
    _run_killed_then_again(templates, make_db, "phase5", step, nth, extra=("--accept-unmapped",))


# -- two databases: a run killed inside Start.apply ---------------------------------------------------------------
@pytest.fixture
def two_dbs(legacy_url, applied_db, tmp_path):
    """(source url, target url with phase1 applied, environment of a CLI run against both)."""
    target = applied_db("phase1", seeded=False)
    return legacy_url, target, {"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path), "SOURCE_DATABASE_URL": legacy_url}


@pytest.mark.parametrize("step", ["migrate_data.capture:install:return", "migrate_data.steps:Start.apply:return"])
def test_run_on_two_databases_killed_in_start_then_run_again_equals_a_clean_run(
    two_dbs, applied_db, make_db, legacy_template, tmp_path, step
):
    source, target, env = two_dbs
    clean_target = applied_db("phase1", seeded=False)
    clean_source = make_db(template=legacy_template)
    settings = Settings(database_url=clean_target, project_dir=ROOT, output_dir=tmp_path)
    apply(settings.with_(source_url=clean_source), "phase2a")
    args = ["phase2a", "--yes", "--no-backup", "--batch-size", "200"]
    killed = kill_at(step, *args, url=target, cwd=ROOT, env=env)
    assert killed.returncode == -9, killed.stderr
    again = run_cli(*args, url=target, env=env)
    assert again.returncode == 0, again.stderr
    assert phase_row(target, "phase2a") == ("applied", True)
    assert snapshot(target) == snapshot(clean_target)
    assert capture_left(source, "phase2a") == capture_left(clean_source, "phase2a") > 0


def test_run_on_two_databases_killed_before_its_start_committed_leaves_no_capture_a_rollback_cannot_remove(two_dbs):
    source, target, env = two_dbs
    args = ["phase2a", "--yes", "--no-backup"]
    killed = kill_at("migrate_data.capture:install:return", *args, url=target, cwd=ROOT, env=env)
    assert killed.returncode == -9, killed.stderr
    # the target's ledger says nothing started: a rollback has nothing to undo ...
    assert state(target, "phase2a") is None
    out = run_cli("rollback", "phase2a", "--yes", url=target, env=env)
    # ... so the source must not be left logging every write of the application for a phase that never started
    assert capture_left(source, "phase2a") == 0, (out.returncode, out.stderr[-400:])


# -- dry runs write nothing -----------------------------------------------------------------------------------------
def ledger_of(url: str) -> list:
    return [tuple(r) for r in sql(url, "SELECT phase, state, validated, started_snapshot FROM migrate_data.phases "
                                       "ORDER BY phase")]  # fmt: skip


@pytest.mark.parametrize("phase", ["phase3", "phase5"])
def test_a_dry_run_changes_neither_the_data_nor_the_ledger(templates, make_db, phase):
    after, snaps, out = templates
    url = make_db(template=after(BEFORE[phase]))
    before, ledger_before = snapshot(url), ledger_of(url)
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(out)}
    res = run_cli(phase, "--yes", "--dry-run", "--accept-unmapped", url=url, env=env)
    assert res.returncode == 0, res.stderr
    assert snapshot(url) == before and ledger_of(url) == ledger_before
    assert capture_left(url, phase) == 0


def test_a_rollback_dry_run_of_a_stopped_rollback_changes_nothing(templates, make_db):
    after, snaps, out = templates
    url = make_db(template=after("phase3"))
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(out)}
    killed = kill_at("migrate_data.rollback:_delete:return", "rollback", "phase3", "--yes", url=url, cwd=ROOT, env=env)
    assert killed.returncode == -9, killed.stderr
    before, ledger_before = snapshot(url), ledger_of(url)
    res = run_cli("rollback", "phase3", "--dry-run", url=url, env=env)
    assert res.returncode == 0, res.stderr
    assert snapshot(url) == before and ledger_of(url) == ledger_before


# -- a rollback finished after the application wrote in between --------------------------------------------------
SESION = "INSERT INTO sesiones (telefono, id_sesion, estado) VALUES ('+593-app', 'app-{n}', 'activa')"


def test_a_stopped_rollback_run_again_after_the_application_wrote_keeps_the_applications_row(templates, make_db):
    after, snaps, out = templates
    url = make_db(template=after("phase3"))
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(out)}
    killed = kill_at("migrate_data.rollback:_delete:return", "rollback", "phase3", "--yes", url=url, cwd=ROOT, env=env)
    assert killed.returncode == -9, killed.stderr
    cols = {r[0] for r in sql(url, "SELECT column_name FROM information_schema.columns WHERE table_name = 'sesiones'")}
    assert {"telefono", "id_sesion", "estado"} <= cols
    sql(url, SESION.format(n=1))
    again = run_cli("rollback", "phase3", "--yes", url=url, env=env)
    assert again.returncode == 2, again.stderr  # refused: the row is not the phase's
    assert scalar(url, "SELECT count(*) FROM sesiones WHERE id_sesion = 'app-1'") == 1
    assert state(url, "phase3") == "rolling_back"
    forced = run_cli("rollback", "phase3", "--yes", "--force", url=url, env=env)
    assert forced.returncode == 0, forced.stderr
    after("phase2b")
    assert state(url, "phase3") == "rolled_back" and snapshot(url) == snaps["phase2b"]


# -- plan is what a run executes ----------------------------------------------------------------------------------
def _record_schema_transactions(monkeypatch, seen: list[str]) -> None:
    from contextlib import asynccontextmanager

    from migrate_data import schema

    original = schema.schema_transaction

    @asynccontextmanager
    async def logged(settings, pool, *, before=None, **kw):
        async def first(conn):
            conn.add_query_logger(lambda r: seen.append(r.query))
            if before is not None:
                await before(conn)

        async with original(settings, pool, before=first, **kw) as conn:
            yield conn

    monkeypatch.setattr(schema, "schema_transaction", logged)


@pytest.mark.parametrize("phase, done", [("phase3", ("phase1", "phase2a", "phase2b")),
                                         ("phase5", ("phase1", "phase2a", "phase2b", "phase3", "phase4"))])  # fmt: skip
def test_plan_of_a_phase_prints_every_statement_its_run_executes(applied_db, settings_for, monkeypatch, phase, done):
    from test_steps import _is_effect, _norm, recorded

    settings = settings_for(applied_db(done[-1]))  # the phases in done applied
    planned = run(api.plan(settings, phase))
    described = {_norm(s) for st in planned.steps for s in st.statements}
    with recorded(monkeypatch) as seen:
        _record_schema_transactions(monkeypatch, seen)  # Alembic's connection is not one of the pools'
        result = run(api.run_phase(settings, phase, api.RunOptions(batch_size=60, accept_unmapped=True)))
    assert result.status == "done"
    executed = {_norm(s) for s in seen if _is_effect(s)}
    assert executed
    assert executed - described == set()


# -- --until: the window closes in the middle of the copy ---------------------------------------------------------
def test_a_run_stopped_by_until_mid_copy_is_not_applied_and_resumes_to_a_clean_run(
    applied_db, settings_for, monkeypatch
):
    import datetime as real_dt
    import types

    from migrate_data import copier
    from migrate_data.errors import Stopped

    clean = applied_db("phase2a")
    url = applied_db("phase1")
    settings = settings_for(url)
    calls = {"n": 0}

    class Clock(real_dt.datetime):
        @classmethod
        def now(cls, tz=None):  # the 4th look at the clock finds the window closed
            calls["n"] += 1
            late = real_dt.timedelta(hours=3) if calls["n"] > 3 else real_dt.timedelta(0)
            return real_dt.datetime.now(tz) + late

    monkeypatch.setattr(copier, "dt", types.SimpleNamespace(datetime=Clock, timedelta=real_dt.timedelta,
                                                            timezone=real_dt.timezone))  # fmt: skip
    deadline = real_dt.datetime.now(real_dt.timezone.utc) + real_dt.timedelta(hours=1)
    with pytest.raises(Stopped):
        run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False, batch_size=100, jobs=1, deadline=deadline)))
    assert calls["n"] > 3
    assert phase_row(url, "phase2a") == ("partial", None)
    assert 0 < scalar(url, "SELECT count(*) FROM clientes") + scalar(url, "SELECT count(*) FROM profesiones")
    monkeypatch.undo()
    apply(settings, "phase2a")
    assert phase_row(url, "phase2a") == ("applied", True)
    assert snapshot(url) == snapshot(clean)


# -- a phase rolled back (by a rollback killed and finished) runs again to what a clean run gives --------------------
@pytest.mark.parametrize(
    "phase, step",
    [
        ("phase3", "migrate_data.capture:remove:return"),
        ("phase3", "migrate_data.rollback:finish:enter"),
        ("phase5", "migrate_data.rollback:downgrade:return"),
        ("phase5", "migrate_data.rollback:finish:enter"),
    ],
)
def test_a_phase_whose_rollback_was_killed_and_finished_runs_again_to_a_clean_run(templates, make_db, phase, step):
    after, snaps, out = templates
    url, env = _rollback_killed_then_again(templates, make_db, phase, step, 1)
    res = run_cli(phase, "--yes", "--accept-unmapped", url=url, env=env)
    assert res.returncode == 0, res.stderr
    assert phase_row(url, phase) == ("applied", True)
    assert snapshot(url) == snaps[phase]
    assert capture_left(url, phase) == capture_left(make_db(template=after(phase)), phase)


# -- a run killed midway, then rolled back instead of finished ---------------------------------------------------
@pytest.mark.parametrize(
    "phase, step, nth",
    [
        ("phase3", "migrate_data.copier:Copier._batch:return", 2),
        ("phase3", "migrate_data.steps:Validate.apply:enter", 1),
        ("phase5", "migrate_data.steps:Copy.apply:enter", 1),  # the drop committed, the run not finished
    ],
)
def test_a_run_killed_midway_then_rolled_back_gives_back_the_database_before_it(templates, make_db, phase, step, nth):
    after, snaps, out = templates
    url = make_db(template=after(BEFORE[phase]))
    before = snapshot(url)
    env = {"MIGRATE_DATA_OUTPUT_DIR": str(out)}
    killed = kill_at(step, phase, "--yes", "--batch-size", "200", "--accept-unmapped", url=url, cwd=ROOT, env=env,
                     nth=nth)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert state(url, phase) == "partial"
    res = run_cli("rollback", phase, "--yes", url=url, env=env)
    assert res.returncode == 0, res.stderr
    assert state(url, phase) == "rolled_back"
    assert snapshot(url) == before
    assert capture_left(url, phase) == 0


# -- two databases: a rollback killed where capture is removed from the source --------------------------------------
@pytest.mark.parametrize(
    "step",
    ["migrate_data.capture:remove:enter", "migrate_data.capture:remove:return", "migrate_data.rollback:finish:enter"],
)
def test_rollback_on_two_databases_killed_around_capture_removal_finishes_when_run_again(two_dbs, step):
    source, target, env = two_dbs
    before = snapshot(target)
    args = ["phase2a", "--yes", "--no-backup", "--batch-size", "200"]
    assert run_cli(*args, url=target, env=env).returncode == 0
    assert capture_left(source, "phase2a") > 0
    killed = kill_at(step, "rollback", "phase2a", "--yes", url=target, cwd=ROOT, env=env)
    assert killed.returncode == -9, killed.stderr
    again = run_cli("rollback", "phase2a", "--yes", url=target, env=env)
    assert again.returncode == 0, again.stderr
    assert state(target, "phase2a") == "rolled_back"
    assert snapshot(target) == before
    assert capture_left(source, "phase2a") == 0
    assert scalar(source, "SELECT count(*) FROM migrate_data.changes WHERE phase = 'phase2a'") == 0


# -- what sync wrote between nights is the phase's: a rollback takes it back too ----------------------------------
def test_a_rollback_after_sync_deletes_the_rows_sync_wrote_and_keeps_the_applications_source_rows(
    applied_db, settings_for
):
    url = applied_db("phase1")
    settings = settings_for(url)
    before = snapshot(url)
    apply(settings, "phase2a")
    new = "00000000-0000-0000-0000-0000000000cc"
    sql(url, f"INSERT INTO customers (id, phone_number, full_name) VALUES ('{new}', '+593-sync', 'Nueva')")
    sql(url, "UPDATE customers SET city = 'Loja (sync)' WHERE id = (SELECT min(id::text)::uuid FROM customers)")
    run(api.sync(settings, ["phase2a"]))
    assert scalar(url, "SELECT count(*) FROM clientes WHERE id = $1::uuid", new) == 1
    source_after = {t: v for t, v in snapshot(url)["rows"].items() if t in ("customers", "professions")}
    result = run(api.rollback(settings, "phase2a"))
    assert result.deleted["public.clientes"] == 998
    now = snapshot(url)
    assert {t: v for t, v in now["rows"].items() if t in ("customers", "professions")} == source_after
    assert scalar(url, "SELECT count(*) FROM clientes") == 0
    assert now["tables"] == before["tables"] and now["sequences"] == before["sequences"]


def test_plan_of_a_drop_prints_the_drop_of_the_objects_that_depend_on_the_tables(applied_db, settings_for, monkeypatch):
    from test_steps import _is_effect, _norm, recorded

    url = applied_db("phase4")
    settings = settings_for(url)
    sql(url, "CREATE VIEW clientes_de_quito AS SELECT id, full_name FROM customers WHERE city = 'Quito'")
    planned = run(api.plan(settings, "phase5"))
    assert [d.name for d in planned.dependents if "clientes_de_quito" in d.name]
    described = {_norm(s) for st in planned.steps for s in st.statements}
    with recorded(monkeypatch) as seen:
        _record_schema_transactions(monkeypatch, seen)
        run(api.run_phase(settings, "phase5", api.RunOptions(accept_unmapped=True, force=True)))
    assert scalar(url, "SELECT to_regclass('clientes_de_quito') IS NULL") is True
    drops = {_norm(s) for s in seen if _is_effect(s) and _norm(s).upper().startswith("DROP VIEW")}
    assert drops, "the recorder saw no DROP VIEW: the test would prove nothing"
    assert drops - described == set()
