"""Files that hold customer data: owner-only, never overwritten, no half-written backup left, room checked first."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
from collections import namedtuple
from pathlib import Path

import pytest

from conftest import ROOT, run, scalar
from killer import kill_at
from migrate_data import api, backup, files
from migrate_data.errors import MigrationError, RefusedError
from migrate_data.mapping import QualifiedName


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def loose_umask():
    """A umask that would leave files readable by everyone: the modes must not depend on the umask."""
    old = os.umask(0o002)
    yield
    os.umask(old)


def major(url: str) -> int:
    return int(scalar(url, "SHOW server_version_num")) // 10000


CUSTOMERS = [QualifiedName("public", "customers")]


# -- the helpers -----------------------------------------------------------------------------------------------
def test_private_dir_creates_0700_and_tightens_an_existing_open_one(tmp_path, loose_umask):
    new = files.private_dir(tmp_path / "a" / "backups")
    assert mode(new) == 0o700
    old = tmp_path / "reports"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    files.private_dir(old)
    assert mode(old) == 0o700


def test_write_private_is_0600_and_refuses_an_existing_file_or_symlink(tmp_path, loose_umask):
    p = files.write_private(tmp_path / "r.json", "{}")
    assert mode(p) == 0o600 and p.read_text() == "{}"
    with pytest.raises(MigrationError, match="already exists; not overwriting it"):
        files.write_private(p, "new")
    assert p.read_text() == "{}"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(MigrationError, match="already exists"):
        with files.open_private(tmp_path / "link", "w") as f:
            f.write("x")
    assert victim.read_text() == "keep"


def test_write_private_replace_swaps_the_content_and_stays_0600(tmp_path, loose_umask):
    p = tmp_path / "predictions.json"
    p.write_text("old")
    os.chmod(p, 0o644)
    files.write_private(p, "new", replace=True)
    assert p.read_text() == "new" and mode(p) == 0o600
    assert [q.name for q in tmp_path.iterdir()] == ["predictions.json"]  # no temporary file left


def test_move_no_replace_keeps_the_existing_file(tmp_path):
    src, dst = tmp_path / "a.partial", tmp_path / "a.dump"
    src.write_text("new")
    dst.write_text("old")
    with pytest.raises(MigrationError, match="already exists"):
        files.move_no_replace(src, dst)
    assert dst.read_text() == "old" and src.exists()


def test_human_bytes():
    assert [files.human_bytes(n) for n in (512, 1536, 5 * 1024**3 + 1024**3 // 2)] == [
        "512 bytes",
        "1.5 KiB",
        "5.5 GiB",
    ]


def test_partial_being_written_is_left_alone_and_a_stale_one_removed(tmp_path):
    busy = tmp_path / "phase2a-20261122T020000000000Z.partial"
    stale = tmp_path / "phase2a-20261121T020000000000Z.partial"
    other = tmp_path / "phase2a-x-20261121T020000000000Z.partial"  # another phase's
    for p in (busy, stale, other):
        p.write_bytes(b"PGDMP")
    with open(busy, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        removed = backup.remove_stale_partials(tmp_path / "phase2a-20261123T020000000000Z.dump")
    assert removed == [stale]
    assert busy.exists() and other.exists() and not stale.exists()


# -- backups and reports of a real phase ----------------------------------------------------------------------------
def test_phase_backup_and_reports_are_owner_only(legacy_url, settings_for, loose_umask):
    settings = settings_for(legacy_url)
    run(api.run_phase(settings, "phase1", api.RunOptions(backup=False)))
    result = run(api.run_phase(settings, "phase2a", api.RunOptions(batch_size=500)))
    assert result.status == "done" and result.backup_path
    assert mode(settings.backups_dir) == 0o700 and mode(settings.reports_dir) == 0o700
    written = [*settings.backups_dir.iterdir(), *settings.reports_dir.iterdir()]
    assert {p.suffix for p in written} == {".dump", ".json", ".html"}
    assert {p.name: mode(p) for p in written} == {p.name: 0o600 for p in written}
    assert "invalid input syntax for type json" in Path(result.reports["html"]).read_text()  # rows of customers


def test_dump_never_overwrites_an_existing_backup(legacy_url, tmp_path):
    path = tmp_path / "backups" / "phase2a-20261122T020000000000Z.dump"
    path.parent.mkdir()
    path.write_bytes(b"last night's backup")
    with pytest.raises(MigrationError, match="already exists; not overwriting it"):
        run(backup.dump(legacy_url, CUSTOMERS, path, server_major=major(legacy_url)))
    assert path.read_bytes() == b"last night's backup"
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_failed_pg_dump_leaves_no_partial_file(legacy_url, tmp_path):
    path = tmp_path / "backups" / "phase2a-20261122T020000000000Z.dump"
    with pytest.raises(MigrationError, match="pg_dump failed") as e:
        run(backup.dump(legacy_url, [QualifiedName("public", "no_such_table")], path, server_major=major(legacy_url)))
    assert "no matching tables" in (e.value.detail or "")
    assert list(path.parent.iterdir()) == []


def test_dump_killed_after_pg_dump_leaves_a_partial_that_the_next_run_removes(applied_db, settings_for, tmp_path):
    url = applied_db("phase1")
    settings = settings_for(url)
    killed = kill_at(
        "migrate_data.backup:_run:return",  # pg_dump finished, not yet verified nor renamed
        "phase2a",
        "--yes",
        url=url,
        cwd=ROOT,
        env={"MIGRATE_DATA_OUTPUT_DIR": str(tmp_path)},
    )
    assert killed.returncode == -9, killed.stderr
    (left,) = settings.backups_dir.iterdir()
    assert left.name.startswith("phase2a-") and left.suffix == ".partial"
    assert left.stat().st_size > 0 and mode(left) == 0o600
    result = run(api.run_phase(settings, "phase2a", api.RunOptions()))
    assert result.status == "done"
    assert [p.name for p in settings.backups_dir.iterdir()] == [Path(result.backup_path).name]


def test_too_little_disk_space_refuses_before_the_dump_with_the_numbers(applied_db, settings_for, monkeypatch):
    url = applied_db("phase1")
    settings = settings_for(url)
    need = scalar(
        url,
        "SELECT sum(pg_table_size(c))::bigint FROM unnest(ARRAY['public.professions', 'public.customers', "
        "'public.profesiones', 'public.clientes']::regclass[]) c",
    )
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 1024**3, 10 * 1024**3 - 2048, 2048))
    with pytest.raises(RefusedError, match="not enough disk space for the backup") as e:
        run(api.run_phase(settings, "phase2a", api.RunOptions()))
    assert e.value.detail == (
        f"the tables take {files.human_bytes(need)} ({need:,} bytes) without indexes; 2.0 KiB (2,048 bytes) are free"
    )
    assert e.value.hint and "MIGRATE_DATA_OUTPUT_DIR" in e.value.hint
    assert list(settings.backups_dir.iterdir()) == []
    assert scalar(url, "SELECT state FROM migrate_data.phases WHERE phase = 'phase2a'") is None
    assert scalar(url, "SELECT count(*) FROM clientes") == 0
