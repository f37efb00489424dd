"""A throwaway local PostgreSQL (the ``pgserver`` package) for people with no server at hand."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInput

log = logging.getLogger(__name__)


def _import_pgserver():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pgserver  # type: ignore[import-untyped]
    return pgserver


def bundled_bin_dir() -> Path | None:
    """The bin/ of the embedded PostgreSQL (pg_dump, pg_restore, psql), when it is installed."""
    try:
        return Path(_import_pgserver().__file__).parent / "pginstall" / "bin"
    except ImportError:
        return None


@contextmanager
def embedded_server(data_dir: Path | None = None, *, keep: bool = False) -> Iterator[tuple[str, Path]]:
    """Start an embedded PostgreSQL; yield ``(url, data_dir)``; stop it (and delete it unless ``keep``)."""
    try:
        pgserver = _import_pgserver()
    except ImportError as e:
        raise BadInput(
            "the embedded PostgreSQL is not installed",
            hint="pip install 'migrate-data[embedded]', or give a server with DATABASE_URL",
        ) from e
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="migrate-data-pg-")
        data_dir = Path(tmp.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(str(data_dir), cleanup_mode="stop" if keep else "delete")
    try:
        url = server.get_uri()
        log.info("embedded PostgreSQL in %s", data_dir)
        yield url, data_dir
    finally:
        server.cleanup()
        if tmp is not None and not keep:
            tmp.cleanup()
