"""A rehearsal's result: its records, their Markdown and HTML renderings, and the predictions file that ``status``
and the next real run read (``predictions.json`` under reports/: the ledger of production is never written by a
rehearsal)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .report import CSS, stamp, template, timeline
from .settings import Settings, redact

MARGIN = 0.30  # the prediction is given as p ± 30 %


@dataclass(frozen=True)
class Step:
    phase: str
    step: str  # setup | run | rollback | rerun | recheck
    table: str | None
    start: float  # seconds since the rehearsal began
    seconds: float
    rows: int = 0


@dataclass(frozen=True)
class TablePrediction:
    phase: str
    target: str
    source: str
    staging_rows: int
    production_rows: int
    staging_seconds: float
    rows_per_second: float
    predicted_seconds: float


@dataclass(frozen=True)
class PhasePrediction:
    phase: str
    staging_seconds: float
    predicted_seconds: float
    low: float
    high: float
    catch_up_seconds: float  # a --recheck pass in production, for "bulk ahead, catch up in the window"
    fits: bool | None
    advice: tuple[str, ...] = ()


@dataclass(frozen=True)
class Drift:
    kind: str  # schema | values | rows
    table: str
    message: str


@dataclass(frozen=True)
class RehearsalResult:
    phases: tuple[str, ...]
    staging: str
    production: str
    built: str  # template | dump | existing
    steps: tuple[Step, ...]
    tables: tuple[TablePrediction, ...]
    predictions: tuple[PhasePrediction, ...]
    drift: tuple[Drift, ...]
    window: str | None
    window_seconds: float | None
    started_at: str
    seconds: float
    validations_ok: bool
    reports: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.validations_ok and all(p.fits is not False for p in self.predictions)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _dur(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def rehearsal_markdown(r: RehearsalResult) -> str:
    out = [
        f"# Rehearsal of {', '.join(r.phases)}: {'FITS' if r.ok else 'DOES NOT FIT' if r.window else 'done'}",
        "",
        f"- production (read only): `{r.production}`",
        f"- staging: `{r.staging}` (built by {r.built})",
        f"- window: {r.window or '-'}" + (f" ({_dur(r.window_seconds)})" if r.window_seconds else ""),
        f"- rehearsed {r.started_at} in {_dur(r.seconds)}; every validation "
        f"{'passed' if r.validations_ok else 'did NOT pass'}",
        "",
        "## Prediction",
        "",
        "| phase | staging | predicted | range (±30%) | catch-up (--recheck) | fits |",
        "|---|--:|--:|--:|--:|---|",
    ]
    out += [
        f"| {p.phase} | {_dur(p.staging_seconds)} | {_dur(p.predicted_seconds)} | {_dur(p.low)} – {_dur(p.high)} | "
        f"{_dur(p.catch_up_seconds)} | {'-' if p.fits is None else 'yes' if p.fits else '**no**'} |"
        for p in r.predictions
    ]
    advice = [(p.phase, a) for p in r.predictions for a in p.advice]
    if advice:
        out += ["", "What would make it fit:", ""] + [f"- {ph}: {a}" for ph, a in advice]
    out += [
        "",
        "## Tables",
        "",
        "| phase | table | staging rows | production rows | rows/s | predicted |",
        "|---|---|--:|--:|--:|--:|",
    ]
    out += [
        f"| {t.phase} | {t.target} | {t.staging_rows:,} | {t.production_rows:,} | {t.rows_per_second:,.0f} | "
        f"{_dur(t.predicted_seconds)} |"
        for t in r.tables
    ]
    out += ["", "## Drift between staging and production", ""]
    out += [f"- {d.kind}: {d.table}: {d.message}" for d in r.drift] or ["- none found"]
    out += ["", "## Steps", "", "| phase | step | table | start | took | rows |", "|---|---|---|--:|--:|--:|"]
    out += [
        f"| {s.phase} | {s.step} | {s.table or '(phase)'} | {s.start:.1f} s | {s.seconds:.2f} s | {s.rows:,} |"
        for s in r.steps
    ]
    return "\n".join(out) + "\n"


def rehearsal_html(r: RehearsalResult) -> str:
    lanes: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    for s in sorted(r.steps, key=lambda s: s.start):
        lanes.setdefault((s.phase, s.table or "(phase)"), []).append((s.step, s.start, s.seconds))
    win = r.window_seconds or max([p.high for p in r.predictions] + [1.0])
    predictions = []
    for p in r.predictions:
        scale = 100 / max(win, p.high)
        predictions.append((p, {"low": f"{p.low * scale:.1f}%", "range": f"{(p.high - p.low) * scale:.1f}%",
                                "predicted": f"{p.predicted_seconds * scale:.1f}%",
                                "window": f"{win * scale:.1f}%" if r.window_seconds else None}))  # fmt: skip
    return str(
        template("rehearsal.html").render(
            r=r,
            css=CSS,
            verdict="FITS" if r.ok else ("DOES NOT FIT" if r.window else "DONE"),
            dur=_dur,
            predictions=predictions,
            advice=[(p.phase, a) for p in r.predictions for a in p.advice],
            timeline=timeline([(f"{p} · {t}", bars) for (p, t), bars in lanes.items()], title="rehearsal timeline"),
        )  # fmt: skip
    )


def save_rehearsal(result: RehearsalResult, directory: Path) -> dict[str, Path]:
    """Write ``rehearsal-<UTC>.json``, ``.md`` and ``.html`` under ``directory``."""
    files.private_dir(directory)
    when = stamp()
    out = {}
    for fmt, text in (
        ("json", json.dumps(result.to_dict(), indent=2, default=str)),
        ("markdown", rehearsal_markdown(result)),
        ("html", rehearsal_html(result)),
    ):
        out[fmt] = files.write_private(directory / f"rehearsal-{when}.{'md' if fmt == 'markdown' else fmt}", text)
    return out


PREDICTIONS = "predictions.json"


def save_predictions(result: RehearsalResult, directory: Path) -> Path:
    """Keep the latest prediction per phase, so the real run can record it beside its actual time."""
    path = directory / PREDICTIONS
    data = json.loads(path.read_text()) if path.is_file() else {}
    for p in result.predictions:
        data[p.phase] = {
            "predicted_seconds": p.predicted_seconds,
            "low": p.low,
            "high": p.high,
            "production": result.production,
            "rehearsed_at": result.started_at,
        }
    files.private_dir(directory)
    return files.write_private(path, json.dumps(data, indent=2), replace=True)  # the one file that is updated


def predicted_seconds(settings: Settings, phase: str) -> float | None:
    """The last rehearsal's prediction for ``phase`` on this database, if any."""
    path = settings.reports_dir / PREDICTIONS
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get(phase)
    if not entry or entry.get("production") != redact(settings.database_url):
        return None
    return float(entry["predicted_seconds"])
