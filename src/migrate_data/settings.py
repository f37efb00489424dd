"""Where the databases are and how to talk to them: flags, then environment, then defaults.

A database URL is parsed once, by SQLAlchemy's ``make_url``, into a :class:`DatabaseURL`; every consumer
(asyncpg, SQLAlchemy, pg_dump/pg_restore, the logs) gets its own rendering of that one parse, so every spelling
(``?dbname=``, ``?host=/socket``, percent-encoding) means the same database to all of them.  The tool itself
passes the password only as ``asyncpg_connect_args()["password"]`` (a keyword argument) and through ``libpq()``
(``PGPASSWORD`` in a subprocess environment, decoded); ``str()``/``repr()``/``redacted()`` never show it.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from .errors import BadInput

APPLICATION_NAME = "migrate-data"

_SCHEME = re.compile(r"^postgres(?:ql)?(?:\+\w+)?$")
_MASK = "***"
# query parameters libpq reads as the URL's parts; the query wins over the URL's parts, as in libpq
_PART_PARAMS = ("user", "password", "host", "port", "dbname", "database")


@dataclass(frozen=True, repr=False)
class DatabaseURL:
    """A PostgreSQL URL, parsed once.

    ``host`` is a name, an address, a unix-socket directory or several of them joined by ``,``; ``port`` is a
    string for the same reason.  ``params`` are the remaining query parameters (``sslmode``, ...), in order.
    ``str()`` and ``repr()`` are redacted.
    """

    scheme: str
    user: str | None = None
    password: str | None = None
    host: str | None = None
    port: str | None = None
    database: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    text: str = field(default="", compare=False)  # as given, for scrubbing it out of error texts

    @staticmethod
    def parse(url: str | DatabaseURL) -> DatabaseURL:
        """Parse ``url``; raise :class:`BadInput`, without echoing any password, when it is not a usable URL."""
        if isinstance(url, DatabaseURL):
            return url
        return _parse(url)

    # -- renderings -------------------------------------------------------------------------------------------
    def _render(self, *, scheme: str, password: str | None, display: bool = False) -> str:
        q = functools.partial(quote, safe="/:," if display else "")
        auth = q(self.user) if self.user else ""
        if password:
            auth += ":" + (password if display else q(password))
        netloc = auth + "@" if auth else ""
        params: list[tuple[str, str]] = []
        in_netloc = bool(self.host) and not _socket_or_list(self.host or "")
        if in_netloc:
            host = self.host or ""
            netloc += f"[{host}]" if ":" in host else q(host)
            if self.port:
                netloc += ":" + self.port
        else:
            if self.host:
                params.append(("host", self.host))
            if self.port:
                params.append(("port", self.port))
        path = "/" + q(self.database) if self.database is not None else ""
        params += list(self.params)
        query = "&".join(f"{q(k)}={q(v)}" for k, v in params)
        return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")

    def redacted(self) -> str:
        """The URL with its password replaced by ``***``: safe to print, log and store in reports."""
        return self._render(scheme=self.scheme, password=_MASK if self.password else None, display=True)

    __str__ = redacted

    def __repr__(self) -> str:
        return f"DatabaseURL({self.redacted()!r})"

    def asyncpg_dsn(self, *, password: bool = True) -> str:
        """A ``postgresql://`` DSN that asyncpg parses back into exactly these parts."""
        return self._render(scheme="postgresql", password=self.password if password else None)

    def asyncpg_connect_args(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect``/``create_pool``: the DSN without the password, the password, and
        the connect timeout libpq would use (asyncpg would send ``connect_timeout`` to the server as a setting)."""
        bare = replace(self, params=tuple(p for p in self.params if p[0] != "connect_timeout"))
        args: dict[str, Any] = {"dsn": bare.asyncpg_dsn(password=False), "password": self.password}
        timeout = self.connect_timeout()
        if timeout is not None:
            args["timeout"] = timeout
        return args

    def connect_timeout(self) -> float | None:
        """Seconds to wait for the server to answer a new connection, read as libpq reads them: ``connect_timeout``
        in the URL, else ``PGCONNECT_TIMEOUT``; 0 or less waits for ever, less than 2 means 2.  None: not given
        (asyncpg's default, 60 s)."""
        given = dict(self.params).get("connect_timeout")
        where = "connect_timeout in the database URL"
        if given is None:
            given, where = os.environ.get("PGCONNECT_TIMEOUT"), "PGCONNECT_TIMEOUT"
        if given is None or not given.strip():
            return None
        try:
            seconds = int(given.strip())
        except ValueError:
            raise BadInput(
                f"{where} is {given!r}, not a whole number of seconds", hint="e.g. connect_timeout=10"
            ) from None
        return 10.0**7 if seconds <= 0 else float(max(seconds, 2))

    def sqlalchemy_url(self) -> Any:
        """The SQLAlchemy async URL (``postgresql+asyncpg``) of the same database, as a ``sqlalchemy.URL``."""
        from sqlalchemy.engine import URL

        query: dict[str, str] = {}
        single = bool(self.host) and not _socket_or_list(self.host or "")
        if self.host and not single:
            query["host"] = self.host
        if self.port and not single:
            query["port"] = self.port
        query.update(self.params)
        return URL.create(
            "postgresql+asyncpg",
            username=self.user,
            password=self.password,
            host=self.host if single else None,
            port=int(self.port) if single and self.port and self.port.isdigit() else None,
            database=self.database,
            query=query,
        )

    def libpq(self) -> tuple[str, dict[str, str]]:
        """For pg_dump / pg_restore: the URL without its password, and the environment that carries it (decoded)."""
        env = {"PGPASSWORD": self.password} if self.password else {}
        return self._render(scheme="postgresql", password=None), env

    def with_database(self, name: str) -> DatabaseURL:
        """The same server, user and options, another database."""
        return replace(self, database=name, text="")

    def maintenance(self, name: str = "postgres") -> DatabaseURL:
        """The URL of the server's maintenance database, to create or drop databases from."""
        return self.with_database(name)

    def secrets(self) -> tuple[str, ...]:
        """Every spelling of the password that may appear in a text, longest first."""
        if not self.password:
            return ()
        pw = self.password
        spellings = {pw, quote(pw, safe=""), quote(pw), quote_plus(pw), quote_plus(pw, safe="")}
        return tuple(sorted((s for s in spellings if s), key=len, reverse=True))


def _socket_or_list(host: str) -> bool:
    return host.startswith(("/", "@")) or "," in host


def _fallback_redact(text: str) -> str:
    """Redact a text that does not parse as a URL: everything between ``user:`` and the last ``@`` goes."""
    return _PASSWORD_IN_TEXT.sub(r"\1" + _MASK, _USERINFO_PASSWORD.sub(r"\1" + _MASK + "@", text))


@functools.lru_cache(maxsize=64)
def _parse(text: str) -> DatabaseURL:
    from sqlalchemy.engine import make_url

    shown = _fallback_redact(text)
    try:
        u = make_url(text)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's message repeats the whole URL, password included
        raise BadInput(
            f"cannot parse the database URL {shown}",
            detail=type(e).__name__,
            hint="write it as postgresql://user:password@host:port/database, percent-encoding special characters",
        ) from None
    if not _SCHEME.match(u.drivername):
        raise BadInput(f"{shown} is not a PostgreSQL URL", hint="it must start with postgresql:// or postgres://")
    if "@" in (u.host or ""):
        raise BadInput(
            f"the database URL {shown} has an '@' that is not percent-encoded in its user name or password",
            hint="write @ as %40 (and : as %3A, / as %2F) in the password",
        )
    parts: dict[str, str | None] = {
        "user": u.username,
        "password": u.password,
        "host": u.host,
        "port": str(u.port) if u.port is not None else None,
        "dbname": u.database,
    }
    params: list[tuple[str, str]] = []
    for key, value in u.query.items():
        values = (value,) if isinstance(value, str) else tuple(value)
        if key in _PART_PARAMS:
            joined = ",".join(values) if key in ("host", "port") else values[-1]
            parts["dbname" if key == "database" else key] = joined or parts["dbname" if key == "database" else key]
        else:
            params += [(key, v) for v in values]
    port = parts["port"]
    if port and not all(p.strip().isdigit() for p in port.split(",")):
        raise BadInput(f"the database URL {shown} has a port that is not a number")
    return DatabaseURL(
        scheme=u.drivername,
        user=parts["user"] or None,
        password=parts["password"] or None,
        host=parts["host"] or None,
        port=port or None,
        database=parts["dbname"] if parts["dbname"] else None,
        params=tuple(params),
        text=text,
    )


def parse_url(url: str | DatabaseURL) -> DatabaseURL:
    """Parse a database URL once; see :class:`DatabaseURL`."""
    return DatabaseURL.parse(url)


def redact(url: str | DatabaseURL | None) -> str:
    """Return ``url`` with its password replaced by ``***``; safe to print or log.

    A text that is not a usable URL is redacted as text (every ``user:password@`` and ``password=`` in it).
    """
    if not url:
        return ""
    try:
        return DatabaseURL.parse(url).redacted()
    except BadInput:
        return redact_text(str(url))


# scheme://user:password@ -- up to the last @ of the word, so an unencoded @ in the password is covered too
_USERINFO_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s'\"]*:)[^\s'\"]*@")
_PASSWORD_IN_TEXT = re.compile(r"((?:\b|[?&])password\s*=\s*)('[^']*'|[^\s&'\"]+)", re.IGNORECASE)


def redact_text(text: str, *urls: str | DatabaseURL | None) -> str:
    """Remove every password of ``urls``, in any spelling, and of any URL in it, from ``text``."""
    for url in urls:
        if not url:
            continue
        try:
            parsed = DatabaseURL.parse(url)
        except BadInput:
            continue
        if parsed.text:
            text = text.replace(parsed.text, parsed.redacted())
        for secret in parsed.secrets():
            text = text.replace(secret, _MASK)
    return _fallback_redact(text)


def asyncpg_dsn(url: str | DatabaseURL) -> str:
    """Accept SQLAlchemy-style URLs too (``postgresql+asyncpg://``) and return a libpq URL."""
    return DatabaseURL.parse(url).asyncpg_dsn()


def sqlalchemy_url(url: str | DatabaseURL) -> str:
    """Return the URL with the asyncpg driver SQLAlchemy needs (password included: not for printing)."""
    return str(DatabaseURL.parse(url).sqlalchemy_url().render_as_string(hide_password=False))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?", re.ASCII)  # what the server reads, digits and all
_MS = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}


def duration_ms(text: str) -> int | None:
    """The whole milliseconds the server reads a timeout ``text`` as (a bare number is milliseconds); None when it is
    no duration."""
    match = _DURATION.fullmatch(text.strip())
    return round(float(match.group(1)) * _MS[match.group(2) or "ms"]) if match else None


def check_duration(text: str, *, bounded: bool = False) -> str:
    """``text`` as a timeout the server takes (``30min``, ``10s``, ``500ms``; a bare number is milliseconds), or
    BadInput.  ``bounded``: a wait in front of the application's writers, where what the server reads as 0 (no limit;
    it counts whole milliseconds, so ``0.4ms`` is 0) would queue every write behind it."""
    text = text.strip()
    ms = duration_ms(text)
    if ms is None:
        raise BadInput(
            f"{text!r} is not a duration; write e.g. 30min, 10s or 500ms" + ("" if bounded else " (0 for none)")
        )
    if ms > 2**31 - 1:
        raise BadInput(f"{text!r} is longer than PostgreSQL allows (about 24 days)")
    if bounded and ms < 1:
        raise BadInput(
            f"{text!r} would wait without limit (the server reads it as 0 ms), and every write of the application "
            "would queue behind the wait; write e.g. 2s"
        )
    return text


def check_patience(lock_wait: str, retries: int) -> None:
    """A lock wait in front of the application's writers (``lock_wait`` per try, ``retries`` tries after the first)
    that is bounded, before anything is done; else BadInput."""
    if retries < 0:
        raise BadInput(f"retries must be 0 or more, not {retries}")
    check_duration(lock_wait, bounded=True)


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
    def url(self) -> DatabaseURL:
        """The target database's URL, parsed."""
        return DatabaseURL.parse(self.database_url)

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
    source = source_url or os.environ.get("SOURCE_DATABASE_URL") or None
    for given in (url, source):
        if given:
            DatabaseURL.parse(given)  # a malformed URL is bad input, said before anything connects
    return Settings(
        database_url=url or "",
        source_url=source,
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
