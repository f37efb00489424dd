"""Files that hold customer data (backups, reports with rejected rows, rollback dumps).

They are created owner-only (0600) in owner-only directories (0700), with ``O_CREAT | O_EXCL``: an existing file
or symlink is never followed, truncated or overwritten.  Every ``OSError`` becomes a :class:`MigrationError` naming
the path, so it never reaches ``api.database_errors`` (which reads an ``OSError`` as a lost connection).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Any

from .errors import MigrationError

DIR_MODE = 0o700
FILE_MODE = 0o600
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) if needed and make it 0700; return it.

    An existing directory that others may read is tightened when it is ours, refused when it is not."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        st = path.stat()
    except OSError as e:
        raise MigrationError(f"cannot create the directory {path}: {e.strerror or e}") from e
    if stat.S_IMODE(st.st_mode) & 0o077:
        try:
            os.chmod(path, DIR_MODE)
        except OSError as e:
            raise MigrationError(
                f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}) and cannot be made private",
                detail=str(e.strerror or e),
                hint=f"chmod 700 {path}, or write elsewhere with MIGRATE_DATA_OUTPUT_DIR",
            ) from e
    return path


def open_private(path: Path, mode: str = "wb", *, encoding: str = "utf-8") -> IO[Any]:
    """Create ``path`` with mode 0600 and open it for writing (``"w"`` text, ``"wb"`` binary).

    Refuses when anything (a file, a symlink) is already there."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_private: mode {mode!r}: expected 'w' or 'wb'")
    try:
        fd = os.open(path, _CREATE, FILE_MODE)
    except FileExistsError as e:
        raise MigrationError(
            f"{path} already exists; not overwriting it", hint="move it away, or wait a moment and run again"
        ) from e
    except OSError as e:
        raise MigrationError(f"cannot create {path}: {e.strerror or e}") from e
    try:
        os.fchmod(fd, FILE_MODE)  # the umask can only take bits away; make it exactly 0600
        return os.fdopen(fd, mode, encoding=encoding if mode == "w" else None)
    except BaseException:
        os.close(fd)
        raise


def write_private(path: Path, data: str | bytes, *, replace: bool = False) -> Path:
    """Write ``data`` to a new 0600 file ``path`` and fsync it; return ``path``.

    ``replace=True`` is for a file the tool keeps up to date (``predictions.json``): the new content goes to a
    private temporary file in the same directory that then atomically takes the old one's place."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if not replace:
        try:
            with open_private(path, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            path.unlink(missing_ok=True)
            raise MigrationError(f"cannot write {path}: {e.strerror or e}") from e
        fsync_dir(path.parent)
        return path
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL, 0600
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise MigrationError(f"cannot write {path}: {e.strerror or e}") from e
    fsync_dir(path.parent)
    return path


def move_no_replace(src: Path, dst: Path) -> Path:
    """Give ``src`` the name ``dst`` (same directory or file system); refuse when ``dst`` exists."""
    try:
        os.link(src, dst)  # fails with EEXIST instead of replacing, unlike rename()
    except FileExistsError as e:
        raise MigrationError(f"{dst} already exists; not overwriting it", hint="move it away and run again") from e
    except OSError as e:
        # A file system without hard links: check, then rename (a race only with someone writing this exact name).
        if os.path.lexists(dst):
            raise MigrationError(f"{dst} already exists; not overwriting it") from e
        try:
            os.rename(src, dst)
        except OSError as e2:
            raise MigrationError(f"cannot rename {src} to {dst}: {e2.strerror or e2}") from e2
    else:
        src.unlink()
    fsync_dir(dst.parent)
    return dst


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    """Bytes free for us on the file system of ``path``."""
    return shutil.disk_usage(path).free


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
