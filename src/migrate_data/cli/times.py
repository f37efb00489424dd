"""``--until``: a wall-clock time in the user's zone, read as the end of the maintenance window."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import BadInput

# --until: a wall-clock time in the user's zone.  The rule for a time that is not in the future: less than
# PASSED ago, it has passed (05:31 with --until 05:30) and is refused; longer ago, it means the next occurrence
# (23:00 with --until 05:30 means tomorrow morning).  MIN_LEFT: with less than this left, no batch can run.
PASSED = dt.timedelta(hours=12)
MIN_LEFT = dt.timedelta(minutes=1)


def zone_of(tz: str | None) -> dt.tzinfo:
    """The zone of --tz, else this machine's (as a named zone when it can be found, so DST is right)."""
    if tz:
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise BadInput(f"--tz {tz}: unknown time zone", hint="an IANA name, e.g. America/Guayaquil") from e
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        candidates.append(os.readlink("/etc/localtime").partition("zoneinfo/")[2])
    for name in filter(None, candidates):
        with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
            return ZoneInfo(name)
    local = dt.datetime.now().astimezone().tzinfo
    assert local is not None
    return local


def label(at: dt.datetime) -> str:
    """``05:30 America/Guayaquil``: a time in the zone the user gave, named."""
    return f"{at:%H:%M} {getattr(at.tzinfo, 'key', None) or at.tzname()}"


def span(d: dt.timedelta) -> str:
    s = int(abs(d.total_seconds()))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min" if s >= 60 else f"{s} s"


def wall(day: dt.date, hh: int, mm: int, zone: dt.tzinfo) -> dt.datetime:
    """``day`` at ``hh:mm`` on the clocks of ``zone``: the first occurrence when DST repeats the hour, and the end
    of the jump (the first instant the clocks read at least ``hh:mm``) when DST skips it."""
    naive = dt.datetime.combine(day, dt.time(hh, mm))
    a, b = (naive.replace(tzinfo=zone, fold=f).astimezone(dt.timezone.utc) for f in (0, 1))
    lo, hi = min(a, b), max(a, b)
    if lo == hi or lo.astimezone(zone).replace(tzinfo=None) == naive:
        return lo.astimezone(zone)  # one occurrence, or the first of two
    while hi - lo > dt.timedelta(seconds=1):  # skipped: find the jump between the two readings
        mid = lo + (hi - lo) / 2
        if mid.astimezone(zone).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return hi.replace(microsecond=0).astimezone(zone)


def until_deadline(until: str | None, tz: str | None, *, now: dt.datetime | None = None) -> dt.datetime | None:
    """The deadline of ``--until HH:MM`` in ``--tz`` (aware, in that zone), at the clock ``now`` (default: now).

    Refuses (BadInput) a time that has passed (less than 12 h ago) and one too close for any batch."""
    if not until:
        return None
    zone = zone_of(tz)
    m = re.fullmatch(r"([01]?[0-9]|2[0-3]):([0-5][0-9])", until.strip())
    if not m:
        raise BadInput(f"--until {until}: expected HH:MM, e.g. 05:30")
    hh, mm = int(m.group(1)), int(m.group(2))
    now = dt.datetime.now(dt.timezone.utc) if now is None else now if now.tzinfo else now.replace(tzinfo=zone)
    now = now.astimezone(dt.timezone.utc)  # instants: the same tzinfo on both sides would compare wall clocks
    today = now.astimezone(zone).date()
    at = next(
        at
        for at in (wall(today + dt.timedelta(days=d), hh, mm, zone) for d in (-1, 0, 1, 2))
        if at > now - PASSED  # aware datetimes in different zones: compared as instants
    )
    if at <= now:
        raise BadInput(
            f"--until {until}: {label(at)} has passed ({span(now - at)} ago); nothing was done",
            hint=f"a time more than {PASSED.total_seconds() / 3600:.0f} h ago means the next day; "
            "give the end of the window that is still ahead",
        )
    if at - now < MIN_LEFT:
        raise BadInput(
            f"--until {until}: the window closes at {label(at)}, in {span(at - now)}: too soon for a batch; "
            "nothing was done (no backup taken)"
        )
    return at
