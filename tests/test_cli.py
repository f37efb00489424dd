"""The command line as the DBA meets it: options in either place, the phases' help, one bad file not blocking the
others, --format json everywhere, plan --sql offline, the closing summary, what a destructive phase destroys."""

from __future__ import annotations

import json
import re

import click
import pytest
from clikit import invoke, project_copy

from conftest import run, sql
from migrate_data import api, cli
from migrate_data.cli import cli as group


# -- options and help ---------------------------------------------------------------------------------------------
def test_global_options_work_after_the_command_too(legacy_url, tmp_path):
    before = invoke("--database-url", legacy_url, "status", url=None, output_dir=tmp_path)
    after = invoke("status", "--database-url", legacy_url, "-v", url=None, output_dir=tmp_path)
    assert before.exit_code == after.exit_code == 0, after.stderr
    assert before.stdout == after.stdout
    no_url = invoke("status", url=None)
    assert no_url.exit_code == 2 and "no target database" in no_url.stderr
    confirmed_late = invoke(
        "phase1", "--yes", "--no-backup", "--database-url", legacy_url, url=None, output_dir=tmp_path
    )
    assert confirmed_late.exit_code == 0, confirmed_late.stderr


def test_an_unknown_phase_lists_the_phases_and_a_close_match():
    result = invoke("phase9")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0].startswith("ERROR: no command or phase 'phase9'; did you mean 'phase")
    assert "HINT: phases: phase1, phase2a, phase2b, phase3, phase4, phase5; commands: " in result.stderr
    assert "history, init, plan, rehearse, rollback, status" in result.stderr


def test_every_command_has_help_and_an_example_and_phases_take_their_description():
    listing = invoke("--help")
    assert "phase2a   Profesiones y clientes (fase 2, noche 1)" in listing.stdout
    assert "Global options may also follow the command" in listing.stdout
    commands = group.list_commands(click.Context(group))
    assert "phase2a" in commands and "rollback" in commands
    for name in commands:
        text = invoke(name, "--help").stdout
        assert "Example" in text, f"{name} --help has no example"
    phase = invoke("phase2a", "--help").stdout
    assert phase.startswith("Usage: cli phase2a [OPTIONS]\n\n  Profesiones y clientes (fase 2, noche 1)")
    assert "migrate-data phase2a --until 05:30 --tz America/Guayaquil" in phase


def test_plan_sql_prints_the_ddl_without_a_database():
    result = invoke("plan", "phase1", "--sql", url=None)
    assert result.exit_code == 0, result.stderr
    assert "CREATE TABLE clientes" in result.stdout
    none = invoke("plan", "phase2a", "--sql", url=None)
    assert none.exit_code == 0 and none.stdout.strip() == "-- phase2a has no Alembic revision: no DDL"


# -- one bad mapping file -----------------------------------------------------------------------------------------
def test_one_bad_mapping_file_does_not_block_the_other_phases(applied_db, tmp_path):
    project = project_copy(tmp_path)
    url = applied_db("phase2b")
    bad = project / "mappings" / "phase3.yaml"
    lines = bad.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.strip().startswith("columns:"))
    lines.insert(n + 1, "      extra: {colum: status}")
    bad.write_text("\n".join(lines) + "\n")

    status = invoke("status", url=url, project=project, output_dir=tmp_path)
    assert status.exit_code == 0, status.stderr
    assert re.search(r"^phase2b +applied ", status.stdout, re.M)
    assert re.search(
        rf"^phase3 +error .*phase3\.yaml:{n + 2}:15 tables\[0\]\.columns\.extra: unknown key 'colum'",
        status.stdout,
        re.M,
    )
    assert re.search(r"^phase4 +error .*phase4 requires phase3, whose phase file has an error", status.stdout, re.M)
    assert (
        f"  line {n + 2}:       extra: {{colum: status}}\n  {' ' * len(f'line {n + 2}: ')}{' ' * 14}^" in status.stdout
    )

    plan = invoke("plan", "phase2b", url=url, project=project, output_dir=tmp_path)
    assert plan.exit_code == 0, plan.stderr
    rollback = invoke("rollback", "phase2b", "--yes", url=url, project=project, output_dir=tmp_path)
    assert rollback.exit_code == 0, rollback.stderr
    assert "phase phase2b rolled back" in rollback.stdout

    run3 = invoke("phase3", "--yes", url=url, project=project, output_dir=tmp_path)
    assert run3.exit_code == 2
    assert f"phase3.yaml:{n + 2}:15 tables[0].columns.extra: unknown key 'colum'" in run3.stderr
    assert "DETAIL: line" in run3.stderr
    drop = invoke("phase5", "--yes", url=url, project=project, output_dir=tmp_path)
    assert drop.exit_code == 2 and "phase5 requires phase4, whose phase file has an error" in drop.stderr


def test_a_broken_phase_that_is_applied_blocks_changes_to_the_others(applied_db, tmp_path):
    project = project_copy(tmp_path)
    url = applied_db("phase2b")
    (project / "mappings" / "phase2b.yaml").write_text("tables: [\n")  # now broken, and applied
    result = invoke("rollback", "phase2a", "--yes", url=url, project=project, output_dir=tmp_path)
    assert result.exit_code == 2
    assert "phase2b is applied, and its phase file has an error; not changing phase2a" in result.stderr
    assert "phase2b.yaml:2:1: invalid YAML" in result.stderr


# -- the closing summary, json, times -----------------------------------------------------------------------------
def test_a_run_ends_with_a_summary_like_pgloader(applied_db, tmp_path):
    url = applied_db("phase1")
    result = invoke("phase2a", "--yes", "--tz", "America/Guayaquil", url=url, output_dir=tmp_path)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert re.match(r"phase phase2a done: 1,037 rows copied, 3 quarantined, validation passed, in [\d.]+ s\n", out)
    steps = re.findall(r"^(preflight|backup|schema|copy|validate) +\d\d:\d\d:\d\d +[\d.]+ s$", out, re.M)
    assert steps == ["preflight", "backup", "schema", "copy", "validate"]
    assert re.search(r"^step +started \(America/Guayaquil\) +took$", out, re.M)
    assert re.search(r"^public\.professions +public\.profesiones +40 +40 +0 +[\d.]+ +[\d,-]+ +OK$", out, re.M)
    assert re.search(r"^public\.customers +public\.clientes +1,000 +997 +3 +[\d.]+ +[\d,-]+ +OK$", out, re.M)
    assert re.search(r"^total +1,040 +1,037 +3 +[\d.]+ +[\d,]+$", out, re.M)
    assert re.search(r"^  public\.clientes +3 +22P02 +invalid input syntax for type json ", out, re.M)
    assert out.rstrip().endswith("next:   migrate-data phase2b    (first look at the 3 quarantined rows in the report)")


def test_format_json_on_every_command_that_reports(applied_db, tmp_path):
    url = applied_db("phase1")
    ran = json.loads(invoke("phase2a", "--yes", "--format", "json", url=url, output_dir=tmp_path).stdout)
    assert [s["step"] for s in ran["steps"]] == ["preflight", "backup", "schema", "copy", "validate"]
    assert ran["status"] == "done" and ran["exit_code"] == 0 and ran["next"].startswith("migrate-data phase2b")
    assert {t["target"]: t["rows_written"] for t in ran["tables"]} == {"public.profesiones": 40, "public.clientes": 997}
    for args in (
        ("status",),
        ("history",),
        ("plan", "phase2b"),
        ("validate", "phase2a"),
        ("rollback", "phase2a", "--dry-run"),
        ("phase2b", "--dry-run"),
    ):
        result = invoke(*args, "--format", "json", url=url, output_dir=tmp_path)
        assert result.exit_code == 0, (args, result.stderr)
        json.loads(result.stdout)
    rolled = json.loads(invoke("rollback", "phase2a", "--yes", "--format", "json", url=url, output_dir=tmp_path).stdout)
    assert rolled["deleted"] == {"public.clientes": 997, "public.profesiones": 40}


def test_status_and_history_show_real_rows_and_times_in_the_users_zone(applied_db, settings_for, tmp_path):
    url = applied_db("phase2a")
    settings = settings_for(url)
    run(api.run_phase(settings, "phase2a", api.RunOptions(backup=False, recheck=True)))  # writes nothing new
    status = invoke("status", "--tz", "America/Guayaquil", url=url, output_dir=tmp_path)
    assert "last run (America/Guayaquil)" in status.stdout
    assert re.search(r"^phase2a +applied +run done \d{4}-\d\d-\d\d \d\d:\d\d +1,037 +3 +passed", status.stdout, re.M)
    started = json.loads(invoke("history", "--format", "json", "--tz", "Asia/Tokyo", url=url).stdout)[0]
    assert started["started"].endswith("+09:00") and started["rows"] == 0  # a recheck writes no new rows
    history = invoke("history", "--tz", "Asia/Tokyo", url=url)
    assert "started (Asia/Tokyo)" in history.stdout


def test_a_phase_that_drops_tables_lists_them_with_their_rows_and_how_to_restore(applied_db, tmp_path, monkeypatch):
    url = applied_db("phase4")
    monkeypatch.setattr(cli.base, "interactive", lambda: True)
    result = invoke("phase5", url=url, output_dir=tmp_path, input="n\n")
    assert result.exit_code == 2
    prompt = result.stderr
    assert "DROPS 9 tables, " in prompt
    assert re.search(r"^    customers +1,000 rows$", prompt, re.M)
    assert re.search(r"^    messages +2,000 rows$", prompt, re.M)
    assert "to restore them: migrate-data rollback phase5" in prompt
    assert "not confirmed: did not run phase5; nothing was done" in prompt
    assert sql(url, "SELECT to_regclass('customers') IS NOT NULL")[0][0] is True


@pytest.mark.parametrize("command", ["status", "history", "plan"])
def test_commands_without_a_database_say_how_to_give_one(command):
    args = (command, "phase2a") if command == "plan" else (command,)
    result = invoke(*args, url=None)
    assert result.exit_code == 2 and "HINT: set DATABASE_URL, pass --database-url" in result.stderr
