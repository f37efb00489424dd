"""Where the databases are and how to talk to them: flags, then environment, then defaults."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import BadInput

APPLICATION_NAME = "migrate-data"


def redact(url: str | None) -> str:
    """Return ``url`` with its password replaced by ``***``; safe to print or log."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"(?<=:)[^:@/]*(?=@)", "***", url)
    if not parts.password:  # none, or empty (the embedded server's postgres:@)
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0] + ":***"
    return urlunsplit((parts.scheme, userinfo + "@" + netloc[1], parts.path, parts.query, parts.fragment))


_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s]*:)[^@\s]*@")


def redact_text(text: str, *urls: str | None) -> str:
    """Remove every password of ``urls``, and of any URL in it, from ``text``."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    for url in urls:
        if not url:
            continue
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            text = text.replace(password, "***")
        text = text.replace(url, redact(url))
    return text


def asyncpg_dsn(url: str) -> str:
    """Accept SQLAlchemy-style URLs too (``postgresql+asyncpg://``) and return a libpq URL."""
    return re.sub(r"^postgres(?:ql)?(\+\w+)?://", "postgresql://", url)


def sqlalchemy_url(url: str) -> str:
    """Return the URL with the asyncpg driver SQLAlchemy needs."""
    return re.sub(r"^postgres(?:ql)?(\+\w+)?://", "postgresql+asyncpg://", url)


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to reach the databases and the project."""

    database_url: str
    source_url: str | None = None
    project_dir: Path = field(default_factory=Path.cwd)
    statement_timeout: str | None = None
    lock_timeout: str | None = "10s"
    output_dir: Path | None = None  # where reports/ and backups/ go (default: the project)

    @property
    def same_database(self) -> bool:
        return self.source_url is None or self.source_url == self.database_url

    @property
    def effective_source_url(self) -> str:
        return self.source_url or self.database_url

    @property
    def mappings_dir(self) -> Path:
        return self.project_dir / "mappings"

    @property
    def reports_dir(self) -> Path:
        return (self.output_dir or self.project_dir) / "reports"

    @property
    def backups_dir(self) -> Path:
        return (self.output_dir or self.project_dir) / "backups"

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


def load_settings(
    *,
    database_url: str | None = None,
    source_url: str | None = None,
    project_dir: str | Path | None = None,
    statement_timeout: str | None = None,
    lock_timeout: str | None = None,
    require_url: bool = True,
) -> Settings:
    """Build settings from explicit values, then ``DATABASE_URL`` / ``SOURCE_DATABASE_URL``."""
    url = database_url or os.environ.get("DATABASE_URL")
    if not url and require_url:
        raise BadInput(
            "no target database",
            hint="set DATABASE_URL, pass --database-url, or use --embedded for a throwaway server",
        )
    return Settings(
        database_url=url or "",
        source_url=source_url or os.environ.get("SOURCE_DATABASE_URL") or None,
        project_dir=Path(project_dir).resolve() if project_dir else find_project(Path.cwd()),
        statement_timeout=statement_timeout or os.environ.get("MIGRATE_DATA_STATEMENT_TIMEOUT"),
        lock_timeout=lock_timeout or os.environ.get("MIGRATE_DATA_LOCK_TIMEOUT") or "10s",
        output_dir=Path(os.environ["MIGRATE_DATA_OUTPUT_DIR"]) if os.environ.get("MIGRATE_DATA_OUTPUT_DIR") else None,
    )


def find_project(start: Path) -> Path:
    """Return the nearest directory at or above ``start`` that holds ``mappings/`` or ``alembic.ini``."""
    for d in (start, *start.parents):
        if (d / "mappings").is_dir() or (d / "alembic.ini").is_file():
            return d
    return start
