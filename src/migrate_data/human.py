"""Numbers, durations and clock times as people read them: thousands separators, "1.5 min", "03:12 America/Guayaquil"."""

from __future__ import annotations

import datetime as dt


def num(n: float | None) -> str:
    """``12,000``; ``-`` for unknown."""
    return "-" if n is None else f"{n:,.0f}"


def dur(seconds: float | None) -> str:
    """``0.4 s``, ``12 s``, ``3 min 05 s``, ``1 h 02 min``; ``-`` for unknown."""
    if seconds is None:
        return "-"
    s = max(seconds, 0.0)
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    whole = int(round(s))
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def fmt_seconds(s: float) -> str:
    """Seconds for a table column: ``0.04``, ``3.2``, ``1,234``."""
    return f"{s:.2f}" if s < 1 else f"{s:.1f}" if s < 100 else f"{s:,.0f}"


def short_dur(seconds: float | None) -> str:
    """``4s``, ``3m05s``, ``1h02m``: one token, for ``key=value`` lines; ``-`` for unknown."""
    if seconds is None:
        return "-"
    whole = int(round(max(seconds, 0.0)))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def zone_name(zone: dt.tzinfo | None) -> str:
    """The zone's name as the user gave it (``America/Guayaquil``), else its abbreviation."""
    if zone is None:
        return "UTC"
    return getattr(zone, "key", None) or dt.datetime.now(zone).tzname() or "local"


def clock(at: dt.datetime | None, zone: dt.tzinfo | None, *, seconds: bool = True, date: bool = False) -> str:
    """A time in the user's zone: ``03:12:07`` (the zone is in the column's label or the line's)."""
    if at is None:
        return "-"
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    local = at.astimezone(zone)
    return local.strftime(("%Y-%m-%d " if date else "") + ("%H:%M:%S" if seconds else "%H:%M"))
