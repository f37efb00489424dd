"""The HTML report tells the truth at a glance: the verdict and the next step first, a step timeline, per-table bars
that differ when the rows do, the quarantine by cause; it fits a 1150 px window (and 1920 px) in a real browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from clikit import invoke

from conftest import sql
from migrate_data import rehearsal, report
from migrate_data.rehearsal import Drift, PhasePrediction, RehearsalResult, Step, TablePrediction
from migrate_data.validate import TableValidation, ValidationResult

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTHS = (1150, 1920)


def _validation(**table: object) -> ValidationResult:
    t = TableValidation(**{"source": "public.customers", "target": "public.clientes", "rejected": 0, **table})  # type: ignore[arg-type]
    return ValidationResult("phase2a", t.status == "ok", (t,), (), True, "2026-11-23T08:00:00+00:00", 0.4)


def _target_track(page: str) -> str:
    return re.findall(r"<div class='track'>(.*?)</div></td>", page)[0]


def test_a_failed_table_never_draws_two_equal_bars():
    page = report.to_html(_validation(source_rows=2_000_000, target_rows=1_999_998, status="failed"))
    track = _target_track(page)
    assert "title='2 missing'" in track and "seg m" in track  # 2 rows in 2,000,000: still drawn (min width)
    assert "Failed.</b> Next:" in page and "migrate-data rollback phase2a" in page
    differs = report.to_html(_validation(source_rows=100, target_rows=100, differs=3, status="failed"))
    assert "title='3 in the target but different'" in _target_track(differs)
    ok = report.to_html(_validation(source_rows=100, target_rows=97, rejected=3, status="ok"))
    assert "title='97 in the target'" in _target_track(ok) and "title='3 quarantined'" in _target_track(ok)
    assert "seg m" not in _target_track(ok)


def test_names_and_messages_from_the_database_cannot_inject_markup_into_the_report():
    hostile = "<script>alert('x')</script>"
    result = replace(
        _validation(source_rows=10, target_rows=9, status="failed", problems=(f"{hostile} differs",)),
        database=f"postgresql://h/{hostile}",
        rejects=({"target": hostile, "source_key": [hostile], "sqlstate": "22P02", "message": hostile},),
    )
    page = report.to_html(result, steps=[(hostile, 0.0, 1.0)], next_step=f"see {hostile}; migrate-data rollback x")
    assert "<script>" not in page and page.count("&lt;script&gt;") >= 5
    assert "<code>migrate-data rollback x</code>" in page  # the command is still shown as code


def test_the_timeline_scales_with_the_page():
    html = report.timeline_html([("backup", [("backup", 0.5, 1.5)]), ("copy", [("copy", 2.0, 8.0)])])
    assert "left:5.00%;width:15.00%" in html and "left:20.00%;width:80.00%" in html
    assert "<svg" not in html and "px" not in re.sub(r"\d+px", "", html.split("<div class='timeline'")[1])


def _rehearsal() -> RehearsalResult:
    phases = ("phase2a", "phase2b", "phase3")
    tables = ("public.solicitudes_servicio_historicas_con_nombre_largo", "public.mensajes", "public.clientes")
    steps, t = [], 0.0
    for phase in phases:
        for step in ("run", "rollback", "rerun", "recheck"):
            for table in tables:
                steps.append(Step(phase, step, table, t, 3.0, 40_000))
                t += 3.0
    return RehearsalResult(
        phases=phases,
        staging="postgresql://dba@staging.internal/tinkubot_rehearsal",
        production="postgresql://dba@db.internal/tinkubot",
        built="template",
        steps=tuple(steps),
        tables=tuple(
            TablePrediction(p, tb, tb, 40_000, 4_000_000, 3.0, 13_333, 300.0) for p in phases for tb in tables
        ),
        predictions=tuple(PhasePrediction(p, 36.0, 3_600.0, 2_520.0, 4_680.0, 180.0, p != "phase3") for p in phases),
        drift=(Drift("values", "public.clientes", "production has 'sticker' in status, staging does not"),),
        window="02:00-06:00 America/Guayaquil",
        window_seconds=14_400.0,
        started_at="2026-11-23T08:00:00+00:00",
        seconds=t,
        validations_ok=True,
    )


def _browser(page: Path, out: Path, width: int) -> tuple[Path, int, int]:
    """A screenshot of ``page`` at ``width`` px, and the page's scroll width against the window's."""
    common = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    common += ["--hide-scrollbars", f"--window-size={width},1000"]
    shot = out / f"{page.stem}-{width}.png"
    subprocess.run(
        [CHROMIUM, *common, f"--user-data-dir={out / 'profile-shot'}", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=90,
    )
    probe = out / f"{page.stem}-probe.html"
    probe.write_text(
        page.read_text().replace(
            "</body>",
            "<script>document.body.setAttribute('data-fit', document.documentElement.scrollWidth + 'x' + "
            "window.innerWidth)</script></body>",
        )
    )
    dom = subprocess.run(
        [CHROMIUM, *common, f"--user-data-dir={out / 'profile-dom'}", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
    ).stdout
    m = re.search(r'data-fit="(\d+)x(\d+)"', dom)
    assert m, dom[:500]
    return shot, int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_reports_fit_1150_and_1920_px_in_chromium(applied_db, tmp_path):
    url = applied_db("phase1")
    ran = invoke("phase2a", "--yes", "--no-backup", url=url, output_dir=tmp_path)
    assert ran.exit_code == 0, ran.stderr
    passed = Path(next(line.split(": ", 1)[1] for line in ran.stdout.splitlines() if line.startswith("report: ")))
    assert "<h2>Steps</h2>" in passed.read_text() and "migrate-data phase2b</code>" in passed.read_text()
    sql(url, "DELETE FROM clientes WHERE id IN (SELECT id FROM clientes ORDER BY id LIMIT 2)")
    sql(url, "UPDATE clientes SET ciudad = 'Otra' WHERE id = (SELECT id FROM clientes ORDER BY id DESC LIMIT 1)")
    failed = tmp_path / "failed.html"
    assert invoke("validate", "phase2a", "--deep", "--format", "html", "--output", str(failed), url=url).exit_code == 3
    rehearsed = tmp_path / "rehearsal.html"
    rehearsed.write_text(rehearsal.rehearsal_html(_rehearsal()))
    keep = Path(os.environ["MIGRATE_DATA_SCREENSHOTS"]) if os.environ.get("MIGRATE_DATA_SCREENSHOTS") else None
    for page in (passed, failed, rehearsed):
        for width in WIDTHS:
            shot, scroll, window = _browser(page, tmp_path, width)
            assert shot.is_file() and shot.stat().st_size > 10_000
            assert scroll <= window, f"{page.name} is {scroll} px wide in a {window} px window"
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, keep / f"{'passed' if page == passed else page.stem}-{width}.png")
    text = failed.read_text()
    assert "title='2 missing'" in text and "title='1 in the target but different'" in text
