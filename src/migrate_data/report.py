"""Validation results -> JSON, Markdown, HTML (one self-contained file), plain text."""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import files
from .settings import Settings, redact
from .validate import ValidationResult

if TYPE_CHECKING:
    from .rehearse import RehearsalResult


def to_json(result: ValidationResult) -> str:
    return json.dumps(result.to_dict(), indent=2, default=str, ensure_ascii=False)


def to_text(result: ValidationResult) -> str:
    counts = ("source rows", "target rows", "rejected")
    rows: list[dict[str, Any]] = [
        {
            "source": t.source,
            "target": t.target,
            "source rows": f"{t.source_rows:,}",
            "target rows": f"{t.target_rows:,}",
            "rejected": f"{t.rejected:,}",
            "status": t.status.upper(),
        }
        for t in result.tables
    ]
    lines = summary(rows, right=counts).splitlines() if rows else []
    for t in result.tables:
        lines += [f"  {t.target}: {p}" for p in t.problems]
        for s in t.samples:
            cols = ", ".join(c["column"] for c in s.get("columns", []))
            lines.append(f"    {s['kind']} key {key_text(s['key'])}" + (f" (column {cols})" if cols else ""))
    failed = [c for c in result.checks if not c.ok]
    lines += [f"  {c.target}: {c.message}" for c in failed]
    if result.reject_causes:
        lines += _quarantine_text(result)
    verdict = "PASSED" if result.ok else "FAILED"
    lines.append(
        f"validation of {result.phase} {verdict}"
        + (" (deep)" if result.deep else "")
        + f": {len(result.tables)} tables, {len(result.checks)} integrity checks, {len(failed)} failed"
        + (f"; {result.quarantined:,} rows QUARANTINED, not copied" if result.quarantined else "")
    )
    return "\n".join(lines)


def key_text(key: list[str | None] | tuple[str | None, ...]) -> str:
    """A key for people: its parts joined, NULL shown as NULL."""
    return ", ".join("NULL" if v is None else str(v) for v in key)


def _quarantine_text(result: ValidationResult) -> list[str]:
    causes = result.reject_causes
    tables = len({c["target"] for c in causes})
    rows = [
        {
            "target": c["target"],
            "rows": f"{c['n']:,}",
            "SQLSTATE": c["sqlstate"],
            "cause": c["cause"],
            "example key": key_text(c["example_key"]),
        }
        for c in causes
    ]
    head = (
        f"QUARANTINED: {result.quarantined:,} source rows of {tables} table{'s' if tables > 1 else ''} are not in "
        f"the target but in migrate_data.rejects, by cause:"
    )
    return ["", head, *("  " + line for line in summary(rows, right=("rows",)).splitlines()), ""]


def to_markdown(result: ValidationResult) -> str:
    out = [
        f"# Validation of `{result.phase}`: {'PASSED' if result.ok else 'FAILED'}",
        "",
        f"- database: `{result.database}`",
        f"- revision: `{result.revision or '-'}`",
        f"- run by: {result.operator or '-'} on {result.host or '-'}, {result.started_at}; "
        + (f"phase {result.run_seconds:.1f} s, " if result.run_seconds is not None else "")
        + f"validation {result.seconds:.1f} s",
        f"- checksums: {'yes' if result.deep else 'no (counts only)'}",
        "",
        "| source | target | source rows | target rows | rejected | status |",
        "|---|---|--:|--:|--:|---|",
    ]
    out += [
        f"| {t.source} | {t.target} | {t.source_rows:,} | {t.target_rows:,} | {t.rejected:,} | {t.status} |"
        for t in result.tables
    ]
    problems = [(t.target, p) for t in result.tables for p in t.problems]
    problems += [(c.target, c.message) for c in result.checks if not c.ok]
    if problems:
        out += ["", "## Differences", ""] + [f"- **{t}**: {p}" for t, p in problems]
    if result.reject_causes:
        out += [
            "",
            f"## Quarantined: {result.quarantined:,} rows not copied",
            "",
            "| target | rows | SQLSTATE | cause | example key |",
            "|---|--:|---|---|---|",
        ]
        out += [
            f"| {c['target']} | {c['n']:,} | {c['sqlstate']} | {_md(c['cause'])} | {_md(key_text(c['example_key']))} |"
            for c in result.reject_causes
        ]
    if result.rejects:
        out += ["", "## Rejected rows", "", "| target | source key | SQLSTATE | message |", "|---|---|---|---|"]
        out += [
            f"| {r['target']} | {_md(key_text(r['source_key']))} | {r['sqlstate']} | {_md(r['message'])} |"
            for r in result.rejects
        ]
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem;color:#1d2433;max-width:1100px}
h1{font-size:1.5rem;margin:0 0 .5rem} h2{font-size:1.1rem;margin-top:2rem}
.verdict{display:inline-block;padding:.2rem .7rem;border-radius:4px;color:#fff;font-weight:600}
.ok{background:#1f7a3e}.failed{background:#b42318}
table{border-collapse:collapse;width:100%;margin-top:.5rem} th,td{border-bottom:1px solid #e3e6ec;padding:.35rem .5rem;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}
dt{color:#5a6478} .bar{height:10px;background:#3b6fd8;border-radius:2px;margin:2px 0}.bar.t{background:#2e9e5b}
.bar.r{background:#d98e04} .legend span{display:inline-block;width:10px;height:10px;margin:0 .3rem 0 1rem;border-radius:2px}
code{background:#f2f4f7;padding:0 .25rem;border-radius:3px}
.quarantine{border:2px solid #d98e04;background:#fff7e6;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}
.quarantine h2{margin-top:.3rem;color:#8a4b00}
"""


def to_html(result: ValidationResult) -> str:
    e = html.escape
    biggest = max([max(t.source_rows, t.target_rows) for t in result.tables] + [1])
    bars = []
    for t in result.tables:
        w = lambda n: f"{100 * n / biggest:.2f}%"  # noqa: E731
        bars.append(
            f"<tr><td>{e(t.target)}</td><td style='width:60%'>"
            f"<div class='bar' style='width:{w(t.source_rows)}' title='source {t.source_rows:,}'></div>"
            f"<div class='bar t' style='width:{w(t.target_rows)}' title='target {t.target_rows:,}'></div>"
            + (
                f"<div class='bar r' style='width:{w(t.rejected)}' title='rejected {t.rejected:,}'></div>"
                if t.rejected
                else ""
            )
            + f"</td><td class='n'>{t.source_rows:,} → {t.target_rows:,}</td></tr>"
        )
    rows = "".join(
        f"<tr><td>{e(t.source)}</td><td>{e(t.target)}</td><td class='n'>{t.source_rows:,}</td>"
        f"<td class='n'>{t.target_rows:,}</td><td class='n'>{t.rejected:,}</td>"
        f"<td><span class='verdict {'ok' if t.status == 'ok' else 'failed'}'>{e(t.status)}</span></td></tr>"
        for t in result.tables
    )
    problems = [(t.target, p) for t in result.tables for p in t.problems] + [
        (c.target, c.message) for c in result.checks if not c.ok
    ]
    diff_items = "".join(f"<li><b>{e(t)}</b>: {e(p)}</li>" for t, p in problems) or "<li>none</li>"
    samples = "".join(
        f"<tr><td>{e(t.target)}</td><td>{e(s['kind'])}</td><td><code>{e(key_text(s['key']))}</code></td>"
        f"<td>{e(', '.join(c['column'] for c in s.get('columns', [])))}</td></tr>"
        for t in result.tables
        for s in t.samples
    )
    rejects = "".join(
        f"<tr><td>{e(r['target'])}</td><td><code>{e(key_text(r['source_key']))}</code></td>"
        f"<td>{e(r['sqlstate'])}</td><td>{e(r['message'])}</td></tr>"
        for r in result.rejects
    )
    checks = "".join(
        f"<tr><td>{e(c.target)}</td><td>{e(c.name)}</td><td>{'✔' if c.ok else '✘'}</td><td>{e(c.message)}</td></tr>"
        for c in result.checks
    )
    causes = "".join(
        f"<tr><td>{e(c['target'])}</td><td class='n'>{c['n']:,}</td><td>{e(c['sqlstate'])}</td>"
        f"<td>{e(c['cause'])}</td><td><code>{e(key_text(c['example_key']))}</code></td></tr>"
        for c in result.reject_causes
    )
    quarantine = (
        f"<div class='quarantine' id='quarantined'><h2>⚠ {result.quarantined:,} rows quarantined, not copied</h2>"
        "<p>These source rows are not in the target; they are in <code>migrate_data.rejects</code>, by cause:</p>"
        "<table><tr><th>target</th><th>rows</th><th>SQLSTATE</th><th>cause</th><th>example key</th></tr>"
        f"{causes}</table></div>"
        if causes
        else ""
    )
    verdict = "PASSED" if result.ok else "FAILED"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(result.phase)} validation: {verdict}</title>
<style>{CSS}</style></head><body>
<h1>Validation of <code>{e(result.phase)}</code> <span class="verdict {"ok" if result.ok else "failed"}">{verdict}</span></h1>
<dl><dt>database</dt><dd><code>{e(result.database)}</code></dd><dt>revision</dt><dd>{e(result.revision or "-")}</dd>
<dt>run by</dt><dd>{e(result.operator or "-")} on {e(result.host or "-")}</dd><dt>when</dt><dd>{e(result.started_at)}</dd>
<dt>took</dt><dd>{f"phase {result.run_seconds:.1f} s, " if result.run_seconds is not None else ""}validation {result.seconds:.1f} s</dd><dt>checksums</dt><dd>{"yes" if result.deep else "no (counts only)"}</dd></dl>
{quarantine}
<h2>Rows per table</h2>
<div class="legend"><span style="background:#3b6fd8"></span>source<span style="background:#2e9e5b"></span>target<span style="background:#d98e04"></span>rejected</div>
<table>{"".join(bars)}</table>
<table><tr><th>source</th><th>target</th><th>source rows</th><th>target rows</th><th>rejected</th><th>status</th></tr>{rows}</table>
<h2>Differences</h2><ul>{diff_items}</ul>
{f"<table><tr><th>table</th><th>kind</th><th>key</th><th>columns that differ</th></tr>{samples}</table>" if samples else ""}
<h2>Integrity checks</h2><table><tr><th>table</th><th>check</th><th>ok</th><th>result</th></tr>{checks}</table>
<h2>Rejected rows</h2>
{f"<table><tr><th>target</th><th>source key</th><th>SQLSTATE</th><th>message</th></tr>{rejects}</table>" if rejects else "<p>none</p>"}
</body></html>
"""


RENDERERS = {"json": to_json, "markdown": to_markdown, "html": to_html, "text": to_text}


def render(result: ValidationResult, fmt: str) -> str:
    return RENDERERS[fmt](result)


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def save(result: ValidationResult, directory: Path) -> dict[str, Path]:
    """Write ``<phase>-<UTC timestamp>.json`` and ``.html`` under ``directory``; return their paths."""
    files.private_dir(directory)  # the reports list rejected rows: customer data, owner-only
    stamp = _stamp()
    out: dict[str, Path] = {}
    for fmt, ext in (("json", "json"), ("html", "html")):
        out[fmt] = files.write_private(directory / f"{result.phase}-{stamp}.{ext}", render(result, fmt))
    return out


def summary(rows: list[dict[str, Any]], *, right: tuple[str, ...] = ()) -> str:
    """A plain table of dict rows (validation, status, history); the columns named in ``right`` are right-aligned."""
    if not rows:
        return "(nothing)"
    cols = list(rows[0])
    cells = [[str(r.get(c, "") if r.get(c) is not None else "") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if c in right else v.ljust(w) for c, v, w in zip(cols, values, widths, strict=True)
        ).rstrip()

    return "\n".join([line(cols), "  ".join("-" * w for w in widths), *(line(row) for row in cells)])


# -- rehearsals -----------------------------------------------------------------------------------
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


STEP_COLOURS = {"setup": "#9aa5b8", "run": "#3b6fd8", "rollback": "#d98e04", "rerun": "#2e9e5b", "recheck": "#7a4fd0"}


def rehearsal_html(r: RehearsalResult) -> str:
    e = html.escape
    total = max([s.start + s.seconds for s in r.steps] + [0.001])
    rows = sorted(
        {(s.phase, s.table or "(phase)") for s in r.steps},
        key=lambda x: min(st.start for st in r.steps if (st.phase, st.table or "(phase)") == x),
    )
    height, label_w, width = 22, 260, 860
    bars = []
    for i, (phase, table) in enumerate(rows):
        y = 30 + i * height
        bars.append(f"<text x='0' y='{y + 14}' font-size='12'>{e(phase)} · {e(table)}</text>")
        for s in r.steps:
            if (s.phase, s.table or "(phase)") != (phase, table):
                continue
            x = label_w + width * s.start / total
            w = max(width * s.seconds / total, 1.5)
            bars.append(
                f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{height - 6}' fill='{STEP_COLOURS[s.step]}'>"
                f"<title>{e(s.step)} {e(table)}: {s.seconds:.2f} s, {s.rows:,} rows</title></rect>"
            )
    legend = "".join(f"<span style='background:{c}'></span>{k}" for k, c in STEP_COLOURS.items())
    svg_h = 40 + len(rows) * height
    timeline = (
        f"<svg width='{label_w + width + 20}' height='{svg_h}' role='img' aria-label='timeline'>"
        f"<text x='{label_w}' y='14' font-size='11'>0 s</text>"
        f"<text x='{label_w + width - 40}' y='14' font-size='11'>{total:.1f} s</text>{''.join(bars)}</svg>"
    )
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
<style>{CSS}.legend span{{display:inline-block;width:10px;height:10px;margin:0 .3rem 0 1rem}}</style></head><body>
<h1>Rehearsal of <code>{e(", ".join(r.phases))}</code>
<span class="verdict {"ok" if r.ok else "failed"}">{verdict}</span></h1>
<dl><dt>production (read only)</dt><dd><code>{e(r.production)}</code></dd><dt>staging</dt><dd><code>{e(r.staging)}</code>
(built by {e(r.built)})</dd><dt>window</dt><dd>{e(r.window or "-")}</dd><dt>when</dt><dd>{e(r.started_at)}, took {_dur(r.seconds)}</dd>
<dt>validations</dt><dd>{"all passed" if r.validations_ok else "NOT all passed"}</dd></dl>
<h2>Prediction against the window</h2>
<table><tr><th>phase</th><th>predicted (bar: ±30%, line: window end)</th><th>time</th><th></th></tr>{"".join(preds)}</table>
{f"<h3>What would make it fit</h3><ul>{advice}</ul>" if advice else ""}
<h2>Timeline of the rehearsal</h2><div class="legend">{legend}</div>{timeline}
<h2>Tables</h2><table><tr><th>phase</th><th>table</th><th>staging rows</th><th>production rows</th><th>rows/s</th>
<th>predicted</th></tr>{tables}</table>
<h2>Drift between staging and production</h2><ul>{drift}</ul>
</body></html>
"""


def save_rehearsal(result: RehearsalResult, directory: Path) -> dict[str, Path]:
    """Write ``rehearsal-<UTC>.json``, ``.md`` and ``.html`` under ``directory``."""
    files.private_dir(directory)
    stamp = _stamp()
    out = {}
    for fmt, text in (
        ("json", json.dumps(result.to_dict(), indent=2, default=str)),
        ("markdown", rehearsal_markdown(result)),
        ("html", rehearsal_html(result)),
    ):
        out[fmt] = files.write_private(directory / f"rehearsal-{stamp}.{'md' if fmt == 'markdown' else fmt}", text)
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
