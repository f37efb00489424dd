"""What the DBA watches: a run's live progress and its closing summary.

The presentation layer shared by the ``cli`` package and the demo (``project.py``); the library never prints.  A
:class:`Tracker` turns the library's :class:`~migrate_data.copier.CopyEvent` stream (steps, table starts, batches,
table ends) into the state of the run; :class:`TerminalProgress` draws it with rich on a terminal and
:class:`LineProgress` writes a stable, grep-able line every few seconds otherwise.  The closing summary is
``closing.py``.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .copier import CopyEvent
from .human import clock, dur, num, short_dur, zone_name

if TYPE_CHECKING:
    pass


# -- the state of a run ---------------------------------------------------------------------------------------
@dataclass
class StepTime:
    name: str
    note: str
    started: float  # monotonic
    started_at: dt.datetime  # wall clock, UTC
    seconds: float | None = None  # None while it runs


@dataclass
class TableState:
    name: str
    rows: int = 0  # read so far (resumed runs: including earlier runs)
    total: int = 0  # source rows expected
    written: int = 0
    rejected: int = 0
    state: str = "waiting"  # waiting | copying | done | skipped
    started: float | None = None
    first_rows: int = 0  # rows read before this run (a resumed table)
    seconds: float | None = None  # the copier's own measure, once done

    def rate(self, now: float) -> float | None:
        """Rows per second in this run."""
        if self.state == "done" and self.seconds:
            return (self.rows - self.first_rows) / self.seconds
        if self.started is None or now - self.started < 0.2:
            return None
        return (self.rows - self.first_rows) / (now - self.started)

    def eta(self, now: float) -> float | None:
        r = self.rate(now)
        if self.state in ("done", "skipped"):
            return 0.0
        return max(self.total - self.rows, 0) / r if r else None


class Tracker:
    """The state of one run, from its events.  Called on the event loop; read by the display threads (the values
    are plain numbers, a torn read shows a number one batch old)."""

    def __init__(
        self,
        phase: str,
        *,
        deadline: dt.datetime | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.phase = phase
        self.deadline = deadline
        self.clock = clock
        self.started = clock()
        self.steps: list[StepTime] = []
        self.tables: dict[str, TableState] = {}
        self.listeners: list[Callable[[CopyEvent], None]] = []

    def __call__(self, e: CopyEvent) -> None:
        now = self.clock()
        if e.kind == "step":
            self._close_step(now)
            self.steps.append(StepTime(e.target, e.note, now, dt.datetime.now(dt.timezone.utc)))
        else:
            t = self.tables.setdefault(e.target, TableState(e.target))
            t.rows, t.written, t.rejected = e.rows, max(e.written, t.written), max(e.rejected, t.rejected)
            if e.total:
                t.total = e.total
            if e.kind == "start":
                t.state, t.started, t.first_rows = "copying", now, e.rows
            elif e.kind == "skip":
                t.state, t.total = "skipped", e.total or e.rows
            elif e.kind == "done":
                t.state, t.seconds = "done", e.seconds
                t.total = max(t.total, t.rows)
            elif t.state == "waiting":
                t.state, t.started = "copying", now
        for listener in self.listeners:
            listener(e)

    def _close_step(self, now: float) -> None:
        if self.steps and self.steps[-1].seconds is None:
            self.steps[-1].seconds = now - self.steps[-1].started

    def finish(self) -> None:
        """The run returned (or raised): the last step ends now."""
        self._close_step(self.clock())

    @property
    def step(self) -> str:
        return self.steps[-1].name if self.steps else "start"

    def elapsed(self) -> float:
        return self.clock() - self.started

    def overall(self) -> dict[str, Any]:
        """Rows read / expected over the tables counted so far, the copy's rate, its ETA, the time left."""
        now = self.clock()
        tables = list(self.tables.values())
        rows = sum(t.rows for t in tables)
        total = sum(max(t.total, t.rows) for t in tables)
        copy = next((s for s in self.steps if s.name == "copy"), None)
        moved = sum(t.rows - t.first_rows for t in tables if t.state != "skipped")
        took = (copy.seconds if copy and copy.seconds is not None else now - copy.started) if copy else 0.0
        rate = moved / took if took > 0.2 and moved else None
        eta = max(total - rows, 0) / rate if rate else None
        out: dict[str, Any] = {
            "rows": rows,
            "total": total,
            "pct": int(100 * rows / total) if total else None,
            "rate": rate,
            "eta": eta,
            "elapsed": now - self.started,
        }
        if self.deadline is not None:
            left = (self.deadline - dt.datetime.now(dt.timezone.utc)).total_seconds()
            out["left"] = left
            out["fits"] = None if eta is None else eta <= left
        return out

    def steps_dict(self, zone: dt.tzinfo | None = None) -> list[dict[str, Any]]:
        return [
            {
                "step": s.name,
                "note": s.note,
                "started": s.started_at.astimezone(zone).isoformat(timespec="seconds"),
                "seconds": None if s.seconds is None else round(s.seconds, 3),
            }
            for s in self.steps
        ]


# -- without a terminal: a line every few seconds --------------------------------------------------------------
def progress_line(phase: str, t: TableState, now: float) -> str:
    pct = int(100 * t.rows / t.total) if t.total else 0
    rate = t.rate(now)
    return (
        f"progress phase={phase} table={t.name} rows={t.rows:,}/{t.total:,} pct={pct} "
        f"rate={num(rate)}/s eta={short_dur(t.eta(now))}"
    )


def overall_line(tracker: Tracker) -> str:
    o = tracker.overall()
    line = (
        f"progress phase={tracker.phase} table=* step={tracker.step} rows={o['rows']:,}/{o['total']:,} "
        f"pct={o['pct'] if o['pct'] is not None else '-'} rate={num(o['rate'])}/s eta={short_dur(o['eta'])} "
        f"elapsed={short_dur(o['elapsed'])}"
    )
    if "left" in o:
        line += f" left={short_dur(o['left'])} fits={'-' if o['fits'] is None else 'yes' if o['fits'] else 'no'}"
    return line


class LineProgress:
    """No terminal: a ``step`` line as each step starts, a ``done`` line as each table ends, and every ``every``
    seconds a ``progress`` line per table being copied plus one for the whole run (``table=*``).  The lines are
    ``key=value`` words, for grep and awk."""

    def __init__(
        self, tracker: Tracker, say: Callable[[str], None], *, every: float = 5.0, zone: dt.tzinfo | None = None
    ):
        self.tracker = tracker
        self.say = say
        self.every = every
        self.zone = zone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="migrate-data progress", daemon=True)
        tracker.listeners.append(self._on_event)

    def _on_event(self, e: CopyEvent) -> None:
        if e.kind == "step":
            at = self.tracker.steps[-1].started_at
            self.say(
                f"step phase={self.tracker.phase} step={e.target} at={clock(at, self.zone)} "
                f"elapsed={short_dur(self.tracker.elapsed())} note={e.note!r}"
            )
        elif e.kind in ("done", "skip"):
            t = self.tracker.tables[e.target]
            self.say(
                f"{'done' if e.kind == 'done' else 'skipped'} phase={self.tracker.phase} table={e.target} "
                f"read={e.rows:,} written={e.written:,} quarantined={e.rejected:,} seconds={e.seconds:.1f} "
                f"rate={num(t.rate(self.tracker.clock()))}/s"
            )

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            now = self.tracker.clock()
            for t in list(self.tracker.tables.values()):
                if t.state == "copying":
                    self.say(progress_line(self.tracker.phase, t, now))
            self.say(overall_line(self.tracker))

    def __enter__(self) -> LineProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


# -- on a terminal: rich bars -----------------------------------------------------------------------------------
class TerminalProgress:
    """A terminal: a line per step as it starts, a bar per table (rows, live rows/s, ETA) and an overall line
    (%, elapsed, ETA; with ``--until`` the time left and whether the ETA fits)."""

    def __init__(self, tracker: Tracker, *, file: Any, zone: dt.tzinfo | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
        from rich.text import Text

        self.tracker = tracker
        self.zone = zone
        track = tracker

        class Numbers(ProgressColumn):
            def render(self, task: Any) -> Text:
                now = track.clock()
                name = task.fields.get("table")
                if name is None:
                    o = track.overall()
                    text = (
                        f"{num(o['rows'])}/{num(o['total'])} rows  {o['pct'] if o['pct'] is not None else '-'} %  "
                        f"{num(o['rate'])} rows/s  elapsed {dur(o['elapsed'])}  ETA {dur(o['eta'])}"
                    )
                    if "left" in o:
                        fits = (
                            ""
                            if o["fits"] is None
                            else ("  fits" if o["fits"] else "  DOES NOT FIT: stops at a checkpoint")
                        )
                        text += f"  window: {dur(o['left'])} left{fits}"
                    return Text(text)
                t = track.tables[name]
                if t.state == "skipped":
                    return Text(f"{num(t.rows)} rows  done before, skipped")
                state = "done" if t.state == "done" else f"ETA {dur(t.eta(now))}"
                return Text(f"{num(t.rows)}/{num(t.total)} rows  {num(t.rate(now))} rows/s  {state}")

        self.console = Console(file=file)
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            Numbers(),
            console=self.console,
            refresh_per_second=4,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.overall_task: Any = None
        tracker.listeners.append(self._on_event)

    def _on_event(self, e: CopyEvent) -> None:
        if e.kind == "step":
            s = self.tracker.steps[-1]
            self.bars.console.print(
                f"[{clock(s.started_at, self.zone)} {zone_name(self.zone)}] {e.target}: {e.note}", highlight=False
            )
            if e.target == "copy" and self.overall_task is None:
                self.overall_task = self.bars.add_task("all tables", total=None)
            return
        t = self.tracker.tables[e.target]
        task = self.tasks.get(e.target)
        if task is None:
            task = self.tasks[e.target] = self.bars.add_task(e.target, total=t.total or None, table=e.target)
        self.bars.update(task, completed=t.rows, total=max(t.total, t.rows) or None)
        if self.overall_task is not None:
            o = self.tracker.overall()
            self.bars.update(self.overall_task, completed=o["rows"], total=o["total"] or None)

    def __enter__(self) -> TerminalProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)


@contextmanager
def progress(
    tracker: Tracker, *, terminal: Any | None, say: Callable[[str], None], every: float = 5.0, zone: dt.tzinfo | None
) -> Iterator[Tracker]:
    """The live display of a run: rich bars on ``terminal`` (a file that is a terminal), else lines through ``say``."""
    display: Any = (
        TerminalProgress(tracker, file=terminal, zone=zone)
        if terminal is not None
        else LineProgress(tracker, say, every=every, zone=zone)
    )
    with display:
        try:
            yield tracker
        finally:
            tracker.finish()
