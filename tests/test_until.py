"""--until HH:MM --tz ZONE: which night it means, when it is refused, how it is printed and resumed."""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

import pytest

from conftest import ROOT, run, scalar
from migrate_data import api, cli
from migrate_data.cli import times
from migrate_data.errors import BadInput, RefusedError, Stopped

GYE = ZoneInfo("America/Guayaquil")  # UTC-5, no DST
NY = ZoneInfo("America/New_York")


def at(zone, *fields):
    return dt.datetime(*fields, tzinfo=zone)


@pytest.mark.parametrize(
    "now, until, expected",
    [
        (at(GYE, 2026, 11, 22, 23, 0), "05:30", at(GYE, 2026, 11, 23, 5, 30)),  # tonight's window
        (at(GYE, 2026, 11, 23, 0, 0, 30), "05:30", at(GYE, 2026, 11, 23, 5, 30)),  # just after midnight: today
        (at(GYE, 2026, 11, 22, 17, 31), "05:30", at(GYE, 2026, 11, 23, 5, 30)),  # 12 h 01 min ago: the next one
        (at(GYE, 2026, 11, 23, 5, 28, 59), "5:30", at(GYE, 2026, 11, 23, 5, 30)),  # 61 s left is enough
    ],
)
def test_until_means_the_next_occurrence_in_the_given_zone(now, until, expected):
    deadline = times.until_deadline(until, "America/Guayaquil", now=now)
    assert deadline == expected and deadline.tzinfo == GYE
    assert times.label(deadline) == f"{expected:%H:%M} America/Guayaquil"


@pytest.mark.parametrize(
    "now, until, message",
    [
        (at(GYE, 2026, 11, 23, 5, 31), "05:30", "05:30 America/Guayaquil has passed (1 min ago)"),
        (at(GYE, 2026, 11, 22, 17, 29), "05:30", "05:30 America/Guayaquil has passed (11 h 59 min ago)"),
        # the minute after midnight: yesterday's 23:59, not a deadline 24 h ahead
        (at(GYE, 2026, 11, 23, 0, 0, 30), "23:59", "23:59 America/Guayaquil has passed (1 min ago)"),
        (at(GYE, 2026, 11, 23, 5, 29, 30), "05:30", "closes at 05:30 America/Guayaquil, in 30 s: too soon for a batch"),
        (at(GYE, 2026, 11, 23, 5, 30), "05:30", "05:30 America/Guayaquil has passed"),
    ],
)
def test_until_refuses_a_time_that_passed_or_is_too_close(now, until, message):
    with pytest.raises(BadInput, match=re.escape(message)) as e:
        times.until_deadline(until, "America/Guayaquil", now=now)
    assert e.value.exit_code == 2


def test_until_counts_real_hours_across_a_dst_change():
    # 2026-03-08: New York skips 02:00-03:00.  At 23:00 the night before, 05:30 is 5 h 30 min away, not 6 h 30.
    deadline = times.until_deadline("05:30", "America/New_York", now=at(NY, 2026, 3, 7, 23, 0))
    assert deadline.astimezone(dt.timezone.utc) == dt.datetime(2026, 3, 8, 9, 30, tzinfo=dt.timezone.utc)
    # 16:00 the next day: 05:30 was 10 h 30 min ago in real time (11 h 30 min on the wall clock): passed
    with pytest.raises(BadInput, match="has passed \\(10 h 30 min ago\\)"):
        times.until_deadline("05:30", "America/New_York", now=at(NY, 2026, 3, 8, 16, 0))


def test_until_in_a_skipped_hour_is_when_the_clocks_jump_and_a_repeated_hour_is_its_first_time():
    skipped = times.until_deadline("02:30", "America/New_York", now=at(NY, 2026, 3, 8, 0, 30))
    assert skipped.astimezone(dt.timezone.utc) == dt.datetime(2026, 3, 8, 7, 0, tzinfo=dt.timezone.utc)
    assert times.label(skipped) == "03:00 America/New_York"
    repeated = times.until_deadline("01:30", "America/New_York", now=at(NY, 2026, 11, 1, 0, 30))
    assert repeated.astimezone(dt.timezone.utc) == dt.datetime(2026, 11, 1, 5, 30, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    "until, tz, message",
    [("5", None, "expected HH:MM"), ("24:00", None, "expected HH:MM"), ("05:30", "Mars/Olympus", "unknown time zone")],
)
def test_until_rejects_bad_input(until, tz, message):
    with pytest.raises(BadInput, match=message):
        times.until_deadline(until, tz, now=dt.datetime(2026, 11, 23, 1, 0, tzinfo=dt.timezone.utc))


# -- the command ---------------------------------------------------------------------------------------------------
def hhmm(delta: dt.timedelta) -> str:
    return (dt.datetime.now(GYE) + delta).strftime("%H:%M")


def migrate_data(monkeypatch, capsys, url, out_dir, *args) -> tuple[int, str]:
    """Run the real command in-process (``main``, which decides exit codes); return the exit code and stderr."""
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("MIGRATE_DATA_OUTPUT_DIR", str(out_dir))
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    return e.value.code, capsys.readouterr().err


def test_passed_until_is_refused_before_anything_runs(applied_db, settings_for, tmp_path, monkeypatch, capsys):
    url = applied_db("phase1")
    settings = settings_for(url)
    runs = scalar(url, "SELECT count(*) FROM migrate_data.runs")
    past = hhmm(-dt.timedelta(minutes=2))
    code, err = migrate_data(
        monkeypatch, capsys, url, tmp_path, "phase2a", "--yes", "--until", past, "--tz", "America/Guayaquil"
    )
    assert code == 2
    assert f"ERROR: --until {past}: {past} America/Guayaquil has passed (2 min ago)" in err
    assert not settings.backups_dir.exists()
    assert scalar(url, "SELECT count(*) FROM migrate_data.runs") == runs


def test_window_closing_in_under_a_minute_refuses_before_the_backup(applied_db, settings_for):
    # what the CLI checks at parse time, the library checks again before the backup (a confirmation may have waited)
    url = applied_db("phase1")
    settings = settings_for(url)
    deadline = dt.datetime.now(GYE) + dt.timedelta(seconds=30)
    with pytest.raises(RefusedError, match=f"closes at {deadline:%H:%M} America/Guayaquil, too soon for a batch"):
        run(api.run_phase(settings, "phase2a", api.RunOptions(deadline=deadline)))
    assert not settings.backups_dir.exists()
    assert scalar(url, "SELECT state FROM migrate_data.phases WHERE phase = 'phase2a'") is None
    assert scalar(url, "SELECT count(*) FROM clientes") == 0


def test_until_is_printed_in_the_given_zone_and_the_resume_hint_keeps_until_and_tz(
    legacy_url, tmp_path, monkeypatch, capsys
):
    seen = {}

    async def stopped(settings, name, options, **kw):
        seen["deadline"] = options.deadline
        raise Stopped("stopped cleanly at a checkpoint: interrupted by a signal")

    monkeypatch.setattr(api, "run_phase", stopped)
    later = hhmm(dt.timedelta(hours=3))
    code, err = migrate_data(
        monkeypatch, capsys, legacy_url, tmp_path, "phase2a", "--yes", "--until", later, "--tz", "America/Guayaquil"
    )
    assert code == 130
    assert seen["deadline"].tzinfo == GYE and f"{seen['deadline']:%H:%M}" == later
    assert f"the window closes at {later} America/Guayaquil" in err
    assert f"HINT: resume with: migrate-data phase2a --yes --until {later} --tz America/Guayaquil" in err
