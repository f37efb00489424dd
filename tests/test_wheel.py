"""The demo works anywhere: the package built as a wheel and installed into a fresh virtualenv (not the source
tree) runs ``migrate-data demo`` from an empty directory.  Slow (a build, an install, the demo: about a minute):
``-m "not slow"`` leaves it out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "reports", "backups")


def sh(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_demo_runs_from_an_installed_wheel_in_an_empty_directory(tmp_path, make_db):
    source = tmp_path / "source"  # what the repository holds, nothing a build or a run left there
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", source, "-w", tmp_path / "dist", cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("migrate_data-*.whl")
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    # with the embedded extra, as the README installs it: its PostgreSQL's pg_dump backs up an embedded server
    sh(venv / "bin" / "python", "-m", "pip", "install", "-q", f"{wheel}[embedded]", cwd=tmp_path)
    installed = Path(
        sh(venv / "bin" / "python", "-c", "import migrate_data; print(migrate_data.__file__)", cwd=tmp_path).strip()
    )
    assert installed.is_relative_to(venv)
    sample = installed.parent / "sample"
    for name in (
        "alembic.ini",
        "alembic/versions/phase5.py",
        "alembic/sql/legacy_schema.sql",
        "mappings/phase3.yaml",
        "scripts/seed_legacy.py",
    ):
        assert (sample / name).read_bytes() == (ROOT / name).read_bytes(), name  # the repository's files, copied

    empty = tmp_path / "anywhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIGRATE_DATA_", "PYTHON", "VIRTUAL_ENV"))}
    env["DATABASE_URL"] = make_db()  # an empty database (the demo refuses one that has the sample already)
    out = sh(venv / "bin" / "migrate-data", "demo", cwd=empty, env=env)
    assert "seeded the legacy database at scale 0.002" in out
    assert "phase phase3 rolled back" in out
    assert f"reports are in {empty / 'reports'}" in out
    assert sorted(p.name for p in empty.iterdir()) == ["backups", "reports"]
