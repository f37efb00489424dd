"""A rehearsal's result: its records, their Markdown and HTML renderings, and the predictions file that ``status``
and the next real run read (``predictions.json`` under reports/: the ledger of production is never written by a
rehearsal)."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .report import CSS, stamp, timeline_html
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
    e = html.escape
    lanes: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    for s in sorted(r.steps, key=lambda s: s.start):
        lanes.setdefault((s.phase, s.table or "(phase)"), []).append((s.step, s.start, s.seconds))
    timeline = timeline_html([(f"{p} · {t}", bars) for (p, t), bars in lanes.items()], title="rehearsal timeline")
    win = r.window_seconds or max([p.high for p in r.predictions] + [1.0])
    preds = []
    for p in r.predictions:
        scale = 100 / max(win, p.high)
        preds.append(
            f"<tr><td>{e(p.phase)}</td><td style='width:55%'><div style='position:relative;height:18px;background:#eef1f6'>"
            f"<div style='position:absolute;left:{p.low * scale:.1f}%;width:{(p.high - p.low) * scale:.1f}%;height:18px;"
            f"background:{'#2e9e5b' if p.fits is not False else '#b42318'};opacity:.35'></div>"
            f"<div style='position:absolute;left:{p.predicted_seconds * scale:.1f}%;width:2px;height:18px;background:#1d2433'></div>"
            + (
                f"<div style='position:absolute;left:{win * scale:.1f}%;width:2px;height:18px;background:#b42318'></div>"
                if r.window_seconds
                else ""
            )
            + f"</div></td><td class='n'>{_dur(p.predicted_seconds)} ({_dur(p.low)} – {_dur(p.high)})</td>"
            f"<td>{'-' if p.fits is None else 'fits' if p.fits else 'does not fit'}</td></tr>"
        )
    advice = "".join(f"<li><b>{e(p.phase)}</b>: {e(a)}</li>" for p in r.predictions for a in p.advice)
    tables = "".join(
        f"<tr><td>{e(t.phase)}</td><td>{e(t.target)}</td><td class='n'>{t.staging_rows:,}</td>"
        f"<td class='n'>{t.production_rows:,}</td><td class='n'>{t.rows_per_second:,.0f}</td>"
        f"<td class='n'>{_dur(t.predicted_seconds)}</td></tr>"
        for t in r.tables
    )
    drift = (
        "".join(f"<li>{e(d.kind)}: <b>{e(d.table)}</b>: {e(d.message)}</li>" for d in r.drift) or "<li>none found</li>"
    )
    verdict = "FITS" if r.ok else ("DOES NOT FIT" if r.window else "DONE")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Rehearsal: {verdict}</title>
<meta name="viewport" content="width=device-width"><style>{CSS}</style></head><body>
<h1>Rehearsal of <code>{e(", ".join(r.phases))}</code>
<span class="verdict {"ok" if r.ok else "failed"}">{verdict}</span></h1>
<dl><dt>production (read only)</dt><dd><code>{e(r.production)}</code></dd><dt>staging</dt><dd><code>{e(r.staging)}</code>
(built by {e(r.built)})</dd><dt>window</dt><dd>{e(r.window or "-")}</dd><dt>when</dt><dd>{e(r.started_at)}, took {_dur(r.seconds)}</dd>
<dt>validations</dt><dd>{"all passed" if r.validations_ok else "NOT all passed"}</dd></dl>
<h2>Prediction against the window</h2>
<table><tr><th>phase</th><th>predicted (bar: ±30%, line: window end)</th><th>time</th><th></th></tr>{"".join(preds)}</table>
{f"<h3>What would make it fit</h3><ul>{advice}</ul>" if advice else ""}
<h2>Timeline of the rehearsal</h2>{timeline}
<h2>Tables</h2><table><tr><th>phase</th><th>table</th><th>staging rows</th><th>production rows</th><th>rows/s</th>
<th>predicted</th></tr>{tables}</table>
<h2>Drift between staging and production</h2><ul>{drift}</ul>
</body></html>
"""


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
