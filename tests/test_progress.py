"""What the DBA sees while a phase runs: steps from the first second, per-table rows/s and ETA, an overall line;
lines for logs without a terminal, bars on one; a running phase's progress in `status` from another terminal."""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

from clikit import invoke
from test_exit_codes import slow_project, start_night, wait_for_rows

from conftest import ROOT, run_cli, scalar, sql
from migrate_data import console, human
from migrate_data.copier import CopyEvent


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_tracker_rates_eta_and_the_window():
    clock = FakeClock()
    deadline = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    t = console.Tracker("phase2a", deadline=deadline, clock=clock)
    t(CopyEvent.step("preflight", "2 tables"))
    clock.now += 1
    t(CopyEvent.step("copy", "2 tables"))
    t(CopyEvent("start", "public.clientes", 0, 50_000))
    t(CopyEvent("start", "public.profesiones", 0, 40))
    clock.now += 1.5
    t(CopyEvent("batch", "public.clientes", 12_000, 50_000, 12_000, 0, 1.5))
    t(CopyEvent("done", "public.profesiones", 40, 40, 40, 0, 0.1))
    assert [s.name for s in t.steps] == ["preflight", "copy"] and t.steps[0].seconds == 1.0
    clientes = t.tables["public.clientes"]
    assert clientes.rate(clock.now) == 8_000 and clientes.eta(clock.now) == 38_000 / 8_000
    o = t.overall()
    assert (o["rows"], o["total"], o["pct"]) == (12_040, 50_040, 24)
    assert o["fits"] is True and 7_100 < o["left"] <= 7_200
    assert console.progress_line("phase2a", clientes, clock.now) == (
        "progress phase=phase2a table=public.clientes rows=12,000/50,000 pct=24 rate=8,000/s eta=5s"
    )
    assert re.fullmatch(
        r"progress phase=phase2a table=\* step=copy rows=12,040/50,040 pct=24 rate=8,027/s eta=5s elapsed=2s "
        r"left=(1h59m|2h00m) fits=yes",
        console.overall_line(t),
    )


def test_durations_and_numbers_read_like_a_person_wrote_them():
    assert [human.dur(s) for s in (0.04, 12.4, 185, 3725)] == ["0.0 s", "12 s", "3 min 05 s", "1 h 02 min"]
    assert [human.short_dur(s) for s in (4.2, 185, 3725, None)] == ["4s", "3m05s", "1h02m", "-"]
    assert human.num(1234567.8) == "1,234,568" and human.num(None) == "-"


SMALL = 1500  # rows of the slow table: 2 ms each, about 3 s


def test_without_a_terminal_steps_at_once_and_a_progress_line_every_few_seconds(db_url, tmp_path):
    project = slow_project(tmp_path, db_url)
    sql(db_url, f"DELETE FROM big WHERE id > {SMALL}")
    args = ("night", "--yes", "--no-backup", "--batch-size", "20", "--jobs", "1")  # 75 batches in about 4 s
    ran = run_cli(*args, url=db_url, cwd=project, env={"MIGRATE_DATA_PROGRESS_EVERY": "1"})
    err = ran.stderr
    assert ran.returncode == 0, err
    steps = re.findall(r"^step phase=night step=(\w+) at=\d\d:\d\d:\d\d elapsed=\d+s note=", err, re.M)
    assert steps == ["preflight", "schema", "copy", "validate"]  # --no-backup: no backup step
    progress = re.findall(
        r"^progress phase=night table=public\.grande rows=([\d,]+)/1,500 pct=(\d+) rate=([\d,]+)/s eta=(\d+s|-)$",
        err,
        re.M,
    )
    assert progress, err
    assert any(int(rate.replace(",", "")) > 0 for _, _, rate, _ in progress)
    overall = re.findall(
        r"^progress phase=night table=\* step=\w+ rows=[\d,]+/[\d,]+ pct=\S+ rate=\S+ eta=\S+ elapsed=\d+s$", err, re.M
    )
    assert overall
    assert len(progress) < 10  # a line a second, not one per batch (75 batches)
    assert re.search(r"^done phase=night table=public\.grande read=1,500 written=1,500 quarantined=0 ", err, re.M)
    assert "INFO" not in err  # no log line per batch


def test_on_a_terminal_bars_then_a_hangup_stops_at_a_checkpoint(db_url, tmp_path):
    """The DBA's ssh drops: SIGHUP, the terminal is gone; the run stops at a checkpoint like SIGTERM (exit 130)."""
    project = slow_project(tmp_path, db_url)
    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        import fcntl
        import termios

        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "migrate_data", "night", "--yes", "--no-backup", "--batch-size", "100", "--jobs", "1"],
        cwd=project,
        env=dict(os.environ, DATABASE_URL=db_url, PYTHONPATH=str(ROOT / "src"), COLUMNS="160", TERM="xterm"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=controlling_terminal,
    )
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and b"rows/s" not in screen:
        if select.select([master], [], [], 0.1)[0]:
            screen += os.read(master, 65536)
    wait_for_rows(db_url, proc, 300)
    end = time.monotonic() + 1
    while time.monotonic() < end:
        if select.select([master], [], [], 0.1)[0]:
            screen += os.read(master, 65536)
    os.close(master)  # the terminal hangs up: the kernel sends SIGHUP to its session
    assert proc.wait(timeout=60) == 130
    text = screen.decode(errors="replace")
    assert re.search(r"\[\d\d:\d\d:\d\d \S+\] preflight: 1 tables against the live catalogs", text), text
    assert re.search(r"public\.grande .*[\d,]+/5,000 rows +[\d,]+ rows/s +ETA", text), text
    assert "all tables" in text
    assert scalar(db_url, "SELECT status FROM migrate_data.runs ORDER BY id DESC LIMIT 1") == "stopped"
    assert 0 < scalar(db_url, "SELECT count(*) FROM grande") < 5000


def test_status_from_another_terminal_shows_the_running_phase_live(db_url, tmp_path):
    project = slow_project(tmp_path, db_url)
    proc = start_night(db_url, project)
    try:
        wait_for_rows(db_url, proc, 300)
        result = invoke("status", "--format", "json", url=db_url, project=project)
        text = invoke("status", "--tz", "America/Guayaquil", url=db_url, project=project)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert result.exit_code == 0, result.stderr
    night = json.loads(result.stdout)[0]
    live = night["progress"]
    assert night["state"] == "running" and live["stage"] == "copying"
    assert 300 <= live["rows"] < 5000 and live["total"] == 5000
    assert live["rate"] > 0 and live["eta_seconds"] > 0
    assert live["tables"] == ["public.grande"]
    assert live["started_at"].endswith("-05:00") or live["started_at"].endswith("+00:00")
    row = next(line for line in text.stdout.splitlines() if line.startswith("night"))
    assert re.search(
        r"running .*copying public\.grande: [\d,]+ of ≈5,000 rows \(\d+ %\), [\d,]+ rows/s, ETA ≈ [\d.]+ (s|min)",
        row,
    ), text.stdout
    assert "last run (America/Guayaquil)" in text.stdout
